"""aMUSEd (a tiny random diffusers AmusedPipeline built from configs, offline): databases from its VQ (images and
token grids) and masked DAiD inside the pipeline's own call, through patch_model wrapping its scheduler step."""

import json
import warnings

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

import arrag_kernels as ak  # noqa: E402
from arrag_kernels.faid import FAiDBlenders  # noqa: E402
from arrag_kernels.masked import (MaskedDAiD, MaskedDecodeConfig, MaskedFAiD, MaskedGenerator,  # noqa: E402
                                  masked_decode, train_masked_faid)
from arrag_kernels.models import (AmusedAdapter, ImageTokenizer, PipelineAdapter, check_protocol,  # noqa: E402
                                  get_adapter)
from arrag_kernels.ops import daid_mix  # noqa: E402

from .oracles import admissible, exact_distances  # noqa: E402

CODES, WIDTH, SIDE, STEPS = 16, 8, 6, 6  # VQ codes and width, token grid side, inference steps
PIXELS = 2 * SIDE  # two VQ levels: 2 pixels per token
MASK = CODES  # the scheduler's mask id: the transformer's last embedding row
OFFSETS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))  # UL U UR L R LL Lo LR
RETRIEVING = list(range(STEPS // 2, STEPS))  # the default start_fraction 0.5: the final half
PROMPTS = ["a cat", "a photo of a dog"]


def tiny_amused(tmp_path):
    """An AmusedPipeline of random parts built from small configs; its CLIP tokenizer from a written vocabulary."""
    from diffusers import AmusedPipeline, AmusedScheduler, UVit2DModel, VQModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    words = ["a", "cat", "dog", "photo", "of"]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, **{w + "</w>": 2 + i for i, w in enumerate(words)}}
    vocab.update({c: len(vocab) + i for i, c in enumerate(sorted(set("".join(words))))})
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), model_max_length=8)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        transformer = UVit2DModel(
            hidden_size=16, cond_embed_dim=8, micro_cond_encode_dim=2, micro_cond_embed_dim=10, encoder_hidden_size=8,
            vocab_size=CODES + 1, codebook_size=CODES, in_channels=8, block_out_channels=8, num_res_blocks=1,
            block_num_heads=1, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16, sample_size=SIDE)
        vqvae = VQModel(block_out_channels=[8, 8], down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=WIDTH, norm_num_groups=8,
                        num_vq_embeddings=CODES, sample_size=PIXELS, mid_block_add_attention=False,
                        lookup_from_codebook=True)
        with torch.no_grad():  # codes among the encoder's own latents, so that random images use many of them
            cells = vqvae.encode(torch.rand(4, 3, PIXELS, PIXELS)).latents.permute(0, 2, 3, 1).reshape(-1, WIDTH)
            vqvae.quantize.embedding.weight.copy_(cells[torch.randperm(len(cells))[:CODES]])
        text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(
            bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=8, intermediate_size=8, num_attention_heads=1,
            num_hidden_layers=1, vocab_size=len(vocab), projection_dim=8))
    pipe = AmusedPipeline(vqvae=vqvae.eval(), tokenizer=tokenizer, text_encoder=text_encoder.eval(),
                          transformer=transformer.eval(), scheduler=AmusedScheduler(mask_token_id=MASK))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    pipe = tiny_amused(tmp_path_factory.mktemp("clip"))
    images = torch.rand(24, 3, PIXELS, PIXELS, generator=torch.Generator().manual_seed(1)) * 2 - 1
    db = ak.PatchDatabase.build(images, pipe, neighborhood="full", border="zero", progress=False)
    return pipe, AmusedAdapter(pipe), db, images


def _call(pipe, seed=0, **kwargs):
    """The pipeline's own call: a seeded generator unless the call passes generator=None (then the global RNG)."""
    if "generator" not in kwargs:
        kwargs["generator"] = torch.Generator().manual_seed(seed)
    else:
        torch.manual_seed(seed)
    kwargs = {"num_inference_steps": STEPS, "output_type": "latent", **kwargs}
    return pipe(PROMPTS, **kwargs).images


