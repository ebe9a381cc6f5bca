"""Adapter for Hugging Face ``JanusForConditionalGeneration`` (Janus / Janus-Pro)."""

from __future__ import annotations

import inspect
import re

import torch
import torch.nn.functional as F

from .base import VQCodebook, encoder_batches


# ---- the official AR-RAG / DeepSeek-Janus release -> HF JanusForConditionalGeneration ---------------
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


class JanusOfficialWeights:
    """Names of the official AR-RAG FAiD release (DeepSeek ``MultiModalityCausalLM``) for HF Janus.

    ``blender_prefix`` precedes the blenders' ``layers.{i}.blender.*`` names; ``base_names`` maps one
    base tensor to its HF name(s) (None: unknown); ``dropped`` is True for tensors that have no HF
    counterpart by design (never loaded, never reported).
    """

    blender_prefix = "language_model.model."

    @staticmethod
    def base_names(key: str, value: torch.Tensor) -> dict | None:
        return _hf_base_names(key, value)

    @staticmethod
    def dropped(key: str) -> bool:
        return DROPPED.search(key) is not None


def hf_image_generate_kwargs(model) -> dict:
    """Extra keyword arguments an *unpatched* HF Janus needs for its own ``generate(..., generation_mode="image")``
    on the installed transformers: 5.17 crashes in ``_prepare_static_cache`` with CFG unless it is handed
    a cache; 5.24 needs nothing. (A patched model ignores the cache: the library's loops make their own.)"""
    if "cache" in inspect.signature(type(model).forward).parameters:
        return {}
    from transformers import DynamicCache

    return {"past_key_values": DynamicCache(config=model.config.text_config)}


def unconditional_prompt(prompt_ids: torch.Tensor, bos: int, boi: int, pad: int) -> torch.Tensor:
    """Janus's unconditional CFG prompt: everything but BOS and begin-of-image replaced by padding."""
    keep = (prompt_ids == bos) | (prompt_ids == boi)
    return torch.where(keep, prompt_ids, torch.full_like(prompt_ids, pad))


def _special_ids(generation_config) -> tuple[int, int, int]:
    """(bos, boi, pad) of a Janus generation config; raises naming the missing ones."""
    kwargs = getattr(generation_config, "generation_kwargs", None) or {}  # absent from a config never given any
    ids = {"bos_token_id": generation_config.bos_token_id,
           "generation_kwargs['boi_token_id']": kwargs.get("boi_token_id"),
           "pad_token_id": generation_config.pad_token_id}
    missing = [name for name, value in ids.items() if value is None]
    if missing:
        raise ValueError(f"Janus image prompts need generation_config.{', '.join(missing)} (the special token ids "
                         "of BOS, begin-of-image and padding); set them on the generation config")
    return tuple(int(v) for v in ids.values())


