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
"""

from __future__ import annotations

import functools

import pytest
import torch

import arrag_kernels as ak
import timing
from arrag_kernels.profiling import allocated_bytes
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
