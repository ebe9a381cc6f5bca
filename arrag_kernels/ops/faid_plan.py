"""Launch plan of the Triton FAiD blend step (:mod:`arrag_kernels.ops._triton.faid`), computable without a GPU.

:func:`blend_shape` fixes every tile and grid of one blend step from the problem's shape alone (the
Triton op is dispatched from it); :func:`faid_blend_plan` turns it into launches, bytes and scratch.
The step is four GEMM-shaped launches over the whole batch, so each weight matrix is read once per
batch tile (one tile up to :data:`MAX_BLOCK_B` images / :data:`MAX_BLOCK_M` candidates), not once per
image: at Janus-Pro-1B's D = 2048 with hops 1+2 (n = 12 causal cells) the composed taps are 100.7 MB
in bf16, which a per-image context kernel read 16 times per step at batch 16.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .knn_plan import next_pow2

BLOCK_N = 64  # output columns per program
MAX_BLOCK_D = 128  # reduction step (rows of a weight tile)
MAX_BLOCK_B = 64  # images per context-GEMM tile: the taps are read once per step up to this batch
MAX_BLOCK_M = 64  # candidates (image, k) per centre / score GEMM tile
MIN_DOT = 16  # tl.dot needs >= 16 rows
# The context GEMM splits its n*D reduction so that about this many programs stream the taps (a few
# per SM of an H100/H200); the partial sums are added in the candidates' epilogue, in a fixed order.
CONTEXT_PROGRAMS = 256


@dataclass(frozen=True)
class BlendShape:
    """Every size of one blend step: B images, n causal cells, K candidates per image, width D."""

    batch: int
    cells: int
    k: int
    dim: int
    itemsize: int
    block_d: int
    block_b: int  # images per context tile
    block_m: int  # candidates per centre / score tile
    split: int  # chunks of the context reduction (partial sums)
    chunk: int  # reduction rows per chunk (a multiple of block_d)
    kp: int  # K padded to a power of two >= 16 (the mean kernel's rows)

    @property
    def col_blocks(self) -> int:
        return -(-self.dim // BLOCK_N)

    @property
    def batch_tiles(self) -> int:
        return -(-self.batch // self.block_b)

    @property
    def row_blocks(self) -> int:
        return -(-self.batch * self.k // self.block_m)

    @property
    def grids(self) -> dict[str, tuple[int, ...]]:
        """Grid of each kernel, in launch order."""
        return {
            "context": (self.col_blocks, self.split, self.batch_tiles),
            "candidates": (self.row_blocks, self.col_blocks),
            "score": (self.row_blocks, self.col_blocks),
            "mean": (self.batch, self.col_blocks),
        }


def blend_shape(batch: int, cells: int, k: int, dim: int, itemsize: int) -> BlendShape:
    block_d = min(MAX_BLOCK_D, max(MIN_DOT, next_pow2(dim)))
    block_b = min(MAX_BLOCK_B, max(MIN_DOT, next_pow2(batch)))
    block_m = min(MAX_BLOCK_M, max(MIN_DOT, next_pow2(batch * k)))
    steps = -(-cells * dim // block_d)
    col_blocks, batch_tiles = -(-dim // BLOCK_N), -(-batch // block_b)
    split = min(steps, max(1, CONTEXT_PROGRAMS // (col_blocks * batch_tiles)))
    chunk_steps = -(-steps // split)
    split = -(-steps // chunk_steps)  # no empty chunk
    return BlendShape(batch, cells, k, dim, itemsize, block_d, block_b, block_m, split, chunk_steps * block_d,
                      max(MIN_DOT, next_pow2(k)))


def _plan_of(s: BlendShape) -> dict:
    B, n, K, D, isz = s.batch, s.cells, s.k, s.dim, s.itemsize
    BK, NCD, f32 = B * K, n * D, 4
    square = D * D * isz
    kernels = [
        # every (column block, chunk) program reads its tap tile once for the batch tile
        dict(name="context", grid=s.grids["context"],
             bytes_read=s.batch_tiles * NCD * D * isz + s.col_blocks * B * NCD * isz,
             bytes_written=s.split * B * D * f32),
        # centre GEMM; epilogue: + the context partials of the candidate's image + bias
        dict(name="candidates", grid=s.grids["candidates"],
             bytes_read=s.row_blocks * (square + D * isz) + s.col_blocks * BK * D * isz + s.split * BK * D * f32,
             bytes_written=BK * D * isz),
        # score GEMM; epilogue: relu(. + b1) . w2 per column block
        dict(name="score", grid=s.grids["score"],
             bytes_read=s.row_blocks * (square + 2 * D * isz) + s.col_blocks * BK * D * isz,
             bytes_written=s.col_blocks * BK * f32),
        # sigmoid of the summed partials, w_k hhat_k in place, mean over K
        dict(name="mean", grid=s.grids["mean"],
             bytes_read=B * s.col_blocks * (s.col_blocks * K * f32 + isz) + BK * D * isz,
             bytes_written=BK * D * isz + B * D * isz),
    ]
    scratch = {"context": s.split * B * D * f32, "score": s.col_blocks * BK * f32}
    outputs = {"blended": B * D * isz, "weighted": BK * D * isz}
    tap_bytes = NCD * D * isz
    return dict(
        launches=len(kernels), kernels=kernels, bytes_read=sum(kn["bytes_read"] for kn in kernels),
        tap_bytes=tap_bytes, tap_reads=s.batch_tiles, scratch=scratch, scratch_bytes=sum(scratch.values()),
        outputs=outputs, split=s.split,
    )


def faid_blend_plan(batch: int, cells: int, k: int, dim: int, dtype: torch.dtype | str = torch.bfloat16) -> dict:
    """Launches, bytes and scratch of one Triton FAiD blend step (:func:`arrag_kernels.ops.faid_blend`) of
    ``batch`` images with ``cells`` causal context cells, ``k`` retrieved features and width ``dim`` in
    ``dtype``, exactly as it is dispatched.

    Returns a dict: ``launches``; ``kernels`` (per kernel in launch order: ``name``, ``grid``,
    ``bytes_read``, ``bytes_written``); ``bytes_read`` (all kernels' global loads, masked-off elements
    not counted; operands re-read by several programs, the cells and candidates, mostly hit L2);
    ``tap_bytes`` (the composed taps) and ``tap_reads`` (how often the step reads them: once per
    batch tile); ``scratch`` (buffer name -> bytes) and ``scratch_bytes``; ``outputs`` (bytes of the
    two results); ``split`` (chunks of the context reduction).
    """
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"faid_blend_plan: dtype must be a floating torch dtype (or its name), got {dtype!r}")
    if min(batch, cells, k, dim) < 1:
        raise ValueError(f"faid_blend_plan: need batch, cells, k, dim >= 1, got batch={batch}, cells={cells}, "
                         f"k={k}, dim={dim}")
    return _plan_of(blend_shape(batch, cells, k, dim, torch.empty(0, dtype=dtype).element_size()))