def test_encode_matches_the_vq_quantizer(setup):
    pipe, adapter, _, images = setup
    latents, tokens = adapter.encode(images[:4])
    h = pipe.vqvae.encode((images[:4] + 1) / 2).latents  # aMUSEd's VQ reads [0, 1] pixels
    _, _, (_, _, indices) = pipe.vqvae.quantize(h)
    assert torch.equal(tokens.reshape(-1), indices)
    assert torch.allclose(latents, torch.nn.functional.normalize(h.permute(0, 2, 3, 1), dim=-1))
    assert tokens.unique().numel() > CODES // 2  # random images reach many codes (a meaningful database)
    assert (adapter.grid, adapter.image_size, adapter.embed_dim) == ((SIDE, SIDE), PIXELS, WIDTH)


def test_databases_from_images_and_from_tokens_through_the_registry(setup):
    pipe, adapter, db, images = setup
    assert isinstance(get_adapter(pipe, ImageTokenizer), AmusedAdapter)
    check_protocol(adapter, PipelineAdapter)
    _, tokens = adapter.encode(images)
    assert db.meta.grid == (SIDE, SIDE) and db.meta.layout.neighborhood == "full" and len(db) == 24 * SIDE * SIDE
    assert torch.equal(db.values, tokens.reshape(-1))
    from_tokens = ak.PatchDatabase.from_tokens(tokens, adapter.codebook(), neighborhood="full", border="zero")
    built = ak.PatchDatabase.build(images, pipe, neighborhood="full", border="zero", key_source="codebook",
                                   progress=False)
    assert torch.equal(from_tokens.keys, built.keys) and torch.equal(from_tokens.values, built.values)
    by_adapter = ak.PatchDatabase.build(images, adapter, neighborhood="full", border="zero", progress=False)
    assert torch.equal(by_adapter.keys, db.keys) and by_adapter.meta.model_fingerprint == db.meta.model_fingerprint
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # both fingerprints name this pipeline's codebook
        from_tokens.check_compatible(adapter)
        db.check_compatible(adapter)


@pytest.mark.parametrize("call", [dict(), dict(temperature=0), dict(generator=None),
                                  dict(guidance_scale=1.0, num_images_per_prompt=2)],
                         ids=["sampled", "greedy-masking", "global-rng", "no-cfg-two-per-prompt"])
def test_lam_zero_equals_the_unpatched_pipeline_and_unpatch_restores(setup, call):
    pipe, _, db, _ = setup
    scheduler = pipe.scheduler
    plain, plain_images = _call(pipe, **call), _call(pipe, output_type="np", **call)
    with ak.patched(pipe, db, ak.DAiDConfig(lam=0.0, k=8)) as handle:
        assert "step" in scheduler.__dict__ and ak.is_patched(pipe)
        ours = _call(pipe, **call)
        ours_images = _call(pipe, output_type="np", **call)
        assert handle.daid.searches == 2 * len(RETRIEVING)  # one search per retrieving step and call
    assert torch.equal(ours, plain) and (ours_images == plain_images).all()
    assert "step" not in scheduler.__dict__ and scheduler.step.__func__ is type(scheduler).step
    assert not ak.is_patched(pipe) and torch.equal(_call(pipe, **call), plain)


def _query(grid, r, c, codebook):
    """The 8-neighbour query of cell (r, c) of a (H, W) grid (MASK: unknown): codebook rows or zeros."""
    cells = []
    for dr, dc in OFFSETS:
        rr, cc = r + dr, c + dc
        known = 0 <= rr < SIDE and 0 <= cc < SIDE and grid[rr, cc] != MASK
        cells.append(codebook[grid[rr, cc]] if known else torch.zeros(codebook.shape[1]))
    return torch.cat(cells)


def test_lam_one_draws_only_brute_force_top_k_tokens_at_retrieving_steps(setup):
    pipe, adapter, db, _ = setup
    k = 4
    history = [torch.full((2, SIDE, SIDE), MASK)]
    plain = _call(pipe)
    with ak.patched(pipe, db, ak.DAiDConfig(lam=1.0, tau=0.5, k=k)):
        out = _call(pipe, callback=lambda step, timestep, latents: history.append(latents.clone()))
    assert len(history) == STEPS + 1 and torch.equal(history[-1], out)
    codebook = adapter.codebook()
    checked = isolated = 0
    for t in RETRIEVING:
        before, after = history[t], history[t + 1]
        for b, r, c in ((before == MASK) & (after != MASK)).nonzero().tolist():
            if not _has_known_neighbour(before[b], r, c):  # an all-zero query: left to the model
                isolated += 1
                continue
            truth = exact_distances(_query(before[b], r, c, codebook)[None], db.keys)
            allowed = set(db.values[admissible(truth, k, atol=1e-4, rtol=0)[0]].tolist())
            assert int(after[b, r, c]) in allowed, (t, b, r, c)
            checked += 1
    assert checked + isolated == int((history[RETRIEVING[0]] == MASK).sum())  # every cell decided in the final half
    assert checked > 4 * isolated
    assert not torch.equal(out, plain)


