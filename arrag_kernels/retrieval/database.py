"""``PatchDatabase``: (neighbourhood key -> token id) pairs of real images, for patch-level retrieval.

On disk a database is a directory with two files:

* ``arrays.safetensors``: ``keys`` (N, key_dim) float32 and ``values`` (N,) int64 token ids;
* ``meta.json``: the key layout, codebook size and width, grid, key source, model fingerprint,
  each data file's size, SHA-256 and page digests, and the SHA-256 of meta.json's own content.

An IVF-PQ database (``index="ivfpq"``) stores the official layout instead: ``faiss_ivf_pq_opq.index``
(OPQ + IVF-PQ, ids 0..N-1) and ``next_codes.npy`` ((N,) int32 token ids), plus ``meta.json`` with
their SHA-256 and, when the exact keys were kept (small databases), ``arrays.safetensors``. Such a
database may hold no keys at all (``keys is None``): it is searched through its index only.

Saving writes a complete temporary directory ``.<name>.tmp-<host>-<pid>-<random>`` first and renames
it into place (the previous database goes to ``.<name>.old-<same>`` for that moment), so a crash
leaves the previous database or the new one, never a half-written one. Directories left by a
killed save are finished or removed by the next :meth:`PatchDatabase.save` or
:meth:`PatchDatabase.load` of that path on the same host (see ``_recover``).

Loading verifies ``quick`` by default: meta.json's checksum, every file's size and the digests
of a few pages spread over each file (a bounded read); ``verify="full"`` hashes whole files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import secrets
import shutil
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import KeyLayout
from ..models import as_tokenizer
from ..ops import feature_neighbor_keys
from . import ivfpq_build
from .faiss_index import (INDEX_FILE, VALUES_FILE, IndexFormatError, check_ivfpq_contents, import_faiss, inner_ivfpq,
                          set_nprobe, validate_ivfpq)
from .images import iter_image_batches, normalise_image_source
from .search import INDEX_TYPES, make_search

FORMAT_VERSION = 2  # 2: meta.json checksummed; per-file sizes and page digests (version 1 is still read)
_READABLE_VERSIONS = (1, 2)
VERIFY_MODES = ("none", "quick", "full")
_MAX_PAGES, _MIN_PAGE, _SAMPLED_PAGES = 4096, 1 << 20, 8  # page digests per file, smallest page, pages checked by "quick"
# index="ivfpq" builds keep the exact keys (in RAM and on disk) up to this many bytes by default.
KEEP_KEYS_MAX_BYTES = 1 << 28
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


def _read_faiss_index(file: Path, deep_check: bool = False):
    """Read a FAISS index; ``deep_check`` also runs :func:`check_ivfpq_contents` (files without our checksums)."""
    try:
        index = import_faiss().read_index(str(file))
    except (RuntimeError, MemoryError) as e:
        raise DatabaseError(f"{str(file)!r} is not a readable FAISS index: {(str(e) or type(e).__name__).splitlines()[0]}") from e
    if deep_check:
        try:
            check_ivfpq_contents(index)
        except IndexFormatError as e:
            raise DatabaseError(f"{str(file)!r}: {e}") from e
    return index


def _read_values(file: Path) -> np.ndarray:
    try:
        values = np.load(file)
    except (OSError, ValueError) as e:
        raise DatabaseError(f"{str(file)!r} is not a readable .npy array: {e}") from e
    if values.ndim != 1 or not np.issubdtype(values.dtype, np.integer):
        raise DatabaseError(f"{str(file)!r}: expected a 1-D integer array of token ids, got {values.dtype} {values.shape}")
    return values


def _check_codebook(codebook) -> torch.Tensor:
    if not (torch.is_tensor(codebook) and codebook.is_floating_point() and codebook.dim() == 2 and codebook.shape[0] > 0):
        raise ValueError(f"codebook: expected a float tensor (V, d), got {getattr(codebook, 'dtype', type(codebook))} "
                         f"{tuple(getattr(codebook, 'shape', ()))}")
    return codebook.detach().float()


def _check_token_grids(tokens, vocab_size: int) -> None:
    if not (torch.is_tensor(tokens) and not tokens.is_floating_point() and tokens.dim() == 3 and tokens.numel()):
        raise ValueError(f"tokens: expected a non-empty integer tensor (N, H, W) of token grids, got "
                         f"{getattr(tokens, 'dtype', type(tokens))} {tuple(getattr(tokens, 'shape', ()))}")
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"tokens: expected ids in [0, {vocab_size}) (the codebook's rows), got range [{lo}, {hi}]")


def _grid_entries(features: torch.Tensor, tokens: torch.Tensor, layout: KeyLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, W, d) per-cell vectors and (B, H, W) token ids -> (keys, values) on the CPU of the kept targets."""
    k, valid = feature_neighbor_keys(features.float(), layout)
    return k[:, valid].reshape(-1, k.shape[-1]).cpu(), tokens.reshape(tokens.shape[0], -1)[:, valid].reshape(-1).cpu()


