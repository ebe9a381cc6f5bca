"""Building a partitioned IVF-PQ database with Ray Data (``pip install 'arrag-kernels[distributed]'``).

:func:`build_with_ray` runs the same three steps as the ``torch.distributed`` build (see
:mod:`.ivfpq_build`), over a Ray cluster (or a local Ray):

1. **encode**: a ``ray.data`` dataset of the images (files, parquet shards, or any dataset with an id
   and an image column) is grouped into chunks of ``chunk_images`` consecutive ids and mapped by a
   pool of ``concurrency`` encoder actors (``num_gpus`` each on a GPU cluster); each actor writes the
   keys and values of the chunks it gets to the work directory next to ``path`` (a shared file
   system on a multi-node cluster). Chunks already there (a resumed build) are not encoded again.
2. **train**: the driver trains the (OPQ +) IVF-PQ quantizers once on a sample of the chunks.
3. **fill**: ``parts`` Ray tasks each fill their part (contiguous chunks) from the trained index; the
   driver checks the parts and publishes the partitioned database (:mod:`.parts`) at ``path``.

A chunk's images go through the encoder exactly as in :meth:`PatchDatabase.build` (same batches), so
the parts hold, list by list, the ids and codes of a single-process build.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..config import KeyLayout
from ..models import MemberUnavailable, as_tokenizer
from . import ivfpq_build
from .builders import ImageEncoder, resolve_keep_keys
from .images import normalise_image_source
from .parts import check_parts

_CHUNK = "__arrag_chunk"


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise ImportError("build_with_ray needs Ray Data: pip install 'arrag-kernels[distributed]' "
                          "(or pip install 'ray[data]')") from e
    return ray


def _encoder(adapter_factory: Callable, layout: KeyLayout, key_source: str, batch_size: int) -> ImageEncoder:
    adapter = as_tokenizer(adapter_factory())
    try:
        adapter.grid
    except MemberUnavailable as e:
        raise ValueError(f"build_with_ray needs an adapter at a fixed grid, {type(adapter).__name__} picks its grid "
                         "per call: make adapter_factory return one built with grid=(H, W)") from e
    return ImageEncoder(adapter, layout, key_source, batch_size)


def _decode_images(column: np.ndarray):
    """A batch's image column -> what :class:`ImageEncoder` reads: file paths, encoded image bytes (e.g. a
    parquet shard's), (3, H, W) float arrays in [-1, 1], or (H, W, 3) uint8 arrays."""
    import io

    from PIL import Image

    first = column[0]
    if isinstance(first, (str, os.PathLike)):
        return [str(x) for x in column]
    if isinstance(first, (bytes, bytearray)):
        return [Image.open(io.BytesIO(x)) for x in column]
    array = np.stack(list(column)) if column.dtype == object else column
    if np.issubdtype(array.dtype, np.floating) and array.ndim == 4 and array.shape[1] == 3:
        return torch.from_numpy(np.ascontiguousarray(array))
    if array.dtype == np.uint8 and array.ndim == 4 and array.shape[-1] == 3:
        return [Image.fromarray(a) for a in array]
    raise ValueError(f"image column: expected file paths, encoded image bytes, (3, H, W) float arrays or (H, W, 3) "
                     f"uint8 arrays, got {type(first).__name__} {getattr(first, 'dtype', '')} "
                     f"{getattr(first, 'shape', '')}")


class _ChunkEncoder:
    """A Ray Data actor: encodes the chunk of images it is given and writes the chunk file."""

    def __init__(self, adapter_factory, layout, key_source, batch_size, work, chunk_images, count, id_column,
                 image_column):
        self.encode = _encoder(adapter_factory, layout, key_source, batch_size)
        self.work, self.chunk_images, self.count = Path(work), chunk_images, count
        self.id_column, self.image_column = id_column, image_column

    def __call__(self, group: dict) -> dict:
        ids = np.asarray(group[self.id_column]).astype(np.int64)
        order = np.argsort(ids, kind="stable")
        chunk = int(ids.min()) // self.chunk_images
        lo, hi = chunk * self.chunk_images, min((chunk + 1) * self.chunk_images, self.count)
        if not np.array_equal(ids[order], np.arange(lo, hi)):
            raise ValueError(f"{self.id_column!r}: the ids of the dataset must be 0..{self.count - 1}, each once; "
                             f"chunk {chunk} should hold ids {lo}..{hi - 1}, got {len(ids)} ids "
                             f"{sorted(set(ids.tolist()))[:8]}...")
        keys, values = self.encode(_decode_images(np.asarray(group[self.image_column])[order]), first=lo)
        ivfpq_build.write_chunk(self.work, chunk, keys, values)
        return {"chunk": np.array([chunk]), "entries": np.array([len(values)])}


