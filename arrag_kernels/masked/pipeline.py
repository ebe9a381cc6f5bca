"""Masked DAiD inside a sampler step the library does not own (diffusers' ``AmusedScheduler.step``, called by
``AmusedPipeline``): what :func:`arrag_kernels.patch_model` installs for a
:class:`arrag_kernels.models.PipelineAdapter`."""

from __future__ import annotations

import functools

import torch

from .config import MaskedDecodeConfig
from .retrieval import MaskedDAiD


def step_with_daid(step, adapter, daid: MaskedDAiD):
    """``step`` (the bound function at ``adapter.patch_target()``) with masked DAiD on its logits.

    At a retrieving step (``t >= ceil(adapter.start_fraction * T)``, ``(t, T) = adapter.step_index(timestep)``)
    the logits of the unknown cells (``adapter.mask_token_id`` in the grid) with a known neighbour become logits of
    ``(1 - lam) softmax(l) + lam p_ret`` (:meth:`MaskedDAiD.merge_logits`: one search for all of them) and
    ``step`` runs on them, so the sampler draws from the merged distribution and ranks its draws by their
    merged probability; every other argument (the generator included) and every other step reach
    ``step`` unchanged. With ``lam = 0`` the logits reach ``step`` exactly as given (the search still
    runs). A grid of another size than the database's raises.
    """
    H, W = daid.grid
    mask_id = adapter.mask_token_id

    @functools.wraps(step)
    def daid_step(model_output, timestep, sample, *args, **kwargs):
        B = sample.shape[0]
        if tuple(sample.shape[1:]) not in ((H, W), (H * W,)):
            raise ValueError(f"the pipeline samples a {'x'.join(map(str, sample.shape[1:]))} token grid but the "
                             f"database was built for {H}x{W}; generate at the database's size (height and width "
                             f"{H * adapter.pixels_per_token} x {W * adapter.pixels_per_token} pixels) or patch with a "
                             "database of this size")
        t, T = adapter.step_index(timestep)
        if not MaskedDecodeConfig(steps=T, start_fraction=adapter.start_fraction).retrieves_at(t):
            return step(model_output, timestep, sample, *args, **kwargs)
        tokens = torch.where(sample == mask_id, -1, sample).reshape(B, H * W)
        spatial = model_output.dim() == 4  # (B, V, H, W), else (B, H*W, V)
        logits = model_output.flatten(2).transpose(1, 2) if spatial else model_output
        merged = daid.merge_logits(logits, tokens)
        if spatial:
            merged = merged.transpose(1, 2).reshape(model_output.shape)
        return step(merged, timestep, sample, *args, **kwargs)

    return daid_step
