"""Adapter for diffusers' ``AmusedPipeline`` (aMUSEd: MaskGIT-style masked generation over a VQ token grid):
its VQ tokenizer, the facts DAiD needs inside the pipeline's own call, and its transformer as a masked
generator for the library's masked loop (DAiD and FAiD).

The pipeline holds a ``VQModel`` (``vqvae``), a CLIP text encoder, a ``UVit2DModel`` (``transformer``) and an
``AmusedScheduler``. Each of its ``num_inference_steps`` steps runs the transformer on the partly known
token grid (``mask_token_id`` at unknown cells), combines the two CFG halves and calls
``scheduler.step(logits (B, V, H, W), timestep, grid (B, H, W), generator=...)``, which draws a token at
every unknown cell from ``softmax(logits)`` (``torch.multinomial`` with the call's generator), keeps the
most confident draws and masks the rest again. That step is where the paper's masked DAiD fits
(AR-RAG appendix B.2, the library's :mod:`arrag_kernels.masked`): :func:`arrag_kernels.patch_model`
replaces ``step`` on the pipeline's scheduler instance (``patch_target``) by one that merges
``(1 - lam) softmax(l) + lam p_ret`` at the unknown cells whose neighbourhood is partly known
(8-neighbour queries of the known cells, one search per step) and hands logits of it to the scheduler's
own ``step`` (with ``lam = 0`` exactly the given logits, so exactly the unpatched tokens); the pipeline
call (prompts, ``num_images_per_prompt``, ``guidance_scale``, ``generator``, ``output_type``, callbacks) is
unchanged.
Steps ``t >= ceil(start_fraction * T)`` retrieve (default 0.5, the paper's final half, as
:class:`arrag_kernels.masked.MaskedDecodeConfig`); register ``lambda p: AmusedAdapter(p, start_fraction=...)``
for another gate. Retrieval runs where the transformer is at patching time: move the pipeline first.

Tokenizer: the VQ model's encoder and ``quant_conv`` give the pre-quantisation latents (database keys,
L2-normalised per cell); the code is the nearest raw codebook row (as ``VectorQuantizer``); queries use
the L2-normalised codebook rows. aMUSEd's VQ reads and writes pixels in [0, 1] (the pipeline's image
processor does not normalise); :meth:`encode` takes the library's [-1, 1] and maps them. The grid is the
pipeline's default, ``transformer.config.sample_size`` tokens per side (``vae_scale_factor`` pixels per
token); a call at another ``height`` / ``width`` is refused while patched.

The adapter is also a :class:`arrag_kernels.masked.MaskedGenerator` (``logits(tokens, prompt_ids, hook)``:
one transformer forward as a pipeline step runs it, CFG with ``guidance_scale``), so the library's masked
loop runs aMUSEd's transformer with DAiD and FAiD: ``masked_decode(AmusedAdapter(pipe, guidance_scale=w),
adapter.encode_prompts(prompts), MaskedDecodeConfig(...), daid=MaskedDAiD(...), faid=MaskedFAiD(...))``
(that loop's cosine schedule and sampler, not the scheduler's), and ``train_masked_faid`` trains blenders
for it. FAiD reaches the model through forward hooks on every ``BasicTransformerBlock`` of
``UVit2DModel.transformer_layers``: ``norm1``'s output (the layer's normalised input, one cell per token)
is the blender's context, and the blend joins ``attn1``'s output (the residual after self-attention,
before cross-attention and the FFN), on the conditional rows only. Models with ``downsample=True`` run
those layers on a 2x coarser grid and are refused. FAiD inside the pipeline's own call is refused
(``NO_LOOP_REASON``): the pipeline calls ``UVit2DModel`` with neither the step (the retrieval gate) nor
whether its batch is CFG-doubled ([uncond; cond] rows look like a batch of twice the images: at the
first step both are all-masked grids), and the blend needs both; no FAiD blenders are released for aMUSEd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import VQCodebook

NO_LOOP_REASON = ("aMUSEd samples in diffusers' AmusedPipeline call, which DAiD joins through the scheduler step; "
                  "FAiD cannot join that call (UVit2DModel's forward receives neither the step nor whether its batch "
                  "is CFG-doubled): run FAiD in the library's masked loop, arrag_kernels.masked.masked_decode("
                  "AmusedAdapter(pipeline, guidance_scale=...), ...) with a MaskedFAiD; the autoregressive loops do "
                  "not apply")


class AmusedAdapter(VQCodebook):
    """The :class:`~arrag_kernels.models.ImageTokenizer` side of a diffusers ``AmusedPipeline``, the facts of its
    sampler step (:class:`~arrag_kernels.models.PipelineAdapter`; retrieval at the steps
    ``t >= ceil(start_fraction * T)`` of a ``T``-step call) and a :class:`~arrag_kernels.masked.MaskedGenerator`
    of its transformer for the library's masked loop (classifier-free guidance ``guidance_scale``, None: none;
    the pipeline call keeps its own ``guidance_scale`` argument)."""

    model_type = "AmusedPipeline"  # a diffusers pipeline is registered by its class name
    generate_mode = "pipeline"  # patch_model wraps the pipeline's scheduler step (see arrag_kernels.patching)
    no_loop_reason = NO_LOOP_REASON

    def __init__(self, pipeline, start_fraction: float = 0.5, guidance_scale: float | None = None):
        parts = [name for name in ("vqvae", "transformer", "scheduler") if getattr(pipeline, name, None) is None]
        if parts:
            raise ValueError(f"AmusedAdapter: the pipeline has no {', '.join(parts)}; expected a diffusers "
                             "AmusedPipeline with vqvae, transformer and scheduler")
        if isinstance(start_fraction, bool) or not isinstance(start_fraction, (int, float)) or \
                not 0.0 <= start_fraction <= 1.0:
            raise ValueError(f"start_fraction: expected a fraction in [0, 1] of the steps before retrieval starts, "
                             f"got {start_fraction!r}")
        if guidance_scale is not None and not (isinstance(guidance_scale, (int, float)) and guidance_scale > 0):
            raise ValueError(f"guidance_scale: expected a CFG weight > 0 or None (no guidance), got {guidance_scale!r}")
        self.pipeline = pipeline
        self.guidance_scale = guidance_scale
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
        self.hidden_size = int(self.transformer.config.hidden_size)
        self.num_layers = len(self.transformer.transformer_layers)

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

    # ---- the MaskedGenerator side: aMUSEd's transformer in the library's masked loop (DAiD and FAiD) ------
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """(B, L) CLIP token ids of ``prompts`` as the pipeline tokenises them: the ``condition`` of :meth:`logits`."""
        tokenizer = self.pipeline.tokenizer
        return tokenizer(list(prompts), return_tensors="pt", padding="max_length", truncation=True,
                         max_length=tokenizer.model_max_length).input_ids.to(self.device)

    def _text_conditions(self, prompt_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled text embedding, penultimate hidden states) of CLIP token ids, as the pipeline computes them."""
        out = self.pipeline.text_encoder(prompt_ids.to(self.device), return_dict=True, output_hidden_states=True)
        return out.text_embeds, out.hidden_states[-2]

    def logits(self, tokens: torch.Tensor, condition: torch.Tensor, hook=None) -> torch.Tensor:
        """(B, H*W) ids (-1 unknown) and prompt ids ``condition`` (B, L) (:meth:`encode_prompts`) -> (B, H*W, V)
        logits: one ``UVit2DModel`` forward as a pipeline step runs it (default micro-conditions: the image
        size, crop (0, 0), aesthetic score 6). With ``guidance_scale`` w: ``l_u + w (l_c - l_u)``, the empty
        prompt unconditional, both in one doubled batch. ``hook(i, normed)`` (FAiD) sees layer i's ``norm1``
        output of the conditional rows and its result joins ``attn1``'s output (the residual after
        self-attention, before cross-attention and the FFN)."""
        B, N = tokens.shape
        if N != self.grid[0] * self.grid[1]:
            raise ValueError(f"tokens: expected (B, {self.grid[0] * self.grid[1]}) for the {self.grid} grid, got "
                             f"{tuple(tokens.shape)}")
        ids = condition
        if self.guidance_scale is not None:
            ids = torch.cat([self.encode_prompts([""]).expand(B, -1), condition.to(self.device)])
        pooled, hidden = self._text_conditions(ids)
        rows = ids.shape[0]
        grid = torch.where(tokens < 0, self.mask_token_id, tokens).view(B, *self.grid).repeat(rows // B, 1, 1)
        micro = torch.tensor([self.image_size, self.image_size, 0, 0, 6], device=self.device, dtype=hidden.dtype)
        handles = [] if hook is None else self._install_layer_hooks(hook, first_row=rows - B)
        try:
            out = self.transformer(grid.to(self.device), micro_conds=micro.expand(rows, -1), pooled_text_emb=pooled,
                                   encoder_hidden_states=hidden)
        finally:
            for handle in handles:
                handle.remove()
        out = out.flatten(2).transpose(1, 2)  # (rows, H*W, V)
        if self.guidance_scale is None:
            return out
        uncond, cond = out.chunk(2)
        return uncond + self.guidance_scale * (cond - uncond)

    def _install_layer_hooks(self, hook, first_row: int) -> list:
        """Forward hooks on every transformer layer: ``norm1``'s output (rows ``first_row:``, the conditional
        ones) goes to ``hook``, whose result is added to ``attn1``'s output on those rows."""
        if self.transformer.config.downsample:
            raise ValueError("FAiD needs one transformer cell per token, but this UVit2DModel downsamples the grid "
                             "2x before its transformer layers (config.downsample=True)")
        handles, normed = [], {}
        for i, layer in enumerate(self.transformer.transformer_layers):
            def keep(module, args, output, i=i):
                normed[i] = output[first_row:]

            def add(module, args, output, i=i):
                extra = hook(i, normed.pop(i))
                if extra is None:
                    return None
                return output + F.pad(extra.to(output.dtype), (0, 0, 0, 0, first_row, 0))

            handles += [layer.norm1.register_forward_hook(keep), layer.attn1.register_forward_hook(add)]
        return handles

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """(...,) code ids -> (..., hidden_size): what a retrieved token feeds FAiD, the transformer's per-cell
        input path (embedding, RMSNorm, 1x1 conv, RMSNorm, projection to the layers' width) without the
        convolution / attention blocks between them, which mix neighbouring cells."""
        t = self.transformer
        x = t.embed.layer_norm(t.embed.embeddings(ids))
        x = F.linear(x, t.embed.conv.weight[:, :, 0, 0], t.embed.conv.bias)
        return t.project_to_hidden(t.project_to_hidden_norm(x))
