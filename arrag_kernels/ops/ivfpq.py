"""IVF-PQ search (FAISS ``IndexIVFPQ`` semantics, optionally behind an OPQ rotation) on the device.

The index is given as plain tensors (see :func:`arrag_kernels.retrieval.faiss_index.ivfpq_arrays`):

* ``rotation`` (D, D) float32: the OPQ matrix A (``y = x A^T``), or None;
* ``centroids`` (nlist, D) float32: coarse centroids;
* ``codebooks`` (M, ksub, D / M) float32: PQ codebooks of the residuals ``y - c_l``;
* ``term1`` (nlist, M, ksub) float32: ``||b_mj||^2 + 2 <c_l[m], b_mj>`` (FAISS's precomputed table);
* ``codes`` (N, M) uint8, ``ids`` (N,) int64: the inverted lists concatenated in list order;
* ``offsets`` (nlist + 1,) int64: list l holds rows ``offsets[l]:offsets[l+1]``.

Distances are FAISS's asymmetric (ADC) squared L2 with residual encoding and precomputed tables::

    d(q, t) = ||y - c_l||^2 + sum_m term1[l, m, code[t, m]] - 2 <y[m], b_{m, code[t, m]}>

where y is the rotated query and l the list of entry t, for the ``nprobe`` lists nearest to y.
Every step runs on the queries' device with static shapes (no host synchronisation): the rotation,
coarse top-nprobe and the query-side table are torch ops, the list scan is a Triton kernel (or
vectorised torch in the reference), and the final top-k is ``torch.topk`` over a distance buffer
of ``max_candidates`` slots per query (the sum of the nprobe largest list sizes, known from the
index: 4 bytes per slot); the ids of the k selected slots are looked up afterwards. Slots beyond the
candidates found are padded like FAISS: distance ``FLT_MAX``, id -1.
"""

from __future__ import annotations

import torch

from ._dispatch import OpDispatcher

MAX_K = 2048
MAX_NPROBE = 2048
FLT_MAX = torch.finfo(torch.float32).max


def probe(queries, rotation, centroids, codebooks, nprobe):
    """Rotation, coarse top-nprobe and the query-side table.

    Returns (lists (Q, nprobe) int64, dis0 (Q, nprobe) float32, term2 (Q, M, ksub) float32).
    """
    y = queries.float()
    if rotation is not None:
        y = y @ rotation.T
    coarse = (y * y).sum(1, keepdim=True) + (centroids * centroids).sum(1) - 2.0 * (y @ centroids.T)
    dis0, lists = torch.topk(coarse, nprobe, dim=1, largest=False, sorted=True)
    m, _, dsub = codebooks.shape
    term2 = -2.0 * torch.einsum("qmd,mjd->qmj", y.view(-1, m, dsub), codebooks)
    return lists, dis0, term2


def slots(lists, offsets):
    """Start of each probed list inside the per-query candidate buffer: (Q, nprobe) int64, exclusive cumsum."""
    sizes = offsets[lists + 1] - offsets[lists]
    return torch.cumsum(sizes, 1) - sizes


def select(cand_d, lists, slot0, offsets, ids, k):
    """Top-k of the distance buffer (Q, C) -> (Q, k) distances and entry ids, padded with (FLT_MAX, -1)."""
    kk = min(k, cand_d.shape[1])
    dist, slot = torch.topk(cand_d, kk, dim=1, largest=False, sorted=True)
    sizes = offsets[lists + 1] - offsets[lists]
    ends = slot0 + sizes
    j = torch.searchsorted(ends, slot, right=True).clamp_max_(lists.shape[1] - 1)  # probe of each slot
    pos = torch.gather(offsets[lists], 1, j) + slot - torch.gather(slot0, 1, j)
    valid = slot < ends[:, -1:]
    ids = torch.where(valid, ids[torch.where(valid, pos, torch.zeros_like(pos))], torch.full_like(pos, -1))
    if kk < k:
        pad = k - kk
        dist = torch.cat([dist, dist.new_full((dist.shape[0], pad), FLT_MAX)], 1)
        ids = torch.cat([ids, ids.new_full((ids.shape[0], pad), -1)], 1)
    return dist, ids


