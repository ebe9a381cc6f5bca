"""FAiD blend (``faid_blend``): the affine fast path on every backend == the literal official formulation
(float64), for the blend and for the weighted candidates w_k hhat_k the next blender reads; kernels
against the reference, error-relative; input errors; torch.library registration; FAiDConfig."""

import copy

import pytest
import torch

from arrag_kernels.faid import ComposedBlender, FAiDConfig, FAiDLayer, blend_dense, blend_literal
from arrag_kernels.ops import faid_blend, faid_blend_ref, use_backend
from arrag_kernels.ops.faid import faid_blend_dispatcher

from .utils import (OPCHECK_KWARGS, TRITON_DTYPES, UNAVAILABLE, assert_close, assert_error_relative, backend_device,
                    op_backends)

# (D, hops, H, W): small widths including non-multiples of the Triton tile, odd grids.
CASES = [(32, (1,), 5, 7), (48, (1, 2), 7, 5), (32, (2,), 3, 3), (48, (1, 2, 3), 5, 6)]


def _random_layer(D, hops, seed):
    torch.manual_seed(seed)
    layer = FAiDLayer(D, hops)
    with torch.no_grad():  # make every parameter matter (default conv_weights / norm are all ones)
        if len(hops) > 1:  # a single hop has no hop weights (official)
            layer.blender.conv_weights.normal_()
        layer.retrieval_layernorm.weight.uniform_(0.5, 1.5)
    return layer.double()


def _gather_cells(context, positions, offsets):
    """(B, H, W, D), (B, P) -> (B*P, n, D) causal window cells, zeros outside the grid (test oracle)."""
    B, H, W, D = context.shape
    out = torch.zeros(B, positions.shape[1], len(offsets), D, dtype=context.dtype)
    for b in range(B):
        for j, p in enumerate(positions[b].tolist()):
            r, c = divmod(p, W)
            for n, (dr, dc) in enumerate(offsets):
                if 0 <= r + dr < H and 0 <= c + dc < W:
                    out[b, j, n] = context[b, r + dr, c + dc]
    return out.flatten(0, 1)


