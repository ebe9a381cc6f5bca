"""Bad inputs get one clear error, killed saves leave nothing behind, corrupt files are refused (issue 14).

Each test reproduces a failure reported against an earlier version (named in its docstring) and pins
the fixed behaviour.
"""

import json
import os
import signal
import stat

import numpy as np
import pytest
import torch

import arrag_kernels as ak
from arrag_kernels.cli import USER_ERROR, main
from arrag_kernels.demo import procedural_images
from arrag_kernels.faid import FAiDConfig
from arrag_kernels.models import get_adapter, tiny_janus_config, tiny_prompt_ids
from arrag_kernels.retrieval import storage
from arrag_kernels.retrieval.images import pil_to_tensor


@pytest.fixture(scope="module")
def db(tiny_model, tiny_images):
    return ak.PatchDatabase.build(tiny_images[:4], tiny_model, progress=False)


# ---- configs and arguments --------------------------------------------------------------------
@pytest.mark.parametrize("make, message", [
    (lambda: ak.DAiDConfig(k=2.5), "DAiDConfig.k: expected an int, got float 2.5"),
    (lambda: ak.DAiDConfig(k="16"), "DAiDConfig.k: expected an int, got str '16'"),
    (lambda: ak.DAiDConfig(lam="0.5"), "DAiDConfig.lam: expected a number, got str '0.5'"),
    (lambda: ak.DAiDConfig(tau=None), "DAiDConfig.tau: expected a number, got NoneType"),
    (lambda: FAiDConfig(hops=1.5), r"FAiDConfig.hops: expected an int, an iterable of ints or digits like '12', got 1.5"),
    (lambda: FAiDConfig(k=True), "FAiDConfig.k: expected an int, got bool"),
    (lambda: ak.KeyLayout(hops=[1, 2.0]), "hops: expected an int"),
], ids=["k-float", "k-str", "lam-str", "tau-none", "hops-float", "faid-k-bool", "layout-hops-float"])
def test_configs_check_types_on_construction(make, message):
    """Used to be accepted (failing 19 frames deep in generate) or to say "'float' object is not iterable"."""
    with pytest.raises(TypeError, match=message):
        make()


def test_configs_normalise_valid_numbers():
    cfg = ak.DAiDConfig(lam=np.float32(0.25), tau=1, k=np.int64(16))
    assert (cfg.lam, cfg.tau, cfg.k) == (0.25, 1.0, 16) and type(cfg.k) is int and type(cfg.lam) is float
    assert FAiDConfig(hops="12").hops == (1, 2) and FAiDConfig(hops=np.int64(2)).hops == (2,)


def test_patch_model_with_a_path_instead_of_a_database(tiny_model):
    """Used to raise AttributeError from inside the sampler."""
    with pytest.raises(TypeError, match=r"db: expected an arrag_kernels.PatchDatabase, got str; load it first: "
                                        r"arrag_kernels.PatchDatabase.load\('some/db'\)"):
        ak.patch_model(tiny_model, "some/db", ak.DAiDConfig())
    assert not ak.is_patched(tiny_model)


def test_num_image_tokens_mismatch_raises_only_for_image_generation(db):
    """transformers' own Janus test config has num_image_tokens != grid**2: patch_model(model) used to raise
    even with no database and for text generation."""
    from transformers import JanusForConditionalGeneration

    config = tiny_janus_config()
    config.vision_config.num_image_tokens = 49  # the VQ grid is 8x8
    model = JanusForConditionalGeneration(config).eval()
    ids = tiny_prompt_ids(1)
    with ak.patched(model):
        out = model.generate(ids, max_new_tokens=2, do_sample=False, bos_token_id=1, pad_token_id=0)
        assert out.shape == (1, ids.shape[1] + 2)
        with pytest.raises(ValueError, match=r"num_image_tokens = 49 .* 8x8 grid \(64 tokens\); set "
                                             r"vision_config.num_image_tokens = 64"):
            model.generate(ids, generation_mode="image", bos_token_id=1, pad_token_id=0,
                           generation_kwargs={"boi_token_id": 100})
    with pytest.raises(ValueError, match="num_image_tokens = 49"):
        ak.patch_model(model, db, ak.DAiDConfig(k=8))
    assert not ak.is_patched(model)


