"""A tiny random-weight Janus, built from a config: the embedded default model.

No weights can be downloaded on our machines, so the demo, the tests and the CPU benchmarks run on
this model. It has the real HF Janus classes and code paths, only small sizes.
"""

from __future__ import annotations

import torch

# Encoder downsampling factor -> VQ channel multipliers (one downsample between consecutive levels).
_LEVELS = {4: (1, 1, 2), 8: (1, 1, 2, 2), 16: (1, 1, 2, 2, 4)}


def tiny_janus_config(
    grid: int = 8,
    hidden_size: int = 64,
    num_layers: int = 2,
    codebook_size: int = 512,
    text_vocab_size: int = 256,
    patch_size: int = 4,
):
    """A ``JanusConfig`` whose image is ``grid * patch_size`` pixels and ``grid x grid`` tokens."""
    from transformers import JanusConfig

    if patch_size not in _LEVELS:
        raise ValueError(f"patch_size: expected one of {sorted(_LEVELS)}, got {patch_size}")
    return JanusConfig(
        text_config=dict(
            model_type="llama",
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=text_vocab_size,
            max_position_embeddings=4096,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
        vision_config=dict(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=grid * patch_size,
            patch_size=patch_size,
            projection_dim=hidden_size,
            num_image_tokens=grid * grid,
            mlp_ratio=2.0,
        ),
        vq_config=dict(
            embed_dim=8,
            num_embeddings=codebook_size,
            latent_channels=32,  # VQ channel counts must be multiples of 32 (group norm)
            base_channels=32,
            channel_multiplier=_LEVELS[patch_size],
            num_res_blocks=1,
            projection_dim=hidden_size,
            image_token_embed_dim=hidden_size,
        ),
        image_token_id=text_vocab_size - 1,
    )


# Special text tokens of the tiny model (it has no tokenizer): prompts are token-id lists.
TINY_BOS, TINY_PAD, TINY_BOI = 1, 0, 100


def tiny_janus(seed: int = 0, **config_kwargs):
    """A ``JanusForConditionalGeneration`` with random weights drawn from ``seed`` (eval mode)."""
    from transformers import GenerationConfig, JanusForConditionalGeneration

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = JanusForConditionalGeneration(tiny_janus_config(**config_kwargs)).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=TINY_BOS,
        pad_token_id=TINY_PAD,
        eos_token_id=2,
        guidance_scale=5.0,
        generation_kwargs={"boi_token_id": TINY_BOI},
    )
    return model


def tiny_prompt_ids(batch_size: int, length: int = 6, seed: int = 0) -> torch.Tensor:
    """(B, length) prompts: BOS, random text ids, BOI, as Janus image prompts end."""
    g = torch.Generator().manual_seed(seed)
    body = torch.randint(3, TINY_BOI, (batch_size, length - 2), generator=g)
    bos = torch.full((batch_size, 1), TINY_BOS)
    boi = torch.full((batch_size, 1), TINY_BOI)
    return torch.cat([bos, body, boi], dim=1)
