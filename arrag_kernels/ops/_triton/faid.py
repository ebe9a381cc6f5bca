"""Triton FAiD blend step (:func:`arrag_kernels.ops.faid_blend`): three launches over (B, D / BLOCK_N).

1. ``_faid_candidates_kernel``: the shared context term (one row, broadcast-reduce over the n*D
   context values) plus the centre term, one [K x D] x [D x BLOCK_N] tile product -> hhat;
2. ``_faid_score_partial_kernel``: relu(hhat @ w1 + b1) . w2 partial sums per column block;
3. ``_faid_mean_kernel``: sigmoid of the summed partials + b2, weighted mean over K; the weighted
   candidates w_k hhat_k overwrite hhat in place (each program reads and writes only its columns).

Accumulation is fp32; nothing of size K x D x D is materialised.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..faid import faid_blend_dispatcher
from ._common import FLOAT_DTYPES, INTERPRETED, device_reason, next_pow2

MAX_K = 64


@triton.jit
def _faid_candidates_kernel(cells, ret, taps_t, center_t, bias, hhat, K, D, NCD,
                            KP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                            UPCAST: tl.constexpr):
    """hhat[b, k, cols] = cells[b].flat @ taps_t.flat[:, cols] + e[b, k] @ center_t[:, cols] + bias."""
    b = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < D
    red = tl.arange(0, BLOCK_D)
    # shared context term: (1 x n*D) @ (n*D x BLOCK_N), as a broadcast-reduce (one row only)
    ctx = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, NCD, BLOCK_D):
        r = k0 + red
        x = tl.load(cells + b * NCD + r, mask=r < NCD, other=0.0).to(tl.float32)
        w = tl.load(taps_t + r[:, None] * D + cols[None, :], mask=(r[:, None] < NCD) & col_ok[None, :], other=0.0)
        ctx += tl.sum(x[:, None] * w.to(tl.float32), axis=0)
    # centre term: (KP x D) @ (D x BLOCK_N) tile product
    rows = tl.arange(0, KP)
    row_ok = rows < K
    acc = tl.zeros((KP, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_D):
        r = k0 + red
        e = tl.load(ret + (b * K + rows[:, None]) * D + r[None, :], mask=row_ok[:, None] & (r[None, :] < D), other=0.0)
        w = tl.load(center_t + r[:, None] * D + cols[None, :], mask=(r[:, None] < D) & col_ok[None, :], other=0.0)
        if UPCAST:
            acc += tl.dot(e.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(e, w)
    bv = tl.load(bias + cols, mask=col_ok, other=0.0).to(tl.float32)
    out = acc + (ctx + bv)[None, :]
    tl.store(hhat + (b * K + rows[:, None]) * D + cols[None, :], out.to(hhat.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])

@triton.jit
def _faid_score_partial_kernel(hhat, w1_t, b1, w2, partial, K, D, NB,
                               KP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                               UPCAST: tl.constexpr):
    """partial[b, blk, k] = sum_{cols in blk} relu(hhat[b, k] @ w1_t[:, cols] + b1[cols]) * w2[cols]."""
    b = tl.program_id(0)
    blk = tl.program_id(1)
    cols = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < D
    red = tl.arange(0, BLOCK_D)
    rows = tl.arange(0, KP)
    row_ok = rows < K
    acc = tl.zeros((KP, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_D):
        r = k0 + red
        h = tl.load(hhat + (b * K + rows[:, None]) * D + r[None, :], mask=row_ok[:, None] & (r[None, :] < D), other=0.0)
        w = tl.load(w1_t + r[:, None] * D + cols[None, :], mask=(r[:, None] < D) & col_ok[None, :], other=0.0)
        if UPCAST:
            acc += tl.dot(h.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(h, w)
    b1v = tl.load(b1 + cols, mask=col_ok, other=0.0).to(tl.float32)
    w2v = tl.load(w2 + cols, mask=col_ok, other=0.0).to(tl.float32)
    u = tl.maximum(acc + b1v[None, :], 0.0)
    part = tl.sum(u * w2v[None, :], axis=1)  # (KP,)
    tl.store(partial + (b * NB + blk) * KP + rows, part)

@triton.jit
def _faid_mean_kernel(hhat, partial, b2, out, K, D, NB,
                      KP: tl.constexpr, BLOCK_N: tl.constexpr):
    """hhat[b, k, cols] *= w_k and out[b, cols] = (1/K) sum_k hhat[b, k, cols] (after the scaling), with
    w_k = sigmoid(sum_blk partial[b, blk, k] + b2)."""
    b = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < D
    rows = tl.arange(0, KP)
    row_ok = rows < K
    logit = tl.zeros((KP,), dtype=tl.float32)
    for blk in range(0, NB):
        logit += tl.load(partial + (b * NB + blk) * KP + rows)
    w = tl.sigmoid(logit + tl.load(b2).to(tl.float32))
    w = tl.where(row_ok, w, 0.0)
    tile = (b * K + rows[:, None]) * D + cols[None, :]
    tile_ok = row_ok[:, None] & col_ok[None, :]
    weighted = w[:, None] * tl.load(hhat + tile, mask=tile_ok, other=0.0).to(tl.float32)
    tl.store(hhat + tile, weighted.to(hhat.dtype.element_ty), mask=tile_ok)
    res = tl.sum(weighted, axis=0) / K
    tl.store(out + b * D + cols, res.to(out.dtype.element_ty), mask=col_ok)


@torch.library.triton_op("arrag_kernels::faid_blend_triton", mutates_args=())
def faid_blend_op(
    cells: torch.Tensor, retrieved: torch.Tensor, taps_t: torch.Tensor, center_t: torch.Tensor, bias: torch.Tensor,
    w1_t: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """See :func:`arrag_kernels.ops.faid_blend`; returns blended (B, D) and w_k hhat_k (B, K, D)."""
    B, n, D = cells.shape
    K = retrieved.shape[1]
    KP = max(16, next_pow2(K))
    BLOCK_N, BLOCK_D = (64, 64) if INTERPRETED else (64, 128)
    NB = triton.cdiv(D, BLOCK_N)
    upcast = INTERPRETED or cells.dtype == torch.float32
    cells, retrieved = cells.contiguous(), retrieved.contiguous()
    taps_t, center_t, w1_t = taps_t.contiguous(), center_t.contiguous(), w1_t.contiguous()
    bias, b1, w2, b2 = bias.contiguous(), b1.contiguous(), w2.contiguous(), b2.contiguous()
    hhat = torch.empty(B, K, D, device=cells.device, dtype=cells.dtype)
    partial = torch.empty(B, NB, KP, device=cells.device, dtype=torch.float32)
    out = torch.empty(B, D, device=cells.device, dtype=cells.dtype)
    if B:
        grid = (B, NB)
        torch.library.wrap_triton(_faid_candidates_kernel)[grid](
            cells, retrieved, taps_t, center_t, bias, hhat, K, D, n * D,
            KP=KP, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, UPCAST=upcast)
        torch.library.wrap_triton(_faid_score_partial_kernel)[grid](
            hhat, w1_t, b1, w2, partial, K, D, NB, KP=KP, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, UPCAST=upcast)
        torch.library.wrap_triton(_faid_mean_kernel)[grid](hhat, partial, b2, out, K, D, NB, KP=KP, BLOCK_N=BLOCK_N)
    return out, hhat


def _check(cells, retrieved, *weights):
    dtypes = {t.dtype for t in (cells, retrieved, *weights)}
    if len(dtypes) != 1 or next(iter(dtypes)) not in FLOAT_DTYPES:
        return f"needs one dtype among float32/float16/bfloat16 for all inputs, got {sorted(map(str, dtypes))}"
    if INTERPRETED and torch.bfloat16 in dtypes:
        return "bfloat16 gives wrong numbers under the Triton interpreter"
    if retrieved.shape[1] > MAX_K:
        return f"K = {retrieved.shape[1]} > {MAX_K} retrieved features"
    if cells.shape[-1] < 16:
        return f"D = {cells.shape[-1]} < 16 (tl.dot tiles)"
    return device_reason(cells, retrieved, *weights)


@faid_blend_dispatcher.register("triton", check=_check)
def faid_blend_triton(cells, retrieved, taps_t, center_t, bias, w1_t, b1, w2, b2):
    """Triton implementation of :func:`arrag_kernels.ops.faid_blend` (same contract)."""
    return faid_blend_op(cells, retrieved, taps_t, center_t, bias, w1_t, b1, w2, b2)
