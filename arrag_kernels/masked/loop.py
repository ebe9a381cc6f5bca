"""The masked (MaskGIT / Show-o style) decode loop with optional DAiD and FAiD at every unknown cell."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import MaskedDecodeConfig
from .retrieval import masked_positions, sample_cells


@dataclass
class MaskedDecodeStats:
    """What a masked decode did: unknown cells at each step's start and the steps that retrieved."""

    unknown: list = field(default_factory=list)
    retrieval_steps: list = field(default_factory=list)


@torch.no_grad()
def masked_decode(
    generator,
    condition: torch.Tensor,
    config: MaskedDecodeConfig = MaskedDecodeConfig(),
    daid=None,
    faid=None,
    rng: torch.Generator | None = None,
    history: list | None = None,
    stats: MaskedDecodeStats | None = None,
) -> torch.Tensor:
    """Generate (B, H*W) token grids by confidence-based parallel unmasking.

    Step t (see :class:`MaskedDecodeConfig`): the model predicts every cell; at the P unknown cells
    ``p = softmax(logits / temperature)``, merged per cell as ``(1 - lam) p + lam p_ret`` with ``daid``'s
    hits at retrieving steps (one search for the B * P cells, which FAiD shares when DAiD's retriever
    covers its own); a token is drawn at every unknown cell
    by inverse CDF from uniforms of ``rng`` (:func:`sample_cells`, one fused op for all B * P cells);
    the ``P - P_next`` most confident samples
    (``log p(token) + choice_temperature (1 - (t+1)/T) gumbel``) are kept, the rest stay unknown.
    Random numbers are drawn the same way whether or not anything retrieves, so with ``lam = 0`` the
    tokens equal those of the plain loop for the same ``rng`` state.

    Args:
        generator: a :class:`~arrag_kernels.masked.MaskedGenerator`.
        condition: (B, ...) what ``generator.logits`` is conditioned on (class labels for the tiny model).
        config: schedule, retrieval start fraction, temperatures.
        daid: optional :class:`~arrag_kernels.masked.MaskedDAiD`.
        faid: optional :class:`~arrag_kernels.masked.MaskedFAiD`.
        rng: torch.Generator on the condition's device (None: the global one).
        history: if a list, the (B, H*W) grid after every step is appended (-1 = unknown).
        stats: if given, filled with the unknown counts and the retrieving steps.

    Returns:
        (B, H*W) int64 token ids in raster order.
    """
    H, W = generator.grid
    N = H * W
    B = condition.shape[0]
    device = condition.device
    counts = config.masked_counts(N)
    tokens = torch.full((B, N), -1, dtype=torch.long, device=device)
    T = config.steps
    # One search per retrieving step serves DAiD and FAiD when DAiD's retriever covers FAiD's (same database
    # and tokenizer, FAiD's k <= DAiD's): FAiD takes the first K of DAiD's hits.
    shared = daid is not None and faid is not None and daid.covers(faid.retriever)
    for t in range(T):
        P, P_next = counts[t], counts[t + 1]
        retrieve = config.retrieves_at(t)
        positions = masked_positions(tokens, P)
        hits = daid.retrieve(tokens, positions) if daid is not None and retrieve else None
        hook = faid.begin_step(tokens, positions, retrieve, hits if shared else None) if faid is not None else None
        logits = generator.logits(tokens, condition, hook)
        cell_logits = torch.gather(logits, 1, positions.unsqueeze(-1).expand(B, P, logits.shape[-1]))
        hits = None if hits is None else hits.flat()  # (B * P) rows
        u = torch.rand(B, P, generator=rng, device=device)
        g = torch.rand(B, P, generator=rng, device=device)
        sampled, prob = sample_cells(cell_logits.reshape(B * P, -1), u.reshape(-1), config.temperature, hits,
                                     None if daid is None else daid.config)
        sampled, prob = sampled.view(B, P), prob.view(B, P)
        gumbel = -torch.log(-torch.log(g.clamp(1e-20, 1 - 1e-7)))
        confidence = torch.log(prob) + config.choice_temperature * (1.0 - (t + 1) / T) * gumbel
        keep = torch.argsort(confidence, dim=1, descending=True, stable=True)[:, : P - P_next]
        tokens.scatter_(1, positions.gather(1, keep), sampled.gather(1, keep))
        if history is not None:
            history.append(tokens.clone())
        if stats is not None:
            stats.unknown.append(P)
            if retrieve and (daid is not None or faid is not None):
                stats.retrieval_steps.append(t)
    return tokens
