"""Exact k-NN (``knn``) on every backend against the one top-k oracle (tests/oracles.py), the
reference against faiss, each backend's tie order and internals (the Triton search's kernels, forced
fallback and launch plan, the C++ blocked layout), the CUDA k-select, dispatch and torch.library
registration.

Shapes are small and odd on purpose: under TRITON_INTERPRET=1 the cost follows the number of
programs and ops, and odd sizes exercise every mask.
"""

import dataclasses
import importlib

import numpy as np
import pytest
import torch

import arrag_kernels as ak
from arrag_kernels import _ext
from arrag_kernels.ops import BackendUnavailable, knn, knn_plan, knn_ref, use_backend
from arrag_kernels.ops.knn import knn_dispatcher

from .oracles import assert_topk, candidate_distances, exact_distances, knn_atol, tie_order
from .utils import (CUDA, OPCHECK_KWARGS, TOLERANCES, TRITON_DTYPES, UNAVAILABLE, assert_close, backend_device,
                    assert_plan_pins_run, forbid_host_reads, op_backends, record_launches)

needs_triton = pytest.mark.skipif(UNAVAILABLE["triton"] is not None, reason=UNAVAILABLE["triton"] or "")
needs_ext = pytest.mark.skipif(not _ext.HAS_EXT, reason=f"C++ extension unavailable: {_ext.EXT_ERROR}")
# key dtypes per backend: the C++ kernel refuses bfloat16 (test_knn_dispatch_reasons)
KEY_DTYPES = {"triton": TRITON_DTYPES, "cpp": [torch.float32, torch.float16],
              "*": [torch.float32, torch.float16, torch.bfloat16]}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def assert_knn(dist, ids, queries, keys, what="knn"):
    """The oracle with exact search's tolerance: the expanded form's norm-scaled error, at least fp32's."""
    tol = TOLERANCES[torch.float32]
    assert_topk(dist, ids, exact_distances(queries, keys), atol=max(tol.atol, knn_atol(queries, keys)), rtol=tol.rtol,
                what=what)


def _skip_too_slow(backend, case):
    if backend == "triton" and not CUDA and case in INTERPRETER_TOO_SLOW:
        pytest.skip("too slow for the Triton interpreter (> 3 s); run compiled on CUDA")


KNN_CASES = [  # (Q, N, D, k)
    (1, 97, 32, 7),
    (5, 97, 96, 97),  # k = N
    (3, 97, 32, 64),
    (70, 63, 12, 1),  # many queries, fewer keys than one block
    (3, 1025, 96, 1),
    (7, 1025, 32, 63),
    (3, 3001, 32, 64),
    (1, 3001, 32, 2048),
    (16, 4099, 32, 64),
    (3, 5000, 8, 2048),
    (2, 9001, 32, 16),  # several stage-1 blocks and a merge stage (Triton)
]
# (Q, N, D, k) taking 4 to 30 s each under TRITON_INTERPRET=1
INTERPRETER_TOO_SLOW = {(16, 4099, 32, 64), (3, 5000, 8, 2048), (9, 3001, 4, 700)}


def _knn_inputs(Q, N, D, k, dtype, device="cpu"):
    """Random fp32 queries (Q, D) and keys (N, D) of ``dtype``, seeded by the shape."""
    g = _gen(Q * N + k)
    queries = torch.randn(Q, D, generator=g).to(device)
    return queries, torch.randn(N, D, generator=g).to(dtype).to(device)


def _values(N, dtype, device="cpu"):
    """Token ids of N database entries: random, so a gather at the wrong id shows."""
    return torch.randint(0, 1 << 14, (N,), generator=_gen(N), dtype=dtype).to(device)


@pytest.mark.parametrize("Q,N,D,k", KNN_CASES, ids=[f"q{q}-n{n}-d{d}-k{k}" for q, n, d, k in KNN_CASES])
@pytest.mark.parametrize("backend,dtype", op_backends(knn_dispatcher, dtypes=KEY_DTYPES))
def test_knn(backend, dtype, Q, N, D, k):
    _skip_too_slow(backend, (Q, N, D, k))
    queries, keys = _knn_inputs(Q, N, D, k, dtype, backend_device(backend))
    with use_backend(backend):
        dist, ids = knn(queries, keys, k)
    assert dist.shape == ids.shape == (Q, k) and dist.device == queries.device
    assert_knn(dist, ids, queries, keys, what=f"{backend} knn")


