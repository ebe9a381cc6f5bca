"""DAiD ops: the retrieval distribution and merge (``daid_mix``, ``retrieval_distribution_ref``) on
hand-computed cases and against an independent float64 computation; the fused merge + draw
(``daid_sample``) on every kernel backend against the reference, with top-k / top-p filtering (the
reference against HF's warpers, the static loop passing HF's top_k / top_p into the fused op); input
errors; torch.library registration."""

import math

import pytest
import torch
from transformers import GenerationConfig, TopKLogitsWarper, TopPLogitsWarper

import arrag_kernels as ak
from arrag_kernels import _ext
from arrag_kernels.decoding import hf_generate
from arrag_kernels.decoding.static import fusable_cfg
from arrag_kernels.models import tiny_prompt_ids
from arrag_kernels.ops import daid_mix, daid_mix_ref, daid_sample, daid_sample_ref, retrieval_distribution_ref
from arrag_kernels.ops.daid import daid_sample_dispatcher, top_k_top_p_filter_ref

from .utils import (CUDA, OPCHECK_KWARGS, TRITON_DTYPES, UNAVAILABLE, assert_close, assert_error_relative,
                    backend_device, op_backends)

needs_ext = pytest.mark.skipif(not _ext.HAS_EXT, reason=f"C++ extension unavailable: {_ext.EXT_ERROR}")
# The fused sampler's kernels (the reference is the oracle of the comparisons below).
KERNELS = op_backends(daid_sample_dispatcher, exclude=("reference",))


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# the retrieval distribution and the merge (reference)


def _independent_p_ret(dist, tokens, V, tau, dedup):
    """Python loops over hits (the way the method is written), one row at a time."""
    out = torch.zeros(dist.shape[0], V, dtype=torch.float64)
    for b in range(dist.shape[0]):
        hits = [(float(d), int(t)) for d, t in zip(dist[b], tokens[b]) if t >= 0]
        if dedup == "nearest":
            best = {}
            for d, t in hits:
                best[t] = min(d, best.get(t, math.inf))
            z = sum(math.exp(-d / tau) for d in best.values())
            for t, d in best.items():
                out[b, t] = math.exp(-d / tau) / z
        else:
            z = sum(math.exp(-d / tau) for d, _ in hits)
            for d, t in hits:
                out[b, t] += math.exp(-d / tau) / z
    return out


def test_hand_computed_nearest_and_sum():
    dist = torch.tensor([[0.5, 1.0, 2.0, 0.7]])
    tokens = torch.tensor([[3, 1, 3, 1]])  # token 3: d 0.5 and 2.0; token 1: d 1.0 and 0.7
    p = retrieval_distribution_ref(dist, tokens, 5, tau=1.0, dedup="nearest")
    z = math.exp(-0.5) + math.exp(-0.7)
    assert p[0].tolist() == pytest.approx([0, math.exp(-0.7) / z, 0, math.exp(-0.5) / z, 0], rel=1e-6)
    p = retrieval_distribution_ref(dist, tokens, 5, tau=1.0, dedup="sum")
    z = sum(math.exp(-x) for x in (0.5, 1.0, 2.0, 0.7))
    assert p[0, 3].item() == pytest.approx((math.exp(-0.5) + math.exp(-2.0)) / z, rel=1e-6)
    assert p[0, 1].item() == pytest.approx((math.exp(-1.0) + math.exp(-0.7)) / z, rel=1e-6)