def test_guidance_below_one_is_refused_in_patched_generate(tiny_model, db):
    """guidance_scale in (0, 1) used to reach HF's unbatched CFG processor (no model given) and fail deep inside."""
    ids = tiny_prompt_ids(1)
    with ak.patched(tiny_model, db, ak.DAiDConfig(k=8)):
        with pytest.raises(ValueError, match=r"guidance_scale must be >= 1 for image generation \(1: no CFG\), got 0.5"):
            tiny_model.generate(ids, generation_mode="image", guidance_scale=0.5, bos_token_id=1, pad_token_id=0,
                                generation_kwargs={"boi_token_id": 100})


# ---- database building --------------------------------------------------------------------------
def test_vq_encodes_at_its_own_input_size(tiny_images):
    """A VQ that downsamples 2x under a vision tower of patch 4: images used to be resized to the vision
    tower's 32 px, encoded into a 16x16 latent grid and stored as if it were the 8x8 generation grid."""
    config = tiny_janus_config(grid=8, patch_size=4)
    config.vq_config.channel_multiplier = [1, 2]  # one downsampling: 2x
    from transformers import JanusForConditionalGeneration

    torch.manual_seed(0)
    model = JanusForConditionalGeneration(config).eval()
    adapter = get_adapter(model)
    assert adapter.grid == (8, 8) and adapter.image_size == 16 and config.vision_config.image_size == 32
    db = ak.PatchDatabase.build(tiny_images[:2], model, progress=False)
    assert len(db) == 2 * 7 * 6  # the 8x8 grid's official entries, not a 16x16 grid's
    small = torch.nn.functional.interpolate(tiny_images[:1], size=(16, 16), mode="bicubic", align_corners=False)
    latents, tokens = adapter.encode(small.clamp(-1, 1))
    assert latents.shape[1:3] == (8, 8) and db.values[0] == tokens[0, 1, 1]
    with pytest.raises(ValueError, match=r"onto a 16x16 latent grid, expected \(8, 8\); encode images of 16x16"):
        adapter.encode(tiny_images[:1])


IMAGE_MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F"]


def _in_mode(rgb, mode):
    """``rgb`` (an 8-bit RGB PIL image) in ``mode``; high-depth modes hold the luma on their own scale."""
    from PIL import Image

    if mode == "I;16":
        return Image.fromarray((np.asarray(rgb.convert("L"), dtype=np.uint16) * 257))
    if mode == "I":
        return Image.fromarray((np.asarray(rgb.convert("L"), dtype=np.int32) * 257))
    if mode == "F":
        return Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.float32) / 255.0)
    return rgb.convert(mode)


@pytest.mark.parametrize("mode", IMAGE_MODES)
def test_image_modes_convert_without_saturation(mode):
    """A 16-bit ramp (I;16) used to come out 97% white from convert("RGB")."""
    rgb = procedural_images(1, 40, seed=3)[0]
    image = _in_mode(rgb, mode)
    assert image.mode == mode
    got = pil_to_tensor(image, 32)
    # expected: Pillow's own 8-bit conversion of the same picture (grey levels for the grey modes)
    grey = mode in ("1", "L", "LA", "I;16", "I", "F")
    expected = pil_to_tensor(rgb.convert("1" if mode == "1" else "L") if grey else image.convert("RGB"), 32)
    assert got.shape == (3, 32, 32) and got.min() >= -1 and got.max() <= 1
    assert (got - expected).abs().max() < 3 / 127.5, f"{mode}: max error {(got - expected).abs().max():.4f}"


def test_ramp_16_bit_is_not_saturated():
    from PIL import Image

    ramp = Image.fromarray(np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16))
    assert ramp.mode == "I;16"
    t = pil_to_tensor(ramp, 32)
    assert abs(t.mean().item()) < 0.01 and (t > 0.99).float().mean() < 0.05


def test_building_from_files_of_every_mode(tiny_model, tmp_path):
    """One database from a folder holding every mode (TIFF for the modes PNG cannot store)."""
    rgb = procedural_images(len(IMAGE_MODES), 32, seed=4)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, (mode, im) in enumerate(zip(IMAGE_MODES, rgb)):
        suffix = ".tif" if mode in ("CMYK", "I", "F") else ".png"
        _in_mode(im, mode).save(folder / f"{i:02d}{suffix}")
    built = ak.PatchDatabase.build(folder, tiny_model, progress=False)
    assert built.meta.num_images == len(IMAGE_MODES) and len(built) == len(IMAGE_MODES) * 42


