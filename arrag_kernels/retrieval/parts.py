"""Partitioned IVF-PQ databases: parts filled separately from one trained index, and their checks.

A **part** is an ordinary ``index="ivfpq"`` database directory (:mod:`.storage`) holding the
``count`` entries of a contiguous range of the image order, global ids ``first_id ..
first_id + count - 1``. Inside its faiss index the ids are local (0..count-1, added in id order),
so a part loads, searches and verifies on its own; global id = ``first_id`` + local id. Its
``meta.part`` (:class:`~arrag_kernels.retrieval.meta.PartOf`) says where it sits, and which trained
index filled it (:func:`trained_digest`). Its ``meta.num_images`` counts the images of its range.

A **partitioned database** is a directory holding ``trained.index`` (the trained, empty index),
the parts ``part-00000``, ``part-00001``, ... and ``parts.json`` (written last)::

    {"format": 1, "trained_sha256": h, "total": N, "num_images": I,
     "parts": [{"dir": "part-00000", "first_id": 0, "count": n0, "num_images": i0, "sha256": s0}, ...]}

``sha256`` is the SHA-256 of the part's faiss index file. Parts are listed in id order and tile
0..N-1. Merging them in that order, shifting each part's ids by its ``first_id`` (in memory:
:func:`merge_in_memory`; on disk: ``faiss.contrib.ondisk.merge_ondisk(..., shift_ids=True)``)
gives, list by list, the ids and codes of a single-process build from the same trained index.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .faiss_index import INDEX_FILE, VALUES_FILE, import_faiss, inner_ivfpq
from .integrity import VERIFY_MODES
from .meta import PARTS_FILE, TRAINED_FILE, DatabaseError, DatabaseMeta
from .storage import atomic_directory, read_checked_meta

FORMAT = 1


def part_dir_name(index: int) -> str:
    return f"part-{index:05d}"


@dataclass(frozen=True)
class PartInfo:
    """One checked part of a partitioned database (see :func:`check_parts`)."""

    index: int
    dir: Path
    first_id: int
    count: int
    num_images: int
    sha256: str
    meta: DatabaseMeta


def trained_digest(index) -> str:
    """SHA-256 of what training an (OPQ +) IVF-PQ index produced: its sizes, OPQ matrix, coarse
    centroids and PQ codebooks, not its lists (so an index read without its list data gives the same)."""
    faiss = import_faiss()
    ivf = inner_ivfpq(index)
    h = hashlib.sha256(json.dumps([int(index.d), int(ivf.nlist), int(ivf.pq.M), int(ivf.pq.nbits),
                                   bool(ivf.by_residual)]).encode())
    if isinstance(index, faiss.IndexPreTransform):
        for i in range(index.chain.size()):
            vt = faiss.downcast_VectorTransform(index.chain.at(i))
            h.update(faiss.vector_to_array(vt.A).tobytes())
            h.update(faiss.vector_to_array(vt.b).tobytes())
    h.update(ivf.quantizer.reconstruct_n(0, ivf.nlist).tobytes())
    h.update(faiss.vector_to_array(ivf.pq.centroids).tobytes())
    return h.hexdigest()


def _read_trained(file: Path, skip_lists: bool = False):
    """Read an index; ``skip_lists`` memory-maps its list data instead of reading it (to look at the quantizers
    only: faiss-cpu 1.15.1 fails to read files with IO_FLAG_SKIP_IVF_DATA)."""
    faiss = import_faiss()
    try:
        return faiss.read_index(str(file), faiss.IO_FLAG_MMAP if skip_lists else 0)
    except (RuntimeError, MemoryError) as e:
        raise DatabaseError(f"{str(file)!r} is not a readable FAISS index: "
                            f"{(str(e) or type(e).__name__).splitlines()[0]}") from e


def is_partitioned(path: str | os.PathLike) -> bool:
    return (Path(path) / PARTS_FILE).is_file()


def _read_parts_json(path: Path) -> dict:
    file = path / PARTS_FILE
    if not file.is_file():
        raise DatabaseError(f"{str(path)!r} is not a partitioned database (expected {PARTS_FILE})")
    try:
        listing = json.loads(file.read_text())
        if listing["format"] != FORMAT:
            raise DatabaseError(f"{str(file)!r}: format {listing['format']!r}, this library reads {FORMAT}")
        missing = [k for k in ("trained_sha256", "total", "num_images", "parts") if k not in listing]
        missing += [f"parts[{r}].{k}" for r, entry in enumerate(listing.get("parts", []))
                    for k in ("dir", "first_id", "count", "num_images", "sha256") if k not in entry]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DatabaseError(f"{str(file)!r} is corrupted or incomplete: {e!r}") from e
    if missing:
        raise DatabaseError(f"{str(file)!r} is corrupted or incomplete: {', '.join(missing)} missing")
    if not listing["parts"]:
        raise DatabaseError(f"{str(file)!r} lists no parts")
    return listing


def write_parts_json(path: Path, trained_sha256: str, parts: list[PartInfo]) -> None:
    """Write ``parts.json`` listing ``parts`` (in id order) into ``path``, atomically (it marks the directory
    complete)."""
    listing = {"format": FORMAT, "trained_sha256": trained_sha256, "total": sum(p.count for p in parts),
               "num_images": sum(p.num_images for p in parts),
               "parts": [{"dir": p.dir.name, "first_id": p.first_id, "count": p.count, "num_images": p.num_images,
                          "sha256": p.sha256} for p in parts]}
    tmp = path / (PARTS_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(listing, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path / PARTS_FILE)


def _model_fields(meta: DatabaseMeta) -> dict:
    """The fields every part must share: all but where it sits and how many images it holds."""
    return dataclasses.replace(meta, part=None, num_images=0).to_dict()


def check_part(part_dir: Path, mode: str = "quick") -> tuple[DatabaseMeta, dict]:
    """One part directory's checked meta and file records (see :func:`~.storage.read_checked_meta`);
    DatabaseError if it is not a part."""
    _, meta, records = read_checked_meta(part_dir, mode)
    if meta.part is None or meta.index != "ivfpq":
        raise DatabaseError(f"{str(part_dir)!r} is a database but not a part of a partitioned IVF-PQ database "
                            f"(its meta.json has no 'part' record, index={meta.index!r})")
    return meta, records


def part_info(part_dir: Path, mode: str = "quick") -> PartInfo:
    """The :class:`PartInfo` a part directory's own meta.json gives (checked as :func:`check_part` does)."""
    meta, records = check_part(part_dir, mode)
    return PartInfo(meta.part.index, part_dir, meta.part.first_id, meta.part.count, meta.num_images,
                    records[INDEX_FILE]["sha256"], meta)


