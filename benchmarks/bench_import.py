"""Import time: ``import arrag_kernels`` in a fresh interpreter, with ``import torch`` alone interleaved.

    pytest benchmarks/bench_import.py --benchmark-only -s

Each round starts a new Python process (``python -c "import ..."``), so nothing is cached in the
interpreter; the page cache is warm after the untimed warm-up. ``extra_info`` records both medians and
the package's own share (the difference of the medians): torch is a dependency the package cannot
import faster, and on a CPU machine the package defers its Triton backend (which pulls in
torch._inductor / torch._dynamo) to the first dispatch that can use it.
"""

from __future__ import annotations

import subprocess
import sys

import timing


def _python(statement: str):
    return lambda: subprocess.run([sys.executable, "-c", statement], check=True)


def test_import_time(benchmark):
    benchmark.group = "import"
    timing.run(benchmark, _python("import arrag_kernels"), {"torch": _python("import torch")}, min_rounds=7)
    info = benchmark.extra_info
    if "median_s" in info:
        info["package_share_s"] = info["median_s"] - info["torch_median_s"]
        print(f"\nimport arrag_kernels {info['median_s']:.2f} s, import torch {info['torch_median_s']:.2f} s "
              f"(package's share {info['package_share_s']:.2f} s; medians of {info['rounds']} interleaved rounds)")
