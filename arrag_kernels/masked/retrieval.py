"""All-position retrieval for masked decoding and the per-position DAiD merge.

Each decode step queries every unknown cell of every image with its 8 neighbours
``[UL, U, UR, L, R, LL, Lo, LR]`` (``KeyLayout(neighborhood="full")``): known neighbours contribute
their L2-normalised codebook vector, unknown or outside neighbours zeros. The (B, P) queries of a
step go to the database in ONE search of B * P rows (:class:`MaskedRetriever`, the library's
:class:`arrag_kernels.retrieval.query.Retriever`). The per-cell DAiD merge
``p = (1 - lam) softmax(l / T) + lam p_ret`` and the draw from it are
:func:`arrag_kernels.ops.daid_sample` (one fused op: reference, Triton, C++) on the same B * P rows;
:func:`sample_cells` adds the merged probability of each drawn token, which MaskGIT's
confidence needs, from O(V + K log K) work per cell.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import DAiDConfig, KeyLayout
from ..ops import daid_mix, daid_sample, feature_neighbor_keys
from ..retrieval import DatabaseError, DatabaseMeta, PatchDatabase
from ..retrieval.query import Hits, Retriever


def masked_positions(tokens: torch.Tensor, count: int) -> torch.Tensor:
    """(B, N) ids (-1 = unknown) with exactly ``count`` unknown cells per row -> (B, count) their flat
    positions, ascending (a row with fewer unknown cells: all of them, then its first known cells). Read
    on the device only (no host synchronisation)."""
    order = torch.argsort((tokens >= 0).to(torch.int8), dim=1, stable=True)  # unknown cells first, in order
    return order[:, :count]


class MaskedRetriever(Retriever):
    """The :class:`arrag_kernels.retrieval.query.Retriever` of masked decoding: many cells per image,
    ``retrieve(tokens, positions)`` with (B, P) ``positions`` -> ``Hits`` of shape (B, P), one search
    for all B * P cells. Refuses databases whose keys are not the 8-neighbour ``"full"`` layout.

    Args:
        db: a :class:`arrag_kernels.PatchDatabase` with ``neighborhood="full"`` keys for ``generator``'s grid.
        k: entries retrieved per cell.
        generator: the :class:`arrag_kernels.masked.MaskedGenerator` (its codebook builds the queries).
        device: where retrieval runs (default: the codebook's device).
        setting: the setting ``k`` came from, named in errors.
    """

    def __init__(self, db: PatchDatabase, k: int, generator, device=None, setting: str = "k"):
        if db.meta.layout.neighborhood != "full":
            raise DatabaseError(
                f"masked decoding queries all neighbours of a cell; the database has {db.meta.layout} keys. "
                "Build it with neighborhood='full' (border='zero' is the paper's Show-o setting)"
            )
        super().__init__(db, k, generator, device, setting)

    def retrieve(self, tokens: torch.Tensor, positions=None) -> Hits:
        """:meth:`Retriever.retrieve`, with ``valid`` False also at cells that have no known cell in their key
        window: their query is all zeros and says nothing about them, so they are left to the model (no
        DAiD merge, zero FAiD features)."""
        hits = super().retrieve(tokens, positions)
        B, N = tokens.shape
        r = self.layout.radius
        known = (tokens >= 0).float().view(B, 1, *self.grid)
        known_near = F.max_pool2d(known, 2 * r + 1, stride=1, padding=r).view(B, N) > 0
        if positions is not None:
            known_near = known_near.gather(1, positions.reshape(B, -1))
        return hits._replace(valid=hits.valid & known_near.reshape(hits.valid.shape))


class MaskedDAiD(MaskedRetriever):
    """DAiD for masked decoders: ``config.k`` hits per unknown cell, merged per cell by :func:`sample_cells`."""

    def __init__(self, db: PatchDatabase, config: DAiDConfig, generator, device=None):
        if config.gate is not None:
            raise ValueError(f"DAiDConfig.gate={config.gate!r} is not supported by masked decoding (it has its own "
                             "retrieval schedule, MaskedDecodeConfig.start_fraction); use gate=None")
        super().__init__(db, config.k, generator, device, setting="DAiDConfig.k")
        self.config = config

    def merge_logits(self, logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """DAiD for a sampler the library does not own, one that draws each unknown cell from
        ``softmax(logits)`` (a pipeline's scheduler step): (B, N, V) logits of every cell of the grids
        ``tokens`` (B, N), -1 at unknown cells -> (B, N, V) logits whose softmax is the merged
        ``p = (1 - lam) softmax(l) + lam p_ret`` (:func:`arrag_kernels.ops.daid_mix`) at the unknown cells
        whose hits are valid (:meth:`MaskedRetriever.retrieve`: a known cell in the key window) and not all
        padding; the logits as given everywhere else. A merged cell gets ``l + log p - log_softmax(l)``, with the correction 0 wherever ``p`` equals
        ``softmax(l)``: so with ``lam = 0`` the logits come back exactly and the sampler draws exactly as
        unpatched. One search for the unknown cells of all grids (rows may differ in how many they have)."""
        B, N, V = logits.shape
        unknown = tokens < 0
        count = int(unknown.sum(1).max())
        if count == 0:
            return logits
        positions = masked_positions(tokens, count)  # (B, P): each row's unknown cells first
        at = positions.unsqueeze(-1).expand(B, count, V)
        cell_logits = logits.gather(1, at).float().reshape(B * count, V)
        dist, ids, valid = self.retrieve(tokens, positions).flat()
        active = valid & unknown.gather(1, positions).reshape(-1)  # rows with fewer unknown cells end in known ones
        c = self.config
        probs = torch.softmax(cell_logits, dim=-1)
        merged = daid_mix(probs, dist, ids, active, c.lam, c.tau, c.dedup)
        correction = torch.where(merged == probs, 0.0, merged.log() - torch.log_softmax(cell_logits, dim=-1))
        use = (active & (ids >= 0).any(1)).unsqueeze(1)  # the rows daid_mix merges
        cells = torch.where(use, cell_logits + correction, cell_logits).to(logits.dtype).view(B, count, V)
        return logits.scatter(1, at, cells)


def merged_token_probability(logits, dist, ids, active, token, temperature: float, lam: float, tau: float,
                             dedup: str) -> torch.Tensor:
    """(R,) probability of ``token`` under the distribution :func:`daid_sample` draws from (no CFG).

    ``p(v) = (1 - lam) softmax(l / T)(v) + lam p_ret(v)`` on rows that are ``active`` with a valid hit,
    ``softmax(l / T)(v)`` elsewhere; ``p_ret`` as in :func:`arrag_kernels.ops.retrieval_distribution_ref`
    but evaluated at one token per row: the normaliser of ``dedup="nearest"`` runs over distinct tokens
    (hits sorted by token, nearest first), so nothing of size (R, V) is built besides the logits.
    """
    scaled = logits.float() / temperature
    p_model = torch.exp(scaled.gather(1, token[:, None])[:, 0] - torch.logsumexp(scaled, dim=1))
    valid = ids >= 0
    s = torch.where(valid, -dist.float() / tau, float("-inf"))
    hit = valid & (ids == token[:, None])
    if dedup == "nearest":
        nearest_first = torch.argsort(s, dim=1, descending=True, stable=True)
        by_token = torch.argsort(ids.gather(1, nearest_first), dim=1, stable=True)
        order = nearest_first.gather(1, by_token)  # grouped by token, each group nearest first
        ids_o, s_o = ids.gather(1, order), s.gather(1, order)
        first = torch.ones_like(valid)
        first[:, 1:] = ids_o[:, 1:] != ids_o[:, :-1]
        norm = torch.logsumexp(torch.where(first, s_o, float("-inf")), dim=1)
        p_ret = torch.exp(torch.where(hit, s, float("-inf")).amax(dim=1) - norm)
    else:
        p_ret = (torch.softmax(s, dim=1) * hit).sum(dim=1)
    use = active & valid.any(dim=1)
    return torch.where(use, (1.0 - lam) * p_model + lam * torch.nan_to_num(p_ret, nan=0.0), p_model)


def sample_cells(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float, hits=None,
                 config: DAiDConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per cell, with the per-cell DAiD merge when ``hits`` are given.

    Args:
        logits: (R, V) logits of R cells (R = B * P).
        uniforms: (R,) in [0, 1): the draw is the inverse CDF of the (merged) distribution.
        temperature: T > 0.
        hits: (dist (R, K), token ids (R, K), valid (R,)): the hits of :meth:`MaskedRetriever.retrieve`
            as rows (``hits.flat()``), or None
            (plain sampling: the same op with no active row, so ``lam = 0`` reproduces it exactly).
        config: the :class:`DAiDConfig` (lam, tau, dedup) when ``hits`` are given.

    Returns:
        tokens (R,) int64 and their probabilities (R,) float32 under the distribution drawn from.
    """
    R = logits.shape[0]
    if hits is None:
        dist = torch.zeros(R, 1, device=logits.device)
        ids = torch.full((R, 1), -1, dtype=torch.long, device=logits.device)
        active = torch.zeros(R, dtype=torch.bool, device=logits.device)
        lam, tau, dedup = 0.0, 1.0, "nearest"
    else:
        dist, ids, active = hits
        lam, tau, dedup = config.lam, config.tau, config.dedup
    tokens = daid_sample(logits, dist, ids, active, uniforms, guidance_scale=None, temperature=temperature, lam=lam,
                         tau=tau, dedup=dedup)
    return tokens, merged_token_probability(logits, dist, ids, active, tokens, temperature, lam, tau, dedup)


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
