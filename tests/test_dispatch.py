"""Backend selection (``ARRAG_KERNELS_BACKEND`` / ``use_backend``) and the backend registry."""

import importlib
import sys

import pytest

from arrag_kernels import ops
from arrag_kernels.ops import BACKENDS, BackendUnavailable, current_backend, use_backend
from arrag_kernels.ops._dispatch import OpDispatcher


def _dispatchers():
    """Every op's dispatcher (the ops' modules are shadowed by same-named functions in ``ops``)."""
    modules = [importlib.import_module(f"arrag_kernels.ops.{name}") for name in ("daid", "faid", "ivfpq", "knn",
                                                                                  "neighborhood")]
    return [v for m in modules for v in vars(m).values() if isinstance(v, OpDispatcher)]


def test_every_backend_implements_an_op():
    """No dead slot: each name in BACKENDS backs some op (Triton's register when first needed)."""
    for backend in BACKENDS:
        assert backend in ops._dispatch._lazy or any(backend in d._impls for d in _dispatchers()), backend


def test_removed_cuda_backend_is_an_error_saying_what_to_use(monkeypatch):
    """'cuda' was a backend name that no op implemented: an explicit request now fails clearly."""
    monkeypatch.setenv("ARRAG_KERNELS_BACKEND", "cuda")
    with pytest.raises(ValueError, match=r"ARRAG_KERNELS_BACKEND: expected 'auto' or one of \('reference', 'triton', "
                                         r"'cpp'\), got 'cuda'; the 'cuda' backend was removed .* use 'triton', or 'auto'"):
        current_backend()
    monkeypatch.delenv("ARRAG_KERNELS_BACKEND")
    with pytest.raises(ValueError, match=r"use_backend: .* got 'cuda'; the 'cuda' backend was removed"):
        with use_backend("cuda"):
            pass
    with pytest.raises(ValueError, match=r"use_backend: expected 'auto' or one of .* got 'gpu'$"):
        with use_backend("gpu"):
            pass


def test_unimportable_triton_is_the_reason_of_every_op(monkeypatch):
    """Without triton a forced "triton" backend names the import error for every op's dispatcher."""
    monkeypatch.setitem(sys.modules, "arrag_kernels.ops._triton", None)  # `import` raises ImportError
    monkeypatch.delattr(ops, "_triton", raising=False)
    monkeypatch.setattr(ops._dispatch, "_lazy", dict(ops._dispatch._lazy))
    for d in _dispatchers():  # as if the Triton modules had never registered (they may have, on a GPU)
        monkeypatch.setattr(d, "_impls", {b: impl for b, impl in d._impls.items() if b != "triton"})
    reason = ops._import_triton()
    assert reason.startswith("triton is not importable")
    with use_backend("triton"):
        for d in _dispatchers():
            with pytest.raises(BackendUnavailable, match=rf"{d.op_name}: backend 'triton' was requested .* triton is "
                                                         "not importable"):
                d.select()
