"""A multi-process IVF-PQ build, launched by tests/test_ivfpq.py and tests/test_distributed_build.py through
``python -m torch.distributed.run``.

Usage: ``python -m torch.distributed.run --nproc_per_node W tests/ivfpq_dist_build.py OUT_DIR REPORT_DIR
[--merge] [--images N] [--chunk-images C] [--die-rank R --die-after B]``

The images are the tests' ``tiny_images`` (24 random 32 x 32 images, seed 1; ``--images`` takes the first N).
``--merge`` asks for one merged database instead of the partitioned one. ``--die-rank R`` kills rank R
(``os._exit``, no cleanup) when it is about to encode its (B+1)-th batch. Each rank writes its own
``REPORT_DIR/rank<r>.json`` (the ranks' stdout can interleave under load): images it encoded, entries of
the database it got back, its part record, and its peak resident memory (MiB,
:func:`arrag_kernels.profiling.peak_memory_mib`).
"""

import argparse
import json
import os
from pathlib import Path

import faiss
import torch
import torch.distributed as dist

import arrag_kernels as ak
from arrag_kernels.models import get_adapter, tiny_janus
from arrag_kernels.profiling import peak_memory_mib

faiss.omp_set_num_threads(1)


class CountingAdapter:
    """The tiny model's adapter, counting the images this rank encodes (and dying on request)."""

    def __init__(self, adapter, die_after=None):
        self._adapter, self.encoded, self.batches, self.die_after = adapter, 0, 0, die_after

    def __getattr__(self, name):
        return getattr(self._adapter, name)

    def encode(self, batch):
        if self.die_after is not None and self.batches >= self.die_after:
            os._exit(3)
        self.batches += 1
        self.encoded += batch.shape[0]
        return self._adapter.encode(batch)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("report_dir")
    parser.add_argument("--merge", action="store_true")
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--chunk-images", type=int, default=6)
    parser.add_argument("--die-rank", type=int, default=None)
    parser.add_argument("--die-after", type=int, default=0)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    adapter = CountingAdapter(get_adapter(tiny_janus(seed=0)), args.die_after if rank == args.die_rank else None)
    images = (torch.rand(24, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1)[: args.images]
    db = ak.PatchDatabase.build(images, adapter, index="ivfpq", path=args.out, nlist=16, chunk_images=args.chunk_images,
                                batch_size=args.chunk_images, train_size=1000, progress=False, merge=args.merge)
    part = db.meta.part
    report = {"encoded": adapter.encoded, "entries": len(db),
              "part": None if part is None else [part.index, part.parts, part.first_id, part.count],
              **peak_memory_mib()}
    (Path(args.report_dir) / f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
