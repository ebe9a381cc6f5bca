"""The KV-cached image decode loops, their one shared step, and the per-step DAiD / FAiD state they drive."""

from .daid import DAiDSampler
from .faid import FAiDRuntime
from .hf_generate import hf_image_generate
from .loop import decode_image_tokens
from .static import StaticImageDecoder, StaticKVCache
from .step import DecodeStats, DecodeStep

__all__ = ["DAiDSampler", "DecodeStats", "DecodeStep", "FAiDRuntime", "StaticImageDecoder", "StaticKVCache",
           "decode_image_tokens", "hf_image_generate"]
