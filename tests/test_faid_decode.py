"""FAiD through patch_model: exact no-op when zeroed, equals a literal full-map decode, checkpoints."""

import pytest
import torch

import arrag_kernels as ak
from arrag_kernels.decoding import hf_image_generate
from arrag_kernels.faid import (CheckpointError, FAiDBlenders, FAiDConfig, blend_literal, convert_official,
                                load_blenders, load_official_checkpoint, save_blenders)
from arrag_kernels.models import tiny_prompt_ids

CFG = FAiDConfig(k=4, hops=(1, 2), blenders=2)


@pytest.fixture(autouse=True)
def _reference_ops():
    """The Triton kernel is checked in test_faid_ops.py; decodes here use the reference op for speed
    (each interpreted launch costs ~ms), except where a test selects the backend itself."""
    with ak.use_backend("reference"):
        yield  # tiny model: 2 layers -> blenders in layers 0 and 1


@pytest.fixture(scope="module")
def db(tiny_model, tiny_images):
    return ak.PatchDatabase.build(tiny_images, tiny_model, progress=False)


def _random_blenders(model, seed=0, scale=0.05):
    torch.manual_seed(seed)
    blenders = FAiDBlenders.for_model(model, CFG)
    with torch.no_grad():
        for p in blenders.parameters():
            p.normal_(0, scale)
        for i in blenders.layer_ids:
            blenders.layer(i).retrieval_layernorm.weight.fill_(1.0)
    return blenders


def _generate(model, **kw):
    ids = tiny_prompt_ids(2)
    return model.generate(ids, attention_mask=torch.ones_like(ids), generation_mode="image", do_sample=False, **kw)


def test_zeroed_blenders_equal_plain_decoding(tiny_model, db):
    plain = _generate(tiny_model)
    blenders = FAiDBlenders.for_model(tiny_model, CFG)
    with torch.no_grad():
        for p in blenders.parameters():
            p.zero_()
    with ak.patched(tiny_model, db, CFG, blender_weights=blenders):
        faid = _generate(tiny_model)
    assert torch.equal(plain, faid)


def test_random_blenders_change_output_and_unpatch_restores(tiny_model, db):
    plain = _generate(tiny_model)
    hooks_before = [(len(l.input_layernorm._forward_hooks), len(l.self_attn._forward_hooks))
                    for l in tiny_model.model.language_model.layers]
    handle = ak.patch_model(tiny_model, db, CFG, blender_weights=_random_blenders(tiny_model, scale=0.3))
    faid = _generate(tiny_model)
    handle.remove()
    hooks_after = [(len(l.input_layernorm._forward_hooks), len(l.self_attn._forward_hooks))
                   for l in tiny_model.model.language_model.layers]
    assert not torch.equal(plain, faid)
    assert hooks_after == hooks_before
    assert torch.equal(plain, _generate(tiny_model))


class _LiteralFAiD:
    """Test oracle: the official formulation on the full context map, no ring buffer, no composition."""

    def __init__(self, model, runtime, blenders):
        self.r, self.blenders = runtime, blenders
        self.layers = model.model.language_model.layers
        self.hooks = []
        for i in blenders.layer_ids:
            self.hooks.append(self.layers[i].input_layernorm.register_forward_hook(self._capture(i)))
            self.hooks.append(self.layers[i].self_attn.register_forward_hook(self._blend(i)))

    def begin_step(self, tokens, step):
        B, N = tokens.shape
        H, W = self.r.grid
        if step == 0:
            self.maps = {i: torch.zeros(B, N, self.blenders.dim) for i in self.blenders.layer_ids}
        self.step, self.B, self.feats = step, B, None
        if self.r.retrieves_at[step]:
            _, ids, _ = self.r.retriever.retrieve(tokens, step)
            self.feats = self.r.adapter.embed_image_tokens(ids)

    def _capture(self, i):
        def hook(m, a, out):
            if self.step >= 1:
                self.maps[i][:, self.step - 1] = out[: self.B, -1]
        return hook

    def _blend(self, i):
        def hook(m, a, out):
            if self.feats is None:
                return None
            H, W = self.r.grid
            layer = self.blenders.layer(i)
            e = layer.retrieval_layernorm(self.feats).unsqueeze(1)
            pos = torch.full((self.B, 1), self.step)
            blended, hhat = blend_literal(layer, self.maps[i].view(self.B, H, W, -1), pos, e)
            self.feats = hhat[:, 0]
            attn = out[0].clone()
            attn[: self.B, -1] += blended[:, 0]
            return (attn, *out[1:])
        return hook


