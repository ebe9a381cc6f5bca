"""Retrieval accuracy (AR-RAG paper, Fig. 6): how close the k-th retrieved token is to the ground truth.

For every image and every retrieval position j, the query is built from the ground-truth
neighbours of j (:meth:`arrag_kernels.retrieval.query.Retriever.retrieve`, the decode-time query),
the ``k`` nearest database entries give tokens r_1..r_k, and the curve is the mean over positions of
``|| c(t_j) - c(r_i) ||_2`` for each rank i, with c the L2-normalised codebook rows. The baseline
is the same distance to a uniformly drawn random code.
"""

from __future__ import annotations

import torch

from ..models import get_adapter
from ..retrieval.query import Retriever


@torch.no_grad()
def retrieval_accuracy(model, db, tokens: torch.Tensor, k: int = 16, seed: int = 0, batch_size: int = 256) -> dict:
    """Fig. 6 curve for (B, N) ground-truth ``tokens`` of images under ``model`` (or its adapter) and ``db``.

    Returns ``{"k": [1..k], "l2": [mean distance at rank i], "l2_std": [...], "random_l2": float,
    "random_l2_std": float, "positions": number of (image, position) pairs}``.
    """
    adapter = model if hasattr(model, "codebook") and hasattr(model, "grid") else get_adapter(model)
    N = adapter.grid[0] * adapter.grid[1]
    if tokens.dim() != 2 or tokens.shape[1] != N or tokens.shape[0] == 0:
        raise ValueError(f"tokens: expected (B, {N}) ground-truth image tokens with B >= 1, got {tuple(tokens.shape)}")
    retriever = Retriever(db, k, adapter, device="cpu")  # checks model/database compatibility
    codebook = retriever.codebook
    g = torch.Generator().manual_seed(seed)
    dists, rand = [], []
    at = torch.tensor(retriever.retrieves_at)
    for start in range(0, tokens.shape[0], batch_size):
        t = tokens[start : start + batch_size].cpu().long()
        _, ret, valid = retriever.retrieve(t)  # every position in one search: (b, N, k), (b, N)
        # position-major over the retrieval positions: (P, b, ...)
        ret, valid, truth = ret.transpose(0, 1)[at], valid.T[at], t.T[at]
        gt = codebook[truth]  # (P, b, d)
        d = (codebook[ret.clamp_min(0)] - gt.unsqueeze(2)).norm(dim=-1)  # (P, b, k)
        dists.append(torch.where(ret >= 0, d, float("nan"))[valid])
        r = torch.randint(0, codebook.shape[0], truth.shape, generator=g)
        rand.append((codebook[r] - gt).norm(dim=-1)[valid])
    dists, rand = torch.cat(dists), torch.cat(rand)
    if dists.shape[0] == 0:
        raise ValueError("no retrieval position in the grid under the database's key layout")
    return {
        "k": list(range(1, k + 1)),
        "l2": dists.nanmean(0).tolist(),
        "l2_std": [float(c[~c.isnan()].std()) if (~c.isnan()).sum() > 1 else 0.0 for c in dists.T],
        "random_l2": float(rand.mean()),
        "random_l2_std": float(rand.std()) if rand.numel() > 1 else 0.0,
        "positions": int(dists.shape[0]),
    }