TIE_CASES = {  # name: (Q, N, D, values, k); small integer coordinates: exact arithmetic, many ties
    "n1500-d32-k100": (3, 1500, 32, (-1, 2), 100),
    "n3001-d4-k700": (9, 3001, 4, (0, 3), 700),
}


@pytest.mark.parametrize("case", TIE_CASES.values(), ids=TIE_CASES.keys())
@pytest.mark.parametrize("backend,dtype", op_backends(knn_dispatcher, dtypes={"*": [torch.float32, torch.float16]}))
def test_knn_ties_ordered_by_id(backend, dtype, case):
    """Every backend orders equal distances by id: results equal the tie-ordered truth exactly."""
    Q, N, D, (lo, hi), k = case
    _skip_too_slow(backend, (Q, N, D, k))
    g = _gen(3)
    base = torch.randint(lo, hi, (40, D), generator=g).float()
    keys = base[torch.randint(0, 40, (N,), generator=g)]
    queries = torch.randint(lo, hi, (Q, D), generator=g).float()
    device = backend_device(backend)
    with use_backend(backend):
        dist, ids = knn(queries.to(device), keys.to(dtype).to(device), k)
    truth = exact_distances(queries, keys)
    assert_topk(dist, ids, truth, atol=0, rtol=0, what=f"{backend} ties")
    want_dist, want_ids = tie_order(truth, k)
    assert torch.equal(dist.cpu(), want_dist) and torch.equal(ids.cpu(), want_ids), f"{backend}: tie order differs"


@pytest.mark.parametrize("n,dim,k", [(97, 32, 7), (1025, 32, 64), (3001, 96, 1), (63, 12, 63)])
@pytest.mark.parametrize("backend", op_backends(knn_dispatcher))
def test_knn_matches_brute_force_order(backend, n, dim, k):
    """Random fp32 data (no near-ties at these sizes): exactly the (distance, id) order of a float64
    brute force."""
    g = _gen(n)
    keys = torch.randn(n, dim, generator=g)
    q = torch.randn(5, dim, generator=g)
    device = backend_device(backend)
    with use_backend(backend):
        d, i = knn(q.to(device), keys.to(device), k)
    d, i = d.cpu(), i.cpu()
    truth = exact_distances(q, keys)
    want_d, want_i = tie_order(truth, k)
    assert_close(d, want_d, torch.float32, "distances")
    assert torch.equal(i, want_i)
    assert_knn(d, i, q, keys, what=backend)


# ---------------------------------------------------------------------------------------------
# the reference


def test_knn_ref_spans_blocks_and_ties_by_id(monkeypatch):
    # Duplicated keys in different reference blocks: equal distances must come back in id order.
    mod = importlib.import_module("arrag_kernels.ops.knn")  # the package attribute `knn` is the function
    monkeypatch.setattr(mod, "_REF_BLOCK", 16)
    monkeypatch.setattr(mod, "_REF_CANDIDATES", 32)  # 2 queries: blocks of 16 keys
    g = _gen(0)
    base = torch.randn(10, 8, generator=g)
    keys = base.repeat(7, 1)  # ids i, i+10, i+20, ... share a key
    q = base[[3, 8]] + 0.01
    d, i = knn_ref(q, keys, 21)
    assert i[0, :7].tolist() == [3 + 10 * j for j in range(7)]
    assert i[1, :7].tolist() == [8 + 10 * j for j in range(7)]
    assert torch.all(d[:, 1:] >= d[:, :-1])
    assert_knn(d, i, q, keys, what="blocked reference")


def test_knn_ref_key_norms_follow_in_place_changes():
    """knn_ref keeps each keys tensor's norms; an in-place change must not leave them stale."""
    g = _gen(4)
    keys, q = torch.randn(300, 8, generator=g), torch.randn(2, 8, generator=g)
    knn_ref(q, keys, 5)
    keys.mul_(3.0).add_(1.0)
    d, i = knn_ref(q, keys, 5)
    assert_knn(d, i, q, keys, what="after the in-place change")
    assert torch.equal(i, tie_order(exact_distances(q, keys), 5)[1])


