"""A database directory on disk: its file format and crash-safe saving.

A flat database is a directory with two files:

* ``arrays.safetensors``: ``keys`` (N, key_dim) float32 and ``values`` (N,) int64 token ids;
* ``meta.json``: the :class:`~arrag_kernels.retrieval.meta.DatabaseMeta` fields, the entry count,
  each data file's integrity record (:mod:`.integrity`) and the SHA-256 of meta.json's own content.

An IVF-PQ database (``index="ivfpq"``) stores the official layout instead: ``faiss_ivf_pq_opq.index``
(OPQ + IVF-PQ, ids 0..N-1) and ``next_codes.npy`` ((N,) int32 token ids), plus ``meta.json`` and,
when the exact keys were kept (small databases), ``arrays.safetensors``. Such a database may hold
no keys at all (``keys is None``): it is searched through its index only.

Saving writes a complete temporary directory ``.<name>.tmp-<host>-<pid>-<random>`` first and renames
it into place (the previous database goes to ``.<name>.old-<same>`` for that moment), so a crash
leaves the previous database or the new one, never a half-written one. Directories left by a
killed save are finished or removed by the next :func:`save` or :func:`load` of that path on the
same host (see :func:`_recover`).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
from pathlib import Path

import numpy as np
import torch

from .faiss_index import INDEX_FILE, VALUES_FILE, IndexFormatError, check_ivfpq_contents, import_faiss
from .integrity import (FORMAT_VERSION, READABLE_VERSIONS, VERIFY_MODES, check_file, digest_file, file_records,
                        meta_digest)
from .meta import ARRAYS_FILE, META_FILE, PARTS_FILE, DatabaseError, DatabaseMeta
from .ondisk import LISTS_FILE, ON_DISK, lists_on_disk, open_ondisk


def read_faiss_index(file: Path, deep_check: bool = False):
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


def read_values(file: Path) -> np.ndarray:
    try:
        values = np.load(file)
    except (OSError, ValueError) as e:
        raise DatabaseError(f"{str(file)!r} is not a readable .npy array: {e}") from e
    if values.ndim != 1 or not np.issubdtype(values.dtype, np.integer):
        raise DatabaseError(f"{str(file)!r}: expected a 1-D integer array of token ids, got {values.dtype} {values.shape}")
    return values


def write_arrays(file: Path, keys: torch.Tensor, values: torch.Tensor) -> None:
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
    the complete new directory (its meta.json, or a partitioned database's parts.json, is written last) is
    moved in, else the old one back.
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
            if _is_complete(d):
                with contextlib.suppress(OSError):  # another process may be recovering it right now
                    os.replace(d, path)
                    break
    for dirs in dead.values():
        for d in dirs.values():
            shutil.rmtree(d, ignore_errors=True)


def _is_complete(d: Path) -> bool:
    """Whether ``d`` is a finished database directory: its meta.json (a partitioned one: its parts.json) is
    written last."""
    return (d / META_FILE).is_file() or (d / PARTS_FILE).is_file()


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike):
    """Yield a fresh temporary directory next to ``path``; when the block ends without an error, move it to
    ``path`` (an existing database there goes to ``.<name>.old-<token>`` for that moment, then is removed).

    The block must write the completion marker (meta.json, or parts.json) last. On an error the
    temporary directory is removed and the previous database stays. Directories of earlier calls for
    ``path`` that were killed are finished or removed first (:func:`_recover`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _recover(path)
    if path.exists() and not _is_complete(path):
        raise FileExistsError(f"{str(path)!r} exists and is not a database directory; refusing to overwrite it")
    token = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
    tmp, old = path.parent / f".{path.name}.tmp-{token}", path.parent / f".{path.name}.old-{token}"
    os.mkdir(tmp)  # mode 0o777 & ~umask, unlike tempfile.mkdtemp's 0o700
    try:
        yield tmp
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:
        if old.exists() and not path.exists():
            os.replace(old, path)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def save(db, path: str | os.PathLike) -> Path:
    """Write the database directory atomically (replacing an existing database at ``path``).

    Arrays are streamed to disk a block at a time. Directories of earlier saves to ``path`` that
    were killed (``.<name>.tmp-*`` / ``.<name>.old-*`` of dead processes on this host) are
    finished or removed first. Files and directories get the usual permissions (umask).
    """
    if db.index is not None and lists_on_disk(db.index):
        raise ValueError(f"save: this database keeps its inverted lists on disk ({LISTS_FILE}) and is not re-saved; "
                         "copy or move its directory instead (it holds no absolute paths)")
    with atomic_directory(path) as tmp:
        names = []
        if db.keys is not None:
            write_arrays(tmp / ARRAYS_FILE, db.keys, db.values)
            names.append(ARRAYS_FILE)
        if db.index is not None:
            import_faiss().write_index(db.index, str(tmp / INDEX_FILE))
            np.save(tmp / VALUES_FILE, db.values.cpu().numpy().astype(np.int32))
            names += [INDEX_FILE, VALUES_FILE]
        write_meta(tmp, db.meta, len(db), names)
    return Path(path)


def write_meta(directory: Path, meta: DatabaseMeta, num_entries: int, names: list[str], extra: dict | None = None) -> None:
    """Write ``directory``'s meta.json: ``meta``, the entry count, the integrity records of the files ``names``,
    the ``extra`` records (e.g. an on-disk database's) and its own checksum. Call it last: a directory
    with meta.json is complete."""
    record = {"format_version": FORMAT_VERSION, **meta.to_dict(), "num_entries": num_entries,
              "files": {name: digest_file(directory / name) for name in names}, **(extra or {})}
    record["meta_sha256"] = meta_digest(record)
    with open(directory / META_FILE, "w") as f:
        json.dump(record, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def read_checked_meta(path: Path, mode: str) -> tuple[dict, DatabaseMeta, dict]:
    """meta.json of the database directory ``path`` (its raw dict, its :class:`DatabaseMeta`, its file records),
    after checking meta.json's own checksum and every listed file (``mode``: see :func:`load`) without
    reading any array; DatabaseError when something is missing or corrupted."""
    meta_file = path / META_FILE
    if not meta_file.is_file():
        raise DatabaseError(f"{str(path)!r} is not a database directory (expected {META_FILE})")
    try:
        raw = json.loads(meta_file.read_text())
        if not isinstance(raw, dict):
            raise DatabaseError(f"{str(meta_file)!r}: expected a JSON object, got a JSON {type(raw).__name__}; "
                                "the file is corrupted or not a database's meta.json")
        if raw.get("format_version") not in READABLE_VERSIONS:
            raise DatabaseError(f"{str(meta_file)!r}: format_version {raw.get('format_version')!r}, this library "
                                f"reads {READABLE_VERSIONS}")
        if mode != "none" and "meta_sha256" in raw and meta_digest(raw) != raw["meta_sha256"]:
            raise DatabaseError(f"{str(meta_file)!r} does not match its own checksum: it was edited or corrupted "
                                "(re-save the database from a good copy, or rebuild it)")
        if raw["format_version"] >= 2 and "meta_sha256" not in raw:
            raise KeyError("meta_sha256")
        meta = DatabaseMeta.from_dict(raw)
        records = file_records(raw)
        if not isinstance(records, dict) or not all(isinstance(r, dict) for r in records.values()):
            raise TypeError("file records must be objects")
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
        if isinstance(e, DatabaseError):
            raise
        raise DatabaseError(f"{str(meta_file)!r} is corrupted or incomplete: {e!r}") from e
    needed = (INDEX_FILE, VALUES_FILE) if meta.index == "ivfpq" else (ARRAYS_FILE,)
    for name in set(needed) | set(records):
        if name not in records or not (path / name).is_file():
            raise DatabaseError(f"{str(path)!r}: an index={meta.index!r} database needs {', '.join(needed)} on disk "
                                f"and listed in {META_FILE}; {name} is missing")
    try:
        for name, record in records.items():
            check_file(path / name, record, mode)
    except (KeyError, TypeError, IndexError) as e:
        raise DatabaseError(f"{str(meta_file)!r} is corrupted or incomplete: {e!r}") from e
    return raw, meta, records


def load(cls, path: str | os.PathLike, verify: str | bool = "quick"):
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
    raw, meta, records = read_checked_meta(path, mode)
    index, keys = None, None
    if meta.index == "ivfpq" and ON_DISK in raw:
        if LISTS_FILE not in records:
            raise DatabaseError(f"{str(path)!r}: an on-disk database needs {LISTS_FILE} listed in {META_FILE}")
        index, values = open_ondisk(path, raw, meta)
    elif meta.index == "ivfpq":
        index = read_faiss_index(path / INDEX_FILE, deep_check=mode == "full")
        values = torch.from_numpy(read_values(path / VALUES_FILE))
    if ARRAYS_FILE in records:
        try:
            arrays = load_file(str(path / ARRAYS_FILE))
            keys = arrays["keys"]
            if index is None:
                values = arrays["values"]
        except (SafetensorError, KeyError, OSError) as e:
            raise DatabaseError(f"{str(path / ARRAYS_FILE)!r} is corrupted: {e}") from e
    if len(values) != raw.get("num_entries"):
        raise DatabaseError(f"{str(path)!r}: {len(values)} entries on disk, {raw.get('num_entries')} in {META_FILE}")
    return cls(keys, values, meta, index=index)

