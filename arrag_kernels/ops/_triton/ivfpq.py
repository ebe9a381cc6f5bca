"""Triton IVF-PQ scan: a sampled bound, one filter over the candidates, a radix select per query.

The exact search's structure (:mod:`arrag_kernels.ops._triton.knn`) over a query's candidate slots
(the probed lists' entries, ascending list id, then storage order: slot s of query q) and their ADC
distances. Four launches whose sizes follow from the shapes alone
(:func:`arrag_kernels.ops.ivfpq_plan.scan_shape`; no host synchronisation, CUDA-graph capturable):

1. ``_ivfpq_sample_kernel``: the distances of S_q = min(S, T_q) evenly spaced slots
   ``floor(i T_q / S_q)`` of each query (T_q: its candidates; every slot when T_q <= S).
2. ``_ivfpq_bound_kernel`` (one program per query): the bound tau_q, the sample's r_q-th smallest
   (distance key, slot) by the exact search's radix select (``ivfpq_plan.sample_rank``: min(k, T_q)
   when every slot is sampled), and the query's survivor counter reset.
3. ``_ivfpq_filter_kernel`` (grid (programs, Q)): every candidate's distance once, a 32-bit compare
   with tau_q (distance key, then slot on equal keys) and survivor compaction (one atomic per
   survivor; slots past the capacity C dropped but counted).
4. ``_ivfpq_select_kernel`` (one program per query): if min(k, T_q) <= count_q <= C the buffer
   holds every candidate with (distance, slot) <= tau_q, hence the exact top k; a radix select, a
   compaction and a sort of next_pow2(k) entries order them, and each slot's entry id is gathered
   (int64 positions and ids), then, when the scan is given values, the entry's value (token id).
   Otherwise the program scans the query's candidates itself through its C slots, shrinking them
   to the k smallest whenever they fill: exact, no extra memory, slow, only for the queries whose
   bound failed, detected on the device.

Distance keys are int32 that order like the ADC distances (negative ones included:
``bits ^ ((bits >> 31) & 0x7FFFFFFF)``); every kernel computes them with ``_slot_keys``. Ties go to
the smaller slot, i.e. the entry stored first: the reference scan's order. Launches, bytes and
scratch: :func:`arrag_kernels.ops.ivfpq_plan.ivfpq_plan`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ivfpq import ivfpq_dispatcher, slots
from ..ivfpq_plan import BLOCK_SLOTS, MAX_SLOTS, ScanShape, scan_shape
from ..knn_plan import RADIX_BITS, SAFETY_SIGMAS, SELECT_TILE
from ._common import INDEX_DTYPES, device_reason, dtype_reason, launch, select_scratch
from .knn import _append_survivors, _keep_smallest, _kth_smallest, _load_entries


@triton.jit
def _probe_of(s, ends_row, nprobe, search_steps):
    """Probe index of each slot ``s``: the first whose end slot is > s (binary search over the nprobe ends)."""
    j_lo = tl.zeros(s.shape, tl.int32)
    j_hi = j_lo + nprobe
    for _ in range(search_steps):  # ceil(log2(nprobe + 1)): a runtime bound, not one kernel per nprobe
        mid = (j_lo + j_hi) // 2
        open_ = j_lo < j_hi
        end = tl.load(ends_row + mid, mask=open_, other=0)
        j_lo = tl.where(open_ & (end <= s), mid + 1, j_lo)
        j_hi = tl.where(open_ & (end > s), mid, j_hi)
    return tl.minimum(j_lo, nprobe - 1)


@triton.jit
def _entry_of(s, lists_row, ends_row, offsets_ptr, nprobe, search_steps):
    """(int64 entry position, list id, probe index) of each slot ``s``."""
    j = _probe_of(s, ends_row, nprobe, search_steps)
    lst = tl.load(lists_row + j)
    start = tl.load(offsets_ptr + lst)
    slot0 = tl.load(ends_row + j) - (tl.load(offsets_ptr + lst + 1) - start)
    return start + (s - slot0), lst, j


@triton.jit
def _slot_keys(s, valid, lists_row, dis0_row, ends_row, term1_ptr, t2_row, codes_ptr, offsets_ptr, nprobe,
               search_steps, M: tl.constexpr, KSUB: tl.constexpr):
    """int32 keys ordering like the ADC distances of slots ``s`` (where ``valid``)."""
    pos, lst, j = _entry_of(s, lists_row, ends_row, offsets_ptr, nprobe, search_steps)
    m = tl.arange(0, M)
    c = tl.load(codes_ptr + pos[:, None] * M + m[None, :], mask=valid[:, None], other=0).to(tl.int32)
    lut = tl.load(term1_ptr + lst[:, None] * (M * KSUB) + m[None, :] * KSUB + c, mask=valid[:, None], other=0.0)
    lut += tl.load(t2_row + m[None, :] * KSUB + c, mask=valid[:, None], other=0.0)
    bits = (tl.load(dis0_row + j) + tl.sum(lut, axis=1)).to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _candidates(ends_ptr, qi, nprobe, max_candidates):
    """int64 number of candidate slots of query ``qi``."""
    return tl.minimum(tl.load(ends_ptr + qi.to(tl.int64) * nprobe + nprobe - 1), max_candidates)


# Integer arguments that vary with nprobe, the database or k are never specialised: one compiled
# kernel per block configuration, whatever the search.
@triton.jit(do_not_specialize=["nprobe", "max_candidates", "S", "search_steps"])
def _ivfpq_sample_kernel(
    lists_ptr, dis0_ptr, ends_ptr, term1_ptr, term2_ptr, codes_ptr, offsets_ptr, keys_ptr, slots_ptr,
    nprobe, max_candidates, S, search_steps, M: tl.constexpr, KSUB: tl.constexpr, BLOCK: tl.constexpr,
):
    qi = tl.program_id(1)
    row = qi.to(tl.int64) * nprobe
    total = _candidates(ends_ptr, qi, nprobe, max_candidates)
    size = tl.minimum(total, S)
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < size
    s = (i.to(tl.int64) * total) // tl.maximum(size, 1)  # distinct, evenly spaced; i itself when size = total
    key = _slot_keys(s, ok, lists_ptr + row, dis0_ptr + row, ends_ptr + row, term1_ptr, term2_ptr + qi * (M * KSUB),
                     codes_ptr, offsets_ptr, nprobe, search_steps, M, KSUB)
    at = qi.to(tl.int64) * S + i
    tl.store(keys_ptr + at, key, mask=ok)
    tl.store(slots_ptr + at, s.to(tl.int32), mask=ok)


@triton.jit(do_not_specialize=["nprobe", "max_candidates", "S", "k"])
def _ivfpq_bound_kernel(keys_ptr, slots_ptr, ends_ptr, bound_ptr, count_ptr, nprobe, max_candidates, S, k,
                        count_stride, SIGMAS: tl.constexpr, TILE: tl.constexpr, RADIX: tl.constexpr):
    qi = tl.program_id(0)
    total = _candidates(ends_ptr, qi, nprobe, max_candidates)
    size = tl.minimum(total, S).to(tl.int32)
    # ivfpq_plan.sample_rank, per query
    hits = k * size.to(tl.float32) / tl.maximum(total, 1).to(tl.float32)
    rank = tl.minimum(tl.ceil(hits + SIGMAS * tl.sqrt(hits) + 4.0).to(tl.int32), size)
    rank = tl.where(size == total, tl.minimum(size, k), rank)
    bound = tl.full([], -0x7FFFFFFFFFFFFFFF - 1, tl.int64)  # no candidates: keep nothing
    if size > 0:
        row = qi.to(tl.int64) * S
        bound = _kth_smallest(keys_ptr + row, slots_ptr + row, size, rank, TILE, RADIX)
    tl.store(bound_ptr + qi, bound)
    tl.store(count_ptr + qi * count_stride, 0)


@triton.jit(do_not_specialize=["nprobe", "max_candidates", "C", "tiles", "search_steps"])
def _ivfpq_filter_kernel(
    lists_ptr, dis0_ptr, ends_ptr, term1_ptr, term2_ptr, codes_ptr, offsets_ptr, bound_ptr, keys_ptr, slots_ptr,
    count_ptr, nprobe, max_candidates, C, tiles, search_steps, count_stride,
    M: tl.constexpr, KSUB: tl.constexpr, BLOCK: tl.constexpr,
):
    qi = tl.program_id(1)
    row = qi.to(tl.int64) * nprobe
    total = _candidates(ends_ptr, qi, nprobe, max_candidates)
    tau = tl.load(bound_ptr + qi)
    tau_key = (tau >> 32).to(tl.int32)
    tau_slot = (tau & 0xFFFFFFFF).to(tl.int32)
    out = qi.to(tl.int64) * C
    first = tl.program_id(0).to(tl.int64) * tiles * BLOCK
    for t in range(tiles):
        s = first + t * BLOCK + tl.arange(0, BLOCK)
        ok = s < total
        key = _slot_keys(s, ok, lists_ptr + row, dis0_ptr + row, ends_ptr + row, term1_ptr,
                         term2_ptr + qi * (M * KSUB), codes_ptr, offsets_ptr, nprobe, search_steps, M, KSUB)
        s32 = s.to(tl.int32)
        keep = ok & ((key < tau_key) | ((key == tau_key) & (s32 <= tau_slot)))  # 32-bit compares
        # One atomic per survivor (a few k of the candidates) on a counter 128 B from the others.
        at = tl.atomic_add(count_ptr + qi * count_stride + tl.zeros([BLOCK], tl.int32), 1, mask=keep, sem="relaxed")
        tl.store(keys_ptr + out + at, key, mask=keep & (at < C))
        tl.store(slots_ptr + out + at, s32, mask=keep & (at < C))


@triton.jit
def _scan_all_slots(keys_ptr, slots_ptr, total, k, C, lists_row, dis0_row, ends_row, term1_ptr, t2_row, codes_ptr,
                    offsets_ptr, nprobe, search_steps, M: tl.constexpr, KSUB: tl.constexpr, BLOCK: tl.constexpr,
                    TILE: tl.constexpr, RADIX: tl.constexpr):
    """The fallback: every candidate of one query through its C slots (C >= k + BLOCK, or C >= total),
    shrunk to the k smallest whenever the next tile may not fit; returns the entry count (the top k are in)."""
    count = tl.zeros([], tl.int32)
    tau = tl.full([], 0x7FFFFFFFFFFFFFFF, tl.int64)
    for start in range(0, total, BLOCK):
        s = tl.cast(start, tl.int64) + tl.arange(0, BLOCK)
        ok = s < total
        key = _slot_keys(s, ok, lists_row, dis0_row, ends_row, term1_ptr, t2_row, codes_ptr, offsets_ptr, nprobe,
                         search_steps, M, KSUB)
        count, tau = _append_survivors(keys_ptr, slots_ptr, count, tau, key, s, ok, C, k, TILE, RADIX)
    return count


@triton.jit(do_not_specialize=["nprobe", "max_candidates", "C", "k", "search_steps"])
def _ivfpq_select_kernel(
    lists_ptr, dis0_ptr, ends_ptr, term1_ptr, term2_ptr, codes_ptr, offsets_ptr, ids_ptr, keys_ptr, slots_ptr,
    count_ptr, values_ptr, dist_ptr, out_ids_ptr, out_values_ptr, nprobe, max_candidates, C, k, search_steps,
    count_stride, M: tl.constexpr, KSUB: tl.constexpr, KB: tl.constexpr, BLOCK: tl.constexpr, TILE: tl.constexpr,
    RADIX: tl.constexpr, GATHER: tl.constexpr,
):
    qi = tl.program_id(0)
    row = qi.to(tl.int64) * nprobe
    total = _candidates(ends_ptr, qi, nprobe, max_candidates)
    need = tl.minimum(total, k).to(tl.int32)
    keys_row = keys_ptr + qi.to(tl.int64) * C
    slots_row = slots_ptr + qi.to(tl.int64) * C
    count = tl.load(count_ptr + qi * count_stride)
    if (count < need) | (count > C):  # the bound failed for this query: its survivors are not the whole story
        count = _scan_all_slots(keys_row, slots_row, total, k, C, lists_ptr + row, dis0_ptr + row, ends_ptr + row,
                                term1_ptr, term2_ptr + qi * (M * KSUB), codes_ptr, offsets_ptr, nprobe, search_steps,
                                M, KSUB, BLOCK, TILE, RADIX)
        tl.debug_barrier()
    if need > 0:
        kth = _kth_smallest(keys_row, slots_row, count, need, TILE, RADIX)
        tl.debug_barrier()
        _keep_smallest(keys_row, slots_row, count, kth, TILE)  # exactly `need` entries: (key, slot) pairs are distinct
        tl.debug_barrier()
    j = tl.arange(0, KB)
    real = j < need
    x = tl.sort(_load_entries(keys_row, slots_row, j, real))
    key = (x >> 32).to(tl.int32)
    dist = (key ^ ((key >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
    pos, _, _ = _entry_of(x & 0xFFFFFFFF, lists_ptr + row, ends_ptr + row, offsets_ptr, nprobe, search_steps)
    out = qi.to(tl.int64) * k + j
    tl.store(dist_ptr + out, tl.where(real, dist, 3.4028234663852886e38), mask=j < k)
    entry = tl.where(real, tl.load(ids_ptr + pos, mask=real, other=0), -1)
    tl.store(out_ids_ptr + out, entry, mask=j < k)
    if GATHER:  # the entries' values (token ids) as int64, -1 in padded slots
        v = tl.load(values_ptr + entry, mask=real, other=0)
        tl.store(out_values_ptr + out, tl.where(real, v.to(tl.int64), -1), mask=j < k)


def _scratch(shape: ScanShape, device) -> dict[str, torch.Tensor]:
    """The scan's buffers (``ivfpq_plan``'s ``scratch``; none needs initialising)."""
    return select_scratch(shape, device, ("sample_keys", "sample_slots"), ("keys", "slots"))


def ivfpq_scan_search(lists, dis0, term2, term1, codes, ids, offsets, k, max_candidates, values=None,
                      shape: ScanShape | None = None):
    """The Triton scan (contract of :func:`arrag_kernels.ops.ivfpq.ivfpq_scan`), returning (dist, ids,
    values[ids]) (the last empty without ``values``); ``shape`` overrides the sizes of :func:`scan_shape`
    (tests force the fallback with it)."""
    q, nprobe = lists.shape
    _, m, ksub = term1.shape
    dist = torch.empty(q, k, dtype=torch.float32, device=lists.device)
    out_ids = torch.empty(q, k, dtype=torch.int64, device=lists.device)
    gathered = torch.empty(q if values is not None else 0, k, dtype=torch.int64, device=lists.device)
    if q == 0:
        return dist, out_ids, gathered
    s = shape or scan_shape(q, k, max_candidates, nprobe, m, ksub)
    buf = _scratch(s, lists.device)
    _, _, ends = slots(lists, offsets)
    probes = (lists.contiguous(), dis0.contiguous(), ends, term1.contiguous(), term2.contiguous(), codes.contiguous(),
              offsets.contiguous())
    steps = nprobe.bit_length()
    grids = s.grids
    dims = dict(M=m, KSUB=ksub)
    launch(_ivfpq_sample_kernel, grids["sample"], *probes, buf["sample_keys"], buf["sample_slots"],
            nprobe, max_candidates, s.sample, steps, **dims, BLOCK=BLOCK_SLOTS, num_warps=4)
    launch(_ivfpq_bound_kernel, grids["bound"], buf["sample_keys"], buf["sample_slots"], ends, buf["bound"],
            buf["counts"], nprobe, max_candidates, s.sample, k, 32, SIGMAS=float(SAFETY_SIGMAS),
            TILE=SELECT_TILE, RADIX=RADIX_BITS, num_warps=8)
    launch(_ivfpq_filter_kernel, grids["filter"], *probes, buf["bound"], buf["keys"], buf["slots"], buf["counts"],
            nprobe, max_candidates, s.capacity, s.tiles, steps, 32, **dims, BLOCK=BLOCK_SLOTS, num_warps=4)
    launch(_ivfpq_select_kernel, grids["select"], *probes, ids.contiguous(), buf["keys"], buf["slots"],
            buf["counts"], out_ids if values is None else values, dist, out_ids, gathered,  # placeholder: never read
            nprobe, max_candidates, s.capacity, k, steps, 32,
            **dims, KB=s.kb, BLOCK=BLOCK_SLOTS, TILE=SELECT_TILE, RADIX=RADIX_BITS, GATHER=values is not None,
            num_warps=8)
    return dist, out_ids, gathered


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
    values: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bound, filter and select, then the slots' ids and values (contract of
    :func:`arrag_kernels.ops.ivfpq.ivfpq_scan`; the values (0, k) without ``values``)."""
    return ivfpq_scan_search(lists, dis0, term2, term1, codes, ids, offsets, k, max_candidates, values)


def _check(lists, dis0, term2, term1, codes, ids, offsets, k, max_candidates, values=None):
    m = term1.shape[1]
    if m & (m - 1):
        return f"M = {m} sub-quantizers is not a power of two (Triton block shapes)"
    if max_candidates >= MAX_SLOTS:
        return f"{max_candidates} candidates per query exceed the Triton scan's limit of {MAX_SLOTS} (int32 slots)"
    return device_reason(lists) or (None if values is None else dtype_reason("values", values, INDEX_DTYPES))


@ivfpq_dispatcher.register("triton", check=_check)
def ivfpq_scan_triton(lists, dis0, term2, term1, codes, ids, offsets, k, max_candidates, values=None):
    """Triton implementation of :func:`arrag_kernels.ops.ivfpq.ivfpq_scan` (same contract)."""
    dist, out_ids, gathered = ivfpq_scan_op(lists, dis0, term2, term1, codes, ids, offsets, k, max_candidates, values)
    return (dist, out_ids) if values is None else (dist, out_ids, gathered)