def test_knn_low_precision_keys_accumulate_in_fp32():
    g = _gen(1)
    keys = torch.randn(501, 32, generator=g)
    q = torch.randn(3, 32, generator=g)
    d16, i16 = knn(q.half(), keys.half(), 10)
    d32, _ = knn(q.half().float(), keys.half().float(), 10)
    assert d16.dtype == torch.float32
    assert_close(d16, d32, torch.float32, "fp16 keys vs the same values in fp32")
    assert_knn(d16, i16, q.half(), keys.half(), what="fp16 inputs")


def test_knn_agrees_with_faiss():
    faiss = pytest.importorskip("faiss")
    g = _gen(2)
    keys = torch.randn(2000, 32, generator=g)
    q = torch.randn(4, 32, generator=g)
    index = faiss.IndexFlatL2(32)
    index.add(keys.numpy())
    fd, fi = (torch.from_numpy(a) for a in index.search(q.numpy(), 50))
    d, i = knn(q, keys, 50)
    assert_knn(fd, fi, q, keys, what="faiss IndexFlatL2")
    assert_close(d, fd, torch.float16, "distances vs faiss")  # different summation order
    assert torch.equal(i, fi)


@pytest.mark.parametrize("values_dtype", [torch.int32, torch.int64, torch.int16], ids=str)
@pytest.mark.parametrize("backend", op_backends(knn_dispatcher))
def test_knn_gathers_values(backend, values_dtype):
    """``values=``: every backend returns values[ids] as int64 beside the same distances and ids (the
    Triton kernel gathers int32 / int64 values; it refuses others, which "auto" then sends elsewhere)."""
    queries, keys = _knn_inputs(3, 1025, 13, 7, torch.float32, backend_device(backend))
    values = _values(1025, values_dtype, keys.device)
    with use_backend(backend):
        if backend == "triton" and values_dtype == torch.int16:
            with pytest.raises(BackendUnavailable, match="values dtype torch.int16"):
                knn(queries, keys, 7, values)
            return
        dist, ids, tokens = knn(queries, keys, 7, values)
        want = knn(queries, keys, 7)
    assert torch.equal(dist, want[0]) and torch.equal(ids, want[1])
    assert tokens.dtype == torch.int64 and torch.equal(tokens, values[ids].long())


def test_knn_bad_inputs():
    keys = torch.randn(10, 4)
    with pytest.raises(ValueError, match="k must be in"):
        knn(torch.randn(1, 4), keys, 11)
    with pytest.raises(ValueError, match="k must be in"):
        knn(torch.randn(1, 4), keys, 0)
    with pytest.raises(ValueError, match="does not match key dimension"):
        knn(torch.randn(1, 5), keys, 3)
    with pytest.raises(TypeError, match="floating point"):
        knn(torch.ones(1, 4, dtype=torch.long), keys, 3)
    for bad in (torch.zeros(10), torch.zeros(10, 1, dtype=torch.long), torch.zeros(10, dtype=torch.bool), [0] * 10):
        with pytest.raises(TypeError, match="values must be a 1-D integer tensor"):
            knn(torch.randn(1, 4), keys, 3, bad)
    with pytest.raises(ValueError, match="one entry per key"):
        knn(torch.randn(1, 4), keys, 3, torch.arange(9))
    with pytest.raises(ValueError, match="values on meta"):
        knn(torch.randn(1, 4), keys, 3, torch.arange(10, device="meta"))


# ---------------------------------------------------------------------------------------------
# Triton: the exact search's kernels (sample, bound, filter, select and its fallback), its launch plan


def _triton():
    from arrag_kernels.ops._triton import knn as triton_knn

    return triton_knn


SEARCH_CASES = [  # (Q, N, D, k)
    (1, 97, 13, 1),  # every key sampled: the bound is the exact k-th
    (3, 1025, 13, 7),
    (1, 1025, 32, 64),
    (3, 3001, 32, 100),  # a sample of 1024 keys
    (2, 4001, 32, 30),
    (5, 1500, 20, 64),  # D padded to 32
]


