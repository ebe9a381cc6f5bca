"""The one top-k oracle of the test suite: every search test (exact k-NN on any backend, faiss, IVF-PQ,
the CUDA k-select, masked decoding's retrieval) checks its results here.

Tie rule. The ground truth is a (Q, N) table ``truth`` of each id's true distance to each query (float64;
NaN where an id is not a candidate, e.g. outside the probed lists of an IVF index). A top-k result
``(dist, ids)`` is correct when, row by row,

1. its distances equal the k smallest true distances, position by position, within the tolerance;
2. every returned id's true distance equals the distance reported for it, within the tolerance;
3. no id is returned twice;
4. positions beyond the row's candidates are padding (id -1, distance FLT_MAX), and only those.

Together these fix the result up to ties: ids may differ from another correct result only among ids
whose true distances are equal within the tolerance (in particular at the k-th distance, where the
(k+1)-th may replace the k-th). Tests of a backend's documented tie order (equal distances in id order)
add an exact comparison on top.

Approximate search (IVF-PQ) is measured by :func:`recall` against the exact truth, which counts a
returned id as a hit when its exact distance is within the tolerance of the k-th exact distance
(so ties at the k-th distance do not lower the recall).
"""

from __future__ import annotations

import torch

FLT_MAX = torch.finfo(torch.float32).max


