"""Blender weights on disk: our format and the official DeepSeek-Janus naming.

Ours: one safetensors file with keys ``layers.{i}.blender.*`` / ``layers.{i}.retrieval_layernorm.weight``
and metadata ``faid_config`` (JSON of :class:`FAiDConfig`), ``hidden_size`` and ``num_layers``.

Official (AR-RAG release, e.g. ``jingyq1/arrag_faid``): the same tensors under
``language_model.model.layers.{i}.blender.{conv1,conv12,conv2,conv22,conv3,conv32}.{weight,bias}``,
``...blender.conv_weights``, ``...blender.mlp.{0,2}.{weight,bias}`` and
``language_model.model.layers.{i}.retrieval_layernorm.weight`` (``conv_weights`` only with more than
one hop, in both formats), next to the base model's weights
in DeepSeek ``MultiModalityCausalLM`` names, which :func:`official_to_hf` maps to HF
``JanusForConditionalGeneration`` (``language_model.model.*`` -> ``model.language_model.*``,
``gen_vision_model`` -> ``model.vqmodel``, ``gen_head`` -> ``model.generation_head``, ...).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import NamedTuple

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
    if len(config.hops) == 1:  # files of earlier versions store a one-hop omega; softmax of it is 1
        state = {k: v for k, v in state.items() if not (k.endswith(".blender.conv_weights") and v.numel() == 1)}
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


# ---- DeepSeek-Janus base weights -> HF JanusForConditionalGeneration ------------------------------
# Plain prefix renames (DeepSeek ``MultiModalityCausalLM`` -> HF), checked in order.
_BASE_PREFIXES = (
    ("language_model.model.", "model.language_model."),  # LlamaForCausalLM body: same inner names
    ("language_model.lm_head.", "lm_head."),
    ("gen_embed.", "model.generation_embeddings."),
    ("gen_head.output_mlp_projector.", "model.generation_head.proj_out."),
    ("gen_head.vision_head.", "model.generation_head.vision_head."),
)
# VQ model (LlamaGen VQModel) -> HF JanusVQVAE, applied to the name after ``gen_vision_model.``.
_VQ_RENAMES = (
    (re.compile(r"^encoder\.conv_blocks\."), "encoder.down."),
    (re.compile(r"^decoder\.conv_blocks\."), "decoder.up."),
    (re.compile(r"^((?:en|de)coder\.(?:down|up)\.\d+)\.res\."), r"\1.block."),
    (re.compile(r"^((?:en|de)coder)\.mid\.0\."), r"\1.mid.block_1."),
    (re.compile(r"^((?:en|de)coder)\.mid\.1\."), r"\1.mid.attn_1."),
    (re.compile(r"^((?:en|de)coder)\.mid\.2\."), r"\1.mid.block_2."),
)
# MlpProjector ``layers`` = [Linear, GELU, Linear, GELU, ...]: layers.0 -> fc1, layers.2i -> hidden_layers.(i-1).
_MLP_PROJECTOR = re.compile(r"^(gen_aligner|aligner)\.layers\.(\d+)\.(weight|bias)$")
_ALIGNERS = {"gen_aligner": "model.generation_aligner", "aligner": "model.aligner"}
# SigLIP ViT (timm layout inside CLIPVisionTower) -> HF JanusVisionModel.
_VIT = "vision_model.vision_tower."
_VIT_BLOCK = re.compile(r"^blocks\.(\d+)\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)$")
_VIT_BLOCK_PARTS = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.proj": "self_attn.projection_layer",
                    "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_VIT_TOP = {"patch_embed.proj.weight": "embeddings.patch_embedding.weight",
            "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
            "norm.weight": "post_layernorm.weight", "norm.bias": "post_layernorm.bias"}
# Tensors with no HF counterpart, by design: the VQ usage counter, timm's unused attention-pool head,
# rotary caches of older transformers. Never loaded, never reported.
DROPPED = re.compile(r"^gen_vision_model\.quantize\.codebook_used$|^vision_model\.vision_tower\.attn_pool\."
                     r"|\.rotary_emb\.inv_freq$")


def _hf_base_names(key: str, value: torch.Tensor) -> dict | None:
    """One DeepSeek-Janus base tensor -> {HF name: tensor} (several for a fused qkv), or None if unknown."""
    for old, new in _BASE_PREFIXES:
        if key.startswith(old):
            return {new + key[len(old):]: value}
    if key.startswith("gen_vision_model."):
        name = key[len("gen_vision_model."):]
        for pattern, repl in _VQ_RENAMES:
            name = pattern.sub(repl, name)
        return {"model.vqmodel." + name: value}
    m = _MLP_PROJECTOR.match(key)
    if m:
        module, idx, param = m.group(1), int(m.group(2)), m.group(3)
        if idx % 2:  # odd entries are the activations: they hold no tensors
            return None
        layer = "fc1" if idx == 0 else f"hidden_layers.{idx // 2 - 1}"
        return {f"{_ALIGNERS[module]}.{layer}.{param}": value}
    if key.startswith(_VIT):
        name = key[len(_VIT):]
        if name == "pos_embed":  # (1, N, C) parameter -> (N, C) embedding table
            return {"model.vision_model.embeddings.position_embedding.weight": value.squeeze(0)}
        if name in _VIT_TOP:
            return {"model.vision_model." + _VIT_TOP[name]: value}
        m = _VIT_BLOCK.match(name)
        if m:
            layer, part, param = m.groups()
            prefix = f"model.vision_model.encoder.layers.{layer}."
            if part == "attn.qkv":  # fused (3C, ...) -> q, k, v
                q, k, v = value.chunk(3, dim=0)
                return {f"{prefix}self_attn.{n}_proj.{param}": t.clone() for n, t in zip("qkv", (q, k, v))}
            return {f"{prefix}{_VIT_BLOCK_PARTS[part]}.{param}": value}
    return None


def _map_official(state_dict: dict) -> tuple[dict, dict, dict, list[str]]:
    """-> (HF-named base tensors, blender tensors in our naming, HF name -> official key, unmapped keys)."""
    faid, rest = split_official(state_dict)
    base, origin, unmapped = {}, {}, []
    for key, value in rest.items():
        if DROPPED.search(key):
            continue
        mapped = _hf_base_names(key, value)
        if mapped is None:
            unmapped.append(key)
            continue
        for name, tensor in mapped.items():
            if name in base:
                raise CheckpointError(f"official checkpoint: {key!r} and {origin[name]!r} both map to {name!r}")
            base[name], origin[name] = tensor, key
    return base, faid, origin, sorted(unmapped)


def official_to_hf(state_dict: dict) -> tuple[dict, dict, list[str]]:
    """Split an official AR-RAG FAiD / DeepSeek-Janus state dict.

    Returns ``(base, blenders, unmapped)``: the base-model tensors under HF
    ``JanusForConditionalGeneration`` names, the blender tensors in our naming
    (``layers.{i}.blender.*``), and the keys that have no known HF name (sorted). Tensors in
    :data:`DROPPED` (no HF counterpart by design) are left out of all three.
    """
    base, faid, _, unmapped = _map_official(state_dict)
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
    """Load an official AR-RAG FAiD checkpoint (base model + blenders, DeepSeek-Janus naming) into a
    HF Janus ``model`` plus our blenders.

    The base tensors are renamed by :func:`official_to_hf` (language model, ``gen_*`` parts, the VQ
    model, the understanding tower and its aligner; LoRA must already be merged, as in the
    release) and copied into ``model`` in place, in its dtype; the blender tensors become
    :class:`FAiDBlenders` (``config`` as in :func:`load_blenders`).

    ``strict=True`` raises :class:`CheckpointError` listing every checkpoint key that has no place in
    the model and every model tensor the checkpoint lacks; ``strict=False`` loads what fits and
    returns those lists. Shape mismatches always raise. Weights the model ties (``lm_head`` and
    ``embed_tokens`` with ``tie_word_embeddings=True``) must be equal in the checkpoint.
    """
    state, _ = _read_state_dict(source)
    base, faid, origin, unmapped = _map_official(state)
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
    blenders = load_blenders(faid, model, config)  # validated before the model is touched
    with torch.no_grad():
        for n, v in loadable.items():
            target[n].copy_(v)
    return OfficialLoad(blenders, unmapped, missing)


def convert_official(source, out: str | os.PathLike, num_layers: int, hidden_size: int, k: int = 10,
                     base_out: str | os.PathLike | None = None) -> Path:
    """Extract the blender weights of an official checkpoint into our format at ``out``.

    With ``base_out``, also write the base-model tensors under HF ``JanusForConditionalGeneration``
    names (safetensors, the checkpoint's dtypes) for ``model.load_state_dict``; raises
    :class:`CheckpointError` listing the keys that have no HF name, before writing anything.
    """
    state, _ = _read_state_dict(source)
    base, faid, unmapped = official_to_hf(state)
    if base_out is not None and unmapped:
        raise CheckpointError(
            f"{len(unmapped)} base tensors of the official checkpoint have no HF Janus name: "
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
