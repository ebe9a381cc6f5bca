"""Model adapters, looked up by ``model.config.model_type`` (a diffusers pipeline: its class name) in a
registry that users extend."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from .amused import AmusedAdapter
from .base import (FAiDAdapter, GridPerCall, ImageDecoder, ImageStream, ImageTokenizer, LogitsProcessorAdapter, MemberUnavailable,
                   ModelAdapter, OfficialWeights, PipelineAdapter, PretrainedLoader, TeacherForcingAdapter,
                   check_protocol, codebook_fingerprint, protocol_members)
from .emu3 import Emu3Adapter
from .glm_image import GlmImageAdapter
from .imagegpt import ImageGPTAdapter
from .janus import JanusAdapter, hf_image_generate_kwargs
from .tiny import tiny_janus, tiny_janus_config, tiny_prompt_ids

# model_type -> factory(model) -> adapter. Extend with register_adapter, not by editing this dict.
# Emu3's, ImageGPT's and GLM-Image's adapters have the tokenizer side only (DAiD runs in their own generate
# through a logits processor); aMUSEd's (a diffusers pipeline, registered by its class name) has it too (DAiD
# runs in the pipeline's scheduler step).
ADAPTERS: dict[str, Callable] = {
    JanusAdapter.model_type: JanusAdapter,
    Emu3Adapter.model_type: Emu3Adapter,
    ImageGPTAdapter.model_type: ImageGPTAdapter,
    GlmImageAdapter.model_type: GlmImageAdapter,
    AmusedAdapter.model_type: AmusedAdapter,
}


def register_adapter(model_type: str, factory: Callable, replace: bool = False) -> None:
    """Make ``patch_model``, ``PatchDatabase.build`` etc. accept models with ``config.model_type == model_type``
    (diffusers pipelines: ``type(pipeline).__name__ == model_type``, see :func:`family_of`).

    ``factory(model)`` returns an object implementing :class:`ModelAdapter` (checked when it is
    built; :class:`TeacherForcingAdapter` for NLL, :class:`FAiDAdapter` for FAiD). A factory may also
    carry what needs no model: ``load_pretrained(path, device)`` (:class:`PretrainedLoader`: the CLI's
    ``--model DIR``) and ``official_weights`` (:class:`OfficialWeights`: a released FAiD checkpoint's
    names). Registering a taken ``model_type`` raises unless ``replace=True``.
    """
    if not isinstance(model_type, str) or not model_type:
        raise TypeError(f"register_adapter: model_type must be a non-empty str (a config.model_type), got {model_type!r}")
    if not callable(factory):
        raise TypeError("register_adapter: factory must be callable as factory(model) -> adapter, "
                        f"got {type(factory).__name__}")
    if model_type in ADAPTERS and not replace and ADAPTERS[model_type] is not factory:
        raise ValueError(
            f"register_adapter: model_type {model_type!r} already has the adapter {ADAPTERS[model_type]!r}; "
            "pass replace=True to override it"
        )
    ADAPTERS[model_type] = factory


def _factory(model_type: str, what: str) -> Callable:
    if model_type not in ADAPTERS:
        raise ValueError(f"{what}: no adapter is registered for model_type {model_type!r} (registered: "
                         f"{sorted(ADAPTERS)}); add one with arrag_kernels.register_adapter(model_type, factory)")
    return ADAPTERS[model_type]


def load_pretrained(path, device="cpu"):
    """``(model, encode_prompts or None)`` from a local checkpoint directory, loaded by the factory
    registered for its ``config.json`` ``model_type`` (its :class:`PretrainedLoader` member). Raises
    ValueError naming what is wrong (no config.json, unknown model type, a factory without a loader, a
    checkpoint that does not load)."""
    path = Path(path)
    config = path / "config.json"
    if not config.is_file():
        raise ValueError(f"{str(path)!r} holds no Hugging Face checkpoint (no config.json); expected a directory "
                         "written by save_pretrained")
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise ValueError(f"{str(config)!r} is not a JSON object with a model_type ({type(e).__name__})") from e
    factory = _factory(model_type, f"checkpoint {str(path)!r}")
    try:
        loader = check_protocol(factory, PretrainedLoader, f"the factory registered for model_type {model_type!r}")
    except TypeError as e:  # a checkpoint this installation cannot load: the caller's error, like a bad path
        raise ValueError(f"cannot load {str(path)!r}: {e}") from None
    try:
        return loader.load_pretrained(path, device)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load a {model_type!r} model from {str(path)!r}: {str(e).splitlines()[0]}") from e


def official_weights_for(model_type: str) -> OfficialWeights:
    """The names of ``model_type``'s released FAiD checkpoint: its registered factory's ``official_weights``."""
    factory = _factory(model_type, "official checkpoint names")
    return check_protocol(getattr(factory, "official_weights", None), OfficialWeights,
                          f"official_weights of the factory registered for model_type {model_type!r}")


def family_of(model) -> str | None:
    """The registry key of ``model``: its ``config.model_type`` (transformers models), or its class name when it
    has a config without one (diffusers pipelines: ``model_index.json`` names the class, not a model type)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    return type(model).__name__ if model_type is None and config is not None else model_type


