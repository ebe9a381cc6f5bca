"""DAiD as a ``transformers`` logits processor, for models whose own ``generate`` does the image decode.

HF ``generate`` hands every logits processor the growing sequence ``input_ids`` (B, L) and the
next-token scores (B, vocab). For generators that keep image tokens in the sequence (Emu3,
LlamaGen-style GPTs) and apply classifier-free guidance as a logits processor
(``UnbatchedClassifierFreeGuidanceLogitsProcessor``, from ``guidance_scale`` +
``negative_prompt_ids``), that is all DAiD needs: HF puts user processors after its own (CFG,
``prefix_allowed_tokens_fn``, ...) and before its sampling warpers, so this processor sees post-CFG
scores, reads the image generated so far from ``input_ids``, and returns the log of the merged
distribution, which HF then samples (or takes the argmax of) as usual.

HF Janus is different: its processors see the doubled pre-CFG scores and an ``input_ids`` that
never grows, so this processor refuses it (use :func:`arrag_kernels.patch_model` there).

:func:`arrag_kernels.patch_model` builds one for every image-generation call of a family whose
adapter is a :class:`arrag_kernels.models.LogitsProcessorAdapter` (Emu3), from the facts of its
``image_stream()`` (:meth:`DAiDLogitsProcessor.for_adapter`).
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

from ..config import DAiDConfig
from ..ops import daid_mix
from ..ops.daid import top_k_top_p_filter_ref
from ..retrieval.query import Retriever
from .daid import gate_open


class DAiDLogitsProcessor(LogitsProcessor):
    """A ``transformers.LogitsProcessor`` applying DAiD after CFG at retrieval positions.

    The image stream of each row starts right after the last ``image_start_token_id`` in
    ``input_ids``; after ``image_offset`` tokens (GLM-Image: its preview grid; untouched) comes the
    grid, in raster order, ``grid[1]`` image tokens per row, followed by ``eol_token_id`` when given
    (Emu3: an end-of-line token after every row). At the next position:

    * an image cell with a database key: ``p = (1 - lam) softmax(filter(s / T)) + lam p_ret``, with
      ``p_ret`` over the retrieved image tokens (mapped to vocabulary ids) and ``filter`` HF's top-k
      then top-p; the processor returns ``log p``;
    * any other image cell: ``log softmax(filter(s / T))`` (same sampling distribution as HF);
    * any other position (the offset before the grid, an end-of-line position, after the image, no
      image start yet): the scores unchanged, or ``log softmax(filter(s / T))`` when ``temperature``,
      ``top_k`` or ``top_p`` are set (HF's warpers are then neutral and would not filter them).

    So pass ``temperature``, ``top_k``, ``top_p`` here (they act before the merge, like the fused
    sampler) and call ``generate`` with ``temperature=1.0, top_k=0, top_p=1.0``: HF's warpers run
    after user processors and would otherwise act on the merged distribution (HF fills in
    ``top_k=50`` when sampling unless told otherwise).

    Kept HF features: sampling and greedy search, ``prefix_allowed_tokens_fn`` and every other
    processor that runs before it (CFG processors included), streamers, stopping criteria,
    ``return_dict_in_generate`` / ``output_scores`` (scores are the merged log-probabilities),
    ``num_return_sequences``. Not meaningful: beam search (DAiD is a sampling rule).

    Retrieval runs on the scores' device (the database moved there once, on the first call, unless
    it is there already).

    Args:
        db: the :class:`arrag_kernels.PatchDatabase`; its grid is the image grid.
        config: :class:`arrag_kernels.DAiDConfig` (``lam``, ``tau``, ``k``, ``dedup``).
        codebook: (V_img, d) the L2-normalised codebook rows that form queries (as in the database),
            or the model's :class:`arrag_kernels.models.ImageTokenizer` (then the database is also
            checked against its fingerprint; the grid is the database's).
        image_start_token_id: vocabulary id after which the image tokens start.
        image_token_ids: (V_img,) vocabulary id of each image code; None when vocabulary id == code.
        eol_token_id: vocabulary id closing each row of the stream, or None.
        image_offset: tokens between the start token and the grid's first cell (not merged there).
    """

    def __init__(self, db, config: DAiDConfig, codebook, image_start_token_id: int,
                 image_token_ids: torch.Tensor | None = None, eol_token_id: int | None = None,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, image_offset: int = 0):
        if not isinstance(config, DAiDConfig):
            raise TypeError(f"config: expected an arrag_kernels.DAiDConfig, got {type(config).__name__}")
        m = db.meta
        self.retriever = Retriever(db, config.k, codebook, setting="DAiDConfig.k", grid=m.grid)
        if image_token_ids is None:
            image_token_ids = torch.arange(m.codebook_size)
        if image_token_ids.shape != (m.codebook_size,):
            raise ValueError(f"image_token_ids: expected ({m.codebook_size},) vocabulary ids, one per code, "
                             f"got {tuple(image_token_ids.shape)}")
        if isinstance(image_offset, bool) or not isinstance(image_offset, int) or image_offset < 0:
            raise ValueError(f"image_offset: expected an int >= 0 (tokens before the grid), got {image_offset!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0 or not 0.0 <= top_p <= 1.0:
            raise ValueError(f"top_k must be an int >= 0 and top_p in [0, 1], got top_k={top_k!r}, top_p={top_p!r}")
        self.config = config
        self.image_start = int(image_start_token_id)
        self.image_offset = image_offset
        self.code_to_vocab = image_token_ids.long()
        self.temperature, self.top_k, self.top_p = float(temperature), top_k, float(top_p)
        self.grid = tuple(m.grid)
        self.row_len = self.grid[1] + (eol_token_id is not None)
        self._vocab_to_code = None

    @classmethod
    def for_adapter(cls, adapter, db, config: DAiDConfig, temperature: float = 1.0, top_k: int = 0,
                    top_p: float = 1.0, generate_kwargs: dict | None = None) -> "DAiDLogitsProcessor":
        """The processor for a :class:`arrag_kernels.models.LogitsProcessorAdapter` (Emu3) on ``db``'s grid,
        from the adapter's facts: its codebook and ``image_stream(**generate_kwargs)`` (image-start, code
        and end-of-line vocabulary ids, the grid's offset; ``generate_kwargs``: the call's other
        ``generate`` arguments, GLM-Image's ``image_grid_thw``). What :func:`arrag_kernels.patch_model`
        adds to each image-generation call; by hand, pass it as ``logits_processor=[...]`` with the
        family's usual ``generate`` arguments."""
        stream = adapter.image_stream(**(generate_kwargs or {}))
        return cls(db, config, adapter, stream.start_token_id, stream.code_token_ids, stream.eol_token_id,
                   temperature=temperature, top_k=top_k, top_p=top_p, image_offset=stream.offset)

    def _image_state(self, input_ids: torch.Tensor):
        """(grid tokens (B, H*W) with -1 where not generated, next stream position j (B,)), or None."""
        B, L = input_ids.shape
        is_start = input_ids == self.image_start
        if not bool(is_start.any(1).all()):
            return None
        # (B,) first position of the grid: after the last start token and the offset
        stream_begin = L - is_start.flip(1).int().argmax(1) + self.image_offset
        H, W = self.grid
        j = torch.arange(H * self.row_len, device=input_ids.device)
        pos = stream_begin[:, None] + j
        generated = pos < L
        ids = input_ids.gather(1, pos.clamp_max(L - 1))
        table = self._vocab_to_code  # ids the head cannot produce (ImageGPT's start token) are no code
        codes = torch.where(ids < len(table), table[ids.clamp(0, len(table) - 1)], -1)
        cell = (j // self.row_len) * W + j % self.row_len
        is_cell = (j % self.row_len < W)[None] & generated
        # non-cells (end-of-line, not generated yet) go to a spare last column, dropped after
        tokens = torch.full((B, H * W + 1), -1, dtype=torch.long, device=input_ids.device)
        tokens.scatter_(1, torch.where(is_cell, cell, H * W), torch.where(is_cell, codes, -1))
        return tokens[:, :-1], L - stream_begin

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"DAiDLogitsProcessor: scores has {scores.shape[0]} rows for {input_ids.shape[0]} sequences: this model "
                "applies CFG after the logits processors on a doubled batch (HF Janus); use arrag_kernels.patch_model"
            )
        device, V = scores.device, scores.shape[1]
        if self._vocab_to_code is None or self._vocab_to_code.device != device or len(self._vocab_to_code) != V:
            if int(self.code_to_vocab.max()) >= V:
                raise ValueError(f"image_token_ids reach {int(self.code_to_vocab.max())} but the vocabulary has {V} ids")
            if self.retriever.device != scores.device:
                r = self.retriever
                self.retriever = Retriever(r.db, r.k, r.codebook, device, setting="DAiDConfig.k")
            self.code_to_vocab = self.code_to_vocab.to(device)
            self._vocab_to_code = torch.full((V,), -1, dtype=torch.long, device=device)
            self._vocab_to_code[self.code_to_vocab] = torch.arange(len(self.code_to_vocab), device=device)
        state = self._image_state(input_ids)
        if state is None:
            return self._untouched(scores)
        tokens, j = state
        H, W = self.grid
        in_image = (j >= 0) & (j < H * self.row_len) & (j % self.row_len < W)  # (B,) next position is a grid cell
        if not bool(in_image.any()):
            return self._untouched(scores)
        step = torch.where(in_image, (j // self.row_len) * W + j % self.row_len, 0)
        filtered = self._filter(scores)
        probs = torch.softmax(filtered, dim=-1)
        dist, codes, valid = self.retriever.retrieve(tokens, step)
        hit_ids = torch.where(codes >= 0, self.code_to_vocab[codes.clamp_min(0)], -1)
        active = in_image & valid  # valid: the cell has a database key (border policy)
        c = self.config
        if c.gate is not None:
            active &= gate_open(probs, c.gate)
        merged = daid_mix(probs, dist, hit_ids, active, c.lam, c.tau, c.dedup)
        return torch.where(in_image[:, None], merged.log().to(scores.dtype), self._untouched(scores, filtered))

    def _filter(self, scores: torch.Tensor) -> torch.Tensor:
        return top_k_top_p_filter_ref(scores.float() / self.temperature, self.top_k, self.top_p)

    def _untouched(self, scores: torch.Tensor, filtered: torch.Tensor | None = None) -> torch.Tensor:
        """The scores where DAiD does not merge: as given, or, when this processor holds the call's
        sampling filters (HF's warpers then neutral, see the class docstring), the filtered
        log-probabilities HF's warpers would have sampled from (GLM-Image's preview, tokens after the grid)."""
        if self.temperature == 1.0 and self.top_k == 0 and self.top_p == 1.0:
            return scores
        return torch.log_softmax(self._filter(scores) if filtered is None else filtered, dim=-1).to(scores.dtype)
