"""The summaries of a scripts/gpu_check.sh work folder, written into DEST (each by atomic rename).

    python scripts/gpu_check_summary.py WORK_DIR ELAPSED_SECONDS DEST_DIR

* ``DEST/summary.json`` (:func:`summary`): ``ok`` is true when every stage that ran exited 0 (stages
  skipped in a dry run count as fine); ``benchmarks`` lists every finished row of the stages'
  JSONL files (benchmarks/conftest.py's pytest-benchmark rows) with the ``extra_info`` fields worth
  reading without the archive; ``tests`` counts the junit XML of the tests stage.
* ``DEST/gpu-summary-<card>-<date>.json`` (:func:`results`): issue 22's "Results format", one number
  per target (None where its row did not run or finish).

Prints the second file's path.
"""

from __future__ import annotations

import json
import os
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from cards import card_slug  # noqa: E402

# row fields worth reading without opening the archive (besides every ratio_to_*)
KEYS = ("variant", "batch", "db_keys", "db_size", "k", "nprobe", "provider", "shape", "median_s", "iqr_s", "rounds",
        "clock", "host_median_s", "ms_per_step", "overhead_vs_plain", "ms", "floor_ms", "x_floor", "GB/s",
        "key_copies", "peak_extra_bytes", "plan", "ms_per_image", "recall_at_k")
# results field -> (stage, row name, row field, scale)
RESULTS = {
    "search_10m_b1_x_floor": ("search", "test_search_floor[janus1b-b1-db10M]", "x_floor", 1),
    "search_10m_b16_x_floor": ("search", "test_search_floor[janus1b-b16-db10M]", "x_floor", 1),
    "search_1m_b16_x_floor": ("search", "test_search_floor[janus1b-b16-db1M]", "x_floor", 1),
    "search_peak_extra_mb_b16": ("search", "test_search_floor[janus1b-b16-db10M]", "peak_extra_bytes", 2.0 ** -20),
    "daid_10m_overlapped_overhead_b16": ("decode-step", "test_decode_step[b16-daid-10M-overlap]", "overhead_vs_plain", 1),
    "faid_overhead_b16": ("decode-step", "test_decode_step[b16-faid]", "overhead_vs_plain", 1),
    "faid_overlapped_overhead_b16": ("decode-step", "test_decode_step[b16-faid-overlap]", "overhead_vs_plain", 1),
    "plain_vs_hf_generate_per_image": ("generate", "test_decode[janus-pro-1b-b16-cuda-graph-plain]",
                                       "ratio_to_hf_generate", 1),
    "ivfpq_100m_b16_ms": ("ivfpq", "test_gpu_ivfpq[N100M-nlist800-triton-nprobe32]", "median_s", 1e3),
}


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
        "env": {k: env.get(k) for k in ("gpu", "torch", "cuda", "triton", "transformers", "git_commit", "git_dirty",
                                        "date", "dry")},
        "stages": stages,
        "tests": _tests(work / "tests.xml"),
        "benchmarks": rows,
    }


def results(summary_: dict) -> dict:
    """Issue 22's results summary of a :func:`summary`."""
    env = summary_["env"]
    by_name = {(r["stage"], r["name"]): r for r in summary_["benchmarks"]}
    out = {"card": card_slug(env.get("gpu")), "commit": env.get("git_commit"), "date": (env.get("date") or "")[:10]}
    for key, (stage, name, field, scale) in RESULTS.items():
        value = by_name.get((stage, name), {}).get(field)
        out[key] = None if value is None else value * scale
    out["gpu_check_wall_s"] = summary_["elapsed_s"]
    tests = summary_["tests"]
    if tests is None or "error" in tests:
        out["compiled_suite"] = None
    else:
        failed = tests["failures"] + tests["errors"]
        out["compiled_suite"] = {"passed": tests["tests"] - failed - tests["skipped"], "failed": failed}
    return out


def _write(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def write(work: Path, elapsed: float, dest: Path) -> Path:
    """Write both summaries into ``dest``; returns the results summary's path."""
    s = summary(work, elapsed)
    r = results(s)
    _write(dest / "summary.json", s)
    path = dest / f"gpu-summary-{r['card']}-{r['date'] or 'undated'}.json"
    _write(path, r)
    return path


if __name__ == "__main__":
    print(write(Path(sys.argv[1]), float(sys.argv[2]), Path(sys.argv[3])))
