"""Building a database from images: keys per second and peak memory, the library's path against the
path it replaced, interleaved.

    pytest benchmarks/bench_build.py --benchmark-only -s

The row is ``PatchDatabase.build(images, model, batch_size=16)``: the VQ encoder (on the CPU, images
with >= 4 MiB of first-level activations one at a time in channels-last layout,
``models.base.encoder_batches``), nearest codes through the
library's exact search (``VQCodebook.nearest_codes``) and the key assembly. The baseline
``hf_quantizer`` is the same build with the encode it had before: the whole batch through the
encoder in the default layout and HF's quantizer, which builds the (cells x 16384) distance matrix.

Cases (random weights and images; the time does not depend on them): the tiny Janus VQ encoder
(32 base channels) with Janus-Pro's codebook (16384 x 8) and 24 x 24 grid, at 384 and 192 pixels,
and Janus-Pro's own VQ encoder (128 base channels, 2 residual blocks per level) at 384 pixels.
Peak memory (CPU allocator events, outside the timed rounds) goes to ``extra_info``.

``test_parted_ivfpq_build``: the ``index="ivfpq"`` build of ``ARRAG_BENCH_BUILD_IMAGES`` (default 2048) random
32 x 32 images with the tiny Janus VQ (8 x 8 grid, 42 entries per image, nlist 64, exact keys not kept) by
4 ``torchrun`` (gloo) workers, each filling its own part, against the same build in one process (the
baseline). Each process runs this file as a script (``--worker``) and writes its peak resident memory
(``VmHWM``; ``getrusage``'s ``ru_maxrss`` too), its entries and its index bytes to its own JSON file; they
go to ``extra_info`` (``worker_peak_rss_mib`` per rank, ``one_process_peak_rss_mib``). Resident memory
includes torch and the model (a few hundred MiB); ``worker_index_mib`` is the part that grows with the
database.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import arrag_kernels as ak
import timing
from arrag_kernels.profiling import allocated_bytes, peak_memory_mib
from arrag_kernels.models import JanusAdapter
from arrag_kernels.models.tiny import tiny_janus_config

# name: (patch size, VQ sizes (None: the tiny VQ), images per round)
CASES = {
    "tiny-vq-384px": (16, None, 16),
    "tiny-vq-192px": (8, None, 16),
    "janus-pro-vq-384px": (16, dict(base_channels=128, num_res_blocks=2, latent_channels=256), 1),
}
GRID, CODES, BATCH = 24, 16384, 16

_rows: list[str] = []


class HFQuantizerAdapter(JanusAdapter):
    """The encode this library had before: whole batch, default layout, HF's quantizer."""

    @torch.no_grad()
    def encode(self, pixels):
        latent = self.vq.quant_conv(self.vq.encoder(pixels.to(self.device, self.vq.quant_conv.weight.dtype)))
        tokens = self.vq.quantize(latent)[2]
        B, d, H, W = latent.shape
        return torch.nn.functional.normalize(latent.permute(0, 2, 3, 1).float(), dim=-1), tokens.view(B, H, W)


@functools.lru_cache(maxsize=1)
def setup(name: str):
    from transformers import JanusForConditionalGeneration

    patch, vq_sizes, count = CASES[name]
    config = tiny_janus_config(grid=GRID, patch_size=patch, codebook_size=CODES)
    for key, value in (vq_sizes or {}).items():
        setattr(config.vq_config, key, value)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = JanusForConditionalGeneration(config).eval()
    side = JanusAdapter(model).image_size
    images = torch.rand(count, 3, side, side, generator=torch.Generator().manual_seed(1)) * 2 - 1
    return model, images


@pytest.mark.parametrize("name", list(CASES))
def test_build_from_images(benchmark, name):
    model, images = setup(name)
    old = HFQuantizerAdapter(model)

    def build(tokenizer):
        return lambda: ak.PatchDatabase.build(images, tokenizer, batch_size=BATCH, progress=False)

    benchmark.group = "build-from-images"
    benchmark.extra_info.update(case=name, images=images.shape[0], image_px=images.shape[-1], grid=GRID,
                                codebook=CODES, batch_size=BATCH)
    db = timing.run(benchmark, build(model), {"hf_quantizer": build(old)})
    # Same keys up to the encoder's rounding; ids HF's except at near-ties that rounding may flip.
    reference = build(old)()
    torch.testing.assert_close(db.keys, reference.keys, atol=1e-4, rtol=1e-4)
    assert (db.values == reference.values).float().mean() > 0.99
    keys = len(db)
    _, _, peak = allocated_bytes(build(model))
    _, _, old_peak = allocated_bytes(build(old))
    info = benchmark.extra_info
    info.update(keys=keys, peak_mib=peak / 2**20, hf_quantizer_peak_mib=old_peak / 2**20)
    if "median_s" in info:
        info.update(keys_per_s=keys / info["median_s"], hf_quantizer_keys_per_s=keys / info["hf_quantizer_median_s"])
        _rows.append(f"{name}: {info['keys_per_s']:.0f} keys/s vs {info['hf_quantizer_keys_per_s']:.0f} "
                     f"({1 / info['ratio_to_hf_quantizer']:.2f}x); peak {peak / 2**20:.0f} vs {old_peak / 2**20:.0f} MiB")


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    if _rows:
        print("\nbuild from images, library vs HF quantizer path (medians of interleaved rounds):\n  "
              + "\n  ".join(_rows))


