"""One image decode step, shared by every loop strategy (dynamic, static, CUDA graph) and by the prefill.

A step predicts grid cell ``step`` of every image (2B CFG rows: conditional, then unconditional):

1. FAiD begin: retrieval for the blenders and their per-step state (needs tokens < step only), so it is
   ready when the decoder-layer hooks fire during the model step;
2. DAiD retrieval, forked by the selection policy (on a side CUDA stream with ``overlap_retrieval``);
   when both run and DAiD's retriever covers FAiD's (:func:`shared_search`), one search with DAiD's k
   runs first, on the main stream, and FAiD gets its first K hits instead of searching too;
3. the model step on the new input embeddings (prompt at the prefill, the previous token afterwards);
4. image head, logits processing, DAiD merge and sampling (the selection policy);
5. write of the new token into the grid, and its next-input embedding for both CFG rows.

``step`` is a host int (dynamic loop, prefill) or a (1,) long device tensor (static and CUDA-graph
decode steps: nothing is read on the host, so the step can be recorded once and replayed).

Two selection policies:

* :class:`MultinomialSelect`: HF's order and random stream (processors, softmax, DAiD merge at the
  retrieval positions known on the host, ``torch.multinomial`` or argmax); with ``lam=0`` the
  tokens equal unpatched HF ``generate``. Its retrieval runs inside the merge.
* :class:`FusedSelect`: one fused op (CFG, temperature, top-k / top-p, DAiD merge, inverse-CDF
  sampling with up-front uniforms); retrieval runs every step with the device step (its ``valid``
  mask ignores positions without a key) and can overlap the model step on a side stream. A DAiD
  gate (``DAiDConfig.gate``) makes the rows it finds confident inactive; the search still runs.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch

from ..ops import daid_sample
from ..ops.daid import model_distribution_ref
from ..retrieval.query import Retriever


@dataclass
class DecodeStats:
    """Wall-clock split of one decode, filled when passed to a loop (synchronises the device every step).

    ``retrieval_s`` is the DAiD query + search + merge time inside ``total_s``; it is measured where
    retrieval runs eagerly on the main stream (dynamic and static loops without ``overlap_retrieval``)
    and stays 0 where it cannot be split out (inside a replayed CUDA graph, or overlapped on a side stream).
    """

    steps: int = 0
    total_s: float = 0.0
    retrieval_s: float = 0.0
    retrieval_steps: int = 0
    step_s: list = field(default_factory=list)

    @property
    def retrieval_fraction(self) -> float:
        return self.retrieval_s / self.total_s if self.total_s else 0.0

    def summary(self) -> str:
        ms = 1e3 * self.total_s / max(self.steps, 1)
        return (
            f"{self.steps} steps, {ms:.2f} ms/step, retrieval {1e3 * self.retrieval_s:.1f} ms over "
            f"{self.retrieval_steps} steps ({100 * self.retrieval_fraction:.1f}% of decode time)"
        )

    @contextlib.contextmanager
    def time_step(self, device):
        """Time the enclosed step (device synchronised on both sides)."""
        with _elapsed(device) as seconds:
            yield
        self.step_s.append(seconds[0])
        self.total_s += seconds[0]
        self.steps += 1

    @contextlib.contextmanager
    def time_retrieval(self, device, new_step: bool = True):
        """Add the enclosed block's time to ``retrieval_s``; ``new_step`` False: it continues a step's
        retrieval already counted in ``retrieval_steps`` (the merge after a search shared with FAiD)."""
        with _elapsed(device) as seconds:
            yield
        self.retrieval_s += seconds[0]
        self.retrieval_steps += new_step


@contextlib.contextmanager
def _elapsed(device: torch.device):
    """Yields a list that holds the enclosed block's wall time in seconds once it exits (device synchronised on both sides)."""
    seconds = []
    _sync(device)
    t0 = time.perf_counter()
    yield seconds
    _sync(device)
    seconds.append(time.perf_counter() - t0)


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timing(stats: DecodeStats | None, kind: str, device, new_step: bool = True):
    """``stats.time_step`` / ``stats.time_retrieval(device, new_step)`` (``kind``: "step" or "retrieval"),
    or a no-op without stats."""
    if stats is None:
        return contextlib.nullcontext()
    return stats.time_step(device) if kind == "step" else stats.time_retrieval(device, new_step)


