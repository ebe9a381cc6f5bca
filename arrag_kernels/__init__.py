"""arrag_kernels: patch-level retrieval-augmented autoregressive image generation (AR-RAG), fast.

Quick start::

    import arrag_kernels as ak
    db = ak.PatchDatabase.build("images/", model)
    handle = ak.patch_model(model, db, ak.DAiDConfig(lam=0.05, tau=0.6, k=2048))
    tokens = model.generate(input_ids, attention_mask=mask, generation_mode="image")
    handle.remove()
"""

from .config import DAiDConfig, KeyLayout
from .decoding import DAiDSampler, DecodeStats, decode_image_tokens
from .faid import FAiDConfig
from .models import register_adapter
from .ops import use_backend
from .patching import PatchHandle, is_patched, patch_model, patched, unpatch_model
from .retrieval import DatabaseError, PatchDatabase

__version__ = "0.1.0"


def __getattr__(name):
    if name == "DAiDLogitsProcessor":  # imported on first use: it loads transformers' generation module
        from .decoding.logits import DAiDLogitsProcessor

        return DAiDLogitsProcessor
    raise AttributeError(f"module 'arrag_kernels' has no attribute {name!r}")


__all__ = [
    "DAiDConfig",
    "DAiDLogitsProcessor",
    "DAiDSampler",
    "DatabaseError",
    "DecodeStats",
    "FAiDConfig",
    "KeyLayout",
    "PatchDatabase",
    "PatchHandle",
    "decode_image_tokens",
    "is_patched",
    "patch_model",
    "patched",
    "register_adapter",
    "unpatch_model",
    "use_backend",
]
