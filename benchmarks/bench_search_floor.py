"""Exact search in a CUDA graph against the card's bandwidth floor, with its plan and a kernel profile.

    pytest benchmarks/bench_search_floor.py --benchmark-only
    ARRAG_BENCH_PROFILE=table.txt pytest ...   # also one profiled replay of 10M keys at batch 16

DAiD's search as the decode step runs it (:func:`arrag_kernels.ops.knn` with the entries' int64 token
values, gathered in the search as ``PatchDatabase.retrieve`` has it; ``auto`` backend, fp32 queries,
official 32-d keys; ``shapes.py``'s retrieval shapes): on CUDA 10M fp16 keys at batch 1
and 16 and 1M at 16, k = 2048. The search is captured in a CUDA graph; a timed call is ``REPLAYS``
replays between two CUDA events (``timing.run(device_events=True)``). Keys that would fit in L2
three times over are copied, one graph per copy, and the replays rotate among them
(``key_copies``), so that every replay reads its keys from memory. ``extra_info``: ``ms`` per
search, ``GB/s`` of key bytes, ``x_floor`` = time / (key bytes / the card's memory bandwidth,
:func:`cards.card_bytes_per_s` by device name; absent for a card it does not list),
``peak_extra_bytes`` (the highest allocation above the inputs during one eager search: scratch
and outputs), ``plan`` (:func:`arrag_kernels.ops.knn_plan`'s launches / bytes / scratch where the
tree has it, else why not). With ``ARRAG_BENCH_PROFILE=path`` one replay of 10M keys at batch 16
runs under torch.profiler and its CUDA kernels (by total time) are written to ``path``.

On CPU (plumbing only): the CPU shapes of 20k and 100k fp32 keys, eager calls on the host clock.
Distances are checked against :func:`arrag_kernels.ops.knn_ref` outside the timed call.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import pytest
import torch

import arrag_kernels.ops as ak_ops
import timing
from cards import card_bytes_per_s
from shapes import BY_NAME, RetrievalShape, official_keys

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
CASES = ([BY_NAME[n] for n in ("janus1b-b1-db10M", "janus1b-b16-db10M", "janus1b-b16-db1M")] if CUDA else
         [BY_NAME[n] for n in ("cpu-b1-db20k", "cpu-b4-db100k")])
PROFILED = "janus1b-b16-db10M"
REPLAYS = 20 if CUDA else 2
_keys: dict[str, torch.Tensor] = {}


def keys_of(shape: RetrievalShape) -> tuple[torch.Tensor, torch.Tensor]:
    """The shape's database keys and int64 token values (one set on the device at a time)."""
    key = f"{shape.db_size}-{shape.key_dtype}-{shape.key_dim}"
    if key not in _keys:
        _keys.clear()
        keys = official_keys(shape.db_size, DEVICE, getattr(torch, shape.key_dtype), cells=shape.key_dim // 8)
        _keys[key] = keys, torch.randint(0, 16384, (shape.db_size,), device=DEVICE)
    return _keys[key]


def search_plan(shape: RetrievalShape) -> dict:
    """``ak.ops.knn_plan``'s launches / bytes / scratch of this search, or why there is none."""
    plan = getattr(ak_ops, "knn_plan", None)
    if plan is None:
        return {"unavailable": "arrag_kernels.ops.knn_plan is not in this tree (issue 22, item 7)"}
    result = plan(shape.db_size, shape.key_dim, shape.k, shape.batch, getattr(torch, shape.key_dtype), values=torch.int64)
    return json.loads(json.dumps(result, default=str))  # JSON values only (extra_info is written as JSON)


def peak_extra_bytes(fn) -> int | None:
    """Highest CUDA allocation above the current one during ``fn()`` (None on CPU)."""
    if not CUDA:
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


class RotatedReplays:
    """The search captured in one CUDA graph per key copy (copies that together exceed L2 three
    times, at most 4); each call replays the next graph of the rotation. Holds the copies, which the
    graphs read, and the graphs' outputs."""

    def __init__(self, queries, keys, values, k):
        l2 = torch.cuda.get_device_properties(keys.device).L2_cache_size
        self.copies = min(4, max(1, -(-3 * l2 // (keys.numel() * keys.element_size()))))
        self.key_sets = [keys] + [keys.clone() for _ in range(self.copies - 1)]
        self.graphs, self.outputs = [], []
        for copy_keys in self.key_sets:
            self.graphs.append(torch.cuda.CUDAGraph())
            with torch.cuda.graph(self.graphs[-1]):
                self.outputs.append(ak_ops.knn(queries, copy_keys, k, values))
        self._turns = itertools.cycle(self.graphs)

    def __call__(self):
        next(self._turns).replay()


def write_profile(replay, path: Path) -> None:
    """One replay under torch.profiler: the CUDA kernels' table by total time, written to ``path``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        replay()
        torch.cuda.synchronize()
    path.write_text(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40))


@pytest.mark.parametrize("shape", CASES, ids=[s.name for s in CASES])
def test_search_floor(benchmark, shape):
    keys, values = keys_of(shape)
    queries = official_keys(shape.batch, DEVICE, torch.float32, seed=1, cells=shape.key_dim // 8)
    search = lambda: ak_ops.knn(queries, keys, shape.k, values)  # noqa: E731
    search()  # compile, allocate
    peak = peak_extra_bytes(search)
    if CUDA:
        replay = RotatedReplays(queries, keys, values, shape.k)
        outputs, copies = replay.outputs, replay.copies
    else:
        replay, outputs, copies = search, [search()], 1
    key_bytes = keys.numel() * keys.element_size()
    benchmark.group = f"search-floor-{shape.name}"
    benchmark.extra_info.update(shape=shape.name, batch=shape.batch, db_keys=shape.db_size, k=shape.k,
                                dtype=shape.key_dtype, key_bytes=key_bytes, replays=REPLAYS, key_copies=copies,
                                peak_extra_bytes=peak, plan=search_plan(shape), graph=CUDA)

    def replays():
        for _ in range(REPLAYS):
            replay()

    timing.run(benchmark, replays, device_events=True)
    info = benchmark.extra_info
    if "median_s" in info:
        seconds = info["median_s"] / REPLAYS
        info.update({"ms": 1e3 * seconds, "GB/s": key_bytes / seconds / 1e9})
        bandwidth = card_bytes_per_s(torch.cuda.get_device_name()) if CUDA else None
        if bandwidth is not None:
            info.update(floor_ms=1e3 * key_bytes / bandwidth, x_floor=seconds * bandwidth / key_bytes)
    profile_path = os.environ.get("ARRAG_BENCH_PROFILE")
    if profile_path and CUDA and shape.name == PROFILED:
        write_profile(replay, Path(profile_path))
    ref_dist, _ = ak_ops.knn_ref(queries, keys, shape.k)
    for dist, ids, tokens in outputs:
        torch.testing.assert_close(dist, ref_dist, atol=1e-4, rtol=1e-4)
        assert torch.equal(tokens, values[ids]), "gathered token values"
