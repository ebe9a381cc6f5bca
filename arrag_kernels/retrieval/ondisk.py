"""On-disk IVF-PQ databases: inverted lists kept in a file, for CPU search of indexes larger than RAM.

An on-disk database is an ``index="ivfpq"`` database directory (:mod:`.storage`) whose faiss index
keeps its inverted lists in :data:`LISTS_FILE` next to ``faiss_ivf_pq_opq.index`` (faiss
``OnDiskInvertedLists``: list after list, each list's codes then its ids), which then holds only
the quantizers and the table of list sizes and offsets. Its meta.json lists the lists file with
the other files (sizes, checksums) and records ``"on_disk": {"lists_file": ..., "value_range":
[lowest, highest token id]}``. :meth:`PatchDatabase.load <arrag_kernels.PatchDatabase.load>` opens it
like any other database: it reads the quantizers and the list table, maps the lists file read-only
and memory-maps the int32 token ids (``next_codes.npy``); a search reads the pages of the lists it
probes. Nothing scans every entry at load: the token range was checked by the merge and is
recorded, the files are checked like any database's (``verify="full"`` hashes them whole).

On-disk databases are searched by faiss-cpu, for CPU queries. Device searches (CUDA queries, the
``triton`` backend, :meth:`~arrag_kernels.PatchDatabase.shard`, moving the database to a GPU) are
refused with a ValueError: they copy every list into host and device memory, the one thing an
on-disk database is for avoiding. A database that fits a device is merged in memory instead
(:func:`arrag_kernels.retrieval.parts.merge_in_memory`, then saved).

:func:`merge_parts` makes one from a partitioned database (:mod:`.parts`), holding one part in
memory at a time.

faiss-cpu 1.15.1 crashes (SIGSEGV) searching an on-disk index read with ``IO_FLAG_MMAP``
(tests/test_ondisk.py reproduces it in a subprocess); this module never uses that flag. It reads
the index without its list data (``IO_FLAG_SKIP_IVF_DATA``), points it at the lists file in the
index's own directory (so a database directory can be moved) and maps that file itself. faiss
users read the index with ``faiss.read_index(path, faiss.IO_FLAG_ONDISK_SAME_DIR)``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import torch

from .faiss_index import INDEX_FILE, VALUES_FILE, IndexFormatError, import_faiss, inner_ivfpq
from .meta import TRAINED_FILE, DatabaseError, DatabaseMeta

LISTS_FILE = "inverted_lists.ivfdata"
ON_DISK = "on_disk"  # the meta.json record of an on-disk database
_ID_BYTES = 8  # faiss idx_t
_VALUE_BLOCK = 1 << 24  # token ids read at a time when scanning or copying them


def lists_on_disk(index) -> bool:
    """Whether the (OPQ +) IVF-PQ ``index`` keeps its inverted lists in a file (faiss ``OnDiskInvertedLists``)."""
    faiss = import_faiss()
    return isinstance(faiss.downcast_InvertedLists(inner_ivfpq(index).invlists), faiss.OnDiskInvertedLists)


def refuse_device(what: str) -> ValueError:
    """The error for a device search (``what``) asked of an on-disk database."""
    return ValueError(
        f"{what}: this database keeps its inverted lists on disk and is searched by faiss-cpu with CPU queries only "
        "(a device search would copy every list into memory); retrieve on the CPU (e.g. Retriever(..., "
        "device='cpu')), or, if the database fits in device memory, merge its parts in memory "
        "(arrag_kernels.retrieval.parts.merge_in_memory) and save that")


# ---- reading ---------------------------------------------------------------------------------------
def _list_table(lists) -> np.ndarray:
    """(nlist, 3) int64: each list's size, capacity (entries) and byte offset in the lists file."""
    return np.array([(e.size, e.capacity, e.offset) for e in (lists.lists.at(i) for i in range(lists.nlist))],
                    dtype=np.int64).reshape(-1, 3)