# ---- the parted IVF-PQ build: 4 torchrun workers vs one process --------------------------------------------
PARTED_WORKERS, PARTED_CHUNK, PARTED_NLIST = 4, 128, 64


def _parted_worker(out: str, report_dir: str, images: int) -> None:
    """One build process (a torchrun rank, or the whole build): build, then report to ``report_dir/rank<r>.json``."""
    import faiss
    import torch.distributed as dist

    from arrag_kernels.models import tiny_janus
    from arrag_kernels.retrieval.faiss_index import inner_ivfpq

    faiss.omp_set_num_threads(1)
    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    pixels = torch.rand(images, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    start = time.perf_counter()
    db = ak.PatchDatabase.build(pixels, tiny_janus(seed=0), index="ivfpq", path=out, nlist=PARTED_NLIST,
                                chunk_images=PARTED_CHUNK, keep_keys=False, progress=False)
    report = {"build_s": time.perf_counter() - start, "entries": len(db),
              "index_mib": len(db) * (inner_ivfpq(db.index).code_size + 8) / 2**20,
              **peak_memory_mib()}
    (Path(report_dir) / f"rank{rank}.json").write_text(json.dumps(report))
    if dist.is_initialized():
        dist.destroy_process_group()


def _run_build(workers: int, images: int, root: Path) -> list[dict]:
    out, reports = root / f"db-{workers}", root / f"reports-{workers}"
    reports.mkdir(parents=True, exist_ok=True)
    launcher = [sys.executable] if workers == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                        "--nproc_per_node", str(workers), "--master_port", "29731"]
    subprocess.run([*launcher, __file__, "--worker", str(out), str(reports), str(images)], check=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True)
    return [json.loads((reports / f"rank{r}.json").read_text()) for r in range(workers)]


def test_parted_ivfpq_build(benchmark, tmp_path):
    images = int(os.environ.get("ARRAG_BENCH_BUILD_IMAGES", 2048))
    results = {}

    def build(workers):
        return lambda: results.__setitem__(workers, _run_build(workers, images, tmp_path))

    benchmark.group = "parted-ivfpq-build"
    benchmark.extra_info.update(images=images, workers=PARTED_WORKERS, chunk_images=PARTED_CHUNK, nlist=PARTED_NLIST)
    timing.run(benchmark, build(PARTED_WORKERS), {"one_process": build(1)}, min_rounds=1, warmup=False)
    parted, single = results[PARTED_WORKERS], results[1]
    assert sum(r["entries"] for r in parted) == single[0]["entries"] == images * 42
    benchmark.extra_info.update(
        worker_peak_rss_mib=[round(r["peak_rss_mib"], 1) for r in parted],
        worker_ru_maxrss_mib=[round(r["ru_maxrss_mib"], 1) for r in parted],
        worker_entries=[r["entries"] for r in parted],
        worker_index_mib=[round(r["index_mib"], 2) for r in parted],
        one_process_peak_rss_mib=round(single[0]["peak_rss_mib"], 1),
        one_process_index_mib=round(single[0]["index_mib"], 2),
    )
    _rows.append(f"parted ivfpq build of {images} images: {PARTED_WORKERS} workers peak "
                 f"{max(r['peak_rss_mib'] for r in parted):.0f} MiB each (index {parted[0]['index_mib']:.1f} MiB), "
                 f"one process {single[0]['peak_rss_mib']:.0f} MiB (index {single[0]['index_mib']:.1f} MiB)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="a build process of test_parted_ivfpq_build")
    parser.add_argument("--worker", nargs=3, metavar=("OUT", "REPORT_DIR", "IMAGES"), required=True)
    out, report_dir, count = parser.parse_args().worker
    _parted_worker(out, report_dir, int(count))
