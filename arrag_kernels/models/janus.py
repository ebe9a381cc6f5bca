"""Adapter for Hugging Face ``JanusForConditionalGeneration`` (Janus / Janus-Pro)."""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from ..ops import knn
from .base import codebook_fingerprint


class JanusAdapter:
    """Locates the AR-RAG pieces of a HF Janus model. Holds references only; changes nothing."""

    model_type = "janus"

    def __init__(self, model):
        self.model = model
        inner = model.model
        self.vq = inner.vqmodel
        self.language_model = inner.language_model
        self.generation_head = inner.generation_head
        side = int(self.vq.quantize.quant_state_dims[0])
        self.grid = (side, side)
        self.codebook_size = int(self.vq.quantize.num_embeddings)
        self.embed_dim = int(self.vq.quantize.embedding_dim)
        # The VQ encoder halves the resolution between consecutive levels: it maps grid * factor
        # pixels onto the grid (vision_config.image_size is the understanding tower's input and may differ).
        factor = 2 ** sum(hasattr(level, "downsample") for level in self.vq.encoder.down)
        self.image_size = side * factor
        self.num_image_tokens = int(inner.vision_model.config.num_image_tokens)
        # The cache keyword is `past_key_values` in transformers 5.17 and `cache` in 5.24.
        params = inspect.signature(self.language_model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    def check_image_generation(self) -> None:
        """Raise if this model cannot generate images onto its VQ grid (text-only use is unaffected)."""
        side = self.grid[0]
        if self.num_image_tokens != side * side:
            raise ValueError(
                f"this Janus config generates vision_config.num_image_tokens = {self.num_image_tokens} image tokens "
                f"but its VQ decodes a {side}x{side} grid ({side * side} tokens); set "
                f"vision_config.num_image_tokens = {side * side} to generate images"
            )

    @property
    def device(self) -> torch.device:
        return self.generation_head.vision_head.weight.device

    # ---- tokenizer side -------------------------------------------------------------------
    def codebook(self) -> torch.Tensor:
        return F.normalize(self.vq.quantize.embedding.weight.detach(), p=2, dim=-1)

    def fingerprint(self) -> str:
        return codebook_fingerprint(self.vq.quantize.embedding.weight)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-quantisation latents ``quant_conv(encoder(x))`` (L2-normalised per cell) and token ids."""
        dtype = self.vq.quant_conv.weight.dtype
        hidden = self.vq.encoder(pixels.to(self.device, dtype))
        latent = self.vq.quant_conv(hidden)  # (B, d, H, W)
        B, _, H, W = latent.shape
        if (H, W) != self.grid:
            raise ValueError(
                f"the VQ encoder mapped {tuple(pixels.shape[-2:])} pixels onto a {H}x{W} latent grid, expected "
                f"{self.grid}; encode images of {self.image_size}x{self.image_size} pixels"
            )
        tokens = self.nearest_codes(latent)
        latents = F.normalize(latent.permute(0, 2, 3, 1).float(), p=2, dim=-1)
        return latents, tokens.view(B, H, W)

    @torch.no_grad()
    def nearest_codes(self, latent: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """HF's quantizer ids (argmin of squared L2 to the raw codebook rows, first minimum) for
        (B, d, H, W) latents, through the library's exact search: no (cells x codebook) distance
        matrix (3.6 GB at batch 64 for Janus-Pro), and ``chunk`` cells at a time bound the
        reference backend's. Returns (B * H * W,) int64 in raster order."""
        cells = latent.permute(0, 2, 3, 1).reshape(-1, latent.shape[1]).float()
        codebook = self.vq.quantize.embedding.weight.detach()
        return torch.cat([knn(part, codebook, 1)[1][:, 0] for part in cells.split(chunk)])

    # ---- decoder side ---------------------------------------------------------------------
    def new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.language_model.config)

    def step(self, inputs_embeds, attention_mask, cache, position_ids=None):
        out = self.language_model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
            **{self._cache_kw: cache},
        )
        return out.last_hidden_state[:, -1, :]

    def cfg_inputs(self, input_ids: torch.Tensor, generation_config) -> torch.Tensor:
        """(B, S) prompt ids -> (2B, S, D) prompt embeddings, conditional rows then unconditional rows.

        Janus's unconditional prompt keeps only BOS and begin-of-image; the rest becomes padding.
        """
        boi = generation_config.generation_kwargs.get("boi_token_id")
        if boi is None:
            raise ValueError("image generation needs generation_config.generation_kwargs['boi_token_id']")
        tokens = input_ids.repeat(2, 1)
        uncond = tokens[input_ids.shape[0]:]
        uncond.masked_fill_((uncond != generation_config.bos_token_id) & (uncond != boi), generation_config.pad_token_id)
        return self.model.get_input_embeddings()(tokens)

    def kv_spec(self) -> tuple[int, int, int]:
        """(layers, key/value heads, head dim) of the language model's attention cache."""
        c = self.language_model.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return c.num_hidden_layers, c.num_key_value_heads, head_dim

    def image_logits(self, hidden):
        return self.generation_head(hidden)

    def embed_image_tokens(self, tokens):
        return self.model.prepare_embeddings_for_image_generation(tokens)

    def decode_pixels(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, H*W) token ids -> (B, S, S, 3) pixels in [-1, 1]."""
        return self.model.decode_image_tokens(tokens)

