"""On-disk IVF-PQ databases (retrieval/ondisk.py): parts merged on disk, loaded by PatchDatabase.load,
searched by faiss-cpu with the same hits as the one-piece index; device searches refused; the merge
atomic; the IO_FLAG_MMAP crash of faiss-cpu 1.15.1 reproduced and avoided."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("faiss")

import faiss  # noqa: E402

import arrag_kernels as ak  # noqa: E402
from arrag_kernels.ops import use_backend  # noqa: E402
from arrag_kernels.retrieval import ondisk, parts  # noqa: E402
from arrag_kernels.retrieval.faiss_index import INDEX_FILE, VALUES_FILE  # noqa: E402
from arrag_kernels.retrieval.meta import DatabaseError  # noqa: E402
from tests import scale_build as sb  # noqa: E402

CFG = sb.Config(entries=6_000, parts=4, nlist=16, chunk=500, train_size=4_000, queries=24, k=32, nprobe=4,
                opq_iterations=4)


def _make_parts(cfg, work):
    faiss.omp_set_num_threads(1)
    work.mkdir(parents=True, exist_ok=True)
    (work / "config.json").write_text(json.dumps(sb.asdict(cfg)))
    sb.step_train(cfg, work)
    for r in range(cfg.parts):
        sb.step_part(cfg, work, r)
    sb.step_publish(cfg, work)
    return work / "parts"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(parts dir, merged on-disk database dir, one-piece faiss index, its values)."""
    work = tmp_path_factory.mktemp("ondisk")
    parts_dir = _make_parts(CFG, work)
    merged = ondisk.merge_parts(parts_dir, work / "merged")
    index, values = sb.one_piece(CFG, work)
    return parts_dir, merged, index, values


def _queries(n=CFG.queries, seed=3):
    return torch.randn(n, sb.DIM, generator=torch.Generator().manual_seed(seed))


def test_merged_database_has_the_one_piece_hits(built):
    parts_dir, merged, index, values = built
    db = ak.PatchDatabase.load(merged)
    in_memory = parts.merge_in_memory(parts_dir)
    assert len(db) == CFG.entries and db.meta.num_images == CFG.entries and db.meta.part is None
    assert ondisk.lists_on_disk(db.index) and not ondisk.lists_on_disk(in_memory.index)
    q = _queries()
    for nprobe in (1, 4, CFG.nlist):
        db.set_nprobe(nprobe)
        in_memory.set_nprobe(nprobe)
        faiss.extract_index_ivf(index).nprobe = nprobe
        dist, ids = db.search(q, CFG.k)
        want_dist, want_ids = index.search(q.numpy(), CFG.k)
        np.testing.assert_array_equal(ids.numpy(), want_ids)
        np.testing.assert_array_equal(dist.numpy(), want_dist)
        mem_dist, mem_ids = in_memory.search(q, CFG.k)
        assert torch.equal(ids, mem_ids) and torch.equal(dist, mem_dist)
        _, tokens = db.retrieve(q, CFG.k)
        assert tokens.dtype == torch.int64
        np.testing.assert_array_equal(tokens.numpy(), np.where(want_ids >= 0, values[np.maximum(want_ids, 0)], -1))


def test_values_stay_memory_mapped_and_meta_records_it(built):
    _, merged, _, values = built
    db = ak.PatchDatabase.load(merged)
    assert db.values.dtype == torch.int32  # the mapped file itself, not an int64 copy
    np.testing.assert_array_equal(db.values.numpy(), values)
    raw = json.loads((merged / "meta.json").read_text())
    assert raw[ondisk.ON_DISK] == {"lists_file": ondisk.LISTS_FILE, "value_range": [int(values.min()), int(values.max())]}
    assert set(raw["files"]) == {INDEX_FILE, ondisk.LISTS_FILE, VALUES_FILE}
    # the index file holds the quantizers and the list table, the lists file every code and id
    assert (merged / ondisk.LISTS_FILE).stat().st_size == CFG.entries * (sb.M + 8)
    assert (merged / INDEX_FILE).stat().st_size < (merged / ondisk.LISTS_FILE).stat().st_size


