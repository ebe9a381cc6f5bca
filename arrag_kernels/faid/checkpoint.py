"""Blender weights on disk: our format and a model family's official naming (the AR-RAG release: DeepSeek-Janus).

Ours: one safetensors file with keys ``layers.{i}.blender.*`` / ``layers.{i}.retrieval_layernorm.weight``
and metadata ``faid_config`` (JSON of :class:`FAiDConfig`), ``hidden_size`` and ``num_layers``.

Official (AR-RAG release, e.g. ``jingyq1/arrag_faid``): the same tensors under
``language_model.model.layers.{i}.blender.{conv1,conv12,conv2,conv22,conv3,conv32}.{weight,bias}``,
``...blender.conv_weights``, ``...blender.mlp.{0,2}.{weight,bias}`` and
``language_model.model.layers.{i}.retrieval_layernorm.weight`` (``conv_weights`` only with more than
one hop, in both formats), next to the base model's weights in the release's names, which
:func:`official_to_hf` maps to the HF model's. Those names belong to the model family: its adapter's
``official_weights`` (:class:`arrag_kernels.models.OfficialWeights`; the AR-RAG release is a Janus
checkpoint in DeepSeek ``MultiModalityCausalLM`` names:
:class:`arrag_kernels.models.janus.JanusOfficialWeights`). This module knows no family.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import NamedTuple

import torch

from ..models import FAiDAdapter, OfficialWeights, as_faid_adapter, check_protocol, get_adapter, official_weights_for
from .config import FAiDConfig
from .modules import FAiDBlenders

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
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True), {}
    except (EOFError, IndexError, KeyError, RuntimeError) as e:  # what torch.load raises on other files (images, text)
        raise CheckpointError(f"cannot read {str(path)!r} as a checkpoint: expected a .safetensors file or a torch.save "
                              f"file holding only tensors ({type(e).__name__})") from e


def split_official(state_dict: dict, weights: OfficialWeights) -> tuple[dict, dict]:
    """Official checkpoint -> (blender tensors in our naming, the remaining base-model tensors)."""
    faid, base = {}, {}
    prefix = weights.blender_prefix
    for key, value in state_dict.items():
        short = key[len(prefix):] if key.startswith(prefix) else None
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
    """Blenders for ``model`` (or its :class:`arrag_kernels.models.FAiDAdapter`) from a file or state dict,
    in our naming or the family's official one (the adapter's ``official_weights``, if it has one).

    ``config`` defaults to the file's metadata, else is inferred from the tensors (k = 10); given
    :class:`FAiDBlenders`, it must equal theirs.
    Raises :class:`CheckpointError` when a tensor's shape, a missing or an unexpected key does not
    fit the model and configuration.
    """
    if isinstance(source, FAiDBlenders):
        if config is not None and config != source.config:  # e.g. another semantics: it would be ignored
            raise CheckpointError(f"the blenders were built for {source.config}, the patch asks for {config}; "
                                  "build them with that config (e.g. dataclasses.replace(config, ...)) or pass a "
                                  "file / state dict")
        return source
    adapter = as_faid_adapter(model)
    state, meta = _read_state_dict(source)
    weights = getattr(adapter, "official_weights", None)  # optional: only families with a release have names
    if weights is not None and any(key.startswith(weights.blender_prefix) for key in state):
        state, _ = split_official(state, weights)
    num_layers = len(adapter.decoder_layers())
    if config is None:
        config = FAiDConfig.from_dict(json.loads(meta["faid_config"])) if "faid_config" in meta else infer_config(state, num_layers)
    if len(config.hops) == 1:  # files of earlier versions store a one-hop omega; softmax of it is 1
        state = {k: v for k, v in state.items() if not (k.endswith(".blender.conv_weights") and v.numel() == 1)}
    blenders = FAiDBlenders.for_model(adapter, config)
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


def _map_official(state_dict: dict, weights: OfficialWeights) -> tuple[dict, dict, dict, list[str]]:
    """-> (HF-named base tensors, blender tensors in our naming, HF name -> official key, unmapped keys)."""
    faid, rest = split_official(state_dict, weights)
    base, origin, unmapped = {}, {}, []
    for key, value in rest.items():
        if weights.dropped(key):
            continue
        mapped = weights.base_names(key, value)
        if mapped is None:
            unmapped.append(key)
            continue
        for name, tensor in mapped.items():
            if name in base:
                raise CheckpointError(f"official checkpoint: {key!r} and {origin[name]!r} both map to {name!r}")
            base[name], origin[name] = tensor, key
    return base, faid, origin, sorted(unmapped)


def official_to_hf(state_dict: dict, model_type: str = "janus") -> tuple[dict, dict, list[str]]:
    """Split an official FAiD state dict of the family registered as ``model_type`` (its
    ``official_weights``; default: Janus, the AR-RAG release).

    Returns ``(base, blenders, unmapped)``: the base-model tensors under HF names (Janus:
    ``JanusForConditionalGeneration``), the blender tensors in our naming (``layers.{i}.blender.*``),
    and the keys that have no known HF name (sorted). Tensors ``weights.dropped`` (no HF counterpart
    by design) are left out of all three.
    """
    base, faid, _, unmapped = _map_official(state_dict, official_weights_for(model_type))
    return base, faid, unmapped


class OfficialLoad(NamedTuple):
    """What :func:`load_official_checkpoint` loaded and what it could not."""

    blenders: FAiDBlenders
    unmapped: list[str]  # checkpoint keys with no place in the model (not loaded)
    missing: list[str]  # model tensors the checkpoint did not provide (left as they were)


def _tied_groups(state: dict) -> list[list[str]]:
    """Names of the model's state-dict tensors grouped by shared storage (tied weights)."""
    groups: dict[tuple, list[str]] = {}
    for name, t in state.items():
        groups.setdefault((t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)), []).append(name)
    return list(groups.values())


