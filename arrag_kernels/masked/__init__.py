"""Masked (MaskGIT / Show-o style) decoding with AR-RAG: DAiD and FAiD at every unknown cell at once.

The paper's Show-o adaptation (AR-RAG appendix B.2, method.md section 6): in the final part of the
unmasking schedule (``MaskedDecodeConfig.start_fraction``, default the final half) every unknown cell
is queried with its 8 neighbours (zeros for unknown / outside cells; a cell with no known neighbour is left
to the model), all cells of all images are searched in one call (shared by DAiD and FAiD), DAiD merges per cell ``(1 - lam) p_model + lam p_ret`` and FAiD blends
retrieved features into every cell with full (non-causal) windows.

* :mod:`.base`: the :class:`MaskedGenerator` protocol a model family implements;
* :mod:`.config`: :class:`MaskedDecodeConfig` (cosine schedule, retrieval gate);
* :mod:`.retrieval`: :class:`MaskedRetriever` (the library's retriever for many cells per image),
  :class:`MaskedDAiD`, the per-cell merge and draw, databases from token grids;
* :mod:`.loop`: :func:`masked_decode`;
* :mod:`.pipeline`: :func:`step_with_daid`, masked DAiD inside a pipeline's own sampler step (aMUSEd);
* :mod:`.faid`: non-causal blenders (literal and fast forms), :class:`MaskedFAiD`, training;
* :mod:`.tiny`: :class:`TinyMaskGIT`, the built-in bidirectional transformer over a VQ grid.
"""

from .base import LayerHook, MaskedGenerator
from .config import MaskedDecodeConfig, random_mask
from .faid import MaskedFAiD, blend_full, blend_full_literal, train_masked_faid
from .loop import MaskedDecodeStats, masked_decode
from .pipeline import step_with_daid
from .retrieval import (MaskedDAiD, MaskedRetriever, masked_positions, merged_token_probability, sample_cells,
                        token_database)
from .tiny import TinyMaskGIT, TinyMaskGITAdapter, tiny_maskgit, train_maskgit

__all__ = [
    "LayerHook",
    "MaskedDAiD",
    "MaskedDecodeConfig",
    "MaskedDecodeStats",
    "MaskedFAiD",
    "MaskedGenerator",
    "MaskedRetriever",
    "TinyMaskGIT",
    "TinyMaskGITAdapter",
    "blend_full",
    "blend_full_literal",
    "masked_decode",
    "masked_positions",
    "merged_token_probability",
    "random_mask",
    "sample_cells",
    "step_with_daid",
    "tiny_maskgit",
    "token_database",
    "train_masked_faid",
    "train_maskgit",
]
