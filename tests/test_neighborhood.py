import pytest
import torch

from arrag_kernels import KeyLayout
from arrag_kernels.ops import feature_neighbor_keys, neighbor_keys, retrieval_positions

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
