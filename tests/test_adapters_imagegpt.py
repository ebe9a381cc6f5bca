"""ImageGPT (tiny random ImageGPTForCausalImageModeling): databases from its colour clusters (images and token
grids) and DAiD inside its own HF generate through patch_model (the logits-processor path, as Emu3)."""

import pytest
import torch
from transformers import ImageGPTConfig, ImageGPTForCausalImageModeling

import arrag_kernels as ak
from arrag_kernels.models import ImageGPTAdapter, LogitsProcessorAdapter, check_protocol, get_adapter

from .utils import CollectingStreamer, assert_tokens_among_retrieved, plain_and_patched

CODES, SIDE = 16, 5  # 16 colour clusters, 5 x 5 pixels
SOS = CODES  # ImageGPT's start token: the last vocabulary id
GRID = (SIDE, SIDE)


def tiny_imagegpt(clusters=True):
    config = ImageGPTConfig(vocab_size=CODES + 1, n_positions=SIDE * SIDE, n_embd=32, n_layer=2, n_head=4)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = ImageGPTForCausalImageModeling(config).eval()
        if clusters:  # what a user copies from ImageGPTImageProcessor.clusters
            model.config.clusters = (torch.rand(CODES, 3) * 2 - 1).tolist()
    return model


@pytest.fixture(scope="module")
def setup():
    model = tiny_imagegpt()
    pixels = torch.rand(12, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(1)) * 2 - 1
    db = ak.PatchDatabase.build(pixels, model, progress=False)
    return model, ImageGPTAdapter(model), db, pixels


def _generate(model, seed=0, do_sample=True, prompt=None, **kwargs):
    ids = torch.full((2, 1), SOS) if prompt is None else prompt
    torch.manual_seed(seed)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=SIDE * SIDE - ids.shape[1] + 1,
                         do_sample=do_sample, **kwargs)
    return out[:, 1:] if isinstance(out, torch.Tensor) else out


def test_adapter_is_registered_and_encodes_like_the_image_processor(setup):
    model, adapter, db, pixels = setup
    assert isinstance(get_adapter(model, ak.models.ImageTokenizer), ImageGPTAdapter)
    check_protocol(adapter, LogitsProcessorAdapter)
    colours, tokens = adapter.encode(pixels)
    clusters = torch.tensor(model.config.clusters)
    # ImageGPTImageProcessor's colour quantisation: nearest cluster by squared distance
    expected = torch.cdist(pixels.permute(0, 2, 3, 1).reshape(-1, 3), clusters).argmin(-1).view(12, SIDE, SIDE)
    assert torch.equal(tokens, expected) and torch.equal(colours, pixels.permute(0, 2, 3, 1))
    assert db.meta.grid == GRID and db.meta.embed_dim == 3 and len(db) == 12 * (SIDE - 1) * (SIDE - 2)
    # from token grids with the adapter's codebook: the same entries as build with key_source="codebook"
    from_tokens = ak.PatchDatabase.from_tokens(tokens, adapter.codebook())
    built = ak.PatchDatabase.build(pixels, model, key_source="codebook", progress=False)
    assert torch.equal(from_tokens.keys, built.keys) and torch.equal(from_tokens.values, built.values)
    with pytest.raises(ValueError, match="colour clusters are not in the model: pass ImageGPTAdapter"):
        ak.patch_model(tiny_imagegpt(clusters=False), db, ak.DAiDConfig(k=4))


@pytest.mark.parametrize("do_sample,filters", [(False, {}), (True, {}), (True, dict(temperature=0.8, top_k=5, top_p=0.7))],
                         ids=["greedy", "sampled", "sampled-top-k-top-p"])
def test_patched_lam_zero_equals_hf_generate_and_unpatch_restores(setup, do_sample, filters):
    model, _, db, _ = setup
    plain, ours = plain_and_patched(model, db, ak.DAiDConfig(lam=0.0, k=6),
                                    lambda: _generate(model, do_sample=do_sample, **filters))
    assert torch.equal(ours, plain) and ours.shape == (2, SIDE * SIDE)


def test_patched_lam_one_draws_retrieved_tokens(setup):
    model, adapter, db, _ = setup
    plain, out = plain_and_patched(model, db, ak.DAiDConfig(lam=1.0, k=4), lambda: _generate(model))
    assert assert_tokens_among_retrieved(out, adapter.codebook(), db, GRID, 4) == 2 * (SIDE - 1) * (SIDE - 2)
    assert not torch.equal(out, plain)


def test_patched_completion_reads_the_prompts_pixels(setup):
    """Image completion (the prompt holds the first row): the given cells form the queries, lam = 1 draws
    retrieved tokens at every later keyed cell."""
    model, adapter, db, pixels = setup
    first_row = adapter.encode(pixels[:2])[1].reshape(2, -1)[:, :SIDE]
    prompt = torch.cat([torch.full((2, 1), SOS), first_row], 1)
    with ak.patched(model, db, ak.DAiDConfig(lam=1.0, k=4)):
        out = _generate(model, prompt=prompt)
    assert torch.equal(out[:, :SIDE], first_row)
    assert assert_tokens_among_retrieved(out, adapter.codebook(), db, GRID, 4) == 2 * (SIDE - 1) * (SIDE - 2)


def test_patched_generate_keeps_streamer_return_dict_and_num_return_sequences(setup):
    model, _, db, _ = setup

    streamer = CollectingStreamer()
    with ak.patched(model, db, ak.DAiDConfig(lam=0.5, k=4)):
        result = _generate(model, return_dict_in_generate=True, output_scores=True, streamer=streamer)
        many = _generate(model, num_return_sequences=3)
    tokens = result.sequences[:, 1:]
    assert tokens.shape == (2, SIDE * SIDE) and len(result.scores) == SIDE * SIDE
    # scores are the merged log-probabilities: each row sums to one over the codes
    assert torch.allclose(result.scores[SIDE + 1].exp().sum(-1), torch.ones(2), atol=1e-5)
    assert streamer.chunks[-1] is None and torch.equal(torch.stack(streamer.chunks[1:-1], 1), tokens)
    assert many.shape == (6, SIDE * SIDE)


def test_refusals(setup):
    model, _, db, _ = setup
    with pytest.raises(ValueError, match="FAiD is not available for ImageGPTForCausalImageModeling: .*CFG-doubled"):
        ak.patch_model(model, db, ak.FAiDConfig(k=2), blender_weights={})
    with ak.patched(model, db, ak.DAiDConfig(k=4)) as handle:
        with pytest.raises(ValueError, match="generate\\(loop=...\\) is not available for ImageGPT"):
            _generate(model, loop="static")
        with pytest.raises(ValueError, match="generate_images runs the library's decode loop"):
            handle.generate_images(torch.full((1, 1), SOS))
        with pytest.raises(ValueError, match="ImageGPT generates its fixed 5x5 grid"):
            _generate(model, grid=(4, 4))
    small = ak.PatchDatabase.from_tokens(torch.randint(0, CODES, (3, 4, 4)), ImageGPTAdapter(model).codebook())
    with ak.patched(model, small, ak.DAiDConfig(k=4)):
        with pytest.raises(ValueError, match="generates a 5x5 token grid but the database was built for 4x4"):
            _generate(model)
    assert not ak.is_patched(model)
