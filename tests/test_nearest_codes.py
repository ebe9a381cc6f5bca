"""Database building quantises VQ latents with the library's exact search instead of HF's quantizer
(which builds the full cells x codebook distance matrix): the ids must be HF's. On the CPU the Janus
encoder runs in channels-last sub-batches: its latents must be HF's within rounding."""

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


@pytest.mark.parametrize("budget", [None, 1], ids=["default-sub-batches", "one-image-per-call"])
def test_janus_encode_matches_hf_vq_encode(tiny_model, tiny_images, budget, monkeypatch):
    if budget is not None:
        monkeypatch.setattr(base, "_ENCODER_CPU_BYTES", budget)
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
