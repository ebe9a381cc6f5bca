"""The miniature dataset: Noto colour emoji rendered to small RGB images, labelled from Unicode's emoji-test.txt.

Sources (Debian packages, installed by ``scripts/setup.sh`` where possible):
``fonts-noto-color-emoji`` (``NotoColorEmoji.ttf``, SIL OFL 1.1; its only bitmap strike is 109 px)
and ``unicode-data`` (``emoji/emoji-test.txt``: every fully-qualified emoji with its group,
subgroup and name).

Each emoji is drawn in colour at 109 px on a white canvas, centre-cropped to its square bounding
box and resized to ``size`` px. The split is by *base name* (the name before ``:``, so
"waving hand: medium skin tone" belongs to "waving hand"): every skin-tone or gender variant of a
base emoji lands in the same split. Rendered arrays are cached as one ``.npz`` per (size, font,
emoji list) so later runs start at once.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

FONT_PATHS = ("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf",)
EMOJI_TEST_PATHS = ("/usr/share/unicode/emoji/emoji-test.txt",)
FONT_STRIKE = 109  # the only bitmap size of NotoColorEmoji.ttf
BACKGROUND = (255, 255, 255)
SPLITS = ("train", "val", "test")
DEBIAN_PACKAGES = "fonts-noto-color-emoji unicode-data"


class MissingEmojiData(FileNotFoundError):
    """The emoji font or the Unicode emoji list is not installed."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("ARRAG_KERNELS_CACHE", Path.home() / ".cache" / "arrag_kernels")) / "miniature"


def _find(paths, what: str) -> Path:
    for p in paths:
        if Path(p).is_file():
            return Path(p)
    raise MissingEmojiData(
        f"{what}: expected one of {', '.join(paths)}, none exists; install the Debian packages "
        f"`apt-get install -y {DEBIAN_PACKAGES}` (scripts/setup.sh tries this)"
    )


