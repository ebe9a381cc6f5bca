"""DAiD step state: per-step neighbourhood query, retrieval and distribution merge."""

from __future__ import annotations

import torch

from ..config import DAiDConfig
from ..ops import daid_mix, neighbor_keys, retrieval_positions


class DAiDSampler:
    """Merges the retrieval distribution into the model's distribution at retrieval steps.

    One query per image (conditional and unconditional CFG rows share the generated tokens).
    Which steps retrieve is fixed by the database's key layout and known on the host before the
    loop starts, so the decode loop never reads device values to decide.
    """

    def __init__(self, db, config: DAiDConfig, tokenizer, device=None):
        db.check_compatible(tokenizer)
        if config.k > len(db):
            raise ValueError(f"DAiDConfig.k = {config.k} is larger than the database ({len(db)} entries)")
        device = torch.device(device) if device is not None else tokenizer.device
        self.config = config
        self.db = db.to(device)
        self.layout = db.meta.layout
        self.grid = tuple(db.meta.grid)
        self.codebook = tokenizer.codebook().to(device=device, dtype=torch.float32)
        self.retrieves_at = retrieval_positions(self.grid, self.layout).tolist()

    def retrieve(self, tokens: torch.Tensor, step) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Nearest entries for position ``step`` of each image: (dist (B, k), token ids (B, k), valid (B,)).

        ``step`` is an int, or a (1,) or (B,) device tensor of positions (read on the device only, so the
        call can be captured in a CUDA graph).
        """
        if isinstance(step, torch.Tensor):
            positions = step.repeat(tokens.shape[0]) if step.numel() == 1 else step
        else:
            positions = torch.full((tokens.shape[0],), step, dtype=torch.long, device=tokens.device)
        queries, valid = neighbor_keys(tokens, self.codebook, positions, self.grid, self.layout)
        dist, ret_tokens = self.db.retrieve(queries, self.config.k)
        return dist, ret_tokens, valid

    def merge(self, model_probs: torch.Tensor, tokens: torch.Tensor, step: int) -> torch.Tensor:
        """(B, V) model probabilities -> (B, V) DAiD probabilities for position ``step``."""
        dist, ret_tokens, valid = self.retrieve(tokens, step)
        c = self.config
        return daid_mix(model_probs, dist, ret_tokens, valid, c.lam, c.tau, c.dedup)
