"""IVF-PQ search latency per decode step vs nprobe and database size, build throughput.

    pytest benchmarks/bench_ivfpq.py --benchmark-only -s
    ARRAG_BENCH_IVFPQ_SIZES=100000 pytest benchmarks/bench_ivfpq.py --benchmark-only   # smaller run

One decode step searches the Janus-Pro-1B batch-16 shape of ``shapes.py`` (16 queries, one per
image, K = 2048 neighbours: DAiD's K, 32-d official keys). The environment (GPU, versions, commit)
is recorded by ``conftest.py``.

* CPU (synthetic official-style keys: 4 unit-norm 8-d cells around shared centres; 100k keys, and
  1M with ``ARRAG_BENCH_IVFPQ_SIZES=100000,1000000``):
  a FAISS OPQ + IVF-PQ index (M = 8, 8 bits) is trained and filled once per size; build throughput
  (keys/s for train + add, and add alone) goes to ``extra_info``. Rows: ``exact``
  (:func:`arrag_kernels.ops.knn`, auto backend) and ``faiss`` (faiss-cpu IVF-PQ, what CPU searches
  run), with the ``torch`` reference scan interleaved up to 200k keys. recall@K against the
  exact neighbours is recorded next to each latency (computed outside the timed call).
  Skipped without faiss (the GPU machine has none).
* GPU only (skipped without CUDA): ``triton`` (sample bound, one filter, radix select:
  ``ak.ops.ivfpq_plan``) and ``torch`` device searches with synthetic IVF-PQ arrays (random
  codebooks and codes, balanced lists): 1M and 10M entries with nlist = 4 sqrt N, and the official
  database's layout, 800 lists, at 100M entries (the issue-22 target size) and 506M (where one
  distance per candidate slot would take 1.3 GB at nprobe 32). Latency depends on the shapes only,
  so no FAISS training is needed. Next to each latency: the candidate buffer the provider allocates
  (``candidate_buffer_bytes``: the plan's scratch for triton), what one fp32 distance per candidate
  slot would take (``dense_buffer_bytes``) and the measured peak of extra GPU memory
  (``peak_extra_bytes``).
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch

import timing
from arrag_kernels.ops import ivfpq_plan, knn, knn_ref, use_backend
from arrag_kernels.ops.ivfpq import ivfpq_search
from arrag_kernels.retrieval.faiss_index import ivfpq_arrays, set_nprobe
from arrag_kernels.retrieval.ivfpq_build import train_ivfpq
from arrag_kernels.retrieval.search import DeviceIVFPQSearch
from shapes import BY_NAME

SHAPE = BY_NAME["janus1b-b16-db1M"]
BATCH, K, DIM, M = SHAPE.batch, SHAPE.k, SHAPE.key_dim, 8
# 1M keys (a FAISS training of minutes on 2 cores) on request: ARRAG_BENCH_IVFPQ_SIZES=100000,1000000
CPU_SIZES = [int(s) for s in os.environ.get("ARRAG_BENCH_IVFPQ_SIZES", "100000").split(",")]
# (entries, nlist): 4 sqrt(N) lists, and the official layout (800 lists) at 100M and 506M entries.
GPU_CASES = [(1_000_000, 4000), (10_000_000, 12649), (100_000_000, 800), (506_000_000, 800)]
NPROBES = [1, 8, 32, 128]
HAS_CUDA = torch.cuda.is_available()


def synthetic_keys(n: int, seed: int) -> np.ndarray:
    """(n, DIM) float32: 4 unit-norm 8-d cells drawn around 64 shared cell centres (official key shape)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((64, 8)).astype(np.float32)
    out = np.empty((n, DIM), dtype=np.float32)
    for lo in range(0, n, 1 << 18):
        hi = min(n, lo + (1 << 18))
        cells = centres[rng.integers(0, 64, (hi - lo, 4))] + 0.35 * rng.standard_normal((hi - lo, 4, 8), dtype=np.float32)
        cells /= np.linalg.norm(cells, axis=-1, keepdims=True)
        out[lo:hi] = cells.reshape(hi - lo, DIM)
    return out


