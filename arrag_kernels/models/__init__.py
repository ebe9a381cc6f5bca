"""Model adapters, looked up by ``model.config.model_type`` in a registry that users extend."""

from __future__ import annotations

from typing import Callable

from .base import (ImageDecoder, ImageTokenizer, ModelAdapter, check_protocol, codebook_fingerprint,
                   protocol_members)
from .janus import JanusAdapter
from .tiny import tiny_janus, tiny_janus_config, tiny_prompt_ids

# model_type -> factory(model) -> adapter. Extend with register_adapter, not by editing this dict.
ADAPTERS: dict[str, Callable] = {JanusAdapter.model_type: JanusAdapter}


def register_adapter(model_type: str, factory: Callable, replace: bool = False) -> None:
    """Make ``patch_model``, ``PatchDatabase.build`` etc. accept models with ``config.model_type == model_type``.

    ``factory(model)`` returns an object implementing :class:`ModelAdapter` (checked when it is
    built). Registering a taken ``model_type`` raises unless ``replace=True``.
    """
    if not isinstance(model_type, str) or not model_type:
        raise TypeError(f"register_adapter: model_type must be a non-empty str (a config.model_type), got {model_type!r}")
    if not callable(factory):
        raise TypeError(f"register_adapter: factory must be callable as factory(model) -> adapter, got {type(factory).__name__}")
    if model_type in ADAPTERS and not replace and ADAPTERS[model_type] is not factory:
        raise ValueError(
            f"register_adapter: model_type {model_type!r} already has the adapter {ADAPTERS[model_type]!r}; "
            "pass replace=True to override it"
        )
    ADAPTERS[model_type] = factory


def get_adapter(model) -> ModelAdapter:
    """The checked adapter of ``model``'s family; raises listing the supported families otherwise."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ADAPTERS:
        raise TypeError(
            f"arrag_kernels supports model types {sorted(ADAPTERS)}, got {type(model).__name__} "
            f"with config.model_type={model_type!r}; add yours with arrag_kernels.register_adapter(model_type, factory)"
        )
    adapter = ADAPTERS[model_type](model)
    return check_protocol(adapter, ModelAdapter, f"the adapter for model_type {model_type!r} ({type(adapter).__name__})")


def as_tokenizer(model_or_tokenizer) -> ImageTokenizer:
    """A registered model's adapter, or ``model_or_tokenizer`` itself if it is not a model (checked)."""
    if hasattr(model_or_tokenizer, "config"):  # a model: look up its family
        return get_adapter(model_or_tokenizer)
    return check_protocol(model_or_tokenizer, ImageTokenizer)


__all__ = [
    "ADAPTERS",
    "ImageDecoder",
    "ImageTokenizer",
    "JanusAdapter",
    "ModelAdapter",
    "as_tokenizer",
    "check_protocol",
    "codebook_fingerprint",
    "get_adapter",
    "protocol_members",
    "register_adapter",
    "tiny_janus",
    "tiny_janus_config",
    "tiny_prompt_ids",
]
