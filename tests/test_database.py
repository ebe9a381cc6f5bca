import json

import numpy as np
import pytest
import torch

import arrag_kernels as ak
from arrag_kernels.demo import procedural_images
from arrag_kernels.models import get_adapter, tiny_janus

from .utils import write_released_database


@pytest.fixture(scope="module")
def db(tiny_model, tiny_images):
    return ak.PatchDatabase.build(tiny_images[:6], tiny_model, progress=False)


def test_build_entries_follow_official_layout(db, tiny_model, tiny_images):
    adapter = get_adapter(tiny_model)
    assert len(db) == 6 * 7 * 6  # 8x8 grid, hop-1 causal, skip borders: r in [1,7], c in [1,6]
    assert db.keys.shape == (len(db), 32) and db.values.dtype == torch.long
    # every 8-d block of a latent key has unit norm (L2-normalised per cell, all 4 cells inside)
    assert torch.allclose(db.keys.reshape(-1, 4, 8).norm(dim=-1), torch.ones(len(db), 4), atol=1e-5)
    # values are the model's own tokens of the kept target positions, in raster order
    latents, tokens = adapter.encode(tiny_images[:1])
    r, c = 1, 1
    assert db.values[0].item() == tokens[0, r, c].item()
    expected_key = torch.cat([latents[0, r - 1, c - 1], latents[0, r - 1, c], latents[0, r - 1, c + 1], latents[0, r, c - 1]])
    assert torch.allclose(db.keys[0], expected_key, atol=1e-6)


def test_codebook_keys_equal_decode_time_queries(tiny_model, tiny_images):
    db = ak.PatchDatabase.build(tiny_images[:2], tiny_model, key_source="codebook", border="zero", progress=False)
    adapter = get_adapter(tiny_model)
    _, tokens = adapter.encode(tiny_images[:2])
    flat = tokens.reshape(2, -1)
    pos = torch.arange(64).expand(2, -1)
    queries, _ = ak.ops.neighbor_keys(flat, adapter.codebook(), pos, adapter.grid, db.meta.layout)
    assert len(db) == 2 * 64
    assert torch.allclose(db.keys, queries.reshape(-1, 32), atol=1e-6)


def test_image_sources_agree(tiny_model, tmp_path):
    images = procedural_images(3, 32, seed=5)
    folder = tmp_path / "imgs"
    folder.mkdir()
    paths = []
    for i, im in enumerate(images):
        paths.append(folder / f"{i}.png")
        im.save(paths[-1])
    from_folder = ak.PatchDatabase.build(folder, tiny_model, progress=False)
    from_paths = ak.PatchDatabase.build(paths, tiny_model, progress=False)
    from_pil = ak.PatchDatabase.build(images, tiny_model, progress=False)
    assert torch.equal(from_folder.keys, from_paths.keys) and torch.equal(from_folder.keys, from_pil.keys)
    assert torch.equal(from_folder.values, from_pil.values)
    assert from_folder.meta.num_images == 3


def test_save_load_round_trip(db, tmp_path):
    path = db.save(tmp_path / "db")
    back = ak.PatchDatabase.load(path)
    assert torch.equal(back.keys, db.keys) and torch.equal(back.values, db.values)
    assert back.meta == db.meta
    # saving again over an existing database replaces it and leaves no temporary directories
    db.save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["db"]


def test_failed_save_keeps_previous_database(db, tmp_path, monkeypatch):
    path = db.save(tmp_path / "db")
    from arrag_kernels.retrieval import storage

    def crash(*a, **k):
        raise OSError("disk full")

    small = ak.PatchDatabase(db.keys[:5], db.values[:5], db.meta)
    with monkeypatch.context() as m:
        m.setattr(storage, "write_arrays", crash)
        with pytest.raises(OSError, match="disk full"):
            small.save(path)
    assert len(ak.PatchDatabase.load(path)) == len(db)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["db"]
    # a failure between moving the old database aside and moving the new one in puts the old one back
    real_replace = storage.os.replace

    def replace(src, dst):
        if ".tmp-" in str(src):
            raise OSError("rename failed")
        real_replace(src, dst)

    monkeypatch.setattr(storage.os, "replace", replace)
    with pytest.raises(OSError, match="rename failed"):
        small.save(path)
    monkeypatch.undo()
    assert len(ak.PatchDatabase.load(path)) == len(db)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["db"]


