"""What a patch database is: its metadata (:class:`DatabaseMeta`), its error type and the names of
the files of a database directory."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..config import KeyLayout

KEY_SOURCES = ("latent", "codebook")
# The files of a database directory (an index="ivfpq" one also holds faiss_index.INDEX_FILE and
# faiss_index.VALUES_FILE), and those of a partitioned database (see :mod:`.parts`).
ARRAYS_FILE, META_FILE = "arrays.safetensors", "meta.json"
PARTS_FILE, TRAINED_FILE = "parts.json", "trained.index"


class DatabaseError(ValueError):
    """A database file is missing, corrupted, or does not fit the model it is used with."""


# The model fingerprint of an imported official release: it names no codebook (the release records none).
OFFICIAL_FINGERPRINT = "official"


@dataclass(frozen=True)
class PartOf:
    """Where a part of a partitioned database (:mod:`.parts`) sits: part ``index`` of ``parts``, holding the
    ``count`` entries with global ids ``first_id ..`` of ``total``, filled from the trained index whose
    :func:`~arrag_kernels.retrieval.parts.trained_digest` is ``trained_sha256``."""

    index: int
    parts: int
    first_id: int
    count: int
    total: int
    trained_sha256: str


@dataclass(frozen=True)
class DatabaseMeta:
    layout: KeyLayout
    codebook_size: int
    embed_dim: int
    grid: tuple[int, int]
    key_source: str
    model_fingerprint: str
    num_images: int
    index: str = "flat"
    part: PartOf | None = None  # set on the parts of a partitioned database only

    @property
    def key_dim(self) -> int:
        return self.layout.key_dim(self.embed_dim)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["layout"] = self.layout.to_dict()
        d["grid"] = list(self.grid)
        if self.part is None:
            del d["part"]  # ordinary databases keep the meta.json they always had
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DatabaseMeta":
        return cls(
            layout=KeyLayout.from_dict(d["layout"]),
            codebook_size=int(d["codebook_size"]),
            embed_dim=int(d["embed_dim"]),
            grid=tuple(int(x) for x in d["grid"]),
            key_source=str(d["key_source"]),
            model_fingerprint=str(d["model_fingerprint"]),
            num_images=int(d["num_images"]),
            index=str(d.get("index", "flat")),
            part=None if d.get("part") is None else PartOf(**d["part"]),
        )
