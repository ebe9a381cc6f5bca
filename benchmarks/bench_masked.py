"""Masked decoding: the cost of all-cell retrieval per step against the model step.

    pytest benchmarks/bench_masked.py --benchmark-only

One decode step of a MaskGIT-style generator at the first retrieving step of the default schedule
(12 steps, retrieval in the final half: the step with the most unknown cells that retrieves), at
batch 1 and 16. Providers:

* ``model-step``: the generator forward over the whole grid (``generator.logits``);
* ``daid-retrieval``: the retrieval part of a DAiD step: 8-neighbour queries of the P unknown cells
  of every image, ONE exact search of the B * P queries, and the fused per-cell merge + draw
  (``sample_cells``: ``daid_sample`` on B * P rows, which the plain step runs without hits);
* ``faid-model-step``: the forward with FAiD blenders (K = 10 retrieval included).

Every row goes through ``timing.run`` (medians and spread, rounds sized by ``--benchmark-max-time``);
the ``daid-retrieval`` and ``faid-model-step`` rows run the model step interleaved with them and
record ``ratio_to_model_step``.

``test_masked_faid_blend`` times one all-cell blender; the fast form's row runs the literal K conv
stacks interleaved (``ratio_to_literal``).

Shapes: ``tiny-cpu`` (8 x 8 grid, 512 codes, hidden 64, 2 layers, 20k keys, K = 64, reference ops on
CPU: plumbing, not speed claims) and ``showo-shape`` (CUDA only: Show-o's 16 x 16 grid, 8192 codes
of 13-d LFQ vectors, a 24-layer hidden-2048 transformer with random bf16 weights, 1M keys, K = 2048).
"""

from __future__ import annotations

import pytest
import torch

import arrag_kernels as ak
import timing
from arrag_kernels.faid import FAiDBlenders
from arrag_kernels.masked import (MaskedDAiD, MaskedDecodeConfig, MaskedFAiD, masked_positions, sample_cells,
                                  tiny_maskgit)
from arrag_kernels.retrieval import DatabaseMeta

CUDA = torch.cuda.is_available()
# name -> (generator kwargs, device, dtype, database keys, DAiD K)
SHAPES = {
    "tiny-cpu": (dict(grid=(8, 8), codebook_size=512, embed_dim=8, dim=64, num_layers=2, heads=4), "cpu",
                 torch.float32, 20_000, 64),
    "showo-shape": (dict(grid=(16, 16), codebook_size=8192, embed_dim=13, dim=2048, num_layers=24, heads=16), "cuda",
                    torch.bfloat16, 1_000_000, 2048),
}
BATCHES = (1, 16)
PROVIDERS = ("model-step", "daid-retrieval", "faid-model-step")
SCHEDULE = MaskedDecodeConfig(steps=12)
FAID = ak.FAiDConfig(k=10, hops=(1, 2), blenders=2)
_setups: dict = {}


def V_of(name: str) -> int:
    return SHAPES[name][0]["codebook_size"]


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _setup(name: str):
    if name in _setups:
        return _setups[name]
    _setups.clear()
    kwargs, device, dtype, num_keys, k = SHAPES[name]
    with torch.device(device):
        gen = tiny_maskgit(seed=0, **kwargs)
    gen.model.to(dtype)
    g = torch.Generator(device=device).manual_seed(0)
    d = kwargs["embed_dim"]
    # 8 unit-norm cells per key (Show-o keys: 8 neighbours x LFQ vector), random token values
    keys = torch.nn.functional.normalize(torch.randn(num_keys, 8, d, generator=g, device=device), dim=-1).flatten(1)
    values = torch.randint(0, gen.codebook_size, (num_keys,), generator=g, device=device)
    meta = DatabaseMeta(layout=ak.KeyLayout("full", 1, "zero"), codebook_size=gen.codebook_size, embed_dim=d,
                        grid=gen.grid, key_source="codebook", model_fingerprint=gen.fingerprint(), num_images=0)
    db = ak.PatchDatabase(keys.to(torch.float16 if device == "cuda" else torch.float32), values, meta)
    torch.manual_seed(0)
    blenders = FAiDBlenders(gen.hidden_size, gen.num_layers, FAID).to(device=device, dtype=dtype).eval()
    _setups[name] = (gen, MaskedDAiD(db, ak.DAiDConfig(lam=0.05, tau=0.6, k=k), gen), MaskedFAiD(gen, db, blenders))
    return _setups[name]


def _step_state(gen, batch: int, device):
    """The grid at the start of the first retrieving step: P unknown cells per image, the rest known."""
    N = gen.grid[0] * gen.grid[1]
    P = SCHEDULE.masked_counts(N)[SCHEDULE.first_retrieval_step]
    g = torch.Generator(device=device).manual_seed(1)
    tokens = torch.randint(0, gen.codebook_size, (batch, N), generator=g, device=device)
    unknown = torch.rand(batch, N, generator=g, device=device).argsort(1)[:, :P]
    tokens.scatter_(1, unknown, -1)
    return tokens, masked_positions(tokens, P), torch.arange(batch, device=device) % 10, P