@needs_triton
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
@pytest.mark.parametrize("Q,N,D,k", SEARCH_CASES, ids=[f"q{q}-n{n}-d{d}-k{k}" for q, n, d, k in SEARCH_CASES])
def test_triton_knn_search(Q, N, D, k, dtype):
    """The four kernels against the oracle, with the bound from every key (S = N) or from a sample, and
    the token values gathered in the select (int32 values with fp32 keys, int64 otherwise)."""
    queries, keys = _knn_inputs(Q, N, D, k, dtype, backend_device("triton"))
    values = _values(N, torch.int32 if dtype == torch.float32 else torch.int64, keys.device)
    dist, ids, tokens = _triton().knn_search(queries, keys, k, values)
    assert_knn(dist, ids, queries, keys, what="triton search")
    assert tokens.dtype == torch.int64 and torch.equal(tokens, values[ids].long()), "gathered values"


@needs_triton
def test_triton_knn_two_query_blocks():
    """33 queries: the sample and filter programs take two blocks of 32 (fp16 keys only: every query
    costs two programs, slow under the interpreter)."""
    triton_knn = _triton()
    queries, keys = _knn_inputs(33, 1100, 16, 40, torch.float16, backend_device("triton"))
    assert triton_knn.search_shape(1100, 16, 40, 33, 2).query_blocks == 2
    dist, ids, _ = triton_knn.knn_search(queries, keys, 40)
    assert_knn(dist, ids, queries, keys, what="two query blocks")


def _recorded(monkeypatch):
    """Records the search's launches (kernel name, grid) and its scratch buffers."""
    triton_knn = _triton()
    return record_launches(monkeypatch, triton_knn)


def _too_tight(shape):  # the sample's nearest key: a few survivors, fewer than k
    return dataclasses.replace(shape, rank=1)


def _too_loose(shape):  # the sample's farthest key, and the fewest slots the fallback allows: overflow
    return dataclasses.replace(shape, rank=shape.sample, capacity=shape.k + shape.block_n)


@needs_triton
@pytest.mark.parametrize("bound", [None, _too_tight, _too_loose], ids=["sampled", "too-tight", "overflow"])
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
def test_triton_knn_ties_and_fallback(dtype, bound, monkeypatch):
    """40 distinct keys repeated over 1500 rows (small integers: exact arithmetic): the bound, the k-th
    distance and every compaction fall inside runs of equal distances, split by id; results equal the
    tie-ordered truth exactly, whether the survivors are selected or the select's fallback streams every
    key (forced by a bound made too tight or too loose: the counters show the fallback's condition); the
    token values are gathered after either path."""
    triton_knn = _triton()
    g = _gen(3)
    base = torch.randint(-1, 2, (40, 32), generator=g).float()
    keys = base[torch.randint(0, 40, (1500,), generator=g)]
    queries = torch.randint(-1, 2, (3, 32), generator=g).float()
    device, k = backend_device("triton"), 100
    shape = triton_knn.search_shape(1500, 32, k, 3, torch.empty(0, dtype=dtype).element_size())
    assert shape.sample < 1500
    _, scratch = _recorded(monkeypatch)
    values = _values(1500, torch.int32, device)
    dist, ids, tokens = triton_knn.knn_search(queries.to(device), keys.to(dtype).to(device), k, values,
                                              bound and bound(shape))
    truth = exact_distances(queries, keys)
    assert_topk(dist, ids, truth, atol=0, rtol=0, what="triton ties")
    want_dist, want_ids = tie_order(truth, k)
    assert torch.equal(dist.cpu(), want_dist) and torch.equal(ids.cpu(), want_ids)
    assert torch.equal(tokens.cpu(), values[want_ids].long())
    counts = scratch["counts"][:, 0].cpu()
    if bound is None:
        assert ((counts >= k) & (counts <= shape.capacity)).all()
    elif bound is _too_tight:
        assert (counts < k).all()
    else:
        assert (counts > k + shape.block_n).all()


@needs_triton
def test_triton_knn_fallback_distinct_distances():
    """The forced fallback on random fp16 keys of odd sizes: C = k + block_n slots are shrunk to the
    k smallest several times while 3001 keys stream through."""
    triton_knn = _triton()
    queries, keys = _knn_inputs(3, 3001, 13, 64, torch.float16, backend_device("triton"))
    dist, ids, _ = triton_knn.knn_search(queries, keys, 64, shape=_too_loose(triton_knn.search_shape(3001, 13, 64, 3, 2)))
    assert_knn(dist, ids, queries, keys, what="fallback")


