"""The C++ extension's kernels as the ``cpp`` backend of the ops, and its standalone CUDA k-selection.

Imported by :mod:`arrag_kernels.ops`; registers an implementation with each op's dispatcher whose
``check`` explains why it cannot run (extension not built, tensor not on the CPU, dtype). Each
kernel is a ``torch.library.custom_op`` (``arrag_kernels::*_cpp``) with a fake implementation, so
``torch.compile`` traces through it; eager calls skip the op wrapper (whose first call imports
torch._dynamo, ~1.5 s on a CPU machine) and run the same implementation directly. Tensors cross into
``_C`` as zero-copy numpy views, so the extension does not depend on torch's C++ ABI.

Exact search prepares each keys tensor once: blocks of 256 keys transposed, with their norms
(``_C.knn_prepare``, as much memory again as the keys), kept while the keys tensor lives and
rebuilt if it is modified in place. Searching then streams that layout; transposing every block
and recomputing norms on every call was most of the time at 1-16 queries.
"""

from __future__ import annotations

import torch

from .._ext import _C, CUDA_EXT_ERROR, EXT_ERROR, HAS_CUDA_EXT, HAS_EXT
from ._dispatch import TensorCache
from .daid import daid_sample_dispatcher
from .knn import knn_dispatcher, with_values
from .neighborhood import neighbor_keys_dispatcher


def _np(t: torch.Tensor, dtype: torch.dtype | None = None):
    t = t.detach()
    if dtype is not None:
        t = t.to(dtype)
    return t.contiguous().numpy()


def _call(op, impl, *args):
    """The registered op while torch.compile traces, else its implementation directly."""
    return op(*args) if torch.compiler.is_compiling() else impl(*args)


def _unavailable(*tensors: torch.Tensor) -> str | None:
    if not HAS_EXT:
        return f"C++ extension unavailable: {EXT_ERROR}"
    for t in tensors:
        if t.device.type != "cpu":
            return f"input on {t.device}; the C++ kernels run on CPU tensors"
    return None


def _check_neighbor_keys(tokens, codebook, positions, grid, layout):
    reason = _unavailable(tokens, codebook, positions)
    if reason is None and codebook.dtype != torch.float32:
        reason = f"codebook is {codebook.dtype}; the C++ kernel takes float32"
    return reason