def test_the_pipelines_own_features_keep_working(setup):
    pipe, _, db, _ = setup
    with ak.patched(pipe, db, ak.DAiDConfig(lam=0.5, k=8)):
        images = _call(pipe, output_type="np", num_images_per_prompt=2)
        pil = _call(pipe, output_type="pil", guidance_scale=1.0)
        (tokens,) = pipe(PROMPTS[0], num_inference_steps=STEPS, output_type="latent", return_dict=False,
                         negative_prompt="a dog", guidance_scale=3.0)
    assert images.shape == (4, PIXELS, PIXELS, 3) and 0 <= images.min() and images.max() <= 1
    assert len(pil) == 2 and pil[0].size == (PIXELS, PIXELS)
    assert tokens.shape == (1, SIDE, SIDE) and int(tokens.max()) < CODES  # every cell decided


def _has_known_neighbour(grid, r, c, unknown=MASK):
    return any(0 <= r + dr < SIDE and 0 <= c + dc < SIDE and grid[r + dr, c + dc] != unknown for dr, dc in OFFSETS)


def test_merge_logits_rows_with_different_unknown_cells(setup):
    """The generic hook under the step: logits of the merged distribution at the unknown cells with a known
    neighbour, the logits elsewhere (known cells; unknown cells whose neighbours are all unknown), also when the
    grids have different numbers of unknown cells (one padded search); lam = 0 returns the logits bit for bit."""
    _, adapter, db, _ = setup
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, CODES, (2, SIDE * SIDE), generator=g)
    tokens[0, :20], tokens[1, 5:9] = -1, -1  # grid 0: rows 0-1 and cell (2, 0) have no known neighbour
    logits = torch.randn(2, SIDE * SIDE, CODES, generator=g)
    daid = MaskedDAiD(db, ak.DAiDConfig(lam=0.3, tau=0.5, k=6), adapter)
    merged = daid.merge_logits(logits, tokens)
    near = torch.tensor([[_has_known_neighbour(grid.view(SIDE, SIDE), *divmod(p, SIDE), unknown=-1)
                          for p in range(SIDE * SIDE)] for grid in tokens])
    merge = (tokens < 0) & near
    assert int(((tokens < 0) & ~near).sum()) == 13
    assert torch.equal(merged[~merge], logits[~merge])
    for b in range(2):
        positions = merge[b].nonzero().flatten()
        dist, ids, _ = daid.retrieve(tokens[b:b + 1], positions[None]).flat()
        expected = daid_mix(logits[b, positions].softmax(-1), dist, ids, torch.ones(len(positions), dtype=torch.bool),
                            0.3, 0.5, "nearest")
        assert torch.allclose(merged[b, positions].softmax(-1), expected, atol=1e-6)
    assert not torch.allclose(merged[merge].softmax(-1), logits[merge].softmax(-1), atol=1e-3)
    assert daid.searches == 3
    untouched = MaskedDAiD(db, ak.DAiDConfig(lam=0.0, k=6), adapter)
    assert torch.equal(untouched.merge_logits(logits, tokens), logits) and untouched.searches == 1


def test_logits_equal_the_guided_logits_of_the_pipelines_steps(setup):
    """The MaskedGenerator side: adapter.logits is the transformer forward + CFG of a pipeline step."""
    pipe, _, _, _ = setup
    seen = []
    step = pipe.scheduler.step
    pipe.scheduler.step = lambda model_output, timestep, sample, **kw: seen.append((model_output, sample)) or step(
        model_output, timestep, sample, **kw)
    try:
        _call(pipe, guidance_scale=4.0)
    finally:
        del pipe.scheduler.step
    guided = AmusedAdapter(pipe, guidance_scale=4.0)
    prompt_ids = guided.encode_prompts(PROMPTS)
    for logits, sample in (seen[0], seen[-1]):
        tokens = torch.where(sample == MASK, -1, sample).reshape(2, -1)
        with torch.no_grad():
            ours = guided.logits(tokens, prompt_ids)
        assert torch.allclose(ours, logits.flatten(2).transpose(1, 2), atol=1e-5)


