"""Distributed IVF-PQ builds with no single holder (issue 25 item 1): 4 torchrun (gloo) workers and a 4-part Ray
Data build give, list by list, the ids and codes (and the values) of the single-process build, byte for byte; a
rank killed mid-build fails clearly, publishes nothing, leaves the previous database and resumes; bad parts
(another trained quantizer, missing, corrupted, another codebook, a gap in the ids) are clear errors, and then
nothing is merged or published and the previous database stays."""

import dataclasses
import functools
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import arrag_kernels as ak
from arrag_kernels.models import tiny_janus
from arrag_kernels.retrieval import ivfpq_build, parts
from arrag_kernels.retrieval.faiss_index import INDEX_FILE, inner_ivfpq, make_ivfpq_index
from arrag_kernels.retrieval.ivfpq_build import work_dir
from arrag_kernels.retrieval.meta import PARTS_FILE, DatabaseError

faiss = pytest.importorskip("faiss")
faiss.omp_set_num_threads(1)

WORKERS, CHUNK, NLIST = 4, 3, 16  # 24 images in 8 chunks of 3: two chunks (6 images, 252 entries) per part
BUILD = dict(index="ivfpq", nlist=NLIST, chunk_images=CHUNK, batch_size=CHUNK, train_size=1000, progress=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(out: Path, reports: Path, *args: str) -> subprocess.CompletedProcess:
    shutil.rmtree(reports, ignore_errors=True)
    reports.mkdir()
    script = Path(__file__).with_name("ivfpq_dist_build.py")
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORKERS), "--master_port",
         str(_free_port()), str(script), str(out), str(reports), "--chunk-images", str(CHUNK), *args],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def rank_reports(reports: Path) -> list[dict]:
    return [json.loads((reports / f"rank{r}.json").read_text()) for r in range(WORKERS)]


def assert_same_lists(got, want) -> None:
    """Two (OPQ +) IVF-PQ indexes hold the same entries: list by list the same ids and codes, same quantizers,
    and the same bytes once serialised."""
    a, b = inner_ivfpq(got), inner_ivfpq(want)
    assert got.ntotal == want.ntotal and a.nlist == b.nlist
    assert parts.trained_digest(got) == parts.trained_digest(want)
    for l in range(a.nlist):
        n = a.invlists.list_size(l)
        assert n == b.invlists.list_size(l), l
        if n:
            ids = [faiss.rev_swig_ptr(x.invlists.get_ids(l), n).copy() for x in (a, b)]
            codes = [faiss.rev_swig_ptr(x.invlists.get_codes(l), n * x.code_size).copy() for x in (a, b)]
            np.testing.assert_array_equal(ids[0], ids[1], err_msg=f"ids of list {l}")
            np.testing.assert_array_equal(codes[0], codes[1], err_msg=f"codes of list {l}")
    assert np.array_equal(faiss.serialize_index(got), faiss.serialize_index(want))


def assert_equals_single(path: Path, single) -> None:
    infos = parts.check_parts(path, verify="full")
    assert [(p.first_id, p.count) for p in infos] == [(r * 252, 252) for r in range(WORKERS)]
    merged = parts.merge_in_memory(path)
    assert_same_lists(merged.index, single.index)
    assert torch.equal(merged.values, single.values) and torch.equal(merged.keys, single.keys)
    assert merged.meta == single.meta


@pytest.fixture(scope="module")
def single(tiny_model, tiny_images, tmp_path_factory):
    return ak.PatchDatabase.build(tiny_images, tiny_model, path=tmp_path_factory.mktemp("single") / "db", **BUILD)


@pytest.fixture(scope="module")
def killed_then_resumed(tiny_model, tiny_images, tmp_path_factory):
    """A previous database at ``out``; a 4-rank build whose rank 2 dies after its first chunk; the same build run
    again. Returns what each step left."""
    root = tmp_path_factory.mktemp("dist")
    out, reports = root / "db", root / "reports"
    previous = ak.PatchDatabase.build(tiny_images[:8], tiny_model, path=out, **{**BUILD, "chunk_images": 4})
    killed = torchrun(out, reports, "--die-rank", "2", "--die-after", "1")
    after_kill = {"db": ak.PatchDatabase.load(out), "parts_json": (out / PARTS_FILE).exists(),
                  "chunks": sorted(p.name for p in work_dir(out).glob("chunk-*.safetensors")),
                  "work_parts": sorted(p.name for p in work_dir(out).glob("part-*"))}
    resumed = torchrun(out, reports)
    return dict(out=out, previous=previous, killed=killed, after_kill=after_kill, resumed=resumed,
                reports=rank_reports(reports) if resumed.returncode == 0 else None)


