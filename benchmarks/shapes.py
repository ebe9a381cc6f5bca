"""Registry of benchmark shapes: the benchmark model and retrieval shapes (GPU and CPU).

Janus-Pro-1B (:data:`JANUS_PRO_1B`): its text model is DeepSeek-LLM-1.3B's LLaMA (24 layers,
hidden 2048, 16 query and 16 key-value heads of 128, SwiGLU intermediate 5632, text vocabulary
102400); its image side is transformers' ``JanusConfig`` defaults (VQ codebook 16384 x 8,
384-px images in 16-px patches: a 24 x 24 token grid, image-token embedding 2048). The vision
tower and the VQ encoder / decoder, which image-token decoding never runs, are the tiny model's.
:func:`build_model` makes it on the meta device and fills the weights on the target device.

Retrieval: the official hop-1 causal key (4 cells x 8 = 32-d), CFG (2B logit rows), DAiD with
K = 2048. Databases: 1M and 10M keys (the official JourneyDB database has ~506M entries, sharded;
10M is what one exact flat scan per step can afford).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ModelShape:
    """A Janus-family language model's sizes (the image-generation path only)."""

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    text_vocab: int
    codebook: int
    grid: int  # tokens per image side
    patch: int  # pixels per token side
    dtype: str = "bfloat16"


def _janus_image_defaults() -> dict:
    """Codebook, grid and patch of transformers' ``JanusConfig`` defaults (Janus-Pro's image side)."""
    from transformers import JanusConfig

    config = JanusConfig()
    vision = config.vision_config
    return dict(codebook=config.vq_config.num_embeddings, grid=vision.image_size // vision.patch_size,
                patch=vision.patch_size)


JANUS_PRO_1B = ModelShape("janus-pro-1b", layers=24, hidden=2048, heads=16, kv_heads=16, head_dim=128,
                          intermediate=5632, text_vocab=102400, **_janus_image_defaults())


def janus_config(shape: ModelShape):
    """The ``JanusConfig`` of ``shape``: the tiny model's config with ``shape``'s text model and image grid."""
    from arrag_kernels.models import tiny_janus_config

    config = tiny_janus_config(grid=shape.grid, hidden_size=shape.hidden, num_layers=shape.layers,
                               codebook_size=shape.codebook, text_vocab_size=shape.text_vocab, patch_size=shape.patch)
    text = config.text_config
    text.intermediate_size = shape.intermediate
    text.num_attention_heads, text.num_key_value_heads, text.head_dim = shape.heads, shape.kv_heads, shape.head_dim
    return config


@contextlib.contextmanager
def _parameters_on_meta():
    """Every ``nn.Parameter`` registered inside the block lives on the meta device (no memory, no
    initialisation cost); buffers (rotary frequencies, ...) are made as usual."""
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None:
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def build_model(shape: ModelShape, device, seed: int = 0, fill: bool = True):
    """An eval-mode ``JanusForConditionalGeneration`` of ``shape``, random weights (timing only).

    Built with its parameters on the meta device and its buffers on ``device``; then every
    parameter is allocated on ``device`` in ``shape.dtype`` and filled there: norm weights 1,
    biases 0, the rest N(0, 0.02) (seconds on a GPU for 1B parameters, where a CPU-side
    construction and initialisation took minutes). ``fill=False`` leaves them on the meta device.
    """
    from transformers import GenerationConfig, JanusForConditionalGeneration

    from arrag_kernels.models.tiny import TINY_BOI, TINY_BOS, TINY_PAD

    device = torch.device(device)
    with torch.device(device), _parameters_on_meta():
        model = JanusForConditionalGeneration(janus_config(shape)).eval()
    model.generation_config = GenerationConfig(bos_token_id=TINY_BOS, pad_token_id=TINY_PAD, eos_token_id=2,
                                               guidance_scale=5.0, generation_kwargs={"boi_token_id": TINY_BOI})
    if not fill:
        return model
    dtype = getattr(torch, shape.dtype)
    g = torch.Generator(device=device).manual_seed(seed)
    for module_name, module in model.named_modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            value = torch.empty(param.shape, dtype=dtype, device=device)
            if name == "bias":
                value.zero_()
            elif param.dim() == 1:  # norm scales
                value.fill_(1.0)
            else:
                value.normal_(0.0, 0.02, generator=g)
            module._parameters[name] = torch.nn.Parameter(value, requires_grad=False)
    return model.to(dtype)  # the float buffers


def official_keys(n: int, device, dtype=torch.float16, seed: int = 0, cells: int = 4) -> torch.Tensor:
    """(n, 8 * cells) keys of the official layout: ``cells`` unit-norm 8-d cells (hop 1: 4)."""
    g = torch.Generator(device=device).manual_seed(seed)
    keys = torch.randn(n, cells, 8, generator=g, device=device, dtype=dtype)
    return torch.nn.functional.normalize(keys, dim=-1).reshape(n, 8 * cells)


def synthetic_db(model, num_keys: int, device):
    """A database for ``model`` of official-layout keys and random token values, fp16 on ``device``
    (search time depends on the sizes only)."""
    import arrag_kernels as ak
    from arrag_kernels.models import get_adapter
    from arrag_kernels.retrieval import DatabaseMeta

    adapter = get_adapter(model)
    keys = official_keys(num_keys, device)
    g = torch.Generator(device=device).manual_seed(1)
    values = torch.randint(0, adapter.codebook_size, (num_keys,), generator=g, device=device)
    meta = DatabaseMeta(layout=ak.KeyLayout(), codebook_size=adapter.codebook_size, embed_dim=adapter.embed_dim,
                        grid=adapter.grid, key_source="codebook", model_fingerprint=adapter.fingerprint(),
                        num_images=0)
    return ak.PatchDatabase(keys, values, meta)


@dataclass(frozen=True)
class RetrievalShape:
    name: str
    batch: int  # images; logits have 2 * batch rows with CFG
    db_size: int  # database keys
    k: int = 2048
    vocab: int = 16384
    embed_dim: int = 8  # per-cell vector (VQ codebook dim)
    grid: tuple[int, int] = (24, 24)
    hops: int = 1  # causal hop-1 key: 4 cells
    guidance: float = 5.0
    key_dtype: str = "float16"
    gpu_only: bool = True

    @property
    def key_dim(self) -> int:
        side = 2 * self.hops + 1
        return (side * side // 2) * self.embed_dim


SHAPES = [
    RetrievalShape("janus1b-b1-db1M", batch=1, db_size=1_000_000),
    RetrievalShape("janus1b-b16-db1M", batch=16, db_size=1_000_000),
    RetrievalShape("janus1b-b1-db10M", batch=1, db_size=10_000_000),
    RetrievalShape("janus1b-b16-db10M", batch=16, db_size=10_000_000),
    RetrievalShape("cpu-b1-db20k", batch=1, db_size=20_000, k=64, vocab=1024, grid=(8, 8), key_dtype="float32", gpu_only=False),
    RetrievalShape("cpu-b4-db100k", batch=4, db_size=100_000, k=256, vocab=1024, grid=(8, 8), key_dtype="float32", gpu_only=False),
    # Where users decode on a CPU: batch 1-4, DAiD's K = 2048, 1M keys, Janus-Pro-1B's grid and codebook.
    RetrievalShape("cpu-b1-db1M", batch=1, db_size=1_000_000, key_dtype="float32", gpu_only=False),
    RetrievalShape("cpu-b4-db1M", batch=4, db_size=1_000_000, key_dtype="float32", gpu_only=False),
]

BY_NAME = {s.name: s for s in SHAPES}
