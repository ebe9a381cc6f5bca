"""Triton DAiD sampling: CFG, temperature, softmax, retrieval distribution, mix and sample in one launch.

One program per image row b:

1. load the K hits; ``s_k = -d_k / tau`` for valid hits (token in [0, V));
2. build the row's unnormalised retrieval mass in a (B, V) fp32 workspace: ``atomic_max`` of s_k
   per token (``dedup="nearest"``: each token keeps its nearest hit) or ``atomic_add`` of
   ``exp(s_k - max s)`` (``"sum"``: duplicates add up); the program initialises its own row first;
3. pass A over the vocabulary: online max / sum of the CFG-combined, temperature-scaled logits,
   and the total retrieval mass Z;
3b. top-k / top-p (optional): the kept scores are those >= a threshold, found by bisection over the
   scores' order-preserving int32 images (32 passes each: the largest t with ``count(x >= t) >= k``,
   then the largest t with ``sum(exp(x - m) [x >= t]) >= top_p * S``), no sort; then S is
   recomputed over the kept scores;
4. pass B: ``p = (1 - lam) exp(l - m) / S + lam * mass / Z`` chunk by chunk, with a running
   cumulative sum; the token is the first v whose cumsum exceeds ``u * ((1 - lam) + lam)``
   (the exact total; the reference uses its fp32 sum, which can differ in the last bits), or the
   running argmax when greedy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..daid import daid_sample_dispatcher
from ._common import FLOAT_DTYPES, INDEX_DTYPES, INTERPRETED, device_reason, dtype_reason, launch, next_pow2

MAX_HITS = 4096


@triton.jit
def _load_scores(logits_ptr, row, B, stride, v, vmask, guidance, temperature, HAS_CFG: tl.constexpr):
    lc = tl.load(logits_ptr + row.to(tl.int64) * stride + v, mask=vmask, other=0.0).to(tl.float32)
    if HAS_CFG:
        lu = tl.load(logits_ptr + (row + B).to(tl.int64) * stride + v, mask=vmask, other=0.0).to(tl.float32)
        lc = lu + guidance * (lc - lu)
    return tl.where(vmask, lc / temperature, float("-inf"))


@triton.jit
def _order_key(x):
    """float32 -> int32 with the same order (negative floats: flip the magnitude bits)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _bisect_threshold(logits_ptr, row, B, stride, V, guidance, temperature, lo, hi, m, target,
                      BY_MASS: tl.constexpr, HAS_CFG: tl.constexpr, BLOCK_V: tl.constexpr):
    """The largest key t in [lo, hi] with f(t) >= target, f(t) = count(key >= t) or sum(exp(x - m) [key >= t])
    (both non-increasing in t); lo itself when none is larger. lo, hi: int64 scalars, f(lo) >= target."""
    for _ in range(32):
        mid = lo + (hi - lo + 1) // 2
        acc = tl.zeros([], tl.float32)
        for v0 in range(0, V, BLOCK_V):
            v = v0 + tl.arange(0, BLOCK_V)
            vmask = v < V
            x = _load_scores(logits_ptr, row, B, stride, v, vmask, guidance, temperature, HAS_CFG)
            keep = vmask & (_order_key(x).to(tl.int64) >= mid)
            if BY_MASS:
                acc += tl.sum(tl.where(keep, tl.exp(x - m), 0.0), axis=0)
            else:
                acc += tl.sum(keep.to(tl.float32), axis=0)
        ok = acc >= target
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid - 1)
    return lo


@triton.jit
def _kept_mass(logits_ptr, row, B, stride, V, guidance, temperature, thr, m, HAS_CFG: tl.constexpr,
               BLOCK_V: tl.constexpr):
    """sum(exp(x - m)) over the scores x whose order key is >= thr (the mass the filters keep)."""
    ssum = tl.zeros([], tl.float32)
    for v0 in range(0, V, BLOCK_V):
        v = v0 + tl.arange(0, BLOCK_V)
        x = _load_scores(logits_ptr, row, B, stride, v, v < V, guidance, temperature, HAS_CFG)
        ssum += tl.sum(tl.where(_order_key(x).to(tl.int64) >= thr, tl.exp(x - m), 0.0), axis=0)
    return ssum