class JanusAdapter(VQCodebook):
    """Locates the AR-RAG pieces of a HF Janus model. Holds references only; changes nothing."""

    model_type = "janus"
    lora_targets = ("q_proj", "v_proj")  # the official FAiD recipe

    @staticmethod
    def load_pretrained(path, device) -> tuple[torch.nn.Module, object]:
        """A ``JanusForConditionalGeneration`` checkpoint directory -> (model on ``device``, eval mode;
        ``encode_prompts`` from its processor, or None when no tokenizer was saved with it)."""
        from transformers import AutoProcessor, JanusForConditionalGeneration

        model = JanusForConditionalGeneration.from_pretrained(path).to(device).eval()
        try:
            processor = AutoProcessor.from_pretrained(path)
        except (OSError, ValueError, TypeError):
            return model, None  # no tokenizer saved with the checkpoint: prompts must be given as ids

        def encode_prompts(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
            enc = processor(text=texts, generation_mode="image", padding=True, return_tensors="pt")
            return enc["input_ids"], enc["attention_mask"]

        return model, encode_prompts

    def __init__(self, model):
        self.model = model
        inner = model.model
        self.vq = inner.vqmodel
        self.language_model = inner.language_model
        self.generation_head = inner.generation_head
        side = int(self.vq.quantize.quant_state_dims[0])
        self.grid = (side, side)
        self.codebook_size = int(self.vq.quantize.num_embeddings)
        self.embed_dim = int(self.vq.quantize.embedding_dim)
        # The VQ encoder halves the resolution between consecutive levels: it maps grid * factor
        # pixels onto the grid (vision_config.image_size is the understanding tower's input and may differ).
        factor = 2 ** sum(hasattr(level, "downsample") for level in self.vq.encoder.down)
        self.image_size = side * factor
        self.num_image_tokens = int(inner.vision_model.config.num_image_tokens)
        # The cache keyword is `past_key_values` in transformers 5.17 and `cache` in 5.24.
        params = inspect.signature(self.language_model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self.hidden_size = int(self.language_model.config.hidden_size)
        self.rms_norm_eps = float(self.language_model.config.rms_norm_eps)

    def check_image_generation(self) -> None:
        """Raise if this model cannot generate images onto its VQ grid (text-only use is unaffected)."""
        side = self.grid[0]
        if self.num_image_tokens != side * side:
            raise ValueError(
                f"this Janus config generates vision_config.num_image_tokens = {self.num_image_tokens} image tokens "
                f"but its VQ decodes a {side}x{side} grid ({side * side} tokens); set "
                f"vision_config.num_image_tokens = {side * side} to generate images"
            )

    @property
    def device(self) -> torch.device:
        return self.generation_head.vision_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.generation_head.vision_head.weight.dtype

    # ---- tokenizer side -------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-quantisation latents ``quant_conv(encoder(x))`` (L2-normalised per cell) and token ids."""
        pixels = pixels.to(self.device, self.vq.quant_conv.weight.dtype)
        parts = encoder_batches(pixels, self.vq.encoder.conv_in.out_channels)
        latent = torch.cat([self.vq.quant_conv(self.vq.encoder(part)) for part in parts])
        B, d, H, W = latent.shape
        if (H, W) != self.grid:
            raise ValueError(
                f"the VQ encoder mapped {tuple(pixels.shape[-2:])} pixels onto a {H}x{W} latent grid, expected "
                f"{self.grid}; encode images of {self.image_size}x{self.image_size} pixels"
            )
        cells = latent.permute(0, 2, 3, 1).reshape(-1, d)
        return F.normalize(cells.float(), p=2, dim=-1).view(B, H, W, d), self.nearest_codes(cells).view(B, H, W)

    # ---- decoder side ---------------------------------------------------------------------
    def new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.language_model.config)

    def step(self, inputs_embeds, attention_mask, cache, position_ids=None):
        out = self.language_model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
            **{self._cache_kw: cache},
        )
        return out.last_hidden_state[:, -1, :]

    def cfg_inputs(self, input_ids: torch.Tensor, generation_config) -> torch.Tensor:
        """(B, S) prompt ids -> (2B, S, D) prompt embeddings, conditional rows then unconditional rows."""
        return self.embed_prompt(torch.cat([input_ids, self.unconditional_prompt(input_ids, generation_config)]))

    def embed_prompt(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(input_ids)

    def unconditional_prompt(self, prompt_ids: torch.Tensor, generation_config) -> torch.Tensor:
        """Janus's unconditional prompt keeps only BOS and begin-of-image; the rest becomes padding."""
        return unconditional_prompt(prompt_ids, *_special_ids(generation_config))

    def empty_prompt(self, generation_config) -> torch.Tensor:
        bos, boi, _ = _special_ids(generation_config)
        return torch.tensor([[bos, boi]])

    def hidden_states(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        return self.language_model(inputs_embeds=inputs_embeds, use_cache=False).last_hidden_state

    def kv_spec(self) -> tuple[int, int, int]:
        """(layers, key/value heads, head dim) of the language model's attention cache."""
        c = self.language_model.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return c.num_hidden_layers, c.num_key_value_heads, head_dim

    def image_logits(self, hidden):
        return self.generation_head(hidden)

    def embed_image_tokens(self, tokens):
        return self.model.prepare_embeddings_for_image_generation(tokens)

    def decode_pixels(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, H*W) token ids -> (B, S, S, 3) pixels: HF's ``decode_image_tokens``, nominally [-1, 1], unclamped."""
        return self.model.decode_image_tokens(tokens)

    # ---- FAiD ------------------------------------------------------------------------------
    official_weights = JanusOfficialWeights  # the AR-RAG release is a Janus checkpoint

    def decoder_layers(self):
        return self.language_model.layers

    def blender_sites(self, layer):
        return layer.input_layernorm, layer.self_attn

    def lora_module(self):
        return self.language_model

    def image_head(self):
        return self.generation_head
