"""Evaluation: NLL plain / DAiD, sample metrics (Frechet distance, FWD, precision/recall), retrieval accuracy, sweeps."""
