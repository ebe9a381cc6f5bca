"""One way to time every benchmark row: medians over rounds sized by ``--benchmark-max-time``, with
the baselines a row is compared to run interleaved, round by round, with it.

``run(benchmark, fn, baselines={"faiss": g, ...})`` times ``fn`` as the row (pytest-benchmark's
statistics) and, in the untimed ``setup`` before each of its rounds, every baseline once, so that
load changes on a shared machine hit both sides of a ratio alike. ``extra_info`` gets the row's
median and spread (``statistic = "median"``, ``median_s``, ``iqr_s``, ``min_s``, ``max_s``,
``rounds``) and per baseline ``<name>_median_s``, ``<name>_iqr_s`` and ``ratio_to_<name>``
(median of the row / median of the baseline, from the same rounds).

Rounds: after one untimed warm-up call of each (whose times size the rounds), as many as ``--benchmark-max-time`` seconds allow for
the row and its baselines together, at least ``MIN_ROUNDS`` (a median needs them; a row may ask
for fewer) and at most
``MAX_ROUNDS``. ``--benchmark-min-rounds`` is not applied: it would make the 1M-key reference rows
take minutes. Rows of graph replays on CUDA can take their numbers from CUDA events around each
call instead of the host clock (``device_events=True``).
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

MIN_ROUNDS, MAX_ROUNDS = 3, 50


def _sync():
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def synchronised(fn: Callable) -> Callable:
    """``fn`` followed by a device synchronisation (so the timed call includes the device work)."""

    def call():
        out = fn()
        _sync()
        return out

    return call


def _timed(fn: Callable) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def spread(times: list[float]) -> dict:
    """Median, interquartile range, min and max of a list of seconds."""
    q = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else [times[0]] * 3
    return {"median_s": statistics.median(times), "iqr_s": q[2] - q[0], "min_s": min(times), "max_s": max(times)}


def rounds_for(benchmark, seconds_per_round: float, min_rounds: int = MIN_ROUNDS) -> int:
    budget = float(getattr(benchmark, "_max_time", 1.0))
    return int(min(MAX_ROUNDS, max(min_rounds, budget // max(seconds_per_round, 1e-9))))


class DeviceEvents:
    """``fn`` bracketed by two CUDA events on the current stream at every call; :meth:`seconds` are
    the device times between them (read after a synchronisation). ``fn`` must leave its work
    ordered before the end event (joined back to the current stream)."""

    def __init__(self, fn: Callable):
        self.fn, self.pairs = fn, []

    def __call__(self):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = self.fn()
        end.record()
        self.pairs.append((start, end))
        return out

    def seconds(self) -> list[float]:
        return [start.elapsed_time(end) / 1e3 for start, end in self.pairs]


def run(benchmark, fn: Callable, baselines: dict[str, Callable] | None = None, min_rounds: int = MIN_ROUNDS,
        warmup: bool = True, device_events: bool = False):
    """Time ``fn`` (synchronised) as this row, its ``baselines`` interleaved; returns ``fn()``'s output.

    ``min_rounds`` below 3 only for rows whose time is a side note (e.g. memory benchmarks) or whose
    one call takes many seconds. ``warmup=False``: no untimed first call, exactly ``min_rounds``
    rounds (for such rows, with nothing left to compile). ``device_events=True`` (CUDA): every call
    is bracketed by CUDA events (:class:`DeviceEvents`), and ``median_s``, ``iqr_s``, ``min_s``,
    ``max_s`` and ``ratio_to_<name>`` (the median of the per-round ratios) are the device times';
    the host-timed median stays as ``host_median_s``.
    """
    events = device_events and torch.cuda.is_available()
    wrap = DeviceEvents if events else (lambda f: f)
    row = wrap(fn)
    fn = synchronised(row)
    raw = {name: wrap(b) for name, b in (baselines or {}).items()}
    baselines = {name: synchronised(b) for name, b in raw.items()}
    out = None
    if warmup:  # warm-up calls (compilation, first-call allocations), which also size the rounds
        t0 = time.perf_counter()
        out = fn()  # the output to check
        per_round = time.perf_counter() - t0 + sum(_timed(b) for b in baselines.values())
        rounds = rounds_for(benchmark, per_round, min_rounds)
    else:
        rounds = min_rounds
    base_times: dict[str, list[float]] = {name: [] for name in baselines}

    def setup():
        for name, b in baselines.items():
            base_times[name].append(_timed(b))

    result = benchmark.pedantic(fn, setup=setup if baselines else None, rounds=rounds, iterations=1, warmup_rounds=0)
    out = result if out is None else out
    stats = getattr(benchmark.stats, "stats", None) if benchmark.stats else None
    if stats is None:  # --benchmark-disable: fn ran once, nothing was measured
        return out
    times = list(stats.data)
    host_median = statistics.median(times)
    if events:  # the timed rounds' device times (the warm-up call's dropped)
        skip = 1 if warmup else 0
        times = row.seconds()[skip:]
        base_times = {name: b.seconds()[skip:] for name, b in raw.items()}
    mine = spread(times)
    benchmark.extra_info.update(statistic="median", rounds=rounds, **mine)
    if events:
        benchmark.extra_info.update(clock="cuda events", host_median_s=host_median)
    for name, theirs_times in base_times.items():
        theirs = spread(theirs_times)
        benchmark.extra_info[f"{name}_median_s"] = theirs["median_s"]
        benchmark.extra_info[f"{name}_iqr_s"] = theirs["iqr_s"]
        benchmark.extra_info[f"ratio_to_{name}"] = (
            statistics.median(a / b for a, b in zip(times, theirs_times)) if events
            else mine["median_s"] / theirs["median_s"])
    return out
