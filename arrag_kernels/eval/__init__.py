"""Evaluation: NLL plain / DAiD, sample metrics (FID / Frechet distance, CLIP score, CMMD, FWD, precision/recall),
retrieval accuracy, sweeps."""

from .features import EmojiClassifier, clip_image_embeddings, extract, load_clip, load_extractor
from .metrics import (clip_score, cmmd, fid, frechet_distance, frechet_distance_from_stats, fwd, gaussian_stats,
                      precision_recall)
from .nll import NLLResult, image_nll, teacher_forced_logits
from .retrieval import retrieval_accuracy
from .sampling import decode_tokens, generate_tokens, image_grid
from .sweep import best_cell, save_heatmap, sweep_grid

__all__ = [
    "EmojiClassifier",
    "NLLResult",
    "best_cell",
    "clip_image_embeddings",
    "clip_score",
    "cmmd",
    "decode_tokens",
    "extract",
    "fid",
    "frechet_distance",
    "frechet_distance_from_stats",
    "fwd",
    "gaussian_stats",
    "generate_tokens",
    "image_grid",
    "image_nll",
    "load_clip",
    "load_extractor",
    "precision_recall",
    "retrieval_accuracy",
    "save_heatmap",
    "sweep_grid",
    "teacher_forced_logits",
]
