"""Database building quantises VQ latents with the library's exact search instead of HF's quantizer
(which builds the full cells x codebook distance matrix): the ids must be HF's. On the CPU the Janus
encoder runs large images one at a time in channels-last layout: their latents must be HF's within
rounding and must not depend on the batch they came in."""

import pytest
import torch

import arrag_kernels as ak
from arrag_kernels.models import JanusAdapter, base


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_nearest_codes_equal_hf_quantizer(tiny_model, backend):
    adapter = JanusAdapter(tiny_model)
    quantize = adapter.vq.quantize
    g = torch.Generator().manual_seed(0)
    latent = torch.randn(3, quantize.embedding_dim, 5, 7, generator=g)
    # Two latents equal to codebook rows (distance 0, the first and last code).
    rows = quantize.embedding.weight.detach()
    latent[0, :, 0, 0], latent[1, :, 2, 3] = rows[0], rows[quantize.num_embeddings - 1]
    cells = latent.permute(0, 2, 3, 1).reshape(-1, quantize.embedding_dim)
    with ak.use_backend(backend):
        ids = adapter.nearest_codes(cells, chunk=40)  # several chunks, the last one partial
    expected = quantize(latent)[2]
    assert ids.dtype == torch.int64 and ids.shape == (3 * 5 * 7,)
    assert torch.equal(ids, expected), f"{(ids != expected).sum().item()} of {ids.numel()} ids differ from HF's quantizer"


@pytest.mark.parametrize("per_image", [False, True], ids=["whole-batch", "one-image-per-call"])
def test_janus_encode_matches_hf_vq_encode(tiny_model, tiny_images, per_image, monkeypatch):
    if per_image:  # the path of large images: one image per call, channels-last
        monkeypatch.setattr(base, "_ENCODER_CPU_PER_IMAGE_BYTES", 1)
    adapter = JanusAdapter(tiny_model)
    pixels = tiny_images[:5]
    latents, tokens = adapter.encode(pixels)
    with torch.no_grad():
        hf = adapter.vq.encode(pixels)  # the whole batch at once, default layout
        hf_latent = adapter.vq.quant_conv(hf.last_hidden_state)
    expected = torch.nn.functional.normalize(hf_latent.permute(0, 2, 3, 1), dim=-1)
    torch.testing.assert_close(latents, expected, atol=1e-5, rtol=1e-4)
    # Tokens: HF's wherever HF's choice is not a near-tie that the layout's rounding may flip.
    hf_tokens = hf.image_tokens.view(tokens.shape)
    cells = hf_latent.permute(0, 2, 3, 1).reshape(-1, hf_latent.shape[1])
    dist = torch.cdist(cells, adapter.vq.quantize.embedding.weight.detach()) ** 2
    gap = dist.gather(1, tokens.view(-1, 1)) - dist.gather(1, hf_tokens.view(-1, 1))
    assert gap.abs().max() <= 1e-4, f"ids differ from HF's beyond a rounding tie: {gap.abs().max().item():.2e}"
    assert (tokens == hf_tokens).float().mean() > 0.99


def test_one_image_per_call_does_not_depend_on_the_batch(tiny_model, tiny_images, monkeypatch):
    """Databases must not depend on batch_size or chunking: bit-identical latents and ids per image."""
    monkeypatch.setattr(base, "_ENCODER_CPU_PER_IMAGE_BYTES", 1)
    adapter = JanusAdapter(tiny_model)
    latents, tokens = adapter.encode(tiny_images[:5])
    alone = [adapter.encode(tiny_images[i : i + 1]) for i in range(5)]
    assert torch.equal(latents, torch.cat([lat for lat, _ in alone]))
    assert torch.equal(tokens, torch.cat([tok for _, tok in alone]))
