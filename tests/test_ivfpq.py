"""IVF-PQ: device search (reference / Triton fused top-k) vs faiss-cpu, recall vs exact, empty lists,
negative ADC distances, multi-device list sharding, official import, nprobe, atomic / resumable /
two-process builds, bad-input errors; compiled on CUDA (no faiss there): synthetic index arrays with
unbalanced and empty lists, the forced fallback, sharding, no host synchronisation. The Triton scan
(sample bound, filter, radix select) also against the reference on integer-valued tables (exact
distances: ties broken by slot like the reference, ids past 2^31), with its launch plan pinned.

Every search is checked by the top-k oracle (tests/oracles.py) against the full candidate set of the
same query: faiss asked for every entry, or the reference scan asked for all its candidates (ADC
distances: a scan must be exact over its candidates); recall by the oracle's tie-aware recall."""

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import arrag_kernels as ak
from arrag_kernels.models import get_adapter
from arrag_kernels.ops import use_backend
from arrag_kernels.ops._triton import ivfpq as triton_ivfpq
from arrag_kernels.ops.ivfpq import (EMPTY, FLT_MAX, finish, ivfpq_dispatcher, ivfpq_probe, ivfpq_scan, ivfpq_scan_ref,
                                     ivfpq_search, pack, probe)
from arrag_kernels.ops.ivfpq_plan import BLOCK_SLOTS, ivfpq_plan, scan_shape
from arrag_kernels.retrieval.faiss_index import INDEX_FILE, VALUES_FILE, ivfpq_arrays, make_ivfpq_index, set_nprobe
from arrag_kernels.retrieval.ivfpq_build import work_dir
from arrag_kernels.retrieval.search import DeviceIVFPQSearch, make_search

from .oracles import assert_topk, candidate_distances, exact_distances, recall
from .utils import CUDA, OPCHECK_KWARGS, assert_plan_pins_run, op_backends, record_launches

try:
    import faiss
except ImportError:  # the GPU machine has none: the CUDA tests below still run
    faiss = None
else:
    # Two cores shared with torch: OpenMP spinning makes OPQ training ~20x slower with 2 faiss threads.
    faiss.omp_set_num_threads(1)
needs_faiss = pytest.mark.skipif(faiss is None, reason="faiss is not installed")
needs_cuda = pytest.mark.skipif(not CUDA, reason="compiled Triton IVF-PQ needs CUDA")

BACKENDS = op_backends(ivfpq_dispatcher)
NLIST = 16


def synthetic_keys(n: int, seed: int) -> np.ndarray:
    """(n, 32) keys shaped like official ones: 4 unit-norm 8-d cells drawn around 64 shared cell centres."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((64, 8))
    cells = centres[rng.integers(0, 64, (n, 4))] + 0.35 * rng.standard_normal((n, 4, 8))
    cells /= np.linalg.norm(cells, axis=-1, keepdims=True)
    return cells.reshape(n, 32).astype(np.float32)


@pytest.fixture(scope="module")
def keys():
    return synthetic_keys(3001, seed=0)


@pytest.fixture(scope="module")
def index(keys):
    """Official layout: OPQMatrix + IndexIVFPQ(IndexFlatL2), nlist 16, M 8, 8 bits."""
    if faiss is None:
        pytest.skip("faiss is not installed")
    idx = make_ivfpq_index(32, NLIST, m=8, nbits=8, opq=True)
    idx.train(keys)
    idx.add(keys)
    return idx


@pytest.fixture(scope="module")
def queries():
    return torch.from_numpy(synthetic_keys(7, seed=1))


def faiss_truth(index, queries, nprobe=None):
    """The oracle's truth table of faiss's search: every entry faiss finds for each query (k = ntotal),
    with ``nprobe`` set first unless None."""
    if nprobe is not None:
        set_nprobe(index, nprobe)
    dist, ids = (torch.from_numpy(a) for a in index.search(queries.cpu().numpy(), index.ntotal))
    return candidate_distances(dist, ids, int(ids.max()) + 1)


def scan_truth(scan_args, max_candidates):
    """The oracle's truth table of a scan: the reference asked for all ``max_candidates`` per query."""
    dist, ids = ivfpq_scan_ref(*scan_args, max_candidates, max_candidates)
    return candidate_distances(dist, ids, int(scan_args[5].max()) + 1)


def faiss_search(index, queries, nprobe, k):
    set_nprobe(index, nprobe)
    d, i = index.search(queries.numpy(), k)
    return torch.from_numpy(d), torch.from_numpy(i)



def _device_and_faiss(index, queries, backend, nprobe, k):
    """(dist, ids) of the device search with ``backend`` and of faiss-cpu, after checking that both
    pad the same slots (distance FLT_MAX, id -1)."""
    search = DeviceIVFPQSearch(ivfpq_arrays(index), nprobe, "cpu")
    with use_backend(backend):
        dist, ids = search.search(queries, k)
    ref_dist, ref_ids = faiss_search(index, queries, nprobe, k)
    assert torch.equal(ids == -1, ref_ids == -1) and torch.equal(dist == FLT_MAX, ref_ids == -1)
    return dist, ids, ref_dist, ref_ids

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("nprobe,k", [(1, 10), (3, 97), (NLIST, 2048), (1, 2048)], ids=lambda v: str(v))
def test_device_search_matches_faiss(index, queries, backend, nprobe, k):
    # nprobe 1, k 2048: fewer candidates than k, padded like faiss (checked by _device_and_faiss)
    dist, ids, ref_dist, ref_ids = _device_and_faiss(index, queries, backend, nprobe, k)
    truth = faiss_truth(index, queries, nprobe)
    assert_topk(ref_dist, ref_ids, truth, atol=0, rtol=0, what="faiss")
    assert_topk(dist, ids, truth, atol=1e-4, what=f"{backend} nprobe={nprobe} k={k}")


