"""Adapter for Hugging Face ``ImageGPTForCausalImageModeling``: its colour clusters and its image stream.

ImageGPT generates an image with its ordinary ``generate``: the prompt is the start-of-sequence
token (id ``vocab_size - 1``, optionally followed by the first codes of an image to complete), then
``H * W`` codes follow in raster order, each the index of one of the colour clusters (512 RGB colours
in [-1, 1] for the released models); the head scores codes only, and there is no CFG. DAiD therefore
joins as a logits processor in that ``generate`` (:class:`arrag_kernels.DAiDLogitsProcessor`, through
``patch_model``), as for Emu3; the library's decode loops and FAiD do not apply (``NO_LOOP_REASON``).

The "VQ tokenizer" is colour quantisation: one pixel per token, the nearest cluster. The clusters
are not part of the model's weights but of its image processor (``ImageGPTImageProcessor.clusters``):
give them as ``ImageGPTAdapter(model, clusters)``, or store them on the model's config once,
``model.config.clusters = processor.clusters.tolist()`` (saved with the checkpoint), so that the
registered adapter (``patch_model``, ``PatchDatabase.build(images, model)``) finds them.
"""

from __future__ import annotations

import math

import torch

from .base import ImageStream, codebook_fingerprint

NO_LOOP_REASON = ("ImageGPT decodes images in its own HF generate (DAiD joins it as a logits processor): the library's "
                  "decode loops (static, CUDA graph, FAiD's) are written for CFG-doubled Janus-style decoders, and no "
                  "FAiD blenders exist for ImageGPT")


class ImageGPTAdapter:
    """The :class:`ImageTokenizer` side and the image stream of a HF ImageGPT model.

    Codebook rows and database latents are colours in [-1, 1], used as they are (not L2-normalised,
    unlike VQ adapters): the tokenizer measures plain Euclidean distance in colour space, and
    normalising would merge every shade of one hue. Keys from images (``key_source="latent"``) are
    the pixels' own colours; from tokens (``"codebook"``), their clusters' colours.
    """

    model_type = "imagegpt"
    generate_mode = "logits_processor"  # patch_model wraps ImageGPT's own generate (see arrag_kernels.patching)
    no_loop_reason = NO_LOOP_REASON
    pixels_per_token = 1

    def __init__(self, model, clusters=None):
        self.model = model
        config = model.config
        if clusters is None:
            clusters = getattr(config, "clusters", None)
        self.codebook_size = int(config.vocab_size) - 1  # the last id is the start-of-sequence token
        self.start_token_id = self.codebook_size
        side = math.isqrt(int(config.n_positions))
        if side * side != config.n_positions:
            raise ValueError(f"ImageGPT config.n_positions = {config.n_positions} is not a square number of pixels")
        self.grid = (side, side)
        self.image_size = side
        self.embed_dim = 3
        self._clusters = None if clusters is None else torch.as_tensor(clusters, dtype=torch.float32).reshape(-1, 3)
        if self._clusters is not None and len(self._clusters) != self.codebook_size:
            raise ValueError(f"clusters: expected ({self.codebook_size}, 3) colours (config.vocab_size - 1), "
                             f"got {tuple(torch.as_tensor(clusters).shape)}")

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    def codebook(self) -> torch.Tensor:
        """(V, 3) the colour clusters in [-1, 1]."""
        if self._clusters is None:
            raise ValueError("ImageGPT's colour clusters are not in the model: pass ImageGPTAdapter(model, clusters=processor"
                             ".clusters) or set model.config.clusters = processor.clusters.tolist() once")
        return self._clusters.to(self.device)

    def fingerprint(self) -> str:
        return codebook_fingerprint(self.codebook())

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) in [-1, 1] -> (colours (B, S, S, 3), nearest-cluster ids (B, S, S)): what
        ``ImageGPTImageProcessor`` computes (squared distance, first minimum)."""
        cells = pixels.to(self.device, torch.float32).permute(0, 2, 3, 1)
        clusters = self.codebook()
        distances = (cells.reshape(-1, 3)[:, None, :] - clusters[None]).pow(2).sum(-1)  # (B*S*S, V), V = 512
        return cells, distances.argmin(-1).view(cells.shape[:3])

    def image_stream(self, **generate_kwargs) -> ImageStream:
        """The codes follow the start token; code id == vocabulary id; no end-of-line tokens."""
        return ImageStream(self.start_token_id, torch.arange(self.codebook_size), None)

    def generation_grid(self, input_ids: torch.Tensor | None, grid: tuple[int, int] | None = None, **generate_kwargs):
        """The model's grid for a call whose every row starts with the start token (every ImageGPT image
        call, from scratch or completing a prefix), None otherwise."""
        if input_ids is None or input_ids.dim() != 2 or input_ids.shape[1] == 0 or \
                not bool((input_ids[:, 0] == self.start_token_id).all()):
            if grid is not None:
                raise ValueError(f"grid={grid!r} was given but the prompt ids do not start with ImageGPT's start token "
                                 f"{self.start_token_id} in every row; drop grid= for other calls")
            return None
        if grid is not None and tuple(grid) != self.grid:
            raise ValueError(f"grid: ImageGPT generates its fixed {self.grid[0]}x{self.grid[1]} grid "
                             f"(config.n_positions), got {grid!r}")
        return self.grid