def _check_finite_keys(keys: torch.Tensor, what: str = "keys") -> None:
    """Raise DatabaseError if a key row holds NaN or inf (checked in row blocks: no full-size mask)."""
    step = max(1, (1 << 22) // max(1, keys.shape[-1]))
    for start in range(0, keys.shape[0], step):
        bad = ~torch.isfinite(keys[start : start + step]).all(dim=-1)
        if bad.any():
            row = start + int(bad.nonzero()[0, 0])
            raise DatabaseError(
                f"{what}: row {row} holds NaN or inf; keys must be finite (check the images and the encoder's dtype)"
            )


def _page_size(size: int) -> int:
    return max(_MIN_PAGE, -(-size // _MAX_PAGES))


def _digest_file(path: Path) -> dict:
    """Size, SHA-256 and the 16-hex-digit SHA-256 of each page of ``path`` (one read), then fsync it."""
    size, full, pages = path.stat().st_size, hashlib.sha256(), []
    page = _page_size(size)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(page), b""):
            full.update(block)
            pages.append(hashlib.sha256(block).hexdigest()[:16])
        os.fsync(f.fileno())
    return {"size": size, "sha256": full.hexdigest(), "page_size": page, "pages": pages}


def _check_file(path: Path, record: dict, mode: str) -> None:
    """Compare ``path`` with its record: size always; ``quick``: sampled pages; ``full``: the whole SHA-256."""
    changed = f"{str(path)!r} does not match the checksums in {_META}: the file is corrupted or was changed"
    if "size" in record and path.stat().st_size != record["size"]:
        raise DatabaseError(f"{changed} ({path.stat().st_size} bytes, {_META} says {record['size']})")
    if mode == "quick" and record.get("pages"):
        pages, size = record["pages"], record["page_size"]
        with open(path, "rb") as f:
            for i in sorted({round(j * (len(pages) - 1) / max(1, _SAMPLED_PAGES - 1)) for j in range(_SAMPLED_PAGES)}):
                f.seek(i * size)
                if hashlib.sha256(f.read(size)).hexdigest()[:16] != pages[i]:
                    raise DatabaseError(f"{changed} (page {i})")
        return
    if mode != "none":  # "full", or a version-1 record without page digests
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        if h.hexdigest() != record["sha256"]:
            raise DatabaseError(changed)


def _meta_digest(meta: dict) -> str:
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _write_arrays(file: Path, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Write ``keys`` (as float32) and ``values`` (int64) in the safetensors format, a block of rows at a
    time: no full host copy of the keys is ever made (they may be fp16 or on a GPU)."""
    n, d = keys.shape
    layout = {"keys": ("F32", [n, d], n * d * 4), "values": ("I64", [n], n * 8)}
    header, offset = {}, 0
    for name, (dtype, shape, nbytes) in layout.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header to 8-byte alignment
    step = max(1, (1 << 24) // max(1, d * 4))
    with open(file, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for name, dtype in (("keys", torch.float32), ("values", torch.int64)):
            tensor = keys if name == "keys" else values
            for start in range(0, n, step):
                f.write(tensor[start : start + step].to("cpu", dtype).contiguous().numpy().data)


def _file_records(raw: dict) -> dict:
    """{file name: integrity record} of a meta.json of any readable version."""
    if raw["format_version"] >= 2:
        return raw["files"]
    if "arrays_sha256" in raw:
        return {_ARRAYS: {"sha256": raw["arrays_sha256"]}}
    return {name: {"sha256": digest} for name, digest in (raw.get("files_sha256") or {}).items()}


def _owner_alive(token: str) -> bool:
    """Whether the save that named its directories ``token`` (host-pid-random) may still be running."""
    host, _, pid = token.rpartition("-")[0].rpartition("-")
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return True  # another machine's or our own: never touch
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _recover(path: Path) -> None:
    """Finish or undo saves to ``path`` whose process died on this host, then remove their directories.

    A save killed between moving the old database aside and moving the new one in leaves no ``path``:
    the complete new directory (its meta.json is written last) is moved in, else the old one back.
    """
    dead = {}
    for kind in ("tmp", "old"):
        for d in path.parent.glob(f".{path.name}.{kind}-*"):
            token = d.name[len(f".{path.name}.{kind}-"):]
            if d.is_dir() and not _owner_alive(token):
                dead.setdefault(token, {})[kind] = d
    if not dead:
        return
    if not path.exists():
        candidates = [dirs["tmp"] for dirs in dead.values() if "tmp" in dirs] + \
                     [dirs["old"] for dirs in dead.values() if "old" in dirs]
        for d in candidates:
            if (d / _META).is_file():
                with contextlib.suppress(OSError):  # another process may be recovering it right now
                    os.replace(d, path)
                    break
    for dirs in dead.values():
        for d in dirs.values():
            shutil.rmtree(d, ignore_errors=True)


class PatchDatabase:
    """Keys (N, key_dim) and token-id values (N,) of real image patches, with their metadata.

    Build with :meth:`build`, persist with :meth:`save` / :meth:`load`, query with :meth:`retrieve`.
    An ``index="ivfpq"`` database also holds a trained FAISS index (``index``) with one entry per
    value, searched with ``nprobe`` lists; its ``keys`` may be None.
    """

    def __init__(self, keys: torch.Tensor | None, values: torch.Tensor, meta: DatabaseMeta, index=None,
                 nprobe: int | None = None):
        if (meta.index == "ivfpq") != (index is not None):
            raise DatabaseError(f"a FAISS index is given exactly for index='ivfpq' databases, got index={meta.index!r} "
                                f"with {'an' if index is not None else 'no'} index")
        if keys is None and index is None:
            raise DatabaseError("keys may be None only for an index='ivfpq' database (index-only)")
        if values.dim() != 1:
            raise DatabaseError(f"values must be (N,), got {tuple(values.shape)}")
        if index is not None:
            try:
                nprobe = inner_ivfpq(index).nprobe if nprobe is None else nprobe
                validate_ivfpq(index, values.cpu().numpy(), meta.key_dim, meta.codebook_size, nprobe)
            except IndexFormatError as e:
                raise DatabaseError(str(e)) from e
            set_nprobe(index, nprobe)
        if keys is None:
            keys_shape = (values.shape[0], meta.key_dim)
        elif keys.dim() != 2 or keys.shape[1] != meta.key_dim:
            raise DatabaseError(
                f"keys must be (N, {meta.key_dim}) for layout {meta.layout} and embed_dim {meta.embed_dim}, "
                f"got {tuple(keys.shape)}"
            )
        else:
            keys_shape = tuple(keys.shape)
            _check_finite_keys(keys)
        if values.shape != (keys_shape[0],):
            raise DatabaseError(f"values must be ({keys_shape[0]},) to match the keys, got {tuple(values.shape)}")
        if meta.key_source not in KEY_SOURCES:
            raise DatabaseError(f"key_source: expected one of {KEY_SOURCES}, got {meta.key_source!r}")
        if meta.index not in INDEX_TYPES:
            raise DatabaseError(f"index: expected one of {INDEX_TYPES}, got {meta.index!r}")
        if keys_shape[0] == 0:
            raise DatabaseError("a database needs at least one entry")
        if values.numel() and (int(values.min()) < 0 or int(values.max()) >= meta.codebook_size):
            raise DatabaseError(
                f"values must be token ids in [0, {meta.codebook_size}), got range "
                f"[{int(values.min())}, {int(values.max())}]"
            )
        self.keys = keys
        self.values = values.long()
        self.meta = meta
        self.index = index
        self._shards = None
        self._search = None

    def __len__(self) -> int:
        return self.values.shape[0]

    @property
    def nprobe(self) -> int | None:
        """IVF lists probed per query (``index="ivfpq"`` only, else None)."""
        return None if self.index is None else inner_ivfpq(self.index).nprobe

    def set_nprobe(self, nprobe: int) -> None:
        """Probe ``nprobe`` IVF lists per query (set on the inner IVF, unlike the official code)."""
        if self.index is None:
            raise ValueError(f"nprobe applies to index='ivfpq' databases, this one is {self.meta.index!r}")
        set_nprobe(self.index, nprobe)
        if self._search is not None:
            self._search.set_nprobe(nprobe)  # keeps arrays already uploaded to a device

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
        path: str | os.PathLike | None = None,
        nlist: int = 800,
        m: int = 8,
        nbits: int = 8,
        opq: bool = True,
        nprobe: int = 1,
        train_size: int | None = None,
        keep_keys: bool | None = None,
        chunk_images: int = 1024,
        resume: bool = True,
    ) -> "PatchDatabase":
        """Encode images with the model's own VQ tokenizer and collect one entry per kept target patch.

        Args:
            images: a folder (searched recursively), a list of paths or PIL images, or a float tensor
                (B, 3, H, W) in [-1, 1]. Images are centre-cropped and resized to the model's size.
            model: a supported model (e.g. HF ``JanusForConditionalGeneration``), its adapter, or any
                :class:`arrag_kernels.models.ImageTokenizer`.
            neighborhood, hops, border: the key layout, see :class:`arrag_kernels.KeyLayout`.
            key_source: "latent" (official: pre-quantisation encoder latents, L2-normalised per cell)
                or "codebook" (normalised codebook vectors of the patches' token ids, exactly what
                queries look like at decode time).
            index: "flat" (exact search), "faiss-flat" (faiss IndexFlatL2 on the CPU) or "ivfpq"
                (FAISS ``[OPQMatrix ->] IndexIVFPQ(IndexFlatL2)`` in the official layout, see below).

        ``index="ivfpq"`` builds on disk at ``path`` (required) and returns the saved database:
        keys are encoded in chunks of ``chunk_images`` images into a work directory next to
        ``path`` (resumed when ``resume`` and the inputs match), ``train_size`` sampled keys train
        ``nlist`` lists, ``m`` sub-quantizers of ``nbits`` bits and (``opq``) an OPQ rotation, the
        chunks are added in order and the database replaces ``path`` atomically. ``keep_keys``
        (default: when the keys take <= 256 MiB) keeps the exact keys too. Under
        ``torch.distributed`` every rank encodes its share of the chunks and rank 0 trains,
        fills and saves; every rank returns the saved database.
        """
        layout = KeyLayout(neighborhood=neighborhood, hops=hops, border=border)
        if key_source not in KEY_SOURCES:
            raise ValueError(f"key_source: expected one of {KEY_SOURCES}, got {key_source!r}")
        if index not in INDEX_TYPES:
            raise ValueError(f"index: expected one of {INDEX_TYPES}, got {index!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        adapter = as_tokenizer(model)
        count, source = normalise_image_source(images)
        codebook = adapter.codebook().float()

        from tqdm.auto import tqdm

        def encode(src, bar=None, first: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
            keys, values = [], []
            for batch in iter_image_batches(src, adapter.image_size, batch_size):
                latents, tokens = adapter.encode(batch)
                k, v = _grid_entries(codebook[tokens] if key_source == "codebook" else latents, tokens, layout)
                _check_finite_keys(k, f"keys of images {first}..{first + batch.shape[0] - 1}")
                first += batch.shape[0]
                keys.append(k)
                values.append(v)
                if bar is not None:
                    bar.update(batch.shape[0])
            return torch.cat(keys), torch.cat(values)

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
        if index == "ivfpq":
            if path is None:
                raise ValueError("index='ivfpq' builds on disk: pass path=<database directory>")
            return cls._build_ivfpq(
                Path(path), meta, count, source, lambda lo, hi: encode(source[lo:hi], first=lo),
                dict(nlist=nlist, m=m, nbits=nbits, opq=opq), nprobe, train_size, keep_keys, chunk_images, resume,
                progress,
            )
        with tqdm(total=count, desc="encoding images", unit="img", disable=not progress) as bar:
            keys, values = encode(source, bar)
        return cls(keys, values, meta)

    @classmethod
    def from_tokens(cls, tokens: torch.Tensor, codebook: torch.Tensor, neighborhood: str = "causal", hops=(1,),
                    border: str = "skip", fingerprint: str | None = None, chunk_images: int = 256) -> "PatchDatabase":
        """A database from token grids, without a model adapter (``key_source="codebook"``).

        Args:
            tokens: (N, H, W) integer token ids of N real images (e.g. a VQ tokenizer's output).
            codebook: (V, d) the vectors a generated token contributes to a decode-time query, used
                as given: pass the same (usually L2-normalised) rows to the decode-time query.
            neighborhood, hops, border: the key layout, see :class:`arrag_kernels.KeyLayout`.
            fingerprint: stored model fingerprint; default :func:`arrag_kernels.models.codebook_fingerprint`
                of ``codebook``.

        Equals :meth:`build` with ``key_source="codebook"`` on the same tokens (keys, values, metadata).
        """
        codebook = _check_codebook(codebook)
        _check_token_grids(tokens, codebook.shape[0])
        table = codebook.to(tokens.device)
        return cls._from_grids(lambda lo, hi: table[tokens[lo:hi].long()], tokens, codebook, "codebook",
                               KeyLayout(neighborhood=neighborhood, hops=hops, border=border), fingerprint, chunk_images)

    @classmethod
    def from_latents(cls, latents: torch.Tensor, tokens: torch.Tensor, codebook: torch.Tensor,
                     neighborhood: str = "causal", hops=(1,), border: str = "skip", fingerprint: str | None = None,
                     chunk_images: int = 256) -> "PatchDatabase":
        """A database from per-cell latents and token grids, without a model adapter (``key_source="latent"``).

        Args:
            latents: (N, H, W, d) per-cell vectors that form the keys, used as given (official keys:
                the pre-quantisation encoder latents, L2-normalised per cell).
            tokens: (N, H, W) token ids of the same cells: the values.
            codebook: (V, d) the model's codebook (its size and width go into the metadata; and its
                fingerprint unless ``fingerprint`` is given).

        Equals :meth:`build` with ``key_source="latent"`` on the same latents and tokens.
        """
        codebook = _check_codebook(codebook)
        _check_token_grids(tokens, codebook.shape[0])
        expected = (*tokens.shape, codebook.shape[1])
        if not (torch.is_tensor(latents) and latents.is_floating_point()) or latents.shape != expected:
            raise ValueError(f"latents: expected a float tensor (N, H, W, d) = {expected} "
                             f"matching tokens and the codebook width, got {getattr(latents, 'dtype', type(latents))} "
                             f"{tuple(getattr(latents, 'shape', ()))}")
        return cls._from_grids(lambda lo, hi: latents[lo:hi], tokens, codebook, "latent",
                               KeyLayout(neighborhood=neighborhood, hops=hops, border=border), fingerprint, chunk_images)

    @classmethod
    def _from_grids(cls, features, tokens, codebook, key_source, layout, fingerprint, chunk_images) -> "PatchDatabase":
        if chunk_images < 1:
            raise ValueError(f"chunk_images must be >= 1, got {chunk_images}")
        from ..models import codebook_fingerprint

        N, H, W = tokens.shape
        parts = [_grid_entries(features(lo, lo + chunk_images), tokens[lo:lo + chunk_images], layout)
                 for lo in range(0, N, chunk_images)]
        meta = DatabaseMeta(
            layout=layout, codebook_size=codebook.shape[0], embed_dim=codebook.shape[1], grid=(H, W),
            key_source=key_source, model_fingerprint=fingerprint or codebook_fingerprint(codebook), num_images=N,
        )
        return cls(torch.cat([k for k, _ in parts]), torch.cat([v for _, v in parts]), meta)

    @classmethod
    def from_keys(cls, keys: torch.Tensor, values: torch.Tensor, codebook_size: int, embed_dim: int,
                  grid: tuple[int, int], neighborhood: str = "causal", hops=(1,), border: str = "skip",
                  key_source: str = "latent", fingerprint: str = "unknown", num_images: int = 0) -> "PatchDatabase":
        """A database from precomputed (N, key_dim) keys and (N,) token-id values, checked against the layout."""
        meta = DatabaseMeta(
            layout=KeyLayout(neighborhood=neighborhood, hops=hops, border=border), codebook_size=int(codebook_size),
            embed_dim=int(embed_dim), grid=tuple(int(g) for g in grid), key_source=key_source,
            model_fingerprint=fingerprint, num_images=int(num_images),
        )
        return cls(keys.float(), values, meta)

    @classmethod
    def _build_ivfpq(cls, path, meta, count, source, encode, params, nprobe, train_size, keep_keys, chunk_images,
                     resume, progress) -> "PatchDatabase":
        """The chunked, resumable, optionally distributed IVF-PQ build (see :mod:`.ivfpq_build`)."""
        import torch.distributed as dist

        if chunk_images < 1:
            raise ValueError(f"chunk_images must be >= 1, got {chunk_images}")
        if path.exists() and not (path / _META).is_file():
            raise FileExistsError(f"{str(path)!r} exists and is not a database directory; refusing to overwrite it")
        distributed = dist.is_available() and dist.is_initialized()
        rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        manifest = {"meta": meta.to_dict(), "source": ivfpq_build.source_fingerprint(source),
                    "chunk_images": chunk_images, "train_size": train_size, **params}
        work = ivfpq_build.prepare_work_dir(path, manifest, resume, rank)
        if distributed:
            dist.barrier()
        ivfpq_build.encode_chunks(work, count, chunk_images, encode, rank, world, progress)
        if distributed:
            dist.barrier()
        if rank == 0:
            sizes = ivfpq_build.chunk_sizes(work, len(range(0, count, chunk_images)))
            if keep_keys is None:
                keep_keys = sum(sizes) * meta.key_dim * 4 <= KEEP_KEYS_MAX_BYTES
            index = ivfpq_build.load_or_train(work, sizes, train_size=train_size, progress=progress, **params)
            values, keys = ivfpq_build.fill_ivfpq(index, lambda i: ivfpq_build.read_chunk(work, i), len(sizes),
                                                  keep_keys, progress)
            ivfpq_build.say(progress, f"saving {len(values)} entries to {str(path)!r}")
            cls(keys, values, meta, index=index, nprobe=nprobe).save(path)
            shutil.rmtree(work, ignore_errors=True)
        if distributed:
            dist.barrier()
        return cls.load(path)

    # ---- persistence ----------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the database directory atomically (replacing an existing database at ``path``).

        Arrays are streamed to disk a block at a time. Directories of earlier saves to ``path`` that
        were killed (``.<name>.tmp-*`` / ``.<name>.old-*`` of dead processes on this host) are
        finished or removed first. Files and directories get the usual permissions (umask).
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        _recover(path)
        if path.exists() and not (path / _META).is_file():
            raise FileExistsError(f"{str(path)!r} exists and is not a database directory; refusing to overwrite it")
        token = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        tmp, old = path.parent / f".{path.name}.tmp-{token}", path.parent / f".{path.name}.old-{token}"
        os.mkdir(tmp)  # mode 0o777 & ~umask, unlike tempfile.mkdtemp's 0o700
        try:
            names = []
            if self.keys is not None:
                _write_arrays(tmp / _ARRAYS, self.keys, self.values)
                names.append(_ARRAYS)
            if self.index is not None:
                import_faiss().write_index(self.index, str(tmp / INDEX_FILE))
                np.save(tmp / VALUES_FILE, self.values.cpu().numpy().astype(np.int32))
                names += [INDEX_FILE, VALUES_FILE]
            meta = {"format_version": FORMAT_VERSION, **self.meta.to_dict(), "num_entries": len(self),
                    "files": {name: _digest_file(tmp / name) for name in names}}
            meta["meta_sha256"] = _meta_digest(meta)
            with open(tmp / _META, "w") as f:  # written last: a directory with meta.json is complete
                json.dump(meta, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            if path.exists():
                os.replace(path, old)
            os.replace(tmp, path)
        except BaseException:
            if old.exists() and not path.exists():
                os.replace(old, path)
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(old, ignore_errors=True)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, verify: str | bool = "quick") -> "PatchDatabase":
        """Read a database directory written by :meth:`save`.

        ``verify``: ``"quick"`` (default) checks meta.json's own checksum, each file's size and the
        digests of 8 pages spread over each file (a bounded read, whatever the size); ``"full"`` hashes
        every file completely; ``"none"`` checks nothing. ``True`` / ``False`` mean ``"full"`` / ``"none"``.
        Saves to ``path`` that were killed are finished or cleaned up first (where the files allow).
        """
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        mode = {True: "full", False: "none"}.get(verify, verify) if isinstance(verify, bool) else verify
        if mode not in VERIFY_MODES:
            raise ValueError(f"verify: expected one of {VERIFY_MODES} (or a bool), got {verify!r}")
        path = Path(path)
        with contextlib.suppress(OSError):  # a read-only location: load what is there
            _recover(path)
        meta_file = path / _META
        if not meta_file.is_file():
            raise DatabaseError(f"{str(path)!r} is not a database directory (expected {_META})")
        try:
            raw = json.loads(meta_file.read_text())
            if not isinstance(raw, dict):
                raise DatabaseError(f"{str(meta_file)!r}: expected a JSON object, got a JSON {type(raw).__name__}; "
                                    "the file is corrupted or not a database's meta.json")
            if raw.get("format_version") not in _READABLE_VERSIONS:
                raise DatabaseError(f"{str(meta_file)!r}: format_version {raw.get('format_version')!r}, this library "
                                    f"reads {_READABLE_VERSIONS}")
            if mode != "none" and "meta_sha256" in raw and _meta_digest(raw) != raw["meta_sha256"]:
                raise DatabaseError(f"{str(meta_file)!r} does not match its own checksum: it was edited or corrupted "
                                    "(re-save the database from a good copy, or rebuild it)")
            if raw["format_version"] >= 2 and "meta_sha256" not in raw:
                raise KeyError("meta_sha256")
            meta = DatabaseMeta.from_dict(raw)
            records = _file_records(raw)
            if not isinstance(records, dict) or not all(isinstance(r, dict) for r in records.values()):
                raise TypeError("file records must be objects")
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
            if isinstance(e, DatabaseError):
                raise
            raise DatabaseError(f"{str(meta_file)!r} is corrupted or incomplete: {e!r}") from e
        needed = (INDEX_FILE, VALUES_FILE) if meta.index == "ivfpq" else (_ARRAYS,)
        for name in set(needed) | set(records):
            if name not in records or not (path / name).is_file():
                raise DatabaseError(f"{str(path)!r}: an index={meta.index!r} database needs {', '.join(needed)} on disk "
                                    f"and listed in {_META}; {name} is missing")
        try:
            for name, record in records.items():
                _check_file(path / name, record, mode)
        except (KeyError, TypeError, IndexError) as e:
            raise DatabaseError(f"{str(meta_file)!r} is corrupted or incomplete: {e!r}") from e
        index, keys = None, None
        if meta.index == "ivfpq":
            index = _read_faiss_index(path / INDEX_FILE, deep_check=mode == "full")
            values = torch.from_numpy(_read_values(path / VALUES_FILE))
        if _ARRAYS in records:
            try:
                arrays = load_file(str(path / _ARRAYS))
                keys = arrays["keys"]
                if index is None:
                    values = arrays["values"]
            except (SafetensorError, KeyError, OSError) as e:
                raise DatabaseError(f"{str(path / _ARRAYS)!r} is corrupted: {e}") from e
        if len(values) != raw.get("num_entries"):
            raise DatabaseError(f"{str(path)!r}: {len(values)} entries on disk, {raw.get('num_entries')} in {_META}")
        return cls(keys, values, meta, index=index)

    @classmethod
    def from_official(
        cls,
        path: str | os.PathLike,
        nprobe: int = 1,
        codebook_size: int = 16384,
        embed_dim: int = 8,
        grid: tuple[int, int] = (24, 24),
        patches_per_image: int = 506,
    ) -> "PatchDatabase":
        """Import a released AR-RAG database: ``faiss_ivf_pq_opq.index`` + ``next_codes.npy`` in ``path``.

        The key layout is the official one (causal, hop 1, border skip: 4 x ``embed_dim`` = 32-d
        latent keys). Checks: an (OPQ +) IVF-PQ index of dimension 32 with L2 metric, one token id
        per entry in [0, ``codebook_size``), ``1 <= nprobe <= nlist``, and the index's contents
        (finite float arrays, list sizes, ids 0..N-1 each once: see
        :func:`arrag_kernels.retrieval.faiss_index.check_ivfpq_contents`); ``nprobe`` is set on the
        inner IVF. The database holds no exact keys (``keys is None``).
        """
        path = Path(path)
        for name in (INDEX_FILE, VALUES_FILE):
            if not (path / name).is_file():
                raise DatabaseError(f"{str(path)!r}: expected the official files {INDEX_FILE} and {VALUES_FILE}, "
                                    f"{name} is missing")
        index = _read_faiss_index(path / INDEX_FILE, deep_check=True)
        values = _read_values(path / VALUES_FILE)
        meta = DatabaseMeta(
            layout=KeyLayout(), codebook_size=codebook_size, embed_dim=embed_dim, grid=tuple(grid),
            key_source="latent", model_fingerprint="official", num_images=len(values) // patches_per_image,
            index="ivfpq",
        )
        return cls(None, torch.from_numpy(values), meta, index=index, nprobe=nprobe)

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
        db.keys = None if self.keys is None else self.keys.to(device=device, dtype=dtype or self.keys.dtype)
        db.values = self.values.to(device=device)
        db.meta = self.meta
        db.index = self.index  # shared (nprobe included), on the host; device searches upload their arrays
        db._shards = self._shards
        db._search = None
        return db

    def shard(self, devices) -> "PatchDatabase":
        """A view of this ``index="ivfpq"`` database whose device search spreads the inverted lists over
        ``devices`` (e.g. ``["cuda:0", "cuda:1"]``; None: no sharding), kept by :meth:`to`.

        Each device holds contiguous lists with about equal entry counts; queries are probed on their
        own device (of the same type as ``devices``), each device scans the probed lists it holds and
        the partial top-k are merged on the queries' device: the same neighbours as unsharded. CPU
        queries then use the device search too, not FAISS. See
        :class:`arrag_kernels.retrieval.search.DeviceIVFPQSearch`.
        """
        db = self.to()
        db._shards = devices
        make_search(db.meta.index, db.keys, db.index, db.nprobe, db._shards)  # raises now if it cannot shard
        return db

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q, key_dim) queries -> ((Q, k) float32 squared L2 distances, (Q, k) int64 entry ids)."""
        if queries.dim() != 2 or queries.shape[1] != self.meta.key_dim:
            raise ValueError(f"queries must be (Q, {self.meta.key_dim}), got {tuple(queries.shape)}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k: expected an int >= 1 neighbours per query, got {k!r}")
        if k > len(self):
            raise ValueError(f"k = {k} is larger than the database ({len(self)} entries); use k <= {len(self)}")
        if self._search is None:
            self._search = make_search(self.meta.index, self.keys, self.index, self.nprobe, self._shards)
        return self._search.search(queries, k)

    def retrieve(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Like :meth:`search` but returns the entries' token ids (-1 for padding) instead of row ids."""
        dist, ids = self.search(queries, k)
        # IVF-PQ pads missing neighbours with id -1; they come back as token -1, which the DAiD and
        # FAiD steps ignore.
        tokens = self.values.to(ids.device)[ids.clamp_min(0)]
        return dist, torch.where(ids >= 0, tokens, -1)
