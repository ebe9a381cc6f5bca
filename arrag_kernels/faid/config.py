"""``FAiDConfig``: where the blender modules sit and what they read."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import _normalise_hops, check_int

VALID_HOPS = (1, 2, 3)
# Which official forward the blenders follow (:func:`arrag_kernels.faid.modules.retrieved_masks` lists
# the differences): the training forward, which the released weights were trained with, or the
# inference script ``t2i_faid.py``, which produced the paper's numbers.
SEMANTICS = ("train", "inference-script")


@dataclass(frozen=True)
class FAiDConfig:
    """Feature-augmented decoding (AR-RAG FAiD, method.md section 4).

    Blender modules sit in the decoder layers with ``layer_idx % (L // blenders) == 0`` (official
    placement; L = 24, blenders = 2 -> layers 0 and 12). When ``blenders`` does not divide L this
    rule places more than ``blenders`` modules (L = 30, blenders = 4 -> 0, 7, 14, 21, 28), exactly as
    the official code does.

    Each step retrieves ``k`` database entries; their token ids are embedded
    (``generation_embeddings`` -> ``generation_aligner`` -> per-blender RMSNorm) into e_k in R^D and
    smoothed with the causal context of every hop h in ``hops`` ((2h+1) x (2h+1) windows, two valid
    convolutions of kernel h+1): ``hhat_k = sum_h softmax(omega)_h conv_h2(conv_h1(window_h(e_k)))``,
    ``w_k = sigmoid(mlp(hhat_k))`` and ``blended = mean_k w_k hhat_k`` is added to the residual
    after attention, at the current position of the conditional CFG rows.

    ``hops`` accepts an int, an iterable or the paper's string spelling ("12" = (1, 2)).

    ``semantics``: ``"train"`` (default) follows the official training forward; ``"inference-script"``
    the official decode script ``t2i_faid.py``: padded ids (-1) embed code 0 instead of zeroing their
    slot, and a later blender reads the previous blender's output also where the position retrieves
    nothing (see :func:`arrag_kernels.faid.modules.retrieved_masks`). Both decoding and the
    teacher-forced forward (training, NLL) follow it; blender files store it (older files: "train").
    """

    k: int = 10
    hops: tuple[int, ...] = (1, 2)
    blenders: int = 2
    semantics: str = "train"

    def __post_init__(self):
        hops = _normalise_hops(self.hops, "FAiDConfig.hops")
        if any(h not in VALID_HOPS for h in hops):
            raise ValueError(f"FAiDConfig.hops: expected a non-empty subset of {VALID_HOPS}, got {hops}")
        object.__setattr__(self, "hops", hops)
        k, blenders = check_int("FAiDConfig.k", self.k), check_int("FAiDConfig.blenders", self.blenders)
        if k < 1:
            raise ValueError(f"FAiDConfig.k: expected k >= 1 retrieved tokens per step, got {self.k}")
        if blenders < 1:
            raise ValueError(f"FAiDConfig.blenders: expected >= 1 blender modules, got {self.blenders}")
        object.__setattr__(self, "k", k)
        object.__setattr__(self, "blenders", blenders)
        if self.semantics not in SEMANTICS:
            raise ValueError(f"FAiDConfig.semantics: expected one of {SEMANTICS} (the official training forward or "
                             f"the official inference script t2i_faid.py), got {self.semantics!r}")

    @property
    def radius(self) -> int:
        """Largest hop: the context window is (2R+1) x (2R+1)."""
        return max(self.hops)

    def layer_indices(self, num_layers: int) -> tuple[int, ...]:
        """Decoder layers that hold a blender, ``layer_idx % (num_layers // blenders) == 0``."""
        if not 1 <= self.blenders <= num_layers:
            raise ValueError(
                f"FAiDConfig.blenders = {self.blenders} but the model has {num_layers} decoder layers; "
                f"use 1 <= blenders <= {num_layers}"
            )
        every = num_layers // self.blenders
        return tuple(i for i in range(num_layers) if i % every == 0)

    @property
    def hops_label(self) -> str:
        """The hop set for people: "1+2" (the paper's "12" reads as twelve hops)."""
        return "+".join(map(str, self.hops))

    def to_dict(self) -> dict:
        return {"k": int(self.k), "hops": list(self.hops), "blenders": int(self.blenders), "semantics": self.semantics}

    @classmethod
    def from_dict(cls, d: dict) -> "FAiDConfig":
        """Inverse of :meth:`to_dict`; dicts written before ``semantics`` existed get "train"."""
        return cls(k=int(d["k"]), hops=tuple(d["hops"]), blenders=int(d["blenders"]),
                   semantics=d.get("semantics", "train"))
