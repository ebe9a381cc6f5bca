"""Triton IVF-PQ list scan: ADC distances of every probed list entry into per-query buffers.

The probe stage (rotation, coarse top-nprobe, query tables) and the final top-k are the torch
code shared with the reference in :mod:`arrag_kernels.ops.ivfpq`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ivfpq import FLT_MAX, ivfpq_dispatcher, probe, select, slots
from ._common import device_reason

_BLOCK = 256  # list entries per scan step
_TARGET_PROGRAMS = 4096  # scan programs per launch when lists are long enough to split


@triton.jit
def _ivfpq_scan_kernel(
    lists_ptr, dis0_ptr, slot0_ptr, term1_ptr, term2_ptr, codes_ptr, offsets_ptr, cand_d_ptr, nprobe, max_candidates,
    M: tl.constexpr, KSUB: tl.constexpr, BLOCK: tl.constexpr,
):
    """Program (query, probed list, split s) computes the ADC distances of blocks s, s + S, s + 2S, ... of the list."""
    qi = tl.program_id(0)
    pj = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)
    lst = tl.load(lists_ptr + qi * nprobe + pj)
    d0 = tl.load(dis0_ptr + qi * nprobe + pj)
    slot = tl.load(slot0_ptr + qi * nprobe + pj)
    start = tl.load(offsets_ptr + lst)
    end = tl.load(offsets_ptr + lst + 1)
    m = tl.arange(0, M)
    t1_base = term1_ptr + lst * (M * KSUB) + m * KSUB
    t2_base = term2_ptr + qi * (M * KSUB) + m * KSUB
    out = qi.to(tl.int64) * max_candidates + slot
    for t0 in range(start + split * BLOCK, end, num_splits * BLOCK):
        t = t0 + tl.arange(0, BLOCK)
        mask = t < end
        c = tl.load(codes_ptr + t[:, None] * M + m[None, :], mask=mask[:, None], other=0).to(tl.int32)
        lut = tl.load(t1_base[None, :] + c, mask=mask[:, None], other=0.0)
        lut += tl.load(t2_base[None, :] + c, mask=mask[:, None], other=0.0)
        d = d0 + tl.sum(lut, axis=1)
        tl.store(cand_d_ptr + out + (t - start), d, mask=mask)


def _ivfpq_search_triton(
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
    """Torch probe stage, Triton list scan into per-query distance buffers, ``torch.topk`` selection."""
    lists, dis0, term2 = probe(queries, rotation, centroids, codebooks, nprobe)
    slot0 = slots(lists, offsets)
    q = queries.shape[0]
    m, ksub, _ = codebooks.shape
    cand_d = torch.full((q, max_candidates), FLT_MAX, dtype=torch.float32, device=queries.device)
    # Long lists are split over several programs (enough of them to fill a GPU, no more than an
    # average probed list has blocks); all three numbers are host integers: no synchronisation.
    avg_blocks = -(-max_candidates // (nprobe * _BLOCK))
    splits = max(1, min(-(-_TARGET_PROGRAMS // (q * nprobe)), avg_blocks))
    torch.library.wrap_triton(_ivfpq_scan_kernel)[(q, nprobe, splits)](
        lists.contiguous(), dis0.contiguous(), slot0.contiguous(), term1, term2.contiguous(), codes, offsets,
        cand_d, nprobe, max_candidates, M=m, KSUB=ksub, BLOCK=_BLOCK,
    )
    return select(cand_d, lists, slot0, offsets, ids, k)


# A torch.library op, so torch.compile and CUDA graphs see one opaque, shape-static operation.
ivfpq_search_op = torch.library.triton_op("arrag_kernels::ivfpq_search_triton", mutates_args=())(_ivfpq_search_triton)


def _check(queries, rotation, centroids, codebooks, term1, codes, ids, offsets, nprobe, k, max_candidates):
    reason = device_reason(queries)
    if reason is not None:
        return reason
    m = codebooks.shape[0]
    if m & (m - 1):
        return f"M = {m} sub-quantizers is not a power of two (Triton block shapes)"
    return None


@ivfpq_dispatcher.register("triton", check=_check)
def ivfpq_search_triton(queries, rotation, centroids, codebooks, term1, codes, ids, offsets, nprobe, k, max_candidates):
    """Triton implementation of :func:`ivfpq_search` (same contract)."""
    return ivfpq_search_op(queries, rotation, centroids, codebooks, term1, codes, ids, offsets, nprobe, k, max_candidates)
