"""``PatchDatabase``: (neighbourhood key -> token id) pairs of real images, for patch-level retrieval.

The class holds the arrays, validates them and searches them; the other ideas live in their own
modules: metadata in :mod:`.meta`, building and importing in :mod:`.builders`, the directory format
and crash-safe saving in :mod:`.storage`, checksums in :mod:`.integrity`, search backends in
:mod:`.search`.
"""

from __future__ import annotations

import warnings

import torch

from ..models.base import codebook_fingerprint
from . import builders, storage
from .builders import check_finite_keys
from .faiss_index import IndexFormatError, inner_ivfpq, set_nprobe, validate_ivfpq
from .meta import KEY_SOURCES, OFFICIAL_FINGERPRINT, DatabaseError, DatabaseMeta
from .ondisk import lists_on_disk, refuse_device
from .search import INDEX_TYPES, make_search


def _names_codebook_of(fingerprint: str, adapter) -> bool:
    """True if a database's stored ``fingerprint`` is that of ``adapter``'s codebook: the adapter's own
    (what :meth:`PatchDatabase.build` stores; HF adapters hash the raw rows) or, for a database made by
    ``from_tokens`` / ``from_latents`` from ``adapter.codebook()`` without ``fingerprint=``, the hash of
    those (normalised) rows. The second hash is only computed when the first does not match."""
    if fingerprint == adapter.fingerprint():
        return True
    codebook = getattr(adapter, "codebook", None)
    return callable(codebook) and fingerprint == codebook_fingerprint(codebook())


class PatchDatabase:
    """Keys (N, key_dim) and token-id values (N,) of real image patches, with their metadata.

    Build with :meth:`build`, persist with :meth:`save` / :meth:`load`, query with :meth:`retrieve`.
    An ``index="ivfpq"`` database also holds a trained FAISS index (``index``) with one entry per
    value, searched with ``nprobe`` lists; its ``keys`` may be None. An on-disk one
    (:mod:`.ondisk`: its lists in a file, its int32 values memory-mapped) stays on the CPU.
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
        # An on-disk database's token range was checked when it was merged and is checked against its
        # meta.json by load: scanning its memory-mapped values here would read the whole file.
        on_disk = False
        if index is not None:
            try:
                nprobe = inner_ivfpq(index).nprobe if nprobe is None else nprobe
                on_disk = lists_on_disk(index)
                validate_ivfpq(index, values.cpu().numpy(), meta.key_dim, meta.codebook_size, nprobe,
                               check_range=not on_disk)
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
            check_finite_keys(keys)
        if values.shape != (keys_shape[0],):
            raise DatabaseError(f"values must be ({keys_shape[0]},) to match the keys, got {tuple(values.shape)}")
        if meta.key_source not in KEY_SOURCES:
            raise DatabaseError(f"key_source: expected one of {KEY_SOURCES}, got {meta.key_source!r}")
        if meta.index not in INDEX_TYPES:
            raise DatabaseError(f"index: expected one of {INDEX_TYPES}, got {meta.index!r}")
        if keys_shape[0] == 0:
            raise DatabaseError("a database needs at least one entry")
        if values.numel() and not on_disk and (int(values.min()) < 0 or int(values.max()) >= meta.codebook_size):
            raise DatabaseError(
                f"values must be token ids in [0, {meta.codebook_size}), got range "
                f"[{int(values.min())}, {int(values.max())}]"
            )
        self.keys = keys
        self.values = values if on_disk else values.long()  # on disk: the int32 memory map, not a copy
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

    # ---- building (see :mod:`.builders`) ----------------------------------------------------
    build = classmethod(builders.build)
    from_tokens = classmethod(builders.from_tokens)
    from_latents = classmethod(builders.from_latents)
    from_keys = classmethod(builders.from_keys)
    from_official = classmethod(builders.from_official)

    # ---- persistence (see :mod:`.storage`) --------------------------------------------------
    save = storage.save
    load = classmethod(storage.load)

    # ---- use ------------------------------------------------------------------------------
    def check_compatible(self, adapter, strict: bool = False) -> None:
        """Raise :class:`DatabaseError` if this database cannot serve ``adapter``'s model; warn if its
        fingerprint names another codebook (neither the adapter's fingerprint nor that of its ``codebook()``).

        ``strict=True`` (the command line) raises instead of warning when the database records the
        fingerprint of another codebook; an imported release, which records none, still only warns.
        """
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
        if not _names_codebook_of(m.model_fingerprint, adapter):
            message = ("the database was built with a different VQ codebook than this model's "
                       f"(fingerprint {m.model_fingerprint} vs {adapter.fingerprint()})")
            if strict and m.model_fingerprint != OFFICIAL_FINGERPRINT:
                raise DatabaseError(f"{message}: its keys and tokens mean something else for this model; build the "
                                    "database with this model (arrag-kernels build-db --model <this model>)")
            warnings.warn(f"{message}; retrieval quality may suffer", stacklevel=3)

    def to(self, device=None, dtype=None) -> "PatchDatabase":
        """Move keys and values (e.g. to the model's GPU); ``dtype`` sets the key storage type. An on-disk
        database (:mod:`.ondisk`) stays on the CPU: another device is a ValueError."""
        if device is not None and torch.device(device).type != "cpu" and self.index is not None \
                and lists_on_disk(self.index):
            raise refuse_device(f"moving the database to {device}")
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
        queries go to faiss-cpu (sharded or not) unless the ``triton`` backend is forced; CPU
        "devices" (``["cpu", "cpu"]``) then exercise the sharded device search without a GPU. Raises
        ValueError for CUDA devices this machine does not have. See
        :class:`arrag_kernels.retrieval.search.DeviceIVFPQSearch`.
        """
        db = self.to()
        db._shards = devices
        make_search(db.meta.index, db.keys, db.index, db.nprobe, db._shards)  # raises now if it cannot shard
        return db

    def distributed(self, group=None):
        """This database split over the ranks of the ``torch.distributed`` ``group`` (default: the
        world), called collectively with the same database on every rank: rank r keeps the r-th of
        about equal contiguous id ranges and searches it, the ranks' top-k are merged
        (:class:`arrag_kernels.retrieval.distributed.DistributedDatabase`, which decode loops and
        :func:`arrag_kernels.patch_model` take like this database)."""
        from .distributed import DistributedDatabase

        return DistributedDatabase.from_database(self, group)

    def search(self, queries: torch.Tensor, k: int, return_tokens: bool = False):
        """(Q, key_dim) queries -> ((Q, k) float32 squared L2 distances, (Q, k) int64 entry ids); with
        ``return_tokens`` also the entries' (Q, k) int64 token ids (-1 for padding), gathered inside the
        search's last kernel by the device searches."""
        if queries.dim() != 2 or queries.shape[1] != self.meta.key_dim:
            raise ValueError(f"queries must be (Q, {self.meta.key_dim}), got {tuple(queries.shape)}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k: expected an int >= 1 neighbours per query, got {k!r}")
        if k > len(self):
            raise ValueError(f"k = {k} is larger than the database ({len(self)} entries); use k <= {len(self)}")
        if self._search is None:
            self._search = make_search(self.meta.index, self.keys, self.index, self.nprobe, self._shards)
        # values follow the queries (a copy per call when the database was not moved to their device)
        return self._search.search(queries, k, self.values.to(queries.device) if return_tokens else None)

    def retrieve(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Like :meth:`search` but returns the entries' token ids (-1 for padding) instead of row ids."""
        dist, _, tokens = self.search(queries, k, return_tokens=True)
        return dist, tokens
