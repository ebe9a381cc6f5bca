"""Querying a patch database from a partially generated token grid: the one retriever of the library.

Every retrieval-augmented path asks the same question: for some positions of some token grids
(negative ids: not generated / unknown), which ``k`` database entries are nearest to the
neighbourhood of each position? :class:`Retriever` answers it for any positions shape: one position
per image (AR decoding: DAiD, FAiD decode, the logits processor), many per image (masked decoding)
or all of them (teacher forcing: FAiD training, evaluation). The answer is one :class:`Hits`.
"""

from __future__ import annotations

import types
from typing import NamedTuple

import torch

from ..config import check_int
from ..ops import neighbor_keys, retrieval_positions
from ..ops.knn import MAX_K


class Hits(NamedTuple):
    """The ``k`` database entries nearest to each query, for queries shaped ``S`` (the positions' shape).

    ``S`` is ``(B,)`` for one position per image, ``(B, P)`` for P positions per image and ``(B, N)``
    for every position of an N-cell grid.

    Attributes:
        distances: ``S + (k,)`` float32 squared L2 distances, nearest first.
        tokens: ``S + (k,)`` int64 token ids (the entries' values); -1 pads a query that found fewer
            than ``k`` entries (IVF-PQ).
        valid: ``S`` bool: the position has a database key under the key layout's border policy
            (False where ``border="skip"`` and a neighbour lies outside the grid; its hits are
            computed from a zero-padded query and must be ignored).

    A tuple, so ``distances, tokens, valid = hits`` and ``daid_sample(logits, *hits, ...)`` work.
    Entry row ids are not kept: every consumer needs the tokens only.
    """

    distances: torch.Tensor
    tokens: torch.Tensor
    valid: torch.Tensor

    def flat(self) -> "Hits":
        """The same hits with the positions' shape flattened to R rows: (R, k), (R, k), (R,)."""
        k = self.tokens.shape[-1]
        return Hits(self.distances.reshape(-1, k), self.tokens.reshape(-1, k), self.valid.reshape(-1))


def _normal_device(device) -> torch.device:
    """``device`` with the index a bare "cuda" means now, so equal devices compare equal; a CUDA device
    this machine does not have is a ValueError naming it."""
    device = torch.device(device)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index or 0) >= count:
            raise ValueError(f"device {device}: this machine has {count} CUDA device(s); retrieve on 'cpu' or an "
                             "available CUDA device")
        if device.index is None:
            return torch.device("cuda", torch.cuda.current_device())
    return device


def on_device(db, device):
    """``db`` itself if its keys and values already live on ``device``, else ``db.to(device)``.

    Retrievers given the same database object for the same device share it (one device copy of the
    keys, one search state), which :func:`arrag_kernels.patch_model` relies on for DAiD + FAiD.
    """
    device = _normal_device(device)
    tensors = [t for t in (db.keys, db.values) if t is not None]
    if all(_normal_device(t.device) == device for t in tensors):
        return db
    return db.to(device)


