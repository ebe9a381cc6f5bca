"""Resumable, multi-process building of IVF-PQ databases from key chunks kept on disk.

A build runs in a work directory next to the target (``.<name>.partial``):

1. **encode**: images are cut into global chunks of ``chunk_images``; each chunk's keys (float32)
   and values (int32) go to ``chunk-<i>.safetensors`` (written to a temporary name, then renamed,
   so a chunk file is complete or absent). A build in W parts gives part r the contiguous chunks
   :func:`plan_parts` assigns it; under ``torch.distributed`` rank r encodes them (under Ray, see
   :mod:`.ray_build`, a pool of actors encodes the chunks as they come). Chunk files that already exist
   are not encoded again.
2. **train**: a sample of ``train_size`` keys drawn from every chunk trains the index (once: rank 0,
   or the Ray driver); the trained, empty index is checkpointed to ``trained.index``.
3. **fill**: one piece: the chunks are added in order (ids 0..N-1 follow the image order) and the
   database is saved atomically. In parts: every worker adds its own chunks to a copy of the
   trained index and saves its part (:mod:`.parts`) in the work directory (a finished part is kept
   on resume), then the lead publishes the partitioned database (or merges it in memory, when asked).
   The work directory is removed only after that.

``manifest.json`` records what the chunks were made from (image count and fingerprint, chunk size,
key layout, index parameters); a work directory with another manifest is never reused.
Memory per worker stays bounded by one chunk plus its part's index (M bytes + 8 bytes of id per
entry; the trainer also holds the training sample), unless the exact keys are kept.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import parts
from .faiss_index import import_faiss, make_ivfpq_index
from .meta import ARRAYS_FILE, TRAINED_FILE, DatabaseError, PartOf

MANIFEST = "manifest.json"


def work_dir(path: Path) -> Path:
    return path.parent / f".{path.name}.partial"


def say(progress: bool, message: str) -> None:
    """A status line between progress bars (stderr, like the bars), when ``progress`` is on."""
    if progress:
        from tqdm.auto import tqdm

        tqdm.write(message, file=sys.stderr)


def _chunk_file(work: Path, i: int) -> Path:
    return work / f"chunk-{i:06d}.safetensors"


def _atomic_write(target: Path, write: Callable[[str], None]) -> None:
    tmp = target.with_name(target.name + ".tmp")
    write(str(tmp))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, target)


def source_fingerprint(source) -> str:
    """A cheap identity of an image source: tensor bytes, or file names + sizes + mtimes."""
    h = hashlib.sha256()
    if isinstance(source, torch.Tensor):
        h.update(source.detach().cpu().contiguous().numpy().tobytes())
    else:
        for item in source:
            if isinstance(item, (str, os.PathLike)):
                st = os.stat(item)
                h.update(f"{os.fspath(item)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
            else:
                h.update(f"{type(item).__name__}|{getattr(item, 'size', '')}\n".encode())
    return h.hexdigest()


def check_target(path: Path, chunk_images: int) -> None:
    """What every front end of the build checks before any work: ``chunk_images`` >= 1, and ``path`` absent
    or a database (one piece or partitioned) that the build may replace."""
    from .meta import META_FILE

    if chunk_images < 1:
        raise ValueError(f"chunk_images must be >= 1, got {chunk_images}")
    if path.exists() and not ((path / META_FILE).is_file() or parts.is_partitioned(path)):
        raise FileExistsError(f"{str(path)!r} exists and is not a database directory; refusing to overwrite it")


def build_manifest(meta, source: str | None, chunk_images: int, train_size: int | None, params: dict) -> dict:
    """The inputs a work directory records (:func:`prepare_work_dir` resumes only a build of the same ones)."""
    return {"meta": meta.to_dict(), "source": source, "chunk_images": chunk_images, "train_size": train_size,
            **params}


def prepare_work_dir(path: Path, manifest: dict, resume: bool, rank: int) -> Path:
    """Rank 0 creates (or checks, or resets) the work directory; callers barrier before other ranks use it."""
    work = work_dir(path)
    if rank != 0:
        return work
    if work.exists():
        try:
            old = json.loads((work / MANIFEST).read_text())
        except (OSError, json.JSONDecodeError):
            old = None
        if not resume or old != manifest:
            shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    if not (work / MANIFEST).is_file():
        _atomic_write(work / MANIFEST, lambda p: Path(p).write_text(json.dumps(manifest, indent=2)))
    return work


def plan_parts(num_chunks: int, parts: int) -> list[range]:
    """The chunks of each of ``parts`` parts: contiguous ranges, in order, as equal in length as they can be."""
    if not 1 <= parts <= num_chunks:
        raise ValueError(f"cannot split {num_chunks} chunks of images into {parts} parts: every part needs at least "
                         f"one chunk (use a smaller chunk_images, or fewer parts / workers)")
    return [range(r * num_chunks // parts, (r + 1) * num_chunks // parts) for r in range(parts)]


def encode_chunks(
    work: Path,
    num_images: int,
    chunk_images: int,
    encode: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]],
    chunks: range,
    worker: int | None = None,
    progress: bool = True,
) -> int:
    """Encode the missing ones of ``chunks``; ``encode(lo, hi)`` returns keys (n, D) and values (n,) of images
    lo..hi-1. ``worker`` (a rank or part number, None for a single process) labels the messages.

    Returns the number of chunks encoded by this call.
    """
    from tqdm.auto import tqdm

    todo = missing_chunks(work, chunks)
    if len(todo) < len(chunks):
        say(progress, f"resuming the build in {str(work)!r}: {len(chunks) - len(todo)} of {len(chunks)} chunks"
                      f"{'' if worker is None else f' of worker {worker}'} already encoded, {len(todo)} to go")
    bar = tqdm(todo, desc=f"encoding chunks (worker {worker or 0})", unit="chunk", disable=not progress,
               position=worker or 0)
    for i in bar:
        write_chunk(work, i, *encode(i * chunk_images, min((i + 1) * chunk_images, num_images)))
    return len(todo)


def missing_chunks(work: Path, chunks: range) -> list[int]:
    return [i for i in chunks if not _chunk_file(work, i).is_file()]


def write_chunk(work: Path, i: int, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Save chunk ``i``'s keys (float32) and values (int32) atomically: the file is complete or absent."""
    from safetensors.torch import save_file

    arrays = {"keys": keys.float().cpu().contiguous(), "values": values.to(torch.int32).cpu().contiguous()}
    _atomic_write(_chunk_file(work, i), lambda p: save_file(arrays, p))