def get_adapter(model, protocol: type = ModelAdapter):
    """The adapter of ``model``'s family, checked against ``protocol``; raises listing the supported families otherwise."""
    model_type = family_of(model)
    if model_type not in ADAPTERS:
        raise TypeError(
            f"arrag_kernels supports model types {sorted(ADAPTERS)}, got {type(model).__name__} "
            f"with config.model_type={model_type!r}; add yours with arrag_kernels.register_adapter(model_type, factory)"
        )
    adapter = ADAPTERS[model_type](model)
    try:
        return check_protocol(adapter, protocol, f"the adapter for model_type {model_type!r} ({type(adapter).__name__})")
    except TypeError as e:
        mode = getattr(adapter, "generate_mode", None)
        if mode == "logits_processor":
            raise TypeError(f"{e}. This family has no library decode loop: run DAiD inside the model's own generate "
                            "with arrag_kernels.patch_model(model, db, DAiDConfig(...)) or "
                            "arrag_kernels.DAiDLogitsProcessor.for_adapter(adapter, db, config)") from None
        if mode == "pipeline":
            raise TypeError(f"{e}. This family has no library decode loop: run DAiD inside the pipeline's own call "
                            "with arrag_kernels.patch_model(pipeline, db, DAiDConfig(...))") from None
        raise


def as_faid_adapter(model_or_adapter) -> FAiDAdapter:
    """A registered model's adapter, or ``model_or_adapter`` itself if it is not a model, checked against
    :class:`FAiDAdapter` (the error names every missing member)."""
    if hasattr(model_or_adapter, "config"):  # a model: look up its family
        return get_adapter(model_or_adapter, FAiDAdapter)
    return check_protocol(model_or_adapter, FAiDAdapter)


def as_tokenizer(model_or_tokenizer) -> ImageTokenizer:
    """A registered model's adapter, or ``model_or_tokenizer`` itself if it is not a model (checked)."""
    if hasattr(model_or_tokenizer, "config"):  # a model: look up its family
        return get_adapter(model_or_tokenizer, ImageTokenizer)
    return check_protocol(model_or_tokenizer, ImageTokenizer)


__all__ = [
    "ADAPTERS",
    "AmusedAdapter",
    "Emu3Adapter",
    "FAiDAdapter",
    "GlmImageAdapter",
    "GridPerCall",
    "ImageDecoder",
    "ImageGPTAdapter",
    "ImageStream",
    "ImageTokenizer",
    "JanusAdapter",
    "LogitsProcessorAdapter",
    "MemberUnavailable",
    "ModelAdapter",
    "OfficialWeights",
    "PipelineAdapter",
    "PretrainedLoader",
    "TeacherForcingAdapter",
    "as_faid_adapter",
    "as_tokenizer",
    "check_protocol",
    "codebook_fingerprint",
    "family_of",
    "get_adapter",
    "load_pretrained",
    "official_weights_for",
    "protocol_members",
    "register_adapter",
    "tiny_janus",
    "tiny_janus_config",
    "tiny_prompt_ids",
]
