"""Benchmark set-up: collect ``bench_*.py`` and record the environment in every result.

Run with ``pytest benchmarks/ --benchmark-only`` (add ``--benchmark-json=...`` to keep results).
Triton kernels are timed compiled on CUDA only; nothing here turns the interpreter on.

pytest-benchmark writes its JSON only when the session ends normally; with ``ARRAG_BENCH_JSONL=path``
every finished benchmark is also appended to that file at once, so a run cut off by a time limit
(scripts/gpu_check.sh) keeps what it measured.

Timing: every row goes through :func:`timing.run` (medians, spread in ``extra_info``, baselines
interleaved with the row, rounds sized by ``--benchmark-max-time``). OpenMP threads wait passively
(``OMP_WAIT_POLICY=PASSIVE`` unless set): spin-waiting made small ops up to 30x slower on the
shared 2-core machines. It must be set before torch loads its OpenMP runtime, hence here.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collect_file(file_path: Path, parent):
    # Files named on the command line are collected by pytest itself, whatever their name.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def environment() -> dict:
    """GPU name, library versions, date and git commit of this run."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        import transformers

        transformers_version = transformers.__version__
    except ImportError:
        transformers_version = None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=Path(__file__).parent,
                           capture_output=True, text=True).stdout.strip()
        )
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = None, None
    if os.environ.get("ARRAG_GIT_COMMIT"):  # the device tool's copy of the tree carries a stale .git
        commit, dirty = os.environ["ARRAG_GIT_COMMIT"], False
    return {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "transformers": transformers_version,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit,
        "git_dirty": dirty,
    }


@pytest.fixture(scope="session")
def env_info() -> dict:
    return environment()


@pytest.fixture(autouse=True)
def _record_environment(request, env_info):
    if "benchmark" not in request.fixturenames:
        yield
        return
    benchmark = request.getfixturevalue("benchmark")
    benchmark.extra_info.update(env_info)
    yield
    path = os.environ.get("ARRAG_BENCH_JSONL")
    stats = getattr(benchmark.stats, "stats", None)
    if path and stats is not None and stats.data:
        row = {"name": request.node.name, "group": benchmark.group, "rounds": stats.rounds,
               "seconds": {key: getattr(stats, key) for key in ("min", "median", "mean", "max")},
               "extra_info": benchmark.extra_info}
        with open(path, "a") as f:
            f.write(json.dumps(row, default=str) + "\n")
