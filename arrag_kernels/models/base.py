"""The contract between the library and an autoregressive image generator.

An adapter tells the library where a model family keeps the pieces AR-RAG needs: the VQ tokenizer
(to build databases and to turn generated tokens into queries) and the decoding pieces (one KV-cached
language-model step, the image head, the next-input embedding). Supporting a new generator means
writing one adapter; ops, databases and the decode loop stay untouched.
"""

from __future__ import annotations

import hashlib
from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class ImageTokenizer(Protocol):
    """What database building and query construction need from a model."""

    grid: tuple[int, int]  # (H, W) image tokens per image
    codebook_size: int
    embed_dim: int  # width of one codebook vector
    image_size: int  # pixels per side expected by the encoder

    def codebook(self) -> torch.Tensor:
        """(V, d) L2-normalised codebook rows: what a generated token contributes to a query."""

    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) in [-1, 1] -> (latents (B, H, W, d) L2-normalised per cell, tokens (B, H, W))."""


@runtime_checkable
class ImageDecoder(Protocol):
    """What the KV-cached decode loop needs from a model (CFG rows doubled: [cond; uncond])."""

    def new_cache(self) -> Any: ...

    def step(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, cache: Any,
             position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Run the language model on new input embeddings; return the last hidden state (2B, D).

        ``attention_mask`` is 2-D (2B, seen + new) for the library's dynamic cache, or a prepared
        4-D additive mask with explicit ``position_ids`` for its static cache.
        """

    def kv_spec(self) -> tuple[int, int, int]:
        """(layers, key/value heads, head dim): the shape of a pre-allocated KV cache."""

    def image_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(2B, D) -> (2B, V) image-token logits."""

    def embed_image_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(2B, 1) token ids -> (2B, 1, D) next-step input embeddings."""


def codebook_fingerprint(codebook: torch.Tensor) -> str:
    """Short hash identifying a VQ codebook, stored in databases to catch a mismatched model."""
    data = codebook.detach().float().cpu().contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]