def test_killed_rank_fails_clearly_and_keeps_the_previous_database(killed_then_resumed):
    run = killed_then_resumed
    assert run["killed"].returncode != 0
    log = run["killed"].stdout + run["killed"].stderr
    assert "rank      : 2" in log and "exitcode  : 3" in log, log[-3000:]
    after = run["after_kill"]
    assert not after["parts_json"] and after["work_parts"] == [], "nothing may be filled or published"
    assert torch.equal(after["db"].values, run["previous"].values) and after["db"].meta == run["previous"].meta
    assert "chunk-000004.safetensors" in after["chunks"] and "chunk-000005.safetensors" not in after["chunks"]


def test_four_ranks_equal_single_process_after_resume(killed_then_resumed, single):
    run = killed_then_resumed
    assert run["resumed"].returncode == 0, run["resumed"].stdout[-3000:] + run["resumed"].stderr[-3000:]
    assert not work_dir(run["out"]).exists()
    reports = run["reports"]
    # rank r fills part r, gets it back, and holds only its own quarter of the entries
    assert [rep["part"] for rep in reports] == [[r, WORKERS, r * 252, 252] for r in range(WORKERS)]
    assert [rep["entries"] for rep in reports] == [252] * WORKERS
    assert all(rep["peak_rss_mib"] > 0 for rep in reports)
    # the killed rank 2 had saved its first chunk (images 12..14): it encodes only its second one
    assert reports[2]["encoded"] == 3 and sum(rep["encoded"] for rep in reports) < 24
    assert_equals_single(run["out"], single)


def test_a_part_is_an_ordinary_database(killed_then_resumed, single):
    """Each part loads (deep check included: its ids are 0..count-1), holds its slice of the values and keys, and
    its search finds what the whole index finds among that part's ids (global id = first_id + local id)."""
    merged = parts.merge_in_memory(killed_then_resumed["out"])
    q = single.keys[::41].contiguous()
    all_dist, all_ids = merged.index.search(q.numpy(), merged.index.ntotal)
    for info in parts.check_parts(killed_then_resumed["out"]):
        part = ak.PatchDatabase.load(info.dir, verify="full")
        ids = slice(info.first_id, info.first_id + info.count)
        assert torch.equal(part.values, single.values[ids]) and torch.equal(part.keys, single.keys[ids])
        assert part.meta.num_images == 6 and part.nprobe == merged.nprobe
        dist, hits = part.search(q, 1)
        for row in range(len(q)):
            mine = np.flatnonzero((all_ids[row] >= ids.start) & (all_ids[row] < ids.stop))
            if mine.size:  # the probed list holds entries of this part
                assert int(hits[row, 0]) + info.first_id == all_ids[row, mine[0]], (info.index, row)
                assert float(dist[row, 0]) == all_dist[row, mine[0]]
            else:
                assert int(hits[row, 0]) == -1


def test_merged_torchrun_build(tmp_path, single):
    """A fresh 4-rank build with ``merge=True``: rank 0 merges the parts in memory into one database, which every
    rank gets back; it is the single-process build, byte for byte."""
    out, reports = tmp_path / "db", tmp_path / "reports"
    run = torchrun(out, reports, "--merge")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert [rep["entries"] for rep in rank_reports(reports)] == [24 * 42] * WORKERS
    merged = ak.PatchDatabase.load(out, verify="full")
    assert merged.meta.part is None and not parts.is_partitioned(out)
    assert_same_lists(merged.index, single.index)
    assert torch.equal(merged.values, single.values) and torch.equal(merged.keys, single.keys)


# ---- bad parts ------------------------------------------------------------------------------
def _relist(path: Path, r: int) -> None:
    """Make parts.json list part r's current index file (so that the check reaches what the test broke)."""
    listing = json.loads((path / PARTS_FILE).read_text())
    listing["parts"][r]["sha256"] = parts.part_info(path / parts.part_dir_name(r)).sha256
    (path / PARTS_FILE).write_text(json.dumps(listing))


def _refill(path: Path, r: int, trained, trained_sha256: str | None = None, **meta_changes) -> None:
    """Replace part r by one holding the same entries filled from ``trained`` (recording ``trained_sha256``)."""
    old = ak.PatchDatabase.load(path / parts.part_dir_name(r))
    index = faiss.clone_index(trained)
    index.add(old.keys.numpy())
    part = dataclasses.replace(old.meta.part, trained_sha256=trained_sha256 or parts.trained_digest(trained))
    meta = dataclasses.replace(old.meta, part=part, **meta_changes)
    ak.PatchDatabase(old.keys, old.values, meta, index=index).save(path / parts.part_dir_name(r))


