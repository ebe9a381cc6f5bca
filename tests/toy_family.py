"""A model family that is not Janus, for the test that a new family needs one adapter file and one
registration line: a tiny random HF Llama over text and image tokens with a one-convolution VQ
tokenizer (``config.model_type == "toy-llama-vq"``), and its adapter, written against the protocols
only (:class:`arrag_kernels.models.FAiDAdapter`, the factory's ``load_pretrained``).

Prompts are ``BOS, text ids``; the unconditional CFG prompt keeps BOS and pads the rest (no
begin-of-image token, unlike Janus), an empty prompt is ``BOS`` alone.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, GenerationMixin, LlamaConfig, LlamaModel, PretrainedConfig, PreTrainedModel

from arrag_kernels.models import codebook_fingerprint


class ToyConfig(PretrainedConfig):
    model_type = "toy-llama-vq"

    def __init__(self, grid=4, patch=4, codebook_size=64, embed_dim=8, text_vocab_size=32, hidden_size=32,
                 num_layers=2, initializer_range=0.2, bos_token_id=1, pad_token_id=0, eos_token_id=2, **kwargs):
        self.grid, self.patch, self.codebook_size, self.embed_dim = grid, patch, codebook_size, embed_dim
        self.text_vocab_size, self.hidden_size, self.num_layers = text_vocab_size, hidden_size, num_layers
        self.initializer_range = initializer_range
        super().__init__(bos_token_id=bos_token_id, pad_token_id=pad_token_id, eos_token_id=eos_token_id, **kwargs)

    def llama_config(self) -> LlamaConfig:
        return LlamaConfig(hidden_size=self.hidden_size, intermediate_size=2 * self.hidden_size,
                           num_hidden_layers=self.num_layers, num_attention_heads=4, num_key_value_heads=2,
                           vocab_size=self.text_vocab_size, max_position_embeddings=256,
                           pad_token_id=self.pad_token_id, bos_token_id=self.bos_token_id)


class ToyModel(PreTrainedModel, GenerationMixin):
    """Text and image tokens through one Llama decoder; VQ: a patch convolution, a codebook, a transposed one."""

    config_class = ToyConfig
    base_model_prefix = "toy"

    def __init__(self, config: ToyConfig):
        super().__init__(config)
        self.lm = LlamaModel(config.llama_config())
        self.image_embed = nn.Embedding(config.codebook_size, config.hidden_size)
        self.image_head = nn.Linear(config.hidden_size, config.codebook_size)
        self.encoder = nn.Conv2d(3, config.embed_dim, config.patch, stride=config.patch)
        self.codebook = nn.Embedding(config.codebook_size, config.embed_dim)
        self.decoder = nn.ConvTranspose2d(config.embed_dim, 3, config.patch, stride=config.patch)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        """Text forward (HF's generate inspects the signature); image generation goes through the adapter."""
        return self.lm(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


def toy_model(seed: int = 0, **config_kwargs) -> ToyModel:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return ToyModel(ToyConfig(**config_kwargs)).eval()


class ToyAdapter:
    """The toy family's adapter: every member the library calls, nothing else."""

    model_type = ToyConfig.model_type
    lora_targets = ("q_proj", "v_proj")

    @staticmethod
    def load_pretrained(path, device):
        return ToyModel.from_pretrained(path).to(device).eval(), None  # no tokenizer: prompts are ids

    def __init__(self, model: ToyModel):
        c = model.config
        self.model = model
        self.grid = (c.grid, c.grid)
        self.codebook_size, self.embed_dim, self.image_size = c.codebook_size, c.embed_dim, c.grid * c.patch
        self.hidden_size = c.hidden_size
        self.rms_norm_eps = float(model.lm.config.rms_norm_eps)

    @property
    def device(self) -> torch.device:
        return self.model.image_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.image_head.weight.dtype

    # tokenizer
    def codebook(self) -> torch.Tensor:
        return F.normalize(self.model.codebook.weight.detach(), dim=-1)

    def fingerprint(self) -> str:
        return codebook_fingerprint(self.model.codebook.weight)

    @torch.no_grad()
    def encode(self, pixels):
        cells = self.model.encoder(pixels.to(self.device, self.dtype)).permute(0, 2, 3, 1)  # (B, H, W, d)
        tokens = torch.cdist(cells.flatten(0, 2), self.model.codebook.weight).argmin(-1).view(cells.shape[:3])
        return F.normalize(cells.float(), dim=-1), tokens

    def decode_pixels(self, tokens):
        B, (H, W) = tokens.shape[0], self.grid
        latents = self.model.codebook(tokens.view(B, H, W)).permute(0, 3, 1, 2)
        return torch.tanh(self.model.decoder(latents)).permute(0, 2, 3, 1)

    # prompts and the decoder
    def embed_prompt(self, input_ids):
        return self.model.lm.embed_tokens(input_ids)

    def unconditional_prompt(self, prompt_ids, generation_config):
        keep = prompt_ids == generation_config.bos_token_id
        return torch.where(keep, prompt_ids, torch.full_like(prompt_ids, generation_config.pad_token_id))

    def empty_prompt(self, generation_config):
        return torch.tensor([[generation_config.bos_token_id]])

    def cfg_inputs(self, input_ids, generation_config):
        return self.embed_prompt(torch.cat([input_ids, self.unconditional_prompt(input_ids, generation_config)]))

    def check_image_generation(self) -> None:
        pass  # every toy config can generate images

    def new_cache(self):
        return DynamicCache(config=self.model.lm.config)

    def step(self, inputs_embeds, attention_mask, cache, position_ids=None):
        cache_kw = "cache" if "cache" in inspect.signature(self.model.lm.forward).parameters else "past_key_values"
        out = self.model.lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=True, **{cache_kw: cache})  # the keyword of transformers 5.24 / 5.17
        return out.last_hidden_state[:, -1]

    def hidden_states(self, inputs_embeds):
        return self.model.lm(inputs_embeds=inputs_embeds, use_cache=False).last_hidden_state

    def kv_spec(self):
        c = self.model.lm.config
        return c.num_hidden_layers, c.num_key_value_heads, c.hidden_size // c.num_attention_heads

    def image_logits(self, hidden):
        return self.model.image_head(hidden)

    def embed_image_tokens(self, tokens):
        return self.model.image_embed(tokens)

    # FAiD
    def decoder_layers(self):
        return self.model.lm.layers

    def blender_sites(self, layer):
        return layer.input_layernorm, layer.self_attn

    def lora_module(self):
        return self.model.lm

    def image_head(self):
        return self.model.image_head
