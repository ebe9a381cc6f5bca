"""FAiD blend (``faid_blend``): the affine fast path on every backend == the literal official formulation
(float64), for the blend and for the weighted candidates w_k hhat_k the next blender reads; kernels
against the reference, error-relative (batch and reduction tiles included); the launch plan pinned against
the kernels launched; no host reads; input errors; torch.library registration; FAiDConfig."""

import copy

import pytest
import torch

from arrag_kernels.faid import ComposedBlender, FAiDConfig, FAiDLayer, blend_dense, blend_literal
from arrag_kernels.ops import faid_blend, faid_blend_plan, faid_blend_ref, use_backend
from arrag_kernels.ops import faid_plan
from arrag_kernels.ops.faid import faid_blend_dispatcher

from .utils import (OPCHECK_KWARGS, TRITON_DTYPES, UNAVAILABLE, assert_close, assert_error_relative, backend_device,
                    forbid_host_reads, op_backends, record_launches)

needs_triton = pytest.mark.skipif(UNAVAILABLE["triton"] is not None, reason=UNAVAILABLE["triton"] or "")

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


def _blend_args(B, n, K, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: (torch.randn(*s, generator=g) * 0.2).to(dtype)  # noqa: E731
    return (r(B, n, D), r(B, K, D), r(n, D, D), r(D, D), r(D), r(D, D), r(D), r(D), r(1))


def _triton_faid():
    from arrag_kernels.ops._triton import faid as triton_faid

    return triton_faid


def _recorded(monkeypatch):
    """Records the blend's launches (kernel name, grid) and its scratch buffers."""
    return record_launches(monkeypatch, _triton_faid())


@needs_triton
@pytest.mark.parametrize("programs", [faid_plan.CONTEXT_PROGRAMS, 2], ids=["split", "long-chunks"])
@pytest.mark.parametrize("B,n,K,D", [(70, 2, 3, 24), (5, 7, 13, 40)])
def test_triton_blend_tiles(B, n, K, D, programs, monkeypatch):
    """Every tiling of the batched GEMMs: several batch tiles of the context GEMM (B > 64: the taps are
    read once per tile), several candidate row blocks with a ragged last one, one reduction step per
    chunk or many (few context programs); error-relative against the float64 truth."""
    monkeypatch.setattr(faid_plan, "CONTEXT_PROGRAMS", programs)
    launches, scratch = _recorded(monkeypatch)
    args = _blend_args(B, n, K, D, torch.float32, seed=B + D)
    shape = faid_plan.blend_shape(B, n, K, D, 4)
    assert (shape.batch_tiles > 1 or shape.row_blocks > 1) and (programs > 2 or shape.chunk > shape.block_d)
    with use_backend("triton"):
        got = faid_blend(*(a.to(backend_device("triton")) for a in args))
    want = faid_blend_ref(*args)
    truth = faid_blend_ref(*(a.double() for a in args))
    for g_, w_, t_, name in zip(got, want, truth, ("blended", "w_k hhat_k")):
        assert_error_relative(g_, w_, t_, torch.float32, what=f"{name} B={B} split={shape.split}")
    assert dict(launches)["_faid_context_kernel"] == (shape.col_blocks, shape.split, shape.batch_tiles)
    assert scratch["context"].shape[0] == shape.split


@needs_triton
def test_faid_blend_plan_pins_launches_and_scratch(monkeypatch):
    """faid_blend_plan's kernels, grids and scratch are exactly what the blend launches and allocates."""
    launches, scratch = _recorded(monkeypatch)
    B, n, K, D = 3, 5, 10, 80
    with use_backend("triton"):
        faid_blend(*(a.to(backend_device("triton")) for a in _blend_args(B, n, K, D, torch.float16, seed=4)))
    plan = faid_blend_plan(B, n, K, D, torch.float16)
    assert plan["launches"] == len(launches) == 4
    assert [(f"_faid_{kn['name']}_kernel", kn["grid"]) for kn in plan["kernels"]] == launches
    assert plan["scratch"] == {name: t.nbytes for name, t in scratch.items()}
    assert plan["scratch_bytes"] == sum(t.nbytes for t in scratch.values())
    assert plan["tap_bytes"] == n * D * D * 2 and plan["tap_reads"] == 1


def test_faid_blend_plan_reads_the_taps_once_per_step():
    """Issue 22 item 3 at the Janus-Pro-1B decode shape (D 2048, hops 1+2: 12 causal cells, K 10, bf16):
    the composed taps are read once per step for the whole batch (the per-image context kernel read
    them 16 times at batch 16), in 4 launches, with a few MB of scratch."""
    for batch in (1, 16):
        plan = faid_blend_plan(batch, 12, 10, 2048, "bfloat16")
        assert plan["tap_bytes"] == 12 * 2048 * 2048 * 2
        assert plan["tap_reads"] == 1 and plan["launches"] == 4
        assert plan["scratch_bytes"] <= 4 << 20
        context = plan["kernels"][0]
        assert context["bytes_read"] <= 1.5 * plan["tap_bytes"]  # taps once + the cells per column block


def test_faid_blend_plan_bad_input():
    with pytest.raises(ValueError, match="floating torch dtype"):
        faid_blend_plan(1, 4, 10, 32, "int8")
    with pytest.raises(ValueError, match="batch, cells, k, dim >= 1"):
        faid_blend_plan(1, 4, 0, 32, torch.float32)


@needs_triton
def test_triton_blend_reads_nothing_back_to_the_host(monkeypatch):
    """Capture safety as far as the CPU shows: no .item() / .tolist() / bool() / int() / float() on a
    tensor from the library's code during the blend (each is a device-to-host sync on CUDA)."""


    args = [a.to(backend_device("triton")) for a in _blend_args(2, 3, 5, 32, torch.float32, seed=6)]
    forbid_host_reads(monkeypatch, "the blend")
    with use_backend("triton"):
        got = faid_blend(*args)
    monkeypatch.undo()
    want = faid_blend_ref(*args)
    assert_close(got[0], want[0], what="blended (no host reads)")
    assert_close(got[1], want[1], what="w_k hhat_k (no host reads)")


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
