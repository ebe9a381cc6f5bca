"""FAiD through patch_model: exact no-op when zeroed, equals a literal full-map decode, checkpoints."""

import dataclasses

import pytest
import torch

import arrag_kernels as ak
from arrag_kernels.decoding import hf_image_generate
from arrag_kernels.faid import (CheckpointError, FAiDBlenders, FAiDConfig, blend_literal, convert_official,
                                load_blenders, load_official_checkpoint, save_blenders)
from arrag_kernels.faid.modules import blender_input, retrieved_masks
from arrag_kernels.models import get_adapter, hf_image_generate_kwargs, tiny_prompt_ids
from tests.utils import replay_without_host_sync

CFG = FAiDConfig(k=4, hops=(1, 2), blenders=2)


@pytest.fixture(autouse=True)
def _reference_ops():
    """The Triton kernel is checked in test_faid_blend.py; decodes here use the reference op for speed
    (each interpreted launch costs ~ms), except where a test selects the backend itself."""
    with ak.use_backend("reference"):
        yield  # tiny model: 2 layers -> blenders in layers 0 and 1


@pytest.fixture(scope="module")
def db(tiny_model, tiny_images):
    return ak.PatchDatabase.build(tiny_images, tiny_model, progress=False)


def _random_blenders(model, seed=0, scale=0.05, config=CFG):
    torch.manual_seed(seed)
    blenders = FAiDBlenders.for_model(model, config)
    with torch.no_grad():
        for p in blenders.parameters():
            p.normal_(0, scale)
        for i in blenders.layer_ids:
            blenders.layer(i).retrieval_layernorm.weight.fill_(1.0)
    return blenders


def _generate(model, do_sample=False, **kw):
    ids = tiny_prompt_ids(2)
    return model.generate(ids, attention_mask=torch.ones_like(ids), generation_mode="image", do_sample=do_sample,
                          **hf_image_generate_kwargs(model), **kw)


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
    """Test oracle: the literal formulation on the full context map, no ring buffer, no composition
    (the semantics, masks and chaining, are pinned to the official code in test_faid_official.py)."""

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
        self.step, self.B = step, B
        _, ids, valid = self.r.retriever.retrieve(tokens, step)  # every step, also where nothing is valid
        self.feats = self.r.adapter.embed_image_tokens(ids.clamp_min(0))
        self.keep, self.keep_chained = retrieved_masks(ids, valid, self.feats.dtype)

    def _capture(self, i):
        def hook(m, a, out):
            if self.step >= 1:
                self.maps[i][:, self.step - 1] = out[: self.B, -1]
        return hook

    def _blend(self, i):
        def hook(m, a, out):
            H, W = self.r.grid
            layer = self.blenders.layer(i)
            e = blender_input(layer, self.feats, self.keep).unsqueeze(1)
            pos = torch.full((self.B, 1), self.step)
            blended, weighted = blend_literal(layer, self.maps[i].view(self.B, H, W, -1), pos, e)
            self.feats, self.keep = weighted[:, 0], self.keep_chained
            attn = out[0].clone()
            attn[: self.B, -1] += blended[:, 0]
            return (attn, *out[1:])
        return hook


def test_fast_decode_equals_literal_decode(tiny_model, db):
    """Logits of every step under the ring-buffer fast path equal the literal full-map formulation."""
    blenders = _random_blenders(tiny_model, seed=1, scale=0.2)
    prompts = tiny_prompt_ids(2, seed=3)
    kw = dict(inputs=prompts, attention_mask=torch.ones_like(prompts), generation_mode="image", do_sample=False)
    with ak.patched(tiny_model, db, CFG, blender_weights=blenders) as handle, ak.use_backend("auto"):  # Triton on CUDA
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


def test_checkpoint_roundtrip(tiny_model, db, tmp_path):
    blenders = _random_blenders(tiny_model, seed=2, scale=0.2)
    path = save_blenders(blenders, tmp_path / "blenders.safetensors")
    with ak.patched(tiny_model, db, CFG, blender_weights=blenders):
        want = _generate(tiny_model)
    with ak.patched(tiny_model, db, CFG, blender_weights=path):
        assert torch.equal(_generate(tiny_model), want)