_cpu_cache: dict[int, dict] = {}


def cpu_case(n: int) -> dict:
    """Keys, queries, exact neighbours and a trained + filled FAISS index for ``n`` keys (built once)."""
    if n not in _cpu_cache:
        faiss = pytest.importorskip("faiss", reason="CPU cases train a FAISS index: pip install faiss-cpu")

        keys = synthetic_keys(n, seed=0)
        queries = torch.from_numpy(synthetic_keys(BATCH, seed=1))
        nlist = 256 if n <= 200_000 else 1024
        chunk = 1 << 18
        chunks = [(lo, min(n, lo + chunk)) for lo in range(0, n, chunk)]
        t0 = time.perf_counter()
        index = train_ivfpq(lambda i: keys[chunks[i][0]:chunks[i][1]], [hi - lo for lo, hi in chunks],
                            nlist=nlist, m=M, nbits=8, opq=True, train_size=40 * nlist)
        t1 = time.perf_counter()
        for lo, hi in chunks:
            index.add(keys[lo:hi])
        t2 = time.perf_counter()
        exact = knn_ref(queries, torch.from_numpy(keys), K)[1]
        _cpu_cache[n] = {
            "keys": torch.from_numpy(keys), "queries": queries, "exact": exact, "index": index, "nlist": nlist,
            "build": {"train_s": t1 - t0, "add_s": t2 - t1, "build_keys_per_s": n / (t2 - t0),
                      "add_keys_per_s": n / (t2 - t1), "faiss_threads": faiss.omp_get_max_threads()},
            "arrays": ivfpq_arrays(index),
        }
    return _cpu_cache[n]


def recall(ids: torch.Tensor, exact: torch.Tensor) -> float:
    return sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(ids, exact)) / exact.numel()


def _run(benchmark, group, provider, fn, baselines=None, **extra):
    benchmark.group = group
    benchmark.extra_info.update(provider=provider, shape=SHAPE.name, batch=BATCH, k=K,
                                threads=torch.get_num_threads(), **extra)
    return timing.run(benchmark, fn, baselines)


@pytest.mark.parametrize("n", CPU_SIZES, ids=lambda n: f"N{n // 1000}k")
def test_cpu_exact(benchmark, n):
    case = cpu_case(n)
    dist, ids = _run(benchmark, f"ivfpq-cpu-N{n}", "exact", lambda: knn(case["queries"], case["keys"], K))
    assert recall(ids, case["exact"]) > 0.99


@pytest.mark.parametrize("nprobe", NPROBES, ids=lambda p: f"nprobe{p}")
@pytest.mark.parametrize("n", CPU_SIZES, ids=lambda n: f"N{n // 1000}k")
def test_cpu_ivfpq(benchmark, n, nprobe):
    """faiss-cpu (what every CPU IVF-PQ search runs); up to 200k keys the PyTorch scan (the tests'
    oracle) runs interleaved with it (``ratio_to_torch_reference``)."""
    case = cpu_case(n)
    index = case["index"]
    set_nprobe(index, nprobe)
    q = case["queries"].numpy()

    def faiss_search():
        d, i = index.search(q, K)
        return torch.from_numpy(d), torch.from_numpy(i)

    baselines = None
    if n <= 200_000:
        search = DeviceIVFPQSearch(case["arrays"], nprobe, "cpu")

        def torch_search():
            with use_backend("reference"):
                return search.search(case["queries"], K)

        baselines = {"torch_reference": torch_search}
    dist, ids = _run(benchmark, f"ivfpq-cpu-N{n}", "faiss", faiss_search, baselines, nprobe=nprobe,
                     nlist=case["nlist"], **case["build"])
    benchmark.extra_info["recall_at_k"] = recall(ids, case["exact"])
    assert dist.shape == (BATCH, K) and ids.dtype == torch.int64