@pytest.mark.parametrize("dedup", ["nearest", "sum"])
@pytest.mark.parametrize("B,K,V", [(1, 7, 13), (3, 64, 97), (5, 257, 1025)])
def test_mix_matches_independent_computation(dedup, B, K, V):
    g = torch.Generator().manual_seed(B * K)
    probs = torch.softmax(torch.randn(B, V, generator=g), 1)
    dist = torch.rand(B, K, generator=g) * 8
    tokens = torch.randint(0, V // 3 + 1, (B, K), generator=g)  # many duplicates
    tokens[0, : K // 4] = -1  # padding entries are ignored
    active = torch.ones(B, dtype=torch.bool)
    active[-1] = B == 1
    lam, tau = 0.3, 0.6
    got = daid_mix(probs, dist, tokens, active, lam, tau, dedup)
    p_ret = _independent_p_ret(dist, tokens, V, tau, dedup)
    want = torch.where(active[:, None], (1 - lam) * probs.double() + lam * p_ret, probs.double())
    assert_close(got, want, torch.float32, "merged distribution")
    assert_close(got.sum(1), torch.ones(B), torch.float32, "row sums")


def test_rows_without_hits_keep_model_probs():
    probs = torch.softmax(torch.randn(2, 11), 1)
    tokens = torch.tensor([[-1, -1], [4, 5]])
    got = daid_mix(probs, torch.ones(2, 2), tokens, torch.tensor([True, True]), 0.5, 1.0)
    assert torch.equal(got[0], probs[0])
    assert not torch.equal(got[1], probs[1])


def test_lam_extremes():
    probs = torch.softmax(torch.randn(2, 11), 1)
    dist, tokens = torch.rand(2, 4), torch.randint(0, 11, (2, 4))
    on = torch.ones(2, dtype=torch.bool)
    assert torch.equal(daid_mix(probs, dist, tokens, on, 0.0, 0.6), probs)
    only_ret = daid_mix(probs, dist, tokens, on, 1.0, 0.6)
    for b in range(2):
        assert set(only_ret[b].nonzero().flatten().tolist()) == set(tokens[b].tolist())


def test_bad_inputs():
    p = torch.softmax(torch.randn(2, 11), 1)
    d, t, a = torch.rand(2, 4), torch.randint(0, 11, (2, 4)), torch.ones(2, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"lam must be in \[0, 1\]"):
        daid_mix(p, d, t, a, 1.5, 0.6)
    with pytest.raises(ValueError, match="tau must be > 0"):
        daid_mix(p, d, t, a, 0.5, 0.0)
    with pytest.raises(ValueError, match="dedup"):
        daid_mix(p, d, t, a, 0.5, 0.6, "max")
    with pytest.raises(ValueError, match=r"\(B, K\)"):
        daid_mix(p, d[:, :3], t, a, 0.5, 0.6)


def _merged_float64(logits, dist, tokens, active, *, guidance_scale, temperature, lam, tau, dedup, kept=None):
    """The merged distribution in float64 (the ground truth of error-relative checks); ``kept``: the
    tokens a top-k / top-p filter keeps (None: all)."""
    scores = logits.double()
    if guidance_scale is not None:
        cond, uncond = scores.chunk(2)
        scores = uncond + guidance_scale * (cond - uncond)
    scores = scores / temperature
    if kept is not None:
        scores = scores.masked_fill(~kept, float("-inf"))
    probs = torch.softmax(scores, -1)
    p_ret = _independent_p_ret(dist, tokens, probs.shape[1], tau, dedup)
    has_hits = (tokens >= 0).any(1)
    return torch.where((active & has_hits)[:, None], (1 - lam) * probs + lam * p_ret, probs)


# ---------------------------------------------------------------------------------------------
# the fused merge + draw: kernels against the reference


def _sample_inputs(B, V, K, cfg, dtype, seed, active=None):
    """CPU logits (2B rows with CFG) of ``dtype``, distances, hit tokens with many duplicates and
    padding (-1; row 0 of a batch > 1 has no valid hit: it keeps p_model), active rows, uniforms."""
    g = _gen(seed)
    logits = (torch.randn(2 * B if cfg is not None else B, V, generator=g) * 3).to(dtype)
    dist = torch.rand(B, K, generator=g) * 4
    tokens = torch.randint(-1, min(V, max(2, K // 2), 61), (B, K), generator=g)
    if B > 1:
        tokens[0] = -1
    if active is None:
        active = torch.arange(B) % 3 != 1
    return logits, dist, tokens, active, torch.rand(B, generator=g)


def _merged_probs(logits, dist, tokens, active, guidance_scale, temperature, lam, tau, dedup):
    scores = logits.float()
    if guidance_scale is not None:
        cond, uncond = scores.chunk(2)
        scores = uncond + guidance_scale * (cond - uncond)
    return daid_mix_ref(torch.softmax(scores / temperature, -1), dist, tokens, active, lam, tau, dedup)


SAMPLE_CASES = [  # (B, V, K, guidance, dedup)
    (1, 97, 1, None, "nearest"),
    (1, 97, 1, None, "sum"),
    (3, 97, 7, 5.0, "nearest"),
    (3, 97, 7, 5.0, "sum"),
    (3, 97, 200, None, "sum"),
    (3, 1025, 64, 5.0, "nearest"),
    (3, 1025, 64, 5.0, "sum"),
    (5, 1025, 63, 5.0, "nearest"),
    (4, 3001, 64, None, "nearest"),
    (4, 3001, 64, None, "sum"),
    (7, 1031, 2048, 1.5, "sum"),
    (16, 16384, 2048, 5.0, "nearest"),
]
# one interpreted program per row, each looping over V and K: seconds per case
INTERPRETER_TOO_SLOW = {(7, 1031, 2048, 1.5, "sum"), (16, 16384, 2048, 5.0, "nearest")}


@pytest.mark.parametrize("greedy", [False, True], ids=["sample", "greedy"])
@pytest.mark.parametrize("case", SAMPLE_CASES, ids=[f"b{b}-v{v}-k{k}-cfg{c}-{d}" for b, v, k, c, d in SAMPLE_CASES])
@pytest.mark.parametrize("backend,dtype", op_backends(daid_sample_dispatcher, exclude=("reference",),
                                                      dtypes={"triton": TRITON_DTYPES, "cpp": [torch.float32]}))
def test_sample_matches_reference(backend, dtype, case, greedy):
    """The C++ kernel draws exactly the reference's tokens; Triton may differ only where a draw lies
    within fp32 rounding of a CDF step (or a near-tie for argmax)."""
    if backend == "triton" and not CUDA and case in INTERPRETER_TOO_SLOW:
        pytest.skip("too slow for the Triton interpreter; run compiled on CUDA")
    B, V, K, cfg, dedup = case
    logits, dist, tokens, active, uniforms = _sample_inputs(B, V, K, cfg, dtype, seed=B * V + K)
    uniforms = None if greedy else uniforms
    kw = dict(guidance_scale=cfg, temperature=0.8, lam=0.4, tau=0.6, dedup=dedup)
    device = backend_device(backend)
    with ak.use_backend(backend):
        out = daid_sample(*(t if t is None else t.to(device) for t in (logits, dist, tokens, active, uniforms)), **kw)
    ref = daid_sample_ref(logits, dist, tokens, active, uniforms, **kw)
    assert out.dtype == torch.int64 and out.shape == (B,)
    out = out.cpu()
    if backend == "cpp":
        assert torch.equal(out, ref), f"tokens {out.tolist()} != reference {ref.tolist()}"
        return
    p = _merged_probs(logits, dist, tokens, active, **kw)
    for b in (out != ref).nonzero().flatten().tolist():
        if greedy:
            gap = (p[b, ref[b]] - p[b, out[b]]).abs().item()
        else:
            cdf = p[b].cumsum(0)
            gap = (cdf[min(out[b], ref[b])] - uniforms[b] * cdf[-1]).abs().item()
        assert gap < 1e-5, f"row {b}: {backend} token {out[b].item()} != reference {ref[b].item()} (margin {gap:.3g})"


@pytest.mark.parametrize("backend", KERNELS)
def test_sample_uniform_sweep(backend):
    """Many uniforms on one row: every inverse-CDF step is hit, tokens equal the reference."""
    B = 64
    logits, dist, tokens, active, _ = _sample_inputs(1, 13, 9, 3.0, torch.float32, seed=11, active=torch.tensor([True]))
    logits = torch.cat([logits[:1].expand(B, -1), logits[1:].expand(B, -1)])
    dist, tokens, active = dist.expand(B, -1), tokens.expand(B, -1), active.expand(B)
    uniforms = (torch.arange(B, dtype=torch.float32) + 0.5) / B
    kw = dict(guidance_scale=3.0, temperature=1.0, lam=0.5, tau=0.6, dedup="nearest")
    device = backend_device(backend)
    with ak.use_backend(backend):
        out = daid_sample(*(t.contiguous().to(device) for t in (logits, dist, tokens, active, uniforms)), **kw)
    assert torch.equal(out.cpu(), daid_sample_ref(logits, dist, tokens, active, uniforms, **kw))


@pytest.mark.parametrize("backend", KERNELS)
def test_sample_uniform_extremes(backend):
    """u = 0 gives the first token with mass; u just below 1 the last one (never past the end)."""
    V = 33
    logits = torch.full((2, V), -1e4)
    logits[:, [3, 20]] = 0.0  # only tokens 3 and 20 have mass
    dist, tokens, active = torch.zeros(2, 1), torch.full((2, 1), -1), torch.ones(2, dtype=torch.bool)
    uniforms = torch.tensor([0.0, 1.0 - 2**-24])
    kw = dict(guidance_scale=None, temperature=1.0, lam=0.5, tau=0.6, dedup="nearest")
    device = backend_device(backend)
    with ak.use_backend(backend):
        got = daid_sample(*(t.to(device) for t in (logits, dist, tokens, active, uniforms)), **kw)
    assert got.tolist() == daid_sample_ref(logits, dist, tokens, active, uniforms, **kw).tolist() == [3, 20]


def _chi2_isf_1e4(df: int) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile at p = 1e-4 (z = 3.719)."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + 3.719 * a**0.5) ** 3


@pytest.mark.parametrize("backend", op_backends(daid_sample_dispatcher))
def test_sample_distribution(backend):
    """Chi-square of 800 draws (fixed seed) against the merged distribution, V = 13.

    Each draw is one interpreted Triton program (~20 ms), hence one dedup mode only; the exact-token
    tests above cover both modes.
    """
    n, V = 800, 13
    logits, dist, _, _, _ = _sample_inputs(1, V, 6, None, torch.float32, seed=2)
    logits = logits / 3  # keep every cell's expected count large enough for the chi-square
    tokens = torch.tensor([[3, 3, 7, -1, 11, 7]])  # retrieval mass unlike the model's
    kw = dict(guidance_scale=None, temperature=1.0, lam=0.5, tau=0.6, dedup="nearest")
    active = torch.ones(n, dtype=torch.bool)
    uniforms = torch.rand(n, generator=_gen(123))
    device = backend_device(backend)
    with ak.use_backend(backend):
        out = daid_sample(*(t.expand(n, -1).contiguous().to(device) for t in (logits, dist, tokens)),
                          active.to(device), uniforms.to(device), **kw)
    p = _merged_probs(logits, dist, tokens, active[:1], **kw)[0].double()
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


@needs_ext
@pytest.mark.parametrize("dedup", ["nearest", "sum"])
def test_cpp_probabilities_match_reference(dedup):
    B, V, K = 6, 1025, 97
    logits, dist, tokens, active, uniforms = _sample_inputs(B, V, K, 5.0, torch.float32, seed=7)
    active = torch.rand(B, generator=_gen(9)) > 0.3
    active[0] = True  # active without a valid hit: keeps p_model
    scores = logits[B:] + 5.0 * (logits[:B] - logits[B:])
    want = daid_mix_ref(torch.softmax(scores / 0.9, dim=-1), dist, tokens, active, 0.4, 0.6, dedup)
    _, probs = _ext._C.daid_sample(
        logits.numpy(), dist.numpy(), tokens.numpy(), active.numpy(), uniforms.numpy(),
        guidance_scale=5.0, temperature=0.9, lam=0.4, tau=0.6, dedup=dedup, return_probs=True,
    )
    probs = torch.from_numpy(probs)
    assert_close(probs, want, what=f"DAiD probabilities ({dedup})")
    truth = _merged_float64(logits, dist, tokens, active, guidance_scale=5.0, temperature=0.9, lam=0.4, tau=0.6,
                            dedup=dedup)
    assert_error_relative(probs, want, truth, torch.float32, what=f"DAiD probabilities ({dedup})")


@pytest.mark.parametrize("backend", op_backends(daid_sample_dispatcher))
def test_sampler_rejects_nan_logits_and_distances(backend):
    """NaN logits or distances into the C++ sampler used to return token 0 / NaN probabilities (issue 14);
    CPU inputs are checked before dispatch, whatever the backend."""
    g = _gen(0)
    B, V, K = 3, 97, 5
    logits, dist = torch.randn(2 * B, V, generator=g), torch.rand(B, K, generator=g)
    tokens, active, u = torch.randint(0, V, (B, K), generator=g), torch.ones(B, dtype=torch.bool), torch.rand(B, generator=g)
    nan_logits, nan_dist = logits.clone(), dist.clone()
    nan_logits[4, 10] = float("nan")
    nan_dist[1, 2] = float("nan")
    masked = logits.clone()
    masked[:, 3] = float("-inf")  # masked tokens stay allowed
    with ak.use_backend(backend):
        kw = dict(guidance_scale=5.0, lam=0.5, tau=0.6)
        daid_sample(masked, dist, tokens, active, u, **kw)
        with pytest.raises(ValueError, match="daid_sample: logits row 4 holds NaN"):
            daid_sample(nan_logits, dist, tokens, active, u, **kw)
        with pytest.raises(ValueError, match=r"daid_sample: retrieved distance \(1, 2\) is NaN"):
            daid_sample(logits, nan_dist, tokens, active, u, **kw)
        pad = tokens.clone()
        pad[1, 2] = -1  # a padded hit's distance is never read
        daid_sample(logits, nan_dist, pad, active, u, **kw)


@pytest.mark.skipif(UNAVAILABLE["triton"] is not None, reason=UNAVAILABLE["triton"] or "")
def test_opcheck_triton():
    """Full opcheck compiled on CUDA; under the interpreter only the schema and autograd-registration checks."""
    from arrag_kernels.ops._triton.daid import daid_sample_op

    device = backend_device("triton")
    logits, dist, hit_tokens, active, uniforms = (
        t.to(device) for t in _sample_inputs(2, 50, 7, 2.0, torch.float32, seed=1))
    torch.library.opcheck(daid_sample_op, (logits, dist, hit_tokens, active, uniforms, 2.0, 1.0, 0.3, 0.6, False),
                          **OPCHECK_KWARGS)
    torch.library.opcheck(daid_sample_op, (logits[:2], dist, hit_tokens, active, None, None, 1.0, 0.3, 0.6, True),
                          **OPCHECK_KWARGS)


@needs_ext
def test_opcheck_cpp():
    from arrag_kernels.ops import _cpp

    logits, dist, hits, active, uniforms = _sample_inputs(3, 65, 9, 2.0, torch.float32, seed=3)
    torch.library.opcheck(_cpp._daid_sample_op, (logits, dist, hits, active, uniforms, 2.0, 1.0, 0.1, 0.6, "sum"))


# ---------------------------------------------------------------------------------------------
# top-k / top-p


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.8), (40, 0.95), (1, 0.5), (0, 0.0), (200, 1.0)])
def test_filter_ref_equals_hf_warpers(top_k, top_p):
    scores = torch.randn(5, 97, generator=_gen(top_k)) * 3
    want = scores
    if top_k:
        want = TopKLogitsWarper(top_k)(None, want)
    if top_p < 1:
        want = TopPLogitsWarper(top_p)(None, want)
    assert torch.equal(top_k_top_p_filter_ref(scores, top_k, top_p), want)


def _topk_inputs(B, V, K, cfg, seed, device="cpu"):
    g = _gen(seed)
    logits = torch.randn(2 * B if cfg else B, V, generator=g) * 3
    dist = torch.rand(B, K, generator=g) * 4
    tokens = torch.randint(-1, V, (B, K), generator=g)  # mostly outside the model's top-k
    active = torch.arange(B) % 3 != 1
    uniforms = torch.rand(B, generator=g)
    return [t.to(device) for t in (logits, dist, tokens, active, uniforms)]


def _merged(logits, dist, tokens, active, *, guidance_scale, temperature, lam, tau, dedup, top_k, top_p):
    scores = logits.float()
    if guidance_scale is not None:
        scores = scores[len(dist):] + guidance_scale * (scores[:len(dist)] - scores[len(dist):])
    scores = top_k_top_p_filter_ref(scores / temperature, top_k, top_p)
    return daid_mix_ref(torch.softmax(scores, -1), dist, tokens, active, lam, tau, dedup)


CASES = [  # B, V, K, guidance, top_k, top_p, dedup
    (3, 97, 7, 5.0, 5, 1.0, "nearest"),
    (2, 61, 9, None, 0, 0.7, "sum"),
    (2, 1025, 33, 3.0, 50, 0.9, "nearest"),
    (3, 1031, 5, None, 1, 1.0, "sum"),
    (2, 97, 3, 2.0, 3, 0.0, "nearest"),
]


@pytest.mark.parametrize("greedy", [False, True], ids=["sample", "greedy"])
@pytest.mark.parametrize("case", CASES, ids=[f"b{c[0]}-v{c[1]}-k{c[2]}-w{c[3]}-top{c[4]}-p{c[5]}" for c in CASES])
@pytest.mark.parametrize("backend", KERNELS)
def test_filtered_kernel_matches_reference(backend, case, greedy):
    B, V, K, guidance, top_k, top_p, dedup = case
    logits, dist, tokens, active, uniforms = _topk_inputs(B, V, K, guidance, seed=V + K + top_k,
                                                          device=backend_device(backend))
    uniforms = None if greedy else uniforms
    kw = dict(guidance_scale=guidance, temperature=0.8, lam=0.4, tau=0.6, dedup=dedup, top_k=top_k, top_p=top_p)
    with ak.use_backend(backend):
        out = daid_sample(logits, dist, tokens, active, uniforms, **kw)
    ref = daid_sample_ref(logits, dist, tokens, active, uniforms, **kw)
    p = _merged(logits, dist, tokens, active, **kw)
    assert bool((p[torch.arange(B), out] > 0).all()), "sampled a token the filter removed"
    for b in (out != ref).nonzero().flatten().tolist():  # only a draw within fp32 rounding of a CDF step
        cdf = p[b].cumsum(0)
        gap = (p[b, ref[b]] - p[b, out[b]]).abs() if greedy else (cdf[min(out[b], ref[b])] - uniforms[b] * cdf[-1]).abs()
        assert gap.item() < 1e-5, f"row {b}: {backend} token {out[b].item()} != reference {ref[b].item()}"


@pytest.mark.parametrize("backend", KERNELS)
def test_filtered_uniform_sweep_hits_every_kept_token(backend):
    """Uniforms over one row: the kernel's inverse CDF equals the reference's, so the kept set and
    its masses agree; with lam = 0.5, retrieved tokens outside the top-k are still drawn. (Each
    row is one interpreted program of ~1 s, hence fewer rows for Triton on CPU.)"""
    n, V = 64 if backend == "cpp" or CUDA else 12, 61
    device = backend_device(backend)
    logits, dist, _, _, _ = _topk_inputs(1, V, 6, 3.0, seed=3, device=device)
    tokens = torch.tensor([[3, 3, 17, -1, 40, 17]], device=device)
    kw = dict(guidance_scale=3.0, temperature=1.0, lam=0.5, tau=0.6, dedup="nearest", top_k=6, top_p=0.9)
    logits = torch.cat([logits[:1].expand(n, -1), logits[1:].expand(n, -1)])
    dist, tokens = dist.expand(n, -1).contiguous(), tokens.expand(n, -1).contiguous()
    active = torch.ones(n, dtype=torch.bool, device=device)
    uniforms = (torch.arange(n, dtype=torch.float32, device=device) + 0.5) / n
    with ak.use_backend(backend):
        out = daid_sample(logits, dist, tokens, active, uniforms, **kw)
    assert torch.equal(out, daid_sample_ref(logits, dist, tokens, active, uniforms, **kw))
    model_kept = set(top_k_top_p_filter_ref(logits[n:n + 1] + 3.0 * (logits[:1] - logits[n:n + 1]), 6, 0.9)
                     .isfinite().nonzero()[:, 1].tolist())
    drawn = set(out.tolist())
    assert drawn <= model_kept | {3, 17, 40} and drawn - model_kept and drawn & model_kept


def test_invalid_filters_are_refused():
    logits, dist, tokens, active, uniforms = _topk_inputs(2, 11, 3, None, seed=0)
    kw = dict(guidance_scale=None, lam=0.1, tau=0.6)
    with pytest.raises(ValueError, match=r"top_k must be an int >= 0"):
        daid_sample(logits, dist, tokens, active, uniforms, top_k=-1, **kw)
    with pytest.raises(ValueError, match=r"top_p must be in \[0, 1\]"):
        daid_sample(logits, dist, tokens, active, uniforms, top_p=1.5, **kw)


def test_fusable_cfg_takes_hf_top_k_top_p(tiny_model):
    ids = tiny_prompt_ids(1)
    gen = GenerationConfig(do_sample=True, temperature=0.9, top_k=20, top_p=0.8, guidance_scale=None)
    from transformers.generation import ClassifierFreeGuidanceLogitsProcessor, LogitsProcessorList

    processors = tiny_model._get_logits_processor(
        generation_config=gen, input_ids_seq_length=ids.shape[1], encoder_input_ids=ids, prefix_allowed_tokens_fn=None,
        logits_processor=LogitsProcessorList([ClassifierFreeGuidanceLogitsProcessor(5.0)]), device="cpu")
    assert fusable_cfg(processors) == (5.0, 0.9, 20, pytest.approx(0.8))
    assert fusable_cfg(processors[:1] + processors[3:] + processors[1:3]) is None  # top-p before temperature


def test_static_loop_fuses_top_k_top_p(tiny_model, tiny_images, monkeypatch):
    """The fused op's top-k / top-p equals HF's warpers run as logits processors: same tokens for the same
    uniforms (auto backend: C++ on CPU, Triton on CUDA; the interpreted kernel is too slow for 64 steps)."""
    db = ak.PatchDatabase.build(tiny_images[:6], tiny_model, progress=False)
    ids = tiny_prompt_ids(2, seed=6)
    gen = GenerationConfig(do_sample=True, temperature=0.9, top_k=30, top_p=0.9, guidance_scale=5.0, bos_token_id=1,
                           pad_token_id=0, generation_kwargs={"boi_token_id": 100})

    def run():
        torch.manual_seed(0)
        with ak.patched(tiny_model, db, ak.DAiDConfig(lam=0.3, k=8)):
            return tiny_model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen,
                                       generation_mode="image", loop="static")

    fused = run()
    monkeypatch.setattr(hf_generate, "fusable_cfg", lambda processors: None)  # HF's warpers, then the op unfiltered
    assert torch.equal(fused, run())


@needs_ext
@pytest.mark.parametrize("top_k,top_p", [(7, 1.0), (0, 0.6), (30, 0.85)])
def test_cpp_filtered_probabilities_match_reference(top_k, top_p):
    logits, dist, tokens, active, uniforms = _topk_inputs(5, 97, 13, 4.0, seed=top_k)
    _, probs = _ext._C.daid_sample(
        logits.numpy(), dist.numpy(), tokens.numpy(), active.numpy(), uniforms.numpy(), guidance_scale=4.0,
        temperature=0.7, lam=0.3, tau=0.6, dedup="nearest", return_probs=True, top_k=top_k, top_p=top_p)
    want = _merged(logits, dist, tokens, active, guidance_scale=4.0, temperature=0.7, lam=0.3, tau=0.6,
                   dedup="nearest", top_k=top_k, top_p=top_p)
    assert torch.equal(torch.from_numpy(probs) > 0, want > 0), "kept sets differ"
    assert_close(torch.from_numpy(probs), want, what=f"filtered DAiD probabilities (top_k={top_k}, top_p={top_p})")
    truth = _merged_float64(logits, dist, tokens, active, guidance_scale=4.0, temperature=0.7, lam=0.3, tau=0.6,
                            dedup="nearest", kept=want > 0)
    assert_error_relative(torch.from_numpy(probs), want, truth, torch.float32,
                          what=f"filtered DAiD probabilities (top_k={top_k}, top_p={top_p})")