class Retriever:
    """The ``k`` nearest database entries of the neighbourhoods of grid positions, for any batch.

    The query of a position is built from the tokens around it (:func:`arrag_kernels.ops.neighbor_keys`,
    the database's key layout; unknown or outside cells contribute zeros) and all queries of a call
    go to the database in one search. One query per image and position: the conditional and
    unconditional CFG rows of an image share its tokens. Which positions have a key is fixed by the key layout and known
    on the host before a loop starts (``retrieves_at``), so no loop reads device values to decide.

    Args:
        db: :class:`arrag_kernels.PatchDatabase`, checked against ``tokenizer``; moved to ``device``
            unless it is there already (then shared, see :func:`on_device`).
        k: entries per query, ``1 <= k <= len(db)``.
        tokenizer: what makes queries: an :class:`arrag_kernels.models.ImageTokenizer` or
            :class:`arrag_kernels.masked.MaskedGenerator` (the database is checked against its codebook
            size, width, grid and fingerprint), or a bare (V, d) tensor of L2-normalised codebook rows
            (checked against the database's codebook size and width only).
        device: where retrieval runs (default: the tokenizer's ``device``, else its codebook's).
        setting: the setting ``k`` came from, named in errors (e.g. "DAiDConfig.k").
        grid: the grid being generated, for tokenizers that choose it per call (Emu3); default the
            tokenizer's own ``grid``. Queries always use the database's grid.

    Attributes:
        db, k, tokenizer, layout, grid (the database's), codebook ((V, d) float32 on ``device``), device,
        retrieves_at (list of H*W bools: the position has a key), searches (database searches so far).
    """

    def __init__(self, db, k: int, tokenizer, device=None, setting: str = "k", grid=None):
        k = check_int(setting, k)
        if not 1 <= k <= min(len(db), MAX_K):
            raise ValueError(f"{setting} = {k}: expected 1 <= {setting} <= {min(len(db), MAX_K)}" if k < 1 else
                             f"{setting} = {k} is larger than the database ({len(db)} entries); use k <= {len(db)}"
                             if k > len(db) else f"{setting} = {k}: the search returns at most k = {MAX_K}")
        m = db.meta
        if isinstance(tokenizer, torch.Tensor):
            codebook = tokenizer.detach()
            if codebook.dim() != 2 or tuple(codebook.shape) != (m.codebook_size, m.embed_dim):
                raise ValueError(f"codebook: expected ({m.codebook_size}, {m.embed_dim}) to match the database, "
                                 f"got {tuple(codebook.shape)}")
            default_device = codebook.device
        else:
            facts = tokenizer if grid is None else types.SimpleNamespace(  # what check_compatible reads, at ``grid``
                codebook_size=tokenizer.codebook_size, embed_dim=tokenizer.embed_dim, grid=tuple(grid),
                fingerprint=tokenizer.fingerprint, codebook=tokenizer.codebook)
            db.check_compatible(facts)
            codebook = tokenizer.codebook()
            # ImageTokenizers name their device; masked generators keep only the codebook's
            default_device = getattr(tokenizer, "device", None) or codebook.device
        self.device = _normal_device(device if device is not None else default_device)
        self.k = k
        self.tokenizer = tokenizer
        self.db = on_device(db, self.device)
        self.layout = m.layout
        self.grid = tuple(m.grid)
        self.codebook = codebook.to(device=self.device, dtype=torch.float32)
        self.retrieves_at = retrieval_positions(self.grid, self.layout).tolist()
        self.searches = 0

    def covers(self, other: "Retriever") -> bool:
        """Whether ``other``'s hits are always the first ``other.k`` of this retriever's, so one search of this
        retriever can answer both: the same database object (one search state: exact, or IVF-PQ with the
        same nprobe), the same tokenizer (the same queries) and ``other.k <= k``. The search's order does
        not depend on k (nearest first, ties by smaller id), so the k nearest start with the ``other.k`` nearest.
        """
        return self.db is other.db and self.tokenizer is other.tokenizer and other.k <= self.k

    def retrieve(self, tokens: torch.Tensor, positions=None) -> Hits:
        """Nearest entries of ``positions`` of the (B, H*W) grids ``tokens`` (-1: not generated / unknown).

        ``positions``:

        * an int: that position of every image -> :class:`Hits` of shape (B,);
        * a (1,) or (B,) int64 device tensor: one position (each image's) -> (B,); read on the device
          only, so the call can be captured in a CUDA graph;
        * a (B, P) tensor: P positions per image, all searched at once -> (B, P);
        * None: every position (teacher forcing) -> (B, H*W).
        """
        B, N = tokens.shape
        if positions is None:
            positions = torch.arange(N, device=tokens.device).expand(B, N)
        elif not isinstance(positions, torch.Tensor):
            positions = torch.full((B,), positions, dtype=torch.long, device=tokens.device)
        elif positions.dim() == 1 and positions.numel() == 1:
            positions = positions.repeat(B)
        queries, valid = neighbor_keys(tokens, self.codebook, positions, self.grid, self.layout)
        distances, ids = self.db.retrieve(queries.reshape(-1, queries.shape[-1]), self.k)  # one search
        self.searches += 1
        return Hits(distances.view(*valid.shape, -1), ids.view(*valid.shape, -1), valid)