@needs_faiss
def test_long_lists_over_several_programs(keys, queries):
    """nlist 4 (~750 entries per list): a query's ~1500 candidate slots are cut into two programs
    whose ranges cross list boundaries; no OPQ, to cover the bare IndexIVFPQ form too."""
    idx = make_ivfpq_index(32, 4, m=8, nbits=8, opq=False)
    idx.train(keys)
    idx.add(keys)
    search = DeviceIVFPQSearch(ivfpq_arrays(idx), 2, "cpu")
    max_candidates = search.shards[0].max_candidates(2)
    assert search.rotation is None and scan_shape(len(queries), 300, max_candidates, 2, 8, 256).programs == 2
    with use_backend("triton"):
        dist, ids = search.search(queries, 300)
    assert_topk(dist, ids, faiss_truth(idx, queries, 2), atol=1e-4, what="several programs")


def test_triton_equals_reference(index, queries):
    search = DeviceIVFPQSearch(ivfpq_arrays(index), 5, "cpu")
    truth = scan_truth(*scan_inputs(ivfpq_arrays(index), queries, 5))
    with use_backend("reference"):
        assert_topk(*search.search(queries, 64), truth, atol=1e-5, what="reference")
    with use_backend("triton"):
        assert_topk(*search.search(queries, 64), truth, atol=1e-5, what="triton")


def scan_inputs(a, queries, nprobe):
    """(lists, dis0, term2, term1, codes, ids, offsets) and max_candidates of the index arrays ``a``
    (``ivfpq_arrays``'s layout, on the queries' device) for ``queries``."""
    lists, dis0, term2 = probe(queries, a["rotation"], a["centroids"], a["codebooks"], nprobe)
    sizes = (a["offsets"][1:] - a["offsets"][:-1]).sort(descending=True).values
    return [lists, dis0, term2, a["term1"], a["codes"], a["ids"], a["offsets"]], int(sizes[:nprobe].sum())


def integer_scan(q=3, nlist=12, nprobe=5, max_size=2000, seed=0, id_shift=1 << 33):
    """Scan inputs whose tables hold small integers (every distance exact in fp32, in any summation
    order, with many ties and negative distances), list 3 empty, ids shifted by ``id_shift`` (past
    2^32 by default); and max_candidates."""
    g = torch.Generator().manual_seed(seed)
    m = 8
    sizes = torch.randint(0, max_size, (nlist,), generator=g)
    sizes[3] = 0
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])
    n = int(offsets[-1])
    lists = torch.stack([torch.randperm(nlist, generator=g)[:nprobe].sort().values for _ in range(q)])
    args = [lists, torch.randint(-5, 5, (q, nprobe), generator=g).float(),
            torch.randint(-3, 4, (q, m, 256), generator=g).float(),
            torch.randint(-3, 4, (nlist, m, 256), generator=g).float(),
            torch.randint(0, 4, (n, m), generator=g, dtype=torch.uint8), torch.randperm(n, generator=g) + id_shift,
            offsets]
    return args, int(sizes.sort(descending=True).values[:nprobe].sum())


def _scan_triton(args, k, max_candidates, shape=None, values=None):
    """(dist, ids) of the Triton scan, and the gathered values with ``values``."""
    with use_backend("triton"):
        dist, ids, tokens = triton_ivfpq.ivfpq_scan_search(*args, k, max_candidates, values, shape=shape)
    return (dist, ids) if values is None else (dist, ids, tokens)


@pytest.mark.parametrize("k", [10, 37, 300])
def test_triton_scan_equals_reference_exactly(k):
    """Integer tables: the Triton scan returns exactly the reference's distances and ids, ties by slot
    (the entry stored first), ids past 2^32; the bound comes from a strict subset of the candidates."""
    args, max_candidates = integer_scan()
    assert scan_shape(3, k, max_candidates, 5, 8, 256).sample < max_candidates
    dist, ids = _scan_triton(args, k, max_candidates)
    ref = ivfpq_scan_ref(*args, k, max_candidates)
    assert (ref[1] >= 1 << 33).all() and (ref[0] < 0).any()
    assert torch.equal(dist, ref[0]) and torch.equal(ids, ref[1])


def test_triton_scan_fallback_exact():
    """A 16-slot sample makes a loose bound: the survivors overflow the k + BLOCK_SLOTS slots, each
    select program scans its candidates itself (shrinking them several times); still exact."""
    args, max_candidates = integer_scan(max_size=3000, seed=1)
    k = 50
    shape = dataclasses.replace(scan_shape(3, k, max_candidates, 5, 8, 256), sample=16, capacity=k + BLOCK_SLOTS)
    assert max_candidates > 3 * shape.capacity
    dist, ids = _scan_triton(args, k, max_candidates, shape)
    ref = ivfpq_scan_ref(*args, k, max_candidates)
    assert torch.equal(dist, ref[0]) and torch.equal(ids, ref[1])


