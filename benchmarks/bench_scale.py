"""A >= 50M-entry database of the official layout built in parts, merged on disk, searched: the times and
the peak memory of every process (tests/scale_build.py runs the steps, one process each).

    pytest benchmarks/bench_scale.py --benchmark-only -s [--benchmark-json=...]

Default: 50M entries (OPQ + IVF-PQ, nlist 1024, M 8, 8 bits, 32-d keys, int32 tokens) in 16 parts, one
faiss thread per process (``OMP_NUM_THREADS``), the steps run one after another; ``ARRAG_SCALE_ENTRIES``
sets another size. One round: the row's time is the whole pipeline; ``extra_info`` holds each step's
seconds and memory (peak RSS ``VmHWM``, resident anonymous / file-backed bytes: see tests/scale_build.py),
the build time per part, the merge time, the load and search times of the merged on-disk database
(``queries`` x ``k`` at ``nprobe``) and of each shard (its own process), the bytes on disk, and the
whole index's size for scale. The hits are checked against the one-piece index
(:func:`scale_build.check_hits`); the steps over the memory bounds of tests/test_scale.py are listed
(``over_bounds``, :func:`scale_build.memory_report`; only meaningful at scale).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.scale_build

from tests import scale_build as sb  # noqa: E402


def test_scale_pipeline(benchmark, tmp_path):
    cfg = dataclasses.replace(sb.LARGE, entries=int(os.environ.get("ARRAG_SCALE_ENTRIES", sb.LARGE.entries)))
    stats = benchmark.pedantic(sb.run, args=(cfg, tmp_path), rounds=1, iterations=1)
    sb.check_hits(cfg, tmp_path)
    memory = sb.memory_report(cfg, stats)
    parts = [stats[f"part-{r}"] for r in range(cfg.parts)]
    shards = [stats[f"shard-{r}"] for r in range(cfg.parts)]
    search = stats["search-merged"]
    benchmark.group = "scale"
    benchmark.extra_info.update(
        config=stats["config"], **memory, omp_threads=int(os.environ.get("OMP_NUM_THREADS", "1")),
        load_average=os.getloadavg(), cpus=os.cpu_count(),
        steps={name: s for name, s in stats.items() if name != "config"},
        part_build_seconds=[p["seconds"] for p in parts], part_peak_rss_bytes=[p["peak_rss_bytes"] for p in parts],
        merge_seconds=stats["merge"]["seconds"], merge_peak_rss_bytes=stats["merge"]["peak_rss_bytes"],
        merged_bytes_on_disk=stats["merge"]["bytes_on_disk"],
        load_merged_seconds=search["load_seconds"], search_merged_seconds=search["search_seconds"],
        search_merged_peak_rss_bytes=search["peak_rss_bytes"], search_merged_after_search=search["after_search"],
        shard_search_seconds=[s["search_seconds"] for s in shards],
        shard_peak_rss_bytes=[s["peak_rss_bytes"] for s in shards],
        one_piece_seconds=stats["one-piece"]["seconds"], one_piece_peak_rss_bytes=stats["one-piece"]["peak_rss_bytes"])
