"""The file format of what FAiD training changes in the base model: LoRA q/v adapters (through
``peft``) and the generation head, in one safetensors file beside the blender file (metadata
``lora_rank``; alpha = 2 * rank)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..models import FAiDAdapter, get_adapter
from .checkpoint import CheckpointError, _read_state_dict


def add_lora(adapter, rank: int) -> list:
    """LoRA (rank ``rank``, alpha = 2 * rank) on the adapter's ``lora_targets`` (Janus: q_proj / v_proj) of
    its ``lora_module()`` through peft; returns its parameters."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as e:
        raise ImportError("lora_rank > 0 needs the 'peft' package: pip install peft (or use lora_rank=0)") from e
    module = adapter.lora_module()
    if _lora_params(module):
        raise ValueError("the model already has LoRA adapters; start from a model without them")
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(adapter.lora_targets)), module)
    return list(_lora_params(module).values())


def _remove_lora(module) -> None:
    """Undo :func:`add_lora` on ``module``: every peft LoRA layer is replaced by the layer it wraps."""
    from peft.tuners.lora import LoraLayer

    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoraLayer):
                setattr(parent, name, child.get_base_layer())
    module.__dict__.pop("peft_config", None)  # what peft's injection records on the module


def _lora_params(module) -> dict:
    return {n: p for n, p in module.named_parameters() if "lora_" in n}


def _finetuned_params(adapter, lora: bool, head: bool) -> dict:
    """Names in the finetuned file (``language_model.*`` for LoRA, ``generation_head.*`` for the head,
    whatever the family calls them) -> the model's parameters."""
    params = {f"language_model.{n}": p for n, p in _lora_params(adapter.lora_module()).items()} if lora else {}
    if head:
        params.update({f"generation_head.{n}": p for n, p in adapter.image_head().named_parameters()})
    return params


def save_finetuned(model, path, head: bool = False) -> Path:
    """Write what training changed in the base model: its LoRA q/v adapters (if any) and, with
    ``head=True``, the generation head. Safetensors; metadata ``lora_rank`` (alpha = 2 * rank).
    Load with :func:`load_finetuned`; the blenders are saved apart (:func:`save_blenders`)."""
    from safetensors.torch import save_file

    adapter = get_adapter(model, FAiDAdapter)
    lora = _lora_params(adapter.lora_module())
    if not lora and not head:
        raise ValueError("save_finetuned: the model has no LoRA adapters and head=False: nothing to save")
    rank = next(p.shape[0] for n, p in lora.items() if ".lora_A." in n) if lora else 0  # lora_A: (r, in)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {n: p.detach().cpu().contiguous() for n, p in _finetuned_params(adapter, bool(lora), head).items()}
    save_file(tensors, str(path), metadata={"lora_rank": str(rank)})
    return path


def load_finetuned(model, path) -> None:
    """Apply a :func:`save_finetuned` file to ``model`` in place: adds LoRA q/v adapters of the stored
    rank (peft) and loads them, and the generation head if the file has it. Raises
    :class:`CheckpointError` when keys or shapes do not match the model."""
    state, meta = _read_state_dict(path)
    if "lora_rank" not in meta:
        raise CheckpointError(f"{path}: not a save_finetuned file (no 'lora_rank' metadata)")
    adapter = get_adapter(model, FAiDAdapter)
    rank = int(meta["lora_rank"])
    if rank:
        add_lora(adapter, rank)
    head = any(k.startswith("generation_head.") for k in state)
    expected = _finetuned_params(adapter, rank > 0, head)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    bad = [f"{k}: {tuple(state[k].shape)} (model needs {tuple(p.shape)})" for k, p in expected.items()
           if k in state and state[k].shape != p.shape]
    if missing or unexpected or bad:
        if rank:  # leave the model as it was: no stray adapters
            _remove_lora(adapter.lora_module())
        raise CheckpointError(f"{path} does not fit the model: missing {missing[:4]}, unexpected {unexpected[:4]}, "
                              f"shapes {bad[:4]}")
    with torch.no_grad():
        for k, p in expected.items():
            p.copy_(state[k])
