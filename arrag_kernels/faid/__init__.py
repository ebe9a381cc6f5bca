"""FAiD: retrieval-feature blenders inside the decoder layers (AR-RAG, method.md section 4).

``FAiDConfig`` places and shapes the blenders, :mod:`.modules` holds the modules and their literal,
composed and dense evaluations, :mod:`.checkpoint` our and the official weight formats,
:mod:`.finetuned` the LoRA / head file of a fine-tuned base model, :mod:`.train` the teacher-forced
forward and fine-tuning. The decode-time hooks,
:class:`arrag_kernels.decoding.FAiDRuntime`, sit beside DAiD's state in :mod:`arrag_kernels.decoding`.
"""

from .checkpoint import (CheckpointError, OfficialLoad, convert_official, load_blenders, load_official_checkpoint,
                         official_to_hf, save_blenders)
from .config import FAiDConfig
from .finetuned import load_finetuned, save_finetuned
from .modules import Blender, ComposedBlender, FAiDBlenders, FAiDLayer, blend_dense, blend_literal, composed_taps


__all__ = [
    "Blender",
    "CheckpointError",
    "ComposedBlender",
    "FAiDBlenders",
    "FAiDConfig",
    "FAiDLayer",
    "OfficialLoad",
    "blend_dense",
    "blend_literal",
    "composed_taps",
    "convert_official",
    "load_blenders",
    "load_finetuned",
    "load_official_checkpoint",
    "official_to_hf",
    "save_blenders",
    "save_finetuned",
]