def test_nan_keys_are_rejected(tiny_model, db):
    """NaN keys used to be stored; every later distance to them is NaN."""
    images = torch.zeros(2, 3, 32, 32)
    images[1, :, 5, 5] = float("nan")
    with pytest.raises(ak.DatabaseError, match=r"keys of images 0..1: row \d+ holds NaN or inf"):
        ak.PatchDatabase.build(images, tiny_model, progress=False)
    keys = db.keys.clone()
    keys[7, 3] = float("nan")
    with pytest.raises(ak.DatabaseError, match="keys: row 7 holds NaN or inf"):
        ak.PatchDatabase(keys, db.values, db.meta)


# ---- saving and loading -------------------------------------------------------------------------
def test_database_files_respect_the_umask(db, tmp_path):
    """Database folders used to be created 0700 and files 0600 (mkdtemp), unreadable by other users."""
    old = os.umask(0o022)
    try:
        path = db.save(tmp_path / "shared" / "db")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o755
    assert {stat.S_IMODE(f.stat().st_mode) for f in path.iterdir()} == {0o644}


def test_meta_json_is_inside_the_checksum(db, tmp_path):
    """An edit of meta.json (border, key_source) used to load silently."""
    path = db.save(tmp_path / "db")
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


def test_fp16_keys_stream_to_float32_on_disk(db, tmp_path):
    half = ak.PatchDatabase(db.keys.half(), db.values, db.meta)
    back = ak.PatchDatabase.load(half.save(tmp_path / "db"), verify="full")
    assert back.keys.dtype == torch.float32 and torch.equal(back.keys, db.keys.half().float())
    assert torch.equal(back.values, db.values)


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


def test_killed_saves_leave_a_loadable_database_and_no_leftovers(db, tmp_path, monkeypatch):
    """SIGKILL during save used to leave full-size .NAME.tmp-* / .old-* folders that no later save removed.

    Every file-system step of a save is a kill point (before and after it): a child process saves a
    new database over the old one and SIGKILLs itself there; a kill right after the arrays are
    written first truncates them at a seeded random length (a kill in the middle of the write).
    Then the database must load (old or new, never half) and the next save must leave only it.
    """
    old, new, third = db, ak.PatchDatabase(db.keys[:50], db.values[:50], db.meta), \
        ak.PatchDatabase(db.keys[:20], db.values[:20], db.meta)
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


def test_leftovers_of_a_killed_save_are_removed_by_the_next_save(db, tmp_path):
    """Without a load in between: the next save itself removes them (and keeps directories of live owners)."""
    path = db.save(tmp_path / "db")
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
    db.save(path)
    assert _leftovers(tmp_path) == sorted([live.name, other_host.name])


# ---- FAISS indexes ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_official(tmp_path_factory):
    """A small released-layout database: OPQ + IVF-PQ (4 lists, m 4, 4 bits) over 600 keys, 64 codes."""
    faiss = pytest.importorskip("faiss")
    from arrag_kernels.retrieval.faiss_index import make_ivfpq_index

    rng = np.random.default_rng(0)
    keys = rng.standard_normal((600, 32)).astype(np.float32)
    index = make_ivfpq_index(32, 4, m=4, nbits=4, opq=True)
    index.train(keys)
    index.add(keys)
    folder = tmp_path_factory.mktemp("official")
    faiss.write_index(index, str(folder / "faiss_ivf_pq_opq.index"))
    np.save(folder / "next_codes.npy", rng.integers(0, 64, 600).astype(np.int32))
    return folder, index


def _write_case(folder, tmp_path, index_bytes, name):
    case = tmp_path / name
    case.mkdir()
    (case / "faiss_ivf_pq_opq.index").write_bytes(bytes(index_bytes))
    (case / "next_codes.npy").write_bytes((folder / "next_codes.npy").read_bytes())
    return case


def test_corrupt_faiss_indexes_are_rejected_on_import(small_official, tmp_path):
    """Flipped bytes used to import (and re-save with fresh checksums); retrieval then raised a bare
    IndexError or returned -1 tokens. One set bit is cleared at a time (in every nonzero byte of the
    first 64, then at 200 positions drawn with a fixed seed): the import either refuses the file
    with a DatabaseError or gives an index whose search is well formed. Only set bits are cleared:
    a size field that grows makes faiss.read_index itself allocate the claimed size before any check
    can run (one flipped bit of the OPQ matrix size: 17 GB, 32 s), see README Limitations."""
    folder, _ = small_official
    data = (folder / "faiss_ivf_pq_opq.index").read_bytes()
    queries = torch.from_numpy(np.random.default_rng(1).standard_normal((8, 32)).astype(np.float32))
    rejected, accepted = 0, 0
    case = _write_case(folder, tmp_path, data, "case")
    drawn = np.random.default_rng(0).choice(np.flatnonzero(np.frombuffer(data, np.uint8)[64:]) + 64, 200, replace=False)
    for pos in [*range(64), *sorted(int(p) for p in drawn)]:
        if data[pos] == 0:
            continue
        bad = bytearray(data)
        bad[pos] &= bad[pos] - 1  # clear the lowest set bit
        (case / "faiss_ivf_pq_opq.index").write_bytes(bytes(bad))
        try:
            imported = ak.PatchDatabase.from_official(case, nprobe=4, codebook_size=64)
        except ak.DatabaseError:
            rejected += 1
            continue
        accepted += 1
        dist, tokens = imported.retrieve(queries, 10)
        assert bool(((tokens >= 0) & (tokens < 64)).all()) and bool(torch.isfinite(dist).all()), f"byte {pos}"
    assert rejected >= 30 and accepted >= 100, (rejected, accepted)  # 38 and 189: headers, sizes, ids vs. floats, codes


