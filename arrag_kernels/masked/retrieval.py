"""All-position retrieval for masked decoding and the per-position DAiD merge.

Each decode step queries every unknown cell of every image with its 8 neighbours
``[UL, U, UR, L, R, LL, Lo, LR]`` (``KeyLayout(neighborhood="full")``): known neighbours contribute
their L2-normalised codebook vector, unknown or outside neighbours zeros (:func:`neighbor_keys`
treats negative ids as unknown). The (B, P) queries of a step go to the database in ONE search of
B * P rows, and the DAiD merge is :func:`arrag_kernels.ops.daid_mix` on the same B * P rows:
``p = (1 - lam) p_model + lam p_ret`` per cell.
"""

from __future__ import annotations

import torch

from ..config import DAiDConfig, KeyLayout
from ..ops import daid_mix, feature_neighbor_keys, neighbor_keys
from ..retrieval import DatabaseError, PatchDatabase
from ..retrieval.database import DatabaseMeta


def masked_positions(tokens: torch.Tensor, count: int) -> torch.Tensor:
    """(B, N) ids (-1 = unknown) with exactly ``count`` unknown cells per row -> (B, count) their flat
    positions, ascending. Read on the device only (no host synchronisation)."""
    order = torch.argsort((tokens >= 0).to(torch.int8), dim=1, stable=True)  # unknown cells first, in order
    return order[:, :count]


class MaskedRetriever:
    """Batched 8-neighbour retrieval of many cells per image.

    Args:
        db: a :class:`arrag_kernels.PatchDatabase` with ``neighborhood="full"`` keys for ``generator``'s grid.
        k: entries retrieved per cell.
        generator: the :class:`arrag_kernels.masked.MaskedGenerator` (its codebook builds the queries).
    """

    def __init__(self, db: PatchDatabase, k: int, generator, device=None):
        if db.meta.layout.neighborhood != "full":
            raise DatabaseError(
                f"masked decoding queries all neighbours of a cell; the database has {db.meta.layout} keys. "
                "Build it with neighborhood='full' (border='zero' is the paper's Show-o setting)"
            )
        db.check_compatible(generator)
        if not 1 <= k <= len(db):
            raise ValueError(f"k = {k}: expected 1 <= k <= {len(db)} (the database size)")
        codebook = generator.codebook()
        device = torch.device(device) if device is not None else codebook.device
        self.db = db.to(device)
        self.k = k
        self.layout = db.meta.layout
        self.grid = tuple(db.meta.grid)
        self.codebook = codebook.to(device=device, dtype=torch.float32)
        self.searches = 0  # database searches issued (one per retrieving step)

    def retrieve(self, tokens: torch.Tensor, positions: torch.Tensor):
        """(B, N) ids (-1 = unknown), (B, P) positions -> dist (B, P, k) float32, token ids (B, P, k)
        (-1 = padding), valid (B, P) bool (False where ``border="skip"`` and a neighbour is outside)."""
        B, P = positions.shape
        queries, valid = neighbor_keys(tokens, self.codebook, positions, self.grid, self.layout)
        dist, ids = self.db.retrieve(queries.reshape(B * P, -1), self.k)  # one search for every cell
        self.searches += 1
        return dist.view(B, P, -1), ids.view(B, P, -1), valid


class MaskedDAiD(MaskedRetriever):
    """DAiD for masked decoders: per-cell ``(1 - lam) p_model + lam p_ret`` (``config.k`` hits per cell)."""

    def __init__(self, db: PatchDatabase, config: DAiDConfig, generator, device=None):
        super().__init__(db, config.k, generator, device)
        self.config = config

    def merge(self, probs: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(B, P, V) model probabilities at ``positions`` -> (B, P, V) float32 merged probabilities.

        Cells whose key is not valid, or whose search returned only padding, keep ``probs``."""
        B, P, V = probs.shape
        dist, ids, valid = self.retrieve(tokens, positions)
        c = self.config
        mixed = daid_mix(probs.reshape(B * P, V), dist.reshape(B * P, -1), ids.reshape(B * P, -1), valid.reshape(-1),
                         c.lam, c.tau, c.dedup)
        return mixed.view(B, P, V)


def token_database(token_grids: torch.Tensor, generator, layout: KeyLayout | None = None) -> PatchDatabase:
    """An exact (``index="flat"``) database from ground-truth token grids, keys from codebook vectors.

    Args:
        token_grids: (M, H, W) token ids of M images (e.g. a VQ-tokenised training set).
        generator: supplies the codebook, grid and fingerprint.
        layout: default ``KeyLayout("full", 1, "zero")`` (Show-o: 8 neighbours, zero padded, every cell).

    Returns:
        a database with one entry per kept cell: key = the neighbours' normalised codebook vectors,
        value = the cell's token. With ``key_source="codebook"`` keys look exactly like decode-time
        queries of a fully known neighbourhood.
    """
    layout = layout or KeyLayout("full", (1,), "zero")
    if token_grids.dim() != 3 or tuple(token_grids.shape[1:]) != tuple(generator.grid):
        raise ValueError(f"token_grids: expected (M, H, W) with (H, W) = {tuple(generator.grid)}, got "
                         f"{tuple(token_grids.shape)}")
    codebook = generator.codebook().float()
    keys, valid = feature_neighbor_keys(codebook[token_grids.long()], layout)
    M = token_grids.shape[0]
    keys = keys[:, valid].reshape(-1, keys.shape[-1]).cpu()
    values = token_grids.reshape(M, -1)[:, valid].reshape(-1).cpu()
    meta = DatabaseMeta(layout=layout, codebook_size=generator.codebook_size, embed_dim=generator.embed_dim,
                        grid=tuple(generator.grid), key_source="codebook", model_fingerprint=generator.fingerprint(),
                        num_images=M)
    return PatchDatabase(keys, values, meta)
