"""A decode loop on pre-allocated buffers whose step can be captured once in a CUDA graph and replayed.

Everything a decode step reads or writes lives in a buffer allocated before the loop: the KV cache
(written at a device-side position), a 4-D additive attention mask (one column opened per step),
position ids, the step counter, the token grid, the next input embedding and the uniforms for
sampling (drawn up front from torch's RNG). A step is therefore the same sequence of kernels with
the same shapes every time, reads no device value on the host, and
``torch.cuda.CUDAGraph`` can record it once and replay it for the remaining steps.

Sampling uses the inverse CDF of the (DAiD-merged) distribution with those explicit uniforms, so it
is deterministic for a seed but not the same random stream as HF's ``torch.multinomial``.

FAiD's per-step work (retrieval, ring-buffer write, window gather, blend) runs inside the step with
the device step counter, so it is recorded in the graph too. Retrieval for step i needs only
tokens < i, so with ``overlap_retrieval`` it runs on a side stream concurrently with the model
forward of step i: DAiD's joins the main stream before sampling, FAiD's (and a search shared by both,
:func:`arrag_kernels.decoding.step.shared_search`) at the first blender layer's attention output
(layer 0 in the official placement: only the embedding and that layer's attention overlap it). The
forward then runs on a stream of higher priority than the search's
(:func:`arrag_kernels.decoding.step.overlap_streams`), the CUDA graph captured on it.
"""

from __future__ import annotations

import contextlib

import torch

from .step import DecodeStep, FusedSelect, overlap_streams, timing