def shared_search(daid, faid) -> bool:
    """Whether one DAiD search per step serves FAiD too: both run and DAiD's retriever
    :meth:`~arrag_kernels.retrieval.query.Retriever.covers` FAiD's (same database object and tokenizer,
    FAiD's k <= DAiD's k; :func:`arrag_kernels.patch_model` builds them so). The decode step then
    searches once, before the model step (on the side stream of an overlapped decode, joined by FAiD's
    first blender hook, which reads the hits), and hands FAiD the first K hits."""
    retriever = getattr(faid, "retriever", None)
    return daid is not None and isinstance(retriever, Retriever) and daid.covers(retriever)


def at_step(buffer: torch.Tensor, step) -> torch.Tensor:
    """Row ``step`` of ``buffer``: indexed on the host for an int, gathered on the device for a (1,) tensor."""
    return buffer.index_select(0, step).squeeze(0) if isinstance(step, torch.Tensor) else buffer[step]


class MultinomialSelect:
    """HF-exact selection: ``process_logits``, softmax, ``daid.merge`` at retrieval steps, multinomial / argmax.

    Args:
        process_logits: (2B, V) head logits -> (B, V) processed logits (CFG, temperature, ...).
        do_sample: sample with ``torch.multinomial`` (the global RNG, like HF) or take the argmax.
        daid: optional :class:`arrag_kernels.decoding.DAiDSampler`; needs a host step.
        stats: optional :class:`DecodeStats` (its retrieval time is the merge's).
    """

    def __init__(self, process_logits, do_sample: bool, daid=None, stats: DecodeStats | None = None):
        self.process_logits, self.do_sample, self.daid, self.stats = process_logits, do_sample, daid, stats

    def fork(self, tokens, step, shared: bool = False):
        """None: the merge retrieves, at the retrieval steps only; with ``shared`` (FAiD reads the hits
        before the model step) the search of a retrieval step runs now and its hits are returned."""
        if not (shared and self.daid.retrieves_at[step]):
            return None
        with timing(self.stats, "retrieval", tokens.device):
            return self.daid.retrieve(tokens, step)

    def select(self, logits, hits, tokens, step):
        scores = self.process_logits(logits)
        if self.daid is not None and self.daid.retrieves_at[step]:
            with timing(self.stats, "retrieval", logits.device, new_step=hits is None):
                probs = self.daid.merge(torch.softmax(scores, dim=-1), tokens, step, hits)
            return torch.multinomial(probs, 1).squeeze(-1) if self.do_sample else probs.argmax(-1)
        if self.do_sample:
            return torch.multinomial(torch.softmax(scores, dim=-1), 1).squeeze(-1)
        return scores.argmax(-1)


# Stream priorities of an overlapped decode (lower number: higher priority; CUDA clamps to the
# device's range, e.g. 0 .. -5): the forward at the highest, the DAiD search at the lowest, so that
# when both have blocks waiting the forward's are scheduled first and a bandwidth-bound search
# fills the SMs the forward leaves idle instead of delaying it.
FORWARD_PRIORITY, RETRIEVAL_PRIORITY = -(1 << 10), 0


def overlap_streams(device) -> tuple[torch.cuda.Stream, torch.cuda.Stream]:
    """(forward stream, retrieval side stream) of an overlapped decode on CUDA ``device``, the forward's
    at a higher priority. The decode warms up and is captured on the forward stream; the side stream
    comes from another priority's pool, so it is never that stream."""
    return (torch.cuda.Stream(device, priority=FORWARD_PRIORITY),
            torch.cuda.Stream(device, priority=RETRIEVAL_PRIORITY))


