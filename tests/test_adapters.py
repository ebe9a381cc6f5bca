"""The adapter protocol and registry: a plain object with exactly the protocol's members works."""

import types

import pytest
import torch
from transformers import GenerationConfig

import arrag_kernels as ak
from arrag_kernels.faid import FAiDBlenders, FAiDConfig, load_official_checkpoint
from arrag_kernels.faid.train import FAiDTrainer
from arrag_kernels.models import (ADAPTERS, FAiDAdapter, ImageTokenizer, JanusAdapter, MemberUnavailable, ModelAdapter,
                                  TeacherForcingAdapter, check_protocol, get_adapter, protocol_members, tiny_janus,
                                  tiny_prompt_ids)


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
        "cfg_inputs", "check_image_generation", "new_cache", "step", "kv_spec", "image_logits", "embed_image_tokens",
        "decode_pixels"}
    assert set(protocol_members(TeacherForcingAdapter)) == set(protocol_members(ModelAdapter)) | {
        "embed_prompt", "unconditional_prompt", "empty_prompt", "hidden_states"}
    assert set(protocol_members(FAiDAdapter)) == set(protocol_members(TeacherForcingAdapter)) | {
        "hidden_size", "rms_norm_eps", "dtype", "lora_targets", "decoder_layers", "blender_sites", "lora_module",
        "image_head"}


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


def test_members_that_raise_are_reported_not_skipped(tiny_model):
    """A member whose reading failed used to pass the check silently (any exception but AttributeError was
    swallowed); now it is named with its error, except a property saying it needs set-up (MemberUnavailable)."""
    members = {name: getattr(get_adapter(tiny_model), name) for name in protocol_members(ImageTokenizer)}

    def tokenizer_with(**properties):
        return type("Tokenizer", (), {**members, **{k: property(v) for k, v in properties.items()}})()

    def no_model(self):
        return self.model.vq.device

    def bad_config(self):
        raise RuntimeError("the VQ config has no codebook size")

    with pytest.raises(TypeError, match=r"reading raised: codebook_size \(RuntimeError: the VQ config has no codebook "
                                        r"size\); device \(AttributeError: 'Tokenizer' object has no attribute "
                                        r"'model'\)"):
        check_protocol(tokenizer_with(device=no_model, codebook_size=bad_config), ImageTokenizer)

    def grid_per_call(self):
        raise MemberUnavailable("this family picks its grid per call: pass grid=(H, W)")

    tokenizer = check_protocol(tokenizer_with(grid=grid_per_call), ImageTokenizer)  # present; needs set-up
    with pytest.raises(ValueError, match=r"pass grid=\(H, W\)"):
        tokenizer.grid


def test_janus_prompts_name_missing_special_ids(tiny_model):
    adapter, ids = get_adapter(tiny_model, TeacherForcingAdapter), tiny_prompt_ids(2)
    uncond = adapter.unconditional_prompt(ids, tiny_model.generation_config)
    assert torch.equal(uncond[:, [0, -1]], ids[:, [0, -1]]) and (uncond[:, 1:-1] == 0).all()  # BOS, BOI kept
    assert adapter.empty_prompt(tiny_model.generation_config).tolist() == [[1, 100]]
    with pytest.raises(ValueError, match=r"need generation_config.generation_kwargs\['boi_token_id'\], pad_token_id"):
        adapter.unconditional_prompt(ids, GenerationConfig(bos_token_id=1))


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


FAID = FAiDConfig(k=4, hops=(1, 2), blenders=2)


def test_registered_plain_faid_adapter_decodes_and_trains_like_janus(tiny_images, monkeypatch):
    """FAiD reaches the model only through the adapter: a plain object with exactly FAiDAdapter's members
    decodes (dynamic and static loops) and trains like Janus; one with only ModelAdapter's members gets DAiD
    but FAiD names every missing member, and so does an official checkpoint without official_weights."""
    model = tiny_janus(seed=0)  # own instance: training freezes its weights
    db = ak.PatchDatabase.build(tiny_images[:8], model, progress=False)
    torch.manual_seed(0)
    blenders = FAiDBlenders.for_model(model, FAID)
    with torch.no_grad():
        for p in blenders.parameters():
            p.normal_(0, 0.2)
    tokens = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(1))

    def run():
        with ak.use_backend("reference"), ak.patched(model, db, FAID, blender_weights=blenders):
            out = [_generate(model, loop) for loop in ("dynamic", "static")]
        trainer = FAiDTrainer(model, db, blenders)
        with ak.use_backend("reference"), torch.no_grad():
            return out, trainer.loss(tiny_prompt_ids(2), tokens)

    expected, expected_loss = run()
    ak.register_adapter("plain-faid-test", lambda m: _plain(JanusAdapter(m), FAiDAdapter))
    ak.register_adapter("plain-daid-test", lambda m: _plain(JanusAdapter(m), ModelAdapter))
    try:
        monkeypatch.setattr(model.config, "model_type", "plain-faid-test")
        got, loss = run()
        with pytest.raises(TypeError, match=r"OfficialWeights: missing blender_prefix, base_names\(\), dropped\(\)"):
            load_official_checkpoint(model, {}, FAID)
        monkeypatch.setattr(model.config, "model_type", "plain-daid-test")
        missing = (r"FAiDAdapter: missing hidden_size, rms_norm_eps, dtype, lora_targets, decoder_layers\(\), "
                   r"blender_sites\(\), lora_module\(\), image_head\(\), embed_prompt\(\), "
                   r"unconditional_prompt\(\), empty_prompt\(\), hidden_states\(\)")
        with pytest.raises(TypeError, match=missing):
            ak.patch_model(model, db, FAID, blender_weights=blenders.state_dict())
        with pytest.raises(TypeError, match=missing):
            FAiDTrainer(model, db, blenders)
        with ak.patched(model, db, ak.DAiDConfig(lam=0.5, k=8)):
            assert _generate(model, "dynamic").shape == (2, 64)
    finally:
        ADAPTERS.pop("plain-faid-test")
        ADAPTERS.pop("plain-daid-test")
    assert all(torch.equal(a, b) for a, b in zip(got, expected)) and torch.equal(loss, expected_loss)
    assert not ak.is_patched(model)
