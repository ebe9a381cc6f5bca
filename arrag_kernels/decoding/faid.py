"""FAiD at decode time: per-step retrieval, context ring buffers and the decoder-layer hooks.

The blender modules, their configuration and weights live in :mod:`arrag_kernels.faid`; this is the
decode-time state beside DAiD's (:mod:`.daid`); both retrieve through
:class:`arrag_kernels.retrieval.query.Retriever`.

The adapter (:class:`arrag_kernels.models.FAiDAdapter`) names the hook points: for every blender
layer ``i``, ``norm, attention = adapter.blender_sites(adapter.decoder_layers()[i])`` (Janus:
``input_layernorm`` and ``self_attn``). Hooks are registered on those *instances*: ``norm`` records
the normalised input of the newest position (the context cell of the token fed this step),
``attention`` adds ``blended`` to its output (the residual before the FFN). Nothing of transformers
is reassigned; ``remove()`` deletes the hooks.

Step s (predicting grid cell p = s) feeds the embedding of token s-1, so at step s >= 1 each
blender layer writes cell s-1 into its ring buffer before attention and then reads the causal
window of p. Step 0 is the prompt prefill: nothing is written and the blend goes to the last
prompt position. The ring buffer keeps R*W + R cells (the last R rows plus R cells), the only ones
a window of radius R can read.

Every step blends, as in the official code (:mod:`arrag_kernels.faid.modules`): where the position retrieves nothing
(official layout: row 0, column 0, last column) the retrieved features are zero and the context
term and biases are still added; only the conditional CFG rows get the blend. Padded ids and the
chained blenders' inputs follow ``FAiDConfig.semantics`` (:func:`retrieved_masks`), the same masks
in every loop.

The hooks act only during a forward that follows :meth:`FAiDRuntime.begin_step`; any other forward
(text generation, a plain call) passes through unchanged.

A decode step given as a device tensor is read on the device only (retrieval positions, ring write
slot and window slots are gathered with it), so ``begin_step`` and the hooked forward can be
recorded once in a CUDA graph and replayed: every such step retrieves, and the retrieval ``valid``
mask zeroes the retrieved features exactly where the position has no key. A host step that does
not retrieve skips the search and hands the same blend all-padding ids; both paths run the same
blend code.
"""

from __future__ import annotations

import torch

from ..faid.modules import ComposedBlender, FAiDBlenders, blender_input, retrieved_masks
from ..models import FAiDAdapter, check_protocol
from ..retrieval.query import Retriever


