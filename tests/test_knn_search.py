"""The Triton exact search (sample, bound, filter, select and its fallback) against the reference, and
its launch plan against what it launches and allocates.

Under TRITON_INTERPRET=1 on CPU (compiled on CUDA); shapes are small and odd so that every mask and
both bound kinds (every key sampled, S = N; a sample of S < N keys) run.
"""

import dataclasses
import sys

import pytest
import torch

from arrag_kernels.ops import knn_plan, knn_ref
from arrag_kernels.ops.knn_plan import search_shape

from .test_triton_kernels import assert_knn_matches

pytest.importorskip("arrag_kernels.ops._triton", reason="triton is not installed")
from arrag_kernels.ops._triton import knn as triton_knn  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# bf16 only compiled: the interpreter computes bf16 wrongly.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])

CASES = [  # (Q, N, D, k)
    (1, 97, 13, 1),  # every key sampled: the bound is the exact k-th
    (3, 1025, 13, 7),
    (1, 1025, 32, 64),
    (3, 3001, 32, 100),  # a sample of 1024 keys
    (5, 1500, 20, 64),  # D padded to 32
]


def _inputs(Q, N, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    queries = torch.randn(Q, D, generator=g)
    return queries.to(DEVICE), torch.randn(N, D, generator=g).to(dtype).to(DEVICE)


def _tied_inputs(dtype):
    """40 distinct small-integer keys repeated over 1500 rows (exact arithmetic): the bound, the k-th
    distance and every compaction fall inside runs of equal distances, split by id."""
    g = torch.Generator().manual_seed(3)
    base = torch.randint(-1, 2, (40, 32), generator=g).float()
    keys = base[torch.randint(0, 40, (1500,), generator=g)].to(dtype).to(DEVICE)
    return torch.randint(-1, 2, (3, 32), generator=g).float().to(DEVICE), keys


def _recorded(monkeypatch):
    """Records the search's launches (kernel name, grid) and its scratch buffers."""
    launches, scratch = [], {}
    launch, allocate = triton_knn._launch, triton_knn._scratch

    def recording_launch(kernel, grid, *args, **meta):
        launches.append((kernel.__name__ if hasattr(kernel, "__name__") else kernel.fn.__name__, tuple(grid)))
        launch(kernel, grid, *args, **meta)

    def recording_scratch(shape, device):
        scratch.update(allocate(shape, device))
        return scratch

    monkeypatch.setattr(triton_knn, "_launch", recording_launch)
    monkeypatch.setattr(triton_knn, "_scratch", recording_scratch)
    return launches, scratch


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("Q,N,D,k", CASES, ids=[f"q{q}-n{n}-d{d}-k{k}" for q, n, d, k in CASES])
def test_search_matches_reference(Q, N, D, k, dtype):
    queries, keys = _inputs(Q, N, D, dtype, seed=Q * N + k)
    dist, ids = triton_knn.knn_search(queries, keys, k)
    assert_knn_matches(dist, ids, *knn_ref(queries, keys, k), queries, keys.float())


def test_search_two_query_blocks():
    """33 queries: the sample and filter kernels' programs take two blocks of 32 (fp16 keys only: each
    query costs two programs, slow under the interpreter)."""
    queries, keys = _inputs(33, 1100, 16, torch.float16, seed=4)
    assert search_shape(1100, 16, 40, 33, 2).query_blocks == 2
    dist, ids = triton_knn.knn_search(queries, keys, 40)
    assert_knn_matches(dist, ids, *knn_ref(queries, keys, 40), queries, keys.float())


def _too_tight(shape):  # the sample's nearest key: a few survivors, fewer than k
    return dataclasses.replace(shape, rank=1)


def _too_loose(shape):  # the sample's farthest key and the fewest slots the fallback allows: overflow
    return dataclasses.replace(shape, rank=shape.sample, capacity=shape.k + shape.block_n)


@pytest.mark.parametrize("bound", [None, _too_tight, _too_loose], ids=["sampled", "too-tight", "overflow"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ties_by_id_and_fallback(dtype, bound, monkeypatch):
    """Duplicate keys: equal distances come in id order, exactly the reference's, whether the
    survivors are selected or the select's fallback streams every key (forced: the bound is made too
    tight or too loose; the counters show the fallback's condition held)."""
    queries, keys = _tied_inputs(dtype)
    k = 100
    shape = search_shape(keys.shape[0], 32, k, 3, keys.element_size())
    assert shape.sample < keys.shape[0]
    _, scratch = _recorded(monkeypatch)
    dist, ids = triton_knn.knn_search(queries, keys, k, bound(shape) if bound else None)
    ref_dist, ref_ids = knn_ref(queries, keys, k)
    assert torch.equal(dist, ref_dist) and torch.equal(ids, ref_ids)
    counts = scratch["counts"][:, 0].cpu()
    if bound is None:
        assert ((counts >= k) & (counts <= shape.capacity)).all()
    elif bound is _too_tight:
        assert (counts < k).all()
    else:
        assert (counts > shape.k + shape.block_n).all()


def test_fallback_on_random_keys(monkeypatch):
    """The forced fallback on distinct distances, fp16 keys, odd sizes: C = k + block_n slots are
    shrunk several times while 3001 keys stream through."""
    queries, keys = _inputs(3, 3001, 13, torch.float16, seed=5)
    shape = _too_loose(search_shape(3001, 13, 64, 3, 2))
    dist, ids = triton_knn.knn_search(queries, keys, 64, shape)
    assert_knn_matches(dist, ids, *knn_ref(queries, keys, 64), queries, keys.float())


def test_plan_pins_launches_and_scratch(monkeypatch):
    """knn_plan's kernels, grids and scratch are exactly what the search launches and allocates."""
    launches, scratch = _recorded(monkeypatch)
    queries, keys = _inputs(3, 3001, 20, torch.float16, seed=1)
    triton_knn.knn_search(queries, keys, 100)
    plan = knn_plan(3001, 20, 100, 3, torch.float16)
    assert plan["launches"] == len(launches) == 4
    assert [(f"_knn_{kn['name']}_kernel", kn["grid"]) for kn in plan["kernels"]] == launches
    assert plan["scratch"] == {name: t.nbytes for name, t in scratch.items()}
    assert plan["scratch_bytes"] == sum(t.nbytes for t in scratch.values())
    assert plan["sample"] == scratch["sample_bits"].shape[1] and plan["capacity"] == scratch["bits"].shape[1]


@pytest.mark.parametrize("n_keys", [10_000_000, 1_000_000])
@pytest.mark.parametrize("batch", [1, 16])
def test_plan_meets_the_targets(n_keys, batch):
    """Issue 22's targets for 32-d fp16 keys, k = 2048: <= 1.25x the keys' bytes read, <= 64 MB of
    scratch, <= 8 launches."""
    plan = knn_plan(n_keys, 32, 2048, batch, "float16")
    assert plan["key_bytes"] == n_keys * 32 * 2
    assert plan["bytes_read"] <= 1.25 * plan["key_bytes"]
    assert plan["scratch_bytes"] <= 64 << 20
    assert plan["launches"] <= 8


def test_plan_bad_input():
    with pytest.raises(ValueError, match="floating torch dtype"):
        knn_plan(100, 8, 4, 1, "int8")
    with pytest.raises(ValueError, match="k <= n_keys"):
        knn_plan(100, 8, 101, 1, torch.float32)


def test_search_reads_nothing_back_to_the_host(monkeypatch):
    """Capture safety as far as the CPU shows: no .item() / bool() / .tolist() / int() / float() on a
    tensor from the library's code during the search (each would be a device-to-host sync on CUDA)."""

    def refuse(name):
        original = getattr(torch.Tensor, name)

        def guarded(self, *args, **kwargs):
            if sys._getframe(1).f_globals.get("__name__", "").startswith("arrag_kernels"):
                raise AssertionError(f"the search called Tensor.{name}")
            return original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, guarded)

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        refuse(name)
    queries, keys = _inputs(3, 1025, 13, torch.float32, seed=2)
    dist, ids = triton_knn.knn_search(queries, keys, 7)
    monkeypatch.undo()
    assert_knn_matches(dist, ids, *knn_ref(queries, keys, 7), queries, keys)


def test_two_billion_keys_are_refused():
    """Ids are int32 in the kernels: from 2^31 keys the Triton search is unavailable (the dispatcher
    falls back to the int64 reference) instead of wrapping ids."""
    keys = torch.zeros(1, 4).expand(triton_knn.MAX_KEYS, 4)  # no memory: a stride-0 view
    assert "limit" in triton_knn._check(torch.zeros(1, 4), keys, 1)
    assert "limit" not in (triton_knn._check(torch.zeros(1, 4), keys[: triton_knn.MAX_KEYS - 1], 1) or "")


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_search_in_cuda_graph():
    """The automatic search at 2^18 keys under torch.library.opcheck and replayed from a CUDA graph:
    no host synchronisation, launches fixed by shapes."""
    queries, keys = _inputs(16, 1 << 18, 32, torch.float16, seed=5)
    k = 256
    torch.library.opcheck(triton_knn.knn_op, (queries, keys, k))
    triton_knn.knn_op(queries, keys, k)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        dist, ids = triton_knn.knn_op(queries, keys, k)
    queries.copy_(torch.randn(16, 32, generator=torch.Generator().manual_seed(6)).to(DEVICE))
    graph.replay()
    assert_knn_matches(dist, ids, *knn_ref(queries, keys, k), queries, keys.float())
