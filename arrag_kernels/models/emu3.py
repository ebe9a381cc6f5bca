"""Adapter for Hugging Face ``Emu3ForConditionalGeneration``: its VQ tokenizer and its image stream's vocabulary ids.

Emu3 generates images with its ordinary ``generate``: image tokens live in the text vocabulary
(``vocabulary_mapping.img2bpe``), every row of ``W`` image tokens is followed by an end-of-line
token, the grid is chosen per call (the prompt ends with ``<|image start|>H*W<|image token|>``),
CFG comes from a negative prompt through HF's ``UnbatchedClassifierFreeGuidanceLogitsProcessor``
and ``prefix_allowed_tokens_fn`` enforces the layout. DAiD therefore joins as a logits processor
(:class:`arrag_kernels.DAiDLogitsProcessor`, built from :meth:`Emu3Adapter.image_stream`) that runs
after that CFG processor inside Emu3's own ``generate``: ``patch_model`` adds it to each
image-generation call (``generate_mode``, grid from the prompt: :meth:`Emu3Adapter.generation_grid`).
The library's decode loops (static, CUDA graph) and FAiD do not apply (``NO_LOOP_REASON``).
"""

from __future__ import annotations

import re
from functools import cached_property

import torch
import torch.nn.functional as F

from .base import ImageStream, MemberUnavailable, VQCodebook

IMAGE_WRAPPER_TOKEN = "<|image token|>"  # the image stream starts after it (see Emu3Processor)
IMAGE_START_TOKEN = "<|image start|>"  # an image-generation prompt ends with <|image start|>H*W<|image token|>
NO_LOOP_REASON = ("Emu3 decodes images in its own HF generate (DAiD joins it as a logits processor): the library's "
                  "decode loops (static, CUDA graph, FAiD's) do not handle its end-of-line tokens or per-call grid, "
                  "and no FAiD blenders exist for Emu3")


class Emu3Adapter(VQCodebook):
    """The :class:`ImageTokenizer` side of a HF Emu3 model for a grid ``(H, W)`` (Emu3 picks it per call).

    Database keys are the VQ encoder's pre-quantisation latents (``quant_conv(encoder(x))``),
    L2-normalised per cell, as for Janus; queries use the L2-normalised codebook rows.
    """

    model_type = "emu3"
    generate_mode = "logits_processor"  # patch_model wraps Emu3's own generate (see arrag_kernels.patching)
    no_loop_reason = NO_LOOP_REASON

    def __init__(self, model, grid: tuple[int, int] | None = None):
        self.model = model
        self.vq = model.model.vqmodel
        self._grid = None if grid is None else (int(grid[0]), int(grid[1]))
        self.codebook_size = int(self.vq.config.codebook_size)
        self.embed_dim = int(self.vq.config.embed_dim)
        self.pixels_per_token = int(self.vq.vision_spatial_factor)

    def at_grid(self, grid: tuple[int, int]) -> "Emu3Adapter":
        """This model's tokenizer for a grid of ``(H, W)`` tokens (:class:`arrag_kernels.models.GridPerCall`)."""
        return Emu3Adapter(self.model, grid=grid)

    @property
    def grid(self) -> tuple[int, int]:
        if self._grid is None:
            raise MemberUnavailable("Emu3 chooses the image grid per call: use arrag_kernels.models.Emu3Adapter(model, "
                                    "grid=(H, W)) instead of the model itself")
        return self._grid

    @property
    def image_size(self) -> int:
        if self.grid[0] != self.grid[1]:
            raise MemberUnavailable(
                f"building a database from image files needs a square grid, got {self.grid}: encode (B, 3, H*f, W*f) "
                "pixels with adapter.encode and build with PatchDatabase.from_latents"
            )
        return self.grid[0] * self.pixels_per_token

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

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
        cells = latent[:, 0].permute(0, 2, 3, 1)  # (B, h, w, d)
        tokens = self.nearest_codes(cells.reshape(-1, cells.shape[-1])).view(cells.shape[:3])
        return F.normalize(cells.float(), p=2, dim=-1), tokens

    def image_stream(self, **generate_kwargs) -> ImageStream:
        """Emu3's image stream: it starts after ``<|image token|>``, codes map through
        ``vocabulary_mapping.img2bpe``, every row ends with the end-of-line token."""
        mapping = self.model.vocabulary_mapping
        wrapper = mapping.vocab_map.get(IMAGE_WRAPPER_TOKEN)
        if wrapper is None or mapping.eol_token_id is None:
            raise ValueError(f"Emu3 vocabulary_map lacks {IMAGE_WRAPPER_TOKEN!r} or the end-of-line token '<|extra_200|>'")
        img2bpe = mapping.img2bpe
        missing = [code for code in range(self.codebook_size) if code not in img2bpe]
        if missing:
            shown = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
            raise ValueError(
                f"Emu3 vocabulary_map names {len(img2bpe)} visual tokens but the VQ codebook has {self.codebook_size} "
                f"codes: no '<|visual tokenNNNNNN|>' entry for {len(missing)} of codes 0..{self.codebook_size - 1} "
                f"(first: {shown}); the vocabulary must name one visual token per code (check config.vocabulary_map "
                "against vq_config.codebook_size)")
        code_ids = torch.tensor([img2bpe[code] for code in range(self.codebook_size)])
        return ImageStream(wrapper, code_ids, mapping.eol_token_id)

    @cached_property
    def _id_to_token(self) -> dict[int, str]:
        return {i: t for t, i in self.model.vocabulary_mapping.vocab_map.items()}

    def generation_grid(self, input_ids: torch.Tensor | None, grid: tuple[int, int] | None = None, **generate_kwargs):
        """The (H, W) an image-generation call asks for, or None for any other call (text, image understanding).

        An image-generation prompt ends with ``<|image start|>H*W<|image token|>`` in every row (what
        ``Emu3Processor(..., return_for_image_generation=True)`` writes); ``H*W`` is read back through
        the vocabulary map unless ``grid`` is given.
        """
        vocab = self.model.vocabulary_mapping.vocab_map
        wrapper, start = vocab.get(IMAGE_WRAPPER_TOKEN), vocab.get(IMAGE_START_TOKEN)
        is_image_call = input_ids is not None and input_ids.dim() == 2 and input_ids.shape[1] > 0
        if not (is_image_call and bool((input_ids[:, -1] == wrapper).all())):
            if grid is not None:
                raise ValueError(f"grid={grid!r} was given but the prompt ids do not end with {IMAGE_WRAPPER_TOKEN!r} in "
                                 "every row (an Emu3 image-generation prompt); drop grid= for other calls")
            return None
        if grid is not None:
            if len(grid) != 2 or not all(isinstance(g, int) and g > 0 for g in grid):
                raise ValueError(f"grid: expected (H, W) positive ints, got {grid!r}")
            return tuple(grid)
        sizes = set()
        for row in input_ids.tolist():
            begin = max((i for i, t in enumerate(row) if t == start), default=None)
            text = None if begin is None else "".join(self._id_to_token.get(t, "?") for t in row[begin + 1:-1])
            match = None if text is None else re.fullmatch(r"(\d+)\*(\d+)", text)
            if match is None:
                raise ValueError(f"cannot read the image size from the prompt (expected {IMAGE_START_TOKEN}H*W"
                                 f"{IMAGE_WRAPPER_TOKEN} at its end, got {text!r}); pass grid=(H, W) to generate")
            sizes.add((int(match[1]), int(match[2])))
        if len(sizes) != 1:
            raise ValueError(f"the prompts ask for different image sizes {sorted(sizes)}; generate one size per call")
        return sizes.pop()