def _neighbor_keys_impl(
    tokens: torch.Tensor, codebook: torch.Tensor, positions: torch.Tensor, offsets: torch.Tensor, height: int, width: int, border_skip: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    keys, valid = _C.neighbor_keys(_np(tokens, torch.int64), _np(codebook), _np(positions, torch.int64), height, width, _np(offsets), border_skip)
    return torch.from_numpy(keys), torch.from_numpy(valid)


_neighbor_keys_op = torch.library.custom_op("arrag_kernels::neighbor_keys_cpp", mutates_args=())(_neighbor_keys_impl)


@_neighbor_keys_op.register_fake
def _(tokens, codebook, positions, offsets, height, width, border_skip):
    B, P = positions.shape
    keys = codebook.new_empty(B, P, offsets.shape[0] * codebook.shape[1])
    return keys, torch.empty(B, P, dtype=torch.bool, device=codebook.device)


@neighbor_keys_dispatcher.register("cpp", check=_check_neighbor_keys)
def neighbor_keys_cpp(tokens, codebook, positions, grid, layout):
    squeeze = positions.dim() == 1
    offsets = torch.tensor(layout.offsets, dtype=torch.int32)
    keys, valid = _call(_neighbor_keys_op, _neighbor_keys_impl, tokens, codebook, positions.reshape(positions.shape[0], -1),
                        offsets, grid[0], grid[1], layout.border == "skip")
    if squeeze:
        keys, valid = keys[:, 0], valid[:, 0]
    return keys, valid


def _check_knn(queries, keys, k, values=None):
    reason = _unavailable(queries, keys)
    if reason is None and keys.dtype not in (torch.float32, torch.float16):
        reason = f"keys are {keys.dtype}; the C++ kernel takes float32 or float16"
    return reason


# The blocked layout of each keys tensor (see the module docstring), prepared at its first search.
_blocked_keys = TensorCache(lambda keys: _C.knn_prepare(_np(keys)))


def _knn_impl(queries: torch.Tensor, keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    blocked, norms = _blocked_keys(keys)
    dist, ids = _C.knn_blocked(_np(queries, torch.float32), blocked, norms, keys.shape[0], k)
    return torch.from_numpy(dist), torch.from_numpy(ids)


_knn_op = torch.library.custom_op("arrag_kernels::knn_cpp", mutates_args=())(_knn_impl)


@_knn_op.register_fake
def _(queries, keys, k):
    Q = queries.shape[0]
    return queries.new_empty(Q, k, dtype=torch.float32), queries.new_empty(Q, k, dtype=torch.int64)


@knn_dispatcher.register("cpp", check=_check_knn)
def knn_cpp(queries, keys, k, values=None):
    return with_values(*_call(_knn_op, _knn_impl, queries, keys, k), values)


def _check_daid_sample(logits, dist, tokens, active, uniforms, *, guidance_scale, temperature, lam, tau, dedup,
                       top_k=0, top_p=1.0):
    return _unavailable(*(t for t in (logits, dist, tokens, active, uniforms) if t is not None))


def _daid_sample_impl(
    logits: torch.Tensor,
    dist: torch.Tensor,
    tokens: torch.Tensor,
    active: torch.Tensor,
    uniforms: torch.Tensor | None,
    guidance_scale: float | None,
    temperature: float,
    lam: float,
    tau: float,
    dedup: str,
    top_k: int = 0,
    top_p: float = 1.0,
) -> torch.Tensor:
    out = _C.daid_sample(
        _np(logits, torch.float32), _np(dist, torch.float32), _np(tokens, torch.int64), _np(active, torch.bool),
        None if uniforms is None else _np(uniforms, torch.float32),
        guidance_scale=0.0 if guidance_scale is None else guidance_scale, temperature=temperature, lam=lam, tau=tau,
        dedup=dedup, cfg=guidance_scale is not None, top_k=top_k, top_p=top_p,
    )
    return torch.from_numpy(out)


_daid_sample_op = torch.library.custom_op("arrag_kernels::daid_sample_cpp", mutates_args=())(_daid_sample_impl)


@_daid_sample_op.register_fake
def _(logits, dist, tokens, active, uniforms, guidance_scale, temperature, lam, tau, dedup, top_k=0, top_p=1.0):
    return torch.empty(dist.shape[0], dtype=torch.int64, device=dist.device)


@daid_sample_dispatcher.register("cpp", check=_check_daid_sample)
def daid_sample_cpp(logits, dist, tokens, active, uniforms, *, guidance_scale, temperature, lam, tau, dedup,
                    top_k=0, top_p=1.0):
    return _call(_daid_sample_op, _daid_sample_impl, logits, dist, tokens, active, uniforms, guidance_scale, temperature,
                 lam, tau, dedup, top_k, top_p)


def cuda_kselect(dist: torch.Tensor, ids: torch.Tensor | None, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k smallest (distance, id) pairs of each row, sorted, on the GPU (CUDA kernel of the extension).

    A standalone op of the extension, not a backend: no public op calls it (exact k-NN on CUDA
    tensors runs the Triton kernels, :mod:`arrag_kernels.ops._triton.knn`). Its tests check it
    against a sort; no GPU measurement has shown where it would beat the Triton selection.

    Args:
        dist: (Q, C) float32 CUDA tensor of candidate distances (e.g. per-block candidate lists).
        ids: (Q, C) int64 CUDA tensor of their ids, or None for the column index.
        k: 1 <= k <= min(2048, C).

    Returns:
        (Q, k) float32 distances ascending (NaN ordered as +inf) and (Q, k) int64 ids; equal
        distances are ordered by smaller id. Runs on the current CUDA stream.
    """
    if not HAS_CUDA_EXT:
        raise RuntimeError(f"cuda_kselect: the CUDA kernels are unavailable: {CUDA_EXT_ERROR}")
    if dist.dim() != 2 or dist.dtype != torch.float32 or not dist.is_cuda:
        raise ValueError(f"cuda_kselect: dist must be a (Q, C) float32 CUDA tensor, got {tuple(dist.shape)} {dist.dtype} on {dist.device}")
    if ids is not None and (ids.shape != dist.shape or ids.dtype != torch.int64 or ids.device != dist.device):
        raise ValueError(
            f"cuda_kselect: ids must be int64 of dist's shape {tuple(dist.shape)} on {dist.device}, "
            f"got {tuple(ids.shape)} {ids.dtype} on {ids.device}"
        )
    Q, C = dist.shape
    if not 1 <= k <= min(_C.MAX_K, C):
        raise ValueError(f"cuda_kselect: k must be in [1, min({_C.MAX_K}, C = {C})], got {k}")
    dist = dist.contiguous()
    ids = ids.contiguous() if ids is not None else None
    out_d = torch.empty(Q, k, dtype=torch.float32, device=dist.device)
    out_i = torch.empty(Q, k, dtype=torch.int64, device=dist.device)
    with torch.cuda.device(dist.device):
        stream = torch.cuda.current_stream().cuda_stream
        _C.cuda_kselect(dist.data_ptr(), ids.data_ptr() if ids is not None else 0, Q, C, k, out_d.data_ptr(), out_i.data_ptr(), stream)
    return out_d, out_i
