"""Emu3 (tiny random Emu3ForConditionalGeneration): databases from its VQ encoder and DAiD inside its own
HF generate (negative-prompt CFG processor, prefix_allowed_tokens_fn, end-of-line tokens), through the
adapter's logits processor and through patch_model."""

import warnings

import pytest
import torch
from transformers import Emu3Config, Emu3ForConditionalGeneration

import arrag_kernels as ak
from arrag_kernels.models import Emu3Adapter, ImageTokenizer, get_adapter

from .utils import CollectingStreamer, assert_tokens_among_retrieved, latent_database_setup, seeded_model

CODES, GRID = 32, (4, 5)  # a non-square grid: Emu3 picks H x W per call
BOS, EOS, PAD, BOI, WRAP, EOL, EOF, EOI = 1, 2, 0, 3, 4, 5, 6, 7
VISUAL0 = 16
ROW = GRID[1] + 1


def tiny_emu3():
    vocab = {"<|endoftext|>": PAD, "<|bos|>": BOS, "<|eos|>": EOS, "<|image start|>": BOI, "<|image token|>": WRAP,
             "<|extra_200|>": EOL, "<|extra_201|>": EOF, "<|image end|>": EOI, "<image>": 8, "4": 9, "*": 10, "5": 11}
    vocab.update({f"<|visual token{i:06d}|>": VISUAL0 + i for i in range(CODES)})
    return seeded_model(Emu3ForConditionalGeneration, Emu3Config(
        vq_config=dict(codebook_size=CODES, embed_dim=4, latent_channels=4, base_channels=32, channel_multiplier=[1, 2],
                       num_res_blocks=1, attn_resolutions=[], temporal_downsample_factor=2, hidden_size=64),
        text_config=dict(vocab_size=VISUAL0 + CODES, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=PAD,
                         bos_token_id=BOS, eos_token_id=EOS),
        vocabulary_map=vocab,
    ))


@pytest.fixture(scope="module")
def setup():
    model = tiny_emu3()
    return latent_database_setup(model, Emu3Adapter(model, grid=GRID), (10, 3, GRID[0] * 2, GRID[1] * 2))


def _allowed(batch_id, input_ids):
    """Emu3's documented image layout: rows of visual tokens and end-of-line, then eof, eoi, eos."""
    offset = input_ids.shape[0] - int((input_ids == WRAP).nonzero()[0, 0])
    H, W = GRID
    if offset % (W + 1) == 0 and offset <= H * (W + 1):
        return [EOL]
    return {H * (W + 1) + 1: [EOF], H * (W + 1) + 2: [EOI], H * (W + 1) + 3: [EOS]}.get(
        offset, [PAD] if offset > H * (W + 1) + 3 else list(range(VISUAL0, VISUAL0 + CODES)))


def _prompt(size=(9, 10, 11)):
    """Emu3's image-generation prompt: <bos> text <|image start|>H*W<|image token|> (size: "4*5" by default)."""
    text = torch.randint(20, 40, (2, 4), generator=torch.Generator().manual_seed(5))
    size = torch.tensor(size)
    ids = torch.cat([torch.full((2, 1), BOS), text, torch.full((2, 1), BOI), size.expand(2, -1), torch.full((2, 1), WRAP)], 1)
    neg = torch.cat([torch.tensor([BOS, BOI]), size, torch.tensor([WRAP])]).expand(2, -1)
    return ids, neg


def _generate(model, processor=None, do_sample=True, temperature=1.0, seed=0, size=(9, 10, 11), top_k=0, **kwargs):
    ids, neg = _prompt(size)
    torch.manual_seed(seed)
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=GRID[0] * ROW + 3, do_sample=do_sample,
        temperature=temperature, top_k=top_k, guidance_scale=3.0, negative_prompt_ids=neg,
        negative_prompt_attention_mask=torch.ones_like(neg), prefix_allowed_tokens_fn=_allowed,
        logits_processor=[processor] if processor is not None else None, pad_token_id=PAD, **kwargs,
    )
    return out[:, ids.shape[1]:] if isinstance(out, torch.Tensor) else out


def test_encode_matches_hf_vq_tokens(setup):
    model, adapter, db, pixels = setup
    latents, tokens = adapter.encode(pixels[:3])
    hf = model.model.vqmodel.encode(pixels[:3], torch.tensor([[GRID[0] * 2, GRID[1] * 2]] * 3)).image_tokens
    assert torch.equal(tokens, torch.stack(hf))
    assert torch.allclose(latents.norm(dim=-1), torch.ones(3, *GRID))
    assert len(db) == 10 * (GRID[0] - 1) * (GRID[1] - 2) and db.meta.grid == GRID


