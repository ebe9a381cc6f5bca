"""Adapter for Hugging Face ``GlmImageForConditionalGeneration`` (GLM-Image's autoregressive prior, the
first stage of diffusers' ``GlmImagePipeline``): its vision tokenizer, a small key source, its image stream.

GLM-Image generates with its ordinary ``generate``. A text-to-image prompt ends with the image-start
token (``config.image_start_token_id``) and the call passes ``image_grid_thw`` = [target (1, H, W),
preview (1, h, w)] per sample (``images_per_sample``): the model then writes the small preview grid,
then the target grid, code id == vocabulary id, no end-of-line tokens (image-to-image prompts carry
the source images and only the target grid is generated). DAiD joins as a logits processor
(:class:`arrag_kernels.DAiDLogitsProcessor`, through ``patch_model``) and acts on the **target grid
only**; the preview is left to the model: the target tokens are what the diffusion decoder conditions
on, a database holds one grid size (queries are neighbourhoods on it), and the preview, a different
and smaller grid, only lays out the image for the model itself. The library's decode loops and FAiD
do not apply (``NO_LOOP_REASON``).

Tokenizer: pixels go through the vision encoder (``model.model.visual``, ``patch_size`` pixels per
token) and the VQ model's ``quant_conv``; the code is the nearest L2-normalised codebook row (both
sides normalised, as ``GlmImageVQVAEVectorQuantizer``). Database images are encoded at
``patch_size`` pixels per token; a generated image has 32 pixels per target token (diffusers
upsamples the prior tokens), so an image of ``32 H x 32 W`` pixels is encoded downscaled 2x to give
the same ``H x W`` grid.

Key source: the codebook is 16384 x 2048 and L2-normalised, so hop-1 causal keys of the raw vectors
would be 4 x 2048 = 8192-d per entry (32 KiB in float32). The adapter instead exposes every vector
(codebook rows and encoder latents alike) through one fixed random orthonormal projection to
``key_dim`` dimensions (default :data:`DEFAULT_KEY_DIM`), scaled by ``sqrt(d / key_dim)`` so that
distances keep their scale (DAiD's ``tau`` acts on them). The projection is a function of
``(d, key_dim)`` alone (a seeded CPU generator), so databases and queries made anywhere agree; it is
part of the fingerprint, and ``key_dim=None`` keeps the full vectors. A fixed projection was chosen
over PCA because it needs no stored state and no decomposition that could rotate near-equal
components differently on another machine. Measured with ``scripts/glm_image_keys.py`` (a synthetic
clustered codebook of the real size, since no weights can be downloaded; held-out token grids; k =
16): 64 dimensions per cell keep the Fig. 6 accuracy at rank 1 (mean L2 to the true token 0.861
against 0.855 with full keys, 1.412 for a random token) and return 66% of the full-key neighbours,
with keys 32x smaller (1 KiB); a PCA to 64 did no better at rank 1 (0.868). Pass ``key_dim`` to
trade size for recall (256: 72%), and register ``lambda m: GlmImageAdapter(m, key_dim=...)`` for
``patch_model`` to use another width than the default.
"""

from __future__ import annotations

import math
from functools import cached_property

import torch
import torch.nn.functional as F

from ..ops import knn
from .base import ImageStream, MemberUnavailable, codebook_fingerprint

DEFAULT_KEY_DIM = 64  # per cell: hop-1 causal keys of 256 dimensions instead of 8192
PROJECTION_SEED = 23  # the fixed projection's generator seed (changing it changes every fingerprint)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # GlmImageImageProcessor's normalisation (OpenAI CLIP)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
NO_LOOP_REASON = ("GLM-Image decodes images in its own HF generate (DAiD joins it as a logits processor): the library's "
                  "decode loops (static, CUDA graph, FAiD's) do not handle its preview grid, 3-D rotary positions or "
                  "per-call grid, and no FAiD blenders exist for GLM-Image")


def key_projection(width: int, key_dim: int) -> torch.Tensor:
    """(width, key_dim) fixed random orthonormal columns scaled by sqrt(width / key_dim): a function of
    its arguments alone (seeded CPU generator, float64 QR), the same on every machine."""
    g = torch.Generator().manual_seed(PROJECTION_SEED)
    q, r = torch.linalg.qr(torch.randn(width, key_dim, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))  # a unique QR: positive diagonal of r
    return (q * math.sqrt(width / key_dim)).float()