def test_fast_decode_equals_literal_decode(tiny_model, db):
    """Logits of every step under the ring-buffer fast path equal the literal full-map formulation."""
    blenders = _random_blenders(tiny_model, seed=1, scale=0.2)
    prompts = tiny_prompt_ids(2, seed=3)
    kw = dict(inputs=prompts, attention_mask=torch.ones_like(prompts), generation_mode="image", do_sample=False)
    with ak.patched(tiny_model, db, CFG, blender_weights=blenders) as handle, ak.use_backend("auto"):  # Triton faid_blend
        fast = handle.generate_images(**kw)
        runtime = handle.faid
        runtime.remove()  # keep the retrieval state, drop the fast hooks
        oracle = _LiteralFAiD(tiny_model, runtime, blenders)
        try:
            literal = hf_image_generate(tiny_model, handle.adapter, faid=oracle, **kw)
        finally:
            for h in oracle.hooks:
                h.remove()
    assert torch.equal(fast, literal)


def test_daid_and_faid_combined(tiny_model, db):
    plain = _generate(tiny_model)
    cfg = (ak.DAiDConfig(lam=0.5, k=8), CFG)
    with ak.patched(tiny_model, db, cfg, blender_weights=_random_blenders(tiny_model)) as h:
        assert h.daid is not None and h.faid is not None
        out = _generate(tiny_model)
    assert out.shape == plain.shape and not torch.equal(out, plain)


def test_checkpoint_roundtrip_and_official_layout(tiny_model, db, tmp_path):
    blenders = _random_blenders(tiny_model, seed=2, scale=0.2)
    path = save_blenders(blenders, tmp_path / "blenders.safetensors")
    with ak.patched(tiny_model, db, CFG, blender_weights=blenders):
        want = _generate(tiny_model)
    with ak.patched(tiny_model, db, CFG, blender_weights=path):
        assert torch.equal(_generate(tiny_model), want)

    # the official DeepSeek-Janus layout, written here: blenders + part of the LM body + a foreign key
    official = {f"language_model.model.{k}": v.clone() for k, v in blenders.state_dict().items()}
    lm_key = "layers.0.self_attn.q_proj.weight"
    original = tiny_model.model.language_model.state_dict()[lm_key].clone()
    official[f"language_model.model.{lm_key}"] = original.clone()
    official["gen_head.output_mlp_projector.weight"] = torch.zeros(3)
    from safetensors.torch import save_file
    save_file(official, str(tmp_path / "official.safetensors"))
    loaded, skipped = load_official_checkpoint(tiny_model, tmp_path / "official.safetensors", CFG)
    assert skipped == ["gen_head.output_mlp_projector.weight"]
    assert torch.equal(tiny_model.model.language_model.state_dict()[lm_key], original)
    for k, v in blenders.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    converted = convert_official(tmp_path / "official.safetensors", tmp_path / "ours.safetensors", num_layers=2,
                                 hidden_size=64, k=CFG.k)
    with ak.patched(tiny_model, db, CFG, blender_weights=converted):
        assert torch.equal(_generate(tiny_model), want)


def test_bad_inputs(tiny_model, db, tmp_path):
    blenders = _random_blenders(tiny_model)
    sd = blenders.state_dict()
    wrong = dict(sd)
    wrong["layers.0.blender.mlp.0.weight"] = torch.zeros(32, 32)
    with pytest.raises(CheckpointError, match="shapes do not match"):
        load_blenders(wrong, tiny_model, CFG)
    hop4 = {k.replace("conv2", "conv4"): v for k, v in sd.items()}
    with pytest.raises(ValueError, match="subset of"):
        load_blenders(hop4, tiny_model)
    with pytest.raises(CheckpointError, match="missing"):
        load_blenders(sd, tiny_model, FAiDConfig(k=4, hops=(1, 2, 3), blenders=2))
    other = ak.models.tiny_janus(seed=0, grid=4)
    with pytest.raises(ak.DatabaseError, match="grid"):
        ak.patch_model(other, db, FAiDConfig(k=4, hops=(1,), blenders=1),
                       blender_weights=FAiDBlenders.for_model(other, FAiDConfig(k=4, hops=(1,), blenders=1)))
    with pytest.raises(ValueError, match="blender_weights"):
        ak.patch_model(tiny_model, db, CFG)
    assert not ak.is_patched(tiny_model)


def test_static_loop_with_faid_equals_dynamic(tiny_model, db):
    with ak.patched(tiny_model, db, (ak.DAiDConfig(lam=0.3, k=8), CFG),
                    blender_weights=_random_blenders(tiny_model, scale=0.3)):
        dynamic = _generate(tiny_model)
        static = _generate(tiny_model, loop="static")
    assert torch.equal(static, dynamic)
