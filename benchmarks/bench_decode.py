"""End-to-end image decoding: plain HF ``generate`` vs the library's loops, without and with DAiD / FAiD.

    pytest benchmarks/bench_decode.py --benchmark-only

One benchmark = one full image generation (all image tokens, CFG, sampling) for a batch; the
per-image time is in ``extra_info``. Every row is a median (``timing.run``). DAiD / FAiD rows run
the library's loop without retrieval (same loop kind) interleaved with them, so their overhead
(``overhead_vs_same_loop_plain``) comes from the same rounds; ``daid-overlap`` rows (DAiD
retrieval on a side stream, concurrent with the model forward) also interleave the same DAiD loop
without overlap (``ratio_to_no_overlap``). Each batch's ``hf-generate`` row times plain HF
``generate`` (on CUDA one call, ~15 s at this size, without a warm-up: eager HF compiles nothing);
the others record their ratio to its median (``ratio_to_hf_generate``).

Cases: on CUDA, the Janus-Pro-1B configuration (``shapes.JANUS_PRO_1B``: 24 layers, hidden 2048,
16 heads x 128, FFN 5632, codebook 16384, 24x24 grid, random bf16 weights) at batch 1 and 16 with
exact-search databases of 1M and 10M synthetic fp16 keys, DAiD with K = 2048, FAiD as in its
overhead target (K = 10, hops (1, 2), 2 blenders with random weights, batch 16); on CPU, the tiny
model with a 20k-key database (reference ops; correctness and plumbing, not speed claims).
GPU-only cases are skipped with a reason on CPU. The overhead targets are answered per step by
``bench_decode_step.py`` (CUDA-graph replays of one step, interleaved); scripts/gpu_check.sh runs
those and, from here, the ``hf-generate`` and ``cuda-graph-plain`` rows.
"""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig

import arrag_kernels as ak
import timing
from arrag_kernels.faid import FAiDBlenders
from arrag_kernels.models import get_adapter, hf_image_generate_kwargs, tiny_janus, tiny_prompt_ids
from arrag_kernels.patching import PatchHandle
from shapes import JANUS_PRO_1B, ModelShape, build_model, synthetic_db

CUDA = torch.cuda.is_available()
GPU_ONLY = pytest.mark.skipif(not CUDA, reason="Janus-Pro-1B decoding needs a GPU")

# name -> (model kwargs, device, dtype, DAiD K, [(batches, loop, method, database size or None), ...]);
# method: "plain" (no retrieval), "daid", "daid-overlap" (overlap_retrieval=True) or "faid" (FAID).
# The GPU list is trimmed for the GPU time limit: eager loops cost ~25 ms per step at this size
# (Python dispatch of 24 layers), graph replays ~1-2 ms.
BOTH, B16 = (1, 16), (16,)
CASES = {
    "tiny-cpu": (dict(grid=8), "cpu", torch.float32, 256,
                 [((1,), "dynamic", "daid", 20_000), ((4,), "static", "daid", 20_000),
                  ((4,), "static", "daid-overlap", 20_000), ((4,), "static", "faid", 20_000)]),
    "janus-pro-1b": (
        JANUS_PRO_1B, "cuda", torch.bfloat16, 2048,
        [(BOTH, "dynamic", "plain", None), (BOTH, "static", "plain", None), (BOTH, "static", "daid", 10_000_000),
         (B16, "static", "faid", 1_000_000),
         (BOTH, "cuda-graph", "plain", None), (BOTH, "cuda-graph", "daid", 1_000_000),
         (BOTH, "cuda-graph", "daid-overlap", 1_000_000), (BOTH, "cuda-graph", "daid", 10_000_000),
         (BOTH, "cuda-graph", "daid-overlap", 10_000_000), (B16, "cuda-graph", "faid", 1_000_000)],
    ),
}
# Issue-4 target: FAiD (its K = 10 retrieval included) adds <= 8% to the same loop without retrieval.
FAID = ak.FAiDConfig(k=10, hops=(1, 2), blenders=2)
FAID_TARGET_OVERHEAD = 0.08

_medians: dict = {}  # (name, batch, loop, method, db size) -> median seconds of this run


@pytest.fixture(scope="module")
def setups():
    cache = {}

    def get(name):
        if name not in cache:
            model_kw, device, dtype, *_ = CASES[name]
            if isinstance(model_kw, ModelShape):
                cache[name] = build_model(model_kw, device)
            else:
                with torch.device(device):
                    model = tiny_janus(seed=0, **model_kw)
                cache[name] = model.to(dtype).eval()
        return cache[name]

    return get


def _inputs(model, batch):
    ids = tiny_prompt_ids(batch, length=12).to(model.device)
    gen = GenerationConfig(do_sample=True, top_k=0, guidance_scale=5.0, bos_token_id=1, pad_token_id=0,
                           generation_kwargs={"boi_token_id": 100})
    return ids, gen


