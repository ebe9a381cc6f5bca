"""Evaluation: NLL plain / DAiD, sample metrics (Frechet distance, FWD, precision/recall), retrieval accuracy, sweeps."""

from .features import EmojiClassifier, extract, load_extractor
from .metrics import frechet_distance, frechet_distance_from_stats, fwd, gaussian_stats, precision_recall
from .nll import NLLResult, image_nll, teacher_forced_logits
from .retrieval import retrieval_accuracy
from .sampling import decode_tokens, generate_tokens, image_grid
from .sweep import best_cell, save_heatmap, sweep_grid

__all__ = [
    "EmojiClassifier",
    "NLLResult",
    "best_cell",
    "decode_tokens",
    "extract",
    "frechet_distance",
    "frechet_distance_from_stats",
    "fwd",
    "gaussian_stats",
    "generate_tokens",
    "image_grid",
    "image_nll",
    "load_extractor",
    "precision_recall",
    "retrieval_accuracy",
    "save_heatmap",
    "sweep_grid",
    "teacher_forced_logits",
]