def _dataset(images, id_column: str, image_column: str):
    """(source, image count, fingerprint of the source or None if unknown): the source is a ``ray.data.Dataset``
    (given, or read from parquet shards) or a list of image files / a tensor (made into a dataset per chunk)."""
    ray = _import_ray()
    if isinstance(images, ray.data.Dataset):
        missing = {id_column, image_column} - set(images.columns())
        if missing:
            raise ValueError(f"the dataset needs the columns {id_column!r} (the image's position 0..N-1) and "
                             f"{image_column!r}; missing {sorted(missing)} (has {images.columns()})")
        files = images.input_files()
        return images, images.count(), ivfpq_build.source_fingerprint(files) if files else None
    if isinstance(images, (list, tuple)) and images and all(str(p).endswith(".parquet") for p in images):
        return _dataset(ray.data.read_parquet([str(p) for p in images]), id_column, image_column)
    count, source = normalise_image_source(images)
    if not isinstance(source, torch.Tensor) and not all(isinstance(p, (str, os.PathLike)) for p in source):
        raise TypeError("build_with_ray: list items must be image paths (PIL images do not travel to the "
                        "workers: save them, or give a ray.data dataset)")
    return source, count, ivfpq_build.source_fingerprint(source)


def _chunk_blocks(source, chunks: list[int], chunk_images: int, id_column: str, image_column: str):
    """A ray dataset of the images of ``chunks`` (file paths or a tensor's rows), one block per chunk."""
    import pandas as pd

    ray = _import_ray()
    blocks = []
    for i in chunks:
        lo, hi = i * chunk_images, min((i + 1) * chunk_images, len(source))
        cells = [source[j].float().numpy() if isinstance(source, torch.Tensor) else str(source[j])
                 for j in range(lo, hi)]
        blocks.append(pd.DataFrame({id_column: np.arange(lo, hi), image_column: cells}))
    return ray.data.from_pandas(blocks)


def _fill_part(work, plan, r, sizes, meta, count, chunk_images, keep_keys, nprobe):
    from .database import PatchDatabase

    ivfpq_build.fill_part(PatchDatabase, Path(work), plan, r, sizes, meta, count, chunk_images, keep_keys, nprobe)
    return r