@triton.jit
def _ret_mass(ws_row, v, vmask, s_max, DEDUP_SUM: tl.constexpr):
    # .cg: read from L2, where the atomics landed, not from a stale L1 line.
    w = tl.load(ws_row + v, mask=vmask, other=0.0 if DEDUP_SUM else float("-inf"), cache_modifier=".cg")
    if DEDUP_SUM:
        return w
    return tl.where(w > float("-inf"), tl.exp(w - s_max), 0.0)


@triton.jit
def _daid_sample_kernel(
    logits_ptr, dist_ptr, tok_ptr, active_ptr, u_ptr, ws_ptr, out_ptr,
    B, V, K, logit_stride, dist_stride, tok_stride,
    guidance, temperature, lam, tau, top_k, top_p,
    HAS_CFG: tl.constexpr, SAMPLE: tl.constexpr, DEDUP_SUM: tl.constexpr, HAS_TOPK: tl.constexpr,
    HAS_TOPP: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0)
    kk = tl.arange(0, BLOCK_K)
    hit_tok = tl.load(tok_ptr + row.to(tl.int64) * tok_stride + kk, mask=kk < K, other=-1)
    valid = (hit_tok >= 0) & (hit_tok < V)
    d = tl.load(dist_ptr + row.to(tl.int64) * dist_stride + kk, mask=valid, other=0.0).to(tl.float32)
    s = tl.where(valid, -d / tau, float("-inf"))
    use = (tl.load(active_ptr + row) != 0) & (tl.sum(valid.to(tl.int32), axis=0) > 0)
    lam_eff = tl.where(use, lam, 0.0)
    s_max = tl.max(s, axis=0)

    ws_row = ws_ptr + row.to(tl.int64) * V
    for v0 in range(0, V, BLOCK_V):
        v = v0 + tl.arange(0, BLOCK_V)
        tl.store(ws_row + v, tl.full([BLOCK_V], 0.0 if DEDUP_SUM else float("-inf"), tl.float32), mask=v < V)
    tl.debug_barrier()
    if DEDUP_SUM:
        tl.atomic_add(ws_row + hit_tok, tl.exp(s - s_max), mask=valid & use)
    else:
        tl.atomic_max(ws_row + hit_tok, s, mask=valid & use)
    tl.debug_barrier()

    # Pass A: softmax statistics of the model scores, and the retrieval normaliser.
    m = tl.full([], float("-inf"), tl.float32)
    ssum = tl.zeros([], tl.float32)
    z = tl.zeros([], tl.float32)
    for v0 in range(0, V, BLOCK_V):
        v = v0 + tl.arange(0, BLOCK_V)
        vmask = v < V
        x = _load_scores(logits_ptr, row, B, logit_stride, v, vmask, guidance, temperature, HAS_CFG)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        ssum = ssum * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
        z += tl.sum(_ret_mass(ws_row, v, vmask, s_max, DEDUP_SUM), axis=0)
    z = tl.where(use, z, 1.0)

    # Top-k / top-p: keep x with key(x) >= thr. The maximum is always kept, so m stays the max.
    thr = tl.full([], -2147483648, tl.int64)
    if HAS_TOPK or HAS_TOPP:
        hi = _order_key(m).to(tl.int64)
        if HAS_TOPK:
            thr = _bisect_threshold(logits_ptr, row, B, logit_stride, V, guidance, temperature, thr, hi, m,
                                    top_k, False, HAS_CFG, BLOCK_V)
        ssum = _kept_mass(logits_ptr, row, B, logit_stride, V, guidance, temperature, thr, m, HAS_CFG, BLOCK_V)
        if HAS_TOPP:
            thr = _bisect_threshold(logits_ptr, row, B, logit_stride, V, guidance, temperature, thr, hi, m,
                                    top_p * ssum, True, HAS_CFG, BLOCK_V)
            ssum = _kept_mass(logits_ptr, row, B, logit_stride, V, guidance, temperature, thr, m, HAS_CFG, BLOCK_V)

    # Pass B: merged probabilities in vocabulary order; inverse CDF or argmax.
    threshold = tl.load(u_ptr + row).to(tl.float32) * ((1.0 - lam_eff) + lam_eff) if SAMPLE else 0.0
    running = tl.zeros([], tl.float32)
    found = tl.full([], 2147483647, tl.int32)
    last_pos = tl.zeros([], tl.int32)
    best = tl.full([], -1.0, tl.float32)
    best_idx = tl.zeros([], tl.int32)
    for v0 in range(0, V, BLOCK_V):
        v = v0 + tl.arange(0, BLOCK_V)
        vmask = v < V
        x = _load_scores(logits_ptr, row, B, logit_stride, v, vmask, guidance, temperature, HAS_CFG)
        if HAS_TOPK or HAS_TOPP:
            x = tl.where(_order_key(x).to(tl.int64) >= thr, x, float("-inf"))
        p_ret = _ret_mass(ws_row, v, vmask, s_max, DEDUP_SUM) / z
        p = tl.where(vmask, (1.0 - lam_eff) * (tl.exp(x - m) / ssum) + lam_eff * p_ret, 0.0)
        if SAMPLE:
            cdf = running + tl.cumsum(p, axis=0)
            found = tl.minimum(found, tl.min(tl.where((cdf > threshold) & vmask, v, 2147483647), axis=0))
            last_pos = tl.maximum(last_pos, tl.max(tl.where(p > 0.0, v, 0), axis=0))
            running = tl.max(cdf, axis=0)
        else:
            cmax = tl.max(p, axis=0)
            cidx = tl.argmax(p, axis=0) + v0
            better = cmax > best  # strict: the first maximum wins, like torch.argmax
            best_idx = tl.where(better, cidx, best_idx)
            best = tl.where(better, cmax, best)
    if SAMPLE:
        # fp32 rounding can leave the final cumsum just under the threshold: take the last token
        # with mass then, as a CDF that reached the total would.
        result = tl.where(found < V, found, last_pos)
    else:
        result = best_idx
    tl.store(out_ptr + row, result.to(tl.int64))


