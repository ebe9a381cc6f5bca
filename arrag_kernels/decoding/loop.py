"""The KV-cached image-token decode loop with CFG and optional DAiD.

Per step: language-model step on the new input (2B rows: conditional then unconditional),
image head, logits processing (CFG combine, temperature, ...: B rows), softmax, DAiD merge at
retrieval steps, sample or argmax, next-input embedding of the sampled token for both CFG rows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class DecodeStats:
    """Wall-clock split of one decode (filled only when timing is requested)."""

    steps: int = 0
    total_s: float = 0.0
    retrieval_s: float = 0.0  # query + search + merge, inside total_s
    retrieval_steps: int = 0
    step_s: list = field(default_factory=list)

    @property
    def retrieval_fraction(self) -> float:
        return self.retrieval_s / self.total_s if self.total_s else 0.0

    def summary(self) -> str:
        ms = 1e3 * self.total_s / max(self.steps, 1)
        return (
            f"{self.steps} steps, {ms:.2f} ms/step, retrieval {1e3 * self.retrieval_s:.1f} ms over "
            f"{self.retrieval_steps} steps ({100 * self.retrieval_fraction:.1f}% of decode time)"
        )


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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

    steps = range(num_tokens)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="decoding image tokens", unit="tok")
    for step in steps:
        if stats is not None:
            _sync(device)
            t0 = time.perf_counter()
        if faid is not None:
            faid.begin_step(tokens, step)
        hidden = decoder.step(embeds, mask, cache)
        scores = process_logits(decoder.image_logits(hidden))
        if daid is not None and daid.retrieves_at[step]:
            if stats is not None:
                _sync(device)
                t1 = time.perf_counter()
            probs = daid.merge(torch.softmax(scores, dim=-1), tokens, step)
            if stats is not None:
                _sync(device)
                stats.retrieval_s += time.perf_counter() - t1
                stats.retrieval_steps += 1
            next_token = torch.multinomial(probs, 1).squeeze(-1) if do_sample else probs.argmax(-1)
        elif do_sample:
            next_token = torch.multinomial(torch.softmax(scores, dim=-1), 1).squeeze(-1)
        else:
            next_token = scores.argmax(-1)
        tokens[:, step] = next_token
        embeds = decoder.embed_image_tokens(torch.cat([next_token, next_token]).unsqueeze(-1))
        mask = torch.cat([mask, new_column], dim=1)
        if stats is not None:
            _sync(device)
            dt = time.perf_counter() - t0
            stats.step_s.append(dt)
            stats.total_s += dt
            stats.steps += 1
    return tokens
