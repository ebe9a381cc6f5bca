"""Seeded image generation (plain, DAiD, FAiD or both) in batches, through the library's patched ``generate``."""

from __future__ import annotations

import torch


@torch.no_grad()
def generate_tokens(model, prompts: torch.Tensor, db=None, daid=None, seed: int = 0, guidance_scale: float = 5.0,
                    batch_size: int = 256, blenders=None) -> torch.Tensor:
    """(n, P) prompt ids -> (n, H*W) sampled image tokens (T = 1, no top-k): plain when ``daid`` and
    ``blenders`` (trained :class:`arrag_kernels.faid.FAiDBlenders`, FAiD) are None, else DAiD, FAiD or both."""
    from transformers import GenerationConfig

    from ..patching import patched

    if prompts.dim() != 2 or prompts.shape[0] == 0:
        raise ValueError(f"prompts: expected (n, P) prompt ids with n >= 1, got {tuple(prompts.shape)}")
    if (db is None) != (daid is None and blenders is None):
        raise ValueError("DAiD / FAiD generation needs db together with daid and/or blenders; pass none of them "
                         "for plain generation")
    configs = tuple(c for c in (daid, blenders.config if blenders is not None else None) if c is not None)
    config = configs[0] if len(configs) == 1 else configs or None
    gc = model.generation_config
    gen = GenerationConfig(**{**gc.to_dict(), "do_sample": True, "temperature": 1.0, "top_k": 0,
                              "guidance_scale": guidance_scale})
    torch.manual_seed(seed)
    out = []
    with patched(model, db, config, blender_weights=blenders) as handle:
        for i in range(0, prompts.shape[0], batch_size):
            p = prompts[i : i + batch_size]
            out.append(handle.generate_images(p, attention_mask=torch.ones_like(p), generation_config=gen).cpu())
    return torch.cat(out)


@torch.no_grad()
def generate_with_prefix(model, prefix_tokens: torch.Tensor, prompts: torch.Tensor, seed: int = 0,
                         guidance_scale: float = 5.0, batch_size: int = 256, generation_config=None) -> torch.Tensor:
    """(n, H*W) image tokens sampled after ``prefix_tokens`` (n, Q) image tokens and ``prompts`` (n, P)
    (the RA-CM3 baseline: a retrieved image before the prompt, read through
    :func:`arrag_kernels.eval.nll.teacher_forced_logits`'s prefixed forward). T = 1, no top-k, CFG with
    the adapter's unconditional prompt and no prefix, as :func:`generate_tokens` samples. Each step runs
    the whole sequence again (no KV cache): meant for small models."""
    from ..models import TeacherForcingAdapter, get_adapter
    from .nll import teacher_forced_logits

    adapter = get_adapter(model, TeacherForcingAdapter)
    if prompts.dim() != 2 or prompts.shape[0] == 0 or prefix_tokens.shape[0] != prompts.shape[0]:
        raise ValueError(f"expected (n, P) prompts with n >= 1 and (n, Q) prefix tokens, got {tuple(prompts.shape)} "
                         f"and {tuple(prefix_tokens.shape)}")
    N = adapter.grid[0] * adapter.grid[1]
    uncond_prompts = adapter.unconditional_prompt(prompts, generation_config or model.generation_config)
    torch.manual_seed(seed)
    out = []
    for i in range(0, prompts.shape[0], batch_size):
        p, u = prompts[i : i + batch_size].to(adapter.device), uncond_prompts[i : i + batch_size].to(adapter.device)
        q = prefix_tokens[i : i + batch_size].to(adapter.device)
        tokens = torch.zeros(p.shape[0], N, dtype=torch.long, device=adapter.device)
        for j in range(N):  # the teacher-forced forward of the tokens so far: position j's logits are exact
            cond = teacher_forced_logits(model, p, tokens[:, : j + 1], q)[:, j].float()
            uncond = teacher_forced_logits(model, u, tokens[:, : j + 1])[:, j].float()
            probs = torch.softmax(uncond + guidance_scale * (cond - uncond), dim=-1)
            tokens[:, j] = torch.multinomial(probs, 1).squeeze(1)
        out.append(tokens.cpu())
    return torch.cat(out)


@torch.no_grad()
def decode_tokens(model, tokens: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """(n, H*W) tokens -> (n, 3, S, S) pixels in [-1, 1] through the model's VQ decoder (its adapter's
    ``decode_pixels``)."""
    from ..models import get_adapter

    adapter = get_adapter(model)
    return torch.cat([adapter.decode_pixels(tokens[i : i + batch_size]).permute(0, 3, 1, 2).clamp(-1, 1).float()
                      for i in range(0, tokens.shape[0], batch_size)])


def image_grid(pixels: torch.Tensor, columns: int = 16):
    """(n, 3, H, W) pixels in [-1, 1] -> one PIL image, ``columns`` per row (white padding)."""
    from PIL import Image

    n, _, H, W = pixels.shape
    rows = -(-n // columns)
    canvas = torch.ones(3, rows * H, columns * W)
    for i in range(n):
        r, c = divmod(i, columns)
        canvas[:, r * H : (r + 1) * H, c * W : (c + 1) * W] = (pixels[i] + 1) / 2
    data = (canvas.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    return Image.fromarray(data, "RGB")
