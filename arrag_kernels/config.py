"""Frozen, validated configuration objects.

Every config checks its fields on construction, so a bad value fails where it was written, not
deep inside a decode step.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass

NEIGHBORHOODS = ("causal", "full")
BORDERS = ("skip", "zero")
DEDUP_MODES = ("nearest", "sum")
GATE_KINDS = ("max_prob", "entropy")


def check_int(name: str, value) -> int:
    """``value`` as an int if it is an integer (not a bool, float or string), else a TypeError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
    return int(value)


def check_real(name: str, value) -> float:
    """``value`` as a float if it is a real number (not a bool or string), else a TypeError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__} {value!r}")
    return float(value)


def _normalise_hops(hops, name: str = "hops") -> tuple[int, ...]:
    if isinstance(hops, str):  # "12" is the paper's spelling of hops (1, 2)
        if not hops.isdigit():
            raise ValueError(f"{name}: expected digits like '1' or '12', got {hops!r}")
        hops = tuple(int(ch) for ch in hops)
    given, hops = hops, tuple(hops) if hasattr(hops, "__iter__") else (hops,)
    if any(isinstance(h, bool) or not isinstance(h, numbers.Integral) for h in hops):
        raise TypeError(f"{name}: expected an int, an iterable of ints or digits like '12', got {given!r}")
    hops = tuple(sorted({int(h) for h in hops}))
    if not hops or any(h < 1 for h in hops):
        raise ValueError(f"{name}: expected a non-empty set of positive integers, got {hops!r}")
    return hops


@dataclass(frozen=True)
class KeyLayout:
    """Which neighbours of a target patch form its retrieval key, and in which order.

    ``neighborhood="causal"`` takes the already generated cells of the (2R+1)x(2R+1) window centred
    on the target, R = max(hops): hop 1 gives UL, U, UR, L (4 cells, the official key); R = 2 gives
    12 cells (rows r-2 and r-1 at columns c-2..c+2, then row r at c-2, c-1). Keys depend only on
    the window radius, so ``hops=(2,)`` and ``hops=(1, 2)`` describe the same key.
    ``neighborhood="full"`` takes every cell of the window except the centre (8 cells for R = 1),
    for masked / parallel decoders.

    Cells are always listed top-to-bottom, left-to-right; each contributes ``embed_dim`` values, so
    a key has ``num_cells * embed_dim`` values.

    ``border="skip"`` (official) keeps only targets whose neighbours all lie inside the grid;
    ``border="zero"`` (paper) keeps every target and zero-fills neighbours outside the grid.
    Neighbours inside the grid that are not generated yet are always zero-filled.
    """

    neighborhood: str = "causal"
    hops: tuple[int, ...] = (1,)
    border: str = "skip"

    def __post_init__(self):
        if not isinstance(self.neighborhood, str) or self.neighborhood not in NEIGHBORHOODS:
            raise ValueError(f"neighborhood: expected one of {NEIGHBORHOODS}, got {self.neighborhood!r}")
        if not isinstance(self.border, str) or self.border not in BORDERS:
            raise ValueError(f"border: expected one of {BORDERS}, got {self.border!r}")
        object.__setattr__(self, "hops", _normalise_hops(self.hops))

    @property
    def radius(self) -> int:
        return max(self.hops)

    @property
    def offsets(self) -> tuple[tuple[int, int], ...]:
        """(dr, dc) of each key cell relative to the target, in key order."""
        r = self.radius
        cells = []
        for dr in range(-r, r + 1):
            for dc in range(-r, r + 1):
                if (dr, dc) == (0, 0):
                    continue
                if self.neighborhood == "causal" and (dr > 0 or (dr == 0 and dc > 0)):
                    continue
                cells.append((dr, dc))
        return tuple(cells)

    @property
    def num_cells(self) -> int:
        return len(self.offsets)

    def key_dim(self, embed_dim: int) -> int:
        return self.num_cells * embed_dim

    def to_dict(self) -> dict:
        return {"neighborhood": self.neighborhood, "hops": list(self.hops), "border": self.border}

    @classmethod
    def from_dict(cls, d: dict) -> "KeyLayout":
        return cls(neighborhood=d["neighborhood"], hops=tuple(d["hops"]), border=d["border"])


@dataclass(frozen=True)
class DAiDConfig:
    """Distribution-augmented decoding (training-free AR-RAG).

    At every retrieval step the ``k`` nearest database entries of the step's neighbourhood query
    give distances d_j and token ids t_j. With ``dedup="nearest"`` (official code) each distinct
    token keeps its smallest distance and ``p_ret = softmax(-d / tau)`` over the distinct tokens;
    with ``dedup="sum"`` (paper formula) ``p_ret(v) = sum_{j: t_j = v} softmax_j(-d_j / tau)``.
    The sampled distribution is ``(1 - lam) * p_model + lam * p_ret`` where ``p_model`` is the
    model's distribution after CFG, temperature and any other logits processing.

    ``gate`` makes retrieval adaptive: None (default) merges at every retrieval step; a pair
    ``("max_prob", t)`` (0 < t <= 1) leaves the rows with ``max p_model >= t`` to the model alone, and
    ``("entropy", t)`` (t >= 0 nats) those with ``H(p_model) <= t``. Confident rows sample from
    ``p_model`` exactly; where the loop can skip the search for them it does (see
    :meth:`arrag_kernels.decoding.DAiDSampler.merge`), elsewhere the search runs and they are inactive.
    """

    lam: float = 0.05
    tau: float = 0.6
    k: int = 2048
    dedup: str = "nearest"
    gate: tuple | None = None

    def __post_init__(self):
        lam, tau, k = check_real("DAiDConfig.lam", self.lam), check_real("DAiDConfig.tau", self.tau), check_int("DAiDConfig.k", self.k)
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"DAiDConfig.lam: expected a value in [0, 1], got {self.lam}")
        if not tau > 0.0:
            raise ValueError(f"DAiDConfig.tau: expected a temperature > 0, got {self.tau}")
        if k < 1:
            raise ValueError(f"DAiDConfig.k: expected k >= 1, got {self.k}")
        object.__setattr__(self, "lam", lam)
        object.__setattr__(self, "tau", tau)
        object.__setattr__(self, "k", k)
        if not isinstance(self.dedup, str) or self.dedup not in DEDUP_MODES:
            raise ValueError(f"DAiDConfig.dedup: expected one of {DEDUP_MODES}, got {self.dedup!r}")
        if self.gate is not None:
            object.__setattr__(self, "gate", _check_gate(self.gate))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_gate(gate) -> tuple[str, float]:
    """``DAiDConfig.gate`` as a (kind, threshold) tuple, or a clear error."""
    expected = ('expected None, ("max_prob", t) with 0 < t <= 1 or ("entropy", t) with t >= 0 nats, '
                f"got {gate!r}")
    if isinstance(gate, str) or not isinstance(gate, (tuple, list)) or len(gate) != 2:
        raise ValueError(f"DAiDConfig.gate: {expected}")
    kind, threshold = gate
    if not isinstance(kind, str) or kind not in GATE_KINDS:
        raise ValueError(f"DAiDConfig.gate: kind must be one of {GATE_KINDS}; {expected}")
    threshold = check_real("DAiDConfig.gate threshold", threshold)
    if not (0.0 < threshold <= 1.0 if kind == "max_prob" else threshold >= 0.0):
        raise ValueError(f"DAiDConfig.gate: threshold out of range; {expected}")
    return kind, threshold
