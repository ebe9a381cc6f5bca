"""Registry of benchmark shapes: real model shapes (GPU) and small CPU shapes.

Janus-Pro-1B: 24 x 24 token grid, VQ codebook 16384 x 8, official hop-1 causal key (4 cells x 8 =
32-d), CFG (2B logit rows), DAiD with K = 2048. Databases: 1M and 10M keys (the official JourneyDB
database has ~506M entries, sharded; 10M is what one exact flat scan per step can afford).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RetrievalShape:
    name: str
    batch: int  # images; logits have 2 * batch rows with CFG
    db_size: int  # database keys
    k: int = 2048
    vocab: int = 16384
    embed_dim: int = 8  # per-cell vector (VQ codebook dim)
    grid: tuple[int, int] = (24, 24)
    hops: int = 1  # causal hop-1 key: 4 cells
    guidance: float = 5.0
    key_dtype: str = "float16"
    gpu_only: bool = True

    @property
    def key_dim(self) -> int:
        side = 2 * self.hops + 1
        return (side * side // 2) * self.embed_dim


SHAPES = [
    RetrievalShape("janus1b-b1-db1M", batch=1, db_size=1_000_000),
    RetrievalShape("janus1b-b16-db1M", batch=16, db_size=1_000_000),
    RetrievalShape("janus1b-b1-db10M", batch=1, db_size=10_000_000),
    RetrievalShape("janus1b-b16-db10M", batch=16, db_size=10_000_000),
    RetrievalShape("cpu-b1-db20k", batch=1, db_size=20_000, k=64, vocab=1024, grid=(8, 8), key_dtype="float32", gpu_only=False),
    RetrievalShape("cpu-b4-db100k", batch=4, db_size=100_000, k=256, vocab=1024, grid=(8, 8), key_dtype="float32", gpu_only=False),
    # Where users decode on a CPU: batch 1-4, DAiD's K = 2048, 1M keys, Janus-Pro-1B's grid and codebook.
    RetrievalShape("cpu-b1-db1M", batch=1, db_size=1_000_000, key_dtype="float32", gpu_only=False),
    RetrievalShape("cpu-b4-db1M", batch=4, db_size=1_000_000, key_dtype="float32", gpu_only=False),
]

BY_NAME = {s.name: s for s in SHAPES}
