"""The dynamic decode loop: HF's growing KV cache and random stream, one :class:`DecodeStep` per token.

Per step (see :mod:`.step`): language-model step on the new input (2B rows: conditional then
unconditional), image head, logits processing (CFG combine, temperature, ...: B rows), softmax, DAiD
merge at retrieval steps, sample or argmax, next-input embedding of the sampled token for both CFG rows.
"""

from __future__ import annotations

from typing import Callable

import torch

from .step import DecodeStats, DecodeStep, MultinomialSelect, timing


def progress_range(n: int, start: int = 0, progress: bool = False):
    """``range(start, n)``, wrapped in a tqdm bar over all ``n`` steps when ``progress``."""
    if not progress:
        return range(start, n)
    from tqdm.auto import tqdm

    return tqdm(range(start, n), desc="decoding image tokens", unit="tok", initial=start, total=n)


@torch.no_grad()
def decode_image_tokens(
    decoder,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    num_tokens: int,
    process_logits: Callable[[torch.Tensor], torch.Tensor],
    do_sample: bool,
    daid=None,
    faid=None,
    stats: DecodeStats | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Generate ``num_tokens`` image tokens per image.

    Args:
        decoder: an :class:`arrag_kernels.models.ImageDecoder` (e.g. ``JanusAdapter``).
        inputs_embeds: (2B, S, D) prompt embeddings, conditional rows first.
        attention_mask: (2B, S) prompt attention mask.
        num_tokens: tokens to generate per image (H * W).
        process_logits: (2B, V) raw head logits -> (B, V) processed logits (CFG, temperature, ...).
        do_sample: sample with ``torch.multinomial`` (uses the global RNG, like HF) or take the argmax.
        daid: optional :class:`arrag_kernels.decoding.DAiDSampler`.
        faid: optional FAiD step state; ``faid.begin_step(tokens, step)`` runs before the model step
            that predicts token ``step`` (its retrieval needs only tokens < step), so the state is
            ready when the decoder-layer hooks fire.
        stats: if given, filled with per-step timings (synchronises the device every step).

    Returns:
        (B, num_tokens) int64 token ids in raster order.
    """
    device = inputs_embeds.device
    batch = inputs_embeds.shape[0] // 2
    cache = decoder.new_cache()
    tokens = torch.full((batch, num_tokens), -1, dtype=torch.long, device=device)
    embeds, mask = inputs_embeds, attention_mask
    new_column = attention_mask.new_ones(attention_mask.shape[0], 1)
    decode_step = DecodeStep(decoder, MultinomialSelect(process_logits, do_sample, daid, stats), faid)
    for step in progress_range(num_tokens, progress=progress):
        with timing(stats, "step", device):
            embeds = decode_step(tokens, step, embeds, mask, cache)
            mask = torch.cat([mask, new_column], dim=1)
    return tokens
