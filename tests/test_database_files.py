"""Database files: permissions, checksums (meta.json included, sampled pages or everything), fp16 keys on
disk, crash-safe saving (killed saves leave a loadable database and no leftovers) (issue 14: each test
pins a failure reported against an earlier version, named in its docstring)."""

import json
import os
import signal
import stat

import numpy as np
import pytest
import torch

import arrag_kernels as ak
from arrag_kernels.retrieval import storage


def test_database_files_respect_the_umask(tiny_db, tmp_path):
    """Database folders used to be created 0700 and files 0600 (mkdtemp), unreadable by other users."""
    old = os.umask(0o022)
    try:
        path = tiny_db.save(tmp_path / "shared" / "db")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o755
    assert {stat.S_IMODE(f.stat().st_mode) for f in path.iterdir()} == {0o644}


def test_meta_json_is_inside_the_checksum(tiny_db, tmp_path):
    """An edit of meta.json (border, key_source) used to load silently."""
    path = tiny_db.save(tmp_path / "db")
    meta = json.loads((path / "meta.json").read_text())
    meta["layout"]["border"] = "zero"
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ak.DatabaseError, match="does not match its own checksum: it was edited or corrupted"):
        ak.PatchDatabase.load(path)
    assert ak.PatchDatabase.load(path, verify="none").meta.layout.border == "zero"  # on request only
    (path / "meta.json").write_text("[1, 2]")
    with pytest.raises(ak.DatabaseError, match="expected a JSON object, got a JSON list"):
        ak.PatchDatabase.load(path)


def test_quick_verification_reads_sampled_pages_full_hashes_everything(tiny_model, tmp_path):
    """load() checks sizes, meta.json and 8 sampled pages by default; verify="full" hashes the whole files."""
    g = torch.Generator().manual_seed(0)
    keys = torch.nn.functional.normalize(torch.randn(40_000, 32, generator=g), dim=1)  # ~5 MiB: 6 pages of 1 MiB
    meta = ak.PatchDatabase.build(torch.zeros(1, 3, 32, 32), tiny_model, progress=False).meta
    big = ak.PatchDatabase(keys, torch.randint(0, 512, (40_000,), generator=g), meta)
    path = big.save(tmp_path / "db")
    record = json.loads((path / "meta.json").read_text())["files"]["arrays.safetensors"]
    assert record["page_size"] == 1 << 20 and len(record["pages"]) == 6
    arrays = path / "arrays.safetensors"
    data = bytearray(arrays.read_bytes())
    data[3 * (1 << 20) + 123] ^= 0x01  # one flipped bit in page 3
    arrays.write_bytes(bytes(data))
    with pytest.raises(ak.DatabaseError, match=r"page 3"):
        ak.PatchDatabase.load(path)
    with pytest.raises(ak.DatabaseError, match="does not match the checksums"):
        ak.PatchDatabase.load(path, verify="full")
    arrays.write_bytes(bytes(data[:-8]))
    with pytest.raises(ak.DatabaseError, match=r"bytes, meta.json says"):
        ak.PatchDatabase.load(path, verify="none")  # sizes are always checked
    with pytest.raises(ValueError, match="verify: expected one of"):
        ak.PatchDatabase.load(path, verify="fast")


def test_fp16_keys_stream_to_float32_on_disk(tiny_db, tmp_path):
    half = ak.PatchDatabase(tiny_db.keys.half(), tiny_db.values, tiny_db.meta)
    back = ak.PatchDatabase.load(half.save(tmp_path / "db"), verify="full")
    assert back.keys.dtype == torch.float32 and torch.equal(back.keys, tiny_db.keys.half().float())
    assert torch.equal(back.values, tiny_db.values)


def _leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if p.name != "db")