def test_faiss_content_checks_name_the_problem(small_official, tmp_path):
    faiss = pytest.importorskip("faiss")
    from arrag_kernels.retrieval.faiss_index import inner_ivfpq

    folder, index = small_official

    def corrupted(edit, name):
        copy = faiss.deserialize_index(faiss.serialize_index(index))
        edit(copy, inner_ivfpq(copy))
        return _write_case(folder, tmp_path, faiss.serialize_index(copy).tobytes(), name)

    def nan_codebook(idx, ivf):
        centroids = faiss.vector_to_array(ivf.pq.centroids)
        centroids[5] = np.nan
        faiss.copy_array_to_vector(centroids, ivf.pq.centroids)

    def duplicate_id(idx, ivf):
        ids = faiss.rev_swig_ptr(ivf.invlists.get_ids(0), ivf.invlists.list_size(0))
        ids[1] = ids[0]

    def id_out_of_range(idx, ivf):
        faiss.rev_swig_ptr(ivf.invlists.get_ids(1), ivf.invlists.list_size(1))[0] = 600

    def nan_opq(idx, ivf):
        vt = faiss.downcast_VectorTransform(idx.chain.at(0))
        a = faiss.vector_to_array(vt.A)
        a[0] = np.inf
        faiss.copy_array_to_vector(a, vt.A)

    cases = [(nan_codebook, "PQ codebooks holds NaN or inf"), (duplicate_id, r"ids must be 0..599 each exactly once"),
             (id_out_of_range, r"inverted list 1 holds id 600, expected ids in \[0, 600\)"),
             (nan_opq, "pre-transform 0 matrix holds NaN or inf")]
    for i, (edit, message) in enumerate(cases):
        with pytest.raises(ak.DatabaseError, match=message):
            ak.PatchDatabase.from_official(corrupted(edit, f"case{i}"), codebook_size=64)
        assert main(["import-official", str(tmp_path / f"case{i}"), "--codebook-size", "64",
                     "--out", str(tmp_path / f"out{i}")]) == USER_ERROR
        assert not (tmp_path / f"out{i}").exists()  # nothing re-saved with fresh checksums


# ---- messages -----------------------------------------------------------------------------------
def test_search_and_nprobe_messages_say_what_is_wrong(db, small_official):
    """search(k=0) used to say "larger than the database"; nprobe 0 "exceeds nlist"."""
    queries = torch.zeros(2, 32)
    with pytest.raises(ValueError, match=r"k: expected an int >= 1 neighbours per query, got 0"):
        db.search(queries, 0)
    with pytest.raises(ValueError, match=rf"k = {len(db) + 1} is larger than the database"):
        db.search(queries, len(db) + 1)
    folder, _ = small_official
    with pytest.raises(ak.DatabaseError, match=r"nprobe: expected 1 <= nprobe <= nlist = 4 .*got 0"):
        ak.PatchDatabase.from_official(folder, nprobe=0, codebook_size=64)


