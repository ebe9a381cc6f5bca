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
ADC distances are approximations and can be negative.

The search has two stages, each usable alone (a sharded search probes once and scans per device):

* :func:`ivfpq_probe`: rotation, coarse top-nprobe and the query-side table ``term2`` (torch ops);
* :func:`ivfpq_scan`: the probed lists' entries form one row of candidate *slots* per query (the
  probed lists one after the other, ascending list id, at most ``max_candidates`` slots: the sum of
  the nprobe largest list sizes, known from the index); the result is the k smallest candidates by
  (distance, slot). Because the probed lists come in ascending list order, ties between equal
  distances go to the entry stored first in the concatenated lists.

A candidate is one int64, ``key(distance) << 32 | slot``, where ``key`` maps float32 bits to int32
preserving order (negative floats included): comparing packed integers compares (distance, slot).
Slots beyond the candidates found are padded like FAISS: distance ``FLT_MAX``, id -1. Every step
runs on the queries' device with static shapes (no host synchronisation).
"""

from __future__ import annotations

import torch

from ._dispatch import OpDispatcher
from .knn import check_values, with_values

MAX_K = 2048
MAX_NPROBE = 2048
MAX_CANDIDATES = 1 << 32  # slots are packed into the low 32 bits of a candidate
FLT_MAX = torch.finfo(torch.float32).max
EMPTY = 0x7FFFFFFFFFFFFFFF  # packed value of a missing candidate: sorts after every real one


def probe(queries, rotation, centroids, codebooks, nprobe):
    """Rotation, coarse top-nprobe and the query-side table (no input checks: see :func:`ivfpq_probe`).

    Returns (lists (Q, nprobe) int64 ascending, dis0 (Q, nprobe) float32, term2 (Q, M, ksub) float32).
    """
    y = queries.float()
    if rotation is not None:
        y = y @ rotation.T
    coarse = (y * y).sum(1, keepdim=True) + (centroids * centroids).sum(1) - 2.0 * (y @ centroids.T)
    dis0, lists = torch.topk(coarse, nprobe, dim=1, largest=False, sorted=False)
    # Ascending list ids make the slot order the entries' storage order: the tie rule of the scan.
    lists, order = lists.sort(1)
    m, _, dsub = codebooks.shape
    term2 = -2.0 * torch.einsum("qmd,mjd->qmj", y.view(-1, m, dsub), codebooks)
    return lists, torch.gather(dis0, 1, order), term2


def slots(lists, offsets):
    """(first entry, first slot, end slot) of each probed list, each (Q, nprobe) int64."""
    start = offsets[lists]
    sizes = offsets[lists + 1] - start
    ends = torch.cumsum(sizes, 1)
    return start, ends - sizes, ends


def pack(dist: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """float32 distances and slots in [0, 2^32) -> int64 candidates ordered by (distance, slot)."""
    bits = dist.view(torch.int32)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: flip the magnitude bits
    return (key.long() << 32) | slot


def unpack_dist(packed: torch.Tensor) -> torch.Tensor:
    """The float32 distances of packed candidates (the inverse of :func:`pack`'s key)."""
    key = (packed >> 32).int()
    return (key ^ ((key >> 31) & 0x7FFFFFFF)).view(torch.float32)


def finish(packed, lists, offsets, ids, k, values=None):
    """The k first of ascending packed candidates (Q, >= k) -> (Q, k) distances and entry ids, padded
    (and their ``values``, -1 in padding, when given)."""
    packed = packed[:, :k]
    empty = packed == EMPTY
    dist = torch.where(empty, FLT_MAX, unpack_dist(packed))
    slot = packed & 0xFFFFFFFF
    start, slot0, ends = slots(lists, offsets)
    j = torch.searchsorted(ends, slot, right=True).clamp_max_(lists.shape[1] - 1)  # probe of each slot
    pos = torch.gather(start - slot0, 1, j) + slot
    return with_values(dist, torch.where(empty, -1, ids[torch.where(empty, 0, pos)]), values)


def ivfpq_scan_ref(lists, dis0, term2, term1, codes, ids, offsets, k, max_candidates, values=None):
    """Pure PyTorch reference of :func:`ivfpq_scan` (vectorised over a (Q, C, M) gather, then ``torch.topk``)."""
    q, nprobe = lists.shape
    start, slot0, ends = slots(lists, offsets)
    s = torch.arange(max_candidates, device=lists.device).expand(q, -1).contiguous()
    j = torch.searchsorted(ends, s, right=True).clamp_max_(nprobe - 1)  # probe of each slot
    pos = torch.gather(start - slot0, 1, j) + s
    valid = s < ends[:, -1:]
    c = codes[torch.where(valid, pos, 0)].long()  # (Q, C, M)
    m_idx = torch.arange(codes.shape[1], device=lists.device)
    t1 = term1[torch.gather(lists, 1, j).unsqueeze(-1), m_idx, c].sum(-1)
    t2 = term2[torch.arange(q, device=lists.device)[:, None, None], m_idx, c].sum(-1)
    cand = torch.where(valid, pack(torch.gather(dis0, 1, j) + t1 + t2, s), EMPTY)
    top = torch.topk(cand, min(k, max_candidates), dim=1, largest=False, sorted=True).values
    if top.shape[1] < k:
        top = torch.cat([top, top.new_full((q, k - top.shape[1]), EMPTY)], 1)
    return finish(top, lists, offsets, ids, k, values)


def ivfpq_search_ref(queries, rotation, centroids, codebooks, term1, codes, ids, offsets, nprobe, k, max_candidates,
                     values=None):
    """Pure PyTorch reference of :func:`ivfpq_search`."""
    lists, dis0, term2 = probe(queries, rotation, centroids, codebooks, nprobe)
    return ivfpq_scan_ref(lists, dis0, term2, term1, codes, ids, offsets, k, max_candidates, values)


# Dispatches the scan: the probe is the same torch code for every backend.
ivfpq_dispatcher = OpDispatcher("ivfpq_scan")
ivfpq_dispatcher.register("reference")(ivfpq_scan_ref)


def ivfpq_probe(
    queries: torch.Tensor,
    rotation: torch.Tensor | None,
    centroids: torch.Tensor,
    codebooks: torch.Tensor,
    nprobe: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """First stage of :func:`ivfpq_search`: the probed lists and the query-side tables.

    Args:
        queries: (Q, D) float, on the device of ``centroids`` and ``codebooks``.
        nprobe: lists probed per query, 1 <= nprobe <= min(2048, nlist).

    Returns:
        lists: (Q, nprobe) int64 probed list ids, ascending.
        dis0: (Q, nprobe) float32 ``||y - c_l||^2`` of each probed list.
        term2: (Q, M, ksub) float32 ``-2 <y[m], b_mj>``.
    """
    nlist, d = centroids.shape
    m, _, dsub = codebooks.shape
    if queries.dim() != 2 or queries.shape[1] != d:
        raise ValueError(f"ivfpq_search: queries must be (Q, {d}), got {tuple(queries.shape)}")
    if not queries.is_floating_point():
        raise TypeError(f"ivfpq_search: queries must be floating point, got {queries.dtype}")
    for name, t in (("rotation", rotation), ("centroids", centroids), ("codebooks", codebooks)):
        if t is not None and t.device != queries.device:
            raise ValueError(f"ivfpq_search: queries on {queries.device} but {name} on {t.device}; move the index")
    if m * dsub != d:
        raise ValueError(f"ivfpq_search: codebooks {tuple(codebooks.shape)} do not split D = {d} into M x D/M")
    if not 1 <= nprobe <= min(MAX_NPROBE, nlist):
        raise ValueError(f"ivfpq_search: nprobe must be in [1, min({MAX_NPROBE}, nlist = {nlist})], got {nprobe}")
    return probe(queries, rotation, centroids, codebooks, nprobe)


def ivfpq_scan(
    lists: torch.Tensor,
    dis0: torch.Tensor,
    term2: torch.Tensor,
    term1: torch.Tensor,
    codes: torch.Tensor,
    ids: torch.Tensor,
    offsets: torch.Tensor,
    k: int,
    max_candidates: int,
    values: torch.Tensor | None = None,
):
    """Second stage of :func:`ivfpq_search`: the k nearest entries of the probed lists.

    ``lists``, ``dis0`` and ``term2`` come from :func:`ivfpq_probe` (possibly on another device,
    copied here); ``offsets`` may give empty ranges to lists this device does not hold.
    Ties are broken by slot (probe order, then order within the list).

    Args:
        max_candidates: candidate slots per query, 1 <= max_candidates < 2^32; must be >= the sum of
            the nprobe largest list sizes (computed once per nprobe from the index, on the host).
        values: optional 1-D integer tensor indexed by entry id (a database's token ids), on the
            probes' device: also return ``values[ids]``, gathered in the scan's last kernel on Triton.

    Returns:
        dist: (Q, k) float32 ADC squared L2 distances, ascending (FLT_MAX in padded slots).
        ids: (Q, k) int64 entry ids (-1 in padded slots).
        With ``values``, a third tensor: (Q, k) int64 ``values[ids]`` (-1 in padded slots).
    """
    nlist, m, ksub = term1.shape
    if lists.dim() != 2 or dis0.shape != lists.shape or term2.shape != (lists.shape[0], m, ksub):
        raise ValueError(
            f"ivfpq_scan: expected lists and dis0 (Q, nprobe) and term2 (Q, {m}, {ksub}) from ivfpq_probe, got "
            f"{tuple(lists.shape)}, {tuple(dis0.shape)} and {tuple(term2.shape)}"
        )
    for name, t in (("dis0", dis0), ("term2", term2), ("term1", term1), ("codes", codes), ("ids", ids),
                    ("offsets", offsets)):
        if t.device != lists.device:
            raise ValueError(f"ivfpq_scan: probes on {lists.device} but {name} on {t.device}; move the index")
    if codes.dim() != 2 or codes.shape[1] != m or ids.shape != codes.shape[:1] or offsets.shape != (nlist + 1,):
        raise ValueError(
            f"ivfpq_scan: inconsistent index arrays: term1 {tuple(term1.shape)}, codes {tuple(codes.shape)} "
            f"(expected (N, {m})), ids {tuple(ids.shape)} (expected (N,)), offsets {tuple(offsets.shape)} "
            f"(expected ({nlist + 1},))"
        )
    if codes.dtype != torch.uint8 or any(t.dtype != torch.int64 for t in (ids, offsets, lists)):
        raise TypeError(
            f"ivfpq_scan: codes/ids/offsets/lists must be uint8/int64/int64/int64, got "
            f"{codes.dtype}/{ids.dtype}/{offsets.dtype}/{lists.dtype}"
        )
    if not 1 <= k <= MAX_K:
        raise ValueError(f"ivfpq_scan: k must be in [1, {MAX_K}], got {k}")
    if not 1 <= max_candidates < MAX_CANDIDATES:
        raise ValueError(f"ivfpq_scan: max_candidates must be in [1, 2^32), got {max_candidates}")
    if values is not None:
        check_values("ivfpq_scan", values, lists.device)
    return ivfpq_dispatcher(lists, dis0, term2, term1, codes, ids, offsets, k, max_candidates, values)


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
    values: torch.Tensor | None = None,
):
    """IVF-PQ k-NN search, FAISS semantics (see the module docstring for the array layout):
    :func:`ivfpq_probe` then :func:`ivfpq_scan`.

    Args:
        queries: (Q, D) float, on the same device as the index tensors.
        nprobe: lists scanned per query, 1 <= nprobe <= min(2048, nlist).
        k: neighbours per query, 1 <= k <= 2048.
        max_candidates: candidate slots per query; must be >= the sum of the nprobe largest list
            sizes (computed once per nprobe from the index, on the host).
        values: optional 1-D integer tensor indexed by entry id (see :func:`ivfpq_scan`).

    Returns:
        dist: (Q, k) float32 ADC squared L2 distances, ascending (FLT_MAX in padded slots); equal
            distances in the order the entries are stored in the lists.
        ids: (Q, k) int64 entry ids (-1 in padded slots).
        With ``values``, a third tensor: (Q, k) int64 ``values[ids]`` (-1 in padded slots).
    """
    lists, dis0, term2 = ivfpq_probe(queries, rotation, centroids, codebooks, nprobe)
    return ivfpq_scan(lists, dis0, term2, term1, codes, ids, offsets, k, max_candidates, values)
