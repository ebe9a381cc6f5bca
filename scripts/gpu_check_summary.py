"""The summary JSON of a scripts/gpu_check.sh work folder (printed to stdout).

    python scripts/gpu_check_summary.py WORK_DIR ELAPSED_SECONDS

``ok`` is true when every stage that ran exited 0 (stages skipped in a dry run count as fine);
``benchmarks`` lists every finished row (the JSONL each bench stage appends to) with its median,
spread and the ratios its extra_info holds; ``tests`` counts the junit XML of the tests stage.
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

# extra_info keys worth reading without opening the archive
KEYS = ("median_s", "iqr_s", "rounds", "GB/s", "x_h200_floor", "overhead_vs_same_loop_plain", "target_overhead",
        "ratio_to_no_overlap", "ms_per_image", "recall_at_k", "peak_extra_bytes", "provider", "shape", "batch",
        "db_keys", "db_size", "nprobe", "k")


def _jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut off by a time limit
            pass
    return rows


def _tests(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError:
        return {"error": "unreadable junit XML"}
    suites = [root] if root.tag == "testsuite" else list(root)
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{case.get('classname')}::{case.get('name')}" for s in suites for case in s.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    return {**counts, "failed": failed[:50]}


def summary(work: Path, elapsed: float) -> dict:
    stages = _jsonl(work / "stages.jsonl")
    rows = []
    for stage in stages:
        for row in _jsonl(work / f"{stage['stage']}.jsonl"):
            info = row.get("extra_info", {})
            picked = {k: info[k] for k in KEYS if k in info}
            picked.update({k: v for k, v in info.items() if k.startswith("ratio_to_")})
            rows.append({"stage": stage["stage"], "name": row.get("name"), **picked})
    env = json.loads((work / "env.json").read_text()) if (work / "env.json").exists() else {}
    return {
        "ok": all(s.get("rc", 0) == 0 for s in stages),
        "elapsed_s": elapsed,
        "env": {k: env.get(k) for k in ("gpu", "torch", "cuda", "triton", "git_commit", "git_dirty", "date", "dry")},
        "stages": stages,
        "tests": _tests(work / "tests.xml"),
        "benchmarks": rows,
    }


if __name__ == "__main__":
    json.dump(summary(Path(sys.argv[1]), float(sys.argv[2])), sys.stdout, indent=1)
