"""CPU benchmarks of the C++ extension against the reference ops and faiss-cpu, interleaved.

    pytest benchmarks/bench_cpu_ext.py --benchmark-only -s

* exact search over 1M x 32 keys (fp32, and fp16 at k = 2048), 1 / 4 / 16 queries, k = 64 / 2048:
  the row is the C++ search; faiss-cpu ``IndexFlatL2`` (fp32 keys) and the reference (``knn_ref``)
  run interleaved with it (``ratio_to_faiss`` target: <= 1.0);
* the DAiD decode step at batch 1 / 4 / 16 over 1M keys (neighbourhood gather + exact search
  k = 2048 + CFG/softmax/retrieval merge + sample, vocabulary 16384): the C++ ops, the reference
  ops interleaved.

Correctness is checked outside the timed calls; every row records medians and spread (see
``timing.py``), and the ratios are printed at the end.
"""

from __future__ import annotations

import os

import pytest
import torch

import timing
from arrag_kernels import _ext
from arrag_kernels.config import KeyLayout
from arrag_kernels.ops import daid_sample, knn, knn_ref, neighbor_keys, use_backend

pytestmark = pytest.mark.skipif(not _ext.HAS_EXT, reason=f"C++ extension unavailable: {_ext.EXT_ERROR}")

NUM_KEYS, DIM = 1_000_000, 32
SEARCH_CASES = [(dtype, q, k) for dtype in ("float32",) for q in (1, 4, 16) for k in (64, 2048)]
SEARCH_CASES += [("float16", q, 2048) for q in (1, 4, 16)]
DAID_K, VOCAB, GRID, CODE_DIM = 2048, 16384, (24, 24), 8
DAID_KW = dict(guidance_scale=5.0, temperature=1.0, lam=0.05, tau=0.6, dedup="nearest")

_ratios: list[str] = []


def _env(benchmark, **case):
    benchmark.extra_info.update(threads=torch.get_num_threads(), omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
                                cpu_isa=_ext._C.cpu_isa(), **case)


def _report(benchmark, name: str):
    info = benchmark.extra_info
    if "median_s" in info:
        parts = [f"{b} {info[f'{b}_median_s'] * 1e3:.1f} ms (cpp/{b} = {info[f'ratio_to_{b}']:.2f})"
                 for b in ("faiss", "reference") if f"{b}_median_s" in info]
        _ratios.append(f"{name}: cpp {info['median_s'] * 1e3:.1f} ms; " + "; ".join(parts))


@pytest.fixture(scope="module")
def database():
    g = torch.Generator().manual_seed(0)
    # Official-style keys: 4 unit-norm 8-d blocks per key; values are token ids.
    keys = torch.nn.functional.normalize(torch.randn(NUM_KEYS, DIM // CODE_DIM, CODE_DIM, generator=g), dim=-1).reshape(NUM_KEYS, DIM)
    values = torch.randint(0, VOCAB, (NUM_KEYS,), generator=g)
    codebook = torch.nn.functional.normalize(torch.randn(VOCAB, CODE_DIM, generator=g), dim=-1)
    return {"float32": keys, "float16": keys.half()}, values, codebook


@pytest.fixture(scope="module")
def faiss_index(database):
    faiss = pytest.importorskip("faiss")
    index = faiss.IndexFlatL2(DIM)
    index.add(database[0]["float32"].numpy())
    return index


@pytest.mark.parametrize("dtype,queries,k", SEARCH_CASES, ids=[f"{d}-q{q}-k{k}" for d, q, k in SEARCH_CASES])
def test_exact_search(benchmark, database, faiss_index, dtype, queries, k):
    keys = database[0][dtype]
    q = torch.randn(queries, DIM, generator=torch.Generator().manual_seed(queries))
    benchmark.group = f"exact-search-{NUM_KEYS // 10**6}Mx{DIM}"
    _env(benchmark, provider="cpp", key_dtype=dtype, queries=queries, k=k, faiss_keys="float32")

    def cpp():
        with use_backend("cpp"):
            return knn(q, keys, k)

    qn = q.numpy()
    baselines = {"faiss": lambda: faiss_index.search(qn, k)}
    if dtype == "float32":  # (the fp16 reference is a cast plus the same search)
        baselines["reference"] = lambda: knn_ref(q, keys, k)
    dist, ids = timing.run(benchmark, cpp, baselines)
    ref_d, ref_i = knn_ref(q, keys, k)
    torch.testing.assert_close(dist, ref_d, atol=1e-4, rtol=1e-5)
    assert (ids == ref_i).float().mean() > 0.99
    _report(benchmark, f"{dtype} {queries} queries, k = {k}")


def _daid_step(tokens, step, codebook, keys, values, logits, uniforms):
    """One DAiD decode step: gather queries, exact search, merge + sample (the ops as the loop calls them)."""
    positions = torch.full((tokens.shape[0],), step, dtype=torch.long)
    queries, active = neighbor_keys(tokens, codebook, positions, GRID, KeyLayout())
    dist, ids = knn(queries, keys, DAID_K)
    return daid_sample(logits, dist, values[ids], active, uniforms, **DAID_KW)


@pytest.mark.parametrize("batch", [1, 4, 16])
def test_daid_step(benchmark, database, batch):
    keys, values, codebook = database
    g = torch.Generator().manual_seed(2)
    step = 5 * GRID[1] + 7
    tokens = torch.randint(0, VOCAB, (batch, GRID[0] * GRID[1]), generator=g)
    tokens[:, step:] = -1  # not generated yet
    logits = torch.randn(2 * batch, VOCAB, generator=g) * 3
    args = (tokens, step, codebook, keys["float32"], values, logits, torch.rand(batch, generator=g))

    def with_backend(name):
        def call():
            with use_backend(name):
                return _daid_step(*args)

        return call

    benchmark.group = f"daid-step-{NUM_KEYS // 10**6}Mx{DIM}-k{DAID_K}-V{VOCAB}"
    _env(benchmark, provider="cpp", batch=batch)
    out = timing.run(benchmark, with_backend("cpp"), {"reference": with_backend("reference")})
    assert torch.equal(out, with_backend("reference")()), "cpp: sampled tokens differ from the reference step"
    _report(benchmark, f"DAiD step batch {batch}")


@pytest.fixture(scope="module", autouse=True)
def report_ratios():
    yield
    if _ratios:
        print("\nC++ kernels vs baselines (medians of interleaved rounds, same run):\n  " + "\n  ".join(_ratios))