def load_official_checkpoint(model, source, config: FAiDConfig | None = None, strict: bool = True) -> OfficialLoad:
    """Load an official FAiD checkpoint (base model + blenders) into ``model`` plus our blenders, named
    by ``model``'s adapter's ``official_weights`` (:class:`arrag_kernels.models.OfficialWeights`;
    Janus: the AR-RAG release in DeepSeek naming).

    The base tensors are renamed as by :func:`official_to_hf` (Janus: language model, ``gen_*`` parts,
    the VQ model, the understanding tower and its aligner; LoRA must already be merged, as in the
    release) and copied into ``model`` in place, in its dtype; the blender tensors become
    :class:`FAiDBlenders` (``config`` as in :func:`load_blenders`).

    ``strict=True`` raises :class:`CheckpointError` listing every checkpoint key that has no place in
    the model and every model tensor the checkpoint lacks; ``strict=False`` loads what fits and
    returns those lists. Shape mismatches always raise. Weights the model ties (``lm_head`` and
    ``embed_tokens`` with ``tie_word_embeddings=True``) must be equal in the checkpoint.
    """
    adapter = get_adapter(model, FAiDAdapter)
    weights = check_protocol(getattr(adapter, "official_weights", None), OfficialWeights,
                             f"{type(adapter).__name__}.official_weights (names of a released FAiD checkpoint)")
    state, _ = _read_state_dict(source)
    base, faid, origin, unmapped = _map_official(state, weights)
    target = model.state_dict()
    unmapped += sorted(f"{origin[n]} (as {n}, not in the model)" for n in base if n not in target)
    loadable = {n: v for n, v in base.items() if n in target}
    bad = [f"{n}: {tuple(v.shape)} (model needs {tuple(target[n].shape)})" for n, v in loadable.items()
           if tuple(v.shape) != tuple(target[n].shape)]
    if bad:
        raise CheckpointError(f"official base weights do not fit the model: {'; '.join(bad[:4])}"
                              + (f" and {len(bad) - 4} more" if len(bad) > 4 else ""))
    missing = []
    for group in _tied_groups(target):
        given = [n for n in group if n in loadable]
        if not given:
            missing += group
        elif any(not torch.equal(loadable[n], loadable[given[0]]) for n in given[1:]):
            raise CheckpointError(
                f"the model ties {group} (one tensor) but the checkpoint holds different values for them; build "
                f"the model with tie_word_embeddings=False to load both"
            )
    missing = sorted(missing)
    if strict and (unmapped or missing):
        raise CheckpointError(
            f"official checkpoint does not match the model: {len(unmapped)} checkpoint keys not loadable "
            f"{unmapped[:8]}{' ...' if len(unmapped) > 8 else ''}, {len(missing)} model tensors missing "
            f"{missing[:8]}{' ...' if len(missing) > 8 else ''}; pass strict=False to load the rest"
        )
    blenders = load_blenders(faid, adapter, config)  # validated before the model is touched
    with torch.no_grad():
        for n, v in loadable.items():
            target[n].copy_(v)
    return OfficialLoad(blenders, unmapped, missing)


def convert_official(source, out: str | os.PathLike, num_layers: int, hidden_size: int, k: int = 10,
                     base_out: str | os.PathLike | None = None, model_type: str = "janus") -> Path:
    """Extract the blender weights of an official checkpoint of the family registered as ``model_type``
    (default: Janus, the AR-RAG release) into our format at ``out``.

    With ``base_out``, also write the base-model tensors under the HF model's names (Janus:
    ``JanusForConditionalGeneration``; safetensors, the checkpoint's dtypes) for
    ``model.load_state_dict``; raises :class:`CheckpointError` listing the keys that have no HF name,
    before writing anything.
    """
    state, meta = _read_state_dict(source)
    if "faid_config" in meta or any(_FAID_KEY.match(key) for key in state):
        raise CheckpointError(f"{source!s}: already an arrag_kernels blender file (keys like "
                              "'layers.0.blender.conv1.weight'), not an official checkpoint: load it as it is "
                              "(patch_model(..., blender_weights=), generate --faid), no convert needed")
    base, faid, unmapped = official_to_hf(state, model_type)
    if base_out is not None and unmapped:
        raise CheckpointError(
            f"{len(unmapped)} base tensors of the official checkpoint have no HF {model_type.capitalize()} name: "
            f"{unmapped[:8]}{' ...' if len(unmapped) > 8 else ''}"
        )
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
    if base_out is not None:
        from safetensors.torch import save_file

        Path(base_out).parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in base.items()}, str(base_out))
    return save_blenders(blenders, out)
