"""Issue 21: what a new user meets first (shipped weights kept intact, no silent NaN, flags that act)."""

import shutil

import pytest
import torch

from arrag_kernels.miniature import train as mini


# ---- item 1: training never writes into the shipped weights; the demo says which weights it runs ----
def test_training_refuses_the_shipped_weights(tmp_path, monkeypatch, capsys):
    shipped = tmp_path / "shipped"
    monkeypatch.setattr(mini, "WEIGHTS_DIR", shipped)  # a stand-in: nothing can touch the real files
    with pytest.raises(SystemExit) as e:  # --out has no default (it used to be the shipped directory)
        mini.main(["--quick"])
    assert e.value.code == 2 and "--out" in capsys.readouterr().err
    for argv in (["--quick", "--out", str(shipped)], ["--blenders-only", "--out", str(shipped / ".." / "shipped")]):
        with pytest.raises(SystemExit) as e:
            mini.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and "shipped weights directory" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(ValueError, match="shipped weights directory"):
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