def test_masked_loop_with_faid_and_daid_and_blender_training(setup):
    """FAiD through hooks on UVit2DModel's transformer layers: the library's masked loop with the adapter."""
    pipe, _, db, images = setup
    adapter, guided = AmusedAdapter(pipe), AmusedAdapter(pipe, guidance_scale=3.0)
    check_protocol(adapter, MaskedGenerator)
    prompt_ids = adapter.encode_prompts(PROMPTS)
    torch.manual_seed(0)
    blenders = FAiDBlenders(adapter.hidden_size, adapter.num_layers, ak.FAiDConfig(k=4, hops=(1,), blenders=2))
    faid = MaskedFAiD(adapter, db, blenders)
    tokens = torch.randint(0, CODES, (2, SIDE * SIDE), generator=torch.Generator().manual_seed(4))
    tokens[:, ::3] = -1
    positions = (tokens < 0).nonzero()[:, 1].view(2, -1)
    with torch.no_grad():
        plain = adapter.logits(tokens, prompt_ids)
        blended = adapter.logits(tokens, prompt_ids, faid.begin_step(tokens, positions, True))
        uncond = adapter.logits(tokens, adapter.encode_prompts(["", ""]))
        guided_blend = guided.logits(tokens, prompt_ids, faid.begin_step(tokens, positions, True))
    assert (blended - plain).abs().max() > 1e-3  # the blenders reach the model
    assert torch.allclose(guided_blend, uncond + 3.0 * (blended - uncond), atol=1e-5)  # conditional rows only
    rng = torch.Generator().manual_seed(5)
    loop = MaskedDecodeConfig(steps=4)
    out = masked_decode(guided, prompt_ids, loop, daid=MaskedDAiD(db, ak.DAiDConfig(lam=0.5, k=4), guided), faid=faid,
                        rng=rng)
    assert out.shape == (2, SIDE * SIDE) and bool((out >= 0).all()) and int(out.max()) < CODES
    _, grids = adapter.encode(images[:6])
    before = {n: p.detach().clone() for n, p in blenders.named_parameters()}
    losses = train_masked_faid(faid, grids.reshape(6, -1), adapter.encode_prompts(PROMPTS * 3), steps=2, batch_size=2)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(p, before[n]) for n, p in blenders.named_parameters())
    assert all(p.grad is None for p in pipe.transformer.parameters())


def test_refusals(setup):
    pipe, adapter, db, images = setup
    with pytest.raises(ValueError, match="FAiD is not available for AmusedPipeline"):
        ak.patch_model(pipe, db, ak.FAiDConfig(k=2), blender_weights={})
    with pytest.raises(ValueError, match="device= is not available"):
        ak.patch_model(pipe, db, ak.DAiDConfig(k=4), device="cpu")
    causal = ak.PatchDatabase.build(images[:4], pipe, progress=False)
    with pytest.raises(ak.DatabaseError, match="neighborhood='full'"):
        ak.patch_model(pipe, causal, ak.DAiDConfig(k=4))
    assert not ak.is_patched(pipe) and "step" not in pipe.scheduler.__dict__
    with ak.patched(pipe, db, ak.DAiDConfig(k=4)) as handle:
        with pytest.raises(ValueError, match=f"samples a 4x4 token grid but the database was built for {SIDE}x{SIDE}"):
            _call(pipe, height=8, width=8)
        with pytest.raises(ValueError, match="generate_images runs the library's decode loop"):
            handle.generate_images()
        with pytest.raises(RuntimeError, match="already patched"):
            ak.patch_model(pipe, db, ak.DAiDConfig(k=4))
    with pytest.raises(TypeError, match="run DAiD inside the pipeline's own call"):
        get_adapter(pipe)  # no library decode loop
    with pytest.raises(ValueError, match="start_fraction"):
        AmusedAdapter(pipe, start_fraction=1.5)
