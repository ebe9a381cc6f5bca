"""``MaskedDecodeConfig``: the unmasking schedule and the retrieval gate of masked decoding; the
matching random training mask."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MaskedDecodeConfig:
    """MaskGIT decoding with a cosine schedule (Chang et al. 2022; Show-o uses the same).

    Step t of T = ``steps`` starts with ``masked_counts(N)[t]`` unknown cells per image, samples a
    token at each of them from ``softmax(logits / temperature)`` (merged with DAiD when retrieving),
    scores each sample by ``log p(sampled) + choice_temperature * (1 - (t+1)/T) * gumbel`` and keeps
    the most confident ones, so that ``floor(N cos(pi/2 (t+1)/T))`` cells stay unknown (at least one
    and at most ``unknown - 1`` before the last step, none after it). Every image of a batch follows
    the same counts, so a step's unknown cells form a (B, P) block.

    Retrieval (DAiD and FAiD) runs at steps t with ``t >= ceil(start_fraction * T)``: the default
    0.5 is the paper's "final half of the decoding steps" (AR-RAG appendix B.2); 0 retrieves at
    every step, 1 never.
    """

    steps: int = 12
    start_fraction: float = 0.5
    temperature: float = 1.0
    choice_temperature: float = 4.5

    def __post_init__(self):
        if int(self.steps) < 1:
            raise ValueError(f"MaskedDecodeConfig.steps: expected >= 1 decoding steps, got {self.steps}")
        if not 0.0 <= float(self.start_fraction) <= 1.0:
            raise ValueError(f"MaskedDecodeConfig.start_fraction: expected a fraction in [0, 1], got {self.start_fraction}")
        if not float(self.temperature) > 0.0:
            raise ValueError(f"MaskedDecodeConfig.temperature: expected > 0, got {self.temperature}")
        if not float(self.choice_temperature) >= 0.0:
            raise ValueError(f"MaskedDecodeConfig.choice_temperature: expected >= 0, got {self.choice_temperature}")

    def masked_counts(self, num_cells: int) -> list[int]:
        """Unknown cells per image at the start of each step, plus 0 after the last: T + 1 ints."""
        if self.steps > num_cells:
            raise ValueError(f"MaskedDecodeConfig.steps = {self.steps} exceeds the {num_cells} cells of the grid; "
                             f"use steps <= {num_cells} (each step unmasks at least one cell)")
        counts = [num_cells]
        for t in range(self.steps):
            if t == self.steps - 1:
                counts.append(0)
                break
            left = math.floor(num_cells * math.cos(math.pi / 2 * (t + 1) / self.steps))
            counts.append(max(1, min(counts[-1] - 1, left)))
        return counts

    @property
    def first_retrieval_step(self) -> int:
        return math.ceil(float(self.start_fraction) * self.steps)

    def retrieves_at(self, step: int) -> bool:
        """Whether step ``step`` (0-based) retrieves."""
        return step >= self.first_retrieval_step

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def random_mask(tokens: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """MaskGIT training mask: per image a ratio r = cos(pi/2 u), u ~ U[0, 1), and ceil(r N) >= 1 random
    cells masked. (B, N) ids -> (B, N) bool, True = masked."""
    B, N = tokens.shape
    u = torch.rand(B, generator=generator, device=tokens.device)
    count = torch.ceil(torch.cos(math.pi / 2 * u) * N).clamp(1, N).long()
    rank = torch.rand(B, N, generator=generator, device=tokens.device).argsort(dim=1).argsort(dim=1)
    return rank < count.unsqueeze(1)