class StaticKVCache:
    """Per-layer K/V buffers (batch, kv_heads, max_len, head_dim) written at ``write_pos``.

    Implements the ``update`` call HF attention layers make (transformers 5.17 and 5.24), returning
    the whole buffer: positions not written yet are hidden by the attention mask.
    """

    def __init__(self, num_layers, batch, kv_heads, head_dim, max_len, dtype, device):
        shape = (batch, kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.write_pos = torch.zeros(1, dtype=torch.long, device=device)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.keys[layer_idx].index_copy_(2, self.write_pos, key_states)
        self.values[layer_idx].index_copy_(2, self.write_pos, value_states)
        return self.keys[layer_idx], self.values[layer_idx]


def fusable_cfg(processors) -> tuple[float, float, int, float] | None:
    """(guidance_scale, temperature, top_k, top_p) if a HF logits-processor list is only CFG, temperature,
    top-k and top-p in HF's order (each at most once, default filter value and min_tokens_to_keep), else None.

    Then they run inside the fused sampling op instead of as separate kernels (top_k 0 / top_p 1: off).
    """
    from transformers.generation import (ClassifierFreeGuidanceLogitsProcessor, TemperatureLogitsWarper,
                                         TopKLogitsWarper, TopPLogitsWarper)

    order = (ClassifierFreeGuidanceLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)
    found = {}
    for p in processors:
        kind = type(p)
        if kind not in order or any(order.index(k) >= order.index(kind) for k in found):
            return None  # another processor, a repeat, or out of HF's order
        if kind in (TopKLogitsWarper, TopPLogitsWarper) and (p.filter_value != float("-inf") or p.min_tokens_to_keep != 1):
            return None
        found[kind] = p
    if ClassifierFreeGuidanceLogitsProcessor not in found:
        return None
    return (
        float(found[ClassifierFreeGuidanceLogitsProcessor].guidance_scale),
        float(found[TemperatureLogitsWarper].temperature) if TemperatureLogitsWarper in found else 1.0,
        int(found[TopKLogitsWarper].top_k) if TopKLogitsWarper in found else 0,
        float(found[TopPLogitsWarper].top_p) if TopPLogitsWarper in found else 1.0,
    )


class StaticImageDecoder:
    """Static-buffer decode of ``num_tokens`` image tokens for 2B CFG rows; optional CUDA graph.

    Every step, the prefill included, is the shared :class:`arrag_kernels.decoding.step.DecodeStep`
    with :class:`~arrag_kernels.decoding.step.FusedSelect`; this class owns the buffers and the
    device-side counters it advances between steps.

    Args:
        decoder: an :class:`arrag_kernels.models.ImageDecoder` with ``kv_spec()``.
        process_logits: (2B, V) head logits -> (B, V) processed logits.
        fused_cfg: (guidance_scale, temperature[, top_k, top_p]) when ``process_logits`` is exactly
            that (see :func:`fusable_cfg`): the sampling op then applies them to the raw logits itself.
        daid: optional :class:`arrag_kernels.decoding.DAiDSampler`.
        faid: optional :class:`arrag_kernels.decoding.FAiDRuntime` (or any state with its ``begin_step``
            accepting a device step tensor).
        cuda_graph: capture one decode step and replay it (CUDA only).
        overlap_retrieval: on CUDA, run DAiD and FAiD retrieval on a side stream concurrently with the
            model forward of the same step (FAiD's up to its first blender layer); a no-op elsewhere
            (same tokens either way).
    """

    def __init__(self, decoder, process_logits, fused_cfg=None, daid=None, faid=None, cuda_graph: bool = False,
                 overlap_retrieval: bool = False):
        self.decoder = decoder
        self.process_logits = process_logits
        self.fused = fused_cfg
        self.daid = daid
        self.faid = faid
        self.cuda_graph = cuda_graph
        self.overlap_retrieval = overlap_retrieval
        self.forward_stream = None  # overlapped decodes on CUDA: set by prepare()

    def step_once(self):
        """One decode step on the buffers, reading the step on the device only (what the graph records);
        advances the device counters. Call :meth:`prepare` first."""
        self.mask.index_fill_(3, self.cache.write_pos, 0.0)  # open the column of the input being written
        self.embeds.copy_(self.decode_step(self.tokens, self.step, self.embeds, self.mask, self.cache,
                                           position_ids=self.position_ids))
        self.step += 1
        self.cache.write_pos += 1
        self.position_ids += 1

    @torch.no_grad()
    def run(self, inputs_embeds, attention_mask, num_tokens: int, do_sample: bool, stats=None,
            progress: bool = False) -> torch.Tensor:
        """(2B, S, D) prompt embeddings and (2B, S) mask -> (B, num_tokens) image tokens.

        ``stats``: an optional :class:`arrag_kernels.DecodeStats` (per-step times; with a CUDA graph one
        entry per replay, retrieval not split out). ``progress``: a tqdm bar.
        """
        from .loop import progress_range

        device = inputs_embeds.device
        caller = torch.cuda.current_stream(device) if device.type == "cuda" else None
        self.prepare(inputs_embeds, attention_mask, num_tokens, do_sample, stats)
        with self.on_forward_stream():
            if self.cuda_graph and num_tokens > 3:
                # Warm up (kernel compilation, allocator) on a side stream with two real steps, then record
                # step 3 without running it and replay the recording for steps 3 .. num_tokens - 1.
                # Overlapped, both run on the forward stream, so the graph's kernels keep its priority.
                warmup = self.forward_stream or torch.cuda.Stream(device)
                warmup.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(warmup):
                    for _ in range(2):
                        with timing(stats, "step", device):
                            self.step_once()
                torch.cuda.current_stream(device).wait_stream(warmup)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=self.forward_stream):
                    self.step_once()
                for _ in progress_range(num_tokens, 3, progress):
                    with timing(stats, "step", device):
                        graph.replay()
            else:
                for _ in progress_range(num_tokens, 1, progress):
                    with timing(stats, "step", device):
                        self.step_once()
        if self.forward_stream is not None:
            caller.wait_stream(self.forward_stream)
            self.tokens.record_stream(caller)  # made on the forward stream, read on the caller's
        return self.tokens

    @contextlib.contextmanager
    def on_forward_stream(self):
        """Make the forward stream of an overlapped decode current (after the caller's work so far);
        a no-op without one."""
        if self.forward_stream is None:
            yield
            return
        self.forward_stream.wait_stream(torch.cuda.current_stream(self.forward_stream.device))
        with torch.cuda.stream(self.forward_stream):
            yield

    @torch.no_grad()
    def prepare(self, inputs_embeds, attention_mask, num_tokens: int, do_sample: bool, stats=None) -> None:
        """Allocate the buffers of a ``num_tokens`` decode and run the prefill (step 0): after it, each
        :meth:`step_once` predicts the next cell. :meth:`run` is this, then the steps."""
        device, dtype = inputs_embeds.device, inputs_embeds.dtype
        rows, S, _ = inputs_embeds.shape
        B, L = rows // 2, S + num_tokens
        if self.cuda_graph and device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs CUDA tensors, got {device}")
        use_side = self.overlap_retrieval and (self.daid is not None or self.faid is not None) and device.type == "cuda"
        self.forward_stream, side = overlap_streams(device) if use_side else (None, None)
        with self.on_forward_stream():
            layers, kv_heads, head_dim = self.decoder.kv_spec()
            self.cache = StaticKVCache(layers, rows, kv_heads, head_dim, L, dtype, device)
            self.tokens = torch.full((B, num_tokens), -1, dtype=torch.long, device=device)
            self.step = torch.zeros(1, dtype=torch.long, device=device)
            uniforms = torch.rand(num_tokens, B, device=device) if do_sample else None
            # the graph cannot time its retrieval: only whole replays are timed
            select = FusedSelect(self.process_logits, self.fused, uniforms, B, device, daid=self.daid,
                                 side_stream=side if self.daid is not None else None,
                                 stats=None if self.cuda_graph else stats)
            self.decode_step = DecodeStep(self.decoder, select, self.faid,
                                          side_stream=side if self.faid is not None else None)
            self.embeds = torch.empty(rows, 1, inputs_embeds.shape[-1], dtype=dtype, device=device)
            neg = torch.finfo(dtype).min
            pad = attention_mask.bool()

            # Prefill: the same step on the prompt with a host step 0 (FAiD allocates its ring buffers there).
            # Causal over the prompt, padding hidden; every row may see itself (no empty softmax row).
            idx = torch.arange(L, device=device)
            allowed = (idx[None, :] <= idx[:S, None]) & (idx[None, :] < S)
            allowed = allowed[None] & torch.nn.functional.pad(pad, (0, num_tokens))[:, None, :]
            allowed |= torch.eye(S, L, dtype=torch.bool, device=device)[None]
            prefill_mask = torch.zeros(rows, 1, S, L, dtype=dtype, device=device).masked_fill_(~allowed[:, None], neg)
            self.cache.write_pos = torch.arange(S, device=device)
            with timing(stats, "step", device):
                self.embeds.copy_(self.decode_step(self.tokens, 0, inputs_embeds, prefill_mask, self.cache,
                                                   position_ids=idx[:S].expand(rows, S)))

            # Decode buffers: the mask row sees the prompt (minus padding); columns open as tokens arrive.
            self.mask = torch.zeros(rows, 1, 1, L, dtype=dtype, device=device)
            self.mask[:, 0, 0, S:] = neg
            self.mask[:, 0, 0, :S].masked_fill_(~pad, neg)
            self.cache.write_pos = torch.full((1,), S, dtype=torch.long, device=device)
            self.position_ids = torch.full((rows, 1), S, dtype=torch.long, device=device)
            self.step += 1