class FAiDRuntime:
    """Decode-time FAiD state of one patched model (the ``faid=`` object of the decode loop).

    Args:
        model: the model (e.g. HF ``JanusForConditionalGeneration``); only its adapter is used.
        adapter: its :class:`arrag_kernels.models.FAiDAdapter` (checked: the error names missing members).
        db: :class:`arrag_kernels.PatchDatabase` retrieved from with ``blenders.config.k``.
        blenders: trained :class:`FAiDBlenders` (composed into the fast form here, once).
        device: where retrieval runs (default: the model's device).
    """

    def __init__(self, model, adapter, db, blenders: FAiDBlenders, device=None):
        config = blenders.config
        check_protocol(adapter, FAiDAdapter, f"{type(adapter).__name__} (FAiD needs these members)")
        layers = adapter.decoder_layers()
        if blenders.num_layers != len(layers) or blenders.dim != adapter.hidden_size:
            raise ValueError(
                f"blenders were built for {blenders.num_layers} layers of width {blenders.dim}, the model has "
                f"{len(layers)} layers of width {adapter.hidden_size}"
            )
        self.retriever = Retriever(db, config.k, adapter, device, setting="FAiDConfig.k")
        self.adapter = adapter
        self.blenders = blenders
        self.grid = self.retriever.grid
        self.retrieves_at = self.retriever.retrieves_at
        self.composed = {i: ComposedBlender(blenders.layer(i).blender) for i in blenders.layer_ids}
        H, W = self.grid
        R = config.radius
        self.ring_size = R * W + R
        self._slots, self._present = self._window_table(H, W, self.composed[blenders.layer_ids[0]].offsets)
        self._steps = torch.arange(H * W, device=self._slots.device)
        self._write_slots = (self._steps - 1) % self.ring_size  # step s writes cell s - 1 here
        self._armed: set[int] = set()
        self._join = None  # the side stream of an overlapped step's retrieval, until the first blend joins it
        self._rings: dict[int, torch.Tensor] = {}
        self.prefill = False
        self._hooks = []
        for i in blenders.layer_ids:
            norm, attention = adapter.blender_sites(layers[i])
            self._hooks.append(norm.register_forward_hook(self._capture_hook(i)))
            self._hooks.append(attention.register_forward_hook(self._blend_hook(i)))

    def _window_table(self, H, W, offsets):
        """Ring-buffer slot (H*W, n) and presence (H*W, n) of every causal window cell of every target."""
        p = torch.arange(H * W)
        r, c = (p // W).unsqueeze(1), (p % W).unsqueeze(1)
        dr = torch.tensor([o[0] for o in offsets])
        dc = torch.tensor([o[1] for o in offsets])
        rr, cc = r + dr, c + dc
        present = (rr >= 0) & (rr < H) & (cc >= 0) & (cc < W)
        slots = ((rr * W + cc) % self.ring_size).clamp(min=0)
        device = self.retriever.codebook.device
        return slots.to(device), present.to(device)

    def remove(self) -> None:
        """Remove every hook this runtime registered. Idempotent."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._armed.clear()

    @torch.no_grad()
    def begin_step(self, tokens: torch.Tensor, step, hits=None, stream=None) -> None:
        """Prepare the model step that predicts token ``step``: retrieval (needs tokens < step only).

        ``step`` is an int (step 0, the prefill, must come first: it allocates the ring buffers), or a
        (1,) long device tensor holding a decode step >= 1. With an int, steps that do not retrieve skip
        the search (all ids padding, ``valid`` False); with a tensor nothing is read on the host
        (CUDA-graph capturable): every step retrieves, and the retrieval's ``valid`` mask is False
        exactly where the position has no key (``retrieves_at``). Either way every step blends, with
        the retrieved features masked by :func:`retrieved_masks`.

        ``hits``: the step's :class:`~arrag_kernels.retrieval.query.Hits` of a retriever that
        :meth:`~arrag_kernels.retrieval.query.Retriever.covers` ``self.retriever`` (DAiD's search,
        shared by the decode step); their first ``k`` are used instead of searching again.

        ``stream``: a CUDA side stream (an overlapped decode's) to run the retrieval and the hits' feature
        lookup on, after the current stream's work so far (``hits`` must be made there too), concurrently
        with the forward until the first blender layer's attention output, whose hook joins it.
        """
        B = tokens.shape[0]
        on_device = isinstance(step, torch.Tensor)
        if not on_device and step == 0:
            a = self.adapter
            self._rings = {i: torch.zeros(B, self.ring_size, self.blenders.dim, dtype=a.dtype, device=a.device)
                           for i in self.blenders.layer_ids}
        at = step if on_device else self._steps[step : step + 1]  # (1,) on the device; a view for ints
        self.prefill = not on_device and step == 0
        self.batch = B
        self.write_slot = self._write_slots.index_select(0, at)  # (1,)
        self.window_slots = self._slots.index_select(0, at)[0]  # (n,)
        self.window_present = self._present.index_select(0, at)[0]
        self._armed = set(self.blenders.layer_ids)
        self._join = stream
        if stream is None:
            self._retrieve(tokens, step, at, hits)
            return
        main = torch.cuda.current_stream(stream.device)
        stream.wait_stream(main)
        with torch.cuda.stream(stream):  # its temporaries allocated on the side stream
            self._retrieve(tokens, step, at, hits)
        for t in (self.features, self.keep, self.keep_chained):  # read on the main stream: not reused before
            t.record_stream(main)

    def _retrieve(self, tokens, step, at, hits) -> None:
        """The step's hits (searched, shared, or none where a host step has no key) -> the blend's inputs:
        ``features`` (B, K, D) aligner(embeddings(ids)) and the ``keep`` masks."""
        B = tokens.shape[0]
        if isinstance(step, torch.Tensor) or self.retrieves_at[step]:
            _, ids, valid = self.retriever.retrieve(tokens, at) if hits is None else hits
            ids = ids[..., : self.retriever.k]  # shared hits come nearest first: the k nearest (a view)
        else:
            ids = torch.full((B, self.blenders.config.k), -1, dtype=torch.long, device=tokens.device)
            valid = torch.zeros(B, dtype=torch.bool, device=tokens.device)
        # padding (-1) looks up token 0, masked in the blend
        self.features = self.adapter.embed_image_tokens(ids.clamp_min(0))
        self.keep, self.keep_chained = retrieved_masks(ids, valid, self.features.dtype, self.blenders.config.semantics)

    def _capture_hook(self, i):
        def hook(module, args, output):
            if i not in self._armed or self.prefill:
                return None
            ring = self._rings[i]
            ring.index_copy_(1, self.write_slot, output[: self.batch, -1:].to(ring.dtype))
            return None

        return hook

    def _blend_hook(self, i):
        def hook(module, args, output):
            if i not in self._armed:
                return None
            self._armed.discard(i)
            if self._join is not None:  # the first blender layer: the side stream's retrieval joins here
                torch.cuda.current_stream(self._join.device).wait_stream(self._join)
                self._join = None
            layer = self.blenders.layer(i)
            ring = self._rings[i]
            with torch.no_grad():
                e = blender_input(layer, self.features, self.keep)
                cells = ring.index_select(1, self.window_slots) * self.window_present.to(ring.dtype).unsqueeze(-1)
                blended, weighted = self.composed[i].blend(cells.to(e.dtype), e)  # cells: (B, n, D)
                # official chaining: the next blender reads these weighted candidates
                self.features, self.keep = weighted, self.keep_chained
            attn = output[0] if isinstance(output, tuple) else output
            delta = torch.zeros_like(attn)
            delta[: self.batch, -1] = blended.to(attn.dtype)  # conditional rows only
            attn = attn + delta
            return (attn, *output[1:]) if isinstance(output, tuple) else attn

        return hook