def _instrument(monkeypatch, on_step):
    """Call ``on_step(name, phase)`` before and after every file-system step of PatchDatabase.save."""

    def wrap(owner, name):
        real = getattr(owner, name)

        def step(*args, **kwargs):
            on_step(name, "before")
            out = real(*args, **kwargs)
            on_step(name, "after")
            return out

        monkeypatch.setattr(owner, name, step)

    for name in ("write_arrays", "digest_file"):
        wrap(storage, name)
    for name in ("mkdir", "replace", "fsync"):
        wrap(storage.os, name)
    wrap(storage.shutil, "rmtree")
    wrap(storage.json, "dump")


def test_killed_saves_leave_a_loadable_database_and_no_leftovers(tiny_db, tmp_path, monkeypatch):
    """SIGKILL during save used to leave full-size .NAME.tmp-* / .old-* folders that no later save removed.

    Every file-system step of a save is a kill point (before and after it): a child process saves a
    new database over the old one and SIGKILLs itself there; a kill right after the arrays are
    written first truncates them at a seeded random length (a kill in the middle of the write).
    Then the database must load (old or new, never half) and the next save must leave only it.
    """
    old, new, third = tiny_db, ak.PatchDatabase(tiny_db.keys[:50], tiny_db.values[:50], tiny_db.meta), \
        ak.PatchDatabase(tiny_db.keys[:20], tiny_db.values[:20], tiny_db.meta)
    path = tmp_path / "db"
    steps = []
    with monkeypatch.context() as m:
        old.save(path)
        _instrument(m, lambda name, phase: steps.append((name, phase)))
        new.save(path)  # a dry run counts the kill points
    assert ("replace", "after") in steps and len(steps) >= 12
    outcomes = set()
    for point in range(len(steps)):
        old.save(path)
        assert _leftovers(tmp_path) == []
        pid = os.fork()
        if pid == 0:  # the child: save `new`, kill itself at kill point `point`
            try:
                seen = []

                def maybe_kill(name, phase):
                    seen.append((name, phase))
                    if len(seen) > point:
                        if (name, phase) == ("write_arrays", "after"):
                            (arrays,) = tmp_path.glob(".db.tmp-*/arrays.safetensors")
                            size = arrays.stat().st_size
                            os.truncate(arrays, int(np.random.default_rng(point).integers(1, size)))
                        os.kill(os.getpid(), signal.SIGKILL)

                _instrument(monkeypatch, maybe_kill)
                new.save(path)
            finally:
                os._exit(3)  # not reached when killed
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"kill point {point}: {status}"
        loaded = ak.PatchDatabase.load(path)  # finishes or undoes the killed save
        assert len(loaded) in (len(old), len(new)), f"kill point {point} {steps[point]}"
        outcomes.add(len(loaded))
        assert _leftovers(tmp_path) == [], f"kill point {point} {steps[point]}: {_leftovers(tmp_path)}"
        third.save(path)
        assert _leftovers(tmp_path) == [] and len(ak.PatchDatabase.load(path, verify="full")) == len(third)
    assert outcomes == {len(old), len(new)}  # kills before the swap keep the old one, after it the new one


def test_leftovers_of_a_killed_save_are_removed_by_the_next_save(tiny_db, tmp_path):
    """Without a load in between: the next save itself removes them (and keeps directories of live owners)."""
    path = tiny_db.save(tmp_path / "db")
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)  # a pid that certainly belonged to a dead process
    host = storage.socket.gethostname()
    dead = tmp_path / f".db.tmp-{host}-{pid}-0a0b0c0d"
    live = tmp_path / f".db.tmp-{host}-{os.getppid()}-0a0b0c0d"  # pytest's parent: alive
    other_host = tmp_path / f".db.old-elsewhere-{pid}-0a0b0c0d"
    for d in (dead, live, other_host):
        d.mkdir()
        (d / "arrays.safetensors").write_bytes(b"x" * 1000)
    tiny_db.save(path)
    assert _leftovers(tmp_path) == sorted([live.name, other_host.name])
