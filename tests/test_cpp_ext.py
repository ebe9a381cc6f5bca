"""The compiled extension: C++ kernels vs the references, binding errors, the C ABI example, the
package without the extension, and the optional build (setup.py flags)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from arrag_kernels import _ext
from arrag_kernels.config import KeyLayout
from arrag_kernels.ops import (
    BackendUnavailable,
    daid_mix_ref,
    daid_sample,
    daid_sample_ref,
    knn,
    knn_ref,
    neighbor_keys,
    neighbor_keys_ref,
    use_backend,
)
from arrag_kernels.ops.knn import knn_dispatcher

from .utils import assert_close

ROOT = Path(__file__).resolve().parents[1]
needs_ext = pytest.mark.skipif(not _ext.HAS_EXT, reason=f"C++ extension unavailable: {_ext.EXT_ERROR}")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- exact k-NN


KNN_CASES = [  # (num_keys, dim, num_queries, k)
    (1025, 32, 7, 63),
    (97, 96, 5, 97),
    (5000, 8, 3, 2048),
    (63, 12, 70, 1),
    (4099, 32, 16, 64),
]


@needs_ext
@pytest.mark.parametrize("key_dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("case", KNN_CASES, ids=[f"N{n}-D{d}-Q{q}-k{k}" for n, d, q, k in KNN_CASES])
def test_knn_matches_reference(case, key_dtype):
    N, D, Q, k = case
    g = _gen(N + D)
    keys = torch.randn(N, D, generator=g).to(key_dtype)
    queries = torch.randn(Q, D, generator=g)
    ref_d, ref_i = knn_ref(queries, keys, k)
    with use_backend("cpp"):
        d, i = knn(queries, keys, k)
    assert d.dtype == torch.float32 and i.dtype == torch.int64 and d.shape == (Q, k) == i.shape
    assert_close(d, ref_d, torch.float16 if key_dtype == torch.float16 else torch.float32, what="knn distances")
    # Ids may differ only where distances tie within rounding: our ids must be as near as the reference's.
    exact = ((queries.double()[:, None, :] - keys.double()[i]) ** 2).sum(-1)
    assert_close(exact.float(), ref_d, torch.float16, what="true distance of the returned ids")
    mismatch = (i != ref_i).float().mean().item()
    assert mismatch < 0.01, f"{mismatch:.2%} of ids differ from the reference"
    assert (i.sort(dim=1).values.diff(dim=1) != 0).all(), "an id was returned twice"


@needs_ext
def test_knn_ties_ordered_by_id():
    """Small integer coordinates make every distance exact and tie often: ids must equal the reference."""
    g = _gen(3)
    keys = torch.randint(0, 3, (3001, 4), generator=g).float()
    queries = torch.randint(0, 3, (9, 4), generator=g).float()
    ref_d, ref_i = knn_ref(queries, keys, 700)
    for dtype in (torch.float32, torch.float16):
        with use_backend("cpp"):
            d, i = knn(queries, keys.to(dtype), 700)
        assert torch.equal(d, ref_d) and torch.equal(i, ref_i), f"{dtype}: tie order differs from the reference"


@needs_ext
@pytest.mark.parametrize("key_dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
def test_knn_blocked_layout_equals_row_major(key_dtype):
    """The prepared (blocked) layout and the per-call transposition give identical results, ties
    included (integer coordinates), over a partial last block and 1-4 queries (the single-query tile)."""
    g = _gen(11)
    keys = torch.randint(0, 3, (1031, 12), generator=g).to(key_dtype)
    queries = torch.randint(0, 3, (5, 12), generator=g).float()
    blocked, norms = _ext._C.knn_prepare(keys.numpy())
    assert blocked.shape == (1280 * 12,) and norms.shape == (1280,) and blocked.dtype == keys.numpy().dtype
    ref_d, ref_i = knn_ref(queries, keys, 300)
    for nq in (1, 4, 5):
        q = queries[:nq].numpy()
        d, i = _ext._C.knn_blocked(q, blocked, norms, 1031, 300)
        rd, ri = _ext._C.knn(q, keys.numpy(), 300)
        assert np.array_equal(d, rd) and np.array_equal(i, ri), f"{nq} queries: blocked != row-major"
        assert torch.equal(torch.from_numpy(i), ref_i[:nq]) and torch.equal(torch.from_numpy(d), ref_d[:nq])
    with pytest.raises(ValueError, match="norms.shape"):
        _ext._C.knn_blocked(queries.numpy(), blocked, norms[:256], 1031, 3)


@needs_ext
def test_knn_prepared_keys_follow_in_place_changes():
    """The blocked layout is cached per keys tensor and rebuilt when the tensor is modified in place."""
    from arrag_kernels.ops import _cpp

    g = _gen(12)
    keys, q = torch.randn(700, 8, generator=g), torch.randn(3, 8, generator=g)
    with use_backend("cpp"):
        first = knn(q, keys, 5)
        assert id(keys) in _cpp._blocked_keys._entries
        keys[first[1][0, 0]] += 100.0  # move query 0's nearest key far away
        d, i = knn(q, keys, 5)
    ref_d, ref_i = knn_ref(q, keys, 5)
    assert torch.equal(i, ref_i) and first[1][0, 0] not in i[0]
    assert_close(d, ref_d, torch.float32, what="distances after the in-place change")
    key_id = id(keys)
    del keys
    assert key_id not in _cpp._blocked_keys._entries, "the prepared layout outlived its keys tensor"


@needs_ext
def test_knn_dispatch_reasons():
    q = torch.randn(2, 8)
    assert knn_dispatcher.select(q, torch.randn(10, 8), 3)[0] != "reference"
    with use_backend("cpp"), pytest.raises(BackendUnavailable, match="bfloat16; the C.. kernel takes float32 or float16"):
        knn(q, torch.randn(10, 8, dtype=torch.bfloat16), 3)
    with use_backend("cpp"):  # non-contiguous inputs are fine through the public op
        d, i = knn(q.t().contiguous().t(), torch.randn(8, 20).t(), 4)
    assert d.shape == (2, 4)


# ---------------------------------------------------------------- neighbourhood keys


LAYOUTS = [
    KeyLayout(),
    KeyLayout(hops=(1, 2), border="zero"),
    KeyLayout(neighborhood="full", border="skip"),
]


@needs_ext
@pytest.mark.parametrize("layout", LAYOUTS, ids=["causal1-skip", "causal12-zero", "full1-skip"])
@pytest.mark.parametrize("pos_rank", [1, 2], ids=["pos1d", "pos2d"])
@pytest.mark.parametrize("tok_dtype", [torch.int32, torch.int64], ids=["i32", "i64"])
def test_neighbor_keys_matches_reference(layout, pos_rank, tok_dtype):
    g = _gen(5)
    B, H, W, V, d = 3, 7, 9, 97, 8
    tokens = torch.randint(-1, V, (B, H * W), generator=g).to(tok_dtype)
    codebook = torch.randn(V, d, generator=g)
    positions = torch.randint(0, H * W, (B,) if pos_rank == 1 else (B, 5), generator=g)
    ref_k, ref_v = neighbor_keys_ref(tokens, codebook, positions, (H, W), layout)
    with use_backend("cpp"):
        keys, valid = neighbor_keys(tokens, codebook, positions, (H, W), layout)
    assert torch.equal(keys, ref_k), f"max error {(keys - ref_k).abs().max().item()}"
    assert torch.equal(valid, ref_v)


# ---------------------------------------------------------------- DAiD merge + sample


DAID_CASES = [  # (batch, vocab, hits, guidance_scale, dedup)
    (5, 1025, 63, 5.0, "nearest"),
    (3, 97, 200, None, "sum"),
    (7, 1031, 2048, 1.5, "sum"),
    (16, 16384, 2048, 5.0, "nearest"),
]


def _daid_inputs(B, V, K, guidance, seed):
    g = _gen(seed)
    logits = torch.randn(2 * B if guidance is not None else B, V, generator=g) * 3
    dist = torch.rand(B, K, generator=g) * 4
    tokens = torch.randint(-1, min(V, 61), (B, K), generator=g)  # many duplicates, some padding
    tokens[0] = -1  # a row without any valid hit keeps p_model
    active = torch.rand(B, generator=g) > 0.3
    active[0] = True
    return logits, dist, tokens, active, torch.rand(B, generator=g)


@needs_ext
@pytest.mark.parametrize("greedy", [False, True], ids=["uniforms", "greedy"])
@pytest.mark.parametrize("case", DAID_CASES, ids=[f"B{b}-V{v}-K{k}-w{w}-{d}" for b, v, k, w, d in DAID_CASES])
def test_daid_sample_matches_reference(case, greedy):
    B, V, K, guidance, dedup = case
    logits, dist, tokens, active, uniforms = _daid_inputs(B, V, K, guidance, seed=V + K)
    if greedy:
        uniforms = None
    kw = dict(guidance_scale=guidance, temperature=0.9, lam=0.4, tau=0.6, dedup=dedup)
    want = daid_sample_ref(logits, dist, tokens, active, uniforms, **kw)
    with use_backend("cpp"):
        got = daid_sample(logits, dist, tokens, active, uniforms, **kw)
    assert got.dtype == torch.int64 and torch.equal(got, want), f"tokens {got.tolist()} != reference {want.tolist()}"


@needs_ext
@pytest.mark.parametrize("dedup", ["nearest", "sum"])
def test_daid_probabilities_match_reference(dedup):
    B, V, K = 6, 1025, 97
    logits, dist, tokens, active, uniforms = _daid_inputs(B, V, K, 5.0, seed=7)
    scores = logits[B:] + 5.0 * (logits[:B] - logits[B:])
    want = daid_mix_ref(torch.softmax(scores / 0.9, dim=-1), dist, tokens, active, 0.4, 0.6, dedup)
    _, probs = _ext._C.daid_sample(
        logits.numpy(), dist.numpy(), tokens.numpy(), active.numpy(), uniforms.numpy(),
        guidance_scale=5.0, temperature=0.9, lam=0.4, tau=0.6, dedup=dedup, return_probs=True,
    )
    assert_close(torch.from_numpy(probs), want, what=f"DAiD probabilities ({dedup})")


@needs_ext
def test_daid_sample_uniform_extremes():
    """u = 0 gives the first token with mass; u just below 1 the last one (never past the end)."""
    V = 33
    logits = torch.full((2, V), -1e4)
    logits[:, [3, 20]] = 0.0  # only tokens 3 and 20 have mass
    dist, tokens, active = torch.zeros(2, 1), torch.full((2, 1), -1), torch.ones(2, dtype=torch.bool)
    uniforms = torch.tensor([0.0, 1.0 - 2**-24])
    kw = dict(guidance_scale=None, temperature=1.0, lam=0.5, tau=0.6, dedup="nearest")
    with use_backend("cpp"):
        got = daid_sample(logits, dist, tokens, active, uniforms, **kw)
    assert got.tolist() == daid_sample_ref(logits, dist, tokens, active, uniforms, **kw).tolist() == [3, 20]


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


@needs_ext
def test_cuda_kselect_unavailable_is_an_error():
    if _ext.HAS_CUDA_EXT and torch.cuda.is_available():
        pytest.skip("CUDA is available: covered by test_cuda_kselect_matches_sort")
    from arrag_kernels.ops._cpp import cuda_kselect

    with pytest.raises((RuntimeError, ValueError), match="CUDA"):
        cuda_kselect(torch.zeros(2, 8), None, 3)


@pytest.mark.skipif(not (_ext.HAS_CUDA_EXT and torch.cuda.is_available()), reason=f"needs a GPU and the CUDA kernels ({_ext.CUDA_EXT_ERROR or 'no GPU'})")
@pytest.mark.parametrize("rows,cands,k", [(3, 5000, 2048), (17, 1025, 63), (1, 64, 64), (5, 3000, 1)])
def test_cuda_kselect_matches_sort(rows, cands, k):
    from arrag_kernels.ops._cpp import cuda_kselect

    g = _gen(rows * cands)
    dist = torch.randint(0, 50, (rows, cands), generator=g).float()  # many ties
    ids = torch.randperm(rows * cands, generator=g).reshape(rows, cands)
    dist[0, :3] = float("nan")
    ref = torch.where(dist.isnan(), float("inf"), dist)
    order = torch.sort(ids, dim=1).indices  # by id, then stable by distance = (distance, id) order
    order = torch.gather(order, 1, torch.sort(torch.gather(ref, 1, order), dim=1, stable=True).indices)
    want_d, want_i = torch.gather(ref, 1, order)[:, :k], torch.gather(ids, 1, order)[:, :k]
    d, i = cuda_kselect(dist.cuda(), ids.cuda(), k)
    torch.cuda.synchronize()
    assert torch.equal(d.cpu(), want_d) and torch.equal(i.cpu(), want_i)
    d, i = cuda_kselect(dist.cuda(), None, k)
    assert torch.equal(d.cpu(), want_d)


# ---------------------------------------------------------------- C ABI example


@needs_ext
def test_c_example_links_and_passes(tmp_path):
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler (cc/gcc) to build tests/c_api/example.c")
    lib_dir = _ext.LIB_PATH.parent
    exe = tmp_path / "example"
    subprocess.run(
        [cc, "-std=c99", "-Wall", "-Wextra", "-Werror", f"-I{ROOT / 'csrc' / 'include'}", str(ROOT / "tests" / "c_api" / "example.c"),
         f"-L{lib_dir}", "-larrag_kernels", f"-Wl,-rpath,{lib_dir}", "-lm", "-o", str(exe)],
        check=True,
    )
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "all checks passed" in run.stdout


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


@needs_ext
def test_opcheck_custom_ops():
    from arrag_kernels.ops import _cpp

    g = _gen(11)
    torch.library.opcheck(_cpp._knn_op, (torch.randn(5, 12, generator=g), torch.randn(97, 12, generator=g), 7))
    tokens = torch.randint(-1, 50, (2, 35), generator=g)
    offsets = torch.tensor(KeyLayout().offsets, dtype=torch.int32)
    logits, dist, hits, active, uniforms = _daid_inputs(3, 65, 9, 2.0, seed=3)
    torch.library.opcheck(_cpp._daid_sample_op, (logits, dist, hits, active, uniforms, 2.0, 1.0, 0.1, 0.6, "sum"))
    torch.library.opcheck(_cpp._neighbor_keys_op, (tokens, torch.randn(50, 4, generator=g), torch.randint(0, 35, (2, 3), generator=g), offsets, 5, 7, True))
