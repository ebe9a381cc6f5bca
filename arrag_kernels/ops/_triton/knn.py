"""Triton exact k-NN: fused squared-L2 distances and top-k.

Every candidate is packed into one int64, ``(float bits of d) << 32 | id``: distances are clamped
to >= 0, whose IEEE bits order like the floats, so ordering packed integers orders by distance and
then by id, which is exactly the reference's tie rule.

Block search (small k or few keys), two stages:
Stage 1 (``_knn_block_kernel``, grid (Q, N / BLOCK_N)): one program scans BLOCK_N keys for one
query, in coalesced tiles of SUB rows (distances in fp32), and keeps its KB = next_pow2(k)
smallest packed candidates. The query id varies fastest in the
grid, so the Q programs reading one key block run together and share it through L2.
Stage 2 (``_topk_merge_kernel``): each program reduces a CHUNK of candidates to KB, repeated until
one chunk is left (a tree; the number of launches depends on shapes only, never on data).

Selection is either a bitonic ``tl.topk`` (GPU, large k) or k rounds of min-and-mask (small k, and
always under the interpreter, where ``tl.topk`` takes minutes on a few thousand elements).

Threshold search (KB >= 256, N >= 2^18 keys, D <= 128). There the block search is far from the
memory floor: each query re-reads every key from L2, stage 1 writes KB candidates per 2 KB keys
and query (at 16 queries as many bytes as fp16 keys) and sorts them all. Instead, on each level:
(a) bound: tau_q = the k-th smallest packed candidate of the strided subset ``keys[::s]``, found
    by this same search on the subset (the next level; ``_bound_stride``: s ~ (N / KB)^(1/3), and
    a level of fewer than 16 KB keys has no bound). k distinct keys have packed value <= tau_q, so
    every true top-k key does too.
(b) filter (``_knn_filter_kernel``): one pass over the keys, each program taking tiles of BLOCK_N
    keys for up to 32 queries, so a key is read once for all of them, with the distances from
    tensor-core dots at fp32 accuracy. Candidates with packed <= tau_q take a slot of a per-query
    buffer of capacity C = 4 KB s (~4x the expected k s); slots past C are dropped but counted.
(c) select: the merge tree over the first min(count_q, C) slots only (``len_ptr``: the rest is
    never read, so the buffer needs no padding and chunks past the count cost nothing).
(d) exactness: if k <= count_q <= C, the buffer holds every key with packed <= tau_q, at least k
    of them, hence the true top k, whatever tau_q was. Queries outside that range (data whose
    strided subset is unlike the rest) are redone by the block search, launched every time with
    per-query key counts ``len_ptr`` that are 0 for the other queries, whose programs exit at once
    (on a grid of _FALLBACK_PROGRAMS per query); ``torch.where`` picks per query. A lower level
    that overflows still returns k real keys, a valid (looser) bound: only the top level needs this.
No host sync, and launches and shapes follow from shapes alone: the search is graph-capturable.

Cost at the target (N = 10M fp16 keys, D = 32, Q = 16, k = 2048; floor = 640 MB / 4.8 TB/s =
133 us on an H200). Design estimate: levels of 10M, 588k, 84k and 28k keys (s = 17, 7, 3); key
rows read 1.07 N, candidate buffers 16 x 249k x 8 B = 32 MB written and read once: ~1.2x the floor
in bytes (the block search: 640 MB of candidates written and read, 16 x 640 MB of L2 reads).
Selection ~0.2M candidates per query instead of ~13M. 16 launches, plus 13 of the fallback that
exit at once. The filter's compiled loop (sm_90) is ~30 PTX instructions per (key, query), ~145 us
at full issue rate. Measured on an H200 (README, Benchmarks): 2.58 ms at Q = 1 and 16 in a CUDA
graph, 19x the floor, so bytes are not what limits it; where the time goes is not yet profiled.
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
# Threshold search: from these sizes on (below, its 20-30 launches cost more than they save), for
# keys of up to FILTER_MAX_DIM dims (a key tile lives in registers). Estimates, to tune on a GPU.
THRESHOLD_MIN_KB = 256
THRESHOLD_MIN_KEYS = 1 << 18
FILTER_MAX_DIM = 128
# Programs per query of the fallback's block search: cheap to launch and exit, enough to run it.
_FALLBACK_PROGRAMS = 64


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
def _block_smallest(q, qn, cols, k_ptr, out_ptr, blk, N, D, k_stride,
                    BLOCK_N: tl.constexpr, SUB: tl.constexpr, KB: tl.constexpr, SORT: tl.constexpr):
    """Store the KB smallest packed candidates of key block ``blk`` (keys past N are missing)."""
    # The block's candidates as (R, SUB): keys are read in coalesced (SUB, D) row tiles, and tile i
    # is written into row i with a select (registers cannot be indexed dynamically).
    R: tl.constexpr = BLOCK_N // SUB
    tile = tl.arange(0, R)
    packed = tl.full([R, SUB], 0x7FFFFFFFFFFFFFFF, tl.int64)
    for i in range(R):
        n = tl.cast(blk, tl.int64) * BLOCK_N + i * SUB + tl.arange(0, SUB)
        inb = n < N
        mask = inb[:, None] & (cols[None, :] < D)
        # Upcast at once: bf16 arithmetic is wrong in the interpreter, and accumulation is fp32 anyway.
        k = tl.load(k_ptr + n[:, None] * k_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dist = tl.maximum(qn + tl.sum(k * k, axis=1) - 2.0 * tl.sum(k * q[None, :], axis=1), 0.0)
        bits = (dist.to(tl.int32, bitcast=True) & 0x7FFFFFFF).to(tl.int64)  # & drops the sign of a -0.0
        cand = tl.where(inb, (bits << 32) | n, 0x7FFFFFFFFFFFFFFF)
        packed = tl.where(tile[:, None] == i, cand[None, :], packed)
    _store_smallest(tl.reshape(packed, [BLOCK_N]), out_ptr + blk * KB, KB, SORT)


@triton.jit
def _knn_block_kernel(
    q_ptr, k_ptr, out_ptr, N, D, q_stride, k_stride, out_stride,
    BLOCK_N: tl.constexpr, SUB: tl.constexpr, BLOCK_D: tl.constexpr, KB: tl.constexpr, SORT: tl.constexpr,
    len_ptr=None, HAS_LEN: tl.constexpr = False,
):
    qi = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    q = tl.load(q_ptr + qi * q_stride + cols, mask=cols < D, other=0.0).to(tl.float32)
    qn = tl.sum(q * q, axis=0)
    out_ptr += qi.to(tl.int64) * out_stride
    if HAS_LEN:
        # Query qi searches only its first len[qi] keys (0: none, its output is not written), on a
        # grid that may be smaller than the number of blocks (the fallback's): programs loop.
        n_valid = tl.minimum(N, tl.load(len_ptr + qi))
        for blk in range(tl.program_id(1), tl.cdiv(n_valid, BLOCK_N), tl.num_programs(1)):
            _block_smallest(q, qn, cols, k_ptr, out_ptr, blk, n_valid, D, k_stride, BLOCK_N, SUB, KB, SORT)
    else:
        _block_smallest(q, qn, cols, k_ptr, out_ptr, tl.program_id(1), N, D, k_stride, BLOCK_N, SUB, KB, SORT)


@triton.jit
def _topk_merge_kernel(
    in_ptr, out_ptr, M, in_stride, out_stride, CHUNK: tl.constexpr, KB: tl.constexpr, SORT: tl.constexpr,
    len_ptr=None, len_stride=1, level=0, HAS_LEN: tl.constexpr = False,
):
    row = tl.program_id(0)
    m = M
    if HAS_LEN:
        # Row ``row`` had len[row] valid candidates ``level`` merges ago (the rest is never read) and
        # each merge keeps KB per CHUNK: chunks past that prefix are skipped and their output, which
        # no later level reads, is not written.
        m = tl.load(len_ptr + row * len_stride).to(tl.int64)
        for _ in range(level):  # a runtime loop: one compiled kernel for every level
            m = tl.cdiv(m, CHUNK) * KB
        m = tl.minimum(m, M)
    for chunk in range(tl.program_id(1), tl.cdiv(m, CHUNK), tl.num_programs(1)):
        cols = chunk * CHUNK + tl.arange(0, CHUNK)
        x = tl.load(in_ptr + row.to(tl.int64) * in_stride + cols, mask=cols < m, other=0x7FFFFFFFFFFFFFFF)
        _store_smallest(x, out_ptr + row.to(tl.int64) * out_stride + chunk * KB, KB, SORT)


@triton.jit
def _split(rest, dtype: tl.constexpr):
    part = rest.to(dtype)
    return part, rest - part.to(tl.float32)  # exact: a float's rounding error is a float


@triton.jit
def _knn_filter_kernel(
    q_ptr, k_ptr, bound_ptr, buf_ptr, count_ptr,
    Q, N, D, C, tau_col, id_scale, tiles, q_stride, k_stride, bound_stride, buf_stride, count_stride,
    BLOCK_N: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, HAS_BOUND: tl.constexpr,
):
    # Query blocks vary fastest: the programs sharing key tiles run together (L2) when Q > BLOCK_Q.
    nqb = tl.cdiv(Q, BLOCK_Q)
    qi = (tl.program_id(0) % nqb) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    first = (tl.program_id(0) // nqb).to(tl.int64) * tiles * BLOCK_N
    cols = tl.arange(0, BLOCK_D)
    qok = qi < Q
    q = tl.load(q_ptr + qi[:, None] * q_stride + cols[None, :], mask=qok[:, None] & (cols[None, :] < D), other=0.0)
    q = q.to(tl.float32)
    qn = tl.sum(q * q, axis=1)
    if HAS_BOUND:
        t = tl.load(bound_ptr + qi * bound_stride + tau_col, mask=qok, other=0)
        # The bound's ids index keys[::id_scale]; its row j is row j * id_scale here. tau stays
        # below an infinite distance, which marks the rows past N (kn below).
        lo = t & 0xFFFFFFFF
        t = tl.where(t == 0x7FFFFFFFFFFFFFFF, t, t - lo + lo * id_scale)
        tau = tl.where(qok, tl.minimum(t, (0x7F800000 << 32) - 1), -1)  # padding queries take nothing
        count_row = count_ptr + qi * count_stride
    buf_row = buf_ptr + qi.to(tl.int64) * buf_stride

    # Distances on tensor cores at fp32 accuracy, (BLOCK_Q, BLOCK_N) per tile: queries as the MMA
    # rows keeps the whole tile in one register layout, down to the atomics and stores.
    # fp32 keys: 3xTF32. Keys of a 16-bit type are exact in it, so each query is split into 3 parts
    # of that type (3 x 11 or 3 x 8 bits >= fp32's 24) after a per-query power-of-two scaling that
    # puts its largest entry in [2^14, 2^15) (inside fp16's range; lower parts rarely subnormal):
    # every product is exact and only the fp32 accumulation rounds, like the block search's FMAs.
    F32: tl.constexpr = k_ptr.dtype.element_ty == tl.float32
    if F32:
        c = tl.full([BLOCK_Q], -2.0, tl.float32)
    else:
        e = (tl.max(tl.abs(q), axis=1).to(tl.int32, bitcast=True) >> 23) & 0xFF  # biased exponent
        scale = (tl.minimum(tl.maximum(268 - e, 1), 254) << 23).to(tl.float32, bitcast=True)
        p0, rest = _split(q * scale[:, None], k_ptr.dtype.element_ty)
        p1, rest = _split(rest, k_ptr.dtype.element_ty)
        p2, rest = _split(rest, k_ptr.dtype.element_ty)
        c = -2.0 / scale  # a power of two: d = fma(dot, c, qn + kn) rounds once, like qn + kn - 2 dot

    # Several tiles per program: the compiler pipelines their loads (num_stages).
    for i in range(tiles):
        n = first + i * BLOCK_N + tl.arange(0, BLOCK_N)
        k = tl.load(k_ptr + n[:, None] * k_stride + cols[None, :], mask=(n < N)[:, None] & (cols[None, :] < D), other=0.0)
        kt = tl.trans(k)
        if F32:
            dot = tl.dot(q, kt, input_precision="tf32x3")
        else:
            dot = tl.dot(p2, kt, tl.dot(p1, kt, tl.dot(p0, kt)))
        kf = k.to(tl.float32)
        kn = tl.where(n < N, tl.sum(kf * kf, axis=1), float("inf"))
        dist = tl.maximum(qn[:, None] + kn[None, :] + dot * c[:, None], 0.0)
        packed = ((dist.to(tl.int32, bitcast=True) & 0x7FFFFFFF).to(tl.int64) << 32) | n[None, :]
        if HAS_BOUND:
            # One atomic per candidate (~k s of N per query, ~1 per tile) on counters 128 B apart, in
            # different L2 slices; slots past C are dropped but counted. An in-tile prefix sum with
            # one atomic per (tile, query) compiled to a 3x longer loop (layout conversions).
            keep = packed <= tau[:, None]
            slot = tl.atomic_add(tl.broadcast_to(count_row[:, None], keep.shape), 1, mask=keep, sem="relaxed")
            tl.store(buf_row[:, None] + slot, packed, mask=keep & (slot < C))
        else:  # every key is a candidate, at its own slot
            tl.store(buf_row[:, None] + n[None, :], packed, mask=qok[:, None] & (n < N)[None, :])


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


def _merge(cand, kb, chunk, sort, lens=None, programs=None, sorted_rows=True):
    """Merge tree: (Q, M) packed candidates -> (Q, KB) ascending.

    ``lens`` (Q,) int32, any stride: only the first lens[q] candidates of row q are valid, and rows
    with 0 are not written. ``programs`` caps the programs per row. Rows that are not
    ``sorted_rows`` get at least one merge.
    """
    level = 0
    while cand.shape[1] > kb or (level == 0 and not sorted_rows):
        nch = triton.cdiv(cand.shape[1], chunk)
        nxt = torch.empty(cand.shape[0], nch * kb, dtype=torch.int64, device=cand.device)
        torch.library.wrap_triton(_topk_merge_kernel)[(cand.shape[0], min(nch, programs or nch))](
            cand, nxt, cand.shape[1], cand.stride(0), nxt.stride(0), CHUNK=chunk, KB=kb, SORT=sort,
            len_ptr=cand if lens is None else lens, len_stride=1 if lens is None else lens.stride(0),
            level=level, HAS_LEN=lens is not None, num_warps=_warps(chunk),
        )
        cand = nxt
        level += 1
    return cand


def _block_search(queries, keys, k, sort, lens=None):
    """Stage 1 and the merge tree. ``lens``: per-query key counts, on a small grid (the fallback)."""
    Q, D = queries.shape
    N = keys.shape[0]
    kb, block_n, chunk, sort = _plan(k, sort)
    nblk = triton.cdiv(N, block_n)
    programs = nblk if lens is None else min(nblk, _FALLBACK_PROGRAMS)
    cand = torch.empty(Q, nblk * kb, dtype=torch.int64, device=keys.device)
    block_d = max(next_pow2(D), 2)
    torch.library.wrap_triton(_knn_block_kernel)[(Q, programs)](
        queries, keys, cand, N, D, queries.stride(0), keys.stride(0), cand.stride(0),
        BLOCK_N=block_n, SUB=min(block_n, max(16, 8192 // block_d)), BLOCK_D=block_d, KB=kb, SORT=sort,
        len_ptr=cand if lens is None else lens, HAS_LEN=lens is not None, num_warps=_warps(block_n),
    )
    return _merge(cand, kb, chunk, sort, lens=lens, programs=None if lens is None else _FALLBACK_PROGRAMS)


def _bound_stride(n: int, kb: int) -> int:
    """Stride s of the key subset that bounds a level of n keys; 0: no bound (every key is a candidate).

    A level's selection work is its buffer, ~k s, plus its bound's (the level of n / s keys below):
    s ~ (n / KB)^(1/3) balances them over the recursion. The subset keeps >= 4 KB keys (>= k are
    needed), and levels under 16 KB keys are cheaper to filter whole.
    """
    if n < 16 * kb:
        return 0
    return max(2, min(round((n / kb) ** (1 / 3)), n // (4 * kb)))


def _threshold_search(queries, keys, k, sort):
    """Bound, filter, select on every level, deepest first; block search for queries that overflow."""
    Q, D = queries.shape
    kb, _, chunk, sort = _plan(k, sort)
    strides, views = [], [keys]
    while s := _bound_stride(views[-1].shape[0], kb):
        strides.append(s)
        views.append(views[-1][::s])  # rows need unit stride only in the last dim
    # One counter per (bounded level, query), 32 ints (128 B) apart: see the filter's atomics.
    counts = torch.zeros(len(strides), Q, 32, dtype=torch.int32, device=keys.device)
    block_q = min(max(next_pow2(Q), 16), 32)  # tl.dot needs >= 16
    block_d = max(next_pow2(D), 16)
    # The interpreter pays per program: one large tile each. On a GPU, 2048 distances per tile and
    # up to 8 tiles per program (whose loads the compiler pipelines) while >= ~1000 programs remain.
    block_n = 1024 if INTERPRETED else min(2048 // block_q, 4096 // block_d)
    bound = None
    for level in reversed(range(len(views))):
        view, s = views[level], strides[level] if level < len(strides) else 0
        N = view.shape[0]
        cap = N if bound is None else min(N, 4 * kb * s)
        buf = torch.empty(Q, cap, dtype=torch.int64, device=keys.device)
        count = counts[level, :, 0] if bound is not None else None
        ntiles = triton.cdiv(N, block_n)
        tiles = min(8, max(1, ntiles // 1024))
        torch.library.wrap_triton(_knn_filter_kernel)[(triton.cdiv(Q, block_q) * triton.cdiv(ntiles, tiles),)](
            queries, view, buf if bound is None else bound, buf, buf if count is None else count,
            Q, N, D, cap, k - 1, s, tiles, queries.stride(0), view.stride(0),
            0 if bound is None else bound.stride(0), buf.stride(0), 0 if count is None else count.stride(0),
            BLOCK_N=block_n, BLOCK_Q=block_q, BLOCK_D=block_d, HAS_BOUND=bound is not None,
            num_warps=4, num_stages=3,  # sm_90, fp16, D = 32: 96 registers, 5 programs per SM
        )
        bound = _merge(buf, kb, chunk, sort, lens=count, sorted_rows=False)
    if not strides:
        return bound
    count, cap = counts[0, :, 0], min(keys.shape[0], 4 * kb * strides[0])
    need = (count < k) | (count > cap)
    full = _block_search(queries, keys, k, sort, lens=need.int() * (MAX_KEYS - 1))
    return torch.where(need[:, None], full, bound)


def knn_packed(
    queries: torch.Tensor, keys: torch.Tensor, k: int, sort: bool | None = None, threshold: bool | None = None
) -> torch.Tensor:
    """(Q, KB) int64 packed candidates of the KB = next_pow2(k) nearest keys, ascending.

    ``sort`` forces the selection method (None: by k and device), ``threshold`` the search (True:
    threshold search, False: block search, None: by k, N and D); tests use them to cover every path.
    """
    kb = next_pow2(k)
    fits = keys.shape[1] <= FILTER_MAX_DIM
    if threshold is None:
        threshold = fits and kb >= THRESHOLD_MIN_KB and keys.shape[0] >= THRESHOLD_MIN_KEYS
    elif threshold and not fits:
        raise ValueError(f"the threshold search takes keys of up to {FILTER_MAX_DIM} dims, got {keys.shape[1]}")
    return (_threshold_search if threshold else _block_search)(queries, keys, k, sort)


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