@torch.library.triton_op("arrag_kernels::daid_sample_triton", mutates_args=())
def daid_sample_op(
    logits: torch.Tensor, dist: torch.Tensor, tokens: torch.Tensor, active: torch.Tensor,
    uniforms: torch.Tensor | None, guidance_scale: float | None, temperature: float,
    lam: float, tau: float, dedup_sum: bool, top_k: int = 0, top_p: float = 1.0,
) -> torch.Tensor:
    """See :func:`arrag_kernels.ops.daid_sample`; returns (B,) int64."""
    B, K = dist.shape
    V = logits.shape[1]
    out = torch.empty(B, dtype=torch.int64, device=logits.device)
    workspace = torch.empty(B, V, dtype=torch.float32, device=logits.device)
    sample = uniforms is not None
    if B:
        launch(_daid_sample_kernel, (B,),
               logits, dist, tokens, active, uniforms if sample else dist, workspace, out,
               B, V, K, logits.stride(0), dist.stride(0), tokens.stride(0),
               1.0 if guidance_scale is None else guidance_scale, temperature, lam, tau, float(top_k), top_p,
               HAS_CFG=guidance_scale is not None, SAMPLE=sample, DEDUP_SUM=dedup_sum,
               HAS_TOPK=0 < top_k < V, HAS_TOPP=top_p < 1.0,
               BLOCK_V=min(next_pow2(V), 1024 if INTERPRETED else 2048), BLOCK_K=max(next_pow2(K), 2))
    return out


def _check(logits, dist, tokens, active, uniforms, **_):
    if dist.shape[1] > MAX_HITS:
        return f"K = {dist.shape[1]} hits exceed the kernel's limit of {MAX_HITS}"
    tensors = [logits, dist, tokens, active] + ([uniforms] if uniforms is not None else [])
    if any(t.stride(-1) != 1 for t in tensors if t.dim() == 2):
        return "logits, dist and tokens need unit stride in the last dim"
    return (
        device_reason(*tensors)
        or dtype_reason("logits", logits, FLOAT_DTYPES)
        or dtype_reason("dist", dist, FLOAT_DTYPES)
        or dtype_reason("tokens", tokens, INDEX_DTYPES)
        or (None if active.dtype == torch.bool else f"active must be bool, got {active.dtype}")
    )


@daid_sample_dispatcher.register("triton", check=_check)
def daid_sample_triton(logits, dist, tokens, active, uniforms, *, guidance_scale, temperature, lam, tau, dedup,
                       top_k=0, top_p=1.0):
    """Triton implementation of :func:`arrag_kernels.ops.daid_sample` (same contract)."""
    return daid_sample_op(logits, dist, tokens, active, uniforms, guidance_scale, temperature, lam, tau, dedup == "sum",
                          top_k, top_p)
