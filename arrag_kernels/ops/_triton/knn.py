"""Triton exact k-NN: fused squared-L2 distances and top-k, two stages.

Every candidate is packed into one int64, ``(float bits of d) << 32 | id``: distances are clamped
to >= 0, whose IEEE bits order like the floats, so ordering packed integers orders by distance and
then by id, which is exactly the reference's tie rule.

Stage 1 (``_knn_block_kernel``, grid (Q, N / BLOCK_N)): one program scans BLOCK_N keys for one
query, in coalesced tiles of SUB rows (distances in fp32), and keeps its KB = next_pow2(k)
smallest packed candidates. The query id varies fastest in the
grid, so the Q programs reading one key block run together and share it through L2.
Stage 2 (``_topk_merge_kernel``): each program reduces a CHUNK of candidates to KB, repeated until
one chunk is left (a tree; the number of launches depends on shapes only, never on data).

Selection is either a bitonic ``tl.topk`` (GPU, large k) or k rounds of min-and-mask (small k, and
always under the interpreter, where ``tl.topk`` takes minutes on a few thousand elements).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..knn import MAX_K, knn_dispatcher
from ._common import FLOAT_DTYPES, INTERPRETED, device_reason, dtype_reason, next_pow2

_EMPTY = 0x7FFFFFFFFFFFFFFF  # packed value of a missing candidate: sorts after every real one
MAX_DIM = 1024
MAX_KEYS = 1 << 31  # ids must fit the low 32 bits of the packed candidate


@triton.jit
def _store_smallest(x, out_ptr, KB: tl.constexpr, SORT: tl.constexpr):
    """Store the KB smallest values of the 1-D int64 block ``x`` (distinct values) ascending."""
    if SORT:
        top = tl.topk(-x, KB)  # packed values are >= 0, so negation reverses the order exactly
        tl.store(out_ptr + tl.arange(0, KB), -top)
    else:
        for j in range(KB):
            m = tl.min(x, axis=0)
            tl.store(out_ptr + j, m)
            x = tl.where(x == m, 0x7FFFFFFFFFFFFFFF, x)


@triton.jit
def _knn_block_kernel(
    q_ptr, k_ptr, out_ptr, N, D, q_stride, k_stride, out_stride,
    BLOCK_N: tl.constexpr, SUB: tl.constexpr, BLOCK_D: tl.constexpr, KB: tl.constexpr, SORT: tl.constexpr,
):
    qi = tl.program_id(0)
    blk = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    q = tl.load(q_ptr + qi * q_stride + cols, mask=cols < D, other=0.0).to(tl.float32)
    qn = tl.sum(q * q, axis=0)
    # The block's candidates as (R, SUB): keys are read in coalesced (SUB, D) row tiles, and tile i
    # is written into row i with a select (registers cannot be indexed dynamically).
    R: tl.constexpr = BLOCK_N // SUB
    tile = tl.arange(0, R)
    packed = tl.full([R, SUB], 0x7FFFFFFFFFFFFFFF, tl.int64)
    for i in range(R):
        n = blk.to(tl.int64) * BLOCK_N + i * SUB + tl.arange(0, SUB)
        inb = n < N
        mask = inb[:, None] & (cols[None, :] < D)
        # Upcast at once: bf16 arithmetic is wrong in the interpreter, and accumulation is fp32 anyway.
        k = tl.load(k_ptr + n[:, None] * k_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dist = tl.maximum(qn + tl.sum(k * k, axis=1) - 2.0 * tl.sum(k * q[None, :], axis=1), 0.0)
        bits = (dist.to(tl.int32, bitcast=True) & 0x7FFFFFFF).to(tl.int64)  # & drops the sign of a -0.0
        cand = tl.where(inb, (bits << 32) | n, 0x7FFFFFFFFFFFFFFF)
        packed = tl.where(tile[:, None] == i, cand[None, :], packed)
    _store_smallest(tl.reshape(packed, [BLOCK_N]), out_ptr + qi.to(tl.int64) * out_stride + blk * KB, KB, SORT)


@triton.jit
def _topk_merge_kernel(in_ptr, out_ptr, M, in_stride, out_stride, CHUNK: tl.constexpr, KB: tl.constexpr, SORT: tl.constexpr):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    cols = chunk * CHUNK + tl.arange(0, CHUNK)
    x = tl.load(in_ptr + row.to(tl.int64) * in_stride + cols, mask=cols < M, other=0x7FFFFFFFFFFFFFFF)
    _store_smallest(x, out_ptr + row.to(tl.int64) * out_stride + chunk * KB, KB, SORT)


def _plan(k: int, sort: bool | None):
    """(KB, BLOCK_N, CHUNK, SORT) for a given k."""
    kb = next_pow2(k)
    if sort is None:
        sort = not INTERPRETED and kb > 32
    if INTERPRETED:
        # The interpreter pays per program and per op, not per element: few, large blocks, except
        # for its tl.topk, which is slow per element (minutes at 4096).
        block = max(2 * kb, 128 if sort else 4096)
        return kb, block, block, sort
    return kb, max(2 * kb, 1024), max(4 * kb, 1024), sort


def _warps(block: int) -> int:
    # A block's int64 candidates live in registers: 8 warps keep large blocks at <= 32 per thread
    # (an estimate from register budgets, not yet tuned on a GPU).
    return 8 if block >= 4096 else 4


def knn_packed(queries: torch.Tensor, keys: torch.Tensor, k: int, sort: bool | None = None) -> torch.Tensor:
    """(Q, KB) int64 packed candidates of the KB = next_pow2(k) nearest keys, ascending.

    ``sort`` forces the selection method (None: by k and device); tests use it to cover both.
    """
    Q, D = queries.shape
    N = keys.shape[0]
    kb, block_n, chunk, sort = _plan(k, sort)
    nblk = triton.cdiv(N, block_n)
    cand = torch.empty(Q, nblk * kb, dtype=torch.int64, device=keys.device)
    block_d = max(next_pow2(D), 2)
    torch.library.wrap_triton(_knn_block_kernel)[(Q, nblk)](
        queries, keys, cand, N, D, queries.stride(0), keys.stride(0), cand.stride(0),
        BLOCK_N=block_n, SUB=min(block_n, max(16, 8192 // block_d)), BLOCK_D=block_d, KB=kb, SORT=sort,
        num_warps=_warps(block_n),
    )
    while cand.shape[1] > kb:
        nch = triton.cdiv(cand.shape[1], chunk)
        nxt = torch.empty(Q, nch * kb, dtype=torch.int64, device=keys.device)
        torch.library.wrap_triton(_topk_merge_kernel)[(Q, nch)](
            cand, nxt, cand.shape[1], cand.stride(0), nxt.stride(0), CHUNK=chunk, KB=kb, SORT=sort,
            num_warps=_warps(chunk),
        )
        cand = nxt
    return cand


@torch.library.triton_op("arrag_kernels::knn_triton", mutates_args=())
def knn_op(queries: torch.Tensor, keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, D) queries, (N, D) keys -> (Q, k) fp32 distances ascending, (Q, k) int64 ids."""
    packed = knn_packed(queries, keys, k)[:, :k]
    dist = (packed >> 32).to(torch.int32).view(torch.float32)
    return dist, packed & 0xFFFFFFFF


def _check(queries, keys, k):
    if k > MAX_K:
        return f"k = {k} exceeds the maximum {MAX_K}"
    if keys.shape[0] >= MAX_KEYS:
        return f"{keys.shape[0]} keys exceed the Triton kernel's limit of {MAX_KEYS}"
    if keys.shape[1] > MAX_DIM:
        return f"key dimension {keys.shape[1]} exceeds {MAX_DIM}"
    return (
        device_reason(queries, keys)
        or dtype_reason("queries", queries, FLOAT_DTYPES)
        or dtype_reason("keys", keys, FLOAT_DTYPES)
        or (None if keys.stride(1) == 1 and queries.stride(1) == 1 else "queries and keys need unit stride in the last dim")
    )


@knn_dispatcher.register("triton", check=_check)
def knn_triton(queries, keys, k):
    """Triton implementation of :func:`arrag_kernels.ops.knn` (same contract)."""
    return knn_op(queries, keys, k)
