"""End-to-end image decoding: plain HF ``generate`` vs the library's loops, without and with DAiD.

    pytest benchmarks/bench_decode.py --benchmark-only

One benchmark = one full image generation (all image tokens, CFG, sampling) for a batch; the
per-image time is in ``extra_info``. Every row also records, measured in the same run on the same
model, its ratio to HF ``generate`` and to the library's loop without retrieval (same loop kind),
so the DAiD overhead and the speed-up over HF are read off directly.

Cases: on CUDA, a Janus-Pro-1B-shaped model (24 layers, hidden 2048, codebook 16384, 24x24 grid,
random bf16 weights) at batch 1 and 16 with exact-search databases of 1M and 10M synthetic fp16
keys, K = 2048; on CPU, the tiny model with a 20k-key database (reference ops; correctness and
plumbing, not speed claims). GPU-only cases are skipped with a reason on CPU.
"""

from __future__ import annotations

import datetime
import subprocess
import time

import pytest
import torch
from transformers import GenerationConfig

import arrag_kernels as ak
from arrag_kernels.models import get_adapter, tiny_janus, tiny_prompt_ids
from arrag_kernels.retrieval import DatabaseMeta

CUDA = torch.cuda.is_available()
GPU_ONLY = pytest.mark.skipif(not CUDA, reason="Janus-Pro-1B-shaped decoding needs a GPU")

# name -> (model kwargs, device, dtype, batches, K, [(loop, database size or None), ...]).
# The GPU list is trimmed so that scripts/gpu_check.sh fits its time limit: eager loops cost
# ~25 ms per step at this size (Python dispatch of 24 layers), graph replays ~1-2 ms.
CASES = {
    "tiny-cpu": (dict(grid=8), "cpu", torch.float32, (1, 4), 256,
                 [("dynamic", None), ("dynamic", 20_000), ("static", None), ("static", 20_000)]),
    "janus-pro-1b-shape": (
        dict(grid=24, hidden_size=2048, num_layers=24, codebook_size=16384, text_vocab_size=102400, patch_size=16),
        "cuda", torch.bfloat16, (1, 16), 2048,
        [("dynamic", None), ("static", None), ("static", 10_000_000),
         ("cuda-graph", None), ("cuda-graph", 1_000_000), ("cuda-graph", 10_000_000)],
    ),
}

_baselines: dict = {}


def _environment() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    import transformers

    return {
        "device": torch.cuda.get_device_name() if CUDA else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": datetime.date.today().isoformat(),
        "commit": commit,
    }


@pytest.fixture(scope="module")
def setups():
    cache = {}

    def get(name):
        if name not in cache:
            model_kw, device, dtype, *_ = CASES[name]
            with torch.device(device):
                model = tiny_janus(seed=0, **model_kw)
            cache[name] = model.to(dtype).eval()
        return cache[name]

    return get


def _synthetic_db(model, num_keys: int, device) -> ak.PatchDatabase:
    """Official-layout keys (4 unit-norm 8-d cells) and random token values, fp16 on ``device``."""
    adapter = get_adapter(model)
    g = torch.Generator(device=device).manual_seed(0)
    keys = torch.randn(num_keys, 4, 8, generator=g, device=device, dtype=torch.float16)
    keys = torch.nn.functional.normalize(keys, dim=-1).reshape(num_keys, 32)
    values = torch.randint(0, adapter.codebook_size, (num_keys,), generator=g, device=device)
    meta = DatabaseMeta(layout=ak.KeyLayout(), codebook_size=adapter.codebook_size, embed_dim=adapter.embed_dim,
                        grid=adapter.grid, key_source="codebook", model_fingerprint=adapter.fingerprint(),
                        num_images=0)
    return ak.PatchDatabase(keys, values, meta)


def _time(fn, device, repeats=2) -> float:
    """Median wall time of ``fn()`` with the device synchronised around each call."""
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _inputs(model, batch):
    ids = tiny_prompt_ids(batch, length=12).to(model.device)
    gen = GenerationConfig(do_sample=True, top_k=0, guidance_scale=5.0, bos_token_id=1, pad_token_id=0,
                           generation_kwargs={"boi_token_id": 100})
    return ids, gen


def _synchronised(fn):
    def call():
        out = fn()
        if out.device.type == "cuda":
            torch.cuda.synchronize()
        return out

    return call


def _params():
    for name, (_, device, _, batches, _, runs) in CASES.items():
        marks = [GPU_ONLY] if device == "cuda" else []
        for batch in batches:
            for loop, size in runs:
                kind = f"daid{size // 1000}k" if size else "plain"
                yield pytest.param(name, batch, loop, size, id=f"{name}-b{batch}-{loop}-{kind}", marks=marks)


@pytest.mark.parametrize("name,batch,loop,db_size", list(_params()))
def test_decode(benchmark, setups, name, batch, loop, db_size):
    model = setups(name)
    _, device, _, _, k, _ = CASES[name]
    ids, gen = _inputs(model, batch)
    mask = torch.ones_like(ids)
    if (name, batch, "hf") not in _baselines:  # plain HF generate on the unpatched model, same run
        hf = _synchronised(lambda: model.generate(ids, attention_mask=mask, generation_config=gen, generation_mode="image"))
        _baselines[(name, batch, "hf")] = _time(hf, device)
    db = _synthetic_db(model, db_size, device) if db_size else None
    cfg = ak.DAiDConfig(lam=0.05, tau=0.6, k=k) if db_size else None
    with ak.patched(model, db, cfg) as handle:
        run = _synchronised(lambda: handle.generate_images(ids, attention_mask=mask, generation_config=gen, loop=loop))
        tokens = run()  # correctness outside the timed calls
        assert tokens.shape == (batch, get_adapter(model).grid[0] ** 2) and bool((tokens >= 0).all())
        benchmark.group = f"{name}-b{batch}"
        benchmark.extra_info.update(_environment(), loop=loop, batch=batch, db_keys=db_size or 0, k=k if db_size else 0)
        benchmark.pedantic(run, rounds=2, iterations=1, warmup_rounds=1)
    seconds = benchmark.stats.stats.median
    benchmark.extra_info["ms_per_image"] = 1e3 * seconds / batch
    benchmark.extra_info["ratio_to_hf_generate"] = seconds / _baselines[(name, batch, "hf")]
    if db_size is None:
        _baselines[(name, batch, loop)] = seconds
    elif (name, batch, loop) in _baselines:
        benchmark.extra_info["overhead_vs_same_loop_plain"] = seconds / _baselines[(name, batch, loop)] - 1