def _params():
    for name, (_, device, _, _, runs) in CASES.items():
        marks = [GPU_ONLY] if device == "cuda" else []
        # batch-major; each batch starts with plain HF generate on the unpatched model
        for batch in sorted({b for batches, *_ in runs for b in batches}):
            yield pytest.param(name, batch, "hf", "plain", None, id=f"{name}-b{batch}-hf-generate", marks=marks)
            for batches, loop, method, size in runs:
                if batch in batches:
                    db = f"-db{size // 1000}k" if size else ""
                    yield pytest.param(name, batch, loop, method, size, id=f"{name}-b{batch}-{loop}-{method}{db}",
                                       marks=marks)


def _patch_args(model, method: str, k: int):
    """(config, blender_weights) for ``patch_model``: nothing, DAiD with K = ``k``, or FAiD with
    default-initialised (random) blenders."""
    if method == "plain":
        return None, None
    if method == "faid":
        torch.manual_seed(0)
        return FAID, FAiDBlenders.for_model(model, FAID)
    return ak.DAiDConfig(lam=0.05, tau=0.6, k=k), None


def _loop(model, ids, mask, gen, loop, method="plain", db=None, k=0):
    """(one image generation with the library's ``loop``, its patch handle). The patch is built here,
    outside the timed call: FAiD's blender taps are composed and its layer hooks registered once.
    Those hooks act only in a decode given the FAiD runtime, so the baselines interleaved with a FAiD
    row run as without them; the caller removes them (``handle.faid.remove()``) after the row."""
    config, blender_weights = _patch_args(model, method, k)
    overlap = method == "daid-overlap"
    kw = dict(attention_mask=mask, generation_config=gen, loop=loop, overlap_retrieval=overlap)
    handle = PatchHandle(model, db, config, blender_weights=blender_weights)  # not installed: generate stays HF's
    return (lambda: handle.generate_images(ids, **kw)), handle


@pytest.mark.parametrize("name,batch,loop,method,db_size", list(_params()))
def test_decode(benchmark, setups, name, batch, loop, method, db_size):
    """A row per (loop, method); DAiD / FAiD rows run the same loop without retrieval interleaved
    (``ratio_to_plain``, ``overhead_vs_same_loop_plain``), overlap rows also the same DAiD loop
    without overlap; the ratio to HF ``generate`` comes from that row's median (not interleaved: at
    the GPU shape one HF call costs as much as several rounds of the rest)."""
    model = setups(name)
    _, device, _, k, _ = CASES[name]
    ids, gen = _inputs(model, batch)
    mask = torch.ones_like(ids)
    baselines, handle = {}, None
    if loop == "hf":
        run = lambda: model.generate(ids, attention_mask=mask, generation_config=gen, generation_mode="image",  # noqa: E731
                                     **hf_image_generate_kwargs(model))
    else:
        db = synthetic_db(model, db_size, device) if db_size else None
        run, handle = _loop(model, ids, mask, gen, loop, method, db, k)
        if method != "plain":
            baselines["plain"] = _loop(model, ids, mask, gen, loop)[0]
        if method == "daid-overlap":
            baselines["no_overlap"] = _loop(model, ids, mask, gen, loop, "daid", db, k)[0]
    benchmark.group = f"{name}-b{batch}"
    benchmark.extra_info.update(loop=loop, method=method, batch=batch, db_keys=db_size or 0,
                                k={"plain": 0, "faid": FAID.k}.get(method, k),
                                overlap_retrieval=method == "daid-overlap")
    # At the GPU shape one HF call takes ~15 s of eager Python dispatch and compiles nothing: timed once.
    once = dict(min_rounds=1, warmup=False) if loop == "hf" and device == "cuda" else {}
    try:
        tokens = timing.run(benchmark, run, baselines, **once)  # its first call is the output checked here
    finally:
        if handle is not None and handle.faid is not None:
            handle.faid.remove()
    assert tokens.shape == (batch, get_adapter(model).grid[0] ** 2) and bool((tokens >= 0).all())
    seconds = benchmark.extra_info.get("median_s")
    if seconds is None:  # --benchmark-disable
        return
    benchmark.extra_info["ms_per_image"] = 1e3 * seconds / batch
    _medians[(name, batch, loop, method, db_size)] = seconds
    hf = _medians.get((name, batch, "hf", "plain", None))
    if hf is not None:
        benchmark.extra_info["ratio_to_hf_generate"] = seconds / hf
    if "ratio_to_plain" in benchmark.extra_info:
        benchmark.extra_info["overhead_vs_same_loop_plain"] = benchmark.extra_info["ratio_to_plain"] - 1
    if method == "faid":
        benchmark.extra_info["target_overhead"] = FAID_TARGET_OVERHEAD
