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


def _check_finite_cpu(op: str, scores: torch.Tensor, what: str, dist: torch.Tensor, tokens: torch.Tensor) -> None:
    """Reject NaN scores, NaN distances of real hits and all -inf rows, for CPU inputs only: on a GPU
    the check would synchronise with the host every decode step, so device inputs are not checked."""
    if scores.device.type != "cpu":
        return
    bad = torch.isnan(scores).any(dim=1) | (scores == float("inf")).any(dim=1) | (scores == float("-inf")).all(dim=1)
    if bad.any():
        row = int(bad.nonzero()[0, 0])
        raise ValueError(f"{op}: {what} row {row} holds NaN or +inf or is all -inf; expected finite scores "
                         "(-inf only for masked tokens): check the model's dtype and weights and the logits processors")
    bad = torch.isnan(dist) & (tokens >= 0)
    if bad.any():
        row, hit = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{op}: retrieved distance ({row}, {hit}) is NaN; expected finite distances: check the "
                         "database keys and the queries")


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
    _check_finite_cpu("daid_mix", model_probs, "model_probs", dist, tokens)
    return daid_mix_dispatcher(model_probs, dist, tokens, active, lam, tau, dedup)


def _check_daid_sample(logits, dist, tokens, active, uniforms, guidance_scale, temperature, lam, tau, dedup,
                       top_k=0, top_p=1.0):
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"daid_sample: logits must be a float (2B, V) or (B, V) matrix, got {tuple(logits.shape)} {logits.dtype}")
    B = dist.shape[0] if dist.dim() == 2 else -1
    rows = 2 * B if guidance_scale is not None else B
    if logits.shape[0] != rows:
        raise ValueError(
            f"daid_sample: logits has {logits.shape[0]} rows but dist has B = {B}; expected {rows} "
            + ("([cond rows; uncond rows] because guidance_scale is set)" if guidance_scale is not None else "(guidance_scale is None)")
        )
    if uniforms is not None and (uniforms.shape != (B,) or not uniforms.is_floating_point()):
        raise ValueError(f"daid_sample: uniforms must be (B,) = ({B},) floats in [0, 1), got {tuple(uniforms.shape)} {uniforms.dtype}")
    if not temperature > 0.0:
        raise ValueError(f"daid_sample: temperature must be > 0, got {temperature}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"daid_sample: top_k must be an int >= 0 (0: no top-k), got {top_k!r}")
    if not 0.0 <= top_p <= 1.0:
        raise ValueError(f"daid_sample: top_p must be in [0, 1] (1: no top-p), got {top_p!r}")
    _check_daid(logits[:B], dist, tokens, active, lam, tau, dedup)
    _check_finite_cpu("daid_sample", logits, "logits", dist, tokens)


def top_k_top_p_filter_ref(scores: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """HF's ``TopKLogitsWarper`` then ``TopPLogitsWarper`` (``min_tokens_to_keep=1``): removed scores become -inf.

    top-k keeps every score >= the k-th largest (ties kept); top-p keeps the smallest set of highest
    scores whose softmax mass reaches ``top_p`` (a token is removed when the ascending cumulative
    mass up to it is <= 1 - top_p), always at least the top token. 0 / 1 switch them off.
    """
    if 0 < top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        remove = sorted_scores.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        remove[..., -1:] = False
        scores = scores.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return scores


def model_distribution_ref(logits, guidance_scale, temperature: float = 1.0, top_k: int = 0,
                           top_p: float = 1.0) -> torch.Tensor:
    """(B, V) float32 ``p_model`` of :func:`daid_sample`: CFG (when ``guidance_scale`` is not None),
    temperature, top-k / top-p, softmax; the distribution DAiD merges into."""
    scores = logits.float()
    if guidance_scale is not None:
        cond, uncond = scores.chunk(2)
        scores = uncond + guidance_scale * (cond - uncond)
    return torch.softmax(top_k_top_p_filter_ref(scores / temperature, top_k, top_p), dim=-1)


def daid_sample_ref(logits, dist, tokens, active, uniforms, *, guidance_scale, temperature, lam, tau, dedup,
                    top_k=0, top_p=1.0):
    """Pure PyTorch reference of :func:`daid_sample`."""
    probs = daid_mix_ref(model_distribution_ref(logits, guidance_scale, temperature, top_k, top_p),
                         dist, tokens, active, lam, tau, dedup)
    if uniforms is None:
        return probs.argmax(-1)
    cdf = probs.cumsum(-1)
    threshold = uniforms.float().unsqueeze(1) * cdf[:, -1:]
    return torch.searchsorted(cdf, threshold, right=True).squeeze(1).clamp_max(probs.shape[1] - 1)


daid_sample_dispatcher = OpDispatcher("daid_sample")
daid_sample_dispatcher.register("reference")(daid_sample_ref)


def daid_sample(
    logits: torch.Tensor,
    dist: torch.Tensor,
    tokens: torch.Tensor,
    active: torch.Tensor,
    uniforms: torch.Tensor | None,
    *,
    guidance_scale: float | None,
    temperature: float = 1.0,
    lam: float,
    tau: float,
    dedup: str = "nearest",
    top_k: int = 0,
    top_p: float = 1.0,
) -> torch.Tensor:
    """CFG, temperature, top-k / top-p, softmax, DAiD merge and sampling of the next token, fused.

    Math per row b: ``l = l_u + w (l_c - l_u)`` (or the logits as given when ``guidance_scale`` is
    None), ``p_model = softmax(filter(l / T))``, ``p = daid_mix(p_model, ...)``; the sampled token is
    the smallest v with ``cumsum(p)[v] > u_b * sum(p)`` (inverse CDF), or ``argmax(p)`` when
    ``uniforms`` is None. ``filter`` is HF's top-k then top-p (:func:`top_k_top_p_filter_ref`).

    top-k / top-p act on the model distribution *before* the DAiD merge, in HF's order (CFG,
    temperature, top-k, top-p), exactly where HF ``generate`` applies them and where the dynamic
    loop's logits processors run: they cut the model's unreliable tail, while the retrieval
    distribution (already limited to the k retrieved tokens) keeps its mass, so a retrieved token
    outside the model's top-k can still be drawn with probability ``lam * p_ret``. Filtering after
    the merge would instead let the model's top-k veto retrieval.

    Args:
        logits: (2B, V) raw head logits, conditional rows then unconditional rows, or (B, V) when
            ``guidance_scale`` is None.
        dist, tokens, active, lam, tau, dedup: as in :func:`daid_mix`, with (B, K) hits.
        uniforms: (B,) explicit uniform numbers in [0, 1) (deterministic, graph-replay safe), or
            None for greedy decoding.
        guidance_scale: CFG weight w, or None for no CFG.
        temperature: T > 0.
        top_k: keep the ``top_k`` highest model scores (ties kept); 0 keeps all.
        top_p: keep the highest model scores up to softmax mass ``top_p`` (at least one); 1 keeps all.

    Returns:
        (B,) int64 next tokens.
    """
    _check_daid_sample(logits, dist, tokens, active, uniforms, guidance_scale, temperature, lam, tau, dedup,
                       top_k, top_p)
    return daid_sample_dispatcher(
        logits, dist, tokens, active, uniforms,
        guidance_scale=guidance_scale, temperature=temperature, lam=lam, tau=tau, dedup=dedup,
        top_k=top_k, top_p=float(top_p),
    )
