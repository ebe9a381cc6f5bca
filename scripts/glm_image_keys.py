"""How much retrieval a GLM-Image database loses with projected keys (arrag_kernels.models.glm_image).

GLM-Image's codebook is 16384 x 2048, L2-normalised: full hop-1 causal keys are 8192-d. The adapter
projects every vector with a fixed random orthonormal matrix to ``key_dim`` per cell. This script
builds databases from token grids (``PatchDatabase.from_tokens``) with full and projected codebooks
and, on held-out grids of the same distribution, reports for each key width:

* recall@k: the share of the full-key k nearest entries that the projected keys also return;
* Fig. 6 accuracy (as ``arrag_kernels.eval.retrieval``): mean L2 distance, in the full normalised
  codebook space, between the ground-truth token and the rank-1 / rank-k retrieved token, against
  a uniformly random token.

No GLM-Image weights can be downloaded here, so the codebook is synthetic at the real size: 256
clusters of 64 codes (each row: a random unit centre plus noise of norm 0.5, normalised), which gives codes a
neighbourhood structure like a trained codebook's; the grids hold a few blocky regions, each
drawing its codes from one cluster (so neighbouring cells have similar codes, as in images).
``--isotropic`` uses unstructured random rows instead. A PCA projection is shown for comparison.

Run: ``python scripts/glm_image_keys.py [--isotropic] [--images 100] [--grid 12]``.
Measured 2026-12-06 on 2 shared CPU cores (defaults; the seconds include building each database):

    clustered codebook 16384 x 2048, 100 database + 20 held-out 12 x 12 grids, k = 16
      keys                     recall@16   L2 rank 1   L2 rank 16   key bytes   seconds
      full (2048 per cell)         1.000       0.855        0.971       32768      32.8
      projected 256                0.715       0.861        0.952        4096       5.3
      projected 128                0.684       0.859        0.984        2048       3.3
      projected 64                 0.656       0.861        0.995        1024       2.5
      projected 32                 0.620       0.859        0.999         512       2.4
      PCA 64                       0.713       0.868        0.984        1024       2.8
      random token                     -       1.412

    isotropic codebook 16384 x 2048, 100 database + 20 held-out 12 x 12 grids, k = 16
      keys                     recall@16   L2 rank 1   L2 rank 16   key bytes   seconds
      full (2048 per cell)         1.000       1.414        1.413       32768      19.5
      projected 256                0.184       1.414        1.414        4096       1.0
      projected 128                0.172       1.414        1.413        2048       0.7
      projected 64                 0.122       1.415        1.414        1024       1.3
      projected 32                 0.059       1.414        1.414         512       1.3
      PCA 64                       0.123       1.414        1.414        1024       1.4
      random token                     -       1.414

On the clustered codebook, 64 dimensions per cell (the adapter's default) keep the Fig. 6 accuracy at
rank 1 (0.861 against 0.855 with full keys; random tokens: 1.412) and two thirds of the full-key
neighbours, with keys 32x smaller; PCA to 64 is no better at rank 1. On the isotropic codebook no
key width retrieves better than chance (there is nothing to find), so only the recall differs.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from arrag_kernels import PatchDatabase
from arrag_kernels.models.glm_image import key_projection
from arrag_kernels.ops import neighbor_keys

V, D = 16384, 2048


def synthetic_codebook(isotropic: bool, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(V, D) normalised rows and (V,) cluster of each row (all zeros when isotropic)."""
    if isotropic:
        return F.normalize(torch.randn(V, D, generator=g), dim=-1), torch.zeros(V, dtype=torch.long)
    clusters = torch.arange(V) // 64
    centres = F.normalize(torch.randn(V // 64, D, generator=g), dim=-1)
    noise = torch.randn(V, D, generator=g) * (0.5 / D ** 0.5)  # norm about 0.5 around a unit centre
    return F.normalize(centres[clusters] + noise, dim=-1), clusters


def synthetic_grids(n: int, side: int, isotropic: bool, g: torch.Generator) -> torch.Tensor:
    """(n, side, side) token grids: blocks of side/3 cells, each from one cluster (random codes when isotropic)."""
    if isotropic:
        return torch.randint(0, V, (n, side, side), generator=g)
    block = max(1, side // 3)
    coarse = torch.randint(0, V // 64, (n, -(-side // block), -(-side // block)), generator=g)
    regions = coarse.repeat_interleave(block, 1).repeat_interleave(block, 2)[:, :side, :side]
    return regions * 64 + torch.randint(0, 64, (n, side, side), generator=g)


def pca_projection(codebook: torch.Tensor, key_dim: int) -> torch.Tensor:
    centred = codebook.double() - codebook.double().mean(0)
    _, vectors = torch.linalg.eigh(centred.T @ centred)
    return (vectors[:, -key_dim:] * (D / key_dim) ** 0.5).float()


def neighbours(cells, db_grids, test_grids, k):
    """((Q, k) entry ids, (Q, k) token ids, (Q,) ground-truth tokens, database) at every keyed position of the
    held-out grids, the database and the queries made from ``cells`` (full or projected codebook rows)."""
    db = PatchDatabase.from_tokens(db_grids, cells)
    tokens = test_grids.reshape(test_grids.shape[0], -1)
    B, N = tokens.shape
    queries, valid = neighbor_keys(tokens, cells, torch.arange(N).expand(B, N), db.meta.grid, db.meta.layout)
    _, ids = db.search(queries[valid], k)
    return ids, db.values[ids], tokens[valid], db


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--isotropic", action="store_true")
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--test-images", type=int, default=20)
    parser.add_argument("--grid", type=int, default=12)
    parser.add_argument("--k", type=int, default=16)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    codebook, _ = synthetic_codebook(args.isotropic, g)
    db_grids = synthetic_grids(args.images, args.grid, args.isotropic, g)
    test_grids = synthetic_grids(args.test_images, args.grid, args.isotropic, g)
    variants = [("full (2048 per cell)", None)] + [(f"projected {r}", key_projection(D, r)) for r in (256, 128, 64, 32)]
    variants.append(("PCA 64", pca_projection(codebook, 64)))
    reference = None
    print(f"{'isotropic' if args.isotropic else 'clustered'} codebook {V} x {D}, {args.images} database + "
          f"{args.test_images} held-out {args.grid} x {args.grid} grids, k = {args.k}")
    print(f"  {'keys':24s} recall@{args.k:<4d} L2 rank 1   L2 rank {args.k:<4d} key bytes   seconds")
    for name, projection in variants:
        start = time.perf_counter()
        cells = codebook if projection is None else codebook @ projection
        ids, retrieved, truth, db = neighbours(cells, db_grids, test_grids, args.k)
        l2 = (codebook[retrieved] - codebook[truth][:, None]).norm(dim=-1)  # full-space distances (Fig. 6)
        if reference is None:
            reference = ids
        recall = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(ids, reference)) / reference.numel()
        print(f"  {name:24s} {recall:9.3f}   {float(l2[:, 0].mean()):9.3f}   {float(l2[:, -1].mean()):10.3f}   "
              f"{db.meta.key_dim * 4:9d}   {time.perf_counter() - start:7.1f}")
    random = torch.randint(0, V, truth.shape, generator=g)
    print(f"  {'random token':24s} {'-':>9s}   {float((codebook[random] - codebook[truth]).norm(dim=-1).mean()):9.3f}")


if __name__ == "__main__":
    main()