def check_parts(path: str | os.PathLike, verify: str = "quick") -> list[PartInfo]:
    """Check the partitioned database at ``path`` and return its parts in id order.

    Raises :class:`~arrag_kernels.retrieval.meta.DatabaseError` (a ValueError) naming the part and the
    problem when: parts.json or trained.index is missing or corrupted; a part is missing, unreadable
    or corrupted (meta.json checksum, file sizes and page digests; ``verify="full"`` hashes every file,
    ``"none"`` skips the file checks); a part was filled from another trained index (its quantizers,
    read from its own index file, differ from trained.index's); a part's index file is not the one
    parts.json lists; the parts leave a gap or overlap in the ids; a part's codebook, key layout or
    other model fields differ from part 0's.
    """
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify: expected one of {VERIFY_MODES}, got {verify!r}")
    path = Path(path)
    listing = _read_parts_json(path)
    if not (path / TRAINED_FILE).is_file():
        raise DatabaseError(f"{str(path)!r}: {TRAINED_FILE} (the trained index every part was filled from) is missing")
    trained = trained_digest(_read_trained(path / TRAINED_FILE, skip_lists=True))
    if trained != listing["trained_sha256"]:
        raise DatabaseError(f"{str(path / TRAINED_FILE)!r} is not the trained index {PARTS_FILE} records "
                            f"(quantizer digest {trained[:12]}, recorded {str(listing['trained_sha256'])[:12]})")
    parts, next_id, first_fields = [], 0, None
    num_parts = len(listing["parts"])
    for r, entry in enumerate(listing["parts"]):
        where = f"{str(path)!r}: part {r} ({entry['dir']})"
        part_dir = path / entry["dir"]
        if entry["first_id"] != next_id:
            kind = "a gap" if entry["first_id"] > next_id else "an overlap"
            raise DatabaseError(f"{where} starts at id {entry['first_id']}, expected {next_id}: {kind} in the ids")
        if not part_dir.is_dir():
            raise DatabaseError(f"{where} is missing: rebuild it (the build resumes the missing parts only)")
        try:
            meta, records = check_part(part_dir, verify)
        except DatabaseError as e:
            raise DatabaseError(f"{where} is unreadable or corrupted: {e}") from e
        expected = dict(index=r, parts=num_parts, first_id=entry["first_id"], count=entry["count"],
                        total=listing["total"], trained_sha256=listing["trained_sha256"])
        mismatched = {k: (getattr(meta.part, k), v) for k, v in expected.items() if getattr(meta.part, k) != v}
        if "trained_sha256" in mismatched:
            raise DatabaseError(f"{where} was filled from another trained index (quantizer digest "
                                f"{meta.part.trained_sha256[:12]}, this database's {listing['trained_sha256'][:12]}): "
                                "every part must be filled from the same trained.index")
        if mismatched:
            raise DatabaseError(f"{where}: its part record disagrees with {PARTS_FILE} "
                                + ", ".join(f"{k} {a!r} (expected {b!r})" for k, (a, b) in mismatched.items()))
        if records[INDEX_FILE].get("sha256") != entry["sha256"]:
            raise DatabaseError(f"{where}: its index file is not the one {PARTS_FILE} lists (sha256 "
                                f"{str(records[INDEX_FILE].get('sha256'))[:12]}, listed {entry['sha256'][:12]})")
        fields = _model_fields(meta)
        if first_fields is None:
            first_fields = fields
        elif fields != first_fields:
            diff = ", ".join(f"{k} {fields[k]!r} (part 0: {first_fields[k]!r})" for k in fields
                             if fields[k] != first_fields[k])
            raise DatabaseError(f"{where} was built for another model or key layout: {diff}")
        index = _read_trained(part_dir / INDEX_FILE, skip_lists=True)
        if trained_digest(index) != trained:
            raise DatabaseError(f"{where}: its index holds other quantizers than {TRAINED_FILE} (it was filled from "
                                "another trained index)")
        if index.ntotal != entry["count"]:
            raise DatabaseError(f"{where}: its index holds {index.ntotal} entries, {PARTS_FILE} says {entry['count']}")
        parts.append(PartInfo(r, part_dir, entry["first_id"], entry["count"], entry["num_images"], entry["sha256"],
                              meta))
        next_id += entry["count"]
    if next_id != listing["total"]:
        raise DatabaseError(f"{str(path)!r}: the parts hold ids 0..{next_id - 1}, {PARTS_FILE} says {listing['total']} "
                            "entries: a part is missing at the end")
    return parts