def test_square_grid_builds_from_images_through_the_registry(setup):
    model, _, _, _ = setup
    square = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1
    built = ak.PatchDatabase.build(square, Emu3Adapter(model, grid=(4, 4)), progress=False)
    latents, tokens = Emu3Adapter(model, grid=(4, 4)).encode(square)
    from_latents = ak.PatchDatabase.from_latents(latents, tokens, Emu3Adapter(model).codebook(),
                                                 fingerprint=built.meta.model_fingerprint)
    assert torch.equal(built.keys, from_latents.keys) and torch.equal(built.values, from_latents.values)
    assert built.meta == from_latents.meta
    with pytest.raises(ValueError, match="chooses the image grid per call"):
        Emu3Adapter(model).grid  # the registered adapter has no grid of its own...
    assert isinstance(get_adapter(model, ImageTokenizer), Emu3Adapter)
    from_model = ak.PatchDatabase.build(square, model, progress=False)  # ...so build reads it from the images' size
    assert torch.equal(from_model.keys, built.keys) and from_model.meta == built.meta


def test_build_from_the_model_reads_the_grid_from_image_files(setup, tmp_path):
    """Issue 23: build(images, emu3_model) takes the grid from the files' common size, and says why it cannot
    when the files have several sizes or a size that is not a whole number of tokens."""
    from PIL import Image

    model, _, _, _ = setup
    pixels = torch.rand(2, 8, 8, 3, generator=torch.Generator().manual_seed(3))
    files = []
    for i, image in enumerate(pixels):
        files.append(tmp_path / f"{i}.png")
        Image.fromarray((image * 255).byte().numpy()).save(files[-1])
    from_files = ak.PatchDatabase.build(files, model, progress=False)
    assert from_files.meta.grid == (4, 4)
    assert torch.equal(from_files.keys, ak.PatchDatabase.build(files, Emu3Adapter(model, grid=(4, 4)),
                                                               progress=False).keys)
    Image.new("RGB", (10, 10)).save(tmp_path / "other.png")
    with pytest.raises(ValueError, match="2 different sizes .*give images of one size"):
        ak.PatchDatabase.build([*files, tmp_path / "other.png"], model, progress=False)
    with pytest.raises(ValueError, match="images of 9 x 9 pixels do not split into 2-pixel tokens"):
        ak.PatchDatabase.build(torch.zeros(1, 3, 9, 9), model, progress=False)


def test_from_tokens_with_the_adapters_codebook_matches_the_model(setup):
    """Issue 23: a database made as the README shows, from_tokens(grids, adapter.codebook()), is recognised as
    this model's (no "different VQ codebook" warning); one from another codebook still warns."""
    model, adapter, _, _ = setup
    grids = torch.randint(0, CODES, (3, *GRID), generator=torch.Generator().manual_seed(4))
    db = ak.PatchDatabase.from_tokens(grids, adapter.codebook())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with ak.patched(model, db, ak.DAiDConfig(k=4)):
            _generate(model)
        db.check_compatible(adapter)
    other = ak.PatchDatabase.from_tokens(grids, torch.nn.functional.normalize(torch.randn(CODES, adapter.embed_dim), dim=-1))
    with pytest.warns(UserWarning, match="different VQ codebook"):
        other.check_compatible(adapter)


def test_vocabulary_without_every_visual_token_is_a_clear_error():
    """Issue 23: an Emu3 vocabulary naming fewer visual tokens than the codebook has codes says so
    (it was a bare KeyError: 0)."""
    model = tiny_emu3()
    vocab = {name: i for name, i in model.config.vocabulary_map.items() if name != "<|visual token000000|>"}
    model.model.vocabulary_mapping = type(model.model.vocabulary_mapping)(vocab)
    with pytest.raises(ValueError, match=f"names {CODES - 1} visual tokens but the VQ codebook has {CODES} codes: "
                                         r"no .* entry for 1 of codes .*first: 0\)"):
        Emu3Adapter(model).image_stream()


