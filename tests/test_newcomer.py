"""Issue 21: what a new user meets first (shipped weights kept intact, no silent NaN, flags that act)."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from arrag_kernels.miniature import train as mini


# ---- item 1: training never writes into the shipped weights; the demo says which weights it runs ----
def test_training_refuses_the_shipped_weights(tmp_path, monkeypatch, capsys):
    shipped = tmp_path / "shipped"
    monkeypatch.setattr(mini, "WEIGHTS_DIR", shipped)  # a stand-in: nothing can touch the real files
    with pytest.raises(SystemExit) as e:  # --out has no default (it used to be the shipped directory)
        mini.main(["--quick"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--out" in err and len(err.strip().splitlines()) == 1, err  # one line, no usage
    for argv in (["--quick", "--out", str(shipped)], ["--blenders-only", "--out", str(shipped / ".." / "shipped")]):
        with pytest.raises(SystemExit) as e:
            mini.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and "in the shipped weights directory" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(ValueError, match="in the shipped weights directory"):
        mini.train_miniature(shipped)
    assert not shipped.exists()  # refused before any work


def test_describe_weights_tells_shipped_from_other(tmp_path):
    assert mini.describe_weights() == f"{mini.WEIGHTS_DIR} (the shipped weights)"
    copy = tmp_path / "w"
    shutil.copytree(mini.WEIGHTS_DIR, copy)
    assert mini.describe_weights(copy) == f"{copy} (the shipped weights)"  # same files elsewhere
    (copy / "model.safetensors").write_bytes(b"smoke")
    line = mini.describe_weights(copy)
    assert "not the shipped weights: model.safetensors differ" in line
    assert "python -m arrag_kernels.miniature.train" in line  # meta.json's command


# ---- item 2: FAiD training in fp32 whatever the load dtype; a non-finite loss stops it ----
@pytest.fixture(scope="module")
def half_model_and_db():
    import arrag_kernels as ak
    from arrag_kernels.models import tiny_janus

    model = tiny_janus(seed=0).half()  # what from_pretrained gives for a checkpoint saved in fp16
    images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return model, ak.PatchDatabase.build(images, model, progress=False), images


def test_train_faid_on_a_half_precision_model_trains_in_fp32(half_model_and_db):
    from arrag_kernels.faid import FAiDConfig
    from arrag_kernels.faid.train import train_faid

    model, db, images = half_model_and_db
    blenders, losses = train_faid(model, db, FAiDConfig(k=4), images, torch.tensor([[1, 100]]), steps=4, lr=1e-3,
                                  train_head=True, log=lambda line: None)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    params = list(blenders.parameters())
    assert {p.dtype for p in params} == {torch.float32} and all(bool(p.isfinite().all()) for p in params)
    assert {p.dtype for p in model.parameters()} == {torch.float16}  # the model's own dtype back
    assert all(bool(p.isfinite().all()) for p in model.parameters())


def test_train_faid_stops_at_a_non_finite_loss(half_model_and_db):
    from arrag_kernels.faid import FAiDConfig
    from arrag_kernels.faid.train import NonFiniteLossError, train_faid

    model, db, images = half_model_and_db
    head = model.model.generation_head.vision_head.weight
    saved = head.detach().clone()
    try:
        with torch.no_grad():
            head[0, 0] = float("inf")
        with pytest.raises(NonFiniteLossError, match="at step 1 of 3, nothing was saved"):
            train_faid(model, db, FAiDConfig(k=4), images, torch.tensor([[1, 100]]), steps=3, log=lambda line: None)
    finally:
        with torch.no_grad():
            head.copy_(saved)
    assert issubclass(NonFiniteLossError, ValueError)  # the CLI's user error: exit 2, one line


# ---- item 9: a prompt recipe for the shipped model; the README snippet runs as written ----
def _readme_block(after: str) -> str:
    text = (Path(__file__).parents[1] / "README.md").read_text()
    start = text.index("```python\n", text.index(after)) + len("```python\n")
    return text[start : text.index("```", start)]


def test_prompt_ids_recipe():
    from arrag_kernels.miniature.data import emoji_available

    if not emoji_available():
        pytest.skip("the emoji Debian packages are not installed")
    torch.testing.assert_close(mini.prompt_ids(["face-smiling", "animal-mammal"]),
                               torch.tensor([[1, 3, 101, 100], [1, 5, 133, 100]]))
    with pytest.raises(ValueError, match="did you mean face-smiling"):
        mini.prompt_ids("face-smilng")
    with pytest.raises(ValueError, match="trained on 98"):
        mini.prompt_ids("face-smiling", num_classes=98)


def test_readme_miniature_snippet_runs_as_written():
    from arrag_kernels.miniature.data import emoji_available

    if not emoji_available():
        pytest.skip("the emoji Debian packages are not installed")
    scope = {}
    exec(_readme_block("The same on the shipped miniature model"), scope)
    assert scope["tokens"].shape == (2, 64) and scope["images"].shape == (2, 32, 32, 3)
    assert len(scope["db"]) == 116_634


# ---- item 3: "with lam = 0 tokens equal unpatched HF generate" holds for fp32 models, and says so ----
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_lam_zero_identity_and_its_dtype_condition(dtype):
    from transformers import JanusForConditionalGeneration

    import arrag_kernels as ak
    from arrag_kernels.models import hf_image_generate_kwargs

    model = JanusForConditionalGeneration.from_pretrained(mini.WEIGHTS_DIR, dtype=dtype).eval()  # shipped: fp16
    n = 32
    ids = mini.prompt_for(torch.arange(n) % 9, torch.arange(n) * 3 % 99)
    db = ak.PatchDatabase.build(torch.rand(40, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1, model,
                                progress=False)

    def generate():
        torch.manual_seed(0)
        return model.generate(ids, attention_mask=torch.ones_like(ids), generation_mode="image", do_sample=True,
                              top_k=0, guidance_scale=5.0, bos_token_id=1, pad_token_id=0,
                              generation_kwargs={"boi_token_id": 100}, **hf_image_generate_kwargs(model))

    hf = generate()
    with ak.patched(model, db, ak.DAiDConfig(lam=0.0, k=8)):
        ours = generate()
    if dtype == torch.float32:
        assert torch.equal(ours, hf)
    else:  # the same distributions, but the two KV-cached forwards round differently in fp16: samples drift
        assert 0.8 < float((ours == hf).float().mean()) < 1
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith('| `"dynamic"` (default)'))
    assert "fp32" in row and "fp16" in row  # the identity is stated with its condition


# ---- item 10: the smaller ones ----
def test_numpy_bound_to_the_tested_versions():
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    numpy = next(Requirement(r) for r in project["dependencies"] if Requirement(r).name == "numpy")
    assert "2.3.5" in numpy.specifier and "2.4.0" not in numpy.specifier


def test_decode_range_documented_as_unclamped():
    from transformers import JanusForConditionalGeneration

    model = JanusForConditionalGeneration.from_pretrained(mini.WEIGHTS_DIR, dtype=torch.float32).eval()
    tokens = torch.randint(0, 512, (8, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pixels = model.decode_image_tokens(tokens)
    assert float(pixels.min()) < -1 or float(pixels.max()) > 1  # HF's decoder does not clamp ...
    quickstart = _readme_block("## Quickstart")
    line = next(x for x in quickstart.splitlines() if x.startswith("images = model.decode_image_tokens"))
    assert "not clamped" in line  # ... and the README no longer says it returns [-1, 1]
    line = next(x for x in _readme_block("The same on the shipped miniature model").splitlines()
                if x.startswith("images = "))
    assert ".clamp(-1, 1)" in line


def test_emoji_cache_announced(tmp_path, capsys):
    from arrag_kernels.miniature.data import emoji_available, load_emoji_dataset

    if not emoji_available():
        pytest.skip("the emoji Debian packages are not installed")
    load_emoji_dataset(limit=20, cache_dir=tmp_path, progress=True)
    out = capsys.readouterr().out
    assert f"cached the rendered emoji in {tmp_path}" in out and "ARRAG_KERNELS_CACHE" in out
    load_emoji_dataset(limit=20, cache_dir=tmp_path, progress=True)  # read back: nothing new written
    assert "cached" not in capsys.readouterr().out


def test_demo_grid_is_labelled_and_its_real_block_distinct():
    from arrag_kernels.demo import real_rows, side_by_side

    prompts = torch.tensor([[1, 3, 101, 100]] * 3 + [[1, 5, 133, 100]] * 1)
    pixels = torch.linspace(-1, 0.5, 4).view(4, 1, 1, 1).expand(4, 3, 8, 8).clone()
    row_prompts, real = real_rows(prompts, pixels, rows=2, per_row=2)
    assert row_prompts.tolist() == [[1, 3, 101, 100], [1, 5, 133, 100]]
    torch.testing.assert_close(real[:3], pixels[[0, 1, 3]])  # two different images, then the second row's one
    assert bool((real[3] == 1).all())  # a white cell, not a repeat
    image = side_by_side({"real": real, "plain": real}, per_prompt=2, gap=8, scale=2)
    assert image.size == (2 * 2 * 8 * 2 + 8, 16 + 2 * 8 * 2)
    data = torch.from_numpy(np.asarray(image).copy())
    assert bool((data[:16] < 128).any())  # labels drawn in the header
    assert bool((data[16:, 32:40] == 255).all())  # the gap between the blocks is white


def test_hops_printed_as_a_set():
    from arrag_kernels.faid import FAiDConfig

    assert FAiDConfig(hops="12").hops_label == "1+2" and FAiDConfig(hops=1).hops_label == "1"


# ---- CLI: one line and exit 2 for every user error, before any work ----
def _run_cli(argv, capsys):
    from arrag_kernels.cli import main

    try:
        code = main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip()


def _one_line_error(code, err, command, match):
    import re

    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"arrag-kernels {command}: error: "), err
    assert re.search(match, lines[0]), lines[0]


# ---- item 4: the demo's flags act on the miniature demo or are refused there ----
def test_demo_flags_act_or_are_refused(monkeypatch, capsys):
    import arrag_kernels.demo as demo
    from arrag_kernels.miniature.data import emoji_available

    if not emoji_available():
        pytest.skip("the emoji Debian packages are not installed (the miniature demo cannot run)")
    calls = []
    monkeypatch.setattr(demo, "run_miniature_demo", lambda **kw: calls.append(kw) or {})
    monkeypatch.setattr(demo, "run_demo", lambda **kw: calls.append(("random", kw)) or {})
    for flag in (["--grid", "4"], ["--images", "8"], ["--batch", "2"], ["--device", "meta"]):
        code, _, err = _run_cli(["demo", *flag], capsys)
        _one_line_error(code, err, "demo", f"{flag[0]}.*only the random-weight demo takes this")
    assert calls == []
    assert _run_cli(["demo", "--lam", "0.3", "--k", "16", "--seed", "2", "--out", "x"], capsys)[0] == 0
    assert calls.pop() == {"out": "x", "seed": 2, "lam": 0.3, "k": 16}
    assert _run_cli(["demo", "--random-weights", "--grid", "4", "--batch", "2"], capsys)[0] == 0
    assert calls.pop() == ("random", {"out": "demo_out", "seed": 0, "device": "cpu", "grid": 4, "batch": 2})
    _one_line_error(*_run_cli(["demo", "--lam", "1.5"], capsys)[::2], "demo", r"--lam: expected a number in \[0.0, 1.0\]")


# ---- items 5 and 8: build-db says which model it builds for; bad images skipped and listed, or stop ----
def test_build_db_model_warning_and_bad_images(tmp_path, capsys):
    import arrag_kernels as ak
    from arrag_kernels.demo import procedural_images

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, im in enumerate(procedural_images(3, 32)):
        im.save(folder / f"{i}.png")
    (folder / "broken.png").write_bytes(b"not an image")
    (folder / "truncated.png").write_bytes((folder / "0.png").read_bytes()[: len((folder / "0.png").read_bytes()) // 2])
    code, out, err = _run_cli(["build-db", str(folder), "--out", str(tmp_path / "db")], capsys)
    assert code == 0
    assert "warning: no --model given: building for the random tiny test model" in err
    assert "skipped 2 unreadable of 5 images" in out and "broken.png" in out and "truncated.png" in out
    assert len(ak.PatchDatabase.load(tmp_path / "db")) == 3 * 42
    code, _, err = _run_cli(["build-db", str(folder), "--out", str(tmp_path / "db2"), "--model", "tiny",
                             "--stop-on-bad-image"], capsys)
    _one_line_error(code, err, "build-db", r"cannot read image .*broken.png.*2 unreadable: broken.png, truncated.png")
    assert not (tmp_path / "db2").exists()
    code, _, err = _run_cli(["build-db", str(folder), "--out", str(tmp_path / "db3"), "--hops", "x"], capsys)
    _one_line_error(code, err, "build-db", "hops")  # checked before the model loads or an image is read


# ---- item 5: a database built by another model is refused by the CLI, not only warned about ----
def test_cli_refuses_a_database_of_another_codebook(tmp_path, capsys):
    import arrag_kernels as ak
    from arrag_kernels.demo import procedural_images
    from arrag_kernels.models import tiny_janus

    other = ak.PatchDatabase.build(procedural_images(2, 32), tiny_janus(seed=1))  # same shapes, other codebook
    other.save(tmp_path / "other_db")
    capsys.readouterr()  # the build's progress bar
    for argv in (["generate", "--prompt-ids", "1,5,6,100", "--daid", "--k", "4", "--out", str(tmp_path / "g")],
                 ["train-faid", "--images", str(tmp_path / "imgs"), "--out", str(tmp_path / "b.safetensors"),
                  "--k", "4", "--steps", "1"]):
        if argv[0] == "train-faid":
            (tmp_path / "imgs").mkdir()
            procedural_images(2, 32)[0].save(tmp_path / "imgs" / "0.png")
        code, _, err = _run_cli(argv + ["--db", str(tmp_path / "other_db")], capsys)
        _one_line_error(code, err, argv[0], "different VQ codebook .* build the database with this model")
    assert not (tmp_path / "g").exists() and not (tmp_path / "b.safetensors").exists()


# ---- item 6: generate takes the blenders train-faid writes ----
@pytest.fixture(scope="module")
def trained_cli_files(tmp_path_factory):
    from arrag_kernels.cli import main
    from arrag_kernels.demo import procedural_images

    root = tmp_path_factory.mktemp("faid_cli")
    (root / "imgs").mkdir()
    for i, im in enumerate(procedural_images(4, 32)):
        im.save(root / "imgs" / f"{i}.png")
    assert main(["build-db", str(root / "imgs"), "--out", str(root / "db"), "--model", "tiny"]) == 0
    assert main(["train-faid", "--db", str(root / "db"), "--images", str(root / "imgs"), "--out",
                 str(root / "b.safetensors"), "--k", "4", "--steps", "1", "--batch-size", "2", "--train-head"]) == 0
    return root


def test_generate_with_trained_blenders(trained_cli_files, tmp_path, capsys):
    root = trained_cli_files
    base = ["generate", "--prompt-ids", "1,5,6,100", "--db", str(root / "db"), "--out", str(tmp_path)]
    assert _run_cli(base + ["--faid", str(root / "b.safetensors"), "--finetuned",
                            str(root / "b.finetuned.safetensors")], capsys)[0] == 0
    assert _run_cli(base + ["--faid", str(root / "b.safetensors"), "--daid", "--k", "8"], capsys)[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["daid_faid_0.png", "faid_0.png"]
    for extra, match in ((["--faid", str(root / "missing.safetensors")], "--faid: .* is not a file"),
                         (["--lam", "0.2"], "--lam set DAiD and act only with --daid"),
                         ([], "--db is read only with --daid or --faid"),
                         (["--daid", "--tau", "0"], "--tau: expected a number > 0.0")):
        code, _, err = _run_cli(base + extra, capsys)
        _one_line_error(code, err, "generate", match)
    code, _, err = _run_cli(["generate", "--prompt-ids", "1,100", "--faid", str(root / "b.safetensors")], capsys)
    _one_line_error(code, err, "generate", "--faid needs --db PATH")


# ---- item 7: exit 2 with one line for every user error, checked before any work ----
def test_convert_errors_are_one_line(trained_cli_files, tmp_path, capsys):
    webp = tmp_path / "x.webp"
    webp.write_bytes(b"RIFF\x00\x00\x00\x00WEBPVP8 ")
    base = ["--out", str(tmp_path / "o.safetensors"), "--num-layers", "2", "--hidden-size", "64"]
    code, _, err = _run_cli(["convert", str(webp), *base], capsys)
    _one_line_error(code, err, "convert", r"cannot read '.*x.webp' as a checkpoint")
    code, _, err = _run_cli(["convert", str(trained_cli_files / "b.safetensors"), *base], capsys)
    _one_line_error(code, err, "convert", "already an arrag_kernels blender file .* no convert needed")
    code, _, err = _run_cli(["convert", str(webp), *base[:-1], "0"], capsys)
    _one_line_error(code, err, "convert", "argument --hidden-size: expected an integer >= 1")
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("extra, match", [
    (["--batch", "0"], "argument --batch-size: expected an integer >= 1, got '0'"),
    (["--lora-rank", "-1"], "argument --lora-rank: expected an integer >= 0, got '-1'"),
    (["--lr", "nan"], "argument --lr: expected a number > 0.0, got 'nan'"),
    (["--k", "0"], r"argument --k: expected an integer in \[1, 2048\]"),
    (["--k", "500"], r"--k 500 is larger than the database \(168 entries\)"),
    (["--hops", "5"], "FAiDConfig.hops"),
    (["--prompt-ids", "1,x"], "--prompt-ids: expected comma-separated integers"),
    (["--finetuned-out", "f.safetensors"], "--finetuned-out: nothing to write"),
], ids=["batch-0", "lora-negative", "lr-nan", "k-0", "k-too-large", "hops", "prompt-ids", "finetuned-out"])
def test_train_faid_refuses_bad_arguments_before_loading(extra, match, trained_cli_files, tmp_path, monkeypatch,
                                                         capsys):
    import arrag_kernels.cli.faid as faid_cli

    monkeypatch.setattr(faid_cli, "load_model", lambda *a: pytest.fail("the model was loaded before the check"))
    root = trained_cli_files
    argv = ["train-faid", "--db", str(root / "db"), "--images", str(root / "imgs"), "--out",
            str(tmp_path / "b.safetensors"), *extra]
    code, _, err = _run_cli(argv, capsys)
    _one_line_error(code, err, "train-faid", match)
    assert not (tmp_path / "b.safetensors").exists()


def test_train_faid_non_finite_loss_exits_2_and_writes_nothing(trained_cli_files, tmp_path, monkeypatch, capsys):
    import arrag_kernels.cli.faid as faid_cli
    from arrag_kernels.cli.common import load_model

    def broken_model(spec, device):
        model, processor = load_model(spec, device)
        with torch.no_grad():
            model.model.generation_head.vision_head.weight[0, 0] = float("nan")
        return model, processor

    monkeypatch.setattr(faid_cli, "load_model", broken_model)
    root = trained_cli_files
    code, _, err = _run_cli(["train-faid", "--db", str(root / "db"), "--images", str(root / "imgs"), "--out",
                             str(tmp_path / "b.safetensors"), "--k", "4", "--steps", "2"], capsys)
    _one_line_error(code, err, "train-faid", "training stopped: the loss is nan at step 1 of 2, nothing was saved")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("extra, match", [
    (["--k", "0"], r"argument --k: expected an integer in \[1, 2048\]"),
    (["--lams", "2"], r"argument --lams: expected comma-separated numbers in \[0, 1\]"),
    (["--cfg", "0"], "argument --cfg: expected a number >= 1.0"),
    (["--taus", "0.3,-1"], "argument --taus: expected comma-separated numbers > 0"),
    (["--seeds", "0,x"], "argument --seeds: expected comma-separated integers"),
    (["--weights", "{tmp}"], "--weights: .* holds no trained miniature model"),
], ids=["k-0", "lams-2", "cfg-0", "taus", "seeds", "weights"])
def test_eval_refuses_bad_arguments_before_work(extra, match, tmp_path, monkeypatch, capsys):
    import arrag_kernels.miniature.evaluate as evaluate

    monkeypatch.setattr(evaluate, "evaluate_miniature", lambda **kw: pytest.fail("the evaluation started"))
    code, _, err = _run_cli(["eval", "--out", str(tmp_path / "out"), *[a.format(tmp=tmp_path) for a in extra]], capsys)
    _one_line_error(code, err, "eval", match)
    assert not (tmp_path / "out").exists()


def test_no_command_writes_into_the_shipped_weights(trained_cli_files, tmp_path, monkeypatch, capsys):
    shipped = tmp_path / "shipped"
    shutil.copytree(mini.WEIGHTS_DIR, shipped)
    monkeypatch.setattr(mini, "WEIGHTS_DIR", shipped)  # a stand-in: a regression cannot touch the real files
    before = {p.name: p.read_bytes() for p in shipped.iterdir()}
    root = trained_cli_files
    for argv in (["train-faid", "--db", str(root / "db"), "--images", str(root / "imgs"), "--out",
                  str(shipped / "blenders.safetensors"), "--steps", "1"],
                 ["build-db", str(root / "imgs"), "--out", str(shipped / "db")],
                 ["generate", "--prompt-ids", "1,100", "--out", str(shipped)],
                 ["convert", str(root / "b.safetensors"), "--out", str(tmp_path / "o.safetensors"), "--base-out",
                  str(shipped / "model.safetensors"), "--num-layers", "2", "--hidden-size", "64"],
                 ["demo", "--out", str(shipped / "demo")], ["eval", "--out", str(shipped)]):
        code, _, err = _run_cli(argv, capsys)
        _one_line_error(code, err, argv[0], "in the shipped weights directory")
    assert {p.name: p.read_bytes() for p in shipped.iterdir()} == before


def test_prompt_ids_and_output_paths_checked(tmp_path, capsys):
    code, _, err = _run_cli(["generate", "--prompt-ids", "1,99999", "--out", str(tmp_path / "g")], capsys)
    _one_line_error(code, err, "generate", r"--prompt-ids: expected ids in \[0, 255\]")  # was an IndexError traceback
    (tmp_path / "f").write_text("a file")
    for argv in (["generate", "--prompt-ids", "1,100", "--out", str(tmp_path / "f")],
                 ["demo", "--out", str(tmp_path / "f")], ["eval", "--out", str(tmp_path / "f")]):
        code, _, err = _run_cli(argv, capsys)
        _one_line_error(code, err, argv[0], "is a file; expected a directory")
    code, _, err = _run_cli(["convert", str(tmp_path / "f"), "--out", str(tmp_path), "--num-layers", "2",
                             "--hidden-size", "64"], capsys)
    _one_line_error(code, err, "convert", "is a directory; expected a file name")
    assert not (tmp_path / "g").exists()


# ---- review follow-ups: checks before work, in the CLI and in the one retriever ----
def test_build_db_reads_the_images_before_loading_the_model(tmp_path, monkeypatch, capsys):
    import arrag_kernels.cli.database as database_cli

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the image folder was checked")

    monkeypatch.setattr(database_cli, "load_model", no_load)
    (tmp_path / "empty").mkdir()
    code, _, err = _run_cli(["build-db", str(tmp_path / "empty"), "--model", "tiny", "--out", str(tmp_path / "db")],
                            capsys)
    _one_line_error(code, err, "build-db", "holds no images")


def test_seeds_beyond_what_torch_takes_are_refused_at_parse(tmp_path, capsys):
    code, _, err = _run_cli(["generate", "--prompt-ids", "1,100", "--seed", str(2**64 + 1), "--out", str(tmp_path)],
                            capsys)
    _one_line_error(code, err, "generate", r"argument --seed: expected an integer in \[0, ")


def test_retriever_refuses_k_above_the_search_limit_and_absent_devices():
    import arrag_kernels as ak
    from arrag_kernels.ops.knn import MAX_K
    from arrag_kernels.retrieval.query import Retriever

    n = MAX_K + 100
    db = ak.PatchDatabase.from_keys(torch.randn(n, 32), torch.randint(0, 16, (n,)), codebook_size=16, embed_dim=8,
                                    grid=(4, 4))
    codebook = torch.nn.functional.normalize(torch.randn(16, 8), dim=-1)
    with pytest.raises(ValueError, match=f"DAiDConfig.k = {MAX_K + 1}: the search returns at most k = {MAX_K}"):
        Retriever(db, MAX_K + 1, codebook, setting="DAiDConfig.k")
    assert Retriever(db, MAX_K, codebook).k == MAX_K
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device cuda: this machine has 0 CUDA device"):
            Retriever(db, 4, codebook, device="cuda")
