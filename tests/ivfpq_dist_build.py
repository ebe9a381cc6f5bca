"""Two-process IVF-PQ build, launched by tests/test_ivfpq.py through ``python -m torch.distributed.run``.

Usage: ``python -m torch.distributed.run --nproc_per_node 2 tests/ivfpq_dist_build.py OUT_DIR REPORT_DIR``

Each rank writes its own ``REPORT_DIR/rank<r>.json`` (the ranks' stdout can interleave under load).
"""

import json
import sys
from pathlib import Path

import faiss
import torch
import torch.distributed as dist

import arrag_kernels as ak
from arrag_kernels.models import get_adapter, tiny_janus

faiss.omp_set_num_threads(1)


class CountingAdapter:
    """The tiny model's adapter, counting the images this rank encodes."""

    def __init__(self, adapter):
        self._adapter, self.encoded = adapter, 0

    def __getattr__(self, name):
        return getattr(self._adapter, name)

    def encode(self, batch):
        self.encoded += batch.shape[0]
        return self._adapter.encode(batch)


def main(out: str, report_dir: str) -> None:
    dist.init_process_group("gloo")
    adapter = CountingAdapter(get_adapter(tiny_janus(seed=0)))
    images = torch.rand(24, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    db = ak.PatchDatabase.build(images, adapter, index="ivfpq", path=out, nlist=16, chunk_images=6,
                                train_size=1000, progress=False)
    report = Path(report_dir) / f"rank{dist.get_rank()}.json"
    report.write_text(json.dumps({"encoded": adapter.encoded, "entries": len(db)}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
