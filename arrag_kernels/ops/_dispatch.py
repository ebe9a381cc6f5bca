"""Backend selection for the public ops.

Each op owns an :class:`OpDispatcher`. Implementations register under a backend name together with
a ``check`` function that returns ``None`` when the implementation can run on the given arguments,
or a short reason why it cannot (wrong device, dtype, shape limit, extension not built).

The backend is chosen by ``ARRAG_KERNELS_BACKEND`` (``auto`` by default) or, for a block of code,
by ``with arrag_kernels.use_backend(name):``. An explicit backend that cannot run raises with its
reason; ``auto`` walks the preference order and raises, listing every backend's reason, only when
none fits.

A backend whose module is expensive to import (Triton: ``torch.library.triton_op`` pulls in
torch._inductor and torch._dynamo, seconds on a CPU machine) can be registered lazily with
:func:`register_lazy_backend`: its loader runs at the first dispatch that could use it.
"""

from __future__ import annotations

import contextlib
import os
import threading
import weakref
from typing import Callable

BACKENDS = ("reference", "triton", "cpp")
# Preference of "auto": compiled backends first, the reference last (it always runs).
_AUTO_ORDER = ("triton", "cpp", "reference")
# Names that once were backends, with what to use instead.
_REMOVED = {"cuda": "the 'cuda' backend was removed (it implemented no op): on CUDA tensors the ops run their "
                    "Triton kernels, so use 'triton', or 'auto'"}

_local = threading.local()
# backend -> loader(args, kwargs): imports the backend (registering its implementations) and returns
# None, or returns why it cannot run these arguments without importing anything.
_lazy: dict[str, Callable[..., str | None]] = {}


def register_lazy_backend(backend: str, loader: Callable[..., str | None]) -> None:
    """Defer importing ``backend``'s implementations to the first dispatch ``loader`` accepts."""
    _lazy[backend] = loader


def _check_backend_name(name: str, source: str) -> str:
    if name != "auto" and name not in BACKENDS:
        hint = f"; {_REMOVED[name]}" if name in _REMOVED else ""
        raise ValueError(f"{source}: expected 'auto' or one of {BACKENDS}, got {name!r}{hint}")
    return name


def current_backend() -> str:
    name = getattr(_local, "backend", None) or os.environ.get("ARRAG_KERNELS_BACKEND", "auto")
    return _check_backend_name(name, "ARRAG_KERNELS_BACKEND")


@contextlib.contextmanager
def use_backend(name: str):
    """Force a backend ('auto', 'reference', 'triton', 'cpp') for the ops called inside."""
    _check_backend_name(name, "use_backend")
    previous = getattr(_local, "backend", None)
    _local.backend = name
    try:
        yield
    finally:
        _local.backend = previous


class BackendUnavailable(RuntimeError):
    """No implementation of an op can run on the given arguments under the requested backend."""


class OpDispatcher:
    def __init__(self, op_name: str):
        self.op_name = op_name
        self._impls: dict[str, tuple[Callable, Callable]] = {}

    def register(self, backend: str, check: Callable[..., str | None] | None = None):
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}")

        def deco(fn):
            self._impls[backend] = (fn, check or (lambda *a, **k: None))
            return fn

        return deco

    def _reason(self, backend: str, args, kwargs) -> str | None:
        if backend not in self._impls and backend in _lazy:
            reason = _lazy[backend](args, kwargs)
            if reason is not None:
                return reason
        if backend not in self._impls:
            return "not implemented for this op"
        return self._impls[backend][1](*args, **kwargs)

    def select(self, *args, **kwargs) -> tuple[str, Callable]:
        requested = current_backend()
        if requested != "auto":
            reason = self._reason(requested, args, kwargs)
            if reason is not None:
                raise BackendUnavailable(
                    f"{self.op_name}: backend {requested!r} was requested (ARRAG_KERNELS_BACKEND or use_backend) "
                    f"but cannot run here: {reason}. Use 'auto' to fall back."
                )
            return requested, self._impls[requested][0]
        reasons = []
        for backend in _AUTO_ORDER:
            reason = self._reason(backend, args, kwargs)
            if reason is None:
                return backend, self._impls[backend][0]
            reasons.append(f"{backend}: {reason}")
        raise BackendUnavailable(f"{self.op_name}: no backend can run these inputs; " + "; ".join(reasons))

    def __call__(self, *args, **kwargs):
        return self.select(*args, **kwargs)[1](*args, **kwargs)


class TensorCache:
    """Values derived from a tensor (e.g. a database's key norms), computed at first use and kept
    while the tensor lives; recomputed if it is modified in place (its version counter changes)."""

    def __init__(self, compute: Callable):
        self._compute = compute
        self._entries: dict[int, tuple] = {}  # id(tensor) -> (stamp, value)

    def __call__(self, t):
        stamp = (t._version, t.data_ptr(), tuple(t.shape), t.dtype)
        entry = self._entries.get(id(t))
        if entry is None or entry[0] != stamp:
            if entry is None:
                weakref.finalize(t, self._entries.pop, id(t), None)
            entry = self._entries[id(t)] = (stamp, self._compute(t))
        return entry[1]
