"""Emu3 (tiny random Emu3ForConditionalGeneration): databases from its VQ encoder and DAiD inside its own
HF generate (negative-prompt CFG processor, prefix_allowed_tokens_fn, end-of-line tokens) through the
adapter's logits processor."""

import pytest
import torch
from transformers import Emu3Config, Emu3ForConditionalGeneration

import arrag_kernels as ak
from arrag_kernels.models import Emu3Adapter, ImageTokenizer, get_adapter

CODES, GRID = 32, (4, 5)  # a non-square grid: Emu3 picks H x W per call
BOS, EOS, PAD, BOI, WRAP, EOL, EOF, EOI = 1, 2, 0, 3, 4, 5, 6, 7
VISUAL0 = 16
ROW = GRID[1] + 1


def tiny_emu3():
    vocab = {"<|endoftext|>": PAD, "<|bos|>": BOS, "<|eos|>": EOS, "<|image start|>": BOI, "<|image token|>": WRAP,
             "<|extra_200|>": EOL, "<|extra_201|>": EOF, "<|image end|>": EOI, "<image>": 8}
    vocab.update({f"<|visual token{i:06d}|>": VISUAL0 + i for i in range(CODES)})
    config = Emu3Config(
        vq_config=dict(codebook_size=CODES, embed_dim=4, latent_channels=4, base_channels=32, channel_multiplier=[1, 2],
                       num_res_blocks=1, attn_resolutions=[], temporal_downsample_factor=2, hidden_size=64),
        text_config=dict(vocab_size=VISUAL0 + CODES, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=PAD,
                         bos_token_id=BOS, eos_token_id=EOS),
        vocabulary_map=vocab,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return Emu3ForConditionalGeneration(config).eval()


@pytest.fixture(scope="module")
def setup():
    model = tiny_emu3()
    adapter = Emu3Adapter(model, grid=GRID)
    pixels = torch.rand(10, 3, GRID[0] * 2, GRID[1] * 2, generator=torch.Generator().manual_seed(1)) * 2 - 1
    latents, tokens = adapter.encode(pixels)
    db = ak.PatchDatabase.from_latents(latents, tokens, adapter.codebook(), fingerprint=adapter.fingerprint())
    return model, adapter, db, pixels


def _allowed(batch_id, input_ids):
    """Emu3's documented image layout: rows of visual tokens and end-of-line, then eof, eoi, eos."""
    offset = input_ids.shape[0] - int((input_ids == WRAP).nonzero()[0, 0])
    H, W = GRID
    if offset % (W + 1) == 0 and offset <= H * (W + 1):
        return [EOL]
    return {H * (W + 1) + 1: [EOF], H * (W + 1) + 2: [EOI], H * (W + 1) + 3: [EOS]}.get(
        offset, [PAD] if offset > H * (W + 1) + 3 else list(range(VISUAL0, VISUAL0 + CODES)))


def _generate(model, processor=None, do_sample=True, temperature=1.0, seed=0):
    text = torch.randint(20, 40, (2, 4), generator=torch.Generator().manual_seed(5))
    size = torch.tensor([9, 10, 11])  # "H*W" as text tokens
    ids = torch.cat([torch.full((2, 1), BOS), text, torch.full((2, 1), BOI), size.expand(2, -1), torch.full((2, 1), WRAP)], 1)
    neg = torch.cat([torch.tensor([BOS, BOI]), size, torch.tensor([WRAP])]).expand(2, -1)
    torch.manual_seed(seed)
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=GRID[0] * ROW + 3, do_sample=do_sample,
        temperature=temperature, top_k=0, guidance_scale=3.0, negative_prompt_ids=neg,
        negative_prompt_attention_mask=torch.ones_like(neg), prefix_allowed_tokens_fn=_allowed,
        logits_processor=[processor] if processor is not None else None, pad_token_id=PAD,
    )
    return out[:, ids.shape[1]:]


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
        ak.PatchDatabase.build(square, model, progress=False)  # the registered adapter has no grid
    assert isinstance(get_adapter(model, ImageTokenizer), Emu3Adapter)
    with pytest.raises(TypeError, match="logits_processor"):
        ak.patch_model(model)


@pytest.mark.parametrize("do_sample", [False, True], ids=["greedy", "sampled"])
def test_lam_zero_equals_hf_generate(setup, do_sample):
    model, adapter, db, _ = setup
    plain = _generate(model, do_sample=do_sample, temperature=0.8)
    ours = _generate(model, adapter.logits_processor(db, ak.DAiDConfig(lam=0.0, k=6), temperature=0.8),
                     do_sample=do_sample)
    assert torch.equal(ours, plain)
    assert bool((plain[:, GRID[1]:GRID[0] * ROW:ROW] == EOL).all())
    assert plain[:, -3:].tolist() == [[EOF, EOI, EOS]] * 2 and not torch.equal(plain[0], plain[1])


def test_lam_one_draws_retrieved_tokens(setup):
    model, adapter, db, _ = setup
    out = _generate(model, adapter.logits_processor(db, ak.DAiDConfig(lam=1.0, k=4)))
    assert bool((out[:, GRID[1]:GRID[0] * ROW:ROW] == EOL).all()), "end-of-line tokens must stay at the row ends"
    image = model.vocabulary_mapping.convert_bpe2img(out[:, :GRID[0] * ROW].reshape(2, GRID[0], ROW)).reshape(2, -1)
    codebook = adapter.codebook()
    steps = ak.ops.retrieval_positions(GRID, db.meta.layout).nonzero().flatten().tolist()
    for step in steps:
        prefix = image.clone()
        prefix[:, step:] = -1
        queries, _ = ak.ops.neighbor_keys(prefix, codebook, torch.full((2,), step), GRID, db.meta.layout)
        _, hits = db.retrieve(queries, 4)
        for b in range(2):
            assert image[b, step].item() in hits[b].tolist(), f"image {b} step {step}"
    assert len(steps) == (GRID[0] - 1) * (GRID[1] - 2)
    assert not torch.equal(out, _generate(model))