def test_moved_directory_loads_from_any_working_directory(built, tmp_path, monkeypatch):
    _, merged, index, _ = built
    moved = tmp_path / "elsewhere" / "db"
    shutil.copytree(merged, moved)
    monkeypatch.chdir(tmp_path)
    db = ak.PatchDatabase.load(moved)
    db.set_nprobe(CFG.nlist)
    faiss.extract_index_ivf(index).nprobe = CFG.nlist
    np.testing.assert_array_equal(db.search(_queries(), 8)[1].numpy(), index.search(_queries().numpy(), 8)[1])
    assert not (tmp_path / ondisk.LISTS_FILE).exists()


_MMAP_SEARCH = """
import sys, faiss, numpy as np
index = faiss.read_index(sys.argv[1], faiss.IO_FLAG_MMAP | faiss.IO_FLAG_ONDISK_SAME_DIR)
faiss.extract_index_ivf(index).nprobe = 4
index.search(np.ones((4, 32), dtype=np.float32), 8)
print("searched")
"""
_LIBRARY_SEARCH = """
import sys, torch, arrag_kernels as ak
db = ak.PatchDatabase.load(sys.argv[1])
print("searched", db.search(torch.ones(4, 32), 8)[1].shape)
"""


def test_faiss_mmap_path_crashes_and_load_avoids_it(built):
    """faiss-cpu 1.15.1: an on-disk index read with IO_FLAG_MMAP crashes when searched (issue 25); the
    library's load of the same directory, in the same kind of fresh process, searches it."""
    _, merged, _, _ = built

    def run(code, path):
        return subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=300)

    ours = run(_LIBRARY_SEARCH, merged)
    assert ours.returncode == 0 and "searched" in ours.stdout, ours.stderr[-2000:]
    theirs = run(_MMAP_SEARCH, merged / INDEX_FILE)
    if faiss.__version__ != "1.15.1":
        pytest.skip(f"the crash was seen with faiss-cpu 1.15.1, this is {faiss.__version__} (exit {theirs.returncode})")
    assert theirs.returncode < 0 and "searched" not in theirs.stdout  # killed by a signal (SIGSEGV)


def test_device_searches_are_refused(built, tmp_path):
    _, merged, _, _ = built
    db = ak.PatchDatabase.load(merged)
    with pytest.raises(ValueError, match="on disk.*CPU queries only"):
        db.to("cuda")
    with pytest.raises(ValueError, match="sharding over.*on disk"):
        db.shard(["cpu", "cpu"])
    with use_backend("triton"), pytest.raises(ValueError, match="'triton' backend.*on disk"):
        db.search(_queries(2), 4)
    with pytest.raises(ValueError, match="not re-saved; copy or move its directory"):
        db.save(tmp_path / "copy")
    assert not (tmp_path / "copy").exists()
    assert db.to("cpu").search(_queries(2), 4)[1].shape == (2, 4)  # the CPU is fine


def test_retriever_on_the_cpu_uses_an_ondisk_database(built):
    parts_dir, merged, _, _ = built
    codebook = torch.nn.functional.normalize(torch.randn(sb.CODEBOOK, sb.DIM // 4,
                                                         generator=torch.Generator().manual_seed(0)), dim=-1)
    tokens = torch.randint(0, sb.CODEBOOK, (2, 24 * 24), generator=torch.Generator().manual_seed(1))
    tokens[:, 300:] = -1
    got = ak.retrieval.query.Retriever(ak.PatchDatabase.load(merged), 8, codebook, device="cpu").retrieve(tokens, 300)
    want = ak.retrieval.query.Retriever(parts.merge_in_memory(parts_dir), 8, codebook, device="cpu").retrieve(tokens, 300)
    assert torch.equal(got.tokens, want.tokens) and torch.equal(got.distances, want.distances)


def _leftovers(path):
    return sorted(p.name for p in path.parent.glob(f".{path.name}.*"))


