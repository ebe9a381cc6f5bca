"""FAiD blender step: affine fast path (faid_blend) vs the literal official conv stacks.

Janus-Pro-1B shape (D = 2048, K = 10, hops "12", batch 16) runs on CUDA only; a small CPU case
(D = 64) runs both formulations with the reference op, interleaved. Correctness is checked outside
the timed call.
Run: ``pytest benchmarks/bench_faid.py --benchmark-only``.
"""

import platform

import pytest
import torch

import timing
from arrag_kernels.faid import ComposedBlender, FAiDLayer, blend_literal
from arrag_kernels.ops import use_backend

# name: (D, K, hops, batch, grid, device)
SHAPES = {
    "janus-pro-1b": (2048, 10, (1, 2), 16, 24, "cuda"),
    "cpu-small": (64, 10, (1, 2), 4, 8, "cpu"),
}
@pytest.mark.parametrize("shape", list(SHAPES))
def test_faid_blend_step(benchmark, shape):
    """The fast path as the row, the literal conv stacks interleaved with it (``ratio_to_literal``)."""
    D, K, hops, B, side, device = SHAPES[shape]
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("Janus-Pro-1B shape needs a CUDA GPU")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    layer = FAiDLayer(D, hops).to(device=device, dtype=dtype)
    context = torch.randn(B, side, side, D, device=device, dtype=dtype)
    p = side * side // 2 + side // 2  # an interior position
    e = torch.randn(B, 1, K, D, device=device, dtype=dtype)
    positions = torch.full((B, 1), p, device=device)
    fast = ComposedBlender(layer.blender)
    r, c = divmod(p, side)
    cells = torch.stack([context[:, r + dr, c + dc] for dr, dc in fast.offsets], dim=1)
    backend = "auto" if device == "cuda" else "reference"

    def run(provider):
        def call():
            with torch.no_grad(), use_backend(backend):
                return fast.blend(cells, e[:, 0]) if provider == "fast" else blend_literal(layer, context, positions, e)

        return call

    benchmark.group = f"faid-blend-{shape}"
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        torch=torch.__version__, dtype=str(dtype), D=D, K=K, hops=list(hops), batch=B, grid=side, provider="fast",
    )
    out = timing.run(benchmark, run("fast"), {"literal": run("literal")})
    with torch.no_grad():
        ref, _ = blend_literal(layer, context, positions, e)
    tol = 5e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(out[0].float(), ref[:, 0].float(), atol=tol, rtol=tol)
