"""The contract between the library and a masked (MaskGIT / Show-o style) image generator.

A masked generator predicts every cell of an H x W token grid at once from a partially known grid:
``logits(tokens, condition)`` reads (B, H*W) token ids with -1 at unknown (masked) cells and returns
(B, H*W, V) logits for every cell. The decode loop (:func:`arrag_kernels.masked.masked_decode`)
owns the unmasking schedule and the sampling; the adapter only says where the model's pieces are.
FAiD needs two more things: a per-layer hook on the residual stream and the embedding of retrieved
token ids.
"""

from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

import torch

# hook(layer index, normalised layer input of the image cells (B, H*W, D)) -> (B, H*W, D) to add to the
# residual after attention and before the FFN, or None.
LayerHook = Callable[[int, torch.Tensor], "torch.Tensor | None"]


@runtime_checkable
class MaskedGenerator(Protocol):
    """What masked decoding with DAiD / FAiD needs from a model family."""

    grid: tuple[int, int]  # (H, W) image tokens per image
    codebook_size: int  # V
    embed_dim: int  # width of one codebook vector (retrieval keys are n_cells * embed_dim)
    hidden_size: int  # D of the transformer (FAiD)
    num_layers: int  # transformer layers (FAiD blender placement)

    def codebook(self) -> torch.Tensor:
        """(V, d) L2-normalised codebook rows: what a known token contributes to a query."""

    def fingerprint(self) -> str:
        """Short hash of the VQ codebook (databases record it to catch a mismatched model)."""

    def logits(self, tokens: torch.Tensor, condition: torch.Tensor, hook: LayerHook | None = None) -> torch.Tensor:
        """(B, H*W) ids (-1 = unknown), condition (B, ...) -> (B, H*W, V) logits of every cell,
        after any guidance the model applies. ``hook`` is called at every layer (see ``LayerHook``)."""

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """(...,) token ids in [0, V) -> (..., D) input embeddings (FAiD's retrieved features)."""