@pytest.mark.parametrize("do_sample", [False, True], ids=["greedy", "sampled"])
def test_lam_zero_equals_hf_generate(setup, do_sample):
    model, adapter, db, _ = setup
    plain = _generate(model, do_sample=do_sample, temperature=0.8)
    ours = _generate(model, ak.DAiDLogitsProcessor.for_adapter(adapter, db, ak.DAiDConfig(lam=0.0, k=6), temperature=0.8),
                     do_sample=do_sample)
    assert torch.equal(ours, plain)
    assert bool((plain[:, GRID[1]:GRID[0] * ROW:ROW] == EOL).all())
    assert plain[:, -3:].tolist() == [[EOF, EOI, EOS]] * 2 and not torch.equal(plain[0], plain[1])


def _assert_draws_retrieved_tokens(model, adapter, db, out):
    assert bool((out[:, GRID[1]:GRID[0] * ROW:ROW] == EOL).all()), "end-of-line tokens must stay at the row ends"
    image = model.vocabulary_mapping.convert_bpe2img(out[:, :GRID[0] * ROW].reshape(2, GRID[0], ROW)).reshape(2, -1)
    checked = assert_tokens_among_retrieved(image, adapter.codebook(), db, GRID, 4)
    assert checked == 2 * (GRID[0] - 1) * (GRID[1] - 2)


def test_lam_one_draws_retrieved_tokens(setup):
    model, adapter, db, _ = setup
    out = _generate(model, ak.DAiDLogitsProcessor.for_adapter(adapter, db, ak.DAiDConfig(lam=1.0, k=4)))
    _assert_draws_retrieved_tokens(model, adapter, db, out)
    assert not torch.equal(out, _generate(model))


# patch_model: Emu3's own generate, wrapped (the adapter's generate_mode), the grid read from the prompt's "4*5"


@pytest.mark.parametrize("do_sample,filters", [(False, {}), (True, {}), (True, dict(top_k=5, top_p=0.7))],
                         ids=["greedy", "sampled", "sampled-top-k-top-p"])
def test_patched_lam_zero_equals_hf_generate_and_unpatch_restores(setup, do_sample, filters):
    model, _, db, _ = setup
    plain = _generate(model, do_sample=do_sample, temperature=0.8, **filters)
    with ak.patched(model, db, ak.DAiDConfig(lam=0.0, k=6)) as handle:
        assert "generate" in model.__dict__ and ak.is_patched(model)
        ours = _generate(model, do_sample=do_sample, temperature=0.8, **filters)  # the same HF call as unpatched
        with pytest.raises(RuntimeError, match="already patched"):
            ak.patch_model(model, db, ak.DAiDConfig())
    assert torch.equal(ours, plain)
    assert bool((ours[:, GRID[1]:GRID[0] * ROW:ROW] == EOL).all())
    assert ours[:, -3:].tolist() == [[EOF, EOI, EOS]] * 2
    assert "generate" not in model.__dict__ and not ak.is_patched(model)
    assert model.generate.__func__ is type(model).generate
    assert torch.equal(_generate(model, do_sample=do_sample, temperature=0.8, **filters), plain)
    handle.remove()  # idempotent


def test_patched_lam_one_draws_retrieved_tokens_then_unpatch_restores(setup):
    model, adapter, db, _ = setup
    before = _generate(model)
    handle = ak.patch_model(model, db, ak.DAiDConfig(lam=1.0, k=4))
    out = _generate(model)
    _assert_draws_retrieved_tokens(model, adapter, db, out)
    assert not torch.equal(out, before)
    # the grid can be given explicitly (prompts whose "H*W" the vocabulary map cannot spell)
    assert torch.equal(_generate(model, grid=GRID), out)
    # the same processor through the public logits-processor form: the same tokens
    handle.remove()
    assert torch.equal(_generate(model, ak.DAiDLogitsProcessor.for_adapter(adapter, db, ak.DAiDConfig(lam=1.0, k=4))), out)
    ak.patch_model(model, db, ak.DAiDConfig(lam=1.0, k=4))
    ak.unpatch_model(model)
    assert torch.equal(_generate(model), before) and "generate" not in model.__dict__


