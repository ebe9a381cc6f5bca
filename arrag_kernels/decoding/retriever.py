"""Neighbourhood queries and database search: the one retrieval object of DAiD, FAiD and FAiD training."""

from __future__ import annotations

import torch

from ..ops import neighbor_keys, retrieval_positions


class Retriever:
    """The ``k`` nearest database entries of the neighbourhood of a grid position, for any batch.

    One query per image (conditional and unconditional CFG rows share the generated tokens). Which
    positions have a key is fixed by the database's key layout and known on the host before a loop
    starts (``retrieves_at``), so no loop reads device values to decide.

    Args:
        db: :class:`arrag_kernels.PatchDatabase`, checked against ``tokenizer`` (codebook, grid).
        k: neighbours per query.
        tokenizer: the model's :class:`arrag_kernels.models.ImageTokenizer` (codebook, default device).
        device: where retrieval runs (default: the tokenizer's device).
        what: the setting ``k`` came from, named in errors (e.g. "DAiDConfig.k").
    """

    def __init__(self, db, k: int, tokenizer, device=None, what: str = "k"):
        if k > len(db):
            raise ValueError(f"{what} = {k} is larger than the database ({len(db)} entries); use k <= {len(db)}")
        db.check_compatible(tokenizer)
        device = torch.device(device) if device is not None else tokenizer.device
        self.k = int(k)
        self.db = db.to(device)
        self.layout = db.meta.layout
        self.grid = tuple(db.meta.grid)
        self.codebook = tokenizer.codebook().to(device=device, dtype=torch.float32)
        self.retrieves_at = retrieval_positions(self.grid, self.layout).tolist()

    def retrieve(self, tokens: torch.Tensor, step) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Nearest entries for position ``step`` of each image: (dist (B, k), token ids (B, k), valid (B,)).

        ``tokens`` (B, N) holds the grid generated so far (-1 elsewhere). ``step`` is an int, or a (1,)
        or (B,) device tensor of positions (read on the device only, so the call can be captured in a
        CUDA graph). ``valid`` is False where the position has no key; ids -1 are padding.
        """
        B = tokens.shape[0]
        if isinstance(step, torch.Tensor):
            positions = step.repeat(B) if step.numel() == 1 else step
        else:
            positions = torch.full((B,), step, dtype=torch.long, device=tokens.device)
        queries, valid = neighbor_keys(tokens, self.codebook, positions, self.grid, self.layout)
        dist, ids = self.db.retrieve(queries, self.k)
        return dist, ids, valid

    def retrieve_all(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N) complete grids (teacher forcing) -> ids (B, N, k) (-1: padding) and valid (B, N) of every
        position at once. Works on any database, index-only ones included."""
        B, N = tokens.shape
        positions = torch.arange(N, device=tokens.device).expand(B, N)
        queries, valid = neighbor_keys(tokens, self.codebook, positions, self.grid, self.layout)
        _, ids = self.db.retrieve(queries.reshape(B * N, -1), self.k)
        return ids.view(B, N, -1), valid