class GlmImageAdapter:
    """The :class:`ImageTokenizer` side and the image stream of a HF GLM-Image model for a target grid
    ``(H, W)`` (GLM-Image picks it per call: without ``grid`` the adapter serves ``patch_model``, and
    ``PatchDatabase.build`` reads the grid from the images' size), with keys of ``key_dim`` dimensions
    per cell (None: the full codebook width)."""

    model_type = "glm_image"
    generate_mode = "logits_processor"  # patch_model wraps GLM-Image's own generate (see arrag_kernels.patching)
    no_loop_reason = NO_LOOP_REASON

    def __init__(self, model, grid: tuple[int, int] | None = None, key_dim: int | None = DEFAULT_KEY_DIM):
        self.model = model
        self.config = model.config
        self.vq = model.model.vqmodel
        self.visual = model.model.visual
        if self.visual.spatial_merge_size != 1:
            raise ValueError(f"GLM-Image vision spatial_merge_size = {self.visual.spatial_merge_size}: only 1 (one code "
                             "per vision patch, as the released model) is supported")
        self._grid = None if grid is None else (int(grid[0]), int(grid[1]))
        self.codebook_size = int(self.vq.config.num_embeddings)
        self.width = int(self.vq.config.embed_dim)  # the codebook's own width (2048 released)
        if key_dim is not None and not (isinstance(key_dim, int) and 1 <= key_dim):
            raise ValueError(f"key_dim: expected an int >= 1 or None (the full width {self.width}), got {key_dim!r}")
        self.key_dim = None if key_dim is None or key_dim >= self.width else key_dim
        self.embed_dim = self.width if self.key_dim is None else self.key_dim  # width of a key cell
        self.pixels_per_token = int(self.visual.patch_size)

    def at_grid(self, grid: tuple[int, int]) -> "GlmImageAdapter":
        """This model's tokenizer for a target grid of ``(H, W)`` tokens (:class:`arrag_kernels.models.GridPerCall`)."""
        return GlmImageAdapter(self.model, grid=grid, key_dim=self.key_dim)

    @property
    def grid(self) -> tuple[int, int]:
        if self._grid is None:
            raise MemberUnavailable("GLM-Image chooses the image grid per call: use arrag_kernels.models.GlmImageAdapter("
                                    "model, grid=(H, W)) instead of the model itself")
        return self._grid

    @property
    def image_size(self) -> int:
        if self.grid[0] != self.grid[1]:
            raise MemberUnavailable(
                f"building a database from image files needs a square grid, got {self.grid}: encode (B, 3, H*p, W*p) "
                "pixels with adapter.encode and build with PatchDatabase.from_latents"
            )
        return self.grid[0] * self.pixels_per_token

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @cached_property
    def _projection(self) -> torch.Tensor | None:
        return None if self.key_dim is None else key_projection(self.width, self.key_dim)

    def _keys(self, vectors: torch.Tensor) -> torch.Tensor:
        """(..., width) L2-normalised vectors -> (..., embed_dim) key cells (projected unless key_dim is None)."""
        if self._projection is None:
            return vectors
        return vectors @ self._projection.to(vectors.device)

    def _normalised_codebook(self) -> torch.Tensor:
        return F.normalize(self.vq.quantize.embedding.weight.detach().float(), p=2, dim=-1)

    def codebook(self) -> torch.Tensor:
        """(V, embed_dim) what a generated token contributes to a query: its L2-normalised codebook row,
        projected to ``key_dim``."""
        return self._keys(self._normalised_codebook())

    def fingerprint(self) -> str:
        """The raw codebook's hash, followed by the projection's when keys are projected (a database made
        with another projection, or with full keys, does not match)."""
        raw = codebook_fingerprint(self.vq.quantize.embedding.weight)
        return raw if self._projection is None else raw[:8] + codebook_fingerprint(self._projection)[:8]

    def _pack(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, h*p, w*p) in [-1, 1] -> (GlmImageImageProcessor's packed patches (B*h*w, 3*p*p), grid_thw (B, 3))."""
        B, _, height, width = pixels.shape
        p = self.pixels_per_token
        if height % p or width % p:
            raise ValueError(f"pixels: expected sides that are multiples of the {p}-pixel patch, got {height} x {width}")
        mean = torch.tensor(CLIP_MEAN, device=pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=pixels.device).view(1, 3, 1, 1)
        x = ((pixels.float() + 1) / 2 - mean) / std
        h, w = height // p, width // p
        patches = x.reshape(B, 3, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(B * h * w, 3 * p * p)
        return patches, torch.tensor([[1, h, w]] * B, device=pixels.device)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H*p, W*p) in [-1, 1] -> (key latents (B, H, W, embed_dim), tokens (B, H, W)).

        The steps of ``get_image_features`` + ``get_image_tokens`` (vision encoder, ``quant_conv``,
        nearest normalised code), keeping the normalised latent (projected like the codebook).
        """
        patches, grid_thw = self._pack(pixels.to(self.device))
        B, (h, w) = pixels.shape[0], grid_thw[0, 1:].tolist()
        hidden = self.visual(patches.to(self.visual.dtype), grid_thw=grid_thw, return_dict=True).pooler_output
        hidden = hidden.view(B, h, w, -1).permute(0, 3, 1, 2)  # (B, C, h, w), as get_image_features
        latent = F.normalize(self.vq.quant_conv(hidden).permute(0, 2, 3, 1).float(), p=2, dim=-1)  # (B, h, w, d)
        codes = knn(latent.reshape(-1, self.width), self._normalised_codebook().to(latent.device), 1)[1][:, 0]
        return self._keys(latent), codes.view(B, h, w)

    # ---- the image stream of one call -------------------------------------------------------
    def _call_layout(self, input_ids, generate_kwargs) -> tuple[tuple[int, int], int] | None:
        """((H, W) target grid, tokens generated before it) of an image-generation call, None for others.

        Per sample, ``image_grid_thw`` lists the source images' grids then the grids to generate
        (``images_per_sample`` splits it; without it every row uses all of them, as HF). The model
        generates them last to first (HF ``get_rope_index``): so the target, the first of them, comes
        after the others (t2i: the preview)."""
        thw = generate_kwargs.get("image_grid_thw")
        start = self.config.image_start_token_id
        if thw is None or input_ids is None or input_ids.dim() != 2 or input_ids.shape[1] == 0 or \
                not bool((input_ids[:, -1] == start).all()):
            return None
        per_sample = generate_kwargs.get("images_per_sample")
        thw = torch.as_tensor(thw).tolist()
        groups = ([thw] * input_ids.shape[0] if per_sample is None else
                  _split(thw, torch.as_tensor(per_sample).tolist(), input_ids.shape[0]))
        layouts = set()
        for row, grids in zip(input_ids.tolist(), groups):
            sources = row.count(self.config.image_end_token_id)  # complete images in the prompt
            if len(grids) <= sources:
                raise ValueError(f"image_grid_thw lists {len(grids)} grids for a prompt with {sources} source images: "
                                 "expected one grid to generate (image-to-image) or target + preview (text-to-image)")
            target, *before = grids[sources:]
            layouts.add(((int(target[1]), int(target[2])), sum(int(g[1]) * int(g[2]) for g in before)))
        if len(layouts) != 1:
            raise ValueError(f"the prompts ask for different image layouts {sorted(layouts)}; generate one size per call")
        return layouts.pop()

    def generation_grid(self, input_ids: torch.Tensor | None, grid: tuple[int, int] | None = None, **generate_kwargs):
        """The target (H, W) of an image-generation call (prompt rows ending with the image-start token,
        ``image_grid_thw`` given), None for any other call."""
        layout = self._call_layout(input_ids, generate_kwargs)
        if layout is None:
            if grid is not None:
                raise ValueError(f"grid={grid!r} was given but the call is no GLM-Image image generation (prompt rows "
                                 "ending with the image-start token, and image_grid_thw); drop grid= for other calls")
            return None
        if grid is not None and tuple(grid) != layout[0]:
            raise ValueError(f"grid={grid!r} disagrees with the target grid {layout[0]} of image_grid_thw")
        return layout[0]

    def image_stream(self, **generate_kwargs) -> ImageStream:
        """The codes follow the image-start token (code id == vocabulary id, no end-of-line); the target
        grid comes after the call's preview grid (``offset``: its h*w tokens; 0 for image-to-image)."""
        layout = self._call_layout(generate_kwargs.get("input_ids"), generate_kwargs)
        offset = 0 if layout is None else layout[1]
        return ImageStream(int(self.config.image_start_token_id), torch.arange(self.codebook_size), None, offset)


def _split(thw: list, per_sample: list, batch: int) -> list:
    if len(per_sample) != batch or sum(per_sample) != len(thw):
        raise ValueError(f"images_per_sample {per_sample} does not split image_grid_thw's {len(thw)} grids over "
                         f"{batch} prompts")
    out, at = [], 0
    for n in per_sample:
        out.append(thw[at:at + n])
        at += n
    return out
