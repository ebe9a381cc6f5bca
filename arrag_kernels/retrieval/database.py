"""``PatchDatabase``: (neighbourhood key -> token id) pairs of real images, for patch-level retrieval.

On disk a database is a directory with two files:

* ``arrays.safetensors``: ``keys`` (N, key_dim) float32 and ``values`` (N,) int64 token ids;
* ``meta.json``: the key layout, codebook size and width, grid, key source, model fingerprint and
  the SHA-256 of the arrays file.

Saving writes a complete temporary directory first and renames it into place, so a crash leaves
either the previous database or none, never a half-written one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import KeyLayout
from ..models import get_adapter
from ..ops import feature_neighbor_keys
from .images import iter_image_batches, normalise_image_source
from .search import INDEX_TYPES, make_search

FORMAT_VERSION = 1
KEY_SOURCES = ("latent", "codebook")
_ARRAYS, _META = "arrays.safetensors", "meta.json"


class DatabaseError(ValueError):
    """A database file is missing, corrupted, or does not fit the model it is used with."""


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

    @property
    def key_dim(self) -> int:
        return self.layout.key_dim(self.embed_dim)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["layout"] = self.layout.to_dict()
        d["grid"] = list(self.grid)
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
        )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


class PatchDatabase:
    """Keys (N, key_dim) and token-id values (N,) of real image patches, with their metadata.

    Build with :meth:`build`, persist with :meth:`save` / :meth:`load`, query with :meth:`retrieve`.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, meta: DatabaseMeta):
        if keys.dim() != 2 or keys.shape[1] != meta.key_dim:
            raise DatabaseError(
                f"keys must be (N, {meta.key_dim}) for layout {meta.layout} and embed_dim {meta.embed_dim}, "
                f"got {tuple(keys.shape)}"
            )
        if values.shape != (keys.shape[0],):
            raise DatabaseError(f"values must be ({keys.shape[0]},) to match the keys, got {tuple(values.shape)}")
        if meta.key_source not in KEY_SOURCES:
            raise DatabaseError(f"key_source: expected one of {KEY_SOURCES}, got {meta.key_source!r}")
        if meta.index not in INDEX_TYPES:
            raise DatabaseError(f"index: expected one of {INDEX_TYPES}, got {meta.index!r}")
        if keys.shape[0] == 0:
            raise DatabaseError("a database needs at least one entry")
        if values.numel() and (int(values.min()) < 0 or int(values.max()) >= meta.codebook_size):
            raise DatabaseError(
                f"values must be token ids in [0, {meta.codebook_size}), got range "
                f"[{int(values.min())}, {int(values.max())}]"
            )
        self.keys = keys
        self.values = values.long()
        self.meta = meta
        self._search = None

    def __len__(self) -> int:
        return self.keys.shape[0]

    def __repr__(self) -> str:
        m = self.meta
        return (
            f"PatchDatabase({len(self)} entries, key_dim={m.key_dim}, layout={m.layout}, grid={m.grid}, "
            f"codebook={m.codebook_size}, key_source={m.key_source!r}, index={m.index!r})"
        )

    # ---- building -------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        images,
        model,
        neighborhood: str = "causal",
        hops=(1,),
        border: str = "skip",
        key_source: str = "latent",
        index: str = "flat",
        batch_size: int = 16,
        progress: bool = True,
    ) -> "PatchDatabase":
        """Encode images with the model's own VQ tokenizer and collect one entry per kept target patch.

        Args:
            images: a folder (searched recursively), a list of paths or PIL images, or a float tensor
                (B, 3, H, W) in [-1, 1]. Images are centre-cropped and resized to the model's size.
            model: a supported model (e.g. HF ``JanusForConditionalGeneration``) or its adapter.
            neighborhood, hops, border: the key layout, see :class:`arrag_kernels.KeyLayout`.
            key_source: "latent" (official: pre-quantisation encoder latents, L2-normalised per cell)
                or "codebook" (normalised codebook vectors of the patches' token ids, exactly what
                queries look like at decode time).
            index: "flat" (exact search) or "faiss-flat" (faiss IndexFlatL2 on the CPU).
        """
        layout = KeyLayout(neighborhood=neighborhood, hops=hops, border=border)
        if key_source not in KEY_SOURCES:
            raise ValueError(f"key_source: expected one of {KEY_SOURCES}, got {key_source!r}")
        if index not in INDEX_TYPES:
            raise ValueError(f"index: expected one of {INDEX_TYPES}, got {index!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        adapter = model if hasattr(model, "encode") and hasattr(model, "grid") else get_adapter(model)
        count, source = normalise_image_source(images)
        codebook = adapter.codebook().float()

        from tqdm.auto import tqdm

        keys, values = [], []
        bar = tqdm(total=count, desc="encoding images", unit="img", disable=not progress)
        for batch in iter_image_batches(source, adapter.image_size, batch_size):
            latents, tokens = adapter.encode(batch)
            if key_source == "codebook":
                latents = codebook[tokens]
            k, valid = feature_neighbor_keys(latents.float(), layout)
            keys.append(k[:, valid].reshape(-1, k.shape[-1]).cpu())
            values.append(tokens.reshape(tokens.shape[0], -1)[:, valid].reshape(-1).cpu())
            bar.update(batch.shape[0])
        bar.close()
        meta = DatabaseMeta(
            layout=layout,
            codebook_size=adapter.codebook_size,
            embed_dim=adapter.embed_dim,
            grid=tuple(adapter.grid),
            key_source=key_source,
            model_fingerprint=adapter.fingerprint(),
            num_images=count,
            index=index,
        )
        return cls(torch.cat(keys), torch.cat(values), meta)

    # ---- persistence ----------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the database directory atomically (replacing an existing database at ``path``)."""
        from safetensors.torch import save_file

        path = Path(path)
        if path.exists() and not (path / _META).is_file():
            raise FileExistsError(f"{str(path)!r} exists and is not a database directory; refusing to overwrite it")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        try:
            arrays = tmp / _ARRAYS
            save_file({"keys": self.keys.float().cpu().contiguous(), "values": self.values.cpu().contiguous()}, str(arrays))
            meta = {"format_version": FORMAT_VERSION, **self.meta.to_dict(), "num_entries": len(self),
                    "arrays_sha256": _sha256(arrays)}
            with open(tmp / _META, "w") as f:
                json.dump(meta, f, indent=2)
                f.flush()
                os.fsync(f.fileno())
            if path.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
                os.replace(path, old / "db")
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, verify: bool = True) -> "PatchDatabase":
        """Read a database directory written by :meth:`save`; ``verify`` checks the arrays' SHA-256."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(path)
        meta_file, arrays_file = path / _META, path / _ARRAYS
        if not meta_file.is_file() or not arrays_file.is_file():
            raise DatabaseError(f"{str(path)!r} is not a database directory (expected {_META} and {_ARRAYS})")
        try:
            raw = json.loads(meta_file.read_text())
            if raw.get("format_version") != FORMAT_VERSION:
                raise DatabaseError(
                    f"{str(meta_file)!r}: format_version {raw.get('format_version')!r}, this library reads {FORMAT_VERSION}"
                )
            meta = DatabaseMeta.from_dict(raw)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            if isinstance(e, DatabaseError):
                raise
            raise DatabaseError(f"{str(meta_file)!r} is corrupted or incomplete: {e!r}") from e
        if verify and _sha256(arrays_file) != raw.get("arrays_sha256"):
            raise DatabaseError(
                f"{str(arrays_file)!r} does not match the checksum in {_META}: the file is corrupted or was changed"
            )
        try:
            arrays = load_file(str(arrays_file))
            keys, values = arrays["keys"], arrays["values"]
        except (SafetensorError, KeyError, OSError) as e:
            raise DatabaseError(f"{str(arrays_file)!r} is corrupted: {e}") from e
        if len(keys) != raw.get("num_entries"):
            raise DatabaseError(f"{str(path)!r}: {len(keys)} entries on disk, {raw.get('num_entries')} in {_META}")
        return cls(keys, values, meta)

    # ---- use ------------------------------------------------------------------------------
    def check_compatible(self, adapter) -> None:
        """Raise :class:`DatabaseError` if this database cannot serve ``adapter``'s model."""
        m = self.meta
        problems = []
        if m.codebook_size != adapter.codebook_size:
            problems.append(f"codebook size {m.codebook_size} (model: {adapter.codebook_size})")
        if m.embed_dim != adapter.embed_dim:
            problems.append(f"codebook width {m.embed_dim} (model: {adapter.embed_dim})")
        if tuple(m.grid) != tuple(adapter.grid):
            problems.append(f"grid {tuple(m.grid)} (model: {tuple(adapter.grid)})")
        if problems:
            raise DatabaseError("database was built for another model: " + "; ".join(problems))
        if m.model_fingerprint != adapter.fingerprint():
            warnings.warn(
                "the database was built with a different VQ codebook than this model's "
                f"(fingerprint {m.model_fingerprint} vs {adapter.fingerprint()}); retrieval quality may suffer",
                stacklevel=3,
            )

    def to(self, device=None, dtype=None) -> "PatchDatabase":
        """Move keys and values (e.g. to the model's GPU); ``dtype`` sets the key storage type."""
        db = PatchDatabase.__new__(PatchDatabase)
        db.keys = self.keys.to(device=device, dtype=dtype or self.keys.dtype)
        db.values = self.values.to(device=device)
        db.meta = self.meta
        db._search = None
        return db

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q, key_dim) queries -> ((Q, k) float32 squared L2 distances, (Q, k) int64 entry ids)."""
        if queries.dim() != 2 or queries.shape[1] != self.meta.key_dim:
            raise ValueError(f"queries must be (Q, {self.meta.key_dim}), got {tuple(queries.shape)}")
        if not 1 <= k <= len(self):
            raise ValueError(f"k = {k} is larger than the database ({len(self)} entries); use k <= {len(self)}")
        if self._search is None:
            self._search = make_search(self.meta.index, self.keys)
        return self._search.search(queries, k)

    def retrieve(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Like :meth:`search` but returns the entries' token ids instead of their row ids."""
        dist, ids = self.search(queries, k)
        return dist, self.values.to(ids.device)[ids]
