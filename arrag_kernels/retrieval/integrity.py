"""On-disk integrity of a database directory: per-file size, SHA-256 and page digests recorded in
meta.json, and meta.json's own checksum.

Loading verifies ``quick`` by default: meta.json's checksum, every file's size and the digests of
a few pages spread over each file (a bounded read); ``full`` hashes whole files; ``none`` checks
nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .meta import ARRAYS_FILE, META_FILE, DatabaseError

FORMAT_VERSION = 2  # 2: meta.json checksummed; per-file sizes and page digests (version 1 is still read)
READABLE_VERSIONS = (1, 2)
VERIFY_MODES = ("none", "quick", "full")
_MAX_PAGES, _MIN_PAGE, _SAMPLED_PAGES = 4096, 1 << 20, 8  # page digests per file, smallest page, pages checked by "quick"


def _page_size(size: int) -> int:
    return max(_MIN_PAGE, -(-size // _MAX_PAGES))


def digest_file(path: Path) -> dict:
    """Size, SHA-256 and the 16-hex-digit SHA-256 of each page of ``path`` (one read), then fsync it."""
    size, full, pages = path.stat().st_size, hashlib.sha256(), []
    page = _page_size(size)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(page), b""):
            full.update(block)
            pages.append(hashlib.sha256(block).hexdigest()[:16])
        os.fsync(f.fileno())
    return {"size": size, "sha256": full.hexdigest(), "page_size": page, "pages": pages}


def check_file(path: Path, record: dict, mode: str) -> None:
    """Compare ``path`` with its record: size always; ``quick``: sampled pages; ``full``: the whole SHA-256."""
    changed = f"{str(path)!r} does not match the checksums in {META_FILE}: the file is corrupted or was changed"
    if "size" in record and path.stat().st_size != record["size"]:
        raise DatabaseError(f"{changed} ({path.stat().st_size} bytes, {META_FILE} says {record['size']})")
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


def meta_digest(meta: dict) -> str:
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def file_records(raw: dict) -> dict:
    """{file name: integrity record} of a meta.json of any readable version."""
    if raw["format_version"] >= 2:
        return raw["files"]
    if "arrays_sha256" in raw:
        return {ARRAYS_FILE: {"sha256": raw["arrays_sha256"]}}
    return {name: {"sha256": digest} for name, digest in (raw.get("files_sha256") or {}).items()}

