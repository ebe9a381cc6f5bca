"""FAiD: retrieval-feature blenders inside the decoder layers (AR-RAG, method.md section 4).

``FAiDConfig`` places and shapes the blenders, :mod:`.modules` holds the modules and their literal,
composed and dense evaluations, :mod:`.checkpoint` our and the official weight formats,
:mod:`.train` fine-tuning. The decode-time hooks, ``FAiDRuntime`` (re-exported here), sit beside
DAiD's state in :mod:`arrag_kernels.decoding.faid`.
"""

from .checkpoint import (CheckpointError, OfficialLoad, convert_official, load_blenders, load_official_checkpoint,
                         official_to_hf, save_blenders)
from .config import FAiDConfig
from .modules import Blender, ComposedBlender, FAiDBlenders, FAiDLayer, blend_dense, blend_literal, composed_taps


def __getattr__(name):
    if name == "FAiDRuntime":  # lives in decoding/, which imports this package's modules: resolved on use
        from ..decoding.faid import FAiDRuntime

        return FAiDRuntime
    raise AttributeError(f"module 'arrag_kernels.faid' has no attribute {name!r}")


__all__ = [
    "Blender",
    "CheckpointError",
    "ComposedBlender",
    "FAiDBlenders",
    "FAiDConfig",
    "FAiDLayer",
    "FAiDRuntime",
    "OfficialLoad",
    "blend_dense",
    "blend_literal",
    "composed_taps",
    "convert_official",
    "load_blenders",
    "load_official_checkpoint",
    "official_to_hf",
    "save_blenders",
]
