"""Ways to make a :class:`~arrag_kernels.retrieval.PatchDatabase`: encode images with a model's VQ
tokenizer (:func:`build`, flat in memory or IVF-PQ on disk), from token grids or latents without a
model (:func:`from_tokens`, :func:`from_latents`), from precomputed keys (:func:`from_keys`), or by
importing a released AR-RAG database (:func:`from_official`).

Each takes the database class first: they are its classmethods (``PatchDatabase.build`` etc.).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..config import KeyLayout, check_int
from ..models import GridPerCall, MemberUnavailable, as_tokenizer
from ..ops import feature_neighbor_keys, retrieval_positions
from . import ivfpq_build, parts
from .faiss_index import INDEX_FILE, VALUES_FILE, import_faiss, inner_ivfpq
from .images import iter_image_batches, normalise_image_source
from .meta import KEY_SOURCES, OFFICIAL_FINGERPRINT, DatabaseError, DatabaseMeta
from .search import INDEX_TYPES
from .storage import read_faiss_index, read_values

if TYPE_CHECKING:
    from .database import PatchDatabase

# index="ivfpq" builds keep the exact keys (in RAM and on disk) up to this many bytes by default.
KEEP_KEYS_MAX_BYTES = 1 << 28


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


def check_finite_keys(keys: torch.Tensor, what: str = "keys") -> None:
    """Raise DatabaseError if a key row holds NaN or inf (checked in row blocks: no full-size mask)."""
    step = max(1, (1 << 22) // max(1, keys.shape[-1]))
    for start in range(0, keys.shape[0], step):
        bad = ~torch.isfinite(keys[start : start + step]).all(dim=-1)
        if bad.any():
            row = start + int(bad.nonzero()[0, 0])
            raise DatabaseError(
                f"{what}: row {row} holds NaN or inf; keys must be finite (check the images and the encoder's dtype)"
            )


# ---- building -------------------------------------------------------------------------
class ImageEncoder:
    """Images -> (keys, values) of their kept target patches, with a model's tokenizer ``adapter`` (at a
    fixed grid): what :func:`build` and its distributed front ends (:mod:`.ray_build`) encode with."""

    def __init__(self, adapter, layout: KeyLayout, key_source: str, batch_size: int):
        if key_source not in KEY_SOURCES:
            raise ValueError(f"key_source: expected one of {KEY_SOURCES}, got {key_source!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.adapter, self.layout, self.key_source, self.batch_size = adapter, layout, key_source, batch_size
        self.codebook = adapter.codebook().float()

    def __call__(self, src, bar=None, first: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (n, key_dim) and values (n,) of the images ``src`` (numbered from ``first`` in error messages),
        encoded ``batch_size`` at a time; ``bar`` (a tqdm bar) counts the images."""
        keys, values = [], []
        for batch in iter_image_batches(src, self.adapter.image_size, self.batch_size):
            latents, tokens = self.adapter.encode(batch)
            k, v = _grid_entries(self.codebook[tokens] if self.key_source == "codebook" else latents, tokens,
                                 self.layout)
            check_finite_keys(k, f"keys of images {first}..{first + batch.shape[0] - 1}")
            first += batch.shape[0]
            keys.append(k)
            values.append(v)
            if bar is not None:
                bar.update(batch.shape[0])
        return torch.cat(keys), torch.cat(values)

    def meta(self, num_images: int, index: str) -> DatabaseMeta:
        a = self.adapter
        return DatabaseMeta(layout=self.layout, codebook_size=a.codebook_size, embed_dim=a.embed_dim,
                            grid=tuple(a.grid), key_source=self.key_source, model_fingerprint=a.fingerprint(),
                            num_images=num_images, index=index)