def _calls(name: str, batch: int):
    gen, daid, faid = _setup(name)
    device = SHAPES[name][1]
    tokens, positions, labels, P = _step_state(gen, batch, device)
    V = gen.codebook_size
    logits = torch.randn(batch * P, V, device=device)
    uniforms = torch.rand(batch * P, device=device)

    def daid_step():
        dist, ids, valid = daid.retrieve(tokens, positions)
        hits = (dist.reshape(batch * P, -1), ids.reshape(batch * P, -1), valid.reshape(-1))
        return sample_cells(logits, uniforms, 1.0, hits, daid.config)

    def run(fn):
        def call():
            with torch.no_grad():
                out = fn()
            _sync(device)
            return out

        return call

    calls = {
        "model-step": run(lambda: gen.logits(tokens, labels)),
        "daid-retrieval": run(daid_step),
        "faid-model-step": run(lambda: gen.logits(tokens, labels, faid.begin_step(tokens, positions, True))),
    }
    return calls, P


def _params():
    for name, (_, device, *_rest) in SHAPES.items():
        marks = [pytest.mark.skipif(not CUDA, reason="the Show-o-shaped case needs a CUDA GPU")] if device == "cuda" else []
        for batch in BATCHES:
            for provider in PROVIDERS:
                yield pytest.param(name, batch, provider, id=f"{name}-b{batch}-{provider}", marks=marks)


@pytest.mark.parametrize("name,batch,provider", list(_params()))
def test_masked_step(benchmark, name, batch, provider):
    _, device, dtype, num_keys, k = SHAPES[name]
    calls, P = _calls(name, batch)
    out = calls[provider]()  # correctness outside the timed calls
    if provider == "daid-retrieval":
        drawn, prob = out
        assert drawn.shape == (batch * P,) and bool(((drawn >= 0) & (drawn < V_of(name))).all())
        assert bool(((prob > 0) & (prob <= 1 + 1e-5)).all())
    else:
        H, W = SHAPES[name][0]["grid"]
        assert out.shape == (batch, H * W, V_of(name))
        assert bool(torch.isfinite(out).all())
    benchmark.group = f"{name}-b{batch}"
    benchmark.extra_info.update(
        provider=provider, batch=batch, unknown_cells_per_image=P, queries_per_search=batch * P, db_keys=num_keys,
        k=k, faid_k=FAID.k, dtype=str(dtype),
    )
    baselines = {"model_step": calls["model-step"]} if provider != "model-step" else None
    timing.run(benchmark, calls[provider], baselines)


# name -> (D, K, hops, batch, grid side, device)
BLEND_SHAPES = {
    "tiny-cpu": (64, 10, (1, 2), 4, 8, "cpu"),
    "showo-shape": (2048, 10, (1, 2), 16, 16, "cuda"),
}


def _blend_params():
    for name, (*_, device) in BLEND_SHAPES.items():
        marks = [pytest.mark.skipif(not CUDA, reason="the Show-o-shaped case needs a CUDA GPU")] if device == "cuda" else []
        for provider in ("fast", "literal"):
            yield pytest.param(name, provider, id=f"{name}-{provider}", marks=marks)


@pytest.mark.parametrize("name,provider", list(_blend_params()))
def test_masked_faid_blend(benchmark, name, provider):
    """One blender over every cell of the grid: ``blend_full`` (one conv pair per hop over the map + the
    composed centre tap) against ``blend_full_literal`` (K conv stacks per cell); equal outputs checked."""
    from arrag_kernels.faid import FAiDLayer
    from arrag_kernels.masked import blend_full, blend_full_literal

    D, K, hops, B, side, device = BLEND_SHAPES[name]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    layer = FAiDLayer(D, hops).to(device=device, dtype=dtype)
    known = torch.rand(B, side, side, 1, device=device) < 0.5
    context = (torch.randn(B, side, side, D, device=device) * known).to(dtype)
    retrieved = (torch.randn(B, side * side, K, D, device=device) * ~known.reshape(B, -1, 1, 1)).to(dtype)
    fn = blend_full if provider == "fast" else blend_full_literal

    def run():
        with torch.no_grad():
            out = fn(layer, context, retrieved)
        _sync(device)
        return out

    out = run()
    with torch.no_grad():
        ref = blend_full_literal(layer, context, retrieved)
    tol = 5e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(out[0].float(), ref[0].float(), atol=tol, rtol=tol)
    benchmark.group = f"masked-faid-blend-{name}"
    benchmark.extra_info.update(provider=provider, D=D, K=K, hops=list(hops), batch=B, grid=side, dtype=str(dtype))
    literal = lambda: blend_full_literal(layer, context, retrieved)  # noqa: E731
    with torch.no_grad():
        timing.run(benchmark, run, {"literal": literal} if provider == "fast" else None)
