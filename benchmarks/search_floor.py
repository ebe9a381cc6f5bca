"""Exact search against the card's bandwidth floor, inside a CUDA graph, with its plan and a kernel profile.

    python benchmarks/search_floor.py --jsonl rows.jsonl     # CUDA
    python benchmarks/search_floor.py --dry --jsonl rows.jsonl   # CPU plumbing (small keys, reference op)

Rows (``kind: "search"``): DAiD's search as the decode step runs it (:func:`arrag_kernels.ops.knn`,
k = 2048, official 32-d fp16 keys, one query per image) for 10M keys at batch 1 and 16 and 1M keys
at batch 16. Each search is captured in a CUDA graph and replayed ``--replays`` times between two
CUDA events per round (keys that would fit in L2 three times over are copied, one graph per copy,
and the replays rotate among them: ``key_copies``); ``ms`` is the median over rounds. ``x_floor`` = time / (key bytes / the
card's memory bandwidth, by device name: :func:`shapes.card_bytes_per_s`; absent for a card not
listed). ``peak_extra_bytes``: the highest allocation above the inputs during one eager search
(scratch and outputs). ``plan``: what :func:`arrag_kernels.ops.knn_plan` says the search launches and
reads, where this tree has it. One replay of 10M keys at batch 16 is profiled (torch.profiler, CUDA
kernels by total time) into ``--profile``.

With ``--dry`` (CPU): 20k keys, k = 64, eager calls timed with ``time.perf_counter``, no floor.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import arrag_kernels.ops as ak_ops  # noqa: E402
from shapes import card_bytes_per_s  # noqa: E402

# (name, keys, batch); k = 2048 on CUDA. The second case's replay is the one profiled.
CASES = [("search-10M-b1", 10_000_000, 1), ("search-10M-b16", 10_000_000, 16), ("search-1M-b16", 1_000_000, 16)]
DRY_CASES = [("search-20k-b1", 20_000, 1), ("search-20k-b4", 20_000, 4)]
PROFILED = 1
DIM = 32


def official_keys(n: int, device, dtype, seed: int = 0) -> torch.Tensor:
    """(n, 32) keys of the official layout: 4 unit-norm 8-d cells."""
    g = torch.Generator(device=device).manual_seed(seed)
    keys = torch.randn(n, DIM // 8, 8, generator=g, device=device)
    return torch.nn.functional.normalize(keys, dim=-1).flatten(1).to(dtype)


def search_plan(n_keys: int, k: int, batch: int, dtype) -> dict:
    """``ak.ops.knn_plan``'s launches / bytes / scratch of this search, or why there is none."""
    plan = getattr(ak_ops, "knn_plan", None)
    if plan is None:
        return {"unavailable": "arrag_kernels.ops.knn_plan is not in this tree (issue 22, item 7)"}
    return dict(plan(n_keys, DIM, k, batch, dtype))


def _median_per_call(fn, rounds: int, replays: int, cuda: bool) -> tuple[float, float]:
    """(median, IQR) seconds per call over ``rounds`` of ``replays`` back-to-back calls."""
    times = []
    for _ in range(rounds):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(replays):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / replays)
        else:
            t0 = time.perf_counter()
            for _ in range(replays):
                fn()
            times.append((time.perf_counter() - t0) / replays)
    q = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else [times[0]] * 3
    return statistics.median(times), q[2] - q[0]


def peak_extra_bytes(fn, cuda: bool) -> int | None:
    """Highest CUDA allocation above the current one during ``fn()`` (None on CPU)."""
    if not cuda:
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def profile_replay(replay, path: Path) -> None:
    """One replay under torch.profiler: the CUDA kernels' table by total time, written to ``path``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        replay()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40)
    path.write_text(table)
    print(table, flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry", action="store_true", help="CPU plumbing: small keys, eager calls")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--replays", type=int, default=20)
    parser.add_argument("--jsonl", type=Path, default=None)
    parser.add_argument("--profile", type=Path, default=None, help="kernel table of the last case's replay")
    args = parser.parse_args(argv)
    cuda = not args.dry
    if cuda and not torch.cuda.is_available():
        parser.error("no CUDA device (use --dry for the CPU plumbing)")
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.float16 if cuda else torch.float32
    k = 2048 if cuda else 64
    card = torch.cuda.get_device_name() if cuda else None
    bandwidth = card_bytes_per_s(card)
    cases = CASES if cuda else DRY_CASES
    keys_by_n: dict[int, torch.Tensor] = {}
    for i, (name, n, batch) in enumerate(cases):
        if n not in keys_by_n:
            keys_by_n.clear()  # one key set on the device at a time
            keys_by_n[n] = official_keys(n, device, dtype)
        keys = keys_by_n[n]
        key_bytes = keys.numel() * keys.element_size()
        queries = official_keys(batch, device, torch.float32, seed=1)  # fp32 queries, as the decode step makes
        search = lambda: ak_ops.knn(queries, keys, k)  # noqa: E731
        search()  # compile, allocate
        peak = peak_extra_bytes(search, cuda)
        copies = 1
        if cuda:
            # Keys that fit in L2 would be read from it by back-to-back replays: rotate among copies
            # that together exceed it three times, so that every replay reads its keys from memory.
            l2 = torch.cuda.get_device_properties(device).L2_cache_size
            copies = min(4, max(1, -(-3 * l2 // key_bytes)))
            replays = []
            for c in range(copies):
                copy_keys = keys if c == 0 else keys.clone()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    ak_ops.knn(queries, copy_keys, k)
                replays.append((graph, copy_keys))
            turn = iter(range(1 << 62))
            replay = lambda: replays[next(turn) % copies][0].replay()  # noqa: E731
        else:
            replay = search
        seconds, iqr = _median_per_call(replay, args.rounds, args.replays, cuda)
        row = {"kind": "search", "name": name, "db_keys": n, "batch": batch, "k": k, "dtype": str(dtype),
               "card": card, "ms": 1e3 * seconds, "iqr_ms": 1e3 * iqr, "GB/s": key_bytes / seconds / 1e9,
               "key_bytes": key_bytes, "peak_extra_bytes": peak, "plan": search_plan(n, k, batch, dtype),
               "graph": cuda, "key_copies": copies, "rounds": args.rounds, "replays": args.replays}
        if bandwidth is not None:
            row["floor_ms"] = 1e3 * key_bytes / bandwidth
            row["x_floor"] = seconds * bandwidth / key_bytes
        line = json.dumps(row, default=str)  # the plan may hold tuples, dtypes
        print(line, flush=True)
        if args.jsonl is not None:
            with open(args.jsonl, "a") as f:
                f.write(line + "\n")
        if args.profile is not None and i == PROFILED:
            if cuda:
                profile_replay(replay, args.profile)
            else:
                args.profile.write_text("dry run: no CUDA kernels to profile\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
