"""Databases without a model adapter: from token grids, latents or precomputed keys, equal to build()."""

import pytest
import torch

import arrag_kernels as ak
from arrag_kernels.models import get_adapter


@pytest.fixture(scope="module")
def encoded(tiny_model, tiny_images):
    adapter = get_adapter(tiny_model)
    latents, tokens = adapter.encode(tiny_images[:5])
    return adapter, latents, tokens


@pytest.mark.parametrize("layout", [{}, {"hops": (1, 2), "border": "zero"}, {"neighborhood": "full"}],
                         ids=["official", "hop12-zero", "full"])
def test_from_tokens_equals_build(tiny_model, tiny_images, encoded, layout):
    adapter, _, tokens = encoded
    built = ak.PatchDatabase.build(tiny_images[:5], tiny_model, key_source="codebook", progress=False, **layout)
    db = ak.PatchDatabase.from_tokens(tokens, adapter.codebook(), fingerprint=adapter.fingerprint(), chunk_images=2,
                                      **layout)
    assert torch.equal(db.keys, built.keys) and torch.equal(db.values, built.values)
    assert db.meta == built.meta


def test_from_latents_and_from_keys_equal_build(tiny_model, tiny_images, encoded):
    adapter, latents, tokens = encoded
    built = ak.PatchDatabase.build(tiny_images[:5], tiny_model, progress=False)
    db = ak.PatchDatabase.from_latents(latents, tokens, adapter.codebook(), fingerprint=adapter.fingerprint())
    assert torch.equal(db.keys, built.keys) and torch.equal(db.values, built.values)
    assert db.meta == built.meta
    again = ak.PatchDatabase.from_keys(built.keys, built.values, adapter.codebook_size, adapter.embed_dim, adapter.grid,
                                       fingerprint=adapter.fingerprint(), num_images=5)
    assert torch.equal(again.keys, built.keys) and again.meta == built.meta


def test_default_fingerprint_is_the_codebook_hash(encoded):
    _, _, tokens = encoded
    codebook = torch.nn.functional.normalize(torch.randn(512, 8), dim=-1)
    db = ak.PatchDatabase.from_tokens(tokens, codebook)
    assert db.meta.model_fingerprint == ak.models.codebook_fingerprint(codebook)
    assert db.meta.key_source == "codebook" and db.meta.grid == (8, 8) and db.meta.num_images == 5


def test_invalid_inputs_say_what_was_expected(encoded):
    adapter, latents, tokens = encoded
    cb = adapter.codebook()
    with pytest.raises(ValueError, match=r"tokens: expected ids in \[0, 512\)"):
        ak.PatchDatabase.from_tokens(tokens + 512, cb)
    with pytest.raises(ValueError, match=r"tokens: expected a non-empty integer tensor \(N, H, W\)"):
        ak.PatchDatabase.from_tokens(tokens.flatten(1), cb)
    with pytest.raises(ValueError, match=r"latents: expected a float tensor \(N, H, W, d\) = \(5, 8, 8, 8\)"):
        ak.PatchDatabase.from_latents(latents[..., :4], tokens, cb)
    with pytest.raises(ValueError, match=r"codebook: expected a float tensor \(V, d\)"):
        ak.PatchDatabase.from_tokens(tokens, cb[0])
    with pytest.raises(ValueError, match="neighborhood: expected one of"):
        ak.PatchDatabase.from_tokens(tokens, cb, neighborhood="diagonal")
    with pytest.raises(ak.DatabaseError, match=r"keys must be \(N, 32\)"):
        ak.PatchDatabase.from_keys(torch.zeros(3, 16), torch.zeros(3, dtype=torch.long), 512, 8, (8, 8))
    with pytest.raises(ak.DatabaseError, match=r"values must be token ids in \[0, 512\)"):
        ak.PatchDatabase.from_keys(torch.zeros(3, 32), torch.full((3,), 600), 512, 8, (8, 8))