def read_chunk(work: Path, i: int) -> tuple[np.ndarray, np.ndarray]:
    from safetensors.numpy import load_file

    arrays = load_file(str(_chunk_file(work, i)))
    return arrays["keys"], arrays["values"]


def chunk_sizes(work: Path, num_chunks: int) -> list[int]:
    from safetensors import safe_open

    sizes = []
    for i in range(num_chunks):
        f = _chunk_file(work, i)
        if not f.is_file():
            raise FileNotFoundError(f"chunk {i} ({str(f)!r}) is missing: did every rank finish encoding?")
        with safe_open(str(f), framework="numpy") as s:
            sizes.append(s.get_slice("values").get_shape()[0])
    return sizes


def train_ivfpq(
    read: Callable[[int], np.ndarray],
    sizes: list[int],
    nlist: int,
    m: int,
    nbits: int,
    opq: bool,
    train_size: int | None = None,
    seed: int = 0,
    progress: bool = False,
):
    """Train an empty index on a sample of ``train_size`` keys drawn proportionally from every chunk.

    ``read(i)`` returns chunk i's keys (n_i, D) float32; ``sizes`` holds n_i. The default sample is
    ``max(64 * nlist, 64 * 2**nbits)`` keys (FAISS wants >= 39 per centroid), capped at the total.
    """
    total = sum(sizes)
    if total < max(nlist, 1 << nbits):
        raise ValueError(
            f"cannot train {nlist} IVF lists and {1 << nbits} PQ centroids per sub-quantizer on {total} keys: "
            f"need at least max(nlist, 2**nbits) = {max(nlist, 1 << nbits)} keys (use more images or smaller nlist/nbits)"
        )
    want = min(total, train_size or max(64 * nlist, 64 * (1 << nbits)))
    say(progress, f"sampling {want} of {total} keys from {len(sizes)} chunks to train the index")
    rng = np.random.default_rng(seed)
    sample = []
    for i, n in enumerate(sizes):
        take = min(n, -(-want * n // total))
        if take:
            keys = read(i)
            sample.append(keys[np.sort(rng.choice(n, take, replace=False))])
    sample = np.ascontiguousarray(np.concatenate(sample)[:want], dtype=np.float32)
    index = make_ivfpq_index(sample.shape[1], nlist, m, nbits, opq)
    say(progress, f"training {'OPQ + ' if opq else ''}IVF-PQ (nlist {nlist}, m {m}, nbits {nbits}) on {len(sample)} keys; "
                  "no progress bar for this step")
    start = time.perf_counter()
    index.train(sample)
    say(progress, f"trained in {time.perf_counter() - start:.1f} s")
    return index


def fill_ivfpq(index, read: Callable[[int], tuple[np.ndarray, np.ndarray]], chunks: range, keep_keys: bool,
               progress: bool = True):
    """Add ``chunks`` in order, one ``index.add`` per chunk (so every build adds the same batches and gets
    the same codes); return (values (n,) int64 tensor, keys (n, D) float32 tensor or None)."""
    from tqdm.auto import tqdm

    values, keys = [], []
    for i in tqdm(chunks, desc="adding to index", unit="chunk", disable=not progress):
        k, v = read(i)
        index.add(np.ascontiguousarray(k, dtype=np.float32))
        values.append(torch.from_numpy(v.astype(np.int64)))
        if keep_keys:
            keys.append(torch.from_numpy(k))
    return torch.cat(values), (torch.cat(keys) if keep_keys else None)


def load_or_train(work: Path, sizes: list[int], nlist: int, m: int, nbits: int, opq: bool, train_size: int | None,
                  progress: bool = False):
    """The checkpointed trained index of ``work``, training and checkpointing it first if absent."""
    faiss = import_faiss()
    trained = work / TRAINED_FILE
    if trained.is_file():
        say(progress, f"resuming: using the trained index saved in {str(trained)!r} (training skipped)")
        return faiss.read_index(str(trained))
    index = train_ivfpq(lambda i: read_chunk(work, i)[0], sizes, nlist, m, nbits, opq, train_size, progress=progress)
    _atomic_write(trained, lambda p: faiss.write_index(index, p))
    return index


def fill_part(cls, work: Path, plan: list[range], r: int, sizes: list[int], meta, num_images: int, chunk_images: int,
              keep_keys: bool, nprobe: int, progress: bool = False):
    """Fill part ``r`` of ``plan`` from ``work``'s chunks and trained index and save it to ``work/part-<r>``;
    a part already saved there from the same trained index, chunks and metadata is kept as it is.

    Returns its :class:`~arrag_kernels.retrieval.parts.PartInfo`.
    """
    chunks = plan[r]
    first_id, count = sum(sizes[: chunks.start]), sum(sizes[chunks.start : chunks.stop])
    lo, hi = chunks.start * chunk_images, min(chunks.stop * chunk_images, num_images)
    index = import_faiss().read_index(str(work / TRAINED_FILE))
    part_meta = dataclasses.replace(meta, num_images=hi - lo, part=PartOf(
        index=r, parts=len(plan), first_id=first_id, count=count, total=sum(sizes),
        trained_sha256=parts.trained_digest(index)))
    part_dir = work / parts.part_dir_name(r)
    try:
        done, records = parts.check_part(part_dir)
        done = done == part_meta and (ARRAYS_FILE in records) == keep_keys
    except DatabaseError:
        done = False  # absent, or left half-written by a killed save (which the save below cleans up)
    if not done:
        values, keys = fill_ivfpq(index, lambda i: read_chunk(work, i), chunks, keep_keys, progress)
        say(progress, f"saving part {r} ({count} entries, ids {first_id}..{first_id + count - 1}) to {str(part_dir)!r}")
        cls(keys, values, part_meta, index=index, nprobe=nprobe).save(part_dir)
    else:
        say(progress, f"resuming: part {r} is already built in {str(part_dir)!r}")
    return parts.part_info(part_dir)


def finish_parts(work: Path, path: Path, num_parts: int, merge: bool, progress: bool = False) -> None:
    """Check the ``num_parts`` parts filled in ``work``, then put them at ``path`` atomically: as a partitioned
    database, or (``merge``) merged in memory into one database; then remove ``work``. On any error
    nothing is published and the previous database at ``path`` stays."""
    infos = []
    for r in range(num_parts):
        part_dir = work / parts.part_dir_name(r)
        try:
            infos.append(parts.part_info(part_dir))
        except DatabaseError as e:
            raise DatabaseError(f"part {r} ({part_dir.name}) is missing, unreadable or corrupted: {e}") from e
    trained_sha256 = infos[0].meta.part.trained_sha256
    parts.write_parts_json(work, trained_sha256, infos)
    if merge:
        db = parts.merge_in_memory(work)
        say(progress, f"saving {len(db)} entries (the {num_parts} parts merged) to {str(path)!r}")
        db.save(path)
    else:
        say(progress, f"publishing the {num_parts} parts to {str(path)!r}")
        parts.publish_parts(work, path, infos, trained_sha256)
    shutil.rmtree(work, ignore_errors=True)
