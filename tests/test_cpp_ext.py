"""The compiled extension as a package: binding errors, the package without the extension, and the optional build (setup.py flags). Its kernels are tested with each op's other
backends (test_knn.py, test_neighbor_keys.py, test_daid.py), its C ABI in test_c_abi.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from arrag_kernels import _ext
from arrag_kernels.config import KeyLayout
ROOT = Path(__file__).resolve().parents[1]
needs_ext = pytest.mark.skipif(not _ext.HAS_EXT, reason=f"C++ extension unavailable: {_ext.EXT_ERROR}")


# ---------------------------------------------------------------- bad input through the bindings


@needs_ext
def test_bindings_reject_bad_input():
    C = _ext._C
    q = np.zeros((4, 8), np.float32)
    y = np.zeros((10, 8), np.float32)
    with pytest.raises(TypeError, match="queries must be float32, got float64"):
        C.knn(q.astype(np.float64), y, 3)
    with pytest.raises(TypeError, match="keys must be float32 or float16, got int32"):
        C.knn(q, y.astype(np.int32), 3)
    with pytest.raises(ValueError, match="keys must be C-contiguous"):
        C.knn(q, np.zeros((8, 10), np.float32).T, 3)
    with pytest.raises(ValueError, match=r"keys.shape\[1\] \(the query dimension\) must be 8, got 7"):
        C.knn(q, np.zeros((10, 7), np.float32), 3)
    with pytest.raises(ValueError, match=r"k must be in \[1, min\(2048, number of keys = 10\)\], got 11"):
        C.knn(q, y, 11)
    with pytest.raises(ValueError, match="queries must be 2-D"):
        C.knn(np.zeros(8, np.float32), y, 3)

    tokens = np.zeros((2, 12), np.int64)
    cb = np.zeros((5, 4), np.float32)
    pos = np.zeros((2, 1), np.int64)
    off = np.array(KeyLayout().offsets, np.int32)
    with pytest.raises(ValueError, match=r"tokens.shape\[1\] \(height \* width\) must be 20, got 12"):
        C.neighbor_keys(tokens, cb, pos, 4, 5, off, True)
    with pytest.raises(ValueError, match=r"position 12 \(entry 1\) is outside the grid \[0, 12\)"):
        C.neighbor_keys(tokens, cb, np.array([[0], [12]], np.int64), 3, 4, off, True)
    bad = tokens.copy()
    bad[1, 1] = 5
    with pytest.raises(ValueError, match=r"token id 5 at grid cell 1 of image 1 is outside the codebook \[0, 5\)"):
        C.neighbor_keys(bad, cb, np.array([[0], [5]], np.int64), 3, 4, off, True)
    with pytest.raises(TypeError, match="offsets must be int32, got int64"):
        C.neighbor_keys(tokens, cb, pos, 3, 4, off.astype(np.int64), True)

    logits = np.zeros((4, 16), np.float32)
    dist = np.zeros((2, 3), np.float32)
    ids = np.zeros((2, 3), np.int64)
    active = np.ones(2, bool)
    kw = dict(guidance_scale=5.0, temperature=1.0, lam=0.1, tau=0.6, dedup="nearest")
    with pytest.raises(ValueError, match=r"logits.shape\[0\] \(2 \* batch: conditional then unconditional rows\) must be 4, got 2"):
        C.daid_sample(logits[:2], dist, ids, active, None, **kw)
    with pytest.raises(ValueError, match=r"dist.shape\[1\] \(tokens.shape\[1\]\) must be 3, got 2"):
        C.daid_sample(logits, dist[:, :2].copy(), ids, active, None, **kw)
    with pytest.raises(ValueError, match="retrieved token id 16 at \\(row 0, hit 2\\) is outside the vocabulary"):
        C.daid_sample(logits, dist, np.array([[0, 1, 16], [0, 0, 0]], np.int64), active, None, **kw)
    with pytest.raises(ValueError, match=r"uniforms must lie in \[0, 1\), got 1.0"):
        C.daid_sample(logits, dist, ids, active, np.ones(2, np.float32), **kw)
    with pytest.raises(ValueError, match="dedup must be 'nearest' or 'sum', got 'max'"):
        C.daid_sample(logits, dist, ids, active, None, **{**kw, "dedup": "max"})
    with pytest.raises(TypeError, match="active must be bool, got int64"):
        C.daid_sample(logits, dist, ids, np.ones(2, np.int64), None, **kw)
    nan_logits = logits.copy()
    nan_logits[3, 7] = np.nan
    with pytest.raises(ValueError, match="logits row 3 holds NaN or \\+inf at 7"):
        C.daid_sample(nan_logits, dist, ids, active, None, **kw)
    nan_dist = dist.copy()
    nan_dist[1, 2] = np.nan
    with pytest.raises(ValueError, match=r"retrieved distance \(1, 2\) is NaN"):
        C.daid_sample(logits, nan_dist, ids, active, None, **kw)


# ---------------------------------------------------------------- without the extension


def test_package_works_without_extension():
    code = """
import torch, arrag_kernels
from arrag_kernels import _ext
from arrag_kernels.ops import knn, knn_ref, use_backend, BackendUnavailable
assert not _ext.HAS_EXT and "disabled by ARRAG_KERNELS_DISABLE_EXT=1" in _ext.EXT_ERROR, _ext.EXT_ERROR
q, y = torch.randn(3, 8), torch.randn(50, 8)
d, i = knn(q, y, 5)
assert torch.equal(i, knn_ref(q, y, 5)[1])
try:
    with use_backend("cpp"):
        knn(q, y, 5)
except BackendUnavailable as e:
    assert "C++ extension unavailable: disabled" in str(e), str(e)
else:
    raise AssertionError("the cpp backend ran with the extension disabled")
print("ok")
"""
    env = {**os.environ, "ARRAG_KERNELS_DISABLE_EXT": "1"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout + run.stderr


def _build_ext(tmp_path, **env):
    out = tmp_path / "lib"
    run = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", f"--build-lib={out}", f"--build-temp={tmp_path / 'tmp'}"],
        cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=300,
    )
    return run, out


def test_build_disabled_still_succeeds(tmp_path):
    run, out = _build_ext(tmp_path, ARRAG_KERNELS_BUILD_EXT="0")
    assert run.returncode == 0, run.stderr[-3000:]
    info = json.loads((out / "arrag_kernels" / "_build_info.json").read_text())
    assert info["ext"] is False and "ARRAG_KERNELS_BUILD_EXT=0" in info["reason"]
    assert "skipping the compiled extension" in run.stderr
    assert not list((out / "arrag_kernels").glob("_C.*"))


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not on PATH")
def test_failed_build_is_skipped_in_auto_and_an_error_when_forced(tmp_path):
    broken = {"CXX": "/bin/false", "CC": "/bin/false", "ARRAG_KERNELS_BUILD_CUDA": "0"}
    run, out = _build_ext(tmp_path / "auto", ARRAG_KERNELS_BUILD_EXT="auto", **broken)
    assert run.returncode == 0, run.stderr[-3000:]
    info = json.loads((out / "arrag_kernels" / "_build_info.json").read_text())
    assert info["ext"] is False and info["reason"].startswith("build failed")
    run, _ = _build_ext(tmp_path / "forced", ARRAG_KERNELS_BUILD_EXT="1", **broken)
    assert run.returncode != 0 and "ARRAG_KERNELS_BUILD_EXT=1 but the extension failed to build" in run.stderr