def check_merge_target(parts_path: str | os.PathLike, path: str | os.PathLike) -> None:
    """ValueError if the merged database's ``path`` is the partitioned database at ``parts_path`` or lies
    inside it (writing there would replace the parts, or one of them, being merged)."""
    parts_path, path = Path(parts_path).resolve(), Path(path).resolve()
    if path == parts_path or parts_path in path.parents:
        raise ValueError(f"the merged database must go to another directory than the parts ({str(parts_path)!r}), "
                         f"not {str(path)!r}; pass a path outside it")


def merge_in_memory(path: str | os.PathLike, verify: str = "quick"):
    """One :class:`~arrag_kernels.retrieval.PatchDatabase` from the parts at ``path`` (checked first), merged
    in memory in id order: the whole index in this process, so for small databases only (larger ones:
    merge on disk)."""
    from .database import PatchDatabase

    parts = check_parts(path, verify)
    merged = _read_trained(Path(path) / TRAINED_FILE)
    ivf = inner_ivfpq(merged)
    values, keys, nprobe = [], [], None
    for part in parts:
        db = PatchDatabase.load(part.dir, verify="none")  # just checked
        ivf.merge_from(inner_ivfpq(db.index), part.first_id)  # shift the part's ids 0..count-1 to global ids
        values.append(db.values)
        keys.append(db.keys)
        nprobe = nprobe or db.nprobe  # every part is saved with the build's nprobe
    merged.ntotal = ivf.ntotal  # the OPQ wrapper counts its inner index's entries
    if any(k is None for k in keys) and not all(k is None for k in keys):
        raise DatabaseError(f"{str(path)!r}: some parts hold their exact keys and some do not; "
                            "rebuild with one keep_keys")
    meta = dataclasses.replace(parts[0].meta, part=None, num_images=sum(p.num_images for p in parts))
    return PatchDatabase(None if keys[0] is None else torch.cat(keys), torch.cat(values), meta, index=merged,
                         nprobe=nprobe)


def _link(src, dst) -> None:
    """Hard-link ``src`` at ``dst`` (a copy where links fail, e.g. across file systems)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def publish_parts(work: Path, path: Path, parts: list[PartInfo], trained_sha256: str) -> None:
    """Put the partitioned database made of ``work``'s trained index and ``parts`` at ``path``, atomically
    (a previous database at ``path`` stays until the new one is complete and checked)."""
    with atomic_directory(path) as tmp:
        _link(work / TRAINED_FILE, tmp / TRAINED_FILE)
        for part in parts:
            shutil.copytree(part.dir, tmp / part.dir.name, copy_function=_link)
        write_parts_json(tmp, trained_sha256, parts)
        check_parts(tmp)


def values_of(part: PartInfo) -> np.ndarray:
    """A part's token ids (count,) int32, memory-mapped (no copy)."""
    return np.load(part.dir / VALUES_FILE, mmap_mode="r")
