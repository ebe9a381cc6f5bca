"""CLI user errors: one line ``arrag-kernels <command>: error: ...`` and exit code 2, never a traceback
(issue 14: each test pins a failure reported against an earlier version)."""

import argparse
import re

import pytest
import torch

from arrag_kernels.cli import USER_ERROR, main
from arrag_kernels.cli.common import float_between, float_in, int_at_least, int_between


@pytest.fixture(scope="module")
def cli_db(tmp_path_factory, tiny_db):
    return str(tiny_db.save(tmp_path_factory.mktemp("cli") / "db"))


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
    assert re.search(message, lines[0]), lines[0]
    assert "weights_only=False" not in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cli_cuda_without_cuda(capsys):
    assert main(["generate", "--prompt-ids", "1,100", "--device", "cuda"]) == USER_ERROR
    assert "CUDA is not available here" in capsys.readouterr().err


def test_cli_verify_full_flag(cli_db, tmp_path, capsys):
    args = ["generate", "--prompt-ids", "1,100", "--daid", "--db", cli_db, "--k", "8", "--out", str(tmp_path / "g")]
    assert main(args + ["--verify-full"]) == 0 and (tmp_path / "g" / "daid_0.png").is_file()


@pytest.mark.parametrize("make, good, bad", [
    (lambda: int_at_least(1), {"1": 1, "7": 7}, ["0", "-3", "1.5", "1e3", "x", ""]),
    (lambda: int_between(0, 2**63 - 1), {"0": 0, str(2**63 - 1): 2**63 - 1}, ["-1", str(2**63)]),
    (lambda: float_in(0.0, True), {"1e-9": 1e-9, "2": 2.0}, ["0", "-1", "inf", "nan", "x"]),
    (lambda: float_in(1.0, False), {"1": 1.0, "5.5": 5.5}, ["0.99", "inf", "nan"]),
    (lambda: float_between(0.0, 1.0), {"0": 0.0, "1": 1.0, "0.25": 0.25}, ["-0.1", "1.01", "nan", "inf", "-inf"]),
])
def test_bounded_argument_types_accept_edges_and_reject_the_rest(make, good, bad):
    parse = make()
    for text, value in good.items():
        assert parse(text) == value and type(parse(text)) is type(value)
    for text in bad:
        with pytest.raises(argparse.ArgumentTypeError, match=f"got {re.escape(repr(text))}$"):
            parse(text)
