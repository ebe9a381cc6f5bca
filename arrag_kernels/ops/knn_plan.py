"""Launch plan of the Triton exact search (:mod:`arrag_kernels.ops._triton.knn`), computable without a GPU.

:func:`search_shape` fixes every size the search launches with (grids, tiles, the key sample, the
bound's rank, the survivor capacity) from the problem's shape alone; the Triton search is dispatched
from it, and :func:`knn_plan` turns it into launches, bytes and scratch, so a GPU time can be read
against its model and progress can be seen where no GPU is lent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .knn import MAX_K

MAX_DIM = 256  # the Triton search's limits: a (block_n, D) key tile lives in registers,
MAX_KEYS = 1 << 31  # ids are int32 in its kernels
# Expected number of sample keys among a query's true k nearest: the bound is the sample's r-th
# smallest (distance, id) with r = hits + SAFETY_SIGMAS * sqrt(hits) + 4, so the filter keeps ~r N / S
# keys (~3.6 k at 8 hits) and fewer than k only when a binomial of mean `hits` exceeds r (~1e-9 at 8
# hits, r = 29): the fallback, a single program reading every key, stays out of decoding.
SAMPLE_HITS = 8
SAFETY_SIGMAS = 6
# Survivor slots per query: CAPACITY_FACTOR x the expected survivors (overflow needs a ~8-sigma excess).
CAPACITY_FACTOR = 4
# The sample's (Q, S) distances stay under this many bytes (S shrinks at large batches); S >= MIN_SAMPLE
# (or N) keeps the bound's rank well inside the sample at large k.
MAX_SAMPLE_BYTES = 16 << 20
MIN_SAMPLE = 1024
# Entries per step of the selects' loops (radix histogram passes, compaction): one program walks a
# query's sample or survivors, so few long steps (latency-bound loops).
SELECT_TILE = 4096
RADIX_BITS = 8  # digits of the 32-bit distance bits (and of the ids when ties need them)
# Bytes a select reads per entry without ties at its k-th distance: a pass per distance digit, one
# pass of (bits, id) for the smallest id there.
SELECT_BYTES_PER_ENTRY = (32 // RADIX_BITS) * 4 + 8
# Rows of the distance dot (tl.dot needs >= 16): the select kernel's fallback uses one of them.
MIN_BLOCK_Q = 16
# The filter's programs loop over up to this many key tiles (their loads are pipelined).
MAX_TILES_PER_PROGRAM = 8


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@dataclass(frozen=True)
class SearchShape:
    """Every size of one exact search (Q queries, N keys of `dim` dims, k neighbours)."""

    n: int
    dim: int
    k: int
    batch: int
    key_itemsize: int
    block_q: int  # queries per filter / sample program (the dot's rows)
    block_d: int  # dims, padded to a power of two >= 16
    block_n: int  # keys per tile
    tiles: int  # key tiles per filter program
    sample: int  # S sampled keys: rows (i * sample_step) mod N, i < S (all keys when S = N)
    sample_step: int  # coprime with N, ~0.618 N: the rows are distinct and spread over the ids
    rank: int  # the bound is the sample's rank-th smallest (distance, id)
    capacity: int  # survivor slots per query (>= k + block_n for the fallback, or N)
    kb: int  # next_pow2(k): the final sort's width

    @property
    def query_blocks(self) -> int:
        return -(-self.batch // self.block_q)

    @property
    def key_tiles(self) -> int:
        return -(-self.n // self.block_n)

    @property
    def expected_survivors(self) -> int:
        return min(self.n, -(-self.rank * self.n // self.sample))

    @property
    def grids(self) -> dict[str, tuple[int, ...]]:
        """Grid of each kernel, in launch order."""
        return {
            "sample": (self.query_blocks * -(-self.sample // self.block_n),),
            "bound": (self.batch,),
            "filter": (self.query_blocks * -(-self.key_tiles // self.tiles),),
            "select": (self.batch,),
        }


def _sample_step(n: int) -> int:
    step = max(1, int(n * 0.6180339887))
    while math.gcd(step, n) != 1:
        step += 1
    return step


def search_shape(n: int, dim: int, k: int, batch: int, key_itemsize: int) -> SearchShape:
    block_q = min(max(next_pow2(batch), MIN_BLOCK_Q), 32)
    block_d = max(next_pow2(dim), 16)
    # 2048 distances per (block_q, block_n) tile, a (block_n, block_d) key tile of <= 4096 entries.
    block_n = max(16, min(2048 // block_q, 4096 // block_d))
    key_tiles = -(-n // block_n)
    # Enough programs to fill a GPU (~1000) before a program takes several tiles.
    tiles = min(MAX_TILES_PER_PROGRAM, max(1, key_tiles // 1024))
    sample = min(n, max(math.ceil(SAMPLE_HITS * n / k), MIN_SAMPLE), max(block_n, MAX_SAMPLE_BYTES // (8 * batch)))
    if sample == n:
        rank = k  # every key sampled: the bound is the exact k-th, exactly k keys survive
    else:
        hits = k * sample / n
        rank = min(sample, math.ceil(hits + SAFETY_SIGMAS * math.sqrt(hits) + 4))
    expected = min(n, -(-rank * n // sample))
    capacity = min(n, max(CAPACITY_FACTOR * expected, k + block_n))
    return SearchShape(n, dim, k, batch, key_itemsize, block_q, block_d, block_n, tiles, sample, _sample_step(n),
                       rank, capacity, next_pow2(k))


def value_itemsize(values, plan: str) -> int:
    """Bytes per gathered value of a plan's ``values`` argument (a torch integer dtype or its name; None: 0)."""
    if values is None:
        return 0
    dtype = getattr(torch, values, None) if isinstance(values, str) else values
    if dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{plan}: values must be torch.int32 or torch.int64 (or None), got {values!r}")
    return torch.empty(0, dtype=dtype).element_size()


