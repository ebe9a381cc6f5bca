"""Feature extractors for the Frechet distance and precision/recall.

An extractor is any callable ``(n, 3, S, S) float pixels in [-1, 1] -> (n, d) features``. Built in:

* ``EmojiClassifier``: a small CNN trained on the miniature emoji dataset (the stand-in for
  Inception here; its features only mean something for emoji-like images);
* ``load_extractor("torchscript:/path/model.pt")``: any TorchScript module the user has locally
  (e.g. an exported Inception-v3 pool3 or a CLIP image tower for FID / CMMD-style features).
  Nothing is downloaded: a missing file is an error that says so.

CLIP (CLIP score, CMMD): :func:`load_clip` opens a local HF CLIP directory (``CLIPModel`` +
``CLIPProcessor`` saved with ``save_pretrained``), :func:`clip_image_embeddings` embeds pixels with it.
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


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """(n, 3, S, S) pixels in [-1, 1] -> uint8 in [0, 255] (what CLIP processors and torchmetrics' Inception read)."""
    if pixels.dim() != 4 or pixels.shape[1] != 3:
        raise ValueError(f"pixels: expected (n, 3, S, S) images in [-1, 1], got {tuple(pixels.shape)}")
    return ((pixels.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


class ClipFeatures(nn.Module):
    """A local HF ``CLIPModel`` whose ``get_image_features`` / ``get_text_features`` return the projected
    embeddings as tensors. transformers 5 returns them as the ``pooler_output`` of an output object,
    which torchmetrics 1.9's CLIP score does not unwrap; ``config`` is the CLIP model's."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config

    def get_image_features(self, pixel_values):
        return self.model.get_image_features(pixel_values=pixel_values).pooler_output

    def get_text_features(self, input_ids, attention_mask=None):
        return self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output


def load_clip(path) -> tuple[ClipFeatures, object]:
    """(:class:`ClipFeatures`, ``CLIPProcessor``) from a local directory (``save_pretrained`` of both);
    nothing is downloaded."""
    from transformers import CLIPModel, CLIPProcessor

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"CLIP directory {str(path)!r} has no config.json: CLIP weights cannot be downloaded here; save "
            "CLIPModel and CLIPProcessor with save_pretrained(DIR) on a machine that has them and pass DIR"
        )
    model = CLIPModel.from_pretrained(path, local_files_only=True).eval()
    return ClipFeatures(model), CLIPProcessor.from_pretrained(path, local_files_only=True)


@torch.no_grad()
def clip_image_embeddings(pixels: torch.Tensor, clip, batch_size: int = 64) -> torch.Tensor:
    """(n, d) float64 L2-normalised CLIP image embeddings of (n, 3, S, S) pixels in [-1, 1]; ``clip`` is
    what :func:`load_clip` returns (or a directory for it)."""
    model, processor = load_clip(clip) if isinstance(clip, (str, os.PathLike)) else clip
    images = to_uint8(pixels)
    out = []
    for i in range(0, len(images), batch_size):
        batch = processor(images=list(images[i : i + batch_size]), return_tensors="pt")["pixel_values"]
        out.append(model.get_image_features(batch.to(model.model.device)).double().cpu())
    emb = torch.cat(out)
    return emb / emb.norm(dim=-1, keepdim=True)
