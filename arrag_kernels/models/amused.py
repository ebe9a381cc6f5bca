"""Adapter for diffusers' ``AmusedPipeline`` (aMUSEd: MaskGIT-style masked generation over a VQ token grid):
its VQ tokenizer and the facts DAiD needs inside the pipeline's own call.

The pipeline holds a ``VQModel`` (``vqvae``), a CLIP text encoder, a ``UVit2DModel`` (``transformer``) and an
``AmusedScheduler``. Each of its ``num_inference_steps`` steps runs the transformer on the partly known
token grid (``mask_token_id`` at unknown cells), combines the two CFG halves and calls
``scheduler.step(logits (B, V, H, W), timestep, grid (B, H, W), generator=...)``, which draws a token at
every unknown cell from ``softmax(logits)`` (``torch.multinomial`` with the call's generator), keeps the
most confident draws and masks the rest again. That step is where the paper's masked DAiD fits
(AR-RAG appendix B.2, the library's :mod:`arrag_kernels.masked`): :func:`arrag_kernels.patch_model`
replaces ``step`` on the pipeline's scheduler instance (``patch_target``) by one that merges
``(1 - lam) softmax(l) + lam p_ret`` at the unknown cells (8-neighbour queries of the known cells, one
search per step) and hands the log of it to the scheduler's own ``step``; the pipeline call (prompts,
``num_images_per_prompt``, ``guidance_scale``, ``generator``, ``output_type``, callbacks) is unchanged.
Steps ``t >= ceil(start_fraction * T)`` retrieve (default 0.5, the paper's final half, as
:class:`arrag_kernels.masked.MaskedDecodeConfig`); register ``lambda p: AmusedAdapter(p, start_fraction=...)``
for another gate.

Tokenizer: the VQ model's encoder and ``quant_conv`` give the pre-quantisation latents (database keys,
L2-normalised per cell); the code is the nearest raw codebook row (as ``VectorQuantizer``); queries use
the L2-normalised codebook rows. aMUSEd's VQ reads and writes pixels in [0, 1] (the pipeline's image
processor does not normalise); :meth:`encode` takes the library's [-1, 1] and maps them. The grid is the
pipeline's default, ``transformer.config.sample_size`` tokens per side (``vae_scale_factor`` pixels per
token); a call at another ``height`` / ``width`` is refused while patched.

FAiD is refused (``NO_LOOP_REASON``): UVit2DModel's transformer layers would take the blend (a hook on each
``BasicTransformerBlock``'s ``norm1`` output and ``attn1`` output, one cell per token when the model does not
``downsample``), but the library's masked FAiD reaches a model through
:class:`arrag_kernels.masked.MaskedGenerator` (``logits(tokens, condition, hook)`` with one condition
tensor, for training and decoding), which aMUSEd's three conditioning inputs (pooled text embedding, text
hidden states, micro-conditions) and the pipeline-owned forward do not fit without a generator wrapper
that does not exist yet; no FAiD blenders exist for aMUSEd either.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import VQCodebook

NO_LOOP_REASON = ("aMUSEd generates in diffusers' AmusedPipeline call (DAiD joins its scheduler step): the library's "
                  "decode loops are autoregressive, and its masked FAiD needs a MaskedGenerator forward that the "
                  "pipeline's UVit2DModel call (three conditioning inputs) does not provide; no FAiD blenders exist "
                  "for aMUSEd")


class AmusedAdapter(VQCodebook):
    """The :class:`~arrag_kernels.models.ImageTokenizer` side of a diffusers ``AmusedPipeline`` and the facts
    of its sampler step (:class:`~arrag_kernels.models.PipelineAdapter`); retrieval at the steps
    ``t >= ceil(start_fraction * T)`` of a ``T``-step call."""

    model_type = "AmusedPipeline"  # a diffusers pipeline is registered by its class name
    generate_mode = "pipeline"  # patch_model wraps the pipeline's scheduler step (see arrag_kernels.patching)
    no_loop_reason = NO_LOOP_REASON

    def __init__(self, pipeline, start_fraction: float = 0.5):
        parts = [name for name in ("vqvae", "transformer", "scheduler") if getattr(pipeline, name, None) is None]
        if parts:
            raise ValueError(f"AmusedAdapter: the pipeline has no {', '.join(parts)}; expected a diffusers "
                             "AmusedPipeline with vqvae, transformer and scheduler")
        if isinstance(start_fraction, bool) or not isinstance(start_fraction, (int, float)) or \
                not 0.0 <= start_fraction <= 1.0:
            raise ValueError(f"start_fraction: expected a fraction in [0, 1] of the steps before retrieval starts, "
                             f"got {start_fraction!r}")
        self.pipeline = pipeline
        self.vq = pipeline.vqvae
        self.transformer = pipeline.transformer
        self.scheduler = pipeline.scheduler
        self.start_fraction = float(start_fraction)
        self.codebook_size = int(self.transformer.config.codebook_size)
        codes = int(self.vq.quantize.embedding.weight.shape[0])
        if codes != self.codebook_size:
            raise ValueError(f"AmusedAdapter: the VQ codebook has {codes} codes but the transformer predicts "
                             f"{self.codebook_size}; the pipeline's parts do not belong together")
        self.mask_token_id = int(self.scheduler.config.mask_token_id)
        if 0 <= self.mask_token_id < self.codebook_size:
            raise ValueError(f"AmusedAdapter: mask_token_id {self.mask_token_id} is a code of the {self.codebook_size}-"
                             "code VQ; the scheduler's mask id must lie outside the codebook")
        self.embed_dim = int(self.vq.quantize.embedding.weight.shape[1])
        self.pixels_per_token = int(pipeline.vae_scale_factor)
        side = int(self.transformer.config.sample_size)
        self.grid = (side, side)
        self.image_size = side * self.pixels_per_token

    @property
    def device(self) -> torch.device:
        """Where the logits are (the transformer), so where DAiD retrieves."""
        return self.transformer.device

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) in [-1, 1] -> (latents (B, H, W, d) L2-normalised per cell, tokens (B, H, W)):
        ``VQModel.encode`` of the [0, 1] pixels aMUSEd's VQ expects, and its quantizer's nearest codes."""
        vq = self.vq
        latent = vq.encode(((pixels + 1) / 2).to(vq.device, vq.dtype)).latents  # (B, d, H, W) after quant_conv
        cells = latent.permute(0, 2, 3, 1)
        tokens = self.nearest_codes(cells.reshape(-1, cells.shape[-1])).view(cells.shape[:3])
        return F.normalize(cells.float(), p=2, dim=-1), tokens

    def patch_target(self):
        """The scheduler's ``step``: ``step(logits, timestep, grid, ...)`` samples the unknown cells of ``grid``
        from ``softmax(logits)``; logits (B, V, H, W) with a (B, H, W) grid, or (B, H*W, V) with (B, H*W)."""
        return self.scheduler, "step"

    def step_index(self, timestep) -> tuple[int, int]:
        """(t, T): the 0-based index of ``timestep`` among the call's ``scheduler.timesteps`` and their number."""
        timesteps = self.scheduler.timesteps
        if timesteps is None:
            raise ValueError("the aMUSEd scheduler has no timesteps: call scheduler.set_timesteps (the pipeline does)")
        at = (timesteps == torch.as_tensor(timestep, device=timesteps.device)).nonzero().flatten().tolist()
        if len(at) != 1:
            raise ValueError(f"timestep {timestep!r} is not one of the scheduler's timesteps {timesteps.tolist()}")
        return at[0], len(timesteps)
