"""Triton neighbour-key gather: the queries of all (image, position) pairs in one launch."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..neighborhood import neighbor_keys_dispatcher
from ._common import FLOAT_DTYPES, INDEX_DTYPES, device_reason, dtype_reason, launch, next_pow2


@triton.jit
def _neighbor_keys_kernel(
    tok_ptr, cb_ptr, pos_ptr, keys_ptr, valid_ptr,
    P, H, W, V, D, tok_stride, cb_stride,
    RADIUS: tl.constexpr, CAUSAL: tl.constexpr, SKIP: tl.constexpr,
    NCELL: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program per (image b, query p): a (cells x d) tile of the key.
    row = tl.program_id(0)
    b = row // P
    pos = tl.load(pos_ptr + row).to(tl.int32)
    r = pos // W
    c = pos % W
    # Key cell j is cell t of the (2R+1)^2 window in raster order, the centre skipped; causal keys
    # are exactly the cells before the centre, so t = j there.
    SIDE: tl.constexpr = 2 * RADIUS + 1
    CENTRE: tl.constexpr = RADIUS * SIDE + RADIUS
    j = tl.arange(0, BLOCK_C)
    if CAUSAL:
        t = j
    else:
        t = j + (j >= CENTRE).to(tl.int32)
    rr = r + t // SIDE - RADIUS
    cc = c + t % SIDE - RADIUS
    cell = j < NCELL
    inside = (rr >= 0) & (rr < H) & (cc >= 0) & (cc < W)
    ids = tl.load(tok_ptr + b.to(tl.int64) * tok_stride + rr * W + cc, mask=cell & inside, other=-1)
    present = cell & inside & (ids >= 0) & (ids < V)
    d = tl.arange(0, BLOCK_D)
    dmask = d[None, :] < D
    vec = tl.load(cb_ptr + ids[:, None].to(tl.int64) * cb_stride + d[None, :], mask=present[:, None] & dmask, other=0.0)
    out = keys_ptr + row.to(tl.int64) * (NCELL * D) + j[:, None] * D + d[None, :]
    tl.store(out, vec, mask=cell[:, None] & dmask)
    if SKIP:
        ok = tl.sum((cell & ~inside).to(tl.int32), axis=0) == 0
    else:
        ok = tl.full((), 1, tl.int1)
    tl.store(valid_ptr + row, ok.to(tl.int8))


def _layout_args(layout):
    return layout.radius, layout.neighborhood == "causal", layout.border == "skip"


@torch.library.triton_op("arrag_kernels::neighbor_keys_triton", mutates_args=())
def neighbor_keys_op(
    tokens: torch.Tensor, codebook: torch.Tensor, positions: torch.Tensor,
    H: int, W: int, radius: int, causal: bool, skip: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H*W) tokens, (V, d) codebook, (B, P) positions -> keys (B, P, n*d), valid (B, P) bool."""
    B, P = positions.shape
    V, D = codebook.shape
    side = 2 * radius + 1
    ncell = side * side // 2 if causal else side * side - 1
    keys = torch.empty(B, P, ncell * D, dtype=codebook.dtype, device=codebook.device)
    valid = torch.empty(B, P, dtype=torch.int8, device=codebook.device)
    if B * P:
        launch(_neighbor_keys_kernel, (B * P,),
               tokens, codebook, positions.contiguous(), keys, valid,
               P, H, W, V, D, tokens.stride(0), codebook.stride(0),
               RADIUS=radius, CAUSAL=causal, SKIP=skip,
               NCELL=ncell, BLOCK_C=next_pow2(ncell), BLOCK_D=max(next_pow2(D), 2))
    return keys, valid.bool()


def _check(tokens, codebook, positions, grid, layout):
    return (
        device_reason(tokens, codebook, positions)
        or dtype_reason("codebook", codebook, FLOAT_DTYPES)
        or dtype_reason("positions", positions, INDEX_DTYPES)
        or (None if codebook.stride(1) == 1 and tokens.stride(1) == 1 else "codebook and tokens need unit stride in the last dim")
    )


@neighbor_keys_dispatcher.register("triton", check=_check)
def neighbor_keys_triton(tokens, codebook, positions, grid, layout):
    """Triton implementation of :func:`arrag_kernels.ops.neighbor_keys` (same contract)."""
    squeeze = positions.dim() == 1
    pos = positions.reshape(positions.shape[0], -1)
    keys, valid = neighbor_keys_op(tokens, codebook, pos, grid[0], grid[1], *_layout_args(layout))
    if squeeze:
        keys, valid = keys[:, 0], valid[:, 0]
    return keys, valid
