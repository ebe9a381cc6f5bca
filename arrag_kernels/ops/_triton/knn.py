"""Triton exact k-NN: a sampled bound, one streaming filter over the keys, a radix select per query.

Four launches whose sizes follow from the shapes alone (:func:`arrag_kernels.ops.knn_plan.search_shape`;
no host synchronisation: the search is CUDA-graph capturable):

1. ``_knn_sample_kernel``: distances of every query to a fixed sample of S keys, rows
   ``(i * step) mod N`` (``step`` coprime with N, ~0.618 N: distinct rows spread over the ids; all
   keys when S = N), stored as (distance bits, id) pairs.
2. ``_knn_bound_kernel`` (one program per query): the bound tau_q, the sample's r-th smallest
   (distance bits, id) by a radix select (4 histogram passes of 8 bits over the distance bits, then
   one pass for the smallest id at that distance, or 4 passes over the ids when the rank falls inside
   a run of equal distances), and the query's survivor counter reset. The key orders by distance, then id: ties are split by id, so a
   large group of equal distances does not flood the filter. r exceeds the expected number of sample
   keys among the true k nearest by 6 sigmas (``knn_plan.SAFETY_SIGMAS``).
3. ``_knn_filter_kernel``: ONE pass over the keys, each program taking tiles for up to 32 queries
   (a key is read once for all of them), distances from tensor-core dots at fp32 accuracy, a 32-bit
   compare with tau_q (distance bits, then id on equal bits) and survivor compaction: one atomic per
   survivor on the query's counter, slots past the capacity C dropped but counted.
4. ``_knn_select_kernel`` (one program per query): if k <= count_q <= C the buffer holds every key
   with (distance, id) <= tau_q, at least k of them, hence the exact top k whatever tau_q was; a
   radix select finds the k-th smallest, a compaction keeps the k entries up to it, and a sort of
   next_pow2(k) orders them (the public contract; distances ascending, ties by id), and, when the
   search is given values (a database's token ids), ``values[id]`` of each is gathered there too.
   Otherwise (the sample was unlike the data: fewer than k survivors, or more than C) the same
   program streams every key itself through its C slots, shrinking them to the k smallest by the
   same radix select whenever they fill: exact, no extra memory, slow (one program reads all keys),
   and only for the queries whose bound failed, detected on the device.

Distances are ``max(|q|^2 + |y|^2 - 2 q.y, 0)`` in fp32, the same code in every kernel
(``_tile_distance_bits``); ids are int32 (the kernels take fewer than 2^31 keys) and widen to int64
in the output. Launches, bytes and scratch: :func:`arrag_kernels.ops.knn_plan`.

Cost model at the target (10M fp16 keys x 32, k = 2048, 16 queries; not yet timed on a GPU): keys
read once (640 MB) by ~9.8k filter programs; the sample (39k keys, 2.5 MB) and every select pass add
~3 % (1.03x the keys' bytes in all), 8.8 MB of scratch. The selects are single programs per query
walking ~39k sample entries (bound) and ~7.4k survivors (select) in steps of 4096: ~50 and ~15
latency-bound steps, then a 2048-entry sort; they, not bytes, are what may keep the search above the
floor at 1M keys.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..knn import MAX_K, knn_dispatcher
from ..knn_plan import MAX_DIM, MAX_KEYS, MIN_BLOCK_Q, RADIX_BITS, SELECT_TILE, SearchShape, search_shape
from ._common import FLOAT_DTYPES, INDEX_DTYPES, device_reason, dtype_reason, launch, select_scratch

# sm_90, fp16 keys, D = 32, 16 queries: 108 registers with 8 warps (2 programs, 16 warps per SM), 150
# with 4 (3 programs, 12 warps); no spills either way. From ptxas, not yet timed on a GPU.
_FILTER_WARPS = 8


@triton.jit
def _query_rows(q_ptr, k_ptr, qi, qok, D, q_stride, BLOCK_D: tl.constexpr):
    """A block of queries ready for ``_tile_distance_bits``: (|q|^2, three dot operands, the dot's factor)."""
    cols = tl.arange(0, BLOCK_D)
    q = tl.load(q_ptr + qi[:, None] * q_stride + cols[None, :], mask=qok[:, None] & (cols[None, :] < D), other=0.0)
    q = q.to(tl.float32)
    qn = tl.sum(q * q, axis=1)
    # fp32 keys: 3xTF32. Keys of a 16-bit type are exact in it, so each query is split into 3 parts
    # of that type (3 x 11 or 3 x 8 bits >= fp32's 24) after a per-query power-of-two scaling that
    # puts its largest entry in [2^14, 2^15) (inside fp16's range; lower parts rarely subnormal):
    # every product is exact and only the fp32 accumulation rounds.
    if k_ptr.dtype.element_ty == tl.float32:
        c = tl.full([qi.shape[0]], -2.0, tl.float32)
        p0, p1, p2 = q, q, q
    else:
        e = (tl.max(tl.abs(q), axis=1).to(tl.int32, bitcast=True) >> 23) & 0xFF  # biased exponent
        scale = (tl.minimum(tl.maximum(268 - e, 1), 254) << 23).to(tl.float32, bitcast=True)
        p0, rest = _split(q * scale[:, None], k_ptr.dtype.element_ty)
        p1, rest = _split(rest, k_ptr.dtype.element_ty)
        p2, rest = _split(rest, k_ptr.dtype.element_ty)
        c = -2.0 / scale  # a power of two: d = fma(dot, c, qn + kn) rounds once, like qn + kn - 2 dot
    return qn, p0, p1, p2, c


@triton.jit
def _split(rest, dtype: tl.constexpr):
    part = rest.to(dtype)
    return part, rest - part.to(tl.float32)  # exact: a float's rounding error is a float


@triton.jit
def _tile_distance_bits(qn, p0, p1, p2, c, k):
    """(BLOCK_Q, BLOCK_N) int32 bits of the squared distances to the key tile ``k`` (BLOCK_N, BLOCK_D):
    non-negative floats, whose bits order like them (the sign of a -0.0 cleared)."""
    kt = tl.trans(k)
    if k.dtype == tl.float32:
        dot = tl.dot(p0, kt, input_precision="tf32x3")
    else:
        dot = tl.dot(p2, kt, tl.dot(p1, kt, tl.dot(p0, kt)))
    kf = k.to(tl.float32)
    dist = tl.maximum(qn[:, None] + tl.sum(kf * kf, axis=1)[None, :] + dot * c[:, None], 0.0)
    return dist.to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def _load_entries(bits_ptr, ids_ptr, offs, ok):
    """Entries as int64 ``bits << 32 | id`` (missing ones: int64 max, after every real entry)."""
    b = tl.load(bits_ptr + offs, mask=ok, other=0).to(tl.int64)
    i = tl.load(ids_ptr + offs, mask=ok, other=0).to(tl.int64)
    return tl.where(ok, (b << 32) | i, 0x7FFFFFFFFFFFFFFF)


@triton.jit
def _select_digits(val_ptr, eq_ptr, eq_value, m, rank, FILTERED: tl.constexpr, TILE: tl.constexpr,
                   RADIX: tl.constexpr):
    """(v, r): the rank-th smallest (1-based) of the int32 values ``val_ptr[:m]`` (only those whose
    ``eq_ptr`` entry equals ``eq_value`` when FILTERED), and its rank among the entries equal to it. A
    radix select: one histogram pass per RADIX-bit digit from the top, over the entries that match the
    digits found so far. The digits are those of ``v ^ sign bit``, which order like signed values
    (the IVF-PQ scan's distance keys can be negative)."""
    bins = tl.arange(0, 1 << RADIX)
    sign = tl.full([], 1, tl.int32) << 31
    prefix = tl.zeros([], tl.int32)
    for p in tl.static_range(32 // RADIX):
        shift = 32 - RADIX * (p + 1)
        hist = tl.zeros([1 << RADIX], tl.int32)
        for start in range(0, m, TILE):
            offs = start + tl.arange(0, TILE)
            ok = offs < m
            v = tl.load(val_ptr + offs, mask=ok, other=0) ^ sign
            if FILTERED:
                ok = ok & (tl.load(eq_ptr + offs, mask=ok, other=0) == eq_value)
            if p > 0:
                ok = ok & ((v >> (shift + RADIX)) == (prefix >> (shift + RADIX)))
            hist += tl.histogram((v >> shift) & ((1 << RADIX) - 1), 1 << RADIX, mask=ok)
        below = tl.cumsum(hist, 0)
        digit = tl.sum((below < rank).to(tl.int32), 0)  # the bin holding the rank-th entry
        rank -= tl.sum(tl.where(bins < digit, hist, 0), 0)
        prefix = prefix | (digit << shift)
    return prefix ^ sign, rank


@triton.jit
def _kth_smallest(bits_ptr, ids_ptr, m, rank, TILE: tl.constexpr, RADIX: tl.constexpr):
    """The rank-th smallest (1-based, rank <= m) of the first m entries, as int64 ``bits << 32 | id``:
    its distance bits by a radix select, then its id: the smallest among the entries of those bits
    (one pass) unless ties put it further in (a radix select of their ids)."""
    bits, rank = _select_digits(bits_ptr, bits_ptr, 0, m, rank, False, TILE, RADIX)
    if rank == 1:
        best = tl.full([TILE], 0x7FFFFFFF, tl.int32)
        for start in range(0, m, TILE):
            offs = start + tl.arange(0, TILE)
            ok = offs < m
            ok = ok & (tl.load(bits_ptr + offs, mask=ok, other=0) == bits)
            best = tl.minimum(best, tl.load(ids_ptr + offs, mask=ok, other=0x7FFFFFFF))
        id = tl.min(best, 0)
    else:
        id, rank = _select_digits(ids_ptr, bits_ptr, bits, m, rank, True, TILE, RADIX)
    return (bits.to(tl.int64) << 32) | id.to(tl.int64)


@triton.jit
def _keep_smallest(bits_ptr, ids_ptr, m, tau, TILE: tl.constexpr):
    """Moves the entries <= tau among the first m to the front, in order; returns their count. In
    place: an entry moves only backwards, past entries already read (this program's own loads)."""
    count = tl.zeros([], tl.int32)
    for start in range(0, m, TILE):
        offs = start + tl.arange(0, TILE)
        x = _load_entries(bits_ptr, ids_ptr, offs, offs < m)
        keep = x <= tau
        slot = count + tl.cumsum(keep.to(tl.int32), 0) - 1
        tl.store(bits_ptr + slot, (x >> 32).to(tl.int32), mask=keep)
        tl.store(ids_ptr + slot, (x & 0xFFFFFFFF).to(tl.int32), mask=keep)
        count += tl.sum(keep.to(tl.int32), 0)
    return count


@triton.jit
def _append_survivors(bits_ptr, ids_ptr, count, tau, bits, ids, ok, C, k, TILE: tl.constexpr, RADIX: tl.constexpr):
    """One tile of the fallback's stream: appends the tile's entries ``bits << 32 | ids`` that are <= tau
    (and ``ok``) after the first ``count`` slots, first shrinking those to the k smallest (a tighter tau)
    when the tile might not fit in the C slots; returns the new (count, tau)."""
    x = (bits.to(tl.int64) << 32) | ids
    keep = ok & (x <= tau)
    kept = tl.sum(keep.to(tl.int32), 0)
    if count + kept > C:  # then count > C - tile >= k
        tl.debug_barrier()  # the slots' stores visible to the whole program
        tau = _kth_smallest(bits_ptr, ids_ptr, count, k, TILE, RADIX)
        tl.debug_barrier()
        count = _keep_smallest(bits_ptr, ids_ptr, count, tau, TILE)
        keep = keep & (x <= tau)
        kept = tl.sum(keep.to(tl.int32), 0)
    slot = count + tl.cumsum(keep.to(tl.int32), 0) - 1
    tl.store(bits_ptr + slot, bits, mask=keep)
    tl.store(ids_ptr + slot, ids.to(tl.int32), mask=keep)
    return count + kept, tau


# Sizes are not specialised (one compiled kernel per dtype, D and block sizes, not per database size
# or k: cold compilation dominates a short GPU session); strides are, for their alignment.
@triton.jit(do_not_specialize=["Q", "N", "S", "step"])
def _knn_sample_kernel(
    q_ptr, k_ptr, bits_ptr, ids_ptr, Q, N, D, S, step, q_stride, k_stride, buf_stride,
    BLOCK_N: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
):
    nqb = tl.cdiv(Q, BLOCK_Q)
    qi = (tl.program_id(0) % nqb) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    qok = qi < Q
    qn, p0, p1, p2, c = _query_rows(q_ptr, k_ptr, qi, qok, D, q_stride, BLOCK_D)
    i = (tl.program_id(0) // nqb) * BLOCK_N + tl.arange(0, BLOCK_N)
    iok = i < S
    row = (i.to(tl.int64) * step) % N
    cols = tl.arange(0, BLOCK_D)
    k = tl.load(k_ptr + row[:, None] * k_stride + cols[None, :], mask=iok[:, None] & (cols[None, :] < D), other=0.0)
    bits = _tile_distance_bits(qn, p0, p1, p2, c, k)
    at = qi.to(tl.int64)[:, None] * buf_stride + i[None, :]
    ok = qok[:, None] & iok[None, :]
    tl.store(bits_ptr + at, bits, mask=ok)
    tl.store(ids_ptr + at, tl.broadcast_to(row.to(tl.int32)[None, :], bits.shape), mask=ok)


@triton.jit(do_not_specialize=["S", "rank"])
def _knn_bound_kernel(bits_ptr, ids_ptr, bound_ptr, count_ptr, S, rank, buf_stride, count_stride,
                      TILE: tl.constexpr, RADIX: tl.constexpr):
    qi = tl.program_id(0)
    row = qi.to(tl.int64) * buf_stride
    tl.store(bound_ptr + qi, _kth_smallest(bits_ptr + row, ids_ptr + row, S, rank, TILE, RADIX))
    tl.store(count_ptr + qi * count_stride, 0)


@triton.jit(do_not_specialize=["Q", "N", "C", "tiles"])
def _knn_filter_kernel(
    q_ptr, k_ptr, bound_ptr, bits_ptr, ids_ptr, count_ptr,
    Q, N, D, C, tiles, q_stride, k_stride, buf_stride, count_stride,
    BLOCK_N: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Query blocks vary fastest: the programs sharing key tiles run together (L2) when Q > BLOCK_Q.
    nqb = tl.cdiv(Q, BLOCK_Q)
    qi = (tl.program_id(0) % nqb) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    first = (tl.program_id(0) // nqb).to(tl.int64) * tiles * BLOCK_N
    cols = tl.arange(0, BLOCK_D)
    qok = qi < Q
    qn, p0, p1, p2, c = _query_rows(q_ptr, k_ptr, qi, qok, D, q_stride, BLOCK_D)
    tau = tl.load(bound_ptr + qi, mask=qok, other=0)
    tau_bits = tl.where(qok, (tau >> 32).to(tl.int32), -1)  # padding queries keep nothing
    tau_id = (tau & 0xFFFFFFFF).to(tl.int32)
    count_row = count_ptr + qi * count_stride
    row = qi.to(tl.int64) * buf_stride
    # Several tiles per program: the compiler pipelines their loads (num_stages).
    for t in range(tiles):
        n = first + t * BLOCK_N + tl.arange(0, BLOCK_N)
        nok = n < N
        k = tl.load(k_ptr + n[:, None] * k_stride + cols[None, :], mask=nok[:, None] & (cols[None, :] < D), other=0.0)
        bits = _tile_distance_bits(qn, p0, p1, p2, c, k)
        n32 = n.to(tl.int32)
        # 32-bit compares: (bits, id) <= (tau_bits, tau_id)
        keep = (bits < tau_bits[:, None]) | ((bits == tau_bits[:, None]) & (n32[None, :] <= tau_id[:, None]))
        keep = keep & nok[None, :]
        # One atomic per survivor (a few k of N per query) on counters 128 B apart, in different L2
        # slices; slots past C are dropped but counted.
        slot = tl.atomic_add(tl.broadcast_to(count_row[:, None], keep.shape), 1, mask=keep, sem="relaxed")
        tl.store(bits_ptr + row[:, None] + slot, bits, mask=keep & (slot < C))
        tl.store(ids_ptr + row[:, None] + slot, tl.broadcast_to(n32[None, :], keep.shape), mask=keep & (slot < C))


@triton.jit
def _stream_all_keys(q_ptr, k_ptr, qi, bits_ptr, ids_ptr, N, D, C, k, q_stride, k_stride,
                     BLOCK_N: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, TILE: tl.constexpr,
                     RADIX: tl.constexpr):
    """The fallback: every key of query ``qi`` through its C slots (C >= k + BLOCK_N, or C = N), shrunk
    to the k smallest whenever the next tile may not fit; returns the entry count (the top k are in)."""
    lane = tl.arange(0, BLOCK_Q)
    # Row 0 of a BLOCK_Q-row dot: the distances' code and rounding are the filter's.
    qn, p0, p1, p2, c = _query_rows(q_ptr, k_ptr, qi + lane, lane == 0, D, q_stride, BLOCK_D)
    cols = tl.arange(0, BLOCK_D)
    count = tl.zeros([], tl.int32)
    tau = tl.full([], 0x7FFFFFFFFFFFFFFF, tl.int64)
    for start in range(0, N, BLOCK_N):
        n = tl.cast(start, tl.int64) + tl.arange(0, BLOCK_N)  # int64: the last tile may pass 2^31
        nok = n < N
        kt = tl.load(k_ptr + n[:, None] * k_stride + cols[None, :],
                     mask=nok[:, None] & (cols[None, :] < D), other=0.0)
        bits = tl.sum(tl.where(lane[:, None] == 0, _tile_distance_bits(qn, p0, p1, p2, c, kt), 0), axis=0)
        count, tau = _append_survivors(bits_ptr, ids_ptr, count, tau, bits, n, nok, C, k, TILE, RADIX)
    return count


@triton.jit(do_not_specialize=["N", "C", "k"])
def _knn_select_kernel(
    q_ptr, k_ptr, bits_ptr, ids_ptr, count_ptr, values_ptr, dist_ptr, out_ids_ptr, out_values_ptr,
    N, D, C, k, q_stride, k_stride, buf_stride, count_stride, out_stride,
    KB: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, TILE: tl.constexpr,
    RADIX: tl.constexpr, GATHER: tl.constexpr,
):
    qi = tl.program_id(0)
    bits_row = bits_ptr + qi.to(tl.int64) * buf_stride
    ids_row = ids_ptr + qi.to(tl.int64) * buf_stride
    count = tl.load(count_ptr + qi * count_stride)
    if (count < k) | (count > C):  # the bound failed for this query: its survivors are not the whole story
        count = _stream_all_keys(q_ptr, k_ptr, qi, bits_row, ids_row, N, D, C, k, q_stride, k_stride,
                                 BLOCK_N, BLOCK_Q, BLOCK_D, TILE, RADIX)
        tl.debug_barrier()
    kth = _kth_smallest(bits_row, ids_row, count, k, TILE, RADIX)
    tl.debug_barrier()
    _keep_smallest(bits_row, ids_row, count, kth, TILE)  # exactly k entries: (bits, id) pairs are distinct
    tl.debug_barrier()
    j = tl.arange(0, KB)
    x = tl.sort(_load_entries(bits_row, ids_row, j, j < k))
    out = qi.to(tl.int64) * out_stride + j
    tl.store(dist_ptr + out, (x >> 32).to(tl.int32).to(tl.float32, bitcast=True), mask=j < k)
    tl.store(out_ids_ptr + out, x & 0xFFFFFFFF, mask=j < k)
    if GATHER:  # the entries' values (token ids), as int64
        v = tl.load(values_ptr + (x & 0xFFFFFFFF), mask=j < k, other=0)
        tl.store(out_values_ptr + out, v.to(tl.int64), mask=j < k)


def _scratch(shape: SearchShape, device) -> dict[str, torch.Tensor]:
    """The search's buffers (``knn_plan``'s ``scratch``; none needs initialising)."""
    return select_scratch(shape, device, ("sample_bits", "sample_ids"), ("bits", "ids"))


def knn_search(queries: torch.Tensor, keys: torch.Tensor, k: int, values: torch.Tensor | None = None,
               shape: SearchShape | None = None):
    """(Q, D) queries, (N, D) keys -> (Q, k) fp32 distances ascending, (Q, k) int64 ids (ties by id) and
    (Q, k) int64 ``values[ids]`` (empty without ``values``). ``shape`` overrides the sizes of
    :func:`search_shape` (tests force the fallback with it)."""
    Q, D = queries.shape
    N = keys.shape[0]
    dist = torch.empty(Q, k, dtype=torch.float32, device=keys.device)
    ids = torch.empty(Q, k, dtype=torch.int64, device=keys.device)
    gathered = torch.empty(Q if values is not None else 0, k, dtype=torch.int64, device=keys.device)
    if Q == 0:
        return dist, ids, gathered
    s = shape or search_shape(N, D, k, Q, keys.element_size())
    buf = _scratch(s, keys.device)
    grids = s.grids
    dims = dict(BLOCK_N=s.block_n, BLOCK_Q=s.block_q, BLOCK_D=s.block_d)
    launch(_knn_sample_kernel, grids["sample"], queries, keys, buf["sample_bits"], buf["sample_ids"],
            Q, N, D, s.sample, s.sample_step, queries.stride(0), keys.stride(0), s.sample, **dims)
    launch(_knn_bound_kernel, grids["bound"], buf["sample_bits"], buf["sample_ids"], buf["bound"], buf["counts"],
            s.sample, s.rank, s.sample, 32, TILE=SELECT_TILE, RADIX=RADIX_BITS, num_warps=8)
    launch(_knn_filter_kernel, grids["filter"], queries, keys, buf["bound"], buf["bits"], buf["ids"], buf["counts"],
            Q, N, D, s.capacity, s.tiles, queries.stride(0), keys.stride(0), s.capacity, 32,
            **dims, num_warps=_FILTER_WARPS, num_stages=3)
    launch(_knn_select_kernel, grids["select"], queries, keys, buf["bits"], buf["ids"], buf["counts"],
            ids if values is None else values, dist, ids, gathered,  # without values, a placeholder never read
            N, D, s.capacity, k, queries.stride(0), keys.stride(0), s.capacity, 32, k,
            KB=s.kb, BLOCK_N=s.block_n, BLOCK_Q=MIN_BLOCK_Q, BLOCK_D=s.block_d, TILE=SELECT_TILE, RADIX=RADIX_BITS,
            GATHER=values is not None, num_warps=8)
    return dist, ids, gathered


@torch.library.triton_op("arrag_kernels::knn_triton", mutates_args=())
def knn_op(queries: torch.Tensor, keys: torch.Tensor, k: int,
           values: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Q, D) queries, (N, D) keys -> (Q, k) fp32 distances ascending, (Q, k) int64 ids, (Q, k) int64
    ``values[ids]`` ((0, k) without values)."""
    return knn_search(queries, keys, k, values)


def _check(queries, keys, k, values=None):
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
        or (None if values is None else dtype_reason("values", values, INDEX_DTYPES))
    )


@knn_dispatcher.register("triton", check=_check)
def knn_triton(queries, keys, k, values=None):
    """Triton implementation of :func:`arrag_kernels.ops.knn` (same contract)."""
    dist, ids, gathered = knn_op(queries, keys, k, values)
    return (dist, ids) if values is None else (dist, ids, gathered)
