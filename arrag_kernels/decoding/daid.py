"""DAiD step state: the retriever (:mod:`arrag_kernels.retrieval.query`) plus the distribution merge."""

from __future__ import annotations

import torch

from ..config import DAiDConfig
from ..ops import daid_mix
from ..retrieval.query import Retriever


class DAiDSampler(Retriever):
    """Merges the retrieval distribution into the model's distribution at retrieval steps.

    A :class:`arrag_kernels.retrieval.query.Retriever` with ``config.k`` neighbours (its ``retrieve``,
    ``retrieves_at``, ``codebook``) and the DAiD settings ``config`` (lam, tau, dedup) that the loops'
    selection reads.
    """

    def __init__(self, db, config: DAiDConfig, tokenizer, device=None):
        super().__init__(db, config.k, tokenizer, device, setting="DAiDConfig.k")
        self.config = config

    def merge(self, model_probs: torch.Tensor, tokens: torch.Tensor, step: int) -> torch.Tensor:
        """(B, V) model probabilities -> (B, V) DAiD probabilities for position ``step``."""
        c = self.config
        return daid_mix(model_probs, *self.retrieve(tokens, step), c.lam, c.tau, c.dedup)
