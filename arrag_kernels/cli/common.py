"""What the command modules (and the miniature trainer's command line) share: the one-line-error parser,
the user-error message, argument validators, the device check and ``load_model``."""

from __future__ import annotations

import argparse
import math
import pickle
from pathlib import Path

USER_ERROR = 2


def user_error_message(e: BaseException, input_file=None) -> str | None:
    """The one-line message of a user error, None for anything else (a bug: let it raise). ``input_file``
    names the file a checkpoint error is about."""
    from safetensors import SafetensorError

    if isinstance(e, SystemExit):
        return e.code if isinstance(e.code, str) else None
    if isinstance(e, (pickle.UnpicklingError, SafetensorError)):  # never echo torch's advice to unpickle anything
        what = repr(input_file or "the input file")
        return (f"cannot read {what} as a checkpoint: expected a .safetensors file or a torch.save file holding only "
                f"tensors ({type(e).__name__})")
    if isinstance(e, (ValueError, OSError, ImportError)):
        lines = str(e).strip().splitlines()
        return lines[0] if lines else type(e).__name__
    return None


class UserErrorParser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block) and the library's user-error exit code."""

    def error(self, message):
        self.exit(USER_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _bounded(convert, noun: str, low, high=None, low_open: bool = False, hint: str = ""):
    """An argparse ``type``: ``convert(text)`` (int or float; floats must be finite) > ``low`` (``low_open``) or
    >= ``low``, and <= ``high`` when given; ``hint`` goes in the error."""
    bound = f"in [{low}, {high}]" if high is not None else f"{'>' if low_open else '>='} {low}{hint}"

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        ok = (value is not None and not (isinstance(value, float) and not math.isfinite(value))
              and (value > low if low_open else value >= low) and (high is None or value <= high))
        if not ok:
            raise argparse.ArgumentTypeError(f"expected {noun} {bound}, got {text!r}")
        return value

    return parse


def int_at_least(low: int):
    """An argparse ``type``: an integer >= ``low``."""
    return _bounded(int, "an integer", low)


def int_between(low: int, high: int):
    """An argparse ``type``: an integer in [``low``, ``high``]."""
    return _bounded(int, "an integer", low, high)


def float_in(low: float, low_open: bool, hint: str = ""):
    """An argparse ``type``: a finite number > ``low`` (``low_open``) or >= ``low``; ``hint`` goes in the error."""
    return _bounded(float, "a number", low, low_open=low_open, hint=hint)


def float_between(low: float, high: float):
    """An argparse ``type``: a number in [``low``, ``high``]."""
    return _bounded(float, "a number", low, high)


def seed(text: str) -> int:
    """An argparse ``type``: a random seed torch accepts (0 .. 2^63 - 1)."""
    return int_between(0, 2**63 - 1)(text)


def retrieval_k(text: str) -> int:
    """An argparse ``type``: retrieved neighbours per step, 1 .. the search ops' largest k (2048)."""
    from arrag_kernels.ops.knn import MAX_K

    return int_between(1, MAX_K)(text)


def _output(text: str, want_dir: bool) -> str:
    from arrag_kernels.miniature.train import check_not_shipped

    try:
        check_not_shipped(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    path = Path(text)
    if want_dir and path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a file; expected a directory to write into")
    if not want_dir and path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a directory; expected a file name (e.g. {path / 'out.safetensors'})")
    return text


def output_dir(text: str) -> str:
    """An argparse ``type`` for an output directory: not a file, not the shipped miniature weights (read-only)."""
    return _output(text, want_dir=True)


def output_file(text: str) -> str:
    """An argparse ``type`` for an output file: not a directory, not in the shipped miniature weights."""
    return _output(text, want_dir=False)


def check_prompt_ids(ids, model) -> None:
    """Raise ValueError unless every prompt id is a row of the model's input embedding table (a model
    that does not expose it through transformers' ``get_input_embeddings`` is not checked here)."""
    try:
        vocab = model.get_input_embeddings().num_embeddings
    except (AttributeError, NotImplementedError):
        return
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise ValueError(f"--prompt-ids: expected ids in [0, {vocab - 1}] (the model's vocabulary), got "
                         f"{int(ids.min())} .. {int(ids.max())}")


def check_device(spec: str) -> None:
    """Raise ValueError unless ``spec`` names a torch device that exists on this machine."""
    import torch

    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device: expected a torch device such as cpu, cuda or cuda:1, got {spec!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {spec}: CUDA is not available here (torch.cuda.is_available() is False); "
                             "use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def check_model_spec(spec: str, device: str) -> None:
    """Raise ValueError for a ``--model`` that is neither ``tiny`` nor a directory, or a ``--device`` this
    machine lacks: what can be checked before any work."""
    check_device(device)
    if spec != "tiny" and not Path(spec).is_dir():
        raise ValueError(f"--model: expected 'tiny' or a local checkpoint directory, got {spec!r} (not a directory)")


def load_model(spec: str, device: str):
    """``(model, encode_prompts or None)`` for ``--model``: ``tiny`` (the embedded random model) or a local
    checkpoint directory of a registered family whose adapter factory can load one (``load_pretrained``:
    Janus; :func:`arrag_kernels.models.load_pretrained`)."""
    from arrag_kernels.models import load_pretrained, tiny_janus

    check_model_spec(spec, device)
    if spec == "tiny":
        return tiny_janus(seed=0).to(device), None
    try:
        return load_pretrained(spec, device)
    except ValueError as e:
        raise ValueError(f"--model: {e}") from e
