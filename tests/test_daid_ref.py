"""DAiD distribution and merge: hand-computed cases and an independent per-row computation."""

import math

import pytest
import torch

from arrag_kernels.ops import daid_mix, retrieval_distribution_ref
from tests.utils import assert_close


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
