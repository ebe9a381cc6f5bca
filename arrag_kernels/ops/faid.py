"""FAiD blend step in the affine form: context term + centre product + scores + mean over K.

For one image b with n causal context cells c_j (D,), K retrieved features e_k (D,)::

    hhat_k   = sum_j c_j @ taps_t[j] + e_k @ center_t + bias              (D,)
    w_k      = sigmoid(relu(hhat_k @ w1_t + b1) . w2 + b2)                 scalar
    blended  = (1 / K) sum_k w_k hhat_k                                    (D,)

Weights are stored input-major (``x @ W_t``) so a program reading a block of output columns reads
contiguous rows. The Triton path runs three launches over (B, D / BLOCK_N) programs: candidates
(context reduction + one [K x D] x [D x D] tile product), score partials per column block, then
the weighted mean; nothing of size K x D x D is ever materialised.
"""

from __future__ import annotations

import os

import torch

from ._dispatch import OpDispatcher, current_backend


def _check_faid_blend(cells, retrieved, taps_t, center_t, bias, w1_t, b1, w2, b2):
    if cells.dim() != 3 or retrieved.dim() != 3 or cells.shape[0] != retrieved.shape[0]:
        raise ValueError(
            f"faid_blend: cells must be (B, n, D) and retrieved (B, K, D) with the same B, got "
            f"{tuple(cells.shape)} and {tuple(retrieved.shape)}"
        )
    B, n, D = cells.shape
    expected = {
        "retrieved": (retrieved, (B, retrieved.shape[1], D)),
        "taps_t": (taps_t, (n, D, D)),
        "center_t": (center_t, (D, D)),
        "bias": (bias, (D,)),
        "w1_t": (w1_t, (D, D)),
        "b1": (b1, (D,)),
        "w2": (w2, (D,)),
        "b2": (b2, (1,)),
    }
    for name, (t, shape) in expected.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"faid_blend: {name} must be {shape} for cells {tuple(cells.shape)}, got {tuple(t.shape)}")
        if t.device != cells.device:
            raise ValueError(f"faid_blend: {name} is on {t.device}, cells on {cells.device}; put all on one device")
    if retrieved.shape[1] < 1:
        raise ValueError("faid_blend: need at least one retrieved feature (K >= 1)")


def faid_blend_ref(cells, retrieved, taps_t, center_t, bias, w1_t, b1, w2, b2):
    """Pure PyTorch reference of :func:`faid_blend` (fp32 accumulation, output in ``retrieved.dtype``)."""
    f = torch.float32
    ctx = torch.einsum("bnd,nde->be", cells.to(f), taps_t.to(f)) + bias.to(f)  # (B, D)
    hhat = ctx.unsqueeze(1) + retrieved.to(f) @ center_t.to(f)  # (B, K, D)
    w = torch.sigmoid(torch.relu(hhat @ w1_t.to(f) + b1.to(f)) @ w2.to(f) + b2.to(f))  # (B, K)
    blended = (w.unsqueeze(-1) * hhat).mean(dim=1)
    return blended.to(retrieved.dtype), hhat.to(retrieved.dtype)


faid_blend_dispatcher = OpDispatcher("faid_blend")
faid_blend_dispatcher.register("reference")(faid_blend_ref)

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_MAX_K = 64

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton ships with torch on Linux
    HAS_TRITON = False


if HAS_TRITON:

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
        """out[b, cols] = (1/K) sum_k sigmoid(sum_blk partial[b, blk, k] + b2) * hhat[b, k, cols]."""
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
        h = tl.load(hhat + (b * K + rows[:, None]) * D + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        res = tl.sum(w[:, None] * h.to(tl.float32), axis=0) / K
        tl.store(out + b * D + cols, res.to(out.dtype.element_ty), mask=col_ok)


def _check_triton(cells, retrieved, *weights):
    if not HAS_TRITON:
        return "triton is not installed"
    if cells.device.type == "cpu" and not _INTERPRET:
        return "CPU tensors need the Triton interpreter (TRITON_INTERPRET=1 before importing arrag_kernels)"
    if cells.device.type == "cpu" and current_backend() != "triton":
        return "the Triton interpreter runs CPU tensors only when the 'triton' backend is forced"
    if cells.device.type not in ("cpu", "cuda"):
        return f"device {cells.device.type} is not supported"
    dtypes = {t.dtype for t in (cells, retrieved, *weights)}
    if len(dtypes) != 1 or next(iter(dtypes)) not in (torch.float32, torch.float16, torch.bfloat16):
        return f"needs one dtype among float32/float16/bfloat16 for all inputs, got {sorted(map(str, dtypes))}"
    if _INTERPRET and torch.bfloat16 in dtypes:
        return "bfloat16 gives wrong numbers under the Triton interpreter"
    if retrieved.shape[1] > _MAX_K:
        return f"K = {retrieved.shape[1]} > {_MAX_K} retrieved features"
    if cells.shape[-1] < 16:
        return f"D = {cells.shape[-1]} < 16 (tl.dot tiles)"
    return None


@faid_blend_dispatcher.register("triton", check=_check_triton)
def faid_blend_triton(cells, retrieved, taps_t, center_t, bias, w1_t, b1, w2, b2):
    """Triton implementation of :func:`faid_blend` (three launches, fp32 accumulation)."""
    B, n, D = cells.shape
    K = retrieved.shape[1]
    KP = max(16, triton.next_power_of_2(K))
    BLOCK_N, BLOCK_D = (64, 64) if _INTERPRET else (64, 128)
    NB = triton.cdiv(D, BLOCK_N)
    upcast = _INTERPRET or cells.dtype == torch.float32
    cells, retrieved = cells.contiguous(), retrieved.contiguous()
    hhat = torch.empty(B, K, D, device=cells.device, dtype=cells.dtype)
    partial = torch.empty(B, NB, KP, device=cells.device, dtype=torch.float32)
    out = torch.empty(B, D, device=cells.device, dtype=cells.dtype)
    grid = (B, NB)
    _faid_candidates_kernel[grid](cells, retrieved, taps_t.contiguous(), center_t.contiguous(), bias, hhat, K, D, n * D,
                                  KP=KP, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, UPCAST=upcast)
    _faid_score_partial_kernel[grid](hhat, w1_t.contiguous(), b1, w2, partial, K, D, NB,
                                     KP=KP, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, UPCAST=upcast)
    _faid_mean_kernel[grid](hhat, partial, b2, out, K, D, NB, KP=KP, BLOCK_N=BLOCK_N)
    return out, hhat


def faid_blend(cells, retrieved, taps_t, center_t, bias, w1_t, b1, w2, b2):
    """One FAiD blender step in the affine form (see the module docstring for the math).

    Args:
        cells: (B, n, D) the causal context cells of each target (zeros where outside the grid).
        retrieved: (B, K, D) normalised retrieved features e_k.
        taps_t: (n, D, D) composed hop-mixed taps per causal cell, input-major.
        center_t: (D, D) composed centre tap, input-major.
        bias: (D,) composed bias. w1_t (D, D), b1 (D,), w2 (D,), b2 (1,): the score MLP.

    Returns:
        blended (B, D) and hhat (B, K, D), in ``retrieved``'s dtype.
    """
    _check_faid_blend(cells, retrieved, taps_t, center_t, bias, w1_t, b1, w2, b2)
    return faid_blend_dispatcher(cells, retrieved, taps_t, center_t, bias, w1_t, b1, w2, b2)