def build_with_ray(
    images,
    adapter_factory: Callable,
    path: str | os.PathLike,
    parts: int | None = None,
    concurrency: int = 2,
    num_cpus: float = 1,
    num_gpus: float = 0,
    id_column: str = "id",
    image_column: str = "image",
    neighborhood: str = "causal",
    hops=(1,),
    border: str = "skip",
    key_source: str = "latent",
    batch_size: int = 16,
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
    progress: bool = True,
):
    """Build an IVF-PQ database at ``path`` with Ray Data: the images encoded by a pool of ``concurrency``
    actors, the index filled in ``parts`` parts (default: ``concurrency``) by Ray tasks.

    Args:
        images: a folder or a list of image files (numbered in :meth:`PatchDatabase.build`'s order), a
            float tensor (B, 3, H, W) in [-1, 1], a list of ``.parquet`` shards, or a ``ray.data.Dataset``;
            the last two need an ``id_column`` (the image's position 0..N-1, each once) and an
            ``image_column`` (file paths, encoded image bytes, (3, H, W) float or (H, W, 3) uint8 arrays).
        adapter_factory: a picklable callable returning the model (or its adapter) on the worker's
            device, at a fixed grid; called once per actor and once on the driver (for the metadata).
        num_cpus, num_gpus: CPUs and GPUs per encoder actor (``num_gpus=1`` on a GPU cluster). A dataset
            given as parquet shards or a ``ray.data.Dataset`` is grouped by chunk (a shuffle), which needs
            CPUs besides the actors'.
        The other arguments are :meth:`PatchDatabase.build`'s.

    Ray must be initialised (``ray.init(...)``) by the caller. The work directory next to ``path`` must
    be reachable from every Ray node. A killed build resumes (finished chunks and parts are kept)
    unless the source has no fingerprint (a dataset that reads no files). Returns the checked parts
    (:func:`~arrag_kernels.retrieval.parts.check_parts`) of the partitioned database at ``path``, or with
    ``merge=True`` (small databases) the merged :class:`PatchDatabase` saved there instead.
    """
    ray = _import_ray()
    from .database import PatchDatabase

    if not ray.is_initialized():
        raise RuntimeError("build_with_ray: call ray.init(...) first (e.g. ray.init(address='auto') on a cluster)")
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1 encoder actors, got {concurrency}")
    path = Path(path)
    ivfpq_build.check_target(path, chunk_images)
    layout = KeyLayout(neighborhood=neighborhood, hops=hops, border=border)
    source, count, fingerprint = _dataset(images, id_column, image_column)
    meta = _encoder(adapter_factory, layout, key_source, batch_size).meta(count, "ivfpq")
    num_chunks = -(-count // chunk_images)
    plan = ivfpq_build.plan_parts(num_chunks, parts or concurrency)
    params = dict(nlist=nlist, m=m, nbits=nbits, opq=opq)
    manifest = ivfpq_build.build_manifest(meta, fingerprint, chunk_images, train_size, params)
    work = ivfpq_build.prepare_work_dir(path, manifest, resume and fingerprint is not None, rank=0)

    todo = set(ivfpq_build.missing_chunks(work, range(num_chunks)))
    if todo:
        ivfpq_build.say(progress, f"encoding {len(todo)} of {num_chunks} chunks with {concurrency} Ray actors")

        encoder = dict(fn_constructor_args=(adapter_factory, layout, key_source, batch_size, str(work), chunk_images,
                                            count, id_column, image_column),
                       batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=concurrency), num_cpus=num_cpus,
                       num_gpus=num_gpus or None)
        if isinstance(source, ray.data.Dataset):  # rows in any blocks: group them by chunk

            def with_chunk(batch: dict) -> dict:
                batch[_CHUNK] = np.asarray(batch[id_column]).astype(np.int64) // chunk_images
                return batch

            rows = source.map_batches(with_chunk, batch_format="numpy")
            if len(todo) < num_chunks:  # resuming: only the missing chunks
                rows = rows.filter(lambda row: int(row[_CHUNK]) in todo)
            grouped = rows.groupby(_CHUNK, num_partitions=min(len(todo), 64))
            done = grouped.map_groups(_ChunkEncoder, **encoder).take_all()
        else:  # one block per chunk, one batch per block
            blocks = _chunk_blocks(source, sorted(todo), chunk_images, id_column, image_column)
            done = blocks.map_batches(_ChunkEncoder, batch_size=None, **encoder).take_all()
        left = ivfpq_build.missing_chunks(work, range(num_chunks))
        if left:
            raise ValueError(f"the dataset holds no images with ids in chunk {left[0]} (ids {left[0] * chunk_images}.."
                             f"{min((left[0] + 1) * chunk_images, count) - 1}): {id_column!r} must number the "
                             f"{count} images 0..{count - 1}; {len(done)} chunks were encoded")
    sizes = ivfpq_build.chunk_sizes(work, num_chunks)
    ivfpq_build.load_or_train(work, sizes, train_size=train_size, progress=progress, **params)
    keep_keys = resolve_keep_keys(keep_keys, sizes, meta.key_dim)
    ivfpq_build.say(progress, f"filling {len(plan)} parts with Ray tasks")
    fill = ray.remote(num_cpus=1)(_fill_part)
    ray.get([fill.remote(str(work), plan, r, sizes, meta, count, chunk_images, keep_keys, nprobe)
             for r in range(len(plan))])
    ivfpq_build.finish_parts(work, path, len(plan), merge, progress)
    return PatchDatabase.load(path) if merge else check_parts(path)