@pytest.fixture(scope="module")
def other_trained(single):
    index = make_ivfpq_index(single.meta.key_dim, NLIST)
    index.train(single.keys.flip(0).numpy())  # another sample order: other centroids
    return index


def _break(kind: str, path: Path, other_trained) -> str:
    """Break the partitioned database at ``path``; return the error the check must raise."""
    if kind == "other trained index":
        _refill(path, 1, other_trained)
        return r"part 1 \(part-00001\) was filled from another trained index"
    if kind == "forged trained digest":  # claims the right trained index, holds other quantizers
        _refill(path, 1, other_trained, json.loads((path / PARTS_FILE).read_text())["trained_sha256"])
        _relist(path, 1)
        return r"part 1 \(part-00001\): its index holds other quantizers than trained.index"
    if kind == "missing part":
        shutil.rmtree(path / "part-00002")
        return r"part 2 \(part-00002\)"
    if kind == "corrupted part":
        file = path / "part-00003" / INDEX_FILE
        data = bytearray(file.read_bytes())
        data[len(data) // 2] ^= 0xFF
        file.write_bytes(bytes(data))
        return r"part 3 \(part-00003\) is unreadable or corrupted: .*page"
    if kind == "another codebook":
        old = ak.PatchDatabase.load(path / "part-00001")
        ak.PatchDatabase(old.keys, old.values, dataclasses.replace(old.meta, model_fingerprint="another-codebook"),
                         index=old.index).save(path / "part-00001")
        _relist(path, 1)
        return r"part 1 \(part-00001\) was built for another model or key layout: model_fingerprint 'another-codebook'"
    raise AssertionError(kind)


BROKEN = ["other trained index", "forged trained digest", "missing part", "corrupted part", "another codebook"]


@pytest.mark.parametrize("kind", BROKEN)
def test_bad_part_is_a_clear_error(kind, killed_then_resumed, other_trained, tmp_path):
    path = tmp_path / "db"
    shutil.copytree(killed_then_resumed["out"], path)
    parts.check_parts(path)  # the copy is fine
    error = _break(kind, path, other_trained)
    with pytest.raises(DatabaseError, match=error):
        parts.check_parts(path)
    with pytest.raises(ValueError, match=error):
        parts.merge_in_memory(path)


@pytest.mark.parametrize("merge", [False, True], ids=["publish", "merge"])
@pytest.mark.parametrize("kind", BROKEN)
def test_bad_part_publishes_nothing(kind, merge, killed_then_resumed, single, other_trained, tmp_path):
    """The build's last step (check the parts, then publish them or merge them) on a work directory holding a
    broken part: a clear error, the previous database at the target intact, no temporary directory left."""
    work, target = tmp_path / "work", tmp_path / "target"
    shutil.copytree(killed_then_resumed["out"], work)
    (work / PARTS_FILE).unlink()  # a work directory: the parts, not yet listed
    previous = ak.PatchDatabase.from_keys(single.keys[:10], single.values[:10], 512, 8, (8, 8))
    previous.save(target)
    if kind in ("forged trained digest", "another codebook"):  # these breaks re-list the part in parts.json
        parts.write_parts_json(work, parts.part_info(work / "part-00000").meta.part.trained_sha256,
                               [parts.part_info(work / parts.part_dir_name(r)) for r in range(WORKERS)])
    _break(kind, work, other_trained)
    (work / PARTS_FILE).unlink(missing_ok=True)
    with pytest.raises(DatabaseError, match=r"part \d \(part-0000\d\)|part-00002"):
        ivfpq_build.finish_parts(work, target, WORKERS, merge)
    assert torch.equal(ak.PatchDatabase.load(target).keys, previous.keys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target", "work"], "a temporary directory was left"


def test_gap_or_overlap_in_the_ids(killed_then_resumed, tmp_path):
    path = tmp_path / "db"
    shutil.copytree(killed_then_resumed["out"], path)
    listing = json.loads((path / PARTS_FILE).read_text())
    listing["parts"][2]["first_id"] += 1
    (path / PARTS_FILE).write_text(json.dumps(listing))
    with pytest.raises(DatabaseError, match=r"part 2 \(part-00002\) starts at id 505, expected 504: a gap"):
        parts.check_parts(path)
    listing["parts"][2]["first_id"] -= 2
    (path / PARTS_FILE).write_text(json.dumps(listing))
    with pytest.raises(DatabaseError, match=r"starts at id 503, expected 504: an overlap"):
        parts.check_parts(path)


def test_bad_listing_or_trained_index(killed_then_resumed, other_trained, tmp_path):
    path = tmp_path / "db"
    shutil.copytree(killed_then_resumed["out"], path)
    listing = json.loads((path / PARTS_FILE).read_text())
    del listing["parts"][1]["sha256"]
    (path / PARTS_FILE).write_text(json.dumps(listing))
    with pytest.raises(DatabaseError, match=r"parts.json' is corrupted or incomplete: parts\[1\].sha256 missing"):
        parts.check_parts(path)
    shutil.rmtree(path)
    shutil.copytree(killed_then_resumed["out"], path)
    faiss.write_index(other_trained, str(path / "trained.index"))
    with pytest.raises(DatabaseError, match=r"trained.index' is not the trained index parts.json records"):
        parts.check_parts(path)
    (path / "trained.index").unlink()
    with pytest.raises(DatabaseError, match=r"trained.index \(the trained index every part was filled from\) is miss"):
        parts.check_parts(path)


def test_too_few_chunks_for_the_parts():
    with pytest.raises(ValueError, match="cannot split 3 chunks of images into 4 parts: every part needs at least one"):
        ivfpq_build.plan_parts(3, 4)
    assert ivfpq_build.plan_parts(8, 3) == [range(0, 2), range(2, 5), range(5, 8)]


# ---- Ray Data ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray", reason="the Ray Data front end needs ray[data] (the 'distributed' extra)")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_build_equals_single_process(local_ray, tiny_images, single, tmp_path):
    from arrag_kernels.retrieval.ray_build import build_with_ray

    # 4 parts filled by 4 Ray tasks; 2 encoder actors of half a CPU each (the 2 CPUs of local Ray)
    infos = build_with_ray(tiny_images, functools.partial(tiny_janus, seed=0), tmp_path / "db", parts=WORKERS,
                           concurrency=2, num_cpus=0.5, **{k: v for k, v in BUILD.items() if k != "index"})
    assert [p.index for p in infos] == list(range(WORKERS))
    assert_equals_single(tmp_path / "db", single)
    assert not work_dir(tmp_path / "db").exists()


def test_ray_build_from_a_dataset_in_any_order(local_ray, tiny_images, tmp_path, tiny_model):
    """A ``ray.data`` dataset (id + image columns, rows in any order and blocks, as read from parquet shards) is
    grouped by chunk: the same database as the single-process build of the images in id order."""
    from arrag_kernels.retrieval.ray_build import build_with_ray

    images = tiny_images[:12]
    order = np.random.default_rng(0).permutation(len(images))
    rows = [{"id": int(i), "image": images[i].numpy()} for i in order]
    dataset = local_ray.data.from_items(rows, override_num_blocks=5)
    db = build_with_ray(dataset, functools.partial(tiny_janus, seed=0), tmp_path / "ray", parts=2, concurrency=1,
                        merge=True, **{k: v for k, v in BUILD.items() if k != "index"})
    single = ak.PatchDatabase.build(images, tiny_model, path=tmp_path / "single", **BUILD)
    assert_same_lists(db.index, single.index)
    assert torch.equal(db.values, single.values) and torch.equal(db.keys, single.keys)


def test_ray_chunk_encoder_rejects_bad_ids(tiny_images, tmp_path):
    from arrag_kernels.config import KeyLayout
    from arrag_kernels.retrieval.ray_build import _ChunkEncoder

    encoder = _ChunkEncoder(functools.partial(tiny_janus, seed=0), KeyLayout(), "latent", CHUNK, tmp_path, CHUNK, 12,
                            "id", "image")
    ids = np.array([5, 3, 4])  # a group's rows come in any order: the chunk holds them in id order
    images = tiny_images[ids].numpy()
    assert encoder({"id": ids, "image": images}) == {"chunk": [1], "entries": [3 * 42]}
    keys, values = ivfpq_build.read_chunk(tmp_path, 1)
    want_keys, want_values = encoder.encode(tiny_images[3:6])
    assert np.array_equal(keys, want_keys.numpy()) and np.array_equal(values, want_values.numpy())
    with pytest.raises(ValueError, match=r"'id': the ids of the dataset must be 0..11, each once; chunk 1 should hold "
                                         r"ids 3..5, got 3 ids \[3, 5\]"):
        encoder({"id": np.array([5, 3, 3]), "image": images})