def exact_distances(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """(Q, D), (N, D) -> (Q, N) squared L2 distances in float64 on the CPU (direct differences, no
    expanded form: the ground truth for the kernels' fp32 |q|^2 + |k|^2 - 2 q.k)."""
    q, x = queries.detach().double().cpu(), keys.detach().double().cpu()
    rows = max(1, (1 << 24) // max(1, q.shape[1] * x.shape[0]))  # queries per chunk: ~128 MiB of differences
    return torch.cat([((q[i : i + rows, None, :] - x[None]) ** 2).sum(-1) for i in range(0, len(q), rows)])


def candidate_distances(dist: torch.Tensor, ids: torch.Tensor, num_ids: int) -> torch.Tensor:
    """The (Q, num_ids) truth table of a search that listed every candidate: ``dist``/``ids`` (Q, C) of
    one query's whole candidate set (padding id -1 ignored); ids that are no candidate get NaN."""
    dist, ids = dist.detach().double().cpu(), ids.detach().cpu()
    table = torch.full((ids.shape[0], num_ids), float("nan"), dtype=torch.float64)
    real = ids >= 0
    rows = torch.arange(ids.shape[0])[:, None].expand_as(ids)
    table[rows[real], ids[real]] = dist[real]
    return table


def knn_atol(queries: torch.Tensor, keys: torch.Tensor) -> float:
    """Absolute tolerance of fp32 distances from the expanded form |q|^2 + |k|^2 - 2 q.k (the reference
    and every kernel): its rounding error scales with the norms, not with the distance, ~16 fp32 ulps of
    the largest |q|^2 + |k|^2 (seen on an H200: 3e-4 at distance 23.7 with norms near 300, bf16 keys)."""
    return 2e-6 * float(queries.detach().double().pow(2).sum(-1).max() + keys.detach().double().pow(2).sum(-1).max())


def _tolerance(values: torch.Tensor, atol: float, rtol: float) -> torch.Tensor:
    return atol + rtol * values.abs()


def _fail_at_first(bad: torch.Tensor, message) -> None:
    """Raise ``AssertionError(message(q, j))`` naming the first query ``q`` and position ``j`` set in ``bad``, if any."""
    if bad.any():
        raise AssertionError(message(*(int(i) for i in bad.nonzero()[0])))


def _out_of_tolerance(dist: torch.Tensor, expected: torch.Tensor, real: torch.Tensor, atol: float, rtol: float):
    """(error, bad) of ``dist`` against ``expected`` at the ``real`` positions: ``bad`` where the error exceeds
    the tolerance of ``expected``, a NaN on either side included (equal infinities are no error)."""
    err = (dist - expected).abs().where(real & (dist != expected), 0.0)
    return err, real & ~(err <= _tolerance(expected, atol, rtol))


def assert_topk(dist: torch.Tensor, ids: torch.Tensor, truth: torch.Tensor, *, atol: float, rtol: float = 1e-5,
                what: str = "top-k") -> None:
    """Checks ``(dist, ids)`` (Q, k) against the truth table (Q, N) under the tie rule of the module
    docstring; the tolerance of a distance d is ``atol + rtol * |d|``. Failures name the first bad row."""
    assert dist.dtype == torch.float32 and ids.dtype == torch.int64, f"{what}: dtypes {dist.dtype}, {ids.dtype}"
    assert dist.shape == ids.shape and dist.shape[0] == truth.shape[0], \
        f"{what}: shapes {tuple(dist.shape)}, {tuple(ids.shape)} for {truth.shape[0]} queries"
    dist, ids = dist.detach().double().cpu(), ids.detach().cpu()
    k = dist.shape[1]
    assert k <= truth.shape[1], f"{what}: k = {k} > {truth.shape[1]} ids"
    best = truth.sort(dim=1).values[:, :k]  # (Q, k) the k smallest true distances (NaN sorts last)
    padding = best.isnan()
    got_padding = ids == -1
    _fail_at_first(got_padding != padding, lambda q, j: (
        f"{what}: query {q} position {j}: id {ids[q, j].item()} but the row has {int((~padding[q]).sum())} "
        "candidates (positions beyond them are padding, id -1)"))
    assert bool((dist[padding] == FLT_MAX).all()), f"{what}: padded positions must have distance FLT_MAX"
    real = ~padding
    err, bad = _out_of_tolerance(dist, best, real, atol, rtol)  # NaN (an unwritten output) is bad too
    _fail_at_first(bad, lambda q, j: (
        f"{what}: {int(bad.sum())}/{int(real.sum())} distances differ from the true k smallest (atol={atol:.3g}, "
        f"rtol={rtol}); max error {err.max().item():.3g}; first at query {q} position {j}: got "
        f"{dist[q, j].item()!r}, true {best[q, j].item()!r}"))
    _fail_at_first(real & ((ids < 0) | (ids >= truth.shape[1])), lambda q, j: (
        f"{what}: query {q} position {j}: id {ids[q, j].item()} outside [0, {truth.shape[1]})"))
    safe_ids = ids.clamp_min(0)
    of_ids = truth.gather(1, safe_ids)  # true distance of each returned id
    _, bad = _out_of_tolerance(dist, of_ids, real, atol, rtol)  # NaN (not a candidate) is bad too
    _fail_at_first(bad, lambda q, j: (
        f"{what}: {int(bad.sum())} returned ids are not at their reported distance; first at query {q} "
        f"position {j}: id {ids[q, j].item()} reported at {dist[q, j].item()!r}, true distance "
        f"{of_ids[q, j].item()!r} (ids may differ only among equal distances)"))
    for q, row in enumerate(ids.tolist()):
        row = [i for i in row if i >= 0]
        assert len(set(row)) == len(row), f"{what}: query {q} returns an id twice"
    assert bool((dist[:, 1:] >= dist[:, :-1]).all()), f"{what}: distances are not ascending"


def tie_order(truth: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (Q, k) result that orders equal distances by id, padded (FLT_MAX, -1) where a row has fewer
    than k candidates: the exact expectation for backends that document this tie order."""
    dist, ids = truth.sort(dim=1, stable=True)  # stable over id-indexed columns: ties in id order
    dist, ids = dist[:, :k], ids[:, :k]
    padding = dist.isnan()
    return dist.float().masked_fill(padding, FLT_MAX), ids.masked_fill(padding, -1)


def admissible(truth: torch.Tensor, k: int, atol: float = 1e-4, rtol: float = 1e-5) -> torch.Tensor:
    """(Q, N) mask of the ids a correct top-k may return: those within the tolerance of the k-th
    smallest true distance (all k nearest, and every id tied with the k-th)."""
    kth = truth.sort(dim=1).values[:, k - 1 : k]
    return truth <= kth + _tolerance(kth, atol, rtol)


def recall(ids: torch.Tensor, truth: torch.Tensor, atol: float = 1e-4, rtol: float = 1e-5) -> float:
    """Tie-aware recall@k of ``ids`` (Q, k) against the exact truth table (Q, N): the fraction of returned
    ids that a correct exact top-k may return (see :func:`admissible`); padding (-1) counts as a miss."""
    ids = torch.as_tensor(ids).cpu()
    allowed = admissible(truth, ids.shape[1], atol, rtol)
    hit = allowed.gather(1, ids.clamp_min(0)) & (ids >= 0)
    return hit.double().mean().item()
