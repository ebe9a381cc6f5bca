"""Neighbour keys (``neighbor_keys``, ``feature_neighbor_keys``, ``retrieval_positions``): the reference
on hand-made grids, and every kernel backend equal to it (a pure gather: exactly equal)."""

import pytest
import torch

from arrag_kernels import KeyLayout
from arrag_kernels.ops import (feature_neighbor_keys, neighbor_keys, neighbor_keys_ref, retrieval_positions,
                               use_backend)
from arrag_kernels.ops.neighborhood import neighbor_keys_dispatcher

from .utils import OPCHECK_KWARGS, TRITON_DTYPES, UNAVAILABLE, backend_device, op_backends

H, W, d = 5, 6, 2


def _codebook(v=40):
    # Row t is (t, -t): every cell of a key can be traced back to its token id.
    t = torch.arange(v, dtype=torch.float32)
    return torch.stack([t, -t], 1)


def _grid_tokens():
    return (torch.arange(H * W) + 1).reshape(1, H * W)  # token at (r, c) is r*W + c + 1


def _cells(keys):
    return keys.reshape(-1, d)[:, 0].long().tolist()


def test_offsets_follow_method_order():
    assert KeyLayout("causal", 1).offsets == ((-1, -1), (-1, 0), (-1, 1), (0, -1))
    assert KeyLayout("causal", "12").offsets == (
        (-2, -2), (-2, -1), (-2, 0), (-2, 1), (-2, 2),
        (-1, -2), (-1, -1), (-1, 0), (-1, 1), (-1, 2),
        (0, -2), (0, -1),
    )
    assert KeyLayout("causal", 2).offsets == KeyLayout("causal", (1, 2)).offsets
    assert KeyLayout("full", 1).offsets == ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def test_hand_made_grid_hop1_causal():
    tokens = _grid_tokens()
    r, c = 2, 3
    keys, valid = neighbor_keys(tokens, _codebook(), torch.tensor([r * W + c]), (H, W), KeyLayout())
    # UL, U, UR, L of (2, 3) -> tokens of (1,2), (1,3), (1,4), (2,2)
    assert _cells(keys) == [1 * W + 2 + 1, 1 * W + 3 + 1, 1 * W + 4 + 1, 2 * W + 2 + 1]
    assert keys.reshape(-1, d)[:, 1].tolist() == [-x for x in _cells(keys)]
    assert valid.tolist() == [True]


def test_borders_skip_and_zero():
    tokens = _grid_tokens()
    pos = torch.tensor([[0 * W + 3, 2 * W + 0, 2 * W + W - 1, 1 * W + 1]])
    keys, valid = neighbor_keys(tokens, _codebook(), pos, (H, W), KeyLayout(border="skip"))
    assert valid.tolist() == [[False, False, False, True]]
    keys_z, valid_z = neighbor_keys(tokens, _codebook(), pos, (H, W), KeyLayout(border="zero"))
    assert valid_z.all()
    assert torch.equal(keys, keys_z)  # the border policy changes validity, not the zero-filled key
    # (0, 3): the row above is outside: UL, U, UR zero; L = token of (0, 2)
    assert _cells(keys[0, 0]) == [0, 0, 0, 3]
    # (2, 5): UR is outside the grid
    assert _cells(keys[0, 2]) == [1 * W + 4 + 1, 1 * W + 5 + 1, 0, 2 * W + 4 + 1]


def test_not_generated_cells_are_zero():
    tokens = _grid_tokens().clone()
    tokens[0, 1 * W + 3] = -1  # U of (2, 3) not generated
    keys, _ = neighbor_keys(tokens, _codebook(), torch.tensor([2 * W + 3]), (H, W), KeyLayout())
    assert _cells(keys) == [1 * W + 2 + 1, 0, 1 * W + 4 + 1, 2 * W + 2 + 1]


def test_retrieval_positions_official_count():
    assert int(retrieval_positions((24, 24), KeyLayout()).sum()) == 23 * 22  # 506 entries per image
    assert int(retrieval_positions((24, 24), KeyLayout(hops=2)).sum()) == 22 * 20
    assert int(retrieval_positions((24, 24), KeyLayout(border="zero")).sum()) == 576


@pytest.mark.parametrize("layout", [KeyLayout(), KeyLayout(hops="12"), KeyLayout("full", 1, "zero"), KeyLayout(border="zero")],
                         ids=lambda l: f"{l.neighborhood}-{''.join(map(str, l.hops))}-{l.border}")
def test_feature_keys_equal_token_keys(layout):
    g = torch.Generator().manual_seed(0)
    B, h, w, V = 3, 7, 9, 31
    codebook = torch.randn(V, 8, generator=g)
    tokens = torch.randint(0, V, (B, h * w), generator=g)
    feats = codebook[tokens].reshape(B, h, w, 8)
    keys_f, valid_f = feature_neighbor_keys(feats, layout)
    pos = torch.arange(h * w).expand(B, -1)
    keys_t, valid_t = neighbor_keys(tokens, codebook, pos, (h, w), layout)
    assert torch.equal(keys_f, keys_t)
    assert torch.equal(valid_f.expand(B, -1), valid_t)
    assert keys_f.shape[-1] == layout.key_dim(8)


