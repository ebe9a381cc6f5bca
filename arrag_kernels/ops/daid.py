"""DAiD: turn retrieved (distance, token) pairs into a distribution and merge it with the model's.

Official AR-RAG semantics (``dedup="nearest"``): every distinct retrieved token keeps its smallest
distance, ``p_ret = softmax(-d / tau)`` over those tokens (0 for all others). The paper's kNN-LM
style variant (``dedup="sum"``) sums the per-hit softmax weights of duplicate tokens. The merged
distribution is ``(1 - lam) * p_model + lam * p_ret`` on rows that retrieve, ``p_model`` elsewhere.
"""

from __future__ import annotations

import torch

from ..config import DEDUP_MODES
from ._dispatch import OpDispatcher


def _check_daid(model_probs, dist, tokens, active, lam, tau, dedup):
    if model_probs.dim() != 2:
        raise ValueError(f"daid_mix: model_probs must be (B, V), got {tuple(model_probs.shape)}")
    B = model_probs.shape[0]
    if dist.shape != tokens.shape or dist.dim() != 2 or dist.shape[0] != B:
        raise ValueError(
            f"daid_mix: dist and tokens must both be (B, K) with B = {B}, got {tuple(dist.shape)} and {tuple(tokens.shape)}"
        )
    if active.shape != (B,):
        raise ValueError(f"daid_mix: active must be (B,) bool, got {tuple(active.shape)}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"daid_mix: lam must be in [0, 1], got {lam}")
    if not tau > 0.0:
        raise ValueError(f"daid_mix: tau must be > 0, got {tau}")
    if dedup not in DEDUP_MODES:
        raise ValueError(f"daid_mix: dedup must be one of {DEDUP_MODES}, got {dedup!r}")


def retrieval_distribution_ref(dist, tokens, vocab_size: int, tau: float, dedup: str) -> torch.Tensor:
    """(B, V) float32 retrieval distribution p_ret; negative token ids are ignored (padding).

    Rows without any valid token are all zeros.
    """
    B = dist.shape[0]
    valid = tokens >= 0
    ids = tokens.long().clamp(min=0)
    logits = torch.where(valid, -dist.float() / tau, float("-inf"))
    if dedup == "nearest":
        # max of -d/tau per token == its nearest hit; tokens never retrieved stay at -inf.
        per_token = torch.full((B, vocab_size), float("-inf"), device=dist.device)
        per_token.scatter_reduce_(1, ids, logits, reduce="amax")
        p = torch.softmax(per_token, dim=1)
    else:
        w = torch.softmax(logits, dim=1)
        p = torch.zeros(B, vocab_size, device=dist.device).scatter_add_(1, ids, w)
    return torch.nan_to_num(p, nan=0.0)  # rows with no valid hit: softmax of all -inf


def daid_mix_ref(model_probs, dist, tokens, active, lam, tau, dedup):
    """Pure PyTorch reference of :func:`daid_mix`."""
    p_ret = retrieval_distribution_ref(dist, tokens, model_probs.shape[1], tau, dedup)
    mixed = (1.0 - lam) * model_probs.float() + lam * p_ret
    use = active & (tokens >= 0).any(dim=1)
    return torch.where(use.unsqueeze(1), mixed, model_probs.float())


daid_mix_dispatcher = OpDispatcher("daid_mix")
daid_mix_dispatcher.register("reference")(daid_mix_ref)


def daid_mix(
    model_probs: torch.Tensor,
    dist: torch.Tensor,
    tokens: torch.Tensor,
    active: torch.Tensor,
    lam: float,
    tau: float,
    dedup: str = "nearest",
) -> torch.Tensor:
    """Merge the model distribution with the retrieval distribution.

    Args:
        model_probs: (B, V) model probabilities (after CFG, temperature and logits processing).
        dist: (B, K) squared L2 distances of the retrieved entries.
        tokens: (B, K) token ids of the retrieved entries; negative ids are padding and ignored.
        active: (B,) bool, rows at a retrieval position. Inactive rows, and rows with no valid
            retrieved token, return ``model_probs`` unchanged.
        lam: weight of the retrieval distribution, in [0, 1].
        tau: softmax temperature on distances, > 0.
        dedup: "nearest" (official) or "sum" (paper formula).

    Returns:
        (B, V) float32 probabilities.
    """
    _check_daid(model_probs, dist, tokens, active, lam, tau, dedup)
    return daid_mix_dispatcher(model_probs, dist, tokens, active, lam, tau, dedup)
