"""Adapter for Hugging Face ``Emu3ForConditionalGeneration``: its VQ tokenizer and a DAiD logits processor.

Emu3 generates images with its ordinary ``generate``: image tokens live in the text vocabulary
(``vocabulary_mapping.img2bpe``), every row of ``W`` image tokens is followed by an end-of-line
token, the grid is chosen per call (the prompt ends with ``<|image start|>H*W<|image token|>``),
CFG comes from a negative prompt through HF's ``UnbatchedClassifierFreeGuidanceLogitsProcessor``
and ``prefix_allowed_tokens_fn`` enforces the layout. DAiD therefore joins as a logits processor
(:meth:`Emu3Adapter.logits_processor`) that runs after that CFG processor inside Emu3's own
``generate``; ``patch_model`` (the library's own decode loop) does not apply to Emu3, and neither
does FAiD (its blenders need that loop and a trained checkpoint for Emu3, which does not exist).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import codebook_fingerprint

IMAGE_WRAPPER_TOKEN = "<|image token|>"  # the image stream starts after it (see Emu3Processor)


class Emu3Adapter:
    """The :class:`ImageTokenizer` side of a HF Emu3 model for a grid ``(H, W)`` (Emu3 picks it per call).

    Database keys are the VQ encoder's pre-quantisation latents (``quant_conv(encoder(x))``),
    L2-normalised per cell, as for Janus; queries use the L2-normalised codebook rows.
    """

    model_type = "emu3"

    def __init__(self, model, grid: tuple[int, int] | None = None):
        self.model = model
        self.vq = model.model.vqmodel
        self._grid = None if grid is None else (int(grid[0]), int(grid[1]))
        self.codebook_size = int(self.vq.config.codebook_size)
        self.embed_dim = int(self.vq.config.embed_dim)
        self.factor = int(self.vq.vision_spatial_factor)

    @property
    def grid(self) -> tuple[int, int]:
        if self._grid is None:
            raise ValueError("Emu3 chooses the image grid per call: use arrag_kernels.models.Emu3Adapter(model, "
                             "grid=(H, W)) instead of the model itself")
        return self._grid

    @property
    def image_size(self) -> int:
        if self.grid[0] != self.grid[1]:
            raise ValueError(
                f"building a database from image files needs a square grid, got {self.grid}: encode (B, 3, H*f, W*f) "
                "pixels with adapter.encode and build with PatchDatabase.from_latents"
            )
        return self.grid[0] * self.factor

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    def codebook(self) -> torch.Tensor:
        return F.normalize(self.vq.quantize.embedding.weight.detach(), p=2, dim=-1)

    def fingerprint(self) -> str:
        return codebook_fingerprint(self.vq.quantize.embedding.weight)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H*f, W*f) in [-1, 1] -> (latents (B, H, W, d) L2-normalised per cell, tokens (B, H, W)).

        The same steps as ``Emu3VQVAE.encode`` (frames repeated over the temporal factor, encoder,
        ``quant_conv``, nearest code), keeping the latent that the HF method discards.
        """
        vq = self.vq
        frames = pixels.to(self.device, vq.dtype).unsqueeze(1).repeat(1, vq.config.temporal_downsample_factor, 1, 1, 1)
        hidden = vq.encoder(frames)  # (B, t, c, h, w)
        latent = vq.quant_conv(hidden.permute(0, 2, 1, 3, 4)).permute(0, 2, 1, 3, 4)  # (B, 1, d, h, w)
        tokens = vq.quantize(latent)[:, 0]  # (B, h, w)
        return F.normalize(latent[:, 0].permute(0, 2, 3, 1).float(), p=2, dim=-1), tokens

    def logits_processor(self, db, config, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
        """A :class:`arrag_kernels.DAiDLogitsProcessor` for Emu3's ``generate`` on ``db``'s grid.

        Pass it as ``logits_processor=[...]`` with Emu3's usual ``prefix_allowed_tokens_fn`` and
        negative prompt, and ``temperature=1.0, top_k=0, top_p=1.0`` to ``generate`` (give them
        here instead: they act before the merge). The prompt's ``H*W`` must be ``db.meta.grid``.
        """
        from ..logits import DAiDLogitsProcessor

        mapping = self.model.vocabulary_mapping
        wrapper = mapping.vocab_map.get(IMAGE_WRAPPER_TOKEN)
        if wrapper is None or mapping.eol_token_id is None:
            raise ValueError(f"Emu3 vocabulary_map lacks {IMAGE_WRAPPER_TOKEN!r} or the end-of-line token '<|extra_200|>'")
        image_ids = torch.tensor([mapping.img2bpe[code] for code in range(self.codebook_size)])
        db.check_compatible(Emu3Adapter(self.model, grid=db.meta.grid))
        return DAiDLogitsProcessor(db, config, self.codebook(), image_start_token_id=wrapper, image_token_ids=image_ids,
                                   eol_token_id=mapping.eol_token_id, temperature=temperature, top_k=top_k, top_p=top_p)
