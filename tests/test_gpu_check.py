"""scripts/gpu_check.sh plumbing on CPU (its dry mode) and its summary, without a GPU."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from gpu_check_summary import summary  # noqa: E402


def test_dry_run_packs_at_most_two_files(tmp_path):
    """--dry on CPU: the CUDA build is skipped and recorded, the tests stage and a bench stage run
    (its GPU rows skip), and $OUT ends with the archive and the summary only."""
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "GPU_CHECK_STAGES": "build tests bench-search",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(ROOT / "scripts/gpu_check.sh"), "--dry"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.tar.gz", "summary.json"]
    result = json.loads((out / "summary.json").read_text())
    assert result["ok"] and result["env"]["dry"] is True
    stages = {s["stage"]: s for s in result["stages"]}
    assert list(stages) == ["build", "tests", "bench-search"]
    assert stages["build"]["skipped"] == "dry run: needs CUDA"
    assert stages["tests"]["rc"] == 0 and stages["bench-search"]["rc"] == 0 and not stages["tests"]["timed_out"]
    assert result["tests"]["tests"] == 1 and result["tests"]["failures"] == 0
    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        names = {Path(n).name for n in tar.getnames()}
    assert {"env.json", "stages.jsonl", "tests.log", "tests.xml", "bench-search.log"} <= names


def test_summary_reads_cut_off_stages(tmp_path):
    """A stage killed by its limit is not ok; a JSONL line cut off mid-write is ignored."""
    (tmp_path / "env.json").write_text(json.dumps({"gpu": "H200", "dry": False}))
    stages = [{"stage": "tests", "limit_s": 130, "rc": 0, "seconds": 100, "timed_out": False},
              {"stage": "bench-search", "limit_s": 60, "rc": 124, "seconds": 60, "timed_out": True}]
    (tmp_path / "stages.jsonl").write_text("".join(json.dumps(s) + "\n" for s in stages))
    row = {"name": "test_knn[janus1b-b16-db10M-triton-graph]",
           "extra_info": {"median_s": 2e-4, "iqr_s": 1e-5, "x_h200_floor": 1.4, "ratio_to_official": 0.01, "gpu": "x"}}
    (tmp_path / "bench-search.jsonl").write_text(json.dumps(row) + "\n" + '{"name": "test_knn[cut')
    result = summary(tmp_path, 200.0)
    assert result["ok"] is False and result["tests"] is None and result["env"]["gpu"] == "H200"
    assert result["benchmarks"] == [{"stage": "bench-search", "name": row["name"], "median_s": 2e-4, "iqr_s": 1e-5,
                                     "x_h200_floor": 1.4, "ratio_to_official": 0.01}]