# ---- the official release layout: DeepSeek-Janus names for the base model + blenders --------------
def _to_deepseek(name, value):
    """HF JanusForConditionalGeneration name -> DeepSeek MultiModalityCausalLM name(s), written from
    the DeepSeek module layout (test oracle; the inverse of arrag_kernels' mapping)."""
    import re

    rules = [("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
             ("model.generation_embeddings.", "gen_embed."), ("model.generation_head.proj_out.", "gen_head.output_mlp_projector."),
             ("model.generation_head.vision_head.", "gen_head.vision_head.")]
    for hf, ds in rules:
        if name.startswith(hf):
            return {ds + name[len(hf):]: value}
    m = re.match(r"model\.(generation_aligner|aligner)\.(fc1|hidden_layers\.(\d+))\.(\w+)$", name)
    if m:
        idx = 0 if m.group(2) == "fc1" else 2 * int(m.group(3)) + 2
        return {f"{'gen_aligner' if m.group(1) == 'generation_aligner' else 'aligner'}.layers.{idx}.{m.group(4)}": value}
    if name.startswith("model.vqmodel."):
        n = name[len("model.vqmodel."):]
        n = re.sub(r"^(encoder\.down|decoder\.up)\.(\d+)\.block\.", r"\1.\2.res.", n)
        n = re.sub(r"^encoder\.down\.", "encoder.conv_blocks.", n)
        n = re.sub(r"^decoder\.up\.", "decoder.conv_blocks.", n)
        for hf, ds in (("mid.block_1.", "mid.0."), ("mid.attn_1.", "mid.1."), ("mid.block_2.", "mid.2.")):
            n = n.replace(hf, ds)
        return {"gen_vision_model." + n: value}
    vit = "vision_model.vision_tower."
    if name == "model.vision_model.embeddings.position_embedding.weight":
        return {vit + "pos_embed": value.unsqueeze(0)}
    n = name[len("model.vision_model."):]
    for hf, ds in (("embeddings.patch_embedding.", "patch_embed.proj."), ("post_layernorm.", "norm.")):
        if n.startswith(hf):
            return {vit + ds + n[len(hf):]: value}
    m = re.match(r"encoder\.layers\.(\d+)\.(.+)$", n)
    i, rest = m.group(1), m.group(2)
    if re.match(r"self_attn\.[qkv]_proj\.", rest):
        return {}  # fused below
    for hf, ds in (("layer_norm1.", "norm1."), ("layer_norm2.", "norm2."), ("self_attn.projection_layer.", "attn.proj."),
                   ("mlp.", "mlp.")):
        if rest.startswith(hf):
            return {f"{vit}blocks.{i}.{ds}{rest[len(hf):]}": value}
    raise AssertionError(f"test oracle has no DeepSeek name for {name}")


def _write_official(model, blenders, path):
    """An official-layout checkpoint of ``model`` + ``blenders`` (plus a tensor HF has no place for)."""
    from safetensors.torch import save_file

    sd = {k: v.clone() for k, v in model.state_dict().items()}
    official = {}
    for name, value in sd.items():
        official.update(_to_deepseek(name, value))
    for i in range(model.config.vision_config.num_hidden_layers):
        attn = f"model.vision_model.encoder.layers.{i}.self_attn."
        for p in ("weight", "bias"):
            official[f"vision_model.vision_tower.blocks.{i}.attn.qkv.{p}"] = torch.cat([sd[f"{attn}{x}_proj.{p}"] for x in "qkv"])
    official.update({f"language_model.model.{k}": v.clone() for k, v in blenders.state_dict().items()})
    official["gen_vision_model.quantize.codebook_used"] = torch.zeros(8)  # dropped by design
    save_file(official, str(path))
    return path


def test_official_checkpoint_loads_base_and_blenders(tiny_model, db, tmp_path):
    """Released-checkpoint layout -> a fresh HF Janus (other random weights) + blenders: same generation."""
    from safetensors.torch import load_file, save_file

    blenders = _random_blenders(tiny_model, seed=4, scale=0.2)
    path = _write_official(tiny_model, blenders, tmp_path / "official.safetensors")
    with ak.patched(tiny_model, db, CFG, blender_weights=blenders):
        want = _generate(tiny_model)

    fresh = ak.models.tiny_janus(seed=5)
    head = "model.generation_head.vision_head.weight"
    assert not torch.equal(fresh.state_dict()[head], tiny_model.state_dict()[head])
    loaded = load_official_checkpoint(fresh, path, CFG)
    assert loaded.unmapped == [] and loaded.missing == []
    ref = tiny_model.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in fresh.state_dict().items())
    with ak.patched(fresh, db, CFG, blender_weights=loaded.blenders):
        assert torch.equal(_generate(fresh), want)

    # converter: our blender file plus HF-named base weights that load into a third model exactly
    ours = convert_official(path, tmp_path / "b.safetensors", num_layers=2, hidden_size=64, k=CFG.k,
                            base_out=tmp_path / "base.safetensors")
    assert load_blenders(ours, tiny_model).config == CFG
    assert all(torch.equal(v, blenders.state_dict()[k]) for k, v in load_file(str(ours)).items())
    other = ak.models.tiny_janus(seed=6)
    other.load_state_dict(load_file(str(tmp_path / "base.safetensors")), strict=True)
    assert all(torch.equal(v, ref[k]) for k, v in other.state_dict().items())

    # unknown and missing keys: strict lists them, non-strict reports them
    official = load_file(str(path))
    official["gen_head.extra.weight"] = torch.zeros(3)
    del official["gen_embed.weight"]
    with pytest.raises(CheckpointError, match=r"gen_head\.extra\.weight.*model\.generation_embeddings\.weight"):
        load_official_checkpoint(fresh, official, CFG)
    result = load_official_checkpoint(fresh, official, CFG, strict=False)
    assert result.unmapped == ["gen_head.extra.weight"] and result.missing == ["model.generation_embeddings.weight"]
    save_file(official, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError, match=r"no HF Janus name: \['gen_head\.extra\.weight'\]"):
        convert_official(tmp_path / "bad.safetensors", tmp_path / "x.safetensors", 2, 64, base_out=tmp_path / "y.safetensors")
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "y.safetensors").exists()
    official = load_file(str(path))
    official["language_model.lm_head.weight"] = official["language_model.lm_head.weight"] + 1  # tiny model ties it
    with pytest.raises(CheckpointError, match="ties"):
        load_official_checkpoint(fresh, official, CFG)
    official["language_model.model.embed_tokens.weight"] = torch.zeros(3, 64)
    with pytest.raises(CheckpointError, match="do not fit"):
        load_official_checkpoint(fresh, official, CFG)


