"""The adapter protocol and registry: a plain object with exactly the protocol's members works."""

import types

import pytest
import torch
from transformers import GenerationConfig

import arrag_kernels as ak
from arrag_kernels.models import (ADAPTERS, ImageTokenizer, JanusAdapter, ModelAdapter, check_protocol, get_adapter,
                                  protocol_members, tiny_prompt_ids)


def _plain(adapter, protocol):
    """A SimpleNamespace holding exactly ``protocol``'s members, taken from ``adapter``: nothing else to reach into."""
    return types.SimpleNamespace(**{name: getattr(adapter, name) for name in protocol_members(protocol)})


def _generate(model, loop, seed=0):
    ids = tiny_prompt_ids(2, seed=4)
    gen = GenerationConfig(do_sample=True, top_k=0, guidance_scale=5.0, bos_token_id=1, pad_token_id=0,
                           generation_kwargs={"boi_token_id": 100})
    torch.manual_seed(seed)
    return model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen, generation_mode="image",
                          loop=loop)


@pytest.fixture(scope="module")
def db(tiny_model, tiny_images):
    return ak.PatchDatabase.build(tiny_images[:8], tiny_model, progress=False)


def test_protocol_lists_what_the_library_calls():
    assert set(protocol_members(ImageTokenizer)) == {"grid", "codebook_size", "embed_dim", "image_size", "device",
                                                     "codebook", "fingerprint", "encode"}
    assert set(protocol_members(ModelAdapter)) == set(protocol_members(ImageTokenizer)) | {
        "cfg_inputs", "check_image_generation", "new_cache", "step", "kv_spec", "image_logits", "embed_image_tokens"}


def test_plain_tokenizer_builds_the_same_database(tiny_model, tiny_images, db):
    tokenizer = _plain(get_adapter(tiny_model), ImageTokenizer)
    plain = ak.PatchDatabase.build(tiny_images[:8], tokenizer, progress=False)
    assert torch.equal(plain.keys, db.keys) and torch.equal(plain.values, db.values)
    assert plain.meta == db.meta
    sampler = ak.DAiDSampler(plain, ak.DAiDConfig(k=4), tokenizer)  # device and codebook from the plain object
    assert sampler.codebook.shape == (tokenizer.codebook_size, tokenizer.embed_dim)


def test_missing_members_are_named_in_one_error(tiny_model, tiny_images):
    partial = _plain(get_adapter(tiny_model), ImageTokenizer)
    del partial.device, partial.fingerprint
    partial.encode = "not a function"
    with pytest.raises(TypeError, match=r"missing device, fingerprint\(\); not callable: encode"):
        ak.PatchDatabase.build(tiny_images[:2], partial, progress=False)
    with pytest.raises(TypeError, match="missing"):
        check_protocol(object(), ModelAdapter)


@pytest.mark.parametrize("loop", ["dynamic", "static"])
def test_registered_plain_adapter_generates_like_janus(tiny_model, db, loop, monkeypatch):
    cfg = ak.DAiDConfig(lam=0.5, k=8)
    with ak.patched(tiny_model, db, cfg):
        expected = _generate(tiny_model, loop)
    ak.register_adapter("plain-test", lambda model: _plain(JanusAdapter(model), ModelAdapter))
    try:
        monkeypatch.setattr(tiny_model.config, "model_type", "plain-test")
        with ak.patched(tiny_model, db, cfg) as handle:
            assert isinstance(handle.adapter, types.SimpleNamespace)
            tokens = _generate(tiny_model, loop)
    finally:
        ADAPTERS.pop("plain-test")
    assert torch.equal(tokens, expected)


def test_registry_errors(tiny_model, monkeypatch):
    with pytest.raises(ValueError, match="already has the adapter"):
        ak.register_adapter("janus", lambda model: None)
    monkeypatch.setattr(tiny_model.config, "model_type", "unknown-family")
    with pytest.raises(TypeError, match="register_adapter"):
        ak.patch_model(tiny_model)
    ak.register_adapter("broken-test", lambda model: types.SimpleNamespace(grid=(8, 8)))
    try:
        monkeypatch.setattr(tiny_model.config, "model_type", "broken-test")
        with pytest.raises(TypeError, match=r"adapter for model_type 'broken-test'.*missing codebook_size"):
            ak.patch_model(tiny_model)
    finally:
        ADAPTERS.pop("broken-test")
    assert not ak.is_patched(tiny_model)
