"""Blender weights on disk: our format and the official DeepSeek-Janus naming.

Ours: one safetensors file with keys ``layers.{i}.blender.*`` / ``layers.{i}.retrieval_layernorm.weight``
and metadata ``faid_config`` (JSON of :class:`FAiDConfig`), ``hidden_size`` and ``num_layers``.

Official (AR-RAG release, e.g. ``jingyq1/arrag_faid``): the same tensors under
``language_model.model.layers.{i}.blender.{conv1,conv12,conv2,conv22,conv3,conv32}.{weight,bias}``,
``...blender.conv_weights``, ``...blender.mlp.{0,2}.{weight,bias}`` and
``language_model.model.layers.{i}.retrieval_layernorm.weight``, next to the base model's weights
(``language_model.model.*`` is the Llama body, HF ``model.language_model.*``).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from .config import FAiDConfig
from .modules import FAiDBlenders

OFFICIAL_PREFIX = "language_model.model."
_FAID_KEY = re.compile(r"^layers\.(\d+)\.(blender\.|retrieval_layernorm\.weight$)")
_HOP_CONV = re.compile(r"^layers\.\d+\.blender\.conv(\d)\.weight$")


class CheckpointError(ValueError):
    """Blender weights that do not fit the model or the configuration."""


def _read_state_dict(source) -> tuple[dict, dict]:
    """A path (.safetensors, or a torch .bin/.pt) or a state dict -> (tensors, safetensors metadata)."""
    if isinstance(source, dict):
        return dict(source), {}
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"blender weights: {str(path)!r} is not a file")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    return torch.load(str(path), map_location="cpu", weights_only=True), {}


def split_official(state_dict: dict) -> tuple[dict, dict]:
    """Official checkpoint -> (blender tensors in our naming, the remaining base-model tensors)."""
    faid, base = {}, {}
    for key, value in state_dict.items():
        short = key[len(OFFICIAL_PREFIX):] if key.startswith(OFFICIAL_PREFIX) else None
        if short is not None and _FAID_KEY.match(short):
            faid[short] = value
        else:
            base[key] = value
    return faid, base


def infer_config(state_dict: dict, num_layers: int, k: int = 10) -> FAiDConfig:
    """FAiDConfig implied by blender tensors in our naming (hops from ``conv{h}``, blenders from layers)."""
    layers = sorted({int(_FAID_KEY.match(key).group(1)) for key in state_dict if _FAID_KEY.match(key)})
    if not layers:
        raise CheckpointError("no blender weights found (expected keys like 'layers.0.blender.conv1.weight')")
    hops = tuple(sorted({int(m.group(1)) for m in map(_HOP_CONV.match, state_dict) if m}))
    if not hops:
        raise CheckpointError("no blender convolutions found (expected 'layers.{i}.blender.conv{h}.weight')")
    blenders = num_layers // layers[1] if len(layers) > 1 else 1
    config = FAiDConfig(k=k, hops=hops, blenders=blenders)  # raises on hops outside {1, 2, 3}
    if config.layer_indices(num_layers) != tuple(layers):
        raise CheckpointError(
            f"blenders sit in layers {layers}, which is not the placement layer_idx % (L // b) == 0 for "
            f"L = {num_layers} and any b"
        )
    return config


def load_blenders(source, model, config: FAiDConfig | None = None) -> FAiDBlenders:
    """Blenders for ``model`` from a file or state dict, in our naming or the official one.

    ``config`` defaults to the file's metadata, else is inferred from the tensors (k = 10).
    Raises :class:`CheckpointError` when a tensor's shape, a missing or an unexpected key does not
    fit the model and configuration.
    """
    if isinstance(source, FAiDBlenders):
        return source
    state, meta = _read_state_dict(source)
    if any(key.startswith(OFFICIAL_PREFIX) for key in state):
        state, _ = split_official(state)
    num_layers = int(model.config.text_config.num_hidden_layers)
    if config is None:
        config = FAiDConfig.from_dict(json.loads(meta["faid_config"])) if "faid_config" in meta else infer_config(state, num_layers)
    blenders = FAiDBlenders.for_model(model, config)
    expected = blenders.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"blender weights do not match {config} on a {num_layers}-layer model (blender layers "
            f"{blenders.layer_ids}): missing {missing[:6]}{' ...' if len(missing) > 6 else ''}, "
            f"unexpected {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}"
        )
    bad = [f"{k}: {tuple(state[k].shape)} (model needs {tuple(v.shape)})" for k, v in expected.items()
           if tuple(state[k].shape) != tuple(v.shape)]
    if bad:
        raise CheckpointError(
            f"blender weight shapes do not match the model (hidden size {blenders.dim}): " + "; ".join(bad[:4])
        )
    blenders.load_state_dict(state)
    return blenders.eval()


def save_blenders(blenders: FAiDBlenders, path: str | os.PathLike) -> Path:
    """Write ``blenders`` in our format (safetensors + config metadata)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in blenders.state_dict().items()}
    meta = {"faid_config": json.dumps(blenders.config.to_dict()), "hidden_size": str(blenders.dim),
            "num_layers": str(blenders.num_layers)}
    save_file(tensors, str(path), metadata=meta)
    return path


def load_official_checkpoint(model, source, config: FAiDConfig | None = None) -> tuple[FAiDBlenders, list[str]]:
    """Load an official AR-RAG FAiD checkpoint into a HF Janus ``model`` plus our blenders.

    The language-model body (``language_model.model.*`` without blender keys) is loaded into
    ``model.model.language_model`` (LoRA must already be merged, as in the release); the blender
    tensors become :class:`FAiDBlenders`. Returns the blenders and the keys that were not loaded
    (other base-model parts in DeepSeek naming, e.g. ``gen_head.*``).
    """
    state, _ = _read_state_dict(source)
    faid, base = split_official(state)
    body = {k[len(OFFICIAL_PREFIX):]: v for k, v in base.items() if k.startswith(OFFICIAL_PREFIX)}
    lm = model.model.language_model
    expected = lm.state_dict()
    bad = [f"{k}: {tuple(v.shape)} (model needs {tuple(expected[k].shape)})" for k, v in body.items()
           if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    unknown = [k for k in body if k not in expected]
    if bad or unknown:
        raise CheckpointError(f"language-model weights do not fit the model: {(bad + unknown)[:4]}")
    if body:
        with torch.no_grad():
            for k, v in body.items():
                expected[k].copy_(v)
    blenders = load_blenders(faid, model, config)
    skipped = sorted(k for k in base if not k.startswith(OFFICIAL_PREFIX))
    return blenders, skipped


def convert_official(source, out: str | os.PathLike, num_layers: int, hidden_size: int, k: int = 10) -> Path:
    """Extract the blender weights of an official checkpoint into our format at ``out``."""
    state, _ = _read_state_dict(source)
    faid, _ = split_official(state)
    config = infer_config(faid, num_layers, k=k)
    blenders = FAiDBlenders(hidden_size, num_layers, config)
    expected = blenders.state_dict()
    if set(expected) != set(faid):
        raise CheckpointError(f"blender keys do not match {config}: {sorted(set(expected) ^ set(faid))[:6]}")
    bad = [k for k in expected if tuple(expected[k].shape) != tuple(faid[k].shape)]
    if bad:
        raise CheckpointError(
            f"blender weight shapes do not match hidden size {hidden_size}: "
            + "; ".join(f"{k}: {tuple(faid[k].shape)} vs {tuple(expected[k].shape)}" for k in bad[:4])
        )
    blenders.load_state_dict({k: v.float() for k, v in faid.items()})
    return save_blenders(blenders, out)