def test_failed_build_writes_nothing(tiny_model, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    procedural_images(1, 32)[0].save(folder / "ok.png")
    (folder / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read image"):
        ak.PatchDatabase.build(folder, tiny_model, progress=False)
    from arrag_kernels.cli import main

    assert main(["build-db", str(folder), "--out", str(tmp_path / "db"), "--stop-on-bad-image"]) == 2
    assert not (tmp_path / "db").exists()


def test_corrupted_files_raise_database_error(db, tmp_path):
    path = db.save(tmp_path / "db")
    arrays = path / "arrays.safetensors"
    data = bytearray(arrays.read_bytes())
    data[-3] ^= 0xFF
    arrays.write_bytes(bytes(data))
    with pytest.raises(ak.DatabaseError, match="checksum"):
        ak.PatchDatabase.load(path)
    arrays.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ak.DatabaseError, match="corrupted"):
        ak.PatchDatabase.load(path, verify=False)
    (path / "meta.json").write_text("{ truncated")
    with pytest.raises(ak.DatabaseError, match="corrupted or incomplete"):
        ak.PatchDatabase.load(path)
    with pytest.raises(ak.DatabaseError, match="not a database directory"):
        ak.PatchDatabase.load(tmp_path / "missing")


def test_bad_build_inputs(tiny_model, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        ak.PatchDatabase.build(tmp_path / "empty", tiny_model, progress=False)
    with pytest.raises(FileNotFoundError):
        ak.PatchDatabase.build(tmp_path / "nope", tiny_model, progress=False)
    with pytest.raises(ValueError, match="key_source"):
        ak.PatchDatabase.build(torch.zeros(1, 3, 32, 32), tiny_model, key_source="pixels", progress=False)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        ak.PatchDatabase.build(torch.zeros(3, 32, 32), tiny_model, progress=False)
    with pytest.raises(ak.DatabaseError, match="token ids"):
        ak.PatchDatabase(torch.zeros(2, 32), torch.tensor([0, 9999]), ak.PatchDatabase.build(
            torch.zeros(1, 3, 32, 32), tiny_model, progress=False).meta)


def test_database_for_another_model_is_refused(db):
    other = tiny_janus(seed=0, codebook_size=256)
    with pytest.raises(ak.DatabaseError, match="codebook size 512"):
        ak.patch_model(other, db, ak.DAiDConfig(k=8))
    wider = tiny_janus(seed=0, grid=6)
    with pytest.raises(ak.DatabaseError, match=r"grid \(8, 8\)"):
        ak.patch_model(wider, db, ak.DAiDConfig(k=8))
    assert not ak.is_patched(other) and not ak.is_patched(wider)


def test_meta_json_is_readable(db, tmp_path):
    meta = json.loads((db.save(tmp_path / "db") / "meta.json").read_text())
    assert meta["layout"] == {"neighborhood": "causal", "hops": [1], "border": "skip"}
    assert meta["grid"] == [8, 8] and meta["codebook_size"] == 512 and meta["num_entries"] == len(db)


# ---- released (official) databases ------------------------------------------------------------
@pytest.fixture(scope="module")
def official_dir(tmp_path_factory):
    """A released-layout database: OPQ + IVF-PQ (4 lists, 4 sub-quantizers of 8 bits) over 600 32-d
    keys, token ids in [3, 60]."""
    folder = tmp_path_factory.mktemp("official")
    write_released_database(folder, nbits=8, token_range=(3, 61))
    return folder


def test_shard_refuses_cuda_devices_the_machine_lacks(official_dir):
    """db.shard(["cuda:0", "cuda:1"]) used to be accepted on a CPU-only machine (issue 21, item 10)."""
    db = ak.PatchDatabase.from_official(official_dir, codebook_size=64)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        with pytest.raises(ValueError, match=r"shards: cuda:0, cuda:1 are not on this machine, which has 0 CUDA"):
            db.shard(["cuda:0", "cuda:1"])
    with pytest.raises(ValueError, match=rf"shards: cuda:{count} is not on this machine, which has {count} CUDA"):
        db.shard(["cuda:0", f"cuda:{count}"] if count else [f"cuda:{count}"])
    # CPU "devices" still shard (the sharding tests' way of running without a GPU): same neighbours
    queries = torch.from_numpy(np.random.default_rng(1).standard_normal((5, 32)).astype(np.float32))
    with ak.use_backend("triton"):  # the device search (the interpreter on CPU)
        want, got = db.search(queries, 7), db.shard(["cpu", "cpu"]).search(queries, 7)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_import_official_reports_facts_and_assumptions(official_dir, capsys):
    """import-official used to report grid 24 x 24 and 16,384 codes for any index as if the files said so."""
    from arrag_kernels.cli import main

    values = np.load(official_dir / "next_codes.npy")
    assert main(["import-official", str(official_dir), "--codebook-size", "64"]) == 0
    facts, assumed = capsys.readouterr().out.splitlines()
    assert facts == (f"{official_dir}: 600 entries, OPQ + IVF-PQ with 4 lists and 4 x 8-bit codes, 32-d keys, "
                     f"token ids {values.min()}..{values.max()}, nprobe 1 (set on the inner IVF)")
    assert assumed == ("assumed (the files do not store them): codebook of 64 codes, grid 24 x 24 (so about 1 images); "
                       "override with --codebook-size and --grid")
    assert main(["import-official", str(official_dir), "--codebook-size", "64", "--grid", "8", "8"]) == 0
    assert "grid 8 x 8 (so about 14 images)" in capsys.readouterr().out  # 600 entries // 42 keyed cells of 8 x 8
    db = ak.PatchDatabase.from_official(official_dir, codebook_size=64, grid=(8, 8))
    assert db.meta.grid == (8, 8) and db.meta.num_images == 14


@pytest.mark.parametrize("kind", ["flat", "ivfpq", "ivfpq-sharded"])
def test_retrieve_gathers_tokens_inside_the_search(kind, db, official_dir, monkeypatch):
    """db.retrieve on the device search: the token gather is the select kernel's (GATHER=True), the
    search's 4 launches are all there is, and the tokens are values[ids] of db.search's ids (sharded
    IVF-PQ merges first and gathers after: the same tokens)."""
    from arrag_kernels.ops._triton import ivfpq as triton_ivfpq, knn as triton_knn

    if kind != "flat":
        db = ak.PatchDatabase.from_official(official_dir, codebook_size=64, nprobe=2)
        db = db.shard(["cpu", "cpu"]) if kind == "ivfpq-sharded" else db
    module = triton_knn if kind == "flat" else triton_ivfpq
    queries = torch.from_numpy(np.random.default_rng(3).standard_normal((5, db.meta.key_dim)).astype(np.float32))
    launched, launch = [], module.launch  # (kernel name, its GATHER flag) per launch

    def recording(kernel, grid, *args, **meta):
        launched.append((getattr(kernel, "__name__", None) or kernel.fn.__name__, meta.get("GATHER")))
        launch(kernel, grid, *args, **meta)

    monkeypatch.setattr(module, "launch", recording)
    with ak.use_backend("triton"):  # the device search (the interpreter on CPU)
        dist, ids = db.search(queries, 9)
        searched = len(launched)
        got_dist, tokens = db.retrieve(queries, 9)
    assert torch.equal(got_dist, dist) and torch.equal(tokens, torch.where(ids >= 0, db.values[ids.clamp_min(0)], -1))
    selects = [gather for name, gather in launched[searched:] if name.endswith("_select_kernel")]
    assert len(launched) == 2 * searched and selects == ([False, False] if kind == "ivfpq-sharded" else [True])