def ivfpq_search_ref(queries, rotation, centroids, codebooks, term1, codes, ids, offsets, nprobe, k, max_candidates):
    """Pure PyTorch reference of :func:`ivfpq_search` (vectorised scan over a (Q, C, M) gather)."""
    lists, dis0, term2 = probe(queries, rotation, centroids, codebooks, nprobe)
    slot0 = slots(lists, offsets)
    q = queries.shape[0]
    s = torch.arange(max_candidates, device=queries.device).expand(q, -1).contiguous()
    sizes = offsets[lists + 1] - offsets[lists]
    j = torch.searchsorted(slot0 + sizes, s, right=True).clamp_max_(nprobe - 1)  # probe of each slot
    pos = torch.gather(offsets[lists], 1, j) + s - torch.gather(slot0, 1, j)
    valid = s < (slot0 + sizes)[:, -1:]
    c = codes[torch.where(valid, pos, torch.zeros_like(pos))].long()  # (Q, C, M)
    lst = torch.gather(lists, 1, j)
    m_idx = torch.arange(codes.shape[1], device=queries.device)
    t1 = term1[lst.unsqueeze(-1), m_idx, c].sum(-1)
    t2 = term2[torch.arange(q, device=queries.device)[:, None, None], m_idx, c].sum(-1)
    cand_d = torch.where(valid, torch.gather(dis0, 1, j) + t1 + t2, torch.full_like(t1, FLT_MAX))
    return select(cand_d, lists, slot0, offsets, ids, k)


ivfpq_dispatcher = OpDispatcher("ivfpq_search")
ivfpq_dispatcher.register("reference")(ivfpq_search_ref)


def ivfpq_search(
    queries: torch.Tensor,
    rotation: torch.Tensor | None,
    centroids: torch.Tensor,
    codebooks: torch.Tensor,
    term1: torch.Tensor,
    codes: torch.Tensor,
    ids: torch.Tensor,
    offsets: torch.Tensor,
    nprobe: int,
    k: int,
    max_candidates: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """IVF-PQ k-NN search, FAISS semantics (see the module docstring for the array layout).

    Args:
        queries: (Q, D) float, on the same device as the index tensors.
        nprobe: lists scanned per query, 1 <= nprobe <= min(2048, nlist).
        k: neighbours per query, 1 <= k <= 2048.
        max_candidates: candidate slots per query; must be >= the sum of the nprobe largest list
            sizes (computed once per nprobe from the index, on the host).

    Returns:
        dist: (Q, k) float32 ADC squared L2 distances, ascending (FLT_MAX in padded slots).
        ids: (Q, k) int64 entry ids (-1 in padded slots).
    """
    nlist, d = centroids.shape
    m, ksub, dsub = codebooks.shape
    if queries.dim() != 2 or queries.shape[1] != d:
        raise ValueError(f"ivfpq_search: queries must be (Q, {d}), got {tuple(queries.shape)}")
    if not queries.is_floating_point():
        raise TypeError(f"ivfpq_search: queries must be floating point, got {queries.dtype}")
    for name, t in (("centroids", centroids), ("codebooks", codebooks), ("term1", term1), ("codes", codes),
                    ("ids", ids), ("offsets", offsets)):
        if t.device != queries.device:
            raise ValueError(f"ivfpq_search: queries on {queries.device} but {name} on {t.device}; move the index")
    if m * dsub != d or term1.shape != (nlist, m, ksub) or codes.dim() != 2 or codes.shape[1] != m:
        raise ValueError(
            f"ivfpq_search: inconsistent index arrays: D={d}, codebooks {tuple(codebooks.shape)}, "
            f"term1 {tuple(term1.shape)} (expected {(nlist, m, ksub)}), codes {tuple(codes.shape)} (expected (N, {m}))"
        )
    if codes.dtype != torch.uint8 or ids.dtype != torch.int64 or offsets.dtype != torch.int64:
        raise TypeError(f"ivfpq_search: codes/ids/offsets must be uint8/int64/int64, got {codes.dtype}/{ids.dtype}/{offsets.dtype}")
    if not 1 <= nprobe <= min(MAX_NPROBE, nlist):
        raise ValueError(f"ivfpq_search: nprobe must be in [1, min({MAX_NPROBE}, nlist = {nlist})], got {nprobe}")
    if not 1 <= k <= MAX_K:
        raise ValueError(f"ivfpq_search: k must be in [1, {MAX_K}], got {k}")
    if max_candidates < 1:
        raise ValueError(f"ivfpq_search: max_candidates must be >= 1, got {max_candidates}")
    return ivfpq_dispatcher(queries, rotation, centroids, codebooks, term1, codes, ids, offsets, nprobe, k, max_candidates)