_gpu_cache: dict[tuple[int, int], dict] = {}


def gpu_arrays(n: int, nlist: int, device="cuda") -> dict:
    """Synthetic IVF-PQ arrays on the GPU: nlist balanced lists, random codebooks and codes."""
    if (n, nlist) in _gpu_cache:
        return _gpu_cache[n, nlist]
    _gpu_cache.clear()  # one size at a time on the device
    g = torch.Generator(device=device).manual_seed(0)
    centroids = torch.randn(nlist, DIM, device=device, generator=g)
    codebooks = torch.randn(M, 256, DIM // M, device=device, generator=g) * 0.1
    term1 = (codebooks * codebooks).sum(-1) + 2.0 * torch.einsum("lmd,mjd->lmj", centroids.view(nlist, M, -1), codebooks)
    codes = torch.randint(0, 256, (n, M), device=device, generator=g, dtype=torch.uint8)
    offsets = torch.linspace(0, n, nlist + 1, device=device, dtype=torch.float64).long()
    _gpu_cache[n, nlist] = {"rotation": torch.linalg.qr(torch.randn(DIM, DIM, device=device, generator=g))[0],
                            "centroids": centroids, "codebooks": codebooks, "term1": term1.contiguous(),
                            "codes": codes, "ids": torch.arange(n, device=device), "offsets": offsets}
    return _gpu_cache[n, nlist]


@pytest.mark.skipif(not HAS_CUDA, reason="GPU-only sizes (1M/10M/100M/506M device IVF-PQ search) need CUDA")
@pytest.mark.parametrize("nprobe", NPROBES, ids=lambda p: f"nprobe{p}")
@pytest.mark.parametrize("provider", ["triton", "torch"])
@pytest.mark.parametrize("n,nlist", GPU_CASES, ids=lambda v: f"N{v // 1_000_000}M" if v >= 1_000_000 else f"nlist{v}")
def test_gpu_ivfpq(benchmark, n, nlist, provider, nprobe):
    a = gpu_arrays(n, nlist)
    sizes = (a["offsets"][1:] - a["offsets"][:-1]).sort(descending=True).values
    max_candidates = int(sizes[:nprobe].sum())
    gather_bytes = BATCH * max_candidates * M * 8  # the torch reference's (Q, C, M) int64 code gather
    if provider == "torch" and gather_bytes > 16 << 30:
        pytest.skip(f"the torch reference would gather {gather_bytes / 2**30:.0f} GiB")
    queries = torch.randn(BATCH, DIM, device="cuda")
    names = ("rotation", "centroids", "codebooks", "term1", "codes", "ids", "offsets")
    backend = "triton" if provider == "triton" else "reference"

    def fn():
        with use_backend(backend):
            out = ivfpq_search(queries, *(a[k] for k in names), nprobe, K, max_candidates)
        torch.cuda.synchronize()
        return out

    fn()  # compile outside the peak-memory measurement
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    peak = torch.cuda.max_memory_allocated() - base
    scratch = (ivfpq_plan(BATCH, K, max_candidates, nprobe)["scratch_bytes"] if provider == "triton"
               else BATCH * max_candidates * 8)
    dist, ids = _run(benchmark, f"ivfpq-gpu-N{n}", provider, fn, nprobe=nprobe,
                     nlist=nlist, max_candidates=max_candidates, peak_extra_bytes=peak,
                     dense_buffer_bytes=BATCH * max_candidates * 4, candidate_buffer_bytes=scratch)
    if provider == "triton" and gather_bytes <= 16 << 30:
        with use_backend("reference"):
            ref_dist, _ = ivfpq_search(queries, *(a[k] for k in names), nprobe, K, max_candidates)
        torch.testing.assert_close(dist, ref_dist, atol=1e-3, rtol=1e-4)
