"""Model adapters, looked up by ``model.config.model_type``."""

from __future__ import annotations

from .base import ImageDecoder, ImageTokenizer, codebook_fingerprint
from .janus import JanusAdapter
from .tiny import tiny_janus, tiny_janus_config, tiny_prompt_ids

ADAPTERS = {JanusAdapter.model_type: JanusAdapter}


def get_adapter(model):
    """The adapter of ``model``'s family; raises listing the supported families otherwise."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ADAPTERS:
        raise TypeError(
            f"arrag_kernels supports model types {sorted(ADAPTERS)}, got {type(model).__name__} "
            f"with config.model_type={model_type!r}"
        )
    return ADAPTERS[model_type](model)


__all__ = [
    "ADAPTERS",
    "ImageDecoder",
    "ImageTokenizer",
    "JanusAdapter",
    "codebook_fingerprint",
    "get_adapter",
    "tiny_janus",
    "tiny_janus_config",
    "tiny_prompt_ids",
]