def emoji_sources(font: str | os.PathLike | None = None, emoji_test: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """(font path, emoji-test.txt path); raises :class:`MissingEmojiData` with the fix when absent."""
    font = Path(font) if font else _find(FONT_PATHS, "emoji font")
    emoji_test = Path(emoji_test) if emoji_test else _find(EMOJI_TEST_PATHS, "Unicode emoji list")
    for p, what in ((font, "emoji font"), (emoji_test, "Unicode emoji list")):
        if not p.is_file():
            raise MissingEmojiData(f"{what}: {str(p)!r} does not exist; install `{DEBIAN_PACKAGES}` or pass another path")
    return font, emoji_test


def emoji_available() -> bool:
    try:
        emoji_sources()
        return True
    except MissingEmojiData:
        return False


@dataclass(frozen=True)
class EmojiEntry:
    char: str
    name: str
    group: str
    subgroup: str

    @property
    def base_name(self) -> str:
        return self.name.split(":")[0].strip()


def parse_emoji_test(path: str | os.PathLike) -> list[EmojiEntry]:
    """Fully-qualified emoji of ``emoji-test.txt`` in file order."""
    entries, group, subgroup = [], None, None
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif line and not line.startswith("#") and "; fully-qualified" in line:
            codes, rest = line.split(";", 1)
            char = "".join(chr(int(c, 16)) for c in codes.split())
            # "# 😀 E1.0 grinning face": drop the glyph and the version
            name = rest.split("#", 1)[1].strip().split(" ", 2)[2]
            entries.append(EmojiEntry(char, name, group, subgroup))
    if not entries:
        raise ValueError(f"{str(path)!r}: no fully-qualified emoji found; is this Unicode's emoji-test.txt?")
    return entries


def emoji_labels(entries: list[EmojiEntry]) -> tuple[list[str], list[str]]:
    """(group names, subgroup names) in file order: index i is label id i (the model's prompt ids
    depend on this order, never on which emoji a run keeps)."""
    return list(dict.fromkeys(e.group for e in entries)), list(dict.fromkeys(e.subgroup for e in entries))


def render_emoji(char: str, font, size: int):
    """One emoji as a (size, size, 3) uint8 array on ``BACKGROUND``, or None if the font has no glyph."""
    from PIL import Image, ImageDraw

    canvas = Image.new("RGBA", (2 * FONT_STRIKE, 2 * FONT_STRIKE), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((FONT_STRIKE // 4, FONT_STRIKE // 4), char, font=font, embedded_color=True)
    box = canvas.getbbox()
    if box is None:
        return None
    left, top, right, bottom = box
    side = max(right - left, bottom - top)
    cx, cy = (left + right) // 2, (top + bottom) // 2
    glyph = canvas.crop((cx - side // 2, cy - side // 2, cx - side // 2 + side, cy - side // 2 + side))
    out = Image.new("RGBA", glyph.size, BACKGROUND + (255,))
    out.alpha_composite(glyph)
    return np.asarray(out.convert("RGB").resize((size, size), Image.LANCZOS))


@dataclass
class EmojiDataset:
    """Rendered emoji and their labels (all emoji, every split)."""

    images: torch.Tensor  # (N, size, size, 3) uint8
    names: list[str]
    groups: list[str]
    subgroups: list[str]
    group_names: list[str]  # index -> group (file order)
    subgroup_names: list[str]
    split: list[str]  # "train" | "val" | "test" per emoji

    def __len__(self) -> int:
        return len(self.names)

    def group_ids(self) -> torch.Tensor:
        return torch.tensor([self.group_names.index(g) for g in self.groups])

    def subgroup_ids(self) -> torch.Tensor:
        return torch.tensor([self.subgroup_names.index(s) for s in self.subgroups])

    def indices(self, split: str) -> torch.Tensor:
        if split not in SPLITS:
            raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
        idx = torch.tensor([i for i, s in enumerate(self.split) if s == split], dtype=torch.long)
        if idx.numel() == 0:
            raise ValueError(f"split {split!r} is empty ({len(self)} emoji in all); use larger split fractions "
                             "or more emoji")
        return idx

    def pixels(self, split: str | None = None) -> torch.Tensor:
        """(n, 3, size, size) float in [-1, 1] (the layout the VQ encoder takes)."""
        imgs = self.images if split is None else self.images[self.indices(split)]
        return imgs.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def split_by_base_name(entries: list[EmojiEntry], fractions=(0.8, 0.1, 0.1), seed: int = 0) -> list[str]:
    """Seeded train/val/test assignment per base name (variants of one emoji never straddle splits)."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"fractions: expected three non-negative numbers summing to 1, got {fractions}")
    bases = sorted({e.base_name for e in entries})
    order = torch.randperm(len(bases), generator=torch.Generator().manual_seed(seed)).tolist()
    n_train = round(fractions[0] * len(bases))
    n_val = round(fractions[1] * len(bases))
    where = {}
    for rank, i in enumerate(order):
        where[bases[i]] = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
    return [where[e.base_name] for e in entries]


def load_emoji_dataset(size: int = 32, limit: int | None = None, seed: int = 0, fractions=(0.8, 0.1, 0.1),
                       cache_dir: str | os.PathLike | None = None, font: str | os.PathLike | None = None,
                       emoji_test: str | os.PathLike | None = None, progress: bool = True) -> EmojiDataset:
    """Render (or load from the cache) the emoji dataset.

    Args:
        size: pixels per side of each image.
        limit: keep every ``ceil(N / limit)``-th emoji (quick runs and tests); None keeps all.
        seed, fractions: the split by base name (see :func:`split_by_base_name`).
        cache_dir: where rendered arrays are cached (default ``~/.cache/arrag_kernels/miniature``,
            or ``$ARRAG_KERNELS_CACHE/miniature``).
    """
    from PIL import ImageFont
    from tqdm.auto import tqdm

    font_path, test_path = emoji_sources(font, emoji_test)
    all_entries = parse_emoji_test(test_path)
    group_names, subgroup_names = emoji_labels(all_entries)  # label ids do not depend on ``limit``
    entries = all_entries
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit: expected a positive number of emoji or None, got {limit}")
        stride = -(-len(entries) // limit)
        entries = entries[::stride]
    h = hashlib.sha256(f"{size}|{font_path.stat().st_size}|".encode() + "".join(e.char for e in entries).encode())
    cache = Path(cache_dir or default_cache_dir()) / f"emoji_{size}px_{h.hexdigest()[:12]}.npz"
    if cache.is_file():
        with np.load(cache) as f:
            images, keep = f["images"], f["keep"]
    else:
        pil_font = ImageFont.truetype(str(font_path), FONT_STRIKE)
        rendered = [render_emoji(e.char, pil_font, size) for e in tqdm(entries, desc="rendering emoji", unit="emoji",
                                                                       disable=not progress)]
        keep = np.array([r is not None for r in rendered])
        images = np.stack([r for r in rendered if r is not None]) if keep.any() else np.zeros((0, size, size, 3), np.uint8)
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, images=images, keep=keep)
        os.replace(tmp, cache)
        if progress:
            print(f"cached the rendered emoji in {cache} ({cache.stat().st_size / 1e6:.1f} MB; set "
                  "ARRAG_KERNELS_CACHE to put the cache elsewhere)")
    entries = [e for e, k in zip(entries, keep) if k]
    if not entries:
        raise ValueError(f"no emoji could be rendered with {str(font_path)!r}")
    split = split_by_base_name(entries, fractions, seed)
    return EmojiDataset(torch.from_numpy(np.ascontiguousarray(images)), [e.name for e in entries],
                        [e.group for e in entries], [e.subgroup for e in entries], group_names, subgroup_names, split)