def test_triton_scan_fewer_candidates_than_k():
    """Queries with fewer candidates than k (the first none: nprobe 1 on the empty list) are padded."""
    args, max_candidates = integer_scan(nprobe=1, max_size=300)
    args[0][0] = 3  # the empty list
    dist, ids = _scan_triton(args, 400, max_candidates)
    ref = ivfpq_scan_ref(*args, 400, max_candidates)
    assert (ids[0] == -1).all() and (dist[0] == FLT_MAX).all() and (ids == -1).any(1).all()
    assert torch.equal(dist, ref[0]) and torch.equal(ids, ref[1])


@pytest.mark.parametrize("case", ["sampled", "fallback", "padded"])
@pytest.mark.parametrize("values_dtype", [torch.int32, torch.int64], ids=str)
def test_triton_scan_gathers_values(case, values_dtype):
    """values[id] of each hit, gathered in the select kernel, equal the reference's gather: after a sampled
    bound, after the fallback's own scan, and -1 in padded slots (the first query probes the empty list)."""
    args, max_candidates = integer_scan(nprobe=1 if case == "padded" else 5, max_size=300 if case == "padded" else 2000,
                                        id_shift=0)
    k, shape = (400 if case == "padded" else 37), None
    if case == "padded":
        args[0][0] = 3
    if case == "fallback":
        shape = dataclasses.replace(scan_shape(3, k, max_candidates, 5, 8, 256), sample=16, capacity=k + BLOCK_SLOTS)
    values = torch.randint(0, 1 << 14, (len(args[5]),), generator=torch.Generator().manual_seed(2), dtype=values_dtype)
    dist, ids, tokens = _scan_triton(args, k, max_candidates, shape, values)
    ref = ivfpq_scan_ref(*args, k, max_candidates, values)
    assert torch.equal(dist, ref[0]) and torch.equal(ids, ref[1]) and tokens.dtype == torch.int64
    assert torch.equal(tokens, ref[2]) and torch.equal(tokens == -1, ids == -1)
    assert (case != "padded") or (tokens[0] == -1).all()


def _recorded(monkeypatch):
    """Records the scan's launches (kernel name, grid) and its scratch buffers."""
    return record_launches(monkeypatch, triton_ivfpq)


def test_triton_ivfpq_plan_pins_launches_and_scratch(monkeypatch):
    """ivfpq_plan's kernels, grids and scratch are exactly what the scan launches and allocates."""
    launches, scratch = _recorded(monkeypatch)
    args, max_candidates = integer_scan(id_shift=0)
    _scan_triton(args, 100, max_candidates, values=torch.arange(len(args[5])))  # the gather: no launch, no scratch
    plan = ivfpq_plan(3, 100, max_candidates, 5, values=torch.int64)
    assert_plan_pins_run(plan, launches, scratch, "_ivfpq_", 4, "sample_keys", "keys")
    assert plan["bytes_read"] - ivfpq_plan(3, 100, max_candidates, 5)["bytes_read"] == 3 * 100 * 8


