"""Feature extractors for the Frechet distance and precision/recall.

An extractor is any callable ``(n, 3, S, S) float pixels in [-1, 1] -> (n, d) features``. Built in:

* ``EmojiClassifier``: a small CNN trained on the miniature emoji dataset (the stand-in for
  Inception here; its features only mean something for emoji-like images);
* ``load_extractor("torchscript:/path/model.pt")``: any TorchScript module the user has locally
  (e.g. an exported Inception-v3 pool3 or a CLIP image tower for FID / CMMD-style features).
  Nothing is downloaded: a missing file is an error that says so.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

Extractor = Callable[[torch.Tensor], torch.Tensor]


class EmojiClassifier(nn.Module):
    """3 conv blocks (32, 64, 128 channels, stride-2 pooling), global average pool -> 128-d features -> classes."""

    feature_dim = 128

    def __init__(self, num_classes: int):
        super().__init__()
        layers, c_in = [], 3
        for c in (32, 64, self.feature_dim):
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.GroupNorm(8, c), nn.SiLU(), nn.MaxPool2d(2)]
            c_in = c
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(self.feature_dim, num_classes)

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.body(pixels).mean(dim=(2, 3))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(pixels))


@torch.no_grad()
def extract(extractor, pixels: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Features (n, d) float64 of (n, 3, S, S) pixels with ``extractor`` (a module's ``features`` if it has one)."""
    if pixels.dim() != 4 or pixels.shape[1] != 3:
        raise ValueError(f"pixels: expected (n, 3, S, S) images in [-1, 1], got {tuple(pixels.shape)}; "
                         "HF decode_image_tokens returns (n, S, S, 3): permute(0, 3, 1, 2) first")
    fn = getattr(extractor, "features", extractor)
    return torch.cat([fn(pixels[i : i + batch_size].float()).double().cpu() for i in range(0, len(pixels), batch_size)])


def load_extractor(spec: str, classifier: nn.Module | None = None) -> Extractor:
    """``"miniature"`` (``classifier``, the trained emoji CNN) or ``"torchscript:PATH"`` (a local TorchScript file)."""
    if spec == "miniature":
        if classifier is None:
            raise ValueError("extractor 'miniature' needs the trained emoji classifier (load_miniature() returns it)")
        return classifier
    if spec.startswith("torchscript:"):
        path = Path(spec.split(":", 1)[1])
        if not path.is_file():
            raise FileNotFoundError(
                f"extractor weights {str(path)!r} not found: Inception/CLIP weights cannot be downloaded here; export "
                "the network to TorchScript on a machine that has it (torch.jit.script/trace) and pass its local path"
            )
        module = torch.jit.load(os.fspath(path), map_location="cpu").eval()
        return module
    raise ValueError(f"extractor: expected 'miniature' or 'torchscript:/path/to/model.pt', got {spec!r}")
