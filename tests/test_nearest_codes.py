"""Database building quantises VQ latents with the library's exact search instead of HF's quantizer
(which builds the full cells x codebook distance matrix): the ids must be HF's."""

import pytest
import torch

import arrag_kernels as ak
from arrag_kernels.models import JanusAdapter


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_nearest_codes_equal_hf_quantizer(tiny_model, backend):
    adapter = JanusAdapter(tiny_model)
    quantize = adapter.vq.quantize
    g = torch.Generator().manual_seed(0)
    latent = torch.randn(3, quantize.embedding_dim, 5, 7, generator=g)
    # Two latents equal to codebook rows (distance 0, the first and last code).
    rows = quantize.embedding.weight.detach()
    latent[0, :, 0, 0], latent[1, :, 2, 3] = rows[0], rows[quantize.num_embeddings - 1]
    with ak.use_backend(backend):
        ids = adapter.nearest_codes(latent, chunk=40)  # several chunks, the last one partial
    expected = quantize(latent)[2]
    assert ids.dtype == torch.int64 and ids.shape == (3 * 5 * 7,)
    assert torch.equal(ids, expected), f"{(ids != expected).sum().item()} of {ids.numel()} ids differ from HF's quantizer"