def test_bad_inputs():
    tokens, cb = _grid_tokens(), _codebook()
    with pytest.raises(ValueError, match=r"\(B, H\*W\)"):
        neighbor_keys(tokens[:, :-1], cb, torch.tensor([7]), (H, W), KeyLayout())
    with pytest.raises(TypeError, match="token ids"):
        neighbor_keys(tokens.float(), cb, torch.tensor([7]), (H, W), KeyLayout())
    with pytest.raises(ValueError, match="positions"):
        neighbor_keys(tokens, cb, torch.tensor([7, 8]), (H, W), KeyLayout())
    with pytest.raises(ValueError, match="neighborhood"):
        KeyLayout("diagonal")
    with pytest.raises(ValueError, match="hops"):
        KeyLayout(hops=0)


# ---------------------------------------------------------------------------------------------
# kernels against the reference

LAYOUTS = {
    "causal1-skip": KeyLayout(),
    "causal2-zero": KeyLayout(hops=(2,), border="zero"),
    "causal12-zero": KeyLayout(hops=(1, 2), border="zero"),
    "full1-zero": KeyLayout(neighborhood="full", border="zero"),
    "full1-skip": KeyLayout(neighborhood="full", border="skip"),
    "full2-skip": KeyLayout(neighborhood="full", hops=(2,)),
}
# (B, grid, positions per image (None: a 1-D positions tensor), token dtype): odd grids, both position
# ranks with both token dtypes
GRID_CASES = {
    "b1-24x24": (1, (24, 24), None, torch.int64),
    "b3-5x7": (3, (5, 7), None, torch.int64),
    "b3-7x5-p4": (3, (7, 5), 4, torch.int64),
    "b3-7x9-i32": (3, (7, 9), None, torch.int32),
    "b3-7x9-p5-i32": (3, (7, 9), 5, torch.int32),
}


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("case", GRID_CASES.values(), ids=GRID_CASES.keys())
@pytest.mark.parametrize("backend,dtype", op_backends(  # codebook dtypes: the C++ kernel takes float32
    neighbor_keys_dispatcher, exclude=("reference",), dtypes={"triton": TRITON_DTYPES, "cpp": [torch.float32]}))
def test_kernel_equals_reference(backend, dtype, case, layout):
    B, grid, P, tok_dtype = case
    g = torch.Generator().manual_seed(0)
    H, W = grid
    V, dim = 61, 8
    tokens = torch.randint(-1, V, (B, H * W), generator=g).to(tok_dtype)  # -1: not generated yet
    codebook = torch.randn(V, dim, generator=g).to(dtype)
    positions = torch.randint(0, H * W, (B,) if P is None else (B, P), generator=g)
    device = backend_device(backend)
    with use_backend(backend):
        keys, valid = neighbor_keys(tokens.to(device), codebook.to(device), positions.to(device), grid, layout)
    ref_keys, ref_valid = neighbor_keys_ref(tokens, codebook, positions, grid, layout)
    assert keys.dtype == codebook.dtype and keys.shape == ref_keys.shape
    assert torch.equal(keys.cpu(), ref_keys), \
        f"gathered keys differ (a pure copy must be exact); max error {(keys.cpu() - ref_keys).abs().max().item()}"
    assert torch.equal(valid.cpu(), ref_valid)


@pytest.mark.skipif(UNAVAILABLE["triton"] is not None, reason=UNAVAILABLE["triton"] or "")
def test_opcheck_triton():
    """Full opcheck compiled on CUDA; under the interpreter only the schema and autograd-registration checks."""
    from arrag_kernels.ops._triton.neighborhood import neighbor_keys_op

    g = torch.Generator().manual_seed(0)
    device = backend_device("triton")
    tokens = torch.randint(-1, 20, (2, 35), generator=g).to(device)
    codebook = torch.randn(20, 8, generator=g).to(device)
    positions = torch.randint(0, 35, (2, 3), generator=g).to(device)
    torch.library.opcheck(neighbor_keys_op, (tokens, codebook, positions, 5, 7, 1, True, True), **OPCHECK_KWARGS)


@pytest.mark.skipif(UNAVAILABLE["cpp"] is not None, reason=UNAVAILABLE["cpp"] or "")
def test_opcheck_cpp():
    from arrag_kernels.ops import _cpp

    g = torch.Generator().manual_seed(11)
    tokens = torch.randint(-1, 50, (2, 35), generator=g)
    offsets = torch.tensor(KeyLayout().offsets, dtype=torch.int32)
    torch.library.opcheck(_cpp._neighbor_keys_op, (tokens, torch.randn(50, 4, generator=g),
                                                   torch.randint(0, 35, (2, 3), generator=g), offsets, 5, 7, True))