def _plan_of(shape: SearchShape, value_bytes: int) -> dict:
    Q, N, D, k, isz = shape.batch, shape.n, shape.dim, shape.k, shape.key_itemsize
    S, C, E = shape.sample, shape.capacity, shape.expected_survivors
    entry = 8  # a survivor or sample entry: int32 distance bits + int32 id
    queries = Q * D * 4
    grids = shape.grids
    kernels = [
        dict(name="sample", grid=grids["sample"], bytes_read=shape.query_blocks * S * D * isz + queries,
             bytes_written=Q * S * entry),
        dict(name="bound", grid=grids["bound"], bytes_read=Q * S * SELECT_BYTES_PER_ENTRY, bytes_written=Q * (8 + 4)),
        # Each query block reads every key (L2 shares a tile among the blocks: DRAM reads ~once when
        # Q <= 32); survivors: expected counts.
        dict(name="filter", grid=grids["filter"], bytes_read=shape.query_blocks * N * D * isz + queries + Q * 8,
             bytes_written=Q * E * entry),
        # the radix select and the compaction over the survivors, the k to sort (and their values); out:
        # fp32 distances, int64 ids (and int64 values)
        dict(name="select", grid=grids["select"],
             bytes_read=Q * 4 + Q * E * (SELECT_BYTES_PER_ENTRY + entry) + Q * k * (entry + value_bytes),
             bytes_written=Q * k * entry + Q * k * (12 + (8 if value_bytes else 0))),
    ]
    scratch = {  # name -> bytes, as the search allocates them
        "sample_bits": Q * S * 4, "sample_ids": Q * S * 4, "bound": Q * 8, "counts": Q * 32 * 4,
        "bits": Q * C * 4, "ids": Q * C * 4,
    }
    key_bytes = N * D * isz
    bytes_read = sum(kn["bytes_read"] for kn in kernels)
    return dict(
        launches=len(kernels), kernels=kernels, bytes_read=bytes_read, key_bytes=key_bytes,
        bytes_read_over_keys=bytes_read / key_bytes, scratch=scratch, scratch_bytes=sum(scratch.values()),
        sample=S, rank=shape.rank, capacity=C, expected_survivors=E,
    )


def knn_plan(n_keys: int, dim: int, k: int, batch: int, dtype: torch.dtype | str = torch.float16,
             values: torch.dtype | str | None = None) -> dict:
    """Launches, bytes and scratch of the Triton exact search of ``batch`` queries over ``n_keys`` keys of
    ``dim`` dims and ``dtype``, k neighbours, exactly as it is dispatched on CUDA; ``values``: the dtype of
    the token values gathered with the hits (``knn(..., values=)``, ``PatchDatabase.retrieve``: int64), if any.

    Returns a dict: ``launches``; ``kernels`` (per kernel in launch order: ``name``, ``grid``,
    ``bytes_read``, ``bytes_written``); ``bytes_read`` (all kernels' global loads, the survivors' at
    their expected count); ``key_bytes`` and ``bytes_read_over_keys``; ``scratch`` (buffer name ->
    bytes) and ``scratch_bytes``; ``sample``, ``rank``, ``capacity``, ``expected_survivors`` (the
    bound's parameters). Passes re-reading a kernel's own scratch (the radix histograms) are counted
    in ``bytes_read`` although they mostly hit L2, for data without ties at the k-th distance (ties
    add four passes over the ids); a query whose bound fails (its survivors < k or > capacity) reads
    all keys once more in its select program, which the plan does not count.
    """
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"knn_plan: dtype must be a floating torch dtype (or its name), got {dtype!r}")
    if min(n_keys, dim, k, batch) < 1 or k > n_keys:
        raise ValueError(f"knn_plan: need n_keys, dim, batch >= 1 and 1 <= k <= n_keys, got n_keys={n_keys}, "
                         f"dim={dim}, k={k}, batch={batch}")
    if k > MAX_K or dim > MAX_DIM or n_keys >= MAX_KEYS:
        raise ValueError(f"knn_plan: the Triton search takes k <= {MAX_K}, dim <= {MAX_DIM} and fewer than "
                         f"{MAX_KEYS} keys (other shapes go to the reference); got n_keys={n_keys}, dim={dim}, k={k}")
    value_bytes = value_itemsize(values, "knn_plan")
    return _plan_of(search_shape(n_keys, dim, k, batch, torch.empty(0, dtype=dtype).element_size()), value_bytes)
