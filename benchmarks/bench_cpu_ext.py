"""CPU benchmarks of the C++ extension against the reference ops and faiss-cpu, in the same run.

    pytest benchmarks/bench_cpu_ext.py --benchmark-only -s

* exact search, 1M x 32 fp32 keys, 16 queries, k = 64: cpp vs reference (``knn_ref``) vs faiss-cpu
  ``IndexFlatL2`` (target: cpp within 1.2x of faiss);
* the DAiD decode step at batch 16 over 1M keys (neighbourhood gather + exact search k = 2048 +
  CFG/softmax/retrieval merge + sample, vocabulary 16384): cpp vs reference (target: >= 3x).

Correctness is checked outside the timed calls; the ratios (baseline time / cpp time, from the
minimum of each provider's rounds) are printed at the end and stored in the cpp rows' ``extra_info``.
"""

from __future__ import annotations

import os
import platform

import pytest
import torch

from arrag_kernels import _ext
from arrag_kernels.config import KeyLayout
from arrag_kernels.ops import daid_sample, knn, knn_ref, neighbor_keys, use_backend

pytestmark = pytest.mark.skipif(not _ext.HAS_EXT, reason=f"C++ extension unavailable: {_ext.EXT_ERROR}")

NUM_KEYS, DIM = 1_000_000, 32
SEARCH_QUERIES, SEARCH_K = 16, 64
BATCH, DAID_K, VOCAB, GRID, CODE_DIM = 16, 2048, 16384, (24, 24), 8
DAID_KW = dict(guidance_scale=5.0, temperature=1.0, lam=0.05, tau=0.6, dedup="nearest")

_times: dict[tuple[str, str], float] = {}


def _env() -> dict:
    return {
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cpu_isa": _ext._C.cpu_isa(),
        "torch": torch.__version__,
    }


def _run(benchmark, group: str, provider: str, fn, rounds: int):
    benchmark.group = group
    benchmark.extra_info.update(_env(), provider=provider)
    out = benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1 if provider != "reference" else 0)
    _times[(group, provider)] = benchmark.stats.stats.min
    if provider == "cpp":  # baselines are parametrized first, so they have run by now
        for (g, other), t in _times.items():
            if g == group and other != "cpp":
                benchmark.extra_info[f"speedup_vs_{other}"] = t / _times[(group, "cpp")]
    return out


@pytest.fixture(scope="module")
def database():
    g = torch.Generator().manual_seed(0)
    # Official-style keys: 4 unit-norm 8-d blocks per key; values are token ids.
    keys = torch.nn.functional.normalize(torch.randn(NUM_KEYS, DIM // CODE_DIM, CODE_DIM, generator=g), dim=-1).reshape(NUM_KEYS, DIM)
    values = torch.randint(0, VOCAB, (NUM_KEYS,), generator=g)
    codebook = torch.nn.functional.normalize(torch.randn(VOCAB, CODE_DIM, generator=g), dim=-1)
    return keys, values, codebook


@pytest.fixture(scope="module")
def search_expected(database):
    keys = database[0]
    queries = torch.randn(SEARCH_QUERIES, DIM, generator=torch.Generator().manual_seed(1))
    return queries, knn_ref(queries, keys, SEARCH_K)


def _check_search(dist, ids, expected):
    ref_d, ref_i = expected
    torch.testing.assert_close(torch.as_tensor(dist), ref_d, atol=1e-4, rtol=1e-5)
    assert (torch.as_tensor(ids).long() == ref_i).float().mean() > 0.99


@pytest.mark.parametrize("provider", ["reference", "faiss", "cpp"])
def test_exact_search(benchmark, provider, database, search_expected):
    keys = database[0]
    queries, expected = search_expected
    group = f"exact-search-{NUM_KEYS // 10**6}Mx{DIM}-q{SEARCH_QUERIES}-k{SEARCH_K}"
    if provider == "faiss":
        faiss = pytest.importorskip("faiss")
        index = faiss.IndexFlatL2(DIM)
        index.add(keys.numpy())
        benchmark.extra_info["faiss"] = faiss.__version__
        dist, ids = _run(benchmark, group, provider, lambda: index.search(queries.numpy(), SEARCH_K), rounds=5)
    else:
        with use_backend(provider):
            dist, ids = _run(benchmark, group, provider, lambda: knn(queries, keys, SEARCH_K), rounds=2 if provider == "reference" else 10)
    _check_search(dist, ids, expected)


def _daid_step(tokens, step, codebook, keys, values, logits, uniforms):
    """One DAiD decode step: gather queries, exact search, merge + sample (the ops as the loop calls them)."""
    positions = torch.full((tokens.shape[0],), step, dtype=torch.long)
    queries, active = neighbor_keys(tokens, codebook, positions, GRID, KeyLayout())
    dist, ids = knn(queries, keys, DAID_K)
    return daid_sample(logits, dist, values[ids], active, uniforms, **DAID_KW)


@pytest.fixture(scope="module")
def daid_inputs(database):
    g = torch.Generator().manual_seed(2)
    step = 5 * GRID[1] + 7
    tokens = torch.randint(0, VOCAB, (BATCH, GRID[0] * GRID[1]), generator=g)
    tokens[:, step:] = -1  # not generated yet
    logits = torch.randn(2 * BATCH, VOCAB, generator=g) * 3
    uniforms = torch.rand(BATCH, generator=g)
    keys, values, codebook = database
    args = (tokens, step, codebook, keys, values, logits, uniforms)
    with use_backend("reference"):
        expected = _daid_step(*args)
    return args, expected


@pytest.mark.parametrize("provider", ["reference", "cpp"])
def test_daid_step(benchmark, provider, daid_inputs):
    args, expected = daid_inputs
    group = f"daid-step-b{BATCH}-{NUM_KEYS // 10**6}Mx{DIM}-k{DAID_K}-V{VOCAB}"
    with use_backend(provider):
        out = _run(benchmark, group, provider, lambda: _daid_step(*args), rounds=2 if provider == "reference" else 10)
    assert torch.equal(out, expected), f"{provider}: sampled tokens differ from the reference step"


@pytest.fixture(scope="module", autouse=True)
def report_ratios():
    yield
    lines = []
    for (group, provider), t in sorted(_times.items()):
        if provider == "cpp":
            continue
        cpp = _times.get((group, "cpp"))
        if cpp:
            lines.append(f"{group}: {provider} {t * 1e3:.1f} ms / cpp {cpp * 1e3:.1f} ms = {t / cpp:.2f}x")
    if lines:
        print("\nspeed-up of the C++ kernels (min over rounds, same run):\n  " + "\n  ".join(lines))
