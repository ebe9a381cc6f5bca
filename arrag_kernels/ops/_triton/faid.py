"""Triton FAiD blend step (:func:`arrag_kernels.ops.faid_blend`): four GEMM-shaped launches over the batch.

Sizes follow from the shapes alone (:func:`arrag_kernels.ops.faid_plan.blend_shape`; launches, bytes
and scratch: :func:`arrag_kernels.ops.faid_blend_plan`). With the B images' cells as the rows:

1. ``_faid_context_kernel``: the context term as one (B, n*D) x (n*D, D) GEMM, the batch the rows
   of each tap tile (the taps are read once per step, not once per image), its reduction split into
   ``split`` chunks written as fp32 partial sums (grid: column blocks x chunks x batch tiles);
2. ``_faid_candidates_kernel``: the centre term as one (B*K, D) x (D, D) GEMM over every candidate;
   epilogue: + the candidate's image's context partials (summed in chunk order) + bias -> hhat;
3. ``_faid_score_kernel``: the score MLP's first layer as one (B*K, D) x (D, D) GEMM;
   epilogue: relu(. + b1) . w2 per column block;
4. ``_faid_mean_kernel``: sigmoid of the summed partials + b2, weighted mean over K; the weighted
   candidates w_k hhat_k overwrite hhat in place (each program reads and writes only its columns).

Accumulation is fp32, partial sums are added in a fixed order (no atomics: deterministic); nothing
of size K x D x D is materialised and nothing is read back to the host (capturable).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..faid import faid_blend_dispatcher
from ..faid_plan import BLOCK_N, BlendShape, blend_shape
from ._common import FLOAT_DTYPES, INTERPRETED, device_reason, launch

MAX_K = 64  # the mean kernel holds a (next_pow2(K), BLOCK_N) tile


@triton.jit
def _faid_context_kernel(cells, taps_t, partial, B, D, NCD, CHUNK,
                         BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
    """partial[s, b, cols] = cells[b].flat[chunk s] @ taps_t.flat[chunk s, cols] for a tile of images b."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < D
    s = tl.program_id(1)
    imgs = tl.program_id(2) * BLOCK_B + tl.arange(0, BLOCK_B)
    img_ok = imgs < B
    red = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    for k0 in range(s * CHUNK, s * CHUNK + CHUNK, BLOCK_D):
        r = k0 + red
        r_ok = r < NCD
        x = tl.load(cells + imgs[:, None] * NCD + r[None, :], mask=img_ok[:, None] & r_ok[None, :], other=0.0)
        w = tl.load(taps_t + r[:, None] * D + cols[None, :], mask=r_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(x, w)
    tl.store(partial + (s * B + imgs[:, None]) * D + cols[None, :], acc, mask=img_ok[:, None] & col_ok[None, :])


@triton.jit
def _faid_candidates_kernel(ret, center_t, partial, bias, hhat, B, K, D, SPLIT,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                            UPCAST: tl.constexpr):
    """hhat[c, cols] = e[c] @ center_t[:, cols] + sum_s partial[s, c // K, cols] + bias[cols] for the
    flat candidates c = b * K + k of one row block."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < B * K
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < D
    red = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_D):
        r = k0 + red
        e = tl.load(ret + rows[:, None] * D + r[None, :], mask=row_ok[:, None] & (r[None, :] < D), other=0.0)
        w = tl.load(center_t + r[:, None] * D + cols[None, :], mask=(r[:, None] < D) & col_ok[None, :], other=0.0)
        if UPCAST:
            acc += tl.dot(e.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(e, w)
    tile_ok = row_ok[:, None] & col_ok[None, :]
    ctx = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    imgs = rows // K
    for s in range(0, SPLIT):
        ctx += tl.load(partial + (s * B + imgs[:, None]) * D + cols[None, :], mask=tile_ok, other=0.0)
    bv = tl.load(bias + cols, mask=col_ok, other=0.0).to(tl.float32)
    out = acc + (ctx + bv[None, :])
    tl.store(hhat + rows[:, None] * D + cols[None, :], out.to(hhat.dtype.element_ty), mask=tile_ok)


@triton.jit
def _faid_score_kernel(hhat, w1_t, b1, w2, score, BK, D,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
    """score[blk, c] = sum_{cols in blk} relu(hhat[c] @ w1_t[:, cols] + b1[cols]) * w2[cols]."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < BK
    blk = tl.program_id(1)
    cols = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < D
    red = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_D):
        r = k0 + red
        h = tl.load(hhat + rows[:, None] * D + r[None, :], mask=row_ok[:, None] & (r[None, :] < D), other=0.0)
        w = tl.load(w1_t + r[:, None] * D + cols[None, :], mask=(r[:, None] < D) & col_ok[None, :], other=0.0)
        if UPCAST:
            acc += tl.dot(h.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(h, w)
    b1v = tl.load(b1 + cols, mask=col_ok, other=0.0).to(tl.float32)
    w2v = tl.load(w2 + cols, mask=col_ok, other=0.0).to(tl.float32)
    u = tl.maximum(acc + b1v[None, :], 0.0)
    tl.store(score + blk * BK + rows, tl.sum(u * w2v[None, :], axis=1), mask=row_ok)


@triton.jit
def _faid_mean_kernel(hhat, score, b2, out, K, BK, D, NB,
                      KP: tl.constexpr, BLOCK_N: tl.constexpr):
    """hhat[b, k, cols] *= w_k and out[b, cols] = (1/K) sum_k hhat[b, k, cols] (after the scaling), with
    w_k = sigmoid(sum_blk score[blk, b * K + k] + b2)."""
    b = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < D
    rows = tl.arange(0, KP)
    row_ok = rows < K
    logit = tl.zeros((KP,), dtype=tl.float32)
    for blk in range(0, NB):
        logit += tl.load(score + blk * BK + b * K + rows, mask=row_ok, other=0.0)
    w = tl.sigmoid(logit + tl.load(b2).to(tl.float32))
    w = tl.where(row_ok, w, 0.0)
    tile = (b * K + rows[:, None]) * D + cols[None, :]
    tile_ok = row_ok[:, None] & col_ok[None, :]
    weighted = w[:, None] * tl.load(hhat + tile, mask=tile_ok, other=0.0).to(tl.float32)
    tl.store(hhat + tile, weighted.to(hhat.dtype.element_ty), mask=tile_ok)
    res = tl.sum(weighted, axis=0) / K
    tl.store(out + b * D + cols, res.to(out.dtype.element_ty), mask=col_ok)


def _scratch(shape: BlendShape, device) -> dict[str, torch.Tensor]:
    """The blend's fp32 partial sums (``faid_blend_plan``'s ``scratch``; every element is written before
    it is read)."""
    f32 = dict(dtype=torch.float32, device=device)
    return dict(context=torch.empty(shape.split, shape.batch, shape.dim, **f32),
                score=torch.empty(shape.col_blocks, shape.batch * shape.k, **f32))


@torch.library.triton_op("arrag_kernels::faid_blend_triton", mutates_args=())
def faid_blend_op(
    cells: torch.Tensor, retrieved: torch.Tensor, taps_t: torch.Tensor, center_t: torch.Tensor, bias: torch.Tensor,
    w1_t: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """See :func:`arrag_kernels.ops.faid_blend`; returns blended (B, D) and w_k hhat_k (B, K, D)."""
    B, n, D = cells.shape
    K = retrieved.shape[1]
    upcast = INTERPRETED or cells.dtype == torch.float32
    cells, retrieved = cells.contiguous(), retrieved.contiguous()
    taps_t, center_t, w1_t = taps_t.contiguous(), center_t.contiguous(), w1_t.contiguous()
    bias, b1, w2, b2 = bias.contiguous(), b1.contiguous(), w2.contiguous(), b2.contiguous()
    hhat = torch.empty(B, K, D, device=cells.device, dtype=cells.dtype)
    out = torch.empty(B, D, device=cells.device, dtype=cells.dtype)
    if not B:  # a grid of 0 programs is an error on CUDA
        return out, hhat
    shape = blend_shape(B, n, K, D, cells.element_size())
    scratch = _scratch(shape, cells.device)
    grids, tiles = shape.grids, dict(BLOCK_N=BLOCK_N, BLOCK_D=shape.block_d, UPCAST=upcast)
    launch(_faid_context_kernel, grids["context"], cells, taps_t, scratch["context"], B, D, n * D, shape.chunk,
            BLOCK_B=shape.block_b, **tiles)
    launch(_faid_candidates_kernel, grids["candidates"], retrieved, center_t, scratch["context"], bias, hhat,
            B, K, D, shape.split, BLOCK_M=shape.block_m, **tiles)
    launch(_faid_score_kernel, grids["score"], hhat, w1_t, b1, w2, scratch["score"], B * K, D,
            BLOCK_M=shape.block_m, **tiles)
    launch(_faid_mean_kernel, grids["mean"], hhat, scratch["score"], b2, out, K, B * K, D, shape.col_blocks,
            KP=shape.kp, BLOCK_N=BLOCK_N)
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
