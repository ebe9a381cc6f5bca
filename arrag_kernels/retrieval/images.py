"""Image inputs for database building: a folder, a list of paths / PIL images, or a tensor."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Sequence

import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
# Pillow modes with more than 8 bits per sample, and the value that maps to white: convert("RGB")
# would clip them to 0..255 (a 16-bit ramp turns almost all white). 32-bit integer images are
# read on the 16-bit scale (Pillow opens 16-bit files as I;16 or I); float images as [0, 1].
_HIGH_DEPTH_WHITE = {"I;16": 65535.0, "I;16L": 65535.0, "I;16B": 65535.0, "I;16N": 65535.0, "I": 65535.0, "F": 1.0}


def list_image_files(folder: str | os.PathLike) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {str(folder)!r} does not exist or is not a directory")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"image folder {str(folder)!r} holds no images (looked for {', '.join(IMAGE_SUFFIXES)})")
    return files


def readable_images(files, progress: bool = True) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Open and decode every image file: (the readable ones, [(path, why) for the others]), in order.
    Lets a build skip or list every bad file at once instead of stopping at the first."""
    from PIL import Image
    from tqdm.auto import tqdm

    good, bad = [], []
    for path in tqdm(files, desc="checking images", unit="img", disable=not progress, delay=2):  # shown after 2 s
        try:
            with Image.open(path) as im:
                im.load()
            good.append(Path(path))
        except (OSError, ValueError, Image.DecompressionBombError) as e:  # unreadable, truncated, or too large
            bad.append((Path(path), str(e).splitlines()[0] if str(e) else type(e).__name__))
    return good, bad


def pil_to_tensor(image, size: int) -> torch.Tensor:
    """Centre-crop to a square, resize to ``size`` and map to a (3, size, size) float tensor in [-1, 1].

    8-bit modes (1, L, LA, P, RGB, RGBA, CMYK, ...) go through Pillow's ``convert("RGB")`` (alpha is
    dropped, as in the official preprocessing); single-channel images of higher depth (I;16, I, F)
    are scaled from their own range (see ``_HIGH_DEPTH_WHITE``) and repeated over the 3 channels.
    """
    import numpy as np
    from PIL import Image

    white = _HIGH_DEPTH_WHITE.get(image.mode)
    if white is not None:  # resample in float ("F" mode, 0..255 scale) so nothing is clipped or quantised
        values = np.asarray(image, dtype=np.float64) * (255.0 / white)
        image = Image.fromarray(np.nan_to_num(values).clip(0.0, 255.0).astype(np.float32), mode="F")
    else:
        image = image.convert("RGB")
    w, h = image.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    image = image.crop((left, top, left + s, top + s)).resize((size, size), Image.BICUBIC)
    if white is not None:
        data = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).clamp(0, 255)
        return (data / 127.5 - 1.0).expand(3, size, size).contiguous()
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(size, size, 3)
    return data.permute(2, 0, 1).float() / 127.5 - 1.0


def normalise_image_source(images) -> tuple[int, object]:
    """Return (count, source) where source is a list of paths/PIL images or a (B, 3, H, W) tensor."""
    if isinstance(images, torch.Tensor):
        if images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(f"image tensor must be float (B, 3, H, W) in [-1, 1], got {tuple(images.shape)} {images.dtype}")
        if images.shape[0] == 0:
            raise ValueError("image tensor holds no images (B = 0)")
        return images.shape[0], images
    if isinstance(images, (str, os.PathLike)):
        files = list_image_files(images)
        return len(files), files
    if isinstance(images, Sequence):
        if len(images) == 0:
            raise ValueError("the list of images is empty")
        return len(images), list(images)
    raise TypeError(f"images: expected a folder, a list of paths or PIL images, or a tensor; got {type(images).__name__}")


def iter_image_batches(source, size: int, batch_size: int) -> Iterator[torch.Tensor]:
    """Yield (b, 3, size, size) float batches in [-1, 1]."""
    if isinstance(source, torch.Tensor):
        for start in range(0, source.shape[0], batch_size):
            batch = source[start : start + batch_size].float()
            if batch.shape[-2:] != (size, size):
                batch = torch.nn.functional.interpolate(batch, size=(size, size), mode="bicubic", align_corners=False)
            yield batch.clamp(-1, 1)
        return
    from PIL import Image

    for start in range(0, len(source), batch_size):
        tensors = []
        for item in source[start : start + batch_size]:
            if isinstance(item, (str, os.PathLike)):
                try:
                    with Image.open(item) as im:
                        tensors.append(pil_to_tensor(im, size))
                except OSError as e:
                    raise ValueError(f"cannot read image {str(item)!r}: {e}") from e
            elif isinstance(item, Image.Image):
                tensors.append(pil_to_tensor(item, size))
            else:
                raise TypeError(f"images: list items must be paths or PIL images, got {type(item).__name__}")
        yield torch.stack(tensors)