@needs_triton
def test_triton_knn_plan_pins_launches_and_scratch(monkeypatch):
    """knn_plan's kernels, grids and scratch are exactly what the search launches and allocates."""
    launches, scratch = _recorded(monkeypatch)
    queries, keys = _knn_inputs(3, 3001, 20, 100, torch.float16, backend_device("triton"))
    _triton().knn_search(queries, keys, 100, _values(3001, torch.int64, keys.device))  # the gather: no launch, no scratch
    plan = knn_plan(3001, 20, 100, 3, torch.float16, values=torch.int64)
    assert_plan_pins_run(plan, launches, scratch, "_knn_", 4, "sample_bits", "bits")
    plain = knn_plan(3001, 20, 100, 3, torch.float16)
    assert plan["bytes_read"] - plain["bytes_read"] == 3 * 100 * 8  # one int64 value per hit


@pytest.mark.parametrize("n_keys", [10_000_000, 1_000_000])
@pytest.mark.parametrize("batch", [1, 16])
def test_knn_plan_meets_the_targets(n_keys, batch):
    """Issue 22's targets for 32-d fp16 keys, k = 2048: <= 1.25x the keys' bytes read, <= 64 MB of
    scratch, <= 8 launches."""
    plan = knn_plan(n_keys, 32, 2048, batch, "float16", values="int64")  # as db.retrieve searches
    assert plan["key_bytes"] == n_keys * 32 * 2
    assert plan["bytes_read"] <= 1.25 * plan["key_bytes"]
    assert plan["scratch_bytes"] <= 64 << 20
    assert plan["launches"] <= 8


def test_knn_plan_bad_input():
    with pytest.raises(ValueError, match="floating torch dtype"):
        knn_plan(100, 8, 4, 1, "int8")
    with pytest.raises(ValueError, match="k <= n_keys"):
        knn_plan(100, 8, 101, 1, torch.float32)
    with pytest.raises(ValueError, match="the Triton search takes"):
        knn_plan(10_000, 257, 10, 1, torch.float16)
    with pytest.raises(ValueError, match="values must be torch.int32 or torch.int64"):
        knn_plan(100, 8, 4, 1, torch.float16, values="int16")


@needs_triton
def test_triton_knn_reads_nothing_back_to_the_host(monkeypatch):
    """Capture safety as far as the CPU shows: no .item() / .tolist() / bool() / int() / float() on a
    tensor from the library's code during the search (each is a device-to-host sync on CUDA)."""


    queries, keys = _knn_inputs(3, 1025, 13, 7, torch.float32, backend_device("triton"))
    forbid_host_reads(monkeypatch, "the search")
    dist, ids, tokens = _triton().knn_search(queries, keys, 7, _values(1025, torch.int64, keys.device))
    monkeypatch.undo()
    assert tokens.shape == (3, 7)
    assert_knn(dist, ids, queries, keys, what="no host reads")


@needs_triton
def test_triton_knn_no_queries(monkeypatch):
    """No queries: empty results and nothing launched (a grid of 0 programs is an error on CUDA)."""
    launches, _ = _recorded(monkeypatch)
    dist, ids, tokens = _triton().knn_search(torch.zeros(0, 8), torch.randn(50, 8), 3, torch.arange(50))
    assert dist.shape == ids.shape == tokens.shape == (0, 3) and launches == []


