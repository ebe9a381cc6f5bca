"""Search a database whose entries are split over the ranks of a ``torch.distributed`` group.

Each rank holds one shard: the entries with global ids ``first_id .. first_id + count - 1`` (rank r's
range follows rank r - 1's; together they tile ``0 .. total - 1``), searched by the shard's own
backend (exact, or IVF-PQ filled from the same trained index as every other shard). Every rank runs
the same generation (the same queries); a search

1. searches the queries in the local shard: top-k (distance, global id, token), the tokens from the
   shard's own values (values are not replicated),
2. gathers every rank's top-k (one ``all_gather`` into one tensor: 16 bytes per candidate),
3. merges them on the device (:func:`merge_topk`): distance first, then the lower global id
   (FAISS's order, and the exact search's), padding (id -1) last.

Every rank gets the same hits, those of the unsharded database: each shard searches the same query
batch the unsharded database would, so even the distances are bitwise equal. Shapes are fixed by
the number of queries, ``k`` and the world size and nothing is read on the host, so on NCCL the
search is meant to be captured in a CUDA graph (not run on NCCL yet); gloo (CPU) works, without
capture. Collectives need every rank to search at the same time with the same queries and ``k``:
decode loops do when every rank runs the same loop on the same prompts with the same seed. Ranks
that search different queries fail a device-side check (a RuntimeError on the CPU, a device assert
on CUDA) instead of mixing their hits.

:class:`DistributedDatabase` presents the interface the decode loops use (``len``, ``meta``,
``search``, ``retrieve``, ``to``, ``check_compatible``, ``nprobe``), so the one
:class:`~arrag_kernels.retrieval.query.Retriever` and everything built on it (DAiD, FAiD, masked
decoding, the logits processor, :func:`arrag_kernels.patch_model`) run on it unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..ops.ivfpq import FLT_MAX, pack
from .database import PatchDatabase
from .faiss_index import import_faiss, inner_ivfpq
from .meta import PARTS_FILE, DatabaseError, DatabaseMeta
from .parts import trained_digest

# What the shards' metadata must agree on (num_images counts each shard's own images: summed).
_SHARED_META = ("layout", "codebook_size", "embed_dim", "grid", "key_source", "model_fingerprint", "index")
_LAST = torch.iinfo(torch.int64).max  # merge key of padding: after every real candidate

# torch 2.13 renamed all_gather_into_tensor (the old name warns); torch >= 2.6 is supported.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def merge_topk(distances: torch.Tensor, ids: torch.Tensor, tokens: torch.Tensor, k: int):
    """Merge the top-k lists of shards holding ascending id ranges into one top-k.

    Args:
        distances, ids, tokens: (Q, S * k) float32 distances, int64 global ids (-1: padding) and int64
            tokens: S blocks of k columns, block s from the shard with the s-th id range, each sorted
            by (distance, id) with its padding last (the exact search and faiss order ties by id; the
            device IVF-PQ search by list slot, which is id order within a list).
        k: results per query.

    Returns (Q, k) distances, ids, tokens ordered by distance, then by the lower global id, padding
    (FLT_MAX, -1, -1) last: the order of a search over all shards' entries. Within a block the
    column follows the id among equal distances and blocks follow the id ranges, so one ``topk``
    over (distance, column) keys gives that order; no host reads, fixed shapes.
    """
    column = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    key = torch.where(ids >= 0, pack(distances, column), _LAST)
    order = torch.topk(key, k, dim=1, largest=False, sorted=True).indices
    ids = torch.gather(ids, 1, order)
    padding = ids < 0
    return (torch.gather(distances, 1, order).masked_fill(padding, FLT_MAX), ids,
            torch.gather(tokens, 1, order).masked_fill(padding, -1))


def _id_range(index) -> tuple[int, int] | None:
    """(smallest, largest) id in an IVF index's lists (None if it holds none): one pass over the ids,
    no copy."""
    faiss = import_faiss()
    invlists = inner_ivfpq(index).invlists
    low, high = None, None
    for l in range(invlists.nlist):
        n = invlists.list_size(l)
        if n:
            ids = faiss.rev_swig_ptr(invlists.get_ids(l), n)
            low = int(ids.min()) if low is None else min(low, int(ids.min()))
            high = int(ids.max()) if high is None else max(high, int(ids.max()))
    return None if low is None else (low, high)


def _ivfpq_slice(index, lo: int, hi: int):
    """A copy of a (OPQ +) IVF-PQ index holding only its entries with ids in [lo, hi), renumbered
    0 .. hi - lo - 1, in the same list order (what filling the trained index with those entries in id
    order gives); the trained quantizers are shared by value."""
    faiss = import_faiss()
    part = faiss.clone_index(index)
    part.reset()  # the trained, empty index
    source, target = inner_ivfpq(index).invlists, inner_ivfpq(part).invlists
    size = source.code_size
    for l in range(source.nlist):
        n = source.list_size(l)
        if not n:
            continue
        ids = faiss.rev_swig_ptr(source.get_ids(l), n)
        keep = (ids >= lo) & (ids < hi)
        if keep.any():
            new_ids = np.ascontiguousarray(ids[keep] - lo)
            codes = np.ascontiguousarray(faiss.rev_swig_ptr(source.get_codes(l), n * size).reshape(n, size)[keep])
            target.add_entries(l, len(new_ids), faiss.swig_ptr(new_ids), faiss.swig_ptr(codes))
    inner_ivfpq(part).ntotal = part.ntotal = hi - lo
    return part


def _group_position(group) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("a DistributedDatabase needs an initialised torch.distributed process group: call "
                         "torch.distributed.init_process_group('nccl' or 'gloo', ...) on every rank first "
                         "(e.g. under torchrun)")
    return dist.get_rank(group), dist.get_world_size(group)


def _agree(group, facts: dict) -> list[dict]:
    """Exchange every rank's ``facts`` (with ``problems``: what is wrong with its shard) and raise the
    same :class:`DatabaseError` on every rank if any rank has a problem or the shards disagree: one
    collective, so a bad shard never leaves the other ranks waiting in a later one."""
    world = dist.get_world_size(group)
    every = [None] * world
    dist.all_gather_object(every, facts, group=group)
    problems = [f"rank {r}: {p}" for r, f in enumerate(every) for p in f["problems"]]
    if not problems:
        first = every[0]
        for r, f in enumerate(every[1:], 1):
            for field in _SHARED_META:
                if f["meta"][field] != first["meta"][field]:
                    problems.append(f"rank {r}'s shard has {field} = {f['meta'][field]!r}, rank 0's "
                                    f"{first['meta'][field]!r}")
            if f["trained"] != first["trained"]:
                problems.append(f"rank {r}'s shard was filled from another trained IVF-PQ index than rank 0's (OPQ, "
                                f"coarse centroids or PQ codebooks differ: fingerprint {str(f['trained'])[:12]} vs "
                                f"{str(first['trained'])[:12]}); every shard must come from the same trained index")
            for name in ("nprobe", "key_dtype", "total"):
                if f[name] != first[name]:
                    problems.append(f"rank {r}'s shard has {name} = {f[name]!r}, rank 0's {first[name]!r}")
        expected = 0
        for r, f in enumerate(every):
            if f["first_id"] != expected:
                problems.append(f"rank {r}'s shard starts at id {f['first_id']}, expected {expected} (the ranks' "
                                "shards must hold consecutive id ranges in rank order)")
            expected = f["first_id"] + f["count"]
        if not problems and expected != first["total"]:
            problems.append(f"the shards hold ids 0..{expected - 1}, but the database has {first['total']} entries")
    if problems:
        raise DatabaseError("the ranks' shards do not form one database: " + "; ".join(problems))
    return every


class DistributedDatabase:
    """A patch database split over the ranks of a ``torch.distributed`` group (see the module docstring).

    Every rank constructs it with its own shard, collectively (all ranks of ``group`` at once).

    Args:
        shard: this rank's :class:`arrag_kernels.PatchDatabase` (exact or IVF-PQ; on the device the
            rank searches on: CPU for gloo, its GPU for NCCL).
        first_id: the global id of the shard's first entry (its row 0; an IVF-PQ shard's index holds
            the row ids 0 .. len(shard) - 1, as a part of a partitioned database does); rank r's shard
            must start where rank r - 1's ends.
        total: entries of the whole database (the same on every rank).
        group: the process group (default: the world).

    Raises :class:`arrag_kernels.retrieval.DatabaseError` on every rank, naming the rank, if a shard
    is bad or the shards disagree: another key layout, codebook fingerprint, model or index type, an
    IVF-PQ shard filled from another trained index or whose index holds ids other than its row ids
    (checked in one pass over the lists' ids), another nprobe or key dtype, id ranges with a gap or an
    overlap, or another total.

    Attributes:
        meta: the whole database's :class:`~arrag_kernels.retrieval.DatabaseMeta` (``num_images``:
            the shards' sum); shard, first_id, rank, world_size, group; keys and values: this rank's
            shard's (what :func:`arrag_kernels.retrieval.query.on_device` looks at).
    """

    def __init__(self, shard: PatchDatabase, first_id: int, total: int, group=None):
        rank, world = _group_position(group)
        # Bad arguments on one rank are reported on every rank by the exchange: no rank waits for it.
        problems = []
        if not isinstance(shard, PatchDatabase):
            problems.append(f"shard: expected an arrag_kernels.PatchDatabase, got {type(shard).__name__}")
        for name, value in (("first_id", first_id), ("total", total)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                problems.append(f"{name}: expected an int >= 0, got {value!r}")
        if problems:
            _agree(group, {"problems": problems})
        if first_id + len(shard) > total:
            problems.append(f"its ids {first_id}..{first_id + len(shard) - 1} reach beyond total = {total} entries")
        if shard.index is not None:
            held = _id_range(shard.index)
            if held is not None and (held[0] < 0 or held[1] >= len(shard)):
                problems.append(f"its IVF-PQ index holds ids {held[0]}..{held[1]}, expected its row ids "
                                f"0..{len(shard) - 1} (global id = first_id + row id)")
        meta = shard.meta
        facts = {"problems": problems, "meta": {name: getattr(meta, name) for name in _SHARED_META},
                 "num_images": meta.num_images, "first_id": first_id, "count": len(shard), "total": total,
                 "trained": None if shard.index is None else trained_digest(shard.index),
                 "nprobe": shard.nprobe, "key_dtype": None if shard.keys is None else str(shard.keys.dtype)}
        every = _agree(group, facts)
        self.shard = shard
        self.first_id, self.total, self.group, self.rank, self.world_size = first_id, total, group, rank, world
        self.meta = DatabaseMeta(**facts["meta"], num_images=sum(f["num_images"] for f in every))

    @classmethod
    def from_database(cls, db: PatchDatabase, group=None) -> "DistributedDatabase":
        """Split ``db``, the same database on every rank (e.g. loaded from one directory), into
        contiguous id ranges of about equal size: rank r keeps the r-th (a copy: ``db`` can be freed).
        An IVF-PQ database keeps its trained index on every rank and the entries of its range. A part of a
        partitioned database (``db.meta.part``, what a torchrun build returns each rank) is used as it is."""
        rank, world = _group_position(group)
        if db.meta.part is not None:  # a torchrun build's own part (parts.py): already this rank's shard
            return cls(db, db.meta.part.first_id, db.meta.part.total, group)
        lo, hi = len(db) * rank // world, len(db) * (rank + 1) // world
        try:
            if len(db) < world:
                raise ValueError(f"a database of {len(db)} entries cannot be split over {world} ranks (at least one "
                                 "entry each)")
            m = db.meta
            meta = dataclasses.replace(m, num_images=m.num_images * hi // len(db) - m.num_images * lo // len(db))
            keys = None if db.keys is None else db.keys[lo:hi].clone()
            index = None if db.index is None else _ivfpq_slice(db.index, lo, hi)
            shard = PatchDatabase(keys, db.values[lo:hi].clone(), meta, index=index, nprobe=db.nprobe)
            if db._shards is not None:
                shard = shard.shard(db._shards)
        except ValueError as e:  # DatabaseError is one
            _agree(group, {"problems": [f"cannot take its slice {lo}..{hi - 1} of the database: {e}"]})
        return cls(shard, lo, len(db), group)

    @classmethod
    def from_parts(cls, path: str | os.PathLike, group=None, verify: str | bool = "quick") -> "DistributedDatabase":
        """Rank r loads part r of the partitioned database at ``path`` (``parts.json`` + one database
        directory per part, see :mod:`arrag_kernels.retrieval.parts`); the group must have one rank per
        part. A part that is missing or fails to load (``verify`` as in :meth:`PatchDatabase.load`) is
        reported on every rank."""
        rank, world = _group_position(group)
        path = Path(path)
        try:
            manifest = json.loads((path / PARTS_FILE).read_text())
            parts, total = manifest["parts"], int(manifest["total"])
            if len(parts) != world:
                raise DatabaseError(f"{str(path)!r} has {len(parts)} parts but the group has {world} ranks: run one "
                                    "rank per part")
            first_id = int(parts[rank]["first_id"])
            shard = PatchDatabase.load(path / parts[rank]["dir"], verify=verify)
            if shard.meta.part is not None and shard.meta.part.first_id != first_id:
                raise DatabaseError(f"part {parts[rank]['dir']!r} starts at id {shard.meta.part.first_id} by its own "
                                    f"meta.json but at {first_id} by parts.json")
        except (OSError, ValueError, KeyError, TypeError, IndexError) as e:  # DatabaseError is a ValueError
            _agree(group, {"problems": [f"cannot load its part of {str(path)!r}: {e}"]})  # raises on every rank
        return cls(shard, first_id, total, group)

    def __len__(self) -> int:
        return self.total

    @property
    def keys(self) -> torch.Tensor | None:
        return self.shard.keys

    @property
    def values(self) -> torch.Tensor:
        return self.shard.values

    @property
    def nprobe(self) -> int | None:
        return self.shard.nprobe

    def set_nprobe(self, nprobe: int) -> None:
        """Probe ``nprobe`` lists in this rank's shard; call it with the same value on every rank."""
        self.shard.set_nprobe(nprobe)

    def __repr__(self) -> str:
        m = self.meta
        return (f"DistributedDatabase({self.total} entries over {self.world_size} ranks, this rank {self.rank}: ids "
                f"{self.first_id}..{self.first_id + len(self.shard) - 1}, key_dim={m.key_dim}, layout={m.layout}, "
                f"grid={m.grid}, codebook={m.codebook_size}, index={m.index!r})")

    def check_compatible(self, adapter, strict: bool = False) -> None:
        """:meth:`PatchDatabase.check_compatible` (every shard has the same metadata)."""
        self.shard.check_compatible(adapter, strict)

    def to(self, device=None, dtype=None) -> "DistributedDatabase":
        """The same database with this rank's shard moved (:meth:`PatchDatabase.to`); no collective."""
        moved = DistributedDatabase.__new__(DistributedDatabase)
        moved.__dict__.update(self.__dict__)
        moved.shard = self.shard.to(device, dtype)
        return moved

    def _hits(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if queries.dim() != 2 or queries.shape[1] != self.meta.key_dim:
            raise ValueError(f"queries must be (Q, {self.meta.key_dim}), got {tuple(queries.shape)}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k: expected an int >= 1 neighbours per query, got {k!r}")
        if k > self.total:
            raise ValueError(f"k = {k} is larger than the database ({self.total} entries); use k <= {self.total}")
        q, world = queries.shape[0], self.world_size
        found = min(k, len(self.shard))  # a shard smaller than k pads its list
        dist_, ids, tokens = self.shard.search(queries, found, return_tokens=True)
        ids = torch.where(ids >= 0, ids + self.first_id, -1)
        if found < k:
            pad = (0, k - found)
            dist_ = torch.nn.functional.pad(dist_, pad, value=FLT_MAX)
            ids, tokens = (torch.nn.functional.pad(t, pad, value=-1) for t in (ids, tokens))
        # Two int64 per candidate: (distance bits << 32 | token bits) and the global id; one more
        # column carries a fingerprint of the query (a weighted integer sum of its float32 bits: exact
        # in any order), which every rank compares with its own.
        bits = queries.float().contiguous().view(torch.int32).long()
        fingerprint = (bits * torch.arange(1, bits.shape[1] + 1, device=bits.device)).sum(1)
        sent = torch.cat([torch.stack([(dist_.view(torch.int32).long() << 32) | (tokens & 0xFFFFFFFF), ids], -1),
                          fingerprint[:, None, None].expand(q, 1, 2)], 1)  # (Q, k + 1, 2)
        received = sent.new_empty((world * q, k + 1, 2))
        _all_gather_single(received, sent, group=self.group)
        received = received.view(world, q, k + 1, 2)
        torch._assert_async((received[:, :, k, 0] == fingerprint).all(),
                            "DistributedDatabase: the ranks searched different queries; every rank must search "
                            "the same queries (run the same prompts with the same seed on every rank)")
        hits = received[:, :, :k].transpose(0, 1).reshape(q, world * k, 2)  # (Q, the shards' blocks in rank order)
        first, ids = hits[..., 0], hits[..., 1]
        return merge_topk((first >> 32).int().view(torch.float32), ids, (first << 32) >> 32, k)

    def search(self, queries: torch.Tensor, k: int, return_tokens: bool = False):
        """(Q, key_dim) queries -> ((Q, k) float32 squared L2 distances, (Q, k) int64 global ids), the
        unsharded database's result, and with ``return_tokens`` the entries' token ids (-1 for padding),
        each from the rank that holds the entry; collective (every rank calls it with the same queries and k)."""
        dist_, ids, tokens = self._hits(queries, k)
        return (dist_, ids, tokens) if return_tokens else (dist_, ids)

    def retrieve(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Like :meth:`search` but returns the entries' token ids (-1 for padding) instead of the ids."""
        dist_, _, tokens = self._hits(queries, k)
        return dist_, tokens
