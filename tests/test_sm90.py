"""Every kind of Triton kernel the library launches compiles for sm_90 (H100 / H200) at the GPU check's
shapes, without spilling in the bandwidth-bound ones, within sm_90's shared memory: tests/sm90.py in a
subprocess (no GPU needed). The default suite compiles one case per op (each kernel once, ~1 minute of
ptxas); ``python -m tests.sm90`` compiles all of them (44 specialisations) before a GPU session."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .utils import UNAVAILABLE

CASES = ["knn-b16", "ivfpq-b16-values", "faid-b16", "daid-b16", "neighbors-hops12"]
KERNELS = {f"_knn_{s}_kernel" for s in ("sample", "bound", "filter", "select")} | \
          {f"_ivfpq_{s}_kernel" for s in ("sample", "bound", "filter", "select")} | \
          {f"_faid_{s}_kernel" for s in ("context", "candidates", "score", "mean")} | \
          {"_daid_sample_kernel", "_neighbor_keys_kernel"}


@pytest.mark.skipif(UNAVAILABLE["triton"] is not None, reason=UNAVAILABLE["triton"] or "")
@pytest.mark.skipif(torch.cuda.is_available(), reason="where CUDA runs, the compiled tests build every kernel for the GPU")
def test_every_kernel_compiles_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "rows.json"
    run = subprocess.run([sys.executable, "-m", "tests.sm90", "--cases", ",".join(CASES), "--json", str(out)],
                         cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert {r["kernel"] for r in rows} == KERNELS  # a kernel no longer launched (or a new one) shows here
    from tests.sm90 import PTXAS, SMEM_LIMIT

    checked = [r for r in rows if r["kernel"] in PTXAS]
    assert len(checked) == 4 and all(r["registers"] for r in checked)
    assert [r["kernel"] for r in checked if r["spill_bytes"]] == [], checked
    assert max(r["shared_bytes"] for r in rows) <= SMEM_LIMIT