def test_daid_sampler_rejects_nan_logits_and_distances():
    """NaN logits or distances into the C++ sampler used to return token 0 / NaN probabilities."""
    from arrag_kernels.ops import daid_sample, use_backend
    from arrag_kernels._ext import HAS_EXT

    g = torch.Generator().manual_seed(0)
    B, V, K = 3, 97, 5
    logits, dist = torch.randn(2 * B, V, generator=g), torch.rand(B, K, generator=g)
    tokens, active, u = torch.randint(0, V, (B, K), generator=g), torch.ones(B, dtype=torch.bool), torch.rand(B, generator=g)
    nan_logits, nan_dist = logits.clone(), dist.clone()
    nan_logits[4, 10] = float("nan")
    nan_dist[1, 2] = float("nan")
    masked = logits.clone()
    masked[:, 3] = float("-inf")  # masked tokens stay allowed
    for backend in ["reference"] + (["cpp"] if HAS_EXT else []):
        with use_backend(backend):
            kw = dict(guidance_scale=5.0, lam=0.5, tau=0.6)
            daid_sample(masked, dist, tokens, active, u, **kw)
            with pytest.raises(ValueError, match="daid_sample: logits row 4 holds NaN"):
                daid_sample(nan_logits, dist, tokens, active, u, **kw)
            with pytest.raises(ValueError, match=r"daid_sample: retrieved distance \(1, 2\) is NaN"):
                daid_sample(logits, nan_dist, tokens, active, u, **kw)
            pad = tokens.clone()
            pad[1, 2] = -1  # a padded hit's distance is never read
            daid_sample(logits, nan_dist, pad, active, u, **kw)


# ---- command line -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cli_db(tmp_path_factory, db):
    return str(db.save(tmp_path_factory.mktemp("cli") / "db"))


@pytest.mark.parametrize("args, message", [
    (["generate", "--prompt-ids", "1,100", "--num-images", "0"], "argument --num-images: expected an integer >= 1, got '0'"),
    (["generate", "--prompt-ids", "1,100", "--cfg", "0"], r"argument --cfg: expected a number >= 1.0 \(1 = no guidance\)"),
    (["generate", "--prompt-ids", "1,100", "--temperature", "0"], "argument --temperature: expected a number > 0.0"),
    (["generate", "--prompt-ids", "1,x"], "--prompt-ids: expected comma-separated integers"),
    (["generate", "--prompt-ids", "1,100", "--device", "nonsense"], "--device: expected a torch device"),
    (["generate", "--prompt-ids", "1,100", "--daid", "--db", "{db}"], r"--k 2048 is larger than the database \(168 entries\); pass --k 168 or less"),
    (["build-db", "{tmp}", "--out", "{tmp}/db", "--batch-size", "0"], "argument --batch-size: expected an integer >= 1"),
    (["generate", "--prompt-ids", "1,100", "--model", "{tmp}"], "holds no Hugging Face checkpoint"),
    (["convert", "{tmp}/not_a_checkpoint.bin", "--out", "{tmp}/o.safetensors", "--num-layers", "2", "--hidden-size", "64"],
     r"cannot read '.*not_a_checkpoint.bin' as a checkpoint: expected a .safetensors file or a torch.save file"),
    (["convert", "{tmp}/not_a_checkpoint.safetensors", "--out", "{tmp}/o.safetensors", "--num-layers", "2",
      "--hidden-size", "64"], r"cannot read '.*not_a_checkpoint.safetensors' as a checkpoint"),
], ids=["num-images-0", "cfg-0", "temperature-0", "prompt-ids", "device", "k-default", "batch-size-0", "model-folder",
        "convert-bin", "convert-safetensors"])
def test_cli_user_errors_are_one_line_with_one_exit_code(args, message, tmp_path, cli_db, capsys):
    """These used to end in tracebacks, with exit codes 1 or 2 for the same kind of error."""
    for name in ("not_a_checkpoint.bin", "not_a_checkpoint.safetensors"):
        (tmp_path / name).write_bytes(b"garbage, not a checkpoint")
    args = [a.format(tmp=tmp_path, db=cli_db) for a in args]
    try:
        code = main(args)
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err
    assert code == USER_ERROR, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("arrag-kernels"), err
    assert __import__("re").search(message, lines[0]), lines[0]
    assert "weights_only=False" not in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cli_cuda_without_cuda(capsys):
    assert main(["generate", "--prompt-ids", "1,100", "--device", "cuda"]) == USER_ERROR
    assert "CUDA is not available here" in capsys.readouterr().err


def test_cli_verify_full_flag(cli_db, tmp_path, capsys):
    args = ["generate", "--prompt-ids", "1,100", "--daid", "--db", cli_db, "--k", "8", "--out", str(tmp_path / "g")]
    assert main(args + ["--verify-full"]) == 0 and (tmp_path / "g" / "daid_0.png").is_file()


# ---- IVF-PQ build reporting ---------------------------------------------------------------------
def test_resumed_ivfpq_build_says_what_is_done(tiny_model, tiny_images, tmp_path, capsys):
    """Training used to print nothing for minutes between two bars, and a resumed build said nothing."""
    pytest.importorskip("faiss")
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