def _open_index(path: Path, num_entries: int):
    """The index of the on-disk database ``path``, its lists file mapped read-only (after checking that every
    list lies inside that file: a list past its end would crash the process when searched)."""
    faiss = import_faiss()
    file, lists_file = path / INDEX_FILE, path / LISTS_FILE
    try:
        index = faiss.read_index(str(file), faiss.IO_FLAG_SKIP_IVF_DATA | faiss.IO_FLAG_READ_ONLY)
        ivf = inner_ivfpq(index)
    except (RuntimeError, MemoryError, IndexFormatError) as e:
        raise DatabaseError(f"{str(file)!r} is not a readable FAISS IVF-PQ index: "
                            f"{(str(e) or type(e).__name__).splitlines()[0]}") from e
    lists = faiss.downcast_InvertedLists(ivf.invlists)
    if not isinstance(lists, faiss.OnDiskInvertedLists):
        raise DatabaseError(f"{str(file)!r} holds its inverted lists itself, but meta.json says they are on disk in "
                            f"{LISTS_FILE}: the directory mixes two databases; rebuild or re-merge it")
    size, capacity, offset = _list_table(lists).T
    entry_bytes = ivf.code_size + _ID_BYTES
    if (lists.nlist != ivf.nlist or (size > capacity).any() or (offset < 0).any()
            or (offset + capacity * entry_bytes > lists.totsize).any() or lists.totsize != lists_file.stat().st_size):
        raise DatabaseError(f"{str(file)!r}: its list table does not fit {LISTS_FILE} ({lists_file.stat().st_size} "
                            f"bytes, the table says {lists.totsize}): the files are corrupted or from different merges")
    if int(size.sum()) != index.ntotal or index.ntotal != num_entries:
        raise DatabaseError(f"{str(file)!r}: the lists hold {int(size.sum())} entries, the index says {index.ntotal}, "
                            f"meta.json {num_entries}: the files are corrupted or from different merges")
    lists.filename = str(lists_file)
    try:
        lists.do_mmap()
    except RuntimeError as e:
        raise DatabaseError(f"cannot map {str(lists_file)!r}: {str(e).splitlines()[0]}") from e
    return index


def _value_range(values: np.ndarray) -> tuple[int, int]:
    """(lowest, highest) of a (possibly memory-mapped) array, a block at a time."""
    lows, highs = zip(*((int(b.min()), int(b.max())) for b in
                        (values[i : i + _VALUE_BLOCK] for i in range(0, len(values), _VALUE_BLOCK))))
    return min(lows), max(highs)


def open_ondisk(path: Path, raw: dict, meta: DatabaseMeta) -> tuple[object, torch.Tensor]:
    """(index, values) of the on-disk database ``path`` whose checked meta.json is ``raw``: the index with its
    lists file mapped read-only, the int32 token ids memory-mapped. The token range is the one meta.json
    records (checked by the merge; the values file is covered by the integrity records like any file)."""
    try:
        record = raw[ON_DISK]
        lo, hi = (int(v) for v in record["value_range"])
        if record["lists_file"] != LISTS_FILE:
            raise ValueError(f"lists_file {record['lists_file']!r}, expected {LISTS_FILE!r}")
    except (KeyError, TypeError, ValueError) as e:
        raise DatabaseError(f"{str(path)!r}: meta.json's {ON_DISK!r} record is corrupted: {e!r}") from e
    if not 0 <= lo <= hi < meta.codebook_size:
        raise DatabaseError(f"{str(path)!r}: token ids {lo}..{hi} recorded, expected ids in [0, {meta.codebook_size})")
    index = _open_index(path, raw.get("num_entries"))
    try:
        values = np.load(path / VALUES_FILE, mmap_mode="c")  # copy-on-write: writable for torch, the file never changes
    except (OSError, ValueError) as e:
        raise DatabaseError(f"{str(path / VALUES_FILE)!r} is not a readable .npy array: {e}") from e
    if values.dtype != np.int32 or values.shape != (index.ntotal,):
        raise DatabaseError(f"{str(path / VALUES_FILE)!r}: expected ({index.ntotal},) int32 token ids, got "
                            f"{values.dtype} {values.shape}")
    return index, torch.from_numpy(values)


# ---- merging ---------------------------------------------------------------------------------------
def _read_part_index(part_dir: Path):
    from .storage import read_faiss_index

    return read_faiss_index(part_dir / INDEX_FILE)


def _part_sizes(parts) -> tuple[np.ndarray, int]:
    """(parts, nlist) entries of each list of each part (each part's index read, then freed), and part 0's nprobe."""
    rows, nprobe = [], None
    for part in parts:
        index = _read_part_index(part.dir)  # kept referenced: ``ivf`` lives inside it
        ivf = inner_ivfpq(index)
        rows.append([ivf.invlists.list_size(l) for l in range(ivf.nlist)])
        nprobe = nprobe or ivf.nprobe
    return np.array(rows, dtype=np.int64), nprobe


