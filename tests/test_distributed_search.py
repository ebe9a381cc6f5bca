"""Sharded search across processes (issue 25 item 2): a database split over 2 and 4 local gloo ranks
returns the unsharded database's hits (exact and IVF-PQ, slices and parts, ties across shard
boundaries), generation with it gives the unsharded tokens (DAiD, FAiD, masked, the logits
processor), and a shard that disagrees is a clear error on every rank. The ranks run
tests/distributed_worker.py and write per-rank result files; the merge itself is tested alone here.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time

import numpy as np
import pytest
import torch

import arrag_kernels as ak
from arrag_kernels.retrieval import DistributedDatabase
from arrag_kernels.retrieval.distributed import merge_topk
from arrag_kernels.retrieval.faiss_index import make_ivfpq_index
from arrag_kernels.retrieval.meta import PARTS_FILE, PartOf
from arrag_kernels.retrieval.parts import trained_digest
from tests import distributed_worker
from tests.oracles import FLT_MAX, assert_topk, tie_order

faiss = pytest.importorskip("faiss")

N, NLIST, NPROBE = 601, 8, 3  # entries (odd: shards of unequal size), IVF lists, lists probed
# (a, b): entry b gets entry a's key (and another token), a and b in different shards for 2 and 4 ranks
# (boundaries 300 and 150 / 300 / 450): an exact tie across a boundary, which the lower id must win.
DUPLICATES = [(140, 160), (290, 310), (440, 460), (10, 590)]
KS = [1, 2, 7, 301]  # 301 > every shard: shards pad, the merge fills from the others


def _keys_values(seed: int):
    rng = np.random.default_rng(seed)
    cells = rng.standard_normal((N, 4, 8)).astype(np.float32)
    keys = torch.from_numpy(cells / np.linalg.norm(cells, axis=-1, keepdims=True)).reshape(N, 32)
    values = torch.from_numpy(rng.integers(0, 64, N))
    for a, b in DUPLICATES:
        keys[b] = keys[a]
        values[b] = (values[a] + 1) % 64  # tells which copy was returned
    return keys, values


def _queries(keys: torch.Tensor) -> torch.Tensor:
    """(9, 32): the duplicated keys (ties at distance ~0, across a shard boundary), noisy keys and
    random unit queries."""
    g = torch.Generator().manual_seed(7)
    noisy = keys[torch.randint(0, N, (3,), generator=g)] + 0.05 * torch.randn(3, 32, generator=g)
    return torch.cat([keys[[a for a, _ in DUPLICATES]], noisy,
                      torch.nn.functional.normalize(torch.randn(2, 32, generator=g), dim=-1)])


def _save_parts(path, trained, keys, values, meta, world, other=None, bad=None, global_ids=False):
    """A partitioned database by the contract of /work/coord/parts.md: part r holds the entries of the
    r-th id range, added in id order to a copy of ``trained`` (``other`` for part ``bad``), with row
    ids 0..count-1 (``global_ids``: part ``bad`` with its global ids, as the contract's first draft)."""
    parts = []
    for r in range(world):
        lo, hi = N * r // world, N * (r + 1) // world
        index = faiss.clone_index(other if r == bad and other is not None else trained)
        if r == bad and global_ids:
            index.add_with_ids(keys[lo:hi].numpy(), np.arange(lo, hi, dtype=np.int64))
        else:
            index.add(keys[lo:hi].numpy())
        name = f"part-{r:05d}"
        part = PartOf(index=r, parts=world, first_id=lo, count=hi - lo, total=N, trained_sha256=trained_digest(index))
        part_meta = dataclasses.replace(meta, part=part)
        ak.PatchDatabase(None, values[lo:hi], part_meta, index=index, nprobe=NPROBE).save(path / name)
        parts.append({"dir": name, "first_id": lo, "count": hi - lo})
    (path / PARTS_FILE).write_text(json.dumps({"format": 1, "total": N, "parts": parts}))
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_model, tiny_images):
    """The databases the ranks load: exact and IVF-PQ (saved whole), parts for 2 and 4 ranks (good,
    one from another trained index, one missing), a database of another codebook, the tiny Janus's."""
    root = tmp_path_factory.mktemp("distributed")
    keys, values = _keys_values(seed=0)
    common = dict(codebook_size=64, embed_dim=8, grid=(8, 8), fingerprint="synthetic", num_images=N // 8)
    flat = ak.PatchDatabase.from_keys(keys, values, **common)
    flat.save(root / "exact")
    ak.PatchDatabase.from_keys(keys, values, **{**common, "fingerprint": "another codebook"}).save(root / "exact-other")
    trained = make_ivfpq_index(32, NLIST, m=8, nbits=8)
    trained.train(keys.numpy())
    other = make_ivfpq_index(32, NLIST, m=8, nbits=8)
    other.train(keys.numpy()[::-1].copy() * 0.9)
    index = faiss.clone_index(trained)
    index.add(keys.numpy())
    meta = dataclasses.replace(flat.meta, index="ivfpq")
    ak.PatchDatabase(None, values, meta, index=index, nprobe=NPROBE).save(root / "ivfpq")
    for world in (2, 4):
        _save_parts(root / f"parts-{world}", trained, keys, values, meta, world)
        _save_parts(root / f"parts-{world}-bad", trained, keys, values, meta, world, other=other, bad=world - 1)
    missing = _save_parts(root / "parts-2-missing", trained, keys, values, meta, 2)
    _save_parts(root / "parts-2-global", trained, keys, values, meta, 2, bad=1, global_ids=True)
    shutil.rmtree(missing / "part-00001")
    torch.save(_queries(keys), root / "queries.pt")
    ak.PatchDatabase.build(tiny_images, tiny_model, progress=False).save(root / "janus-flat")
    ak.PatchDatabase.build(tiny_images, tiny_model, index="ivfpq", path=root / "janus-ivfpq", nlist=4, nprobe=2,
                           progress=False)
    return root


EVERY_WORLD = {  # cases run on 2 and on 4 ranks
    "exact": {"kind": "search", "db": "exact", "ks": KS},
    "ivfpq": {"kind": "search", "db": "ivfpq", "ks": KS},
    "parts": {"kind": "search", "db": "ivfpq", "parts": "parts-{world}", "ks": KS},
    # each rank its own part, as a torchrun build returns it: db.distributed() must not slice it again
    "own-part": {"kind": "search", "db": "ivfpq", "own_part": "parts-{world}", "ks": KS},
    "different-queries": {"kind": "search", "db": "exact", "ks": [3], "different_queries": True},
    "bad-codebook": {"kind": "bad_shard", "db": "exact", "other": "exact-other", "rank": 1},
    "bad-trained": {"kind": "bad_shard", "parts": "parts-{world}-bad"},
}
TWO_RANKS = {  # the slower cases (the device search's Triton kernels run interpreted) and 2-part ones
    "ivfpq-device": {"kind": "search", "db": "ivfpq", "ks": [7], "backend": "triton"},
    "janus": {"kind": "janus", "dbs": ["janus-flat", "janus-ivfpq"]},
    "masked": {"kind": "masked"},
    "logits": {"kind": "logits"},
    "missing-part": {"kind": "bad_shard", "parts": "parts-2-missing"},
    "global-ids": {"kind": "bad_shard", "parts": "parts-2-global"},
    "wrong-world": {"kind": "bad_shard", "parts": "parts-4"},
}


def _spawn(work, world: int, cases: dict, timeout: float = 240.0) -> list[dict]:
    """Run the cases on ``world`` gloo ranks on the databases in ``work``; each rank's results (a hang
    fails the test)."""
    run = work / f"run-{world}"
    run.mkdir()
    cases = {name: {k: v.format(world=world) if isinstance(v, str) else v for k, v in case.items()}
             for name, case in cases.items()}
    (run / "cases.json").write_text(json.dumps(cases))
    # Ranks fork from a fresh server process that imported the worker (and torch, arrag_kernels) once.
    torch.multiprocessing.get_context("forkserver").set_forkserver_preload([distributed_worker.__name__])
    ctx = torch.multiprocessing.start_processes(distributed_worker.main, args=(world, str(work), str(run)),
                                                nprocs=world, join=False, start_method="forkserver")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{world} ranks did not finish within {timeout} s: a collective hangs")
    return [torch.load(run / f"rank{r}.pt") for r in range(world)]


@pytest.fixture(scope="module")
def ranks(work):
    """{world size: per-rank results}: 2 ranks run every case, 4 ranks the searches."""
    return {2: _spawn(work, 2, {**EVERY_WORLD, **TWO_RANKS}), 4: _spawn(work, 4, EVERY_WORLD)}


def _ok(result: dict) -> dict:
    assert "error" not in result, result.get("traceback")
    return result


WORLDS = [2, 4]


@pytest.mark.parametrize("world, case",
                         [(w, c) for w in WORLDS for c in ("exact", "ivfpq", "parts", "own-part")] + [(2, "ivfpq-device")])
def test_sharded_search_equals_unsharded(work, ranks, world, case):
    """Every rank gets the unsharded database's ids, distances (bitwise) and tokens."""
    spec = {**EVERY_WORLD, **TWO_RANKS}[case]
    full = ak.PatchDatabase.load(work / spec["db"])
    queries = torch.load(work / "queries.pt")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks: CPU matmuls (the IVF-PQ probe) may round by thread count
    try:
        with ak.use_backend(spec.get("backend", "auto")):
            expected = {k: full.search(queries, k, return_tokens=True) for k in spec["ks"]}
    finally:
        torch.set_num_threads(threads)
    for rank, results in enumerate(ranks[world]):
        got = _ok(results[case])
        assert got["len"] == N and got["shard_len"] == N * (rank + 1) // world - N * rank // world
        for k in spec["ks"]:
            for what, a, b in zip(("distances", "ids", "tokens"), got[k], expected[k]):
                assert torch.equal(a, b), f"rank {rank} k={k}: {what} differ"


def test_ranks_searching_different_queries_fail(ranks):
    for world in WORLDS:
        for results in ranks[world]:
            error = results["different-queries"].get("error", "")
            assert error.startswith("RuntimeError") and "searched different queries" in error, error


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("case", ["exact", "ivfpq", "parts"])
def test_ties_across_shards_go_to_the_lower_id(ranks, world, case):
    """The first queries are the keys of entries a, duplicated as entries b in another shard (for 4
    ranks; for 2 ranks, 2 of the 4 pairs): a and b come back at the same distance, a first (FAISS's
    order); the exact search, with k = 1, returns only a."""
    for rank, results in enumerate(ranks[world]):
        got = _ok(results[case])
        dist_, ids, _ = got[7]
        for row, (a, b) in enumerate(DUPLICATES):
            found = ids[row].tolist()
            assert a in found and b in found and found.index(a) < found.index(b), (rank, row, found)
            assert dist_[row, found.index(a)] == dist_[row, found.index(b)]
            if case == "exact":
                assert found[:2] == [a, b] and got[1][1][row].tolist() == [a]
    if case != "exact":  # probed lists hold fewer than 301 entries: padding (-1), merged last
        ids = _ok(ranks[world][0][case])[301][1]
        assert bool((ids == -1).any()) and bool(((ids == -1).int().diff(dim=1) >= 0).all())


@pytest.mark.parametrize("world", WORLDS)
def test_a_shard_of_another_trained_index_fails_on_every_rank(ranks, world):
    for rank, results in enumerate(ranks[world]):
        error = results["bad-trained"].get("error", "")
        assert error.startswith("DatabaseError") and "another trained IVF-PQ index" in error, (rank, error)
        assert f"rank {world - 1}'s shard" in error


def test_a_shard_of_another_codebook_fails_on_every_rank(ranks):
    for results in ranks[2]:
        error = results["bad-codebook"].get("error", "")
        assert error.startswith("DatabaseError") and "model_fingerprint = 'another codebook'" in error, error


@pytest.mark.parametrize("case, words", [("missing-part", ["rank 1:", "part-00001"]),
                                         ("wrong-world", ["4 parts", "2 ranks"]),
                                         ("global-ids", ["rank 1:", "holds ids 300..600", "row ids 0..300"])])
def test_bad_parts_fail_on_every_rank(ranks, case, words):
    for results in ranks[2]:
        error = results[case].get("error", "")
        assert error.startswith("DatabaseError") and all(w in error for w in words), error


@pytest.mark.parametrize("run", ["daid-greedy", "daid-sampled", "daid-static", "faid"])
def test_patched_generation_gives_the_unsharded_tokens(ranks, run):
    for db in ["janus-flat"] + (["janus-ivfpq"] if run == "daid-greedy" else []):
        first = _ok(ranks[2][0]["janus"])
        for rank, results in enumerate(ranks[2]):
            got = _ok(results["janus"])
            assert torch.equal(got[f"{db}/{run}/sharded"], got[f"{db}/{run}/unsharded"]), (rank, db)
            assert torch.equal(got[f"{db}/{run}/sharded"], first[f"{db}/{run}/sharded"])  # the ranks agree
        if run == "daid-greedy":  # retrieval changes the image: the comparison is not vacuous
            assert not torch.equal(first[f"{db}/{run}/sharded"], first[f"{db}/plain"])


@pytest.mark.parametrize("case", ["masked", "logits"])
def test_masked_and_logits_processor_paths_give_the_unsharded_tokens(ranks, case):
    for results in ranks[2]:
        got = _ok(results[case])
        assert torch.equal(got["sharded"], got["unsharded"])
        assert bool((got["sharded"] >= 0).all()) and not torch.equal(got["sharded"], got["plain"])


# ---- the merge alone ----------------------------------------------------------------------------
def _shard_topk(truth: torch.Tensor, lo: int, hi: int, k: int):
    """What a backend returns for the shard of ids [lo, hi): the oracle's tie order, padded to k."""
    dist_, ids = tie_order(truth[:, lo:hi], min(k, hi - lo))
    ids = torch.where(ids >= 0, ids + lo, -1)
    pad = k - ids.shape[1]
    return (torch.nn.functional.pad(dist_, (0, pad), value=FLT_MAX), torch.nn.functional.pad(ids, (0, pad), value=-1))


@pytest.mark.parametrize("sizes", [(97,), (13, 1, 63), (5, 40, 2, 31, 9)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("k", [1, 4, 33])
def test_merge_topk_equals_the_tie_aware_oracle(sizes, k):
    g = torch.Generator().manual_seed(sum(sizes) + k)
    n, q = sum(sizes), 7
    # distances on a coarse grid (many exact ties, negative ones as IVF-PQ's ADC can give) and ids that
    # are no candidate (NaN: e.g. outside the probed lists) so that rows run short of k
    truth = (torch.randint(-8, 24, (q, n), generator=g) / 4).double()
    truth[torch.rand(q, n, generator=g) < 0.3] = float("nan")
    truth[0, :] = float("nan")
    truth[0, n - 1] = 1.0  # a row with one candidate, in the last shard
    bounds = np.cumsum((0,) + sizes)
    blocks = [_shard_topk(truth, int(lo), int(hi), k) for lo, hi in zip(bounds[:-1], bounds[1:])]
    dist_, ids = (torch.cat(t, 1) for t in zip(*blocks))
    tokens = torch.where(ids >= 0, ids * 7 % 64, -1)
    got_dist, got_ids, got_tokens = merge_topk(dist_, ids, tokens, k)
    want_dist, want_ids = tie_order(truth, k)
    assert_topk(got_dist, got_ids, truth, atol=0.0, rtol=0.0, what="merge_topk")
    assert torch.equal(got_ids, want_ids) and torch.equal(got_dist, want_dist)
    assert torch.equal(got_tokens, torch.where(want_ids >= 0, want_ids * 7 % 64, -1))


def test_without_a_process_group_the_error_says_how_to_start_one(tiny_db):
    with pytest.raises(ValueError, match="init_process_group"):
        tiny_db.distributed()
    with pytest.raises(ValueError, match="init_process_group"):
        DistributedDatabase(tiny_db, 0, len(tiny_db))


def test_the_slice_of_an_ivfpq_index_is_the_part_a_build_would_fill():
    """_ivfpq_slice (what rank r keeps of an in-memory IVF-PQ database) holds, list by list, the codes
    and (renumbered) ids that adding the range's keys to the trained index in id order gives."""
    from arrag_kernels.retrieval.distributed import _ivfpq_slice
    from arrag_kernels.retrieval.faiss_index import ivfpq_arrays

    keys, _ = _keys_values(seed=1)
    trained = make_ivfpq_index(32, NLIST, m=8, nbits=8)
    trained.train(keys.numpy())
    full = faiss.clone_index(trained)
    full.add(keys.numpy())
    lo, hi = 150, 451
    built = faiss.clone_index(trained)
    built.add(keys[lo:hi].numpy())
    sliced, expected = ivfpq_arrays(_ivfpq_slice(full, lo, hi)), ivfpq_arrays(built)
    assert sliced["offsets"][-1] == hi - lo
    for name in ("codes", "ids", "offsets", "rotation", "centroids", "codebooks"):
        assert torch.equal(sliced[name], expected[name]), name