def test_failed_merge_leaves_the_previous_database_and_no_temporary_files(built, tmp_path, monkeypatch):
    parts_dir, merged, _, _ = built
    out = tmp_path / "db"
    shutil.copytree(merged, out)
    before = ak.PatchDatabase.load(out).search(_queries(), 8)
    broken = tmp_path / "parts"
    shutil.copytree(parts_dir, broken)
    shutil.rmtree(broken / parts.part_dir_name(2))
    with pytest.raises(DatabaseError, match="part 2.*missing"):
        ondisk.merge_parts(broken, out)

    def disk_full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ondisk, "_write_values", disk_full)  # fails after the lists file is written
    with pytest.raises(OSError, match="No space left"):
        ondisk.merge_parts(parts_dir, out)
    assert _leftovers(out) == []
    after = ak.PatchDatabase.load(out, verify="full").search(_queries(), 8)
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_merge_replaces_an_existing_database(built, tmp_path):
    parts_dir, merged, _, _ = built
    out = tmp_path / "db"
    ak.PatchDatabase.from_keys(torch.randn(10, sb.DIM), torch.zeros(10, dtype=torch.long), sb.CODEBOOK,
                               sb.DIM // 4, grid=(24, 24)).save(out)
    assert ondisk.merge_parts(parts_dir, out) == out
    assert len(ak.PatchDatabase.load(out)) == CFG.entries and _leftovers(out) == []
    with pytest.raises(ValueError, match="another directory than the parts"):
        ondisk.merge_parts(parts_dir, parts_dir)


def test_truncated_or_mismatched_lists_file_is_an_error_not_a_crash(built, tmp_path):
    _, merged, _, _ = built
    out = tmp_path / "db"
    shutil.copytree(merged, out)
    lists = out / ondisk.LISTS_FILE
    os.truncate(lists, lists.stat().st_size - 1000)
    with pytest.raises(DatabaseError, match="does not match the checksums"):
        ak.PatchDatabase.load(out)
    raw = json.loads((out / "meta.json").read_text())
    raw["files"][ondisk.LISTS_FILE]["size"] = lists.stat().st_size  # a meta.json edited to agree, not checked:
    (out / "meta.json").write_text(json.dumps(raw))
    with pytest.raises(DatabaseError, match="list table does not fit"):
        ak.PatchDatabase.load(out, verify="none")  # the list table is still checked before the file is mapped
    shutil.copy(merged / ondisk.LISTS_FILE, lists)
    raw = json.loads((merged / "meta.json").read_text())
    raw[ondisk.ON_DISK]["value_range"] = [0, sb.CODEBOOK]
    (out / "meta.json").write_text(json.dumps(raw))
    with pytest.raises(DatabaseError, match=r"token ids 0\.\.16384 recorded"):
        ak.PatchDatabase.load(out, verify="none")


@pytest.mark.parametrize("on_disk", [True, False], ids=["on-disk", "in-memory"])
def test_merge_db_command(built, tmp_path, capsys, on_disk):
    """``arrag-kernels merge-db PARTS --out DIR [--on-disk]``: the merged database has the one-piece index's
    hits; bad input (no parts there, a missing part, the parts' own directory) is one line, exit 2, nothing
    written."""
    from arrag_kernels.cli import main

    parts_dir, _, index, _ = built
    out = tmp_path / "merged"
    flags = ["--on-disk"] if on_disk else []
    assert main(["merge-db", str(parts_dir), "--out", str(out), "--verify", "full", *flags]) == 0
    assert f"to {out}" in capsys.readouterr().out
    db = ak.PatchDatabase.load(out)
    assert ondisk.lists_on_disk(db.index) == on_disk and len(db) == CFG.entries
    q = _queries()
    db.set_nprobe(4)
    faiss.extract_index_ivf(index).nprobe = 4
    want_dist, want_ids = index.search(q.numpy(), CFG.k)
    dist, ids = db.search(q, CFG.k)
    np.testing.assert_array_equal(ids.numpy(), want_ids)
    np.testing.assert_array_equal(dist.numpy(), want_dist)

    broken = tmp_path / "broken"
    shutil.copytree(parts_dir, broken)
    shutil.rmtree(broken / parts.part_dir_name(1))
    for argv, message in [([str(tmp_path / "nothing")], "parts.json"), ([str(broken)], "part 1"),
                          ([str(parts_dir), "--verify", "some"], "invalid choice")]:
        target = tmp_path / "not-written"
        assert main(["merge-db", *argv, "--out", str(target), *flags]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and message in err and not target.exists(), (argv, err)
    for inside in (parts_dir, parts_dir / parts.part_dir_name(0)):  # the parts, or one of them, replaced
        assert main(["merge-db", str(parts_dir), "--out", str(inside), *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "another directory than the parts" in err
    parts.check_parts(parts_dir, "full")  # untouched
