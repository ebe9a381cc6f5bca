"""Neighbourhood keys: the retrieval query / key of a target patch.

For a target at flat position p = r * W + c of an H x W token grid, the key is the concatenation of
the (L2-normalised) vectors of its neighbour cells, in the order of ``KeyLayout.offsets``
(top-to-bottom, left-to-right). Cells outside the grid or not generated yet contribute zeros.

Two entry points share the same cell order:

* :func:`neighbor_keys` gathers queries at decode time from token ids and the codebook, for the
  given positions of every image in the batch;
* :func:`feature_neighbor_keys` builds keys for every position of dense feature maps (database
  construction from encoder latents or codebook vectors).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import KeyLayout
from ._dispatch import OpDispatcher


def retrieval_positions(grid: tuple[int, int], layout: KeyLayout, device=None) -> torch.Tensor:
    """Bool (H * W,): positions that have a database key under ``layout``'s border policy.

    With ``border="skip"`` a position qualifies only if all its neighbour cells lie inside the grid
    (hop 1 causal on 24 x 24: r >= 1 and 1 <= c <= 22, 506 positions); with ``"zero"`` all do.
    """
    H, W = grid
    rows = torch.arange(H, device=device).repeat_interleave(W)
    cols = torch.arange(W, device=device).repeat(H)
    if layout.border == "zero":
        return torch.ones(H * W, dtype=torch.bool, device=device)
    ok = torch.ones(H * W, dtype=torch.bool, device=device)
    for dr, dc in layout.offsets:
        ok &= (rows + dr >= 0) & (rows + dr < H) & (cols + dc >= 0) & (cols + dc < W)
    return ok


def _check_neighbor_keys(tokens, codebook, positions, grid, layout):
    H, W = grid
    if tokens.dim() != 2 or tokens.shape[1] != H * W:
        raise ValueError(f"neighbor_keys: tokens must be (B, H*W) = (B, {H * W}), got {tuple(tokens.shape)}")
    if tokens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"neighbor_keys: tokens must be int32/int64 token ids, got {tokens.dtype}")
    if codebook.dim() != 2 or not codebook.is_floating_point():
        raise ValueError(f"neighbor_keys: codebook must be a float (V, d) matrix, got {tuple(codebook.shape)} {codebook.dtype}")
    if positions.dim() not in (1, 2) or positions.shape[0] != tokens.shape[0]:
        raise ValueError(
            f"neighbor_keys: positions must be (B,) or (B, P) with B = {tokens.shape[0]}, got {tuple(positions.shape)}"
        )
    if tokens.device != codebook.device or tokens.device != positions.device:
        raise ValueError(
            f"neighbor_keys: tokens, codebook and positions must be on one device, got "
            f"{tokens.device}, {codebook.device}, {positions.device}"
        )


_OFFSET_TENSORS: dict = {}


def _offset_tensor(layout: KeyLayout, device: torch.device) -> torch.Tensor:
    """(n, 2) offsets on ``device``, made once: a host-to-device copy per call would break graph capture."""
    key = (layout.offsets, device)
    if key not in _OFFSET_TENSORS:
        _OFFSET_TENSORS[key] = torch.tensor(layout.offsets, dtype=torch.long, device=device)
    return _OFFSET_TENSORS[key]


def neighbor_keys_ref(tokens, codebook, positions, grid, layout):
    """Pure PyTorch reference of :func:`neighbor_keys` (any device)."""
    H, W = grid
    squeeze = positions.dim() == 1
    pos = positions.long().reshape(positions.shape[0], -1)  # (B, P)
    off = _offset_tensor(layout, tokens.device)  # (n, 2)
    r = (pos // W).unsqueeze(-1) + off[:, 0]  # (B, P, n)
    c = (pos % W).unsqueeze(-1) + off[:, 1]
    inside = (r >= 0) & (r < H) & (c >= 0) & (c < W)
    flat = (r.clamp(0, H - 1) * W + c.clamp(0, W - 1)).reshape(pos.shape[0], -1)
    ids = torch.gather(tokens.long(), 1, flat).reshape(r.shape)  # (B, P, n)
    present = inside & (ids >= 0)
    vecs = codebook[ids.clamp(min=0)] * present.unsqueeze(-1).to(codebook.dtype)  # (B, P, n, d)
    keys = vecs.flatten(-2)
    valid = inside.all(-1) if layout.border == "skip" else torch.ones_like(inside[..., 0])
    if squeeze:
        keys, valid = keys[:, 0], valid[:, 0]
    return keys, valid


neighbor_keys_dispatcher = OpDispatcher("neighbor_keys")
neighbor_keys_dispatcher.register("reference")(neighbor_keys_ref)


def neighbor_keys(
    tokens: torch.Tensor,
    codebook: torch.Tensor,
    positions: torch.Tensor,
    grid: tuple[int, int],
    layout: KeyLayout,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Retrieval queries for the given positions of a batch of token grids.

    Args:
        tokens: (B, H*W) int token ids in raster order; negative ids mark cells not generated yet.
        codebook: (V, d) float, the L2-normalised codebook rows (what a generated token looks like).
        positions: (B,) or (B, P) int flat target positions r * W + c, each in [0, H*W).
        grid: (H, W).
        layout: which neighbour cells form the key.

    Returns:
        keys: (B, [P], n * d) in the codebook's dtype, n = ``layout.num_cells``; cell j of the key is
            ``codebook[tokens[r + dr_j, c + dc_j]]`` or zeros if that cell is outside the grid or empty.
        valid: (B, [P]) bool, False where ``border="skip"`` and a neighbour falls outside the grid.
    """
    _check_neighbor_keys(tokens, codebook, positions, grid, layout)
    return neighbor_keys_dispatcher(tokens, codebook, positions, grid, layout)


def feature_neighbor_keys(features: torch.Tensor, layout: KeyLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys of every position of dense feature maps.

    Args:
        features: (B, H, W, d) per-cell vectors (e.g. L2-normalised encoder latents).
        layout: which neighbour cells form the key.

    Returns:
        keys: (B, H*W, n * d), built exactly like :func:`neighbor_keys` with every cell present.
        valid: (H*W,) bool, positions kept under the border policy.
    """
    if features.dim() != 4:
        raise ValueError(f"feature_neighbor_keys: features must be (B, H, W, d), got {tuple(features.shape)}")
    B, H, W, d = features.shape
    R = layout.radius
    padded = F.pad(features, (0, 0, R, R, R, R))  # zeros outside the grid
    cells = [padded[:, R + dr : R + dr + H, R + dc : R + dc + W] for dr, dc in layout.offsets]
    keys = torch.cat(cells, dim=-1).reshape(B, H * W, -1)
    return keys, retrieval_positions((H, W), layout, device=features.device)