@needs_triton
def test_triton_knn_refuses_two_billion_keys():
    """Ids are int32 in the kernels: from 2^31 keys the Triton search is unavailable (auto falls back to
    the int64 reference) instead of wrapping ids."""
    triton_knn = _triton()
    keys = torch.zeros(1, 4).expand(triton_knn.MAX_KEYS, 4)  # a stride-0 view: no memory
    assert "limit" in triton_knn._check(torch.zeros(1, 4), keys, 1)
    assert "limit" not in (triton_knn._check(torch.zeros(1, 4), keys[: triton_knn.MAX_KEYS - 1], 1) or "")


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_triton_knn_cuda_graph():
    """The search at 2^18 keys with its value gather, under torch.library.opcheck and replayed from a
    CUDA graph: no host synchronisation, launches fixed by shapes."""
    triton_knn = _triton()
    g = _gen(5)
    queries = torch.randn(16, 32, generator=g).cuda()
    keys = torch.randn(1 << 18, 32, generator=g).half().cuda()
    values = _values(1 << 18, torch.int32, "cuda")
    k = 256
    torch.library.opcheck(triton_knn.knn_op, (queries, keys, k, values))
    triton_knn.knn_op(queries, keys, k, values)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        dist, ids, tokens = triton_knn.knn_op(queries, keys, k, values)
    queries.copy_(torch.randn(16, 32, generator=g).cuda())
    graph.replay()
    assert_knn(dist, ids, queries, keys, what="CUDA-graph replay")
    assert torch.equal(tokens, values[ids].long())


# ---------------------------------------------------------------------------------------------
# C++: the prepared (blocked) key layout