@pytest.mark.parametrize("D,hops,H,W", CASES, ids=lambda v: str(v).replace(" ", ""))
@pytest.mark.parametrize("backend", op_backends(faid_blend_dispatcher))
def test_fast_equals_literal(backend, D, hops, H, W):
    K, B = 10, 2
    layer = _random_layer(D, hops, seed=D + H * W)
    g = torch.Generator().manual_seed(1)
    context = torch.randn(B, H, W, D, generator=g, dtype=torch.float64)
    # borders, corners, first and last position, interior
    positions = torch.tensor([[0, W - 1, W, H * W - 1], [W + 1, 2 * W - 1, (H - 1) * W, H * W // 2]])
    e = layer.retrieval_layernorm(torch.randn(B, 4, K, D, generator=g, dtype=torch.float64))
    with torch.no_grad():
        want_blend, want_weighted = blend_literal(layer, context, positions, e)
        device = backend_device(backend)
        fast = ComposedBlender(copy.deepcopy(layer.blender).to(device), torch.float32)
        cells = _gather_cells(context, positions, fast.offsets).float().to(device)
        retrieved = e.flatten(0, 1).float().contiguous()
        with use_backend(backend):
            got_blend, got_weighted = fast.blend(cells, retrieved.to(device))
        with use_backend("reference"):
            ref_blend, ref_weighted = ComposedBlender(copy.deepcopy(layer.blender), torch.float32).blend(
                cells.cpu(), retrieved)
    assert_close(got_weighted, want_weighted.flatten(0, 1), what=f"w_k hhat_k ({backend})")
    assert_close(got_blend, want_blend.flatten(0, 1), what=f"blended ({backend})")
    if backend != "reference":  # fp32 kernel error vs the float64 literal form <= 2 x the fp32 reference's
        assert_error_relative(got_weighted, ref_weighted, want_weighted.flatten(0, 1), torch.float32,
                              what=f"w_k hhat_k ({backend})")
        assert_error_relative(got_blend, ref_blend, want_blend.flatten(0, 1), torch.float32, what=f"blended ({backend})")


@pytest.mark.parametrize("D,hops,H,W", CASES[1:3], ids=lambda v: str(v).replace(" ", ""))
def test_dense_equals_literal_every_position(D, hops, H, W):
    """The training formulation (masked conv + centre product) equals the literal one at all positions."""
    K, B = 3, 2
    layer = _random_layer(D, hops, seed=7)
    g = torch.Generator().manual_seed(2)
    context = torch.randn(B, H, W, D, generator=g, dtype=torch.float64)
    e = torch.randn(B, H * W, K, D, generator=g, dtype=torch.float64)
    positions = torch.arange(H * W).expand(B, -1)
    with torch.no_grad():
        want_blend, want_weighted = blend_literal(layer, context, positions, e)
        got_blend, got_weighted = blend_dense(layer, context, e)
    assert_close(got_weighted, want_weighted, what="w_k hhat_k")
    assert_close(got_blend, want_blend, what="blended")


def test_literal_is_causal():
    """Changing context at or after the target position must not change its output."""
    layer = _random_layer(32, (1, 2), seed=3)
    g = torch.Generator().manual_seed(3)
    context = torch.randn(1, 4, 5, 32, generator=g, dtype=torch.float64)
    e = torch.randn(1, 1, 2, 32, generator=g, dtype=torch.float64)
    pos = torch.tensor([[7]])
    with torch.no_grad():
        a, _ = blend_literal(layer, context, pos, e)
        changed = context.clone().view(1, 20, 32)
        changed[:, 7:] += 1.0
        b, _ = blend_literal(layer, changed.view(1, 4, 5, 32), pos, e)
        changed[:, 6] += 1.0  # the left neighbour is context
        c, _ = blend_literal(layer, changed.view(1, 4, 5, 32), pos, e)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("B,n,K,D", [(3, 4, 10, 48), (1, 12, 7, 97), (2, 1, 16, 64)])
@pytest.mark.parametrize("backend,dtype", op_backends(faid_blend_dispatcher, exclude=("reference",),
                                                      dtypes={"triton": TRITON_DTYPES}))
def test_kernel_matches_reference(backend, dtype, B, n, K, D):
    g = torch.Generator().manual_seed(B * 100 + D)
    r = lambda *s: (torch.randn(*s, generator=g) * 0.2).to(dtype)  # noqa: E731
    args = (r(B, n, D), r(B, K, D), r(n, D, D), r(D, D), r(D), r(D, D), r(D), r(D), r(1))
    want = faid_blend_ref(*args)
    with use_backend(backend):
        got = faid_blend(*(a.to(backend_device(backend)) for a in args))
    for g_, w_, name in zip(got, want, ("blended", "w_k hhat_k")):
        assert g_.dtype == dtype
        assert_close(g_, w_, dtype=dtype, what=f"{name} {dtype}")
    if dtype != torch.float32:  # error-relative against the same inputs in float32 (fp32 accumulation, no cast)
        truth = faid_blend_ref(*(a.float() for a in args))
        for g_, w_, t_, name in zip(got, want, truth, ("blended", "w_k hhat_k")):
            assert_error_relative(g_, w_, t_, dtype, what=f"{name} {dtype}")


def test_faid_blend_errors():
    D = 32
    z = torch.zeros
    with pytest.raises(ValueError, match="taps_t must be"):
        faid_blend(z(1, 4, D), z(1, 10, D), z(3, D, D), z(D, D), z(D), z(D, D), z(D), z(D), z(1))
    with use_backend("triton"):  # under "auto" CPU tensors never go to the interpreter
        reason = faid_blend_dispatcher._reason("triton", (z(1, 4, 8), z(1, 10, 8)), {})
    assert reason is not None and "D = 8" in reason


@pytest.mark.skipif(UNAVAILABLE["triton"] is not None, reason=UNAVAILABLE["triton"] or "")
def test_opcheck_triton():
    """torch.library registration of the Triton op: full opcheck compiled on CUDA; under the interpreter
    only the schema and autograd-registration checks (fake-tensor tracing would launch the interpreter
    on fake tensors)."""
    from arrag_kernels.ops._triton.faid import faid_blend_op as op

    device = backend_device("triton")
    g = torch.Generator().manual_seed(5)
    B, n, K, D = 2, 4, 10, 32
    r = lambda *s: (torch.randn(*s, generator=g) * 0.2).to(device)  # noqa: E731
    args = (r(B, n, D), r(B, K, D), r(n, D, D), r(D, D), r(D), r(D, D), r(D), r(D), r(1))
    torch.library.opcheck(op, args, **OPCHECK_KWARGS)
    blended, weighted = op(*args)
    want = faid_blend_ref(*args)
    assert_close(blended, want[0], what="blended (registered op)")
    assert_close(weighted, want[1], what="w_k hhat_k (registered op)")


def test_config_validation():
    assert FAiDConfig(hops="12").hops == (1, 2)
    assert FAiDConfig(blenders=2).layer_indices(24) == (0, 12)
    assert FAiDConfig(blenders=4).layer_indices(30) == (0, 7, 14, 21, 28)  # official rule, verbatim
    with pytest.raises(ValueError, match="subset of"):
        FAiDConfig(hops=(1, 4))
    with pytest.raises(ValueError, match="decoder layers"):
        FAiDConfig(blenders=3).layer_indices(2)
    with pytest.raises(ValueError, match="k >= 1"):
        FAiDConfig(k=0)