def test_patched_generate_keeps_streamer_and_return_dict(setup):
    model, _, db, _ = setup
    with ak.patched(model, db, ak.DAiDConfig(lam=0.5, k=4)):
        tokens = _generate(model, seed=3)
        out = _generate(model, seed=3, return_dict_in_generate=True, output_scores=True)
        streamer = CollectingStreamer()
        ids, neg = _prompt()
        torch.manual_seed(3)
        model.generate(ids[:1], attention_mask=torch.ones_like(ids[:1]), max_new_tokens=GRID[0] * ROW + 3,
                       do_sample=True, top_k=0, guidance_scale=3.0, negative_prompt_ids=neg[:1],
                       negative_prompt_attention_mask=torch.ones_like(neg[:1]), prefix_allowed_tokens_fn=_allowed,
                       pad_token_id=PAD, streamer=streamer)
    assert torch.equal(out.sequences[:, -tokens.shape[1]:], tokens)
    assert len(out.scores) == tokens.shape[1]
    # scores are the merged log-probabilities: the drawn token has finite score at every step
    drawn = torch.stack([s.gather(1, tokens[:, i:i + 1])[:, 0] for i, s in enumerate(out.scores)], 1)
    assert bool(torch.isfinite(drawn).all())
    streamed = torch.cat([c.reshape(1, -1) for c in streamer.chunks[1:-1]], 1)  # first chunk: the prompt
    assert streamer.chunks[-1] is None and streamed.shape[1] == tokens.shape[1]
    assert bool((streamed[0, GRID[1]:GRID[0] * ROW:ROW] == EOL).all())


def test_patched_refusals(setup):
    model, _, db, _ = setup
    with pytest.raises(ValueError, match="FAiD is not available for Emu3ForConditionalGeneration: .*end-of-line"):
        ak.patch_model(model, db, ak.FAiDConfig(k=2), blender_weights={})
    with pytest.raises(ValueError, match="patching without a config is not available"):
        ak.patch_model(model)
    square = ak.PatchDatabase.from_tokens(torch.randint(0, CODES, (3, 4, 4)), Emu3Adapter(model).codebook(),
                                          fingerprint=Emu3Adapter(model).fingerprint())
    with ak.patched(model, db, ak.DAiDConfig(k=4)) as handle:
        for key in ("loop", "overlap_retrieval"):
            with pytest.raises(ValueError, match=f"generate\\({key}=...\\) is not available for Emu3.*end-of-line"):
                _generate(model, **{key: "static" if key == "loop" else True})
        with pytest.raises(ValueError, match="generate_images runs the library's decode loop"):
            handle.generate_images(_prompt()[0])
        with pytest.raises(ValueError, match="cannot read the image size from the prompt .*pass grid="):
            _generate(model, size=(9, 11))
        with pytest.raises(ValueError, match="generates a 4x4 token grid but the database was built for 4x5"):
            _generate(model, grid=(4, 4))
        text_ids = torch.tensor([[BOS, 20, 21]])  # not an image prompt: passes through untouched
        with pytest.raises(ValueError, match="grid=.* do not end with"):
            model.generate(text_ids, max_new_tokens=2, grid=GRID)
        patched_text = model.generate(text_ids, max_new_tokens=3, do_sample=False, pad_token_id=PAD)
    assert torch.equal(patched_text, model.generate(text_ids, max_new_tokens=3, do_sample=False, pad_token_id=PAD))
    with ak.patched(model, square, ak.DAiDConfig(k=4)):
        with pytest.raises(ValueError, match="generates a 4x5 token grid but the database was built for 4x4"):
            _generate(model)
    other = ak.PatchDatabase.from_tokens(torch.randint(0, CODES // 2, (3, *GRID)), Emu3Adapter(model).codebook()[:CODES // 2])
    with pytest.raises(ValueError, match="another model"):
        ak.patch_model(model, other, ak.DAiDConfig(k=4))  # checked when patching, not at the first call
    assert not ak.is_patched(model)


def test_logits_processor_mode_is_the_adapters_decision(setup, monkeypatch):
    """patch_model takes the mode from the adapter (no model-type test); a processor-mode adapter is checked."""
    model, _, db, _ = setup

    class Incomplete(Emu3Adapter):
        generation_grid = None  # not callable

    monkeypatch.setitem(ak.models.ADAPTERS, "emu3", Incomplete)
    with pytest.raises(TypeError, match="does not implement arrag_kernels.models.LogitsProcessorAdapter: not callable: "
                                        "generation_grid"):
        ak.patch_model(model, db, ak.DAiDConfig(k=4))

    class LoopMode(Emu3Adapter):
        generate_mode = "loop"  # then it must be a full ModelAdapter, which Emu3's is not

    monkeypatch.setitem(ak.models.ADAPTERS, "emu3", LoopMode)
    with pytest.raises(TypeError, match="does not implement arrag_kernels.models.ModelAdapter"):
        ak.patch_model(model, db, ak.DAiDConfig(k=4))
    assert not ak.is_patched(model)
