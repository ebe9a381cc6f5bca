"""DAiD step state: the retriever (:mod:`arrag_kernels.retrieval.query`) plus the distribution merge and its gate."""

from __future__ import annotations

import torch

from ..config import DAiDConfig
from ..ops import daid_mix
from ..retrieval.query import Retriever


def gate_open(model_probs: torch.Tensor, gate: tuple[str, float] | None) -> torch.Tensor | None:
    """(B,) bool: the rows of (B, V) ``model_probs`` that ``DAiDConfig.gate`` sends to retrieval (the model
    is not confident there), or None without a gate (every row). Computed on the device, read nowhere."""
    if gate is None:
        return None
    kind, threshold = gate
    p = model_probs.float()
    if kind == "max_prob":
        return p.amax(dim=-1) < threshold
    return -torch.special.xlogy(p, p).sum(dim=-1) > threshold  # entropy in nats; 0 log 0 = 0


class DAiDSampler(Retriever):
    """Merges the retrieval distribution into the model's distribution at retrieval steps.

    A :class:`arrag_kernels.retrieval.query.Retriever` with ``config.k`` neighbours (its ``retrieve``,
    ``retrieves_at``, ``codebook``) and the DAiD settings ``config`` (lam, tau, dedup, gate) that the
    loops' selection reads.
    """

    def __init__(self, db, config: DAiDConfig, tokenizer, device=None):
        super().__init__(db, config.k, tokenizer, device, setting="DAiDConfig.k")
        self.config = config

    def gate_open(self, model_probs: torch.Tensor) -> torch.Tensor | None:
        """:func:`gate_open` of ``config.gate``: (B,) bool rows that merge, None for all."""
        return gate_open(model_probs, self.config.gate)

    def merge(self, model_probs: torch.Tensor, tokens: torch.Tensor, step: int, hits=None) -> torch.Tensor:
        """(B, V) model probabilities -> (B, V) float32 DAiD probabilities for position ``step``.

        ``hits``: this step's :meth:`retrieve` when it already ran (the decode step's search shared
        with FAiD), else None: the merge searches. With a gate, the rows it closes keep
        ``model_probs``; on the CPU the search is skipped when it closes every row. On an accelerator
        the search always runs (the gated rows inactive), since skipping would read the gate on the
        host, a synchronisation per retrieval step.
        """
        c = self.config
        open_rows = self.gate_open(model_probs)
        if open_rows is not None and model_probs.device.type == "cpu" and not bool(open_rows.any()):
            return model_probs.float()
        dist, ids, valid = self.retrieve(tokens, step) if hits is None else hits
        active = valid if open_rows is None else valid & open_rows
        return daid_mix(model_probs, dist, ids, active, c.lam, c.tau, c.dedup)