def test_single_hop_official_checkpoint_loads_and_generates(tiny_model, db, tmp_path):
    """The official single-hop blender has no conv_weights: such a release loads (config inferred from the
    tensors: hops (1,), k = 10), generates like the blenders it was written from, and converts."""
    one_hop = FAiDConfig(k=10, hops=(1,), blenders=2)
    blenders = _random_blenders(tiny_model, seed=8, scale=0.2, config=one_hop)
    path = _write_official(tiny_model, blenders, tmp_path / "official.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        names = list(f.keys())
    assert "language_model.model.layers.0.blender.conv1.weight" in names
    assert not any("conv_weights" in n for n in names)
    with ak.patched(tiny_model, db, one_hop, blender_weights=blenders):
        want = _generate(tiny_model)
    fresh = ak.models.tiny_janus(seed=5)
    loaded = load_official_checkpoint(fresh, path)
    assert loaded.blenders.config == one_hop
    with ak.patched(fresh, db, one_hop, blender_weights=loaded.blenders):
        assert torch.equal(_generate(fresh), want)
    ours = convert_official(path, tmp_path / "b.safetensors", num_layers=2, hidden_size=64)
    assert load_blenders(ours, tiny_model).config == one_hop
    # a file of an earlier version with a one-hop omega still loads (softmax over one hop is 1)
    legacy = dict(blenders.state_dict(), **{f"layers.{i}.blender.conv_weights": torch.ones(1) for i in (0, 1)})
    assert load_blenders(legacy, tiny_model, one_hop).state_dict().keys() == blenders.state_dict().keys()


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
    big = FAiDConfig(k=len(db) + 1, hops=(1, 2), blenders=2)
    with pytest.raises(ValueError, match=rf"FAiDConfig\.k = {len(db) + 1} is larger than the database"):
        ak.patch_model(tiny_model, db, big, blender_weights=_random_blenders(tiny_model, config=big))
    assert not ak.is_patched(tiny_model)


@pytest.mark.parametrize("daid", [False, True], ids=["faid", "daid+faid"])
def test_static_loop_with_faid_equals_dynamic(tiny_model, db, daid):
    """The static loop runs FAiD with the device step (every step retrieves; the retrieved features are
    zeroed where the position has no key); the dynamic loop skips those searches on the host: same tokens."""
    cfg = (ak.DAiDConfig(lam=0.3, k=8), CFG) if daid else CFG
    plain = _generate(tiny_model)
    with ak.patched(tiny_model, db, cfg, blender_weights=_random_blenders(tiny_model, scale=0.3)):
        dynamic = _generate(tiny_model)
        static = _generate(tiny_model, loop="static")
    assert not torch.equal(dynamic, plain)
    assert torch.equal(static, dynamic)


def test_failed_patch_leaves_no_hooks(tiny_model, db):
    def hook_counts():
        return [(len(l.input_layernorm._forward_hooks), len(l.self_attn._forward_hooks))
                for l in tiny_model.model.language_model.layers]

    before = hook_counts()
    with pytest.raises(ValueError, match="larger than the database"):
        ak.patch_model(tiny_model, db, (CFG, ak.DAiDConfig(k=len(db) + 1)), blender_weights=_random_blenders(tiny_model))
    assert hook_counts() == before and not ak.is_patched(tiny_model)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("semantics", ["train", "inference-script"])
@pytest.mark.parametrize("daid", [False, True], ids=["faid", "daid+faid"])
def test_cuda_graph_with_faid_equals_static_without_host_sync(tiny_images, daid, semantics):
    """FAiD steps recorded in the CUDA graph (retrieval inline or overlapped: FAiD's, or the search shared
    with DAiD, on the side stream joined at the first blender layer): same tokens as the eager static
    loop, and the replays run with torch's sync debug mode set to error (any host synchronisation
    raises); both FAiDConfig semantics."""
    from arrag_kernels.decoding import StaticImageDecoder
    from arrag_kernels.models import tiny_janus

    model = tiny_janus(seed=0).cuda()
    gpu_db = ak.PatchDatabase.build(tiny_images, model, progress=False)
    faid_cfg = dataclasses.replace(CFG, semantics=semantics)
    cfg = (ak.DAiDConfig(lam=0.3, k=8), faid_cfg) if daid else faid_cfg
    ids = tiny_prompt_ids(2, seed=3).cuda()
    blenders = _random_blenders(model, scale=0.3, config=faid_cfg)
    with ak.use_backend("auto"), ak.patched(model, gpu_db, cfg, blender_weights=blenders) as h:
        for do_sample in (False, True):
            kw = dict(attention_mask=torch.ones_like(ids), generation_mode="image", do_sample=do_sample,
                      guidance_scale=5.0, top_k=0)
            torch.manual_seed(0)
            static = model.generate(ids, loop="static", **kw)
            for overlap in (False, True):
                torch.manual_seed(0)
                graphed = model.generate(ids, loop="cuda-graph", overlap_retrieval=overlap, **kw)
                assert torch.equal(graphed, static), f"do_sample={do_sample} overlap={overlap}"

        for overlap in (False, True):
            loop = StaticImageDecoder(h.adapter, process_logits=None, fused_cfg=(5.0, 1.0), daid=h.daid,
                                      faid=h.faid, cuda_graph=True, overlap_retrieval=overlap)
            tokens = replay_without_host_sync(loop, model, ids)
            assert (tokens >= 0).all(), f"overlap={overlap}"


@pytest.mark.parametrize("loop", ["dynamic", "static"])
def test_daid_and_faid_share_one_search_per_step(tiny_model, db, loop):
    """With DAiD and FAiD on one database, each step searches once (DAiD's k, FAiD takes the first K): the
    same tokens as two searches per step (FAiD given its own database object, so nothing is shared),
    greedy and sampled. The dynamic loop searches at the 42 retrieval steps, the static one at the prefill
    (DAiD only: no key there) and every device step; DecodeStats counts each step's retrieval once."""
    import copy

    searched = {"dynamic": 42, "static": 64}[loop]
    cfg = (ak.DAiDConfig(lam=0.5, k=8), CFG)
    with ak.patched(tiny_model, db, cfg, blender_weights=_random_blenders(tiny_model, scale=0.3)) as h:
        assert h.daid.covers(h.faid.retriever)
        shared_db = h.faid.retriever.db
        for do_sample in (False, True):
            runs = {}
            for shared in (True, False):
                h.faid.retriever.db = shared_db if shared else copy.copy(shared_db)  # another object: no sharing
                h.daid.searches = h.faid.retriever.searches = 0
                torch.manual_seed(0)
                stats = ak.DecodeStats()
                runs[shared] = _generate(tiny_model, do_sample, loop=loop, stats=stats)
                assert (h.daid.searches, h.faid.retriever.searches) == (
                    (searched, 0) if shared else (searched, searched - (loop == "static"))), f"shared={shared}"
                assert stats.retrieval_steps == searched  # the shared search and its merge: one retrieval step
            assert torch.equal(runs[True], runs[False]), f"do_sample={do_sample}"
        h.faid.retriever.db = shared_db


@pytest.mark.parametrize("index", ["flat", "ivfpq"])
def test_search_order_does_not_depend_on_k(tiny_model, tiny_images, db, index, tmp_path):
    """What sharing relies on (Retriever.covers): the k = 4 hits of every position are the first 4 of its
    k = 64 hits, exact search and IVF-PQ (faiss on the CPU: ties of equal PQ codes included)."""
    from arrag_kernels.retrieval.query import Retriever

    if index == "ivfpq":
        pytest.importorskip("faiss")
        db = ak.PatchDatabase.build(tiny_images, tiny_model, index="ivfpq", path=tmp_path / "ivf", nlist=16,
                                    nprobe=4, train_size=1000, progress=False)
    adapter = get_adapter(tiny_model)
    small, large = Retriever(db, 4, adapter), Retriever(db, 64, adapter)
    assert large.covers(small) and not small.covers(large)
    tokens = torch.randint(0, db.meta.codebook_size, (8, db.meta.grid[0] * db.meta.grid[1]),
                           generator=torch.Generator().manual_seed(0))
    tokens[2, 20:] = -1
    a, b = small.retrieve(tokens), large.retrieve(tokens)
    assert torch.equal(a.tokens, b.tokens[..., :4]) and torch.equal(a.distances, b.distances[..., :4])
    assert torch.equal(a.valid, b.valid)


@pytest.mark.parametrize("loop", ["dynamic", "static"])
def test_closed_daid_gate_still_searches_for_faid(tiny_model, db, loop):
    """A DAiD gate that closes every row (the CPU merge would skip its search) leaves FAiD's hits: the shared
    search still runs at every retrieval step and the tokens are FAiD's alone."""
    blenders = _random_blenders(tiny_model, scale=0.3)
    with ak.patched(tiny_model, db, CFG, blender_weights=blenders):
        faid_only = _generate(tiny_model, loop=loop)
    closed = ak.DAiDConfig(lam=0.5, k=8, gate=("entropy", float("inf")))  # entropy never exceeds inf
    with ak.patched(tiny_model, db, (closed, CFG), blender_weights=blenders) as h:
        gated = _generate(tiny_model, loop=loop)
        assert (h.daid.searches, h.faid.retriever.searches) == ({"dynamic": 42, "static": 64}[loop], 0)
    assert torch.equal(gated, faid_only)
