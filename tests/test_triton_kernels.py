"""Triton kernels against their references (interpreter on CPU, compiled on CUDA).

Shapes are small and odd on purpose: under TRITON_INTERPRET=1 the cost follows the number of
programs and ops, and odd sizes exercise every mask.
"""

import pytest
import torch

import arrag_kernels as ak
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
)

from .utils import OPCHECK_KWARGS, TOLERANCES, assert_close

pytest.importorskip("arrag_kernels.ops._triton", reason="triton is not installed")
from arrag_kernels.ops._triton import _common  # noqa: E402
from arrag_kernels.ops._triton.daid import daid_sample_op  # noqa: E402
from arrag_kernels.ops._triton.knn import knn_op  # noqa: E402
from arrag_kernels.ops._triton.neighborhood import neighbor_keys_op  # noqa: E402

CUDA = torch.cuda.is_available()
# bf16 only compiled: the interpreter computes bf16 wrongly.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
DEVICE = "cuda" if CUDA else "cpu"


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# neighbour keys

LAYOUTS = {
    "causal1-skip": KeyLayout(),
    "causal2-zero": KeyLayout(hops=(2,), border="zero"),
    "full1-zero": KeyLayout(neighborhood="full", border="zero"),
    "full2-skip": KeyLayout(neighborhood="full", hops=(2,)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("B,grid,P", [(1, (24, 24), None), (3, (5, 7), None), (3, (7, 5), 4)], ids=["b1-24x24", "b3-5x7", "b3-7x5-p4"])
def test_neighbor_keys(B, grid, P, layout, dtype):
    g = _gen(0)
    H, W = grid
    V, d = 61, 8
    tokens = torch.randint(-1, V, (B, H * W), generator=g)  # -1: not generated yet
    codebook = torch.randn(V, d, generator=g).to(dtype)
    positions = torch.randint(0, H * W, (B,) if P is None else (B, P), generator=g)
    tokens, codebook, positions = tokens.to(DEVICE), codebook.to(DEVICE), positions.to(DEVICE)
    with ak.use_backend("triton"):
        keys, valid = neighbor_keys(tokens, codebook, positions, grid, layout)
    ref_keys, ref_valid = neighbor_keys_ref(tokens, codebook, positions, grid, layout)
    assert keys.dtype == codebook.dtype and keys.shape == ref_keys.shape
    assert torch.equal(keys, ref_keys), "gathered keys differ (a pure copy must be exact)"
    assert torch.equal(valid, ref_valid)


# ---------------------------------------------------------------------------------------------
# exact k-NN


def assert_knn_matches(dist, ids, ref_dist, ref_ids, queries, keys):
    """Same distances; same ids wherever the distance is strictly separated from its neighbours;
    and every returned id really is at the returned distance (so ties may only swap equals)."""
    assert ids.dtype == torch.int64 and dist.dtype == torch.float32
    # Distances come from the expanded form |q|^2 + |k|^2 - 2 q.k in fp32 (reference and kernels alike),
    # whose rounding error scales with the norms, not with the distance: ~16 fp32 ulps of the largest
    # |q|^2 + |k|^2 (seen on the H200: 3e-4 at distance 23.7 with norms near 300, bf16 keys).
    norm_atol = 2e-6 * float(queries.float().pow(2).sum(-1).max() + keys.float().pow(2).sum(-1).max())
    assert_close(dist, ref_dist, what="knn distances", atol=norm_atol)
    atol, rtol = TOLERANCES[torch.float32]
    tol = max(atol, norm_atol) + rtol * ref_dist.abs()
    gap = torch.full_like(ref_dist, float("inf"))
    gap[:, 1:] = ref_dist[:, 1:] - ref_dist[:, :-1]
    gap[:, :-1] = torch.minimum(gap[:, :-1], ref_dist[:, 1:] - ref_dist[:, :-1])
    separated = gap > 4 * tol
    assert torch.equal(ids[separated], ref_ids[separated]), "ids differ at strictly separated distances"
    q, x = queries.double().cpu(), keys.double().cpu()
    true = ((q[:, None, :] - x[ids.cpu()]) ** 2).sum(-1)
    assert_close(dist, true.float(), what="distance of the returned id", atol=norm_atol)
    assert all(len(set(r)) == len(r) for r in ids.tolist()), "duplicate ids in a row"


KNN_CASES = [  # (Q, N, D, k)
    (1, 97, 32, 7),
    (3, 97, 32, 64),
    (3, 1025, 96, 1),
    (3, 3001, 32, 64),
    (1, 3001, 32, 2048),
    (2, 9001, 32, 16),  # a sampled bound, many filter programs
]


def _knn_inputs(Q, N, D, k, dtype):
    """Random fp32 queries (Q, D) and keys (N, D) of ``dtype`` on DEVICE, seeded by the shape."""
    g = _gen(Q * N + k)
    queries = torch.randn(Q, D, generator=g).to(DEVICE)
    return queries, torch.randn(N, D, generator=g).to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("Q,N,D,k", KNN_CASES, ids=[f"q{q}-n{n}-d{d}-k{k}" for q, n, d, k in KNN_CASES])
def test_knn(Q, N, D, k, dtype):
    queries, keys = _knn_inputs(Q, N, D, k, dtype)
    with ak.use_backend("triton"):
        dist, ids = knn(queries, keys, k)
    ref_dist, ref_ids = knn_ref(queries, keys, k)
    assert_knn_matches(dist, ids, ref_dist, ref_ids, queries, keys.float())


def test_knn_ties_ordered_by_id():
    """Duplicate keys: equal distances must come in id order, exactly like the reference."""
    g = _gen(3)
    base = torch.randint(-1, 2, (40, 32), generator=g).float()  # small integers: exact arithmetic
    keys = base[torch.randint(0, 40, (1500,), generator=g)].to(DEVICE)
    queries = torch.randint(-1, 2, (3, 32), generator=g).float().to(DEVICE)
    with ak.use_backend("triton"):
        dist, ids = knn(queries, keys, 100)
    ref_dist, ref_ids = knn_ref(queries, keys, 100)
    assert torch.equal(dist, ref_dist)
    assert torch.equal(ids, ref_ids)


# ---------------------------------------------------------------------------------------------
# DAiD sample


def _daid_inputs(B, V, K, cfg, dtype, seed, active=None):
    g = _gen(seed)
    logits = (torch.randn(2 * B if cfg else B, V, generator=g) * 3).to(dtype)
    dist = torch.rand(B, K, generator=g) * 4
    # Few distinct tokens so duplicates occur; -1 is padding.
    tokens = torch.randint(-1, min(V, max(2, K // 2)), (B, K), generator=g)
    if active is None:
        active = torch.arange(B) % 3 != 1
    return [t.to(DEVICE) for t in (logits, dist, tokens, active)]


def _merged_probs(logits, dist, tokens, active, guidance_scale, temperature, lam, tau, dedup):
    scores = logits.float()
    if guidance_scale is not None:
        cond, uncond = scores.chunk(2)
        scores = uncond + guidance_scale * (cond - uncond)
    return daid_mix_ref(torch.softmax(scores / temperature, -1), dist, tokens, active, lam, tau, dedup)


DAID_CASES = [  # (B, V, K, guidance)
    (1, 97, 1, None),
    (3, 97, 7, 5.0),
    (3, 1025, 64, 5.0),
    (4, 3001, 64, None),
]


@pytest.mark.parametrize("greedy", [False, True], ids=["sample", "greedy"])
@pytest.mark.parametrize("dedup", ["nearest", "sum"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,V,K,cfg", DAID_CASES, ids=[f"b{b}-v{v}-k{k}-cfg{c}" for b, v, k, c in DAID_CASES])
def test_daid_sample(B, V, K, cfg, dtype, dedup, greedy):
    logits, dist, tokens, active = _daid_inputs(B, V, K, cfg, dtype, seed=B * V + K)
    kw = dict(guidance_scale=cfg, temperature=0.8, lam=0.4, tau=0.6, dedup=dedup)
    uniforms = None if greedy else torch.rand(B, generator=_gen(5)).to(DEVICE)
    with ak.use_backend("triton"):
        out = daid_sample(logits, dist, tokens, active, uniforms, **kw)
    ref = daid_sample_ref(logits, dist, tokens, active, uniforms, **kw)
    assert out.dtype == torch.int64 and out.shape == (B,)
    if torch.equal(out, ref):
        return
    # Only a draw within fp32 rounding of a CDF step (or a near-tie for argmax) may differ.
    p = _merged_probs(logits, dist, tokens, active, **kw)
    for b in (out != ref).nonzero().flatten().tolist():
        if greedy:
            gap = (p[b, ref[b]] - p[b, out[b]]).abs().item()
        else:
            cdf = p[b].cumsum(0)
            gap = (cdf[min(out[b], ref[b])] - uniforms[b] * cdf[-1]).abs().item()
        assert gap < 1e-5, f"row {b}: triton token {out[b].item()} != reference {ref[b].item()} (margin {gap:.3g})"


def test_daid_sample_uniform_sweep():
    """Many uniforms on one row: every inverse-CDF step is hit, tokens equal the reference."""
    B = 64
    logits, dist, tokens, active = _daid_inputs(1, 13, 9, 3.0, torch.float32, seed=11, active=torch.tensor([True]))
    logits = torch.cat([logits[:1].expand(B, -1), logits[1:].expand(B, -1)])
    dist, tokens, active = dist.expand(B, -1), tokens.expand(B, -1), active.expand(B)
    uniforms = (torch.arange(B, dtype=torch.float32) + 0.5).to(DEVICE) / B
    kw = dict(guidance_scale=3.0, temperature=1.0, lam=0.5, tau=0.6, dedup="nearest")
    with ak.use_backend("triton"):
        out = daid_sample(logits, dist.contiguous(), tokens.contiguous(), active.contiguous(), uniforms, **kw)
    assert torch.equal(out, daid_sample_ref(logits, dist, tokens, active, uniforms, **kw))


def _chi2_isf_1e4(df: int) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile at p = 1e-4 (z = 3.719)."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + 3.719 * a**0.5) ** 3


def test_daid_sample_distribution():
    """Chi-square of 800 draws (fixed seed) against the merged distribution, V = 13.

    Each draw is one kernel program (~20 ms in the interpreter), hence one dedup mode only; the
    exact-token tests above cover both modes.
    """
    n, V = 800, 13
    logits, dist, _, _ = _daid_inputs(1, V, 6, None, torch.float32, seed=2)
    logits = logits / 3  # keep every cell's expected count large enough for the chi-square
    tokens = torch.tensor([[3, 3, 7, -1, 11, 7]], device=DEVICE)  # retrieval mass unlike the model's
    kw = dict(guidance_scale=None, temperature=1.0, lam=0.5, tau=0.6, dedup="nearest")
    active = torch.ones(n, dtype=torch.bool, device=DEVICE)
    uniforms = torch.rand(n, generator=_gen(123)).to(DEVICE)
    with ak.use_backend("triton"):
        out = daid_sample(
            logits.expand(n, -1).contiguous(), dist.expand(n, -1).contiguous(), tokens.expand(n, -1).contiguous(),
            active, uniforms, **kw,
        )
    p = _merged_probs(logits, dist, tokens, active[:1], **kw)[0].double().cpu()
    observed = torch.bincount(out.cpu(), minlength=V).double()
    expected = p * n
    small = expected < 5  # pool sparse cells so the chi-square approximation holds
    observed = torch.cat([observed[~small], observed[small].sum().reshape(1)])
    expected = torch.cat([expected[~small], expected[small].sum().reshape(1)])
    keep = expected > 0
    assert observed[~keep].sum() == 0, "sampled a token with zero probability"
    chi2 = ((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum().item()
    df = int(keep.sum()) - 1
    assert df >= 5
    assert chi2 < _chi2_isf_1e4(df), f"chi-square {chi2:.1f} over {df} dof exceeds the p = 1e-4 threshold"


# ---------------------------------------------------------------------------------------------
# dispatch and torch.library


def test_forced_triton_unavailable_raises(monkeypatch):
    q = torch.randn(2, 32, dtype=torch.float64, device=DEVICE)
    keys = torch.randn(50, 32, dtype=torch.float64, device=DEVICE)
    with ak.use_backend("triton"), pytest.raises(BackendUnavailable, match="dtype"):
        knn(q, keys, 3)
    ref = knn_ref(q, keys, 3)
    got = knn(q, keys, 3)  # auto falls back
    assert torch.equal(got[1], ref[1])
    # CPU tensors without the interpreter (what a CUDA machine sees for CPU inputs).
    monkeypatch.setattr(_common, "INTERPRETED", False)
    with ak.use_backend("triton"), pytest.raises(BackendUnavailable, match="TRITON_INTERPRET"):
        knn(q.float().cpu(), keys.float().cpu(), 3)


def test_auto_does_not_pick_the_interpreter():
    q, keys = torch.randn(2, 32), torch.randn(50, 32)
    from arrag_kernels.ops.knn import knn_dispatcher

    backend, _ = knn_dispatcher.select(q, keys, 3)
    assert backend != "triton"


def test_opcheck():
    """Full opcheck compiled on CUDA. Under the interpreter, torch's wrap_triton returns the raw
    InterpretedFunction (no HOP), so fake-tensor tracing would launch the interpreter on fake
    tensors: only the schema and autograd-registration checks can run there."""
    device = DEVICE
    g = _gen(0)
    q, keys = torch.randn(2, 32, generator=g).to(device), torch.randn(200, 32, generator=g).to(device)
    torch.library.opcheck(knn_op, (q, keys, 5), **OPCHECK_KWARGS)
    tokens = torch.randint(-1, 20, (2, 35), generator=g).to(device)
    codebook = torch.randn(20, 8, generator=g).to(device)
    positions = torch.randint(0, 35, (2, 3), generator=g).to(device)
    torch.library.opcheck(neighbor_keys_op, (tokens, codebook, positions, 5, 7, 1, True, True), **OPCHECK_KWARGS)
    logits, dist, hit_tokens, active = _daid_inputs(2, 50, 7, 2.0, torch.float32, seed=1)
    uniforms = torch.rand(2, generator=g).to(device)
    torch.library.opcheck(daid_sample_op, (logits, dist, hit_tokens, active, uniforms, 2.0, 1.0, 0.3, 0.6, False), **OPCHECK_KWARGS)
    torch.library.opcheck(daid_sample_op, (logits[:2], dist, hit_tokens, active, None, None, 1.0, 0.3, 0.6, True), **OPCHECK_KWARGS)