@pytest.mark.parametrize("entries", [100_000_000, 506_000_000])
def test_ivfpq_plan_released_configuration(entries):
    """nlist 800, M 8, nprobe 32, k 2048, batch 16 (balanced lists): every candidate's codes and table
    entries read once plus a few %, <= 64 MB of scratch, 4 launches."""
    max_candidates = 32 * -(-entries // 800)
    plan = ivfpq_plan(16, 2048, max_candidates, 32, values="int64")  # as db.retrieve searches
    assert plan["candidate_bytes"] == 16 * max_candidates * 8 * 5
    assert plan["bytes_read"] <= 1.1 * plan["candidate_bytes"]
    assert plan["scratch_bytes"] <= 64 << 20
    assert plan["launches"] == 4


def test_ivfpq_plan_bad_input():
    with pytest.raises(ValueError, match=r"k <= 2048 and fewer than 2147483648 candidates"):
        ivfpq_plan(1, 2049, 100, 1)
    with pytest.raises(ValueError, match=r"every size must be >= 1"):
        ivfpq_plan(1, 10, 0, 1)
    with pytest.raises(ValueError, match=r"values must be torch.int32 or torch.int64"):
        ivfpq_plan(1, 10, 100, 1, values=torch.float32)


def test_one_program_scans_several_tiles(index, queries):
    """Filter programs looping over several slot tiles (what large databases get) give the same result."""
    args, max_candidates = scan_inputs(ivfpq_arrays(index), queries, NLIST)
    shape = scan_shape(len(queries), 97, max_candidates, NLIST, 8, 256)
    shape = dataclasses.replace(shape, tiles=2, programs=-(-max_candidates // (2 * BLOCK_SLOTS)))
    assert shape.programs >= 2
    out = _scan_triton(args, 97, max_candidates, shape)
    assert_topk(*out, scan_truth(args, max_candidates), atol=1e-5, what="several tiles")


def test_negative_distances(index, queries):
    """ADC distances are approximations and can be negative: shifted below zero, they keep their order."""
    args, max_candidates = scan_inputs(ivfpq_arrays(index), queries, 4)
    args[1] = args[1] - args[1].mean() - 1.0  # dis0: most candidates below zero, some above
    ref = ivfpq_scan_ref(*args, 200, max_candidates)
    assert (ref[0] < 0).any() and (ref[0] > 0).any()
    with use_backend("triton"):
        out = ivfpq_scan(*args, 200, max_candidates)
    truth = scan_truth(args, max_candidates)
    assert_topk(*ref, truth, atol=0, rtol=0, what="negative distances, reference")
    assert_topk(*out, truth, atol=1e-5, what="negative distances")


def test_packing_orders_like_floats():
    d = torch.tensor([3.0, -0.5, 0.0, -7.25, FLT_MAX, -FLT_MAX, 1e-30, -1e-30, 2.5, 3.0])
    packed = pack(d, torch.arange(len(d)))
    assert torch.equal(packed.sort().indices, torch.sort(d, stable=True).indices)
    lists, offsets = torch.zeros(1, 1, dtype=torch.long), torch.tensor([0, len(d)])
    dist, ids = finish(torch.cat([packed.sort().values, torch.tensor([EMPTY])])[None], lists, offsets,
                       torch.arange(len(d)) + 100, len(d) + 1)
    assert torch.equal(dist[0, :-1], torch.sort(d).values) and dist[0, -1] == FLT_MAX
    assert torch.equal(ids[0], torch.cat([torch.sort(d, stable=True).indices + 100, torch.tensor([-1])]))


@pytest.fixture(scope="module")
def index_with_empty_lists(index, queries):
    """The index without list 0 and the lists nearest to the first four queries."""
    a = ivfpq_arrays(index)
    lists = probe(queries, a["rotation"], a["centroids"], a["codebooks"], 1)[0]
    emptied = sorted({0, *lists[:4, 0].tolist()})
    idx = faiss.clone_index(index)
    doomed = torch.cat([a["ids"][a["offsets"][l]:a["offsets"][l + 1]] for l in emptied])
    idx.remove_ids(faiss.IDSelectorBatch(doomed.numpy()))
    offsets = ivfpq_arrays(idx)["offsets"]
    assert all(offsets[l] == offsets[l + 1] for l in emptied) and idx.ntotal == len(a["ids"]) - len(doomed)
    return idx


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("nprobe,k", [(1, 5), (3, 200)], ids=lambda v: str(v))
def test_empty_lists(index_with_empty_lists, queries, backend, nprobe, k):
    """Probed lists may be empty; with nprobe 1 the first four queries find nothing (all padding)."""
    dist, ids, ref_dist, ref_ids = _device_and_faiss(index_with_empty_lists, queries, backend, nprobe, k)
    if nprobe == 1:
        assert (ids[:4] == -1).all() and (ids[4:] >= 0).any()
    truth = faiss_truth(index_with_empty_lists, queries, nprobe)
    assert_topk(dist, ids, truth, atol=1e-4, what=f"{backend} empty lists nprobe={nprobe}")


@pytest.mark.parametrize("backend,shards,nprobe,k", [
    ("reference", 2, 3, 97), ("reference", 3, 2, 2048), ("reference", 3, NLIST, 50), ("triton", 3, 2, 10),
], ids=lambda v: str(v))
def test_sharded_search_equals_unsharded(index, queries, backend, shards, nprobe, k):
    """Lists sharded over 2 / 3 devices ("cpu" repeated: the logic is the device-independent part):
    exactly the unsharded ids and distances, including queries none of whose probed lists a shard holds."""
    arrays = ivfpq_arrays(index)
    single = DeviceIVFPQSearch(arrays, nprobe, "cpu")
    sharded = DeviceIVFPQSearch(arrays, nprobe, "cpu", shards=["cpu"] * shards)
    assert len(sharded.shards) == shards
    sizes = [len(s.ids) for s in sharded.shards]
    largest = int((arrays["offsets"][1:] - arrays["offsets"][:-1]).max())
    assert sum(sizes) == len(arrays["ids"]) and max(sizes) - min(sizes) <= 2 * largest, sizes
    lists = probe(queries, arrays["rotation"], arrays["centroids"], arrays["codebooks"], nprobe)[0]
    held = torch.stack([(s.offsets[lists + 1] > s.offsets[lists]).any(1) for s in sharded.shards])  # (shard, Q)
    assert nprobe == NLIST or not held.all(), "no shard without probed lists: the case is not covered"
    with use_backend(backend):
        expected = single.search(queries, k)
        dist, ids = sharded.search(queries, k)
    assert torch.equal(dist, expected[0]) and torch.equal(ids, expected[1])


def test_database_shard(official_dir, index, queries):
    db = ak.PatchDatabase.from_official(official_dir[0], nprobe=3)
    with use_backend("triton"):  # the device search (the interpreter on CPU)
        expected = db.search(queries, 40)
    sharded = db.shard(["cpu", "cpu"]).to("cpu")  # to() keeps the sharding
    assert sharded._shards == ["cpu", "cpu"] and db._shards is None
    with use_backend("triton"):
        dist, ids = sharded.search(queries, 40)
        assert len(sharded._search._device[queries.device].shards) == 2
        assert torch.equal(dist, expected[0]) and torch.equal(ids, expected[1])
        assert torch.equal(sharded.retrieve(queries, 40)[1], db.values[ids])
    for backend in ("auto", "reference"):  # CPU queries: faiss-cpu, sharded or not
        with use_backend(backend):
            assert_topk(*sharded.search(queries, 40), faiss_truth(index, queries, 3), atol=1e-4,
                        what=f"sharded database on CPU under {backend!r}")
    assert db.shard(["cpu"]).shard(None)._shards is None


def test_shard_errors(index, official_dir, keys):
    db = ak.PatchDatabase.from_official(official_dir[0], nprobe=1)
    with pytest.raises(ValueError, match=r"expected a non-empty list of devices"):
        db.shard([])
    with pytest.raises(ValueError, match=r"expected a list of devices.*got 'cpu'"):
        db.shard("cpu")
    with pytest.raises(ValueError, match=r"expected devices of one type, got \['cpu', 'cuda'\]"):
        db.shard(["cpu", "cuda"])
    with pytest.raises(ValueError, match=r"queries on cpu but shards on \['cuda:0', 'cuda:1'\]; shard over cpu"):
        DeviceIVFPQSearch(ivfpq_arrays(index), 1, "cpu", shards=["cuda:0", "cuda:1"])
    with pytest.raises(ValueError, match=r"only index='ivfpq' databases .* got 'flat'"):
        make_search("flat", torch.from_numpy(keys), shards=["cpu"])


def test_recall_against_exact(index, keys, queries):
    """Tie-aware recall@10 of IVF-PQ (faiss and the device search) vs exact search; grows with nprobe."""
    k = 10
    qs = torch.from_numpy(synthetic_keys(64, seed=2))
    truth = exact_distances(qs, torch.from_numpy(keys))
    recalls = {}
    for nprobe in (1, 4, NLIST):
        _, f_ids = faiss_search(index, qs, nprobe, k)
        with use_backend("reference"):
            _, d_ids = DeviceIVFPQSearch(ivfpq_arrays(index), nprobe, "cpu").search(qs, k)
        recalls[nprobe] = recall(f_ids, truth)
        hits, d_hits = (round(recall(i, truth) * k * len(qs)) for i in (f_ids, d_ids))
        assert abs(d_hits - hits) <= 2, "device search recall departs from faiss's"
    print(f"\nIVF-PQ recall@{k} vs exact (3001 keys, nlist {NLIST}, M 8 x 8 bits, OPQ): {recalls}")
    assert recalls[1] <= recalls[4] <= recalls[NLIST]
    assert recalls[NLIST] >= 0.5, f"recall@{k} with every list probed is {recalls[NLIST]:.2f}, expected >= 0.5"


def write_official(path: Path, index, values) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    faiss.write_index(index, str(path / INDEX_FILE))
    np.save(path / VALUES_FILE, np.asarray(values))
    return path


@pytest.fixture(scope="module")
def official_dir(tmp_path_factory, index, keys):
    set_nprobe(index, 1)  # the official build script saves nprobe = 1
    values = np.random.default_rng(3).integers(0, 16384, len(keys)).astype(np.int32)
    return write_official(tmp_path_factory.mktemp("official"), index, values), values


def test_from_official_sets_nprobe_on_inner_ivf(official_dir, index, queries):
    path, values = official_dir
    results = {}
    for nprobe in (1, 6):
        db = ak.PatchDatabase.from_official(path, nprobe=nprobe)
        assert db.keys is None and len(db) == len(values) and db.meta.key_dim == 32
        assert faiss.extract_index_ivf(db.index).nprobe == nprobe == db.nprobe
        dist, ids = db.search(queries, 20)
        truth = faiss_truth(index, queries, nprobe)
        assert_topk(dist, ids, truth, atol=1e-4, what=f"from_official nprobe={nprobe}")
        with use_backend("triton"):
            t_dist, t_ids = db.search(queries, 20)
        assert_topk(t_dist, t_ids, truth, atol=1e-4, what=f"triton, from_official nprobe={nprobe}")
        tok_dist, tokens = db.retrieve(queries, 20)
        assert torch.equal(tokens, torch.from_numpy(values.astype(np.int64))[ids])
        results[nprobe] = ids
    assert not torch.equal(results[1], results[6]), "nprobe had no effect on the results"


def test_index_only_database_roundtrip(official_dir, queries, tmp_path):
    db = ak.PatchDatabase.from_official(official_dir[0], nprobe=4)
    db.save(tmp_path / "db")
    assert sorted(p.name for p in (tmp_path / "db").iterdir()) == sorted(["meta.json", INDEX_FILE, VALUES_FILE])
    back = ak.PatchDatabase.load(tmp_path / "db")
    assert back.keys is None and back.nprobe == 4 and torch.equal(back.values, db.values)
    truth = faiss_truth(db.index, queries)
    assert_topk(*db.search(queries, 16), truth, atol=0, rtol=0, what="imported")
    assert_topk(*back.search(queries, 16), truth, atol=0, rtol=0, what="reloaded")
    assert back.to("cpu").nprobe == 4 and len(back.to("cpu")) == len(db)


def test_bad_official_inputs(tmp_path, index, keys):
    good_values = np.zeros(len(keys), dtype=np.int32)
    cases = []
    wrong_dim = make_ivfpq_index(16, 4, m=4, opq=True)
    wrong_dim.train(keys[:, :16].copy())
    wrong_dim.add(keys[:, :16].copy())
    cases.append((wrong_dim, good_values, {}, "index dimension is 16, expected 32"))
    flat = faiss.IndexFlatL2(32)
    flat.add(keys)
    cases.append((flat, good_values, {}, "expected an IndexIVFPQ"))
    bad_codes = good_values.copy()
    bad_codes[5] = 16384
    cases.append((index, bad_codes, {}, r"codes outside the codebook: range \[0, 16384\], expected \[0, 16384\)"))
    cases.append((index, good_values[:-1], {}, rf"expected shape \({len(keys)},\), got \({len(keys) - 1},\)"))
    cases.append((index, good_values, {"nprobe": NLIST + 1}, rf"nprobe: expected 1 <= nprobe <= nlist = {NLIST} \(the index.s list count\), got {NLIST + 1}"))
    for i, (idx, values, kwargs, message) in enumerate(cases):
        path = write_official(tmp_path / f"case{i}", idx, values)
        with pytest.raises(ak.DatabaseError, match=message):
            ak.PatchDatabase.from_official(path, **kwargs)
    with pytest.raises(ak.DatabaseError, match="faiss_ivf_pq_opq.index is missing"):
        ak.PatchDatabase.from_official(tmp_path / "case0" / "nowhere")


class CrashingAdapter:
    """The tiny model's adapter; ``encode`` raises after ``crash_after`` calls (None: never) and counts images."""

    def __init__(self, adapter, crash_after=None):
        self._adapter, self.crash_after, self.calls, self.images = adapter, crash_after, 0, 0

    def __getattr__(self, name):
        return getattr(self._adapter, name)

    def encode(self, batch):
        if self.crash_after is not None and self.calls >= self.crash_after:
            raise KeyboardInterrupt("simulated crash")
        self.calls += 1
        self.images += batch.shape[0]
        return self._adapter.encode(batch)


@needs_faiss
def test_build_is_atomic_and_resumable(tiny_model, tiny_images, tmp_path):
    path = tmp_path / "db"
    params = dict(index="ivfpq", path=path, nlist=NLIST, chunk_images=4, batch_size=4, train_size=1000, progress=False)
    adapter = get_adapter(tiny_model)
    first = ak.PatchDatabase.build(tiny_images[:8], adapter, **params)
    assert first.keys is not None and len(first) == 8 * 42

    crashing = CrashingAdapter(adapter, crash_after=3)
    with pytest.raises(KeyboardInterrupt):
        ak.PatchDatabase.build(tiny_images[8:24], crashing, **params)
    # the previous database is intact; the partial state holds the 3 finished chunks
    survivor = ak.PatchDatabase.load(path)
    assert torch.equal(survivor.values, first.values) and torch.equal(survivor.keys, first.keys)
    assert len(list(work_dir(path).glob("chunk-*.safetensors"))) == 3

    resumed_adapter = CrashingAdapter(adapter)
    resumed = ak.PatchDatabase.build(tiny_images[8:24], resumed_adapter, **params)
    assert resumed_adapter.images == 4, "the resumed build re-encoded finished chunks"
    assert not work_dir(path).exists()
    flat = ak.PatchDatabase.build(tiny_images[8:24], adapter, progress=False)
    assert torch.equal(resumed.keys, flat.keys) and torch.equal(resumed.values, flat.values)
    assert resumed.index.ntotal == len(flat) and ak.PatchDatabase.load(path).index.ntotal == len(flat)

    # other inputs never reuse a stale partial state
    with pytest.raises(KeyboardInterrupt):
        ak.PatchDatabase.build(tiny_images[:16], CrashingAdapter(adapter, crash_after=1), **params)
    fresh_adapter = CrashingAdapter(adapter)
    ak.PatchDatabase.build(tiny_images[8:24], fresh_adapter, **params)
    assert fresh_adapter.images == 16


@needs_faiss
def test_resumed_ivfpq_build_says_what_is_done(tiny_model, tiny_images, tmp_path, capsys):
    """Training used to print nothing for minutes between two bars, and a resumed build said nothing."""
    adapter = get_adapter(tiny_model)
    calls = []

    class Crashing:
        def __getattr__(self, name):
            return getattr(adapter, name)

        def encode(self, batch):
            if len(calls) == 2:
                raise KeyboardInterrupt("simulated crash")
            calls.append(batch.shape[0])
            return adapter.encode(batch)

    kwargs = dict(index="ivfpq", path=tmp_path / "db", nlist=4, m=4, nbits=4, chunk_images=4, batch_size=4)
    with pytest.raises(KeyboardInterrupt):
        ak.PatchDatabase.build(tiny_images[:12], Crashing(), **kwargs)
    capsys.readouterr()
    built = ak.PatchDatabase.build(tiny_images[:12], tiny_model, **kwargs)
    err = capsys.readouterr().err
    assert len(built) == 12 * 42
    assert "resuming the build in" in err and "2 of 3 chunks already encoded, 1 to go" in err
    assert "training OPQ + IVF-PQ (nlist 4, m 4, nbits 4)" in err and "trained in" in err and "saving 504 entries" in err


@needs_faiss
def test_index_only_build(tiny_model, tiny_images, tmp_path, queries):
    db = ak.PatchDatabase.build(tiny_images[:8], tiny_model, index="ivfpq", path=tmp_path / "db", nlist=NLIST,
                                keep_keys=False, nprobe=3, train_size=1000, progress=False)
    assert db.keys is None and db.nprobe == 3 and not (tmp_path / "db" / "arrays.safetensors").exists()
    with pytest.raises(ValueError, match="holds none"):
        ak.retrieval.search.make_search("flat", db.keys)
    dist, tokens = db.retrieve(queries, 5)
    assert dist.shape == tokens.shape == (7, 5) and tokens.dtype == torch.int64


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_faiss
def test_two_process_build(tiny_model, tiny_images, tmp_path):
    out, reports = tmp_path / "dist_db", tmp_path / "reports"
    reports.mkdir()
    script = Path(__file__).with_name("ivfpq_dist_build.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
         str(script), str(out), str(reports), "--merge"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # 24 images in chunks of 6: rank 0 encodes chunks 0 and 1 (part 0), rank 1 chunks 2 and 3 (part 1);
    # merged, every rank gets the whole database
    for r in (0, 1):
        report = json.loads((reports / f"rank{r}.json").read_text())
        assert {k: report[k] for k in ("encoded", "entries")} == {"encoded": 12, "entries": 24 * 42}, r
    merged = ak.PatchDatabase.load(out)
    single = ak.PatchDatabase.build(tiny_images, tiny_model, index="ivfpq", path=tmp_path / "single", nlist=NLIST,
                                    chunk_images=6, train_size=1000, progress=False)
    assert torch.equal(merged.keys, single.keys) and torch.equal(merged.values, single.values)
    q = single.keys[::97].contiguous()
    truth = faiss_truth(single.index, q)
    assert_topk(*single.search(q, 8), truth, atol=0, rtol=0, what="single build")
    assert_topk(*merged.search(q, 8), truth, atol=0, rtol=0, what="two-process build")


def test_device_search_input_errors(index, queries):
    a = ivfpq_arrays(index)
    args = [a[n] for n in ("rotation", "centroids", "codebooks", "term1", "codes", "ids", "offsets")]
    with pytest.raises(ValueError, match=r"queries must be \(Q, 32\), got \(7, 16\)"):
        ivfpq_search(queries[:, :16], *args, 1, 10, 500)
    with pytest.raises(ValueError, match=rf"nprobe must be in \[1, min\(2048, nlist = {NLIST}\)\], got {NLIST + 1}"):
        ivfpq_search(queries, *args, NLIST + 1, 10, 500)
    with pytest.raises(ValueError, match=r"k must be in \[1, 2048\], got 2049"):
        ivfpq_search(queries, *args, 1, 2049, 500)
    with pytest.raises(ValueError, match=r"max_candidates must be in \[1, 2\^32\), got 4294967296"):
        ivfpq_search(queries, *args, 1, 10, 1 << 32)
    scan_args, max_candidates = scan_inputs(a, queries, 2)
    with pytest.raises(ValueError, match=r"term2 \(Q, 8, 256\) from ivfpq_probe, got \(7, 2\), \(7, 2\) and \(6, 8"):
        ivfpq_scan(*scan_args[:2], scan_args[2][:6], *scan_args[3:], 10, max_candidates)
    with pytest.raises(TypeError, match=r"values must be a 1-D integer tensor \(a token id per entry\), got torch.float32"):
        ivfpq_scan(*scan_args, 10, max_candidates, torch.zeros(len(a["ids"])))
    with pytest.raises(ValueError, match="values on meta but the index on cpu"):
        ivfpq_search(queries, *args, 1, 10, 500, torch.zeros(len(a["ids"]), dtype=torch.long, device="meta"))


@needs_faiss
def test_cli_build_ivfpq_and_import_official(tmp_path, capsys):
    from arrag_kernels.cli import main
    from arrag_kernels.demo import procedural_images

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, im in enumerate(procedural_images(8, 32)):
        im.save(folder / f"{i}.png")
    db_dir = tmp_path / "db"
    assert main(["build-db", str(folder), "--out", str(db_dir), "--index", "ivfpq", "--nlist", "400"]) == 2
    assert "need at least max(nlist, 2**nbits) = 400 keys" in capsys.readouterr().err
    assert main(["build-db", str(folder), "--out", str(db_dir), "--index", "ivfpq", "--nlist", "8", "--nprobe", "2",
                 "--chunk-images", "4"]) == 0
    db = ak.PatchDatabase.load(db_dir)
    assert len(db) == 8 * 42 and db.nprobe == 2 and db.meta.index == "ivfpq"
    # our ivfpq databases hold the official files, so they import as released ones
    assert main(["import-official", str(db_dir), "--nprobe", "8", "--out", str(tmp_path / "imported")]) == 0
    imported = ak.PatchDatabase.load(tmp_path / "imported")
    assert imported.nprobe == 8 and torch.equal(imported.values, db.values)
    assert main(["import-official", str(db_dir), "--nprobe", "9"]) == 2
    assert "nprobe: expected 1 <= nprobe <= nlist = 8 (the index's list count), got 9" in capsys.readouterr().err


def test_set_nprobe_keeps_uploaded_arrays(official_dir, index, queries):
    db = ak.PatchDatabase.from_official(official_dir[0], nprobe=1)
    with use_backend("triton"):  # the device search (the interpreter on CPU)
        db.search(queries, 8)
        uploaded = db._search._device[queries.device]
        db.set_nprobe(5)
        dist, ids = db.search(queries, 8)
    assert db._search._device[queries.device] is uploaded and uploaded.nprobe == 5
    assert_topk(dist, ids, faiss_truth(index, queries, 5), atol=1e-4, what="after set_nprobe")
    with pytest.raises(ValueError, match=rf"nprobe must be in \[1, nlist = {NLIST}\], got 0"):
        db.set_nprobe(0)


def test_opcheck_triton_op(index, queries):
    """Full opcheck compiled on CUDA; under the interpreter only the schema and autograd checks can run
    (wrap_triton returns the raw interpreted kernel, which fake tensors cannot launch)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args, max_candidates = scan_inputs(ivfpq_arrays(index), queries, 2)
    torch.library.opcheck(triton_ivfpq.ivfpq_scan_op, (*(t.to(device) for t in args), 16, max_candidates),
                          **OPCHECK_KWARGS)


def test_padded_neighbours_come_back_as_token_minus_one(official_dir, queries):
    """nprobe = 1 over 16 lists of ~190 entries cannot fill k = 1000: the rest is padding (id -1)."""
    db = ak.PatchDatabase.from_official(official_dir[0], nprobe=1)
    _, ids = db.search(queries, 1000)
    dist, tokens = db.retrieve(queries, 1000)
    assert (ids == -1).any()
    assert torch.equal(tokens == -1, ids == -1)
    probs = torch.softmax(torch.randn(len(queries), 16384), 1)
    merged = ak.ops.daid_mix(probs, dist, tokens, torch.ones(len(queries), dtype=torch.bool), 0.5, 0.6)
    assert torch.isfinite(merged).all() and torch.allclose(merged.sum(1), torch.ones(len(queries)), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# compiled on CUDA, without faiss: synthetic arrays of 200k entries

CUDA_NLIST, DIM, M = 64, 32, 8


@pytest.fixture(scope="module")
def cuda_arrays():
    """CPU arrays laid out like ``ivfpq_arrays``: 200k entries in lists of very unequal sizes, every
    7th list empty, random codebooks and codes, an orthogonal rotation."""
    g = torch.Generator().manual_seed(0)
    centroids = torch.randn(CUDA_NLIST, DIM, generator=g)
    codebooks = torch.randn(M, 256, DIM // M, generator=g) * 0.3
    term1 = (codebooks * codebooks).sum(-1) + 2.0 * torch.einsum("lmd,mjd->lmj", centroids.view(CUDA_NLIST, M, -1),
                                                                   codebooks)
    weights = torch.rand(CUDA_NLIST, generator=g) ** 3
    weights[::7] = 0
    n = 200_000
    sizes = torch.bincount(torch.multinomial(weights, n, replacement=True, generator=g), minlength=CUDA_NLIST)
    return {"rotation": torch.linalg.qr(torch.randn(DIM, DIM, generator=g))[0], "centroids": centroids,
            "codebooks": codebooks, "term1": term1.contiguous(),
            "codes": torch.randint(0, 256, (n, M), generator=g, dtype=torch.uint8),
            "ids": torch.randperm(n, generator=g),
            "offsets": torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(sizes, 0)])}


@pytest.fixture(scope="module")
def cuda_queries(cuda_arrays):
    g = torch.Generator().manual_seed(1)
    near = cuda_arrays["centroids"][torch.randint(0, CUDA_NLIST, (9,), generator=g)] @ cuda_arrays["rotation"]  # y = x A^T
    return (near + 0.5 * torch.randn(9, DIM, generator=g)).cuda()


def _cuda_truth(cuda_arrays, queries, nprobe):
    """Truth table of the reference scan over every candidate of the ``nprobe`` probed lists, on CUDA."""
    return scan_truth(*scan_inputs({n: t.cuda() for n, t in cuda_arrays.items()}, queries, nprobe))


@needs_cuda
@pytest.mark.parametrize("nprobe,k", [(1, 10), (8, 97), (32, 2048), (CUDA_NLIST, 64), (4, 1000)], ids=lambda v: str(v))
def test_cuda_triton_search_equals_reference(cuda_arrays, cuda_queries, nprobe, k):
    search = DeviceIVFPQSearch(cuda_arrays, nprobe, "cuda")
    truth = _cuda_truth(cuda_arrays, cuda_queries, nprobe)
    for backend in ("reference", "triton"):
        with use_backend(backend):
            assert_topk(*search.search(cuda_queries, k), truth, atol=1e-4, rtol=0, what=backend)


@needs_cuda
@pytest.mark.parametrize("k", [13, 300])
def test_cuda_fallback(cuda_arrays, cuda_queries, k):
    """A 16-slot sample: every query's survivors overflow and its select program scans alone."""
    a = {n: t.cuda() for n, t in cuda_arrays.items()}
    lists, dis0, term2 = ivfpq_probe(cuda_queries, a["rotation"], a["centroids"], a["codebooks"], 6)
    sizes = (cuda_arrays["offsets"][1:] - cuda_arrays["offsets"][:-1]).sort(descending=True).values
    max_candidates = int(sizes[:6].sum())
    args = [lists, dis0, term2, a["term1"], a["codes"], a["ids"], a["offsets"]]
    shape = dataclasses.replace(scan_shape(len(cuda_queries), k, max_candidates, 6, M, 256), sample=16,
                                capacity=k + BLOCK_SLOTS)
    dist, ids, _ = triton_ivfpq.ivfpq_scan_search(*args, k, max_candidates, shape=shape)
    assert_topk(dist, ids, scan_truth(args, max_candidates), atol=1e-4, rtol=0, what=f"fallback k={k}")


@needs_cuda
@pytest.mark.parametrize("shards", [2, 3])
def test_cuda_sharded_search_equals_unsharded(cuda_arrays, cuda_queries, shards):
    single = DeviceIVFPQSearch(cuda_arrays, 8, "cuda")
    sharded = DeviceIVFPQSearch(cuda_arrays, 8, "cuda", shards=["cuda"] * shards)
    with use_backend("triton"):
        expected = single.search(cuda_queries, 500)
        dist, ids = sharded.search(cuda_queries, 500)
    assert torch.equal(dist, expected[0]) and torch.equal(ids, expected[1])


@needs_cuda
@pytest.mark.parametrize("shards", [None, ["cuda", "cuda"]], ids=["single", "sharded"])
def test_cuda_search_never_synchronises(cuda_arrays, cuda_queries, shards):
    search = DeviceIVFPQSearch(cuda_arrays, 8, "cuda", shards=shards)
    with use_backend("triton"):
        search.search(cuda_queries, 2048)  # compiles the kernels
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            search.search(cuda_queries, 2048)
        finally:
            torch.cuda.set_sync_debug_mode("default")
