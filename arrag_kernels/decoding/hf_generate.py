"""Image generation with the argument handling of HF ``JanusForConditionalGeneration.generate``.

The prelude (generation config, special tokens, logits processors, CFG batch doubling) uses the
same ``GenerationMixin`` helpers as HF's image mode, so the same call arguments mean the same
thing; the token loop is the library's own (:func:`decode_image_tokens`), because HF's logits
processors see neither post-CFG probabilities nor the decode step that DAiD needs.
"""

from __future__ import annotations

import logging

import torch

from .loop import decode_image_tokens
from .static import StaticImageDecoder, fusable_cfg
from .step import DecodeStats

LOOPS = ("dynamic", "static", "cuda-graph")

logger = logging.getLogger(__name__)


@torch.no_grad()
def hf_image_generate(
    model,
    decoder,
    daid=None,
    faid=None,
    inputs: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    logits_processor=None,
    stats: DecodeStats | None = None,
    progress: bool = False,
    loop: str = "dynamic",
    overlap_retrieval: bool = False,
    **kwargs,
) -> torch.Tensor:
    """Generate (B * num_return_sequences, H * W) image tokens for prompt ids ``inputs``.

    ``loop="dynamic"`` (default) samples with ``torch.multinomial`` exactly like HF; ``"static"``
    and ``"cuda-graph"`` run :class:`StaticImageDecoder` (pre-allocated buffers, inverse-CDF
    sampling with up-front uniforms; the latter records one step in a CUDA graph and replays it).
    ``overlap_retrieval=True`` (static loops, CUDA) runs DAiD and FAiD retrieval on a side stream
    concurrently with the model forward (FAiD's until its first blender layer); the tokens are the same.
    """
    if loop not in LOOPS:
        raise ValueError(f"loop: expected one of {LOOPS}, got {loop!r}")
    if overlap_retrieval and loop == "dynamic":
        raise ValueError("overlap_retrieval needs loop='static' or 'cuda-graph', not 'dynamic'")
    from transformers.generation import ClassifierFreeGuidanceLogitsProcessor, GenerationMode, LogitsProcessorList

    kwargs.pop("generation_mode", None)
    for key in ("cache", "past_key_values"):  # the loop owns its cache
        kwargs.pop(key, None)
    generation_config, model_kwargs = model._prepare_generation_config(kwargs.pop("generation_config", None), **kwargs)
    if generation_config.get_generation_mode() not in (GenerationMode.SAMPLE, GenerationMode.GREEDY_SEARCH):
        raise ValueError("image generation supports greedy search or sampling only; set num_beams=1")
    if generation_config.return_dict_in_generate:
        raise NotImplementedError("return_dict_in_generate is not supported by arrag_kernels image generation")
    generation_config.validate()
    model._validate_model_kwargs(model_kwargs.copy())
    logits_processor = logits_processor if logits_processor is not None else LogitsProcessorList()
    model_kwargs["use_cache"] = True
    if generation_config.guidance_scale is None:
        logger.warning("`guidance_scale` is required for CFG but not provided. Setting to default value of 5.")
        generation_config.guidance_scale = 5

    input_ids, _, model_kwargs = model._prepare_model_inputs(inputs, generation_config.bos_token_id, model_kwargs)
    if input_ids.dim() != 2:
        raise ValueError(f"expected prompt ids of shape (batch_size, seq_len), got {tuple(input_ids.shape)}")
    model._prepare_special_tokens(generation_config, attention_mask is not None, device=input_ids.device)
    if generation_config.guidance_scale < 1:  # HF would add its unbatched (Emu3-style) CFG processor and fail deep inside
        raise ValueError(f"guidance_scale must be >= 1 for image generation (1: no CFG), got {generation_config.guidance_scale}")
    use_cfg = generation_config.guidance_scale > 1
    if use_cfg:
        logits_processor.append(ClassifierFreeGuidanceLogitsProcessor(generation_config.guidance_scale))
        generation_config.guidance_scale = None
    logits_processor = model._get_logits_processor(
        generation_config=generation_config,
        input_ids_seq_length=input_ids.shape[1],
        encoder_input_ids=input_ids,
        prefix_allowed_tokens_fn=None,
        logits_processor=logits_processor,
        device=input_ids.device,
    )
    input_ids, model_kwargs = model._expand_inputs_for_generation(
        input_ids=input_ids,
        attention_mask=attention_mask,
        expand_size=generation_config.num_return_sequences,
        **model_kwargs,
    )
    batch_size = input_ids.shape[0]
    attention_mask = model_kwargs.get("attention_mask")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)

    inputs_embeds = decoder.cfg_inputs(input_ids, generation_config)  # the family's [cond; uncond] prompt rows

    def process_logits(scores):
        if not use_cfg:
            scores = scores[:batch_size]
        return logits_processor(input_ids, scores)

    num_tokens = decoder.grid[0] * decoder.grid[1]
    if loop != "dynamic":
        static = StaticImageDecoder(decoder, process_logits, fused_cfg=fusable_cfg(logits_processor) if use_cfg else None,
                                    daid=daid, faid=faid, cuda_graph=loop == "cuda-graph",
                                    overlap_retrieval=overlap_retrieval)
        return static.run(inputs_embeds, attention_mask.repeat(2, 1), num_tokens, bool(generation_config.do_sample),
                          stats=stats, progress=progress)
    return decode_image_tokens(
        decoder,
        inputs_embeds,
        attention_mask.repeat(2, 1),
        num_tokens,
        process_logits,
        do_sample=bool(generation_config.do_sample),
        daid=daid,
        faid=faid,
        stats=stats,
        progress=progress,
    )