class FusedSelect:
    """Selection in one :func:`arrag_kernels.ops.daid_sample` call, with retrieval forked before the model step.

    Args:
        process_logits: (2B, V) head logits -> (B, V) processed logits; unused with ``fused_cfg``.
        fused_cfg: (guidance_scale, temperature[, top_k, top_p]) when ``process_logits`` is exactly
            that (see :func:`arrag_kernels.decoding.static.fusable_cfg`): the op applies them to the raw logits.
        uniforms: (num_tokens, B) sampling uniforms, or None for argmax.
        daid: optional :class:`arrag_kernels.decoding.DAiDSampler`.
        side_stream: a CUDA stream to run the DAiD search on, concurrently with the model step (a search
            shared with FAiD, :func:`shared_search`, is joined earlier, by FAiD's first blender hook).
        stats: optional :class:`DecodeStats` (retrieval timed only without a side stream).
    """

    def __init__(self, process_logits, fused_cfg, uniforms, batch: int, device, daid=None, side_stream=None,
                 stats: DecodeStats | None = None):
        self.process_logits, self.fused, self.uniforms, self.daid = process_logits, fused_cfg, uniforms, daid
        self.side, self.stats = side_stream, (stats if side_stream is None else None)
        # one padding hit per row: ignored, so the op samples from the model distribution
        self.no_hits = (torch.zeros(batch, 1, device=device),
                        torch.full((batch, 1), -1, dtype=torch.long, device=device),
                        torch.zeros(batch, dtype=torch.bool, device=device))

    def fork(self, tokens, step, shared: bool = False):
        """DAiD hits (dist, token ids, valid) of ``step``, or the padding hit without DAiD.

        With a side stream the search is only enqueued there, after the main stream's work so far (the
        tokens < step it reads); :meth:`select` joins it before sampling. ``shared``: FAiD reads the hits
        too (``shared_search``), from the same stream.
        """
        if self.daid is None:
            return self.no_hits
        if self.side is None:
            with timing(self.stats, "retrieval", tokens.device):
                return self.daid.retrieve(tokens, step)
        main = torch.cuda.current_stream(self.side.device)
        self.side.wait_stream(main)
        with torch.cuda.stream(self.side):  # every temporary of the search is allocated on the side stream
            hits = self.daid.retrieve(tokens, step)
        for t in hits:  # read on the main stream too: the allocator must not reuse them before that read
            t.record_stream(main)
        return hits

    def select(self, logits, hits, tokens, step):
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
        if self.daid is not None and self.daid.config.gate is not None:
            # the gate reads p_model, which the fused op computes internally: compute it once more here
            # (fixed shapes, no host read) and make the confident rows inactive
            dist, ids, valid = hits
            p_model = model_distribution_ref(logits, guidance, temperature, top_k, top_p)
            hits = (dist, ids, valid & self.daid.gate_open(p_model))
        u = None if self.uniforms is None else at_step(self.uniforms, step)
        return daid_sample(logits, *hits, u, guidance_scale=guidance, temperature=temperature,
                           lam=lam, tau=tau, dedup=dedup, top_k=top_k, top_p=top_p)


class DecodeStep:
    """One decode step (module docstring) on an :class:`arrag_kernels.models.ImageDecoder`.

    Args:
        decoder: the model's adapter (``step``, ``image_logits``, ``embed_image_tokens``).
        select: :class:`MultinomialSelect` or :class:`FusedSelect`.
        faid: optional FAiD step state (:class:`arrag_kernels.decoding.FAiDRuntime`, or any object with
            its ``begin_step(tokens, step)``; with a ``retriever`` that DAiD's covers, also ``hits=``:
            :func:`shared_search`; with ``side_stream``, also ``stream=``).
        side_stream: an overlapped decode's CUDA side stream for FAiD's retrieval (joined by its first
            blender hook); DAiD's is ``select``'s.
    """

    def __init__(self, decoder, select, faid=None, side_stream=None):
        self.decoder, self.select, self.faid = decoder, select, faid
        self.shared = shared_search(select.daid, faid)
        self.faid_stream = {} if side_stream is None else {"stream": side_stream}

    def __call__(self, tokens: torch.Tensor, step, embeds: torch.Tensor, mask: torch.Tensor, cache,
                 position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Predict cell ``step`` from ``embeds`` (2B, S, D), write it into ``tokens`` (B, N); return the
        next input embeddings (2B, 1, D)."""
        if self.shared:  # one search: DAiD's k, its first K to FAiD
            hits = self.select.fork(tokens, step, shared=True)
            self.faid.begin_step(tokens, step, hits, **self.faid_stream)
        else:
            if self.faid is not None:  # first: its hits are read sooner (layer 0's hook) than DAiD's
                self.faid.begin_step(tokens, step, **self.faid_stream)
            hits = self.select.fork(tokens, step)
        hidden = self.decoder.step(embeds, mask, cache, position_ids=position_ids)
        next_token = self.select.select(self.decoder.image_logits(hidden), hits, tokens, step)
        if isinstance(step, torch.Tensor):
            tokens.index_copy_(1, step, next_token.unsqueeze(1))
        else:
            tokens[:, step] = next_token
        return self.decoder.embed_image_tokens(torch.cat([next_token, next_token]).unsqueeze(-1))
