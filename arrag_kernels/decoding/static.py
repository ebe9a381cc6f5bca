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
the device step counter, so it is recorded in the graph too. DAiD retrieval for step i needs only
tokens < i, so with ``overlap_retrieval`` it runs on a side stream concurrently with the model
forward of step i and joins the main stream before sampling (FAiD's retrieval cannot: layer 0 of
the forward reads it).
"""

from __future__ import annotations

import torch

from ..ops import daid_sample


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

    Args:
        decoder: an :class:`arrag_kernels.models.ImageDecoder` with ``kv_spec()``.
        process_logits: (2B, V) head logits -> (B, V) processed logits.
        fused_cfg: (guidance_scale, temperature[, top_k, top_p]) when ``process_logits`` is exactly
            that (see :func:`fusable_cfg`): the sampling op then applies them to the raw logits itself.
        daid: optional :class:`arrag_kernels.decoding.DAiDSampler`.
        faid: optional :class:`arrag_kernels.faid.FAiDRuntime` (or any state with its ``begin_step``
            accepting a device step tensor).
        cuda_graph: capture one decode step and replay it (CUDA only).
        overlap_retrieval: on CUDA, run DAiD retrieval on a side stream concurrently with the model
            forward of the same step; a no-op elsewhere (same tokens either way).
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

    # ---- one step: retrieval, forward, head, merge, sample, next input ------------------------------
    def _fork_retrieval(self):
        """DAiD hits (dist, token ids, valid) of the current step, or one ignored padding hit per row.

        With a side stream the search is only enqueued there, after the main stream's work so far (the
        tokens < step it reads); :meth:`_select` joins it before sampling.
        """
        if self.daid is None:
            return self.no_hits
        B = self.tokens.shape[0]
        if self.side is None:
            return self.daid.retrieve(self.tokens, self.step.repeat(B))
        main = torch.cuda.current_stream(self.side.device)
        self.side.wait_stream(main)
        with torch.cuda.stream(self.side):  # every temporary of the search is allocated on the side stream
            hits = self.daid.retrieve(self.tokens, self.step.repeat(B))
        for t in hits:  # read on the main stream too: the allocator must not reuse them before that read
            t.record_stream(main)
        return hits

    def _select(self, hidden, hits):
        logits = self.decoder.image_logits(hidden)
        if self.fused is not None:
            guidance, temperature, top_k, top_p = (*self.fused, 0, 1.0)[:4]
        else:
            logits, guidance, temperature, top_k, top_p = self.process_logits(logits), None, 1.0, 0, 1.0
        if self.daid is not None:
            c = self.daid.config
            lam, tau, dedup = c.lam, c.tau, c.dedup
        else:
            lam, tau, dedup = 0.0, 1.0, "nearest"
        if self.side is not None:
            torch.cuda.current_stream(self.side.device).wait_stream(self.side)
        u = None if self.uniforms is None else self.uniforms.index_select(0, self.step).squeeze(0)
        next_token = daid_sample(logits, *hits, u, guidance_scale=guidance, temperature=temperature,
                                 lam=lam, tau=tau, dedup=dedup, top_k=top_k, top_p=top_p)
        self.tokens.index_copy_(1, self.step, next_token.unsqueeze(1))
        self.embeds.copy_(self.decoder.embed_image_tokens(torch.cat([next_token, next_token]).unsqueeze(-1)))

    def _decode_step(self):
        if self.faid is not None:
            self.faid.begin_step(self.tokens, self.step)
        hits = self._fork_retrieval()
        self.mask.index_fill_(3, self.cache.write_pos, 0.0)  # open the column of the input being written
        hidden = self.decoder.step(self.embeds, self.mask, self.cache, position_ids=self.position_ids)
        self._select(hidden, hits)
        self.step += 1
        self.cache.write_pos += 1
        self.position_ids += 1

    # ---- the loop ---------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, inputs_embeds, attention_mask, num_tokens: int, do_sample: bool) -> torch.Tensor:
        """(2B, S, D) prompt embeddings and (2B, S) mask -> (B, num_tokens) image tokens."""
        device, dtype = inputs_embeds.device, inputs_embeds.dtype
        rows, S, _ = inputs_embeds.shape
        B, L = rows // 2, S + num_tokens
        if self.cuda_graph and device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs CUDA tensors, got {device}")
        # High priority: when both streams have work queued the search's blocks are scheduled first, so it
        # rarely delays the join; and it is never the same pooled stream as the warm-up or capture stream.
        use_side = self.overlap_retrieval and self.daid is not None and device.type == "cuda"
        self.side = torch.cuda.Stream(device, priority=-1) if use_side else None
        layers, kv_heads, head_dim = self.decoder.kv_spec()
        self.cache = StaticKVCache(layers, rows, kv_heads, head_dim, L, dtype, device)
        self.tokens = torch.full((B, num_tokens), -1, dtype=torch.long, device=device)
        self.step = torch.zeros(1, dtype=torch.long, device=device)
        self.uniforms = torch.rand(num_tokens, B, device=device) if do_sample else None
        # one padding hit per row: ignored, so the op samples from the model distribution
        self.no_hits = (torch.zeros(B, 1, device=device), torch.full((B, 1), -1, dtype=torch.long, device=device),
                        torch.zeros(B, dtype=torch.bool, device=device))
        self.embeds = torch.empty(rows, 1, inputs_embeds.shape[-1], dtype=dtype, device=device)
        neg = torch.finfo(dtype).min
        pad = attention_mask.bool()

        # Prefill: causal over the prompt, padding hidden; every row may see itself (no empty softmax row).
        idx = torch.arange(L, device=device)
        allowed = (idx[None, :] <= idx[:S, None]) & (idx[None, :] < S)
        allowed = allowed[None] & torch.nn.functional.pad(pad, (0, num_tokens))[:, None, :]
        allowed |= torch.eye(S, L, dtype=torch.bool, device=device)[None]
        prefill_mask = torch.zeros(rows, 1, S, L, dtype=dtype, device=device).masked_fill_(~allowed[:, None], neg)
        self.cache.write_pos = torch.arange(S, device=device)
        if self.faid is not None:
            self.faid.begin_step(self.tokens, 0)  # eager: allocates FAiD's ring buffers
        hits = self._fork_retrieval()
        hidden = self.decoder.step(inputs_embeds, prefill_mask, self.cache, position_ids=idx[:S].expand(rows, S))
        self._select(hidden, hits)

        # Decode buffers: the mask row sees the prompt (minus padding); columns open as tokens arrive.
        self.mask = torch.zeros(rows, 1, 1, L, dtype=dtype, device=device)
        self.mask[:, 0, 0, S:] = neg
        self.mask[:, 0, 0, :S].masked_fill_(~pad, neg)
        self.cache.write_pos = torch.full((1,), S, dtype=torch.long, device=device)
        self.position_ids = torch.full((rows, 1), S, dtype=torch.long, device=device)
        self.step += 1

        if self.cuda_graph and num_tokens > 3:
            # Warm up (kernel compilation, allocator) on a side stream with two real steps, then record
            # step 3 without running it and replay the recording for steps 3 .. num_tokens - 1.
            warmup = torch.cuda.Stream(device)
            warmup.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(warmup):
                self._decode_step()
                self._decode_step()
            torch.cuda.current_stream(device).wait_stream(warmup)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._decode_step()
            for _ in range(3, num_tokens):
                graph.replay()
        else:
            for _ in range(1, num_tokens):
                self._decode_step()
        return self.tokens