def _image_sizes(source) -> set[tuple[int, int]]:
    """The distinct (width, height) of a list of image paths / PIL images (files: read from their headers)."""
    from PIL import Image

    sizes = set()
    for item in source:
        if isinstance(item, Image.Image):
            sizes.add(item.size)
        elif isinstance(item, (str, os.PathLike)):
            try:
                with Image.open(item) as im:
                    sizes.add(im.size)
            except OSError as e:
                raise ValueError(f"cannot read image {str(item)!r}: {e}") from e
        else:
            raise TypeError(f"images: list items must be paths or PIL images, got {type(item).__name__}")
    return sizes


def _at_images_grid(adapter, source):
    """``adapter``, or for a family that picks its grid per call (:class:`arrag_kernels.models.GridPerCall`,
    built without a grid) its tokenizer at the grid the images' size gives: a tensor's (H, W) pixels,
    or the common size of image files / PIL images (centre-cropped to a square, as every build does)."""
    try:
        adapter.grid
        return adapter
    except MemberUnavailable:
        if not isinstance(adapter, GridPerCall):
            raise
    f = adapter.pixels_per_token
    if isinstance(source, torch.Tensor):
        height, width = source.shape[-2:]
    else:
        sizes = _image_sizes(source)
        if len(sizes) != 1:
            raise ValueError(f"the images have {len(sizes)} different sizes (e.g. {sorted(sizes)[:3]}) and "
                             f"{type(adapter).__name__} picks its grid from the images' size: give images of one "
                             "size, or build with an adapter at a fixed grid (e.g. Emu3Adapter(model, grid=(H, W)))")
        height = width = min(sizes.pop())  # (w, h) centre-cropped to a square
    if height % f or width % f:
        raise ValueError(f"images of {height} x {width} pixels do not split into {f}-pixel tokens, which "
                         f"{type(adapter).__name__} reads the grid from; resize them to multiples of {f} or build with "
                         "an adapter at a fixed grid (e.g. Emu3Adapter(model, grid=(H, W)))")
    return adapter.at_grid((int(height) // f, int(width) // f))


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
    merge: bool = False,
) -> "PatchDatabase":
    """Encode images with the model's own VQ tokenizer and collect one entry per kept target patch.

    Args:
        images: a folder (searched recursively), a list of paths or PIL images, or a float tensor
            (B, 3, H, W) in [-1, 1]. Images are centre-cropped and resized to the model's size.
        model: a supported model (e.g. HF ``JanusForConditionalGeneration``), its adapter, or any
            :class:`arrag_kernels.models.ImageTokenizer`. Families that pick their grid per call (Emu3,
            GLM-Image) take it from the images' size (which must then be one size, a whole number of tokens).
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
    ``torch.distributed`` (W ranks, one shared file system) the build is split into W parts:
    rank r encodes a contiguous share of the chunks, rank 0 trains (the others wait), rank r
    fills part r from the trained index, and ``path`` becomes a partitioned database
    (:mod:`arrag_kernels.retrieval.parts`; no process holds every entry): every rank returns its
    own part (local ids; global id = ``db.meta.part.first_id`` + id). ``merge=True`` (small
    databases only) has rank 0 merge the parts in memory into one database at ``path`` instead,
    which every rank returns. Either way the lists hold the same ids and codes as a
    single-process build. A finished part is kept when a killed build is resumed.
    """
    layout = KeyLayout(neighborhood=neighborhood, hops=hops, border=border)
    if index not in INDEX_TYPES:
        raise ValueError(f"index: expected one of {INDEX_TYPES}, got {index!r}")
    count, source = normalise_image_source(images)
    encode = ImageEncoder(_at_images_grid(as_tokenizer(model), source), layout, key_source, batch_size)
    meta = encode.meta(count, index)

    from tqdm.auto import tqdm

    if index == "ivfpq":
        if path is None:
            raise ValueError("index='ivfpq' builds on disk: pass path=<database directory>")
        return _build_ivfpq(
            cls, Path(path), meta, count, source, lambda lo, hi: encode(source[lo:hi], first=lo),
            dict(nlist=nlist, m=m, nbits=nbits, opq=opq), nprobe, train_size, keep_keys, chunk_images, resume,
            progress, merge,
        )
    with tqdm(total=count, desc="encoding images", unit="img", disable=not progress) as bar:
        keys, values = encode(source, bar)
    return cls(keys, values, meta)


def from_tokens(cls, tokens: torch.Tensor, codebook: torch.Tensor, neighborhood: str = "causal", hops=(1,),
                border: str = "skip", fingerprint: str | None = None, chunk_images: int = 256) -> "PatchDatabase":
    """A database from token grids, without a model adapter (``key_source="codebook"``).

    Args:
        tokens: (N, H, W) integer token ids of N real images (e.g. a VQ tokenizer's output).
        codebook: (V, d) the vectors a generated token contributes to a decode-time query, used
            as given: pass the same (usually L2-normalised) rows to the decode-time query.
        neighborhood, hops, border: the key layout, see :class:`arrag_kernels.KeyLayout`.
        fingerprint: stored model fingerprint; default :func:`arrag_kernels.models.codebook_fingerprint`
            of ``codebook``, which a model's adapter recognises as its own when ``codebook`` is its
            ``codebook()`` (see :meth:`PatchDatabase.check_compatible`).

    Equals :meth:`build` with ``key_source="codebook"`` on the same tokens (keys, values, metadata).
    """
    codebook = _check_codebook(codebook)
    _check_token_grids(tokens, codebook.shape[0])
    table = codebook.to(tokens.device)
    return _from_grids(cls, lambda lo, hi: table[tokens[lo:hi].long()], tokens, codebook, "codebook",
                           KeyLayout(neighborhood=neighborhood, hops=hops, border=border), fingerprint, chunk_images)


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
    return _from_grids(cls, lambda lo, hi: latents[lo:hi], tokens, codebook, "latent",
                           KeyLayout(neighborhood=neighborhood, hops=hops, border=border), fingerprint, chunk_images)


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


def resolve_keep_keys(keep_keys: bool | None, sizes: list[int], key_dim: int) -> bool:
    """``keep_keys``, or by default whether the exact keys of an IVF-PQ build (``sizes``: entries per chunk)
    take at most KEEP_KEYS_MAX_BYTES."""
    return sum(sizes) * key_dim * 4 <= KEEP_KEYS_MAX_BYTES if keep_keys is None else keep_keys


def _build_ivfpq(cls, path, meta, count, source, encode, params, nprobe, train_size, keep_keys, chunk_images,
                 resume, progress, merge) -> "PatchDatabase":
    """The chunked, resumable, optionally distributed IVF-PQ build (see :mod:`.ivfpq_build`)."""
    import torch.distributed as dist

    ivfpq_build.check_target(path, chunk_images)
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    num_chunks = -(-count // chunk_images)
    plan = ivfpq_build.plan_parts(num_chunks, world)  # every rank fails alike when there are too few chunks
    manifest = ivfpq_build.build_manifest(meta, ivfpq_build.source_fingerprint(source), chunk_images, train_size,
                                          params)
    work = ivfpq_build.prepare_work_dir(path, manifest, resume, rank)
    if distributed:
        dist.barrier()
    ivfpq_build.encode_chunks(work, count, chunk_images, encode, plan[rank], rank if distributed else None, progress)
    if distributed:
        dist.barrier()
    sizes = ivfpq_build.chunk_sizes(work, num_chunks)  # every rank has encoded its chunks
    keep_keys = resolve_keep_keys(keep_keys, sizes, meta.key_dim)
    if rank == 0:
        index = ivfpq_build.load_or_train(work, sizes, train_size=train_size, progress=progress, **params)
    if world == 1:  # one piece, filled and saved by this process
        values, keys = ivfpq_build.fill_ivfpq(index, lambda i: ivfpq_build.read_chunk(work, i), range(num_chunks),
                                              keep_keys, progress)
        ivfpq_build.say(progress, f"saving {len(values)} entries to {str(path)!r}")
        cls(keys, values, meta, index=index, nprobe=nprobe).save(path)
        shutil.rmtree(work, ignore_errors=True)
        return cls.load(path)
    dist.barrier()  # the trained index is checkpointed
    ivfpq_build.fill_part(cls, work, plan, rank, sizes, meta, count, chunk_images, keep_keys, nprobe, progress)
    dist.barrier()
    if rank == 0:
        ivfpq_build.finish_parts(work, path, len(plan), merge, progress)
    dist.barrier()
    return cls.load(path if merge else path / parts.part_dir_name(rank))


def from_official(
    cls,
    path: str | os.PathLike,
    nprobe: int = 1,
    codebook_size: int = 16384,
    embed_dim: int = 8,
    grid: tuple[int, int] = (24, 24),
    patches_per_image: int | None = None,
) -> "PatchDatabase":
    """Import a released AR-RAG database: ``faiss_ivf_pq_opq.index`` + ``next_codes.npy`` in ``path``.

    The key layout is the official one (causal, hop 1, border skip: 4 x ``embed_dim`` = 32-d
    latent keys). Checks: an (OPQ +) IVF-PQ index of dimension 4 x ``embed_dim`` with L2 metric,
    one token id per entry in [0, ``codebook_size``), ``1 <= nprobe <= nlist``, and the index's
    contents (finite float arrays, list sizes, ids 0..N-1 each once: see
    :func:`arrag_kernels.retrieval.faiss_index.check_ivfpq_contents`); ``nprobe`` is set on the
    inner IVF. The database holds no exact keys (``keys is None``).

    The files store neither the codebook size nor the grid: ``codebook_size`` (default: Janus-Pro's
    16384) and ``grid`` (default: 24 x 24, 384-px images) are assumptions, only checked against the
    token ids (see :func:`describe_official`). ``patches_per_image`` (default: the positions of
    ``grid`` that have a key, 506 on 24 x 24) gives ``meta.num_images``.
    """
    path = Path(path)
    for name in (INDEX_FILE, VALUES_FILE):
        if not (path / name).is_file():
            raise DatabaseError(f"{str(path)!r}: expected the official files {INDEX_FILE} and {VALUES_FILE}, "
                                f"{name} is missing")
    index = read_faiss_index(path / INDEX_FILE, deep_check=True)
    values = read_values(path / VALUES_FILE)
    layout = KeyLayout()
    grid = (check_int("grid[0]", grid[0]), check_int("grid[1]", grid[1]))
    if patches_per_image is None:
        patches_per_image = int(retrieval_positions(grid, layout).sum())
    if patches_per_image < 1:
        raise ValueError(f"patches_per_image: expected >= 1 keyed positions per image, got {patches_per_image} "
                         f"(grid {grid[0]} x {grid[1]} has none under the official layout: pass a larger grid)")
    meta = DatabaseMeta(
        layout=layout, codebook_size=codebook_size, embed_dim=embed_dim, grid=grid,
        key_source="latent", model_fingerprint=OFFICIAL_FINGERPRINT, num_images=len(values) // patches_per_image,
        index="ivfpq",
    )
    return cls(None, torch.from_numpy(values), meta, index=index, nprobe=nprobe)


def describe_official(db: "PatchDatabase") -> tuple[str, str]:
    """Two lines about an imported database (:func:`from_official`): what its files say (entries,
    index structure, key width, token-id range) and what was assumed because they do not say it
    (codebook size, grid, images)."""
    ivf = inner_ivfpq(db.index)
    opq = "OPQ + " if isinstance(db.index, import_faiss().IndexPreTransform) else ""  # a d x d rotation
    m = db.meta
    facts = (f"{len(db)} entries, {opq}IVF-PQ with {ivf.nlist} lists and {ivf.pq.M} x {ivf.pq.nbits}-bit codes, "
             f"{db.index.d}-d keys, token ids {int(db.values.min())}..{int(db.values.max())}, "
             f"nprobe {db.nprobe} (set on the inner IVF)")
    assumed = (f"assumed (the files do not store them): codebook of {m.codebook_size} codes, grid {m.grid[0]} x "
               f"{m.grid[1]} (so about {m.num_images} images)")
    return facts, assumed
