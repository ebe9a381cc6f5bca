"""Triton IVF-PQ list scan with the top-k fused in: ADC distances selected where they are computed.

The candidates are the packed ``key(distance) << 32 | slot`` int64 of :mod:`arrag_kernels.ops.ivfpq`
(signed keys: ADC distances can be negative), so ordering integers orders by (distance, slot).

Stage 1 (``_ivfpq_scan_kernel``, grid (Q, P)): a query's candidate slots are cut into P equal
ranges, one per program, so programs are balanced whatever the list sizes. A program finds each
slot's probe by binary search over the probes' end slots, computes SUB distances at a time and
keeps the KB = next_pow2(k) smallest candidates in its output row: each round fills a pool of
ROWS x SUB candidates (the KB kept so far, read back from the output row, then fresh ones) and
selects KB of it.
Stage 2 (``_merge_kernel``): each program reduces a CHUNK of candidates to KB, repeated until one
chunk is left (a tree; the number of launches depends on shapes only, never on data).

Memory: Q x P x KB candidates of 8 bytes, P bounded by a target program count, instead of one
distance per candidate slot (``max_candidates``, 1.4 GB at 506M entries, nprobe 32, batch 16).

Selection: bitonic ``tl.topk`` (GPU, KB > 32), KB rounds of min-and-mask (small KB), or, under the
interpreter (which pays per op, not per element, and takes minutes for a ``tl.topk`` of 4096),
a 64-step bisection for the KB-th smallest value and a compaction; that one leaves the KB
unordered, so the final KB are sorted by torch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ivfpq import finish, ivfpq_dispatcher, slots
from ._common import INTERPRETED, device_reason, next_pow2

METHODS = {"topk": 0, "scan": 1, "bisect": 2}
# Stage-1 programs per launch (all queries together): enough to fill a GPU; few under the interpreter.
_TARGET_PROGRAMS = 16 if INTERPRETED else 4096


@triton.jit
def _store_smallest(x, out_ptr, KB: tl.constexpr, METHOD: tl.constexpr):
    """Store the KB smallest values of the 1-D int64 block ``x`` (distinct but for EMPTY): ascending
    for METHOD 0 (topk) and 1 (scan), in any order for 2 (bisect)."""
    if METHOD == 0:
        tl.store(out_ptr + tl.arange(0, KB), ~tl.topk(~x, KB))  # ~ reverses the signed order, no overflow
    elif METHOD == 1:
        for j in range(KB):
            m = tl.min(x, axis=0)
            tl.store(out_ptr + j, m)
            x = tl.where(x == m, 0x7FFFFFFFFFFFFFFF, x)
    else:
        lo = tl.min(x, axis=0)
        hi = tl.max(x, axis=0)
        for _ in range(64):  # the KB-th smallest value stays in [lo, hi], which halves each step
            mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor((lo + hi) / 2) without overflow
            enough = tl.sum((x <= mid).to(tl.int32), axis=0) >= KB
            hi = tl.where(enough, mid, hi)
            lo = tl.where(enough, lo, mid + 1)
        below = x < lo
        tie = x == lo  # one candidate, or several EMPTY
        room = KB - tl.sum(below.to(tl.int32), axis=0)
        take = below | (tie & (tl.cumsum(tie.to(tl.int32), 0) <= room))
        tl.store(out_ptr + tl.cumsum(take.to(tl.int32), 0) - 1, x, mask=take)


# Integer arguments that vary with nprobe, the database or k are never specialised (no value-1 or
# divisible-by-16 variants): one compiled kernel per block configuration, whatever the search.
@triton.jit(do_not_specialize=["nprobe", "max_candidates", "slots_per_program", "out_stride", "search_steps"])
def _ivfpq_scan_kernel(
    lists_ptr, dis0_ptr, ends_ptr, term1_ptr, term2_ptr, codes_ptr, offsets_ptr, out_ptr,
    nprobe, max_candidates, slots_per_program, out_stride, search_steps,
    M: tl.constexpr, KSUB: tl.constexpr, KB: tl.constexpr, SUB: tl.constexpr, ROWS: tl.constexpr,
    METHOD: tl.constexpr,
):
    qi = tl.program_id(0)
    prog = tl.program_id(1)
    row = qi.to(tl.int64) * nprobe
    lo = prog.to(tl.int64) * slots_per_program
    hi = tl.minimum(lo + slots_per_program, tl.minimum(tl.load(ends_ptr + row + nprobe - 1), max_candidates))
    out = out_ptr + qi.to(tl.int64) * out_stride + prog * KB
    # Pool rows [0, KEEP) hold the KB candidates kept so far, the FRESH slots after them new ones.
    KEEP: tl.constexpr = (KB + SUB - 1) // SUB
    FRESH: tl.constexpr = (ROWS - KEEP) * SUB
    r = tl.arange(0, ROWS)[:, None]
    flat = r * SUB + tl.arange(0, SUB)[None, :]
    m = tl.arange(0, M)
    t2_base = term2_ptr + qi * (M * KSUB) + m * KSUB
    if lo >= hi:  # past this query's candidates: padding only
        tl.store(out + tl.arange(0, KB), tl.full([KB], 0x7FFFFFFFFFFFFFFF, tl.int64))
    for base in range(lo, hi, FRESH):
        pool = tl.load(out + flat, mask=(flat < KB) & (base > lo), other=0x7FFFFFFFFFFFFFFF)
        for i in range(ROWS - KEEP):
            s = base + i * SUB + tl.arange(0, SUB)
            valid = s < hi
            # Probe of each slot: the first whose end slot is > s (binary search over the nprobe ends).
            j_lo = tl.zeros([SUB], tl.int32)
            j_hi = j_lo + nprobe
            for _ in range(search_steps):  # ceil(log2(nprobe + 1)): a runtime bound, not one kernel per nprobe
                mid = (j_lo + j_hi) // 2
                open_ = j_lo < j_hi
                end = tl.load(ends_ptr + row + mid, mask=open_, other=0)
                j_lo = tl.where(open_ & (end <= s), mid + 1, j_lo)
                j_hi = tl.where(open_ & (end > s), mid, j_hi)
            j = tl.minimum(j_lo, nprobe - 1)
            lst = tl.load(lists_ptr + row + j)
            start = tl.load(offsets_ptr + lst)
            slot0 = tl.load(ends_ptr + row + j) - (tl.load(offsets_ptr + lst + 1) - start)
            pos = start + (s - slot0)
            c = tl.load(codes_ptr + pos[:, None] * M + m[None, :], mask=valid[:, None], other=0).to(tl.int32)
            lut = tl.load(term1_ptr + lst[:, None] * (M * KSUB) + m[None, :] * KSUB + c, mask=valid[:, None], other=0.0)
            lut += tl.load(t2_base[None, :] + c, mask=valid[:, None], other=0.0)
            bits = (tl.load(dis0_ptr + row + j) + tl.sum(lut, axis=1)).to(tl.int32, bitcast=True)
            key = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # order-preserving float -> int32
            cand = tl.where(valid, (key.to(tl.int64) << 32) | s, 0x7FFFFFFFFFFFFFFF)
            pool = tl.where(r == KEEP + i, cand[None, :], pool)
        _store_smallest(tl.reshape(pool, [ROWS * SUB], can_reorder=True), out, KB, METHOD)
        tl.debug_barrier()  # the next round reads the kept candidates back


@triton.jit(do_not_specialize=["width", "in_stride", "out_stride"])
def _merge_kernel(in_ptr, out_ptr, width, in_stride, out_stride, CHUNK: tl.constexpr, KB: tl.constexpr,
                  METHOD: tl.constexpr):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    cols = chunk * CHUNK + tl.arange(0, CHUNK)
    x = tl.load(in_ptr + row.to(tl.int64) * in_stride + cols, mask=cols < width, other=0x7FFFFFFFFFFFFFFF)
    _store_smallest(x, out_ptr + row.to(tl.int64) * out_stride + chunk * KB, KB, METHOD)


def _plan(q: int, k: int, max_candidates: int, method: str | None):
    """Launch shapes: (KB, SUB, ROWS, method, programs per query, slots per program, merge CHUNK)."""
    kb = next_pow2(k)
    if method is None:
        method = ("scan" if kb <= 64 else "bisect") if INTERPRETED else ("scan" if kb <= 32 else "topk")
    if INTERPRETED:
        # Few, large blocks (two pool rows), except for the interpreter's slow tl.topk.
        pool = max(2 * kb, 256 if method == "topk" else 2048)
        sub, chunk = pool // 2, pool
    else:
        pool, sub, chunk = max(2 * kb, 2048), 256, max(4 * kb, 1024)
    fresh = (pool // sub - -(-kb // sub)) * sub  # pool rows minus those the KB kept candidates take
    per_query = max(1, min(-(-_TARGET_PROGRAMS // q), -(-max_candidates // fresh)))
    per_program = -(-max_candidates // (per_query * fresh)) * fresh  # whole rounds
    return kb, sub, pool // sub, method, -(-max_candidates // per_program), per_program, chunk


def candidate_buffer_bytes(q: int, k: int, max_candidates: int) -> int:
    """Bytes of the largest candidate buffer a search of this shape allocates (stage 1's output)."""
    kb, _, _, _, programs, _, _ = _plan(q, k, max_candidates, None)
    return q * programs * kb * 8


def _warps(block: int) -> int:
    # A pool of int64 candidates lives in registers: 8 warps keep 4096 of them at 16 per thread
    # (an estimate from register budgets, not yet tuned on a GPU).
    return 8 if block >= 4096 else 4


def ivfpq_scan_packed(lists, dis0, term2, term1, codes, offsets, k, max_candidates, method=None) -> torch.Tensor:
    """(Q, KB) int64 packed candidates, the KB = next_pow2(k) smallest by (distance, slot), ascending.

    ``method`` forces the selection ("topk", "scan" or "bisect"; None: by k and device); tests use it
    to cover all three.
    """
    q, nprobe = lists.shape
    _, m, ksub = term1.shape
    kb, sub, rows, method, programs, per_program, chunk = _plan(q, k, max_candidates, method)
    _, _, ends = slots(lists, offsets)
    cand = torch.empty(q, programs * kb, dtype=torch.int64, device=lists.device)
    torch.library.wrap_triton(_ivfpq_scan_kernel)[(q, programs)](
        lists.contiguous(), dis0.contiguous(), ends, term1.contiguous(), term2.contiguous(), codes.contiguous(),
        offsets.contiguous(), cand, nprobe, max_candidates, per_program, cand.stride(0), nprobe.bit_length(),
        M=m, KSUB=ksub, KB=kb, SUB=sub, ROWS=rows, METHOD=METHODS[method],
        num_warps=_warps(rows * sub),
    )
    while cand.shape[1] > kb:
        nch = triton.cdiv(cand.shape[1], chunk)
        nxt = torch.empty(q, nch * kb, dtype=torch.int64, device=lists.device)
        torch.library.wrap_triton(_merge_kernel)[(q, nch)](
            cand, nxt, cand.shape[1], cand.stride(0), nxt.stride(0), CHUNK=chunk, KB=kb, METHOD=METHODS[method],
            num_warps=_warps(chunk),
        )
        cand = nxt
    return cand.sort(1).values if method == "bisect" else cand


# A torch.library op, so torch.compile and CUDA graphs see one opaque, shape-static operation.
@torch.library.triton_op("arrag_kernels::ivfpq_scan_triton", mutates_args=())
def ivfpq_scan_op(
    lists: torch.Tensor,
    dis0: torch.Tensor,
    term2: torch.Tensor,
    term1: torch.Tensor,
    codes: torch.Tensor,
    ids: torch.Tensor,
    offsets: torch.Tensor,
    k: int,
    max_candidates: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused Triton scan + top-k, then the slots' ids (same contract as :func:`arrag_kernels.ops.ivfpq.ivfpq_scan`)."""
    packed = ivfpq_scan_packed(lists, dis0, term2, term1, codes, offsets, k, max_candidates)
    return finish(packed, lists, offsets, ids, k)


def _check(lists, dis0, term2, term1, codes, ids, offsets, k, max_candidates):
    m = term1.shape[1]
    if m & (m - 1):
        return f"M = {m} sub-quantizers is not a power of two (Triton block shapes)"
    return device_reason(lists)


@ivfpq_dispatcher.register("triton", check=_check)
def ivfpq_scan_triton(lists, dis0, term2, term1, codes, ids, offsets, k, max_candidates):
    """Triton implementation of :func:`arrag_kernels.ops.ivfpq.ivfpq_scan` (same contract)."""
    return ivfpq_scan_op(lists, dis0, term2, term1, codes, ids, offsets, k, max_candidates)