@needs_ext
@pytest.mark.parametrize("key_dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
def test_cpp_knn_blocked_layout_equals_row_major(key_dtype):
    """The prepared (blocked) layout and the per-call transposition give identical results, ties
    included (integer coordinates), over a partial last block and 1-4 queries (the single-query tile)."""
    g = _gen(11)
    keys = torch.randint(0, 3, (1031, 12), generator=g).to(key_dtype)
    queries = torch.randint(0, 3, (5, 12), generator=g).float()
    blocked, norms = _ext._C.knn_prepare(keys.numpy())
    assert blocked.shape == (1280 * 12,) and norms.shape == (1280,) and blocked.dtype == keys.numpy().dtype
    truth = exact_distances(queries, keys)
    want_d, want_i = tie_order(truth, 300)
    for nq in (1, 4, 5):
        q = queries[:nq].numpy()
        d, i = _ext._C.knn_blocked(q, blocked, norms, 1031, 300)
        rd, ri = _ext._C.knn(q, keys.numpy(), 300)
        assert np.array_equal(d, rd) and np.array_equal(i, ri), f"{nq} queries: blocked != row-major"
        d, i = torch.from_numpy(d), torch.from_numpy(i)
        assert_topk(d, i, truth[:nq], atol=0, rtol=0, what=f"blocked, {nq} queries")
        assert torch.equal(i, want_i[:nq]) and torch.equal(d, want_d[:nq])
    with pytest.raises(ValueError, match="norms.shape"):
        _ext._C.knn_blocked(queries.numpy(), blocked, norms[:256], 1031, 3)


@needs_ext
def test_cpp_knn_prepared_keys_follow_in_place_changes():
    """The blocked layout is cached per keys tensor and rebuilt when the tensor is modified in place."""
    from arrag_kernels.ops import _cpp

    g = _gen(12)
    keys, q = torch.randn(700, 8, generator=g), torch.randn(3, 8, generator=g)
    with use_backend("cpp"):
        first = knn(q, keys, 5)
        assert id(keys) in _cpp._blocked_keys._entries
        keys[first[1][0, 0]] += 100.0  # move query 0's nearest key far away
        d, i = knn(q, keys, 5)
    ref_d, ref_i = knn_ref(q, keys, 5)
    assert torch.equal(i, ref_i) and first[1][0, 0] not in i[0]
    assert_close(d, ref_d, torch.float32, what="distances after the in-place change")
    assert_knn(d, i, q, keys, what="after the in-place change")
    key_id = id(keys)
    del keys
    assert key_id not in _cpp._blocked_keys._entries, "the prepared layout outlived its keys tensor"


# ---------------------------------------------------------------------------------------------
# the CUDA k-select (a selection primitive of the extension, not a knn backend)


@needs_ext
def test_cuda_kselect_unavailable_is_an_error():
    if _ext.HAS_CUDA_EXT and CUDA:
        pytest.skip("CUDA is available: covered by test_cuda_kselect_matches_sort")
    from arrag_kernels.ops._cpp import cuda_kselect

    with pytest.raises((RuntimeError, ValueError), match="CUDA"):
        cuda_kselect(torch.zeros(2, 8), None, 3)


@pytest.mark.skipif(not (_ext.HAS_CUDA_EXT and CUDA), reason=f"needs a GPU and the CUDA kernels ({_ext.CUDA_EXT_ERROR or 'no GPU'})")
@pytest.mark.parametrize("rows,cands,k", [(3, 5000, 2048), (17, 1025, 63), (1, 64, 64), (5, 3000, 1)])
def test_cuda_kselect_matches_sort(rows, cands, k):
    """(distance, id) order with NaN as +inf, exactly; ``ids=None`` selects the same distances."""
    from arrag_kernels.ops._cpp import cuda_kselect

    g = _gen(rows * cands)
    dist = torch.randint(0, 50, (rows, cands), generator=g).float()  # many ties
    ids = torch.randperm(rows * cands, generator=g).reshape(rows, cands)
    dist[0, :3] = float("nan")
    truth = candidate_distances(torch.where(dist.isnan(), float("inf"), dist), ids, rows * cands)
    want_d, want_i = tie_order(truth, k)
    d, i = cuda_kselect(dist.cuda(), ids.cuda(), k)
    torch.cuda.synchronize()
    assert_topk(d, i, truth, atol=0, rtol=0, what="cuda_kselect")
    assert torch.equal(d.cpu(), want_d) and torch.equal(i.cpu(), want_i)
    d, i = cuda_kselect(dist.cuda(), None, k)
    assert torch.equal(d.cpu(), want_d)


# ---------------------------------------------------------------------------------------------
# dispatch and torch.library


@needs_triton
def test_forced_triton_unavailable_raises(monkeypatch):
    from arrag_kernels.ops._triton import _common

    device = backend_device("triton")
    q = torch.randn(2, 32, dtype=torch.float64, device=device)
    keys = torch.randn(50, 32, dtype=torch.float64, device=device)
    with ak.use_backend("triton"), pytest.raises(BackendUnavailable, match="dtype"):
        knn(q, keys, 3)
    ref = knn_ref(q, keys, 3)
    got = knn(q, keys, 3)  # auto falls back
    assert torch.equal(got[1], ref[1])
    # CPU tensors without the interpreter (what a CUDA machine sees for CPU inputs).
    monkeypatch.setattr(_common, "INTERPRETED", False)
    with ak.use_backend("triton"), pytest.raises(BackendUnavailable, match="TRITON_INTERPRET"):
        knn(q.float().cpu(), keys.float().cpu(), 3)


def test_auto_does_not_pick_the_interpreter():
    q, keys = torch.randn(2, 32), torch.randn(50, 32)
    backend, _ = knn_dispatcher.select(q, keys, 3)
    assert backend != "triton"


@needs_ext
def test_knn_dispatch_reasons():
    q = torch.randn(2, 8)
    assert knn_dispatcher.select(q, torch.randn(10, 8), 3)[0] != "reference"
    with use_backend("cpp"), pytest.raises(BackendUnavailable, match="bfloat16; the C.. kernel takes float32 or float16"):
        knn(q, torch.randn(10, 8, dtype=torch.bfloat16), 3)
    with use_backend("cpp"):  # non-contiguous inputs are fine through the public op
        d, i = knn(q.t().contiguous().t(), torch.randn(8, 20).t(), 4)
    assert d.shape == (2, 4)


@needs_triton
def test_opcheck_triton():
    """Full opcheck compiled on CUDA. Under the interpreter, torch's wrap_triton returns the raw
    InterpretedFunction (no HOP), so fake-tensor tracing would launch the interpreter on fake
    tensors: only the schema and autograd-registration checks can run there."""
    g = _gen(0)
    device = backend_device("triton")
    q, keys = torch.randn(2, 32, generator=g).to(device), torch.randn(200, 32, generator=g).to(device)
    torch.library.opcheck(_triton().knn_op, (q, keys, 5), **OPCHECK_KWARGS)
    torch.library.opcheck(_triton().knn_op, (q, keys, 5, torch.arange(200, device=device)), **OPCHECK_KWARGS)


@needs_ext
def test_opcheck_cpp():
    from arrag_kernels.ops import _cpp

    g = _gen(11)
    torch.library.opcheck(_cpp._knn_op, (torch.randn(5, 12, generator=g), torch.randn(97, 12, generator=g), 7))
