"""Launch plan of the Triton IVF-PQ scan (:mod:`arrag_kernels.ops._triton.ivfpq`), computable without a GPU.

The scan has the exact search's structure (:mod:`arrag_kernels.ops.knn_plan`) over a query's candidate
slots (the probed lists' entries) instead of keys: a sample of slots and its ADC distances, a bound
per query, one filter over every slot with a 32-bit compare and survivor compaction, a radix select
per query. :func:`scan_shape` fixes every size it launches with from the problem's shape alone (the
number of candidates of each query, known only on the device, changes what a program does, never
a size); :func:`ivfpq_plan` turns it into launches, bytes and scratch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .ivfpq import MAX_K
from .knn_plan import (CAPACITY_FACTOR, MIN_SAMPLE, SAFETY_SIGMAS, SAMPLE_HITS, SELECT_BYTES_PER_ENTRY, next_pow2,
                       value_itemsize)

# Slots are int32 in the kernels (the select's entries are 32-bit distance keys + 32-bit slots); larger
# candidate sets go to the reference scan.
MAX_SLOTS = 1 << 31
BLOCK_SLOTS = 1024  # candidate slots per tile (a (BLOCK_SLOTS, M) tile of codes and table entries)
# Filter programs loop over up to this many tiles once there are enough programs to fill a GPU.
MAX_TILES_PER_PROGRAM = 8
TARGET_PROGRAMS = 2048
# The sample's (Q, S) entries stay under this many bytes (S shrinks at large batches).
MAX_SAMPLE_BYTES = 16 << 20


def sample_rank(k: int, sample: int, candidates: int) -> int:
    """The bound's rank among ``sample`` evenly spaced slots of ``candidates``: ``min(k, candidates)``
    when every slot is sampled, else the expected hits among the true k plus SAFETY_SIGMAS sigmas
    (the kernel computes the same formula per query, in fp32)."""
    if sample >= candidates:
        return min(k, candidates)
    hits = k * sample / candidates
    return min(sample, math.ceil(hits + SAFETY_SIGMAS * math.sqrt(hits) + 4))


@dataclass(frozen=True)
class ScanShape:
    """Every size of one IVF-PQ scan (Q queries of at most ``max_candidates`` slots, k neighbours)."""

    batch: int
    k: int
    max_candidates: int
    nprobe: int
    m: int  # sub-quantizers (code bytes per entry)
    ksub: int
    tiles: int  # slot tiles per filter program
    programs: int  # filter programs per query
    sample: int  # S: at most this many evenly spaced slots sampled per query (all when fewer)
    rank: int  # the bound's rank for a query of max_candidates slots (smaller queries: sample_rank)
    capacity: int  # survivor slots per query (>= k + BLOCK_SLOTS for the fallback, or max_candidates)
    kb: int  # next_pow2(k): the final sort's width

    @property
    def expected_survivors(self) -> int:
        """Survivors of a query with max_candidates slots (the most: survivors ~ rank x T / S grows with T)."""
        return min(self.max_candidates, -(-self.rank * self.max_candidates // self.sample))

    @property
    def grids(self) -> dict[str, tuple[int, ...]]:
        """Grid of each kernel, in launch order."""
        return {
            "sample": (-(-self.sample // BLOCK_SLOTS), self.batch),
            "bound": (self.batch,),
            "filter": (self.programs, self.batch),
            "select": (self.batch,),
        }


def scan_shape(batch: int, k: int, max_candidates: int, nprobe: int, m: int, ksub: int) -> ScanShape:
    slot_tiles = -(-max_candidates // BLOCK_SLOTS)
    tiles = min(MAX_TILES_PER_PROGRAM, max(1, slot_tiles * batch // TARGET_PROGRAMS))
    programs = -(-slot_tiles // tiles)
    sample = min(max_candidates, max(math.ceil(SAMPLE_HITS * max_candidates / k), MIN_SAMPLE),
                 max(BLOCK_SLOTS, MAX_SAMPLE_BYTES // (8 * batch)))
    rank = sample_rank(k, sample, max_candidates)
    expected = min(max_candidates, -(-rank * max_candidates // sample))
    capacity = min(max_candidates, max(CAPACITY_FACTOR * expected, k + BLOCK_SLOTS))
    return ScanShape(batch, k, max_candidates, nprobe, m, ksub, tiles, programs, sample, rank, capacity, next_pow2(k))


def _plan_of(s: ScanShape, value_bytes: int) -> dict:
    Q, T, S, C, E, M, k = s.batch, s.max_candidates, s.sample, s.capacity, s.expected_survivors, s.m, s.k
    entry = 8  # a sample or survivor entry: int32 distance key + int32 slot
    probes = Q * s.nprobe * (8 + 4 + 8) + Q * M * s.ksub * 4  # lists, dis0, end slots; term2
    # A slot's distance reads its M code bytes and M entries of term1 (of its list; the query's term2
    # is counted once in probes): M * 5 bytes. A list's term1 is M * ksub * 4 = 8 KB, so those
    # gathers mostly hit L1/L2: DRAM reads are about the M code bytes per slot. The probe search
    # reads the end slots, cached, not counted per slot.
    per_slot = M + M * 4
    grids = s.grids
    kernels = [
        dict(name="sample", grid=grids["sample"], bytes_read=Q * S * per_slot + probes, bytes_written=Q * S * entry),
        dict(name="bound", grid=grids["bound"], bytes_read=Q * S * SELECT_BYTES_PER_ENTRY + Q * 8,
             bytes_written=Q * (8 + 4)),
        dict(name="filter", grid=grids["filter"], bytes_read=Q * T * per_slot + probes + Q * 8,
             bytes_written=Q * E * entry),
        # the radix select and compaction over the survivors, the k to sort, their ids (and values); out:
        # fp32 distances, int64 ids (and int64 values)
        dict(name="select", grid=grids["select"],
             bytes_read=Q * 4 + Q * E * (SELECT_BYTES_PER_ENTRY + entry) + Q * k * (entry + 8 + value_bytes) + probes,
             bytes_written=Q * k * (12 + (8 if value_bytes else 0))),
    ]
    scratch = {  # name -> bytes, as the scan allocates them
        "sample_keys": Q * S * 4, "sample_slots": Q * S * 4, "bound": Q * 8, "counts": Q * 32 * 4,
        "keys": Q * C * 4, "slots": Q * C * 4,
    }
    return dict(
        launches=len(kernels), kernels=kernels, bytes_read=sum(kn["bytes_read"] for kn in kernels),
        candidate_bytes=Q * T * per_slot, scratch=scratch, scratch_bytes=sum(scratch.values()),
        sample=S, rank=s.rank, capacity=C, expected_survivors=E,
    )


def ivfpq_plan(batch: int, k: int, max_candidates: int, nprobe: int, m: int = 8, ksub: int = 256,
               values: torch.dtype | str | None = None) -> dict:
    """Launches, bytes and scratch of the Triton IVF-PQ scan of ``batch`` queries with at most
    ``max_candidates`` candidate slots each (the sum of the nprobe largest lists), k neighbours, M
    sub-quantizers of ``ksub`` centroids, exactly as it is dispatched on CUDA; ``values``: the dtype of
    the token values gathered with the hits (``ivfpq_scan(..., values=)``), if any.

    Returns a dict: ``launches``; ``kernels`` (per kernel in launch order: ``name``, ``grid``,
    ``bytes_read``, ``bytes_written``); ``bytes_read`` (all kernels' global loads, each query at
    max_candidates slots and its survivors at their expected count); ``candidate_bytes`` (the codes
    and term1 entries of every candidate: the scan's floor); ``scratch`` (buffer name -> bytes) and
    ``scratch_bytes``; ``sample``, ``rank``, ``capacity``, ``expected_survivors``. A query whose bound
    fails (survivors fewer than min(k, its candidates) or more than the capacity) scans its
    candidates once more in its select program, which the plan does not count.
    """
    if min(batch, k, max_candidates, nprobe, m, ksub) < 1:
        raise ValueError(f"ivfpq_plan: every size must be >= 1, got batch={batch}, k={k}, "
                         f"max_candidates={max_candidates}, nprobe={nprobe}, m={m}, ksub={ksub}")
    if k > MAX_K or max_candidates >= MAX_SLOTS:
        raise ValueError(f"ivfpq_plan: the Triton scan takes k <= {MAX_K} and fewer than {MAX_SLOTS} candidates "
                         f"per query (other shapes go to the reference); got k={k}, max_candidates={max_candidates}")
    value_bytes = value_itemsize(values, "ivfpq_plan")
    return _plan_of(scan_shape(batch, k, max_candidates, nprobe, m, ksub), value_bytes)