def _write_lists(parts, sizes: np.ndarray, code_size: int, file: Path) -> None:
    """Write the lists file: list l holds every part's entries of list l, parts in id order (each part's local
    ids shifted by its first id), as the faiss ``OnDiskInvertedLists`` layout wants (codes of all its
    entries, then their ids). Parts are read one at a time; the file is written with plain writes (no mapping)."""
    faiss = import_faiss()
    capacity = sizes.sum(0)
    offsets = np.concatenate([[0], np.cumsum(capacity * (code_size + _ID_BYTES))])
    filled = np.zeros_like(capacity)
    fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        os.ftruncate(fd, int(offsets[-1]))
        for part, part_sizes in zip(parts, sizes):
            index = _read_part_index(part.dir)  # kept referenced: ``lists`` lives inside it
            lists = inner_ivfpq(index).invlists
            for l in np.flatnonzero(part_sizes):
                n, at = int(part_sizes[l]), int(filled[l])
                codes = faiss.rev_swig_ptr(lists.get_codes(int(l)), n * code_size)
                ids = faiss.rev_swig_ptr(lists.get_ids(int(l)), n)
                if ids.min() < 0 or ids.max() >= part.count:
                    raise DatabaseError(f"{str(part.dir)!r}: inverted list {l} holds local id {int(ids.max())} "
                                        f"or {int(ids.min())}, expected ids in [0, {part.count}): the part is corrupted")
                ids = ids + part.first_id
                os.pwrite(fd, codes, int(offsets[l]) + at * code_size)
                os.pwrite(fd, ids, int(offsets[l]) + int(capacity[l]) * code_size + at * _ID_BYTES)
                filled[l] += n
            del lists, index  # free this part before reading the next
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_values(parts, file: Path) -> tuple[int, int]:
    """Concatenate the parts' token ids (int32) into ``file``, a block at a time; return their (lowest, highest)."""
    from .parts import values_of

    total, ranges = sum(p.count for p in parts), []
    with open(file, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.int32)),
                                                 "fortran_order": False, "shape": (total,)})
        for part in parts:
            values = values_of(part)
            if values.shape != (part.count,) or values.dtype != np.int32:
                raise DatabaseError(f"{str(part.dir / VALUES_FILE)!r}: expected ({part.count},) int32 token ids, "
                                    f"got {values.dtype} {values.shape}")
            ranges.append(_value_range(values))
            for i in range(0, part.count, _VALUE_BLOCK):
                f.write(np.ascontiguousarray(values[i : i + _VALUE_BLOCK]).data)
            del values
        f.flush()
        os.fsync(f.fileno())
    return min(r[0] for r in ranges), max(r[1] for r in ranges)


def merge_parts(parts_path: str | os.PathLike, path: str | os.PathLike, verify: str = "quick") -> Path:
    """Merge the partitioned database at ``parts_path`` (:mod:`.parts`) into one on-disk database at ``path``.

    The parts are checked first (:func:`arrag_kernels.retrieval.parts.check_parts` with ``verify``),
    then merged in id order: list by list the same ids and codes, so the same search results, as
    merging them in memory or building in one process from the same trained index. Memory: one part's
    index at a time (each part is read twice: once for its list sizes, once for its lists).

    Atomic: everything is written to a temporary directory next to ``path``, which is loaded and
    checked (:meth:`PatchDatabase.load <arrag_kernels.PatchDatabase.load>`) before it replaces
    ``path``; on any error the previous database at ``path`` stays as it was and the temporary
    directory is removed. Returns ``path``. Raises DatabaseError (a ValueError) for bad parts.
    """
    from .database import PatchDatabase
    from .parts import check_merge_target, check_parts
    from .storage import atomic_directory, read_faiss_index, write_meta

    parts_path, path = Path(parts_path), Path(path)
    check_merge_target(parts_path, path)
    parts = check_parts(parts_path, verify)
    index = read_faiss_index(parts_path / TRAINED_FILE)
    ivf = inner_ivfpq(index)
    faiss = import_faiss()
    with atomic_directory(path) as tmp:
        sizes, nprobe = _part_sizes(parts)
        _write_lists(parts, sizes, ivf.code_size, tmp / LISTS_FILE)
        lists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, LISTS_FILE)  # the name only: relocatable
        lists.totsize = (tmp / LISTS_FILE).stat().st_size
        list_sizes = sizes.sum(0).astype(np.uint64)
        lists.set_all_lists_sizes(faiss.swig_ptr(list_sizes))
        ivf.replace_invlists(lists, True)
        lists.this.disown()  # the index owns it now
        index.ntotal = ivf.ntotal = int(list_sizes.sum())
        ivf.nprobe = nprobe
        faiss.write_index(index, str(tmp / INDEX_FILE))  # quantizers and list table; the lists are in LISTS_FILE
        lo, hi = _write_values(parts, tmp / VALUES_FILE)
        meta = dataclasses.replace(parts[0].meta, part=None, num_images=sum(p.num_images for p in parts))
        write_meta(tmp, meta, index.ntotal, [INDEX_FILE, LISTS_FILE, VALUES_FILE],
                   {ON_DISK: {"lists_file": LISTS_FILE, "value_range": [lo, hi]}})
        merged = PatchDatabase.load(tmp, verify="quick")
        if len(merged) != sum(p.count for p in parts):
            raise DatabaseError(f"merging {str(parts_path)!r} gave {len(merged)} entries, the parts hold "
                                f"{sum(p.count for p in parts)}")
        del merged
    return path

