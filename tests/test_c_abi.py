"""The C ABI of libarrag_kernels (csrc/include/arrag_kernels/arrag.h): the C example program built and
run, and each function called through ctypes on NaN-poisoned output buffers (an element the library
forgets to write fails the comparison), checked with the same oracles as the ops (the top-k oracle
for arrag_knn, the references for the others)."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from arrag_kernels import _ext
from arrag_kernels.config import KeyLayout
from arrag_kernels.ops import daid_mix_ref, daid_sample_ref, neighbor_keys_ref

from .oracles import assert_topk, exact_distances, knn_atol, tie_order
from .utils import TOLERANCES, assert_close, poison

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not _ext.HAS_EXT, reason=f"C++ extension unavailable: {_ext.EXT_ERROR}")

P = ctypes.c_void_p
I64 = ctypes.c_int64
F32 = ctypes.c_float


@pytest.fixture(scope="module")
def lib():
    lib = ctypes.CDLL(str(_ext.LIB_PATH))
    lib.arrag_last_error.restype = ctypes.c_char_p
    lib.arrag_knn.argtypes = [P, I64, P, ctypes.c_int, I64, I64, I64, P, P]
    lib.arrag_knn_blocked_rows.argtypes, lib.arrag_knn_blocked_rows.restype = [I64], I64
    lib.arrag_knn_prepare.argtypes = [P, ctypes.c_int, I64, I64, P, P]
    lib.arrag_knn_blocked.argtypes = [P, I64, P, P, ctypes.c_int, I64, I64, I64, P, P]
    lib.arrag_neighbor_keys.argtypes = [P, I64, I64, I64, P, I64, I64, P, I64, P, I64, ctypes.c_int, P, P]
    lib.arrag_daid_sample_filtered.argtypes = [P, I64, I64, ctypes.c_int, P, P, I64, P, P, F32, F32, F32, F32,
                                               ctypes.c_int, I64, F32, P, P]
    return lib


def _ptr(t: torch.Tensor):
    assert t.is_contiguous()
    return ctypes.c_void_p(t.data_ptr())


def _ok(lib, status, what):
    assert status == 0, f"{what} returned {status}: {lib.arrag_last_error().decode()}"


@pytest.mark.parametrize("key_dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("Q,N,D,k", [(1, 97, 32, 7), (5, 1025, 12, 63), (3, 300, 8, 300)],
                         ids=["q1-n97-d32-k7", "q5-n1025-d12-k63", "q3-n300-d8-k300"])
def test_knn(lib, Q, N, D, k, key_dtype):
    """arrag_knn and arrag_knn_blocked (keys prepared once) write every output: the top-k oracle."""
    g = torch.Generator().manual_seed(N + k)
    queries, keys = torch.randn(Q, D, generator=g), torch.randn(N, D, generator=g).to(key_dtype)
    code = {torch.float32: 0, torch.float16: 1}[key_dtype]
    truth = exact_distances(queries, keys)
    atol = max(TOLERANCES[torch.float32].atol, knn_atol(queries, keys))
    dist, ids = poison((Q, k)), torch.full((Q, k), -7, dtype=torch.int64)
    _ok(lib, lib.arrag_knn(_ptr(queries), Q, _ptr(keys), code, N, D, k, _ptr(dist), _ptr(ids)), "arrag_knn")
    assert_topk(dist, ids, truth, atol=atol, what="arrag_knn")
    rows = lib.arrag_knn_blocked_rows(N)
    assert rows == -(-N // 256) * 256
    blocked, norms = poison((rows * D,), key_dtype), poison((rows,))
    _ok(lib, lib.arrag_knn_prepare(_ptr(keys), code, N, D, _ptr(blocked), _ptr(norms)), "arrag_knn_prepare")
    assert not blocked.isnan().any() and not norms.isnan().any(), "arrag_knn_prepare left padding unwritten"
    b_dist, b_ids = poison((Q, k)), torch.full((Q, k), -7, dtype=torch.int64)
    _ok(lib, lib.arrag_knn_blocked(_ptr(queries), Q, _ptr(blocked), _ptr(norms), code, N, D, k, _ptr(b_dist),
                                   _ptr(b_ids)), "arrag_knn_blocked")
    assert torch.equal(b_dist, dist) and torch.equal(b_ids, ids), "arrag_knn_blocked != arrag_knn"


def test_knn_ties_in_id_order(lib):
    g = torch.Generator().manual_seed(3)
    keys = torch.randint(0, 3, (1031, 4), generator=g).float()
    queries = torch.randint(0, 3, (4, 4), generator=g).float()
    dist, ids = poison((4, 300)), torch.full((4, 300), -7, dtype=torch.int64)
    _ok(lib, lib.arrag_knn(_ptr(queries), 4, _ptr(keys), 0, 1031, 4, 300, _ptr(dist), _ptr(ids)), "arrag_knn")
    truth = exact_distances(queries, keys)
    assert_topk(dist, ids, truth, atol=0, rtol=0, what="arrag_knn ties")
    want_dist, want_ids = tie_order(truth, 300)
    assert torch.equal(dist, want_dist) and torch.equal(ids, want_ids)


@pytest.mark.parametrize("layout", [KeyLayout(), KeyLayout(hops=(1, 2), border="zero"), KeyLayout("full", 1, "skip")],
                         ids=["causal1-skip", "causal12-zero", "full1-skip"])
def test_neighbor_keys(lib, layout):
    g = torch.Generator().manual_seed(5)
    B, H, W, V, d, P_ = 3, 7, 9, 97, 8, 5
    tokens = torch.randint(-1, V, (B, H * W), generator=g)
    codebook = torch.randn(V, d, generator=g)
    positions = torch.randint(0, H * W, (B, P_), generator=g)
    offsets = torch.tensor(layout.offsets, dtype=torch.int32)
    keys, valid = poison((B, P_, len(offsets) * d)), torch.full((B, P_), 7, dtype=torch.uint8)
    _ok(lib, lib.arrag_neighbor_keys(_ptr(tokens), B, H, W, _ptr(codebook), V, d, _ptr(positions), P_, _ptr(offsets),
                                     len(offsets), int(layout.border == "skip"), _ptr(keys), _ptr(valid)),
        "arrag_neighbor_keys")
    ref_keys, ref_valid = neighbor_keys_ref(tokens, codebook, positions, (H, W), layout)
    assert torch.equal(keys, ref_keys), "keys differ from neighbor_keys_ref (a pure copy must be exact)"
    assert torch.equal(valid.bool(), ref_valid) and bool((valid <= 1).all())


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (7, 0.8)], ids=["unfiltered", "top7-p0.8"])
@pytest.mark.parametrize("greedy", [False, True], ids=["uniforms", "greedy"])
def test_daid_sample(lib, greedy, top_k, top_p):
    g = torch.Generator().manual_seed(7)
    B, V, K = 5, 97, 13
    logits = torch.randn(2 * B, V, generator=g) * 3
    dist = torch.rand(B, K, generator=g) * 4
    hits = torch.randint(-1, 40, (B, K), generator=g)
    active = (torch.arange(B) % 3 != 1)
    uniforms = None if greedy else torch.rand(B, generator=g)
    kw = dict(guidance_scale=5.0, temperature=0.9, lam=0.4, tau=0.6, dedup="nearest", top_k=top_k, top_p=top_p)
    out, probs = torch.full((B,), -7, dtype=torch.int64), poison((B, V))
    active_u8 = active.to(torch.uint8)  # kept alive for the call
    _ok(lib, lib.arrag_daid_sample_filtered(
        _ptr(logits), B, V, 1, _ptr(dist), _ptr(hits), K, _ptr(active_u8),
        None if uniforms is None else _ptr(uniforms), 5.0, 0.9, 0.4, 0.6, 0, top_k, top_p, _ptr(out), _ptr(probs)),
        "arrag_daid_sample_filtered")
    assert torch.equal(out, daid_sample_ref(logits, dist, hits, active, uniforms, **kw))
    from arrag_kernels.ops.daid import top_k_top_p_filter_ref

    scores = logits[B:] + 5.0 * (logits[:B] - logits[B:])
    want = daid_mix_ref(torch.softmax(top_k_top_p_filter_ref(scores / 0.9, top_k, top_p), -1), dist, hits, active,
                        0.4, 0.6, "nearest")
    assert_close(probs, want, what="arrag_daid_sample probabilities")


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
