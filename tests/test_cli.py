import subprocess
import sys

import pytest

import arrag_kernels as ak
from arrag_kernels.cli import main
from arrag_kernels.demo import procedural_images, run_demo
from arrag_kernels.models import tiny_janus


def test_demo_end_to_end(tmp_path, capsys):
    results = run_demo(out=tmp_path, grid=8, num_images=8, batch=2, k=16)
    out = capsys.readouterr().out
    assert results["plain_equals_hf"] is True
    assert "DAiD overhead" in out
    assert len(list((tmp_path / "images").glob("*.png"))) == 4
    assert len(ak.PatchDatabase.load(tmp_path / "db")) == 8 * 7 * 6  # 8x8 grid: r in [1, 7], c in [1, 6]


def test_build_db_then_generate_with_daid(tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, im in enumerate(procedural_images(4, 32)):
        im.save(folder / f"{i}.png")
    assert main(["build-db", str(folder), "--out", str(tmp_path / "db"), "--hops", "1"]) == 0
    db = ak.PatchDatabase.load(tmp_path / "db")
    assert len(db) == 4 * 42
    args = ["generate", "--prompt-ids", "1,5,6,100", "--prompt-ids", "1,7,8,100", "--out", str(tmp_path / "gen"),
            "--daid", "--db", str(tmp_path / "db"), "--k", "16", "--lam", "0.5"]
    assert main(args) == 0
    assert sorted(p.name for p in (tmp_path / "gen").iterdir()) == ["daid_0.png", "daid_1.png"]


def test_generate_from_local_checkpoint(tmp_path, capsys):
    model = tiny_janus(seed=0)
    model.save_pretrained(tmp_path / "ckpt")
    assert main(["generate", "--model", str(tmp_path / "ckpt"), "--prompt-ids", "1,9,100", "--greedy",
                 "--out", str(tmp_path / "gen")]) == 0
    assert (tmp_path / "gen" / "plain_0.png").is_file()
    assert main(["generate", "--model", str(tmp_path / "ckpt"), "--prompt", "a cat", "--out", str(tmp_path / "gen")]) == 2
    assert "needs a tokenizer" in capsys.readouterr().err


def test_cli_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["build-db", str(tmp_path / "empty"), "--out", str(tmp_path / "db")]) == 2
    assert "holds no images" in capsys.readouterr().err
    assert main(["generate", "--prompt-ids", "1,100", "--daid"]) == 2
    assert "needs --db" in capsys.readouterr().err


def test_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "arrag_kernels", "--help"], capture_output=True, text=True, check=True)
    assert "demo" in out.stdout and "build-db" in out.stdout and "generate" in out.stdout


def test_every_command_module_adds_its_commands():
    """The package's command modules, each adding its own subcommands to the one parser."""
    import argparse

    from arrag_kernels.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert list(sub.choices) == ["demo", "build-db", "merge-db", "import-official", "generate", "train-faid", "convert", "eval"]
    assert {p.get_default("func").__module__ for p in sub.choices.values()} == {
        f"arrag_kernels.cli.{m}" for m in ("demo", "database", "generate", "faid", "evaluate")}


def test_model_directories_load_by_model_type(tmp_path, capsys, monkeypatch):
    """--model DIR goes through the factory registered for config.json's model_type (not a Janus class)."""
    from arrag_kernels.models import ADAPTERS, load_pretrained

    (tmp_path / "config.json").write_text('{"model_type": "nobody"}')
    with pytest.raises(ValueError, match=r"no adapter is registered for model_type 'nobody' \(registered: .*'janus'"):
        load_pretrained(tmp_path)
    assert main(["generate", "--model", str(tmp_path), "--prompt-ids", "1,100"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("arrag-kernels generate: error: --model: checkpoint"), err
    monkeypatch.setitem(ADAPTERS, "nobody", lambda model: None)  # a factory without load_pretrained
    from arrag_kernels.demo import procedural_images

    (tmp_path / "imgs").mkdir()
    procedural_images(1, 32)[0].save(tmp_path / "imgs" / "0.png")  # build-db reads the images before the model
    assert main(["build-db", str(tmp_path / "imgs"), "--model", str(tmp_path), "--out", str(tmp_path / "db")]) == 2
    err = capsys.readouterr().err
    assert "does not implement arrag_kernels.models.PretrainedLoader: missing load_pretrained()" in err
