"""GLM-Image (tiny random GlmImageForConditionalGeneration): databases from its vision tokenizer (images and token
grids, projected keys) and DAiD on the target grid inside its own HF generate through patch_model (the
logits-processor path, as Emu3), the preview grid left to the model."""

import pytest
import torch
from transformers import GlmImageConfig, GlmImageForConditionalGeneration

import arrag_kernels as ak
from arrag_kernels.models import GlmImageAdapter, LogitsProcessorAdapter, check_protocol, get_adapter
from arrag_kernels.models.glm_image import DEFAULT_KEY_DIM, key_projection

from .utils import (CollectingStreamer, assert_tokens_among_retrieved, latent_database_setup, plain_and_patched,
                    seeded_model)

CODES, WIDTH, PATCH = 64, 128, 4
KEY_DIM = DEFAULT_KEY_DIM  # what the registered adapter (patch_model) projects to: 64 of 128
START, END, IMAGE, PAD = CODES, CODES + 1, CODES + 38, CODES + 39  # image start / end (eos), placeholder, pad
GRID, PREVIEW = (4, 5), (2, 2)  # a non-square target; the preview comes first in the stream
TARGET0 = PREVIEW[0] * PREVIEW[1]  # where the target grid starts among the generated tokens
CELLS = GRID[0] * GRID[1]


def tiny_glm_image():
    return seeded_model(GlmImageForConditionalGeneration, GlmImageConfig(
        text_config=dict(vocab_size=CODES + 40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vision_vocab_size=CODES + 2, pad_token_id=PAD,
                         eos_token_id=END, max_position_embeddings=256,
                         rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 1, 1])),
        vision_config=dict(depth=1, hidden_size=32, num_heads=4, image_size=32, patch_size=PATCH, intermediate_size=64),
        vq_config=dict(embed_dim=WIDTH, num_embeddings=CODES, latent_channels=32),
        image_token_id=IMAGE, image_start_token_id=START, image_end_token_id=END,
    ))


@pytest.fixture(scope="module")
def setup():
    model = tiny_glm_image()
    return latent_database_setup(model, GlmImageAdapter(model, grid=GRID), (10, 3, GRID[0] * PATCH, GRID[1] * PATCH))


def _t2i_inputs(batch=2):
    """A text-to-image call as GlmImageProcessor writes it: text, then the image-start token; image_grid_thw =
    [target, preview] per sample."""
    text = torch.randint(CODES + 2, CODES + 30, (batch, 3), generator=torch.Generator().manual_seed(5))
    ids = torch.cat([text, torch.full((batch, 1), START)], 1)
    thw = torch.tensor([[1, *GRID], [1, *PREVIEW]] * batch)
    return ids, dict(image_grid_thw=thw, images_per_sample=torch.full((batch,), 2))


def _generate(model, seed=0, do_sample=True, batch=2, **kwargs):
    ids, image_kwargs = _t2i_inputs(batch)
    torch.manual_seed(seed)
    # suppress_tokens: HF's processor (it runs before DAiD) keeps the random model from ending the stream early
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=TARGET0 + CELLS, do_sample=do_sample,
                         suppress_tokens=[START, END], **image_kwargs, **kwargs)
    return out[:, ids.shape[1]:] if isinstance(out, torch.Tensor) else out


def test_encode_matches_hf_image_tokens(setup):
    model, adapter, db, pixels = setup
    latents, tokens = adapter.encode(pixels[:3])
    patches, thw = adapter._pack(pixels[:3])
    features = model.model.get_image_features(patches, thw, return_dict=True).pooler_output
    assert torch.equal(tokens.reshape(-1), model.model.get_image_tokens(features))
    full_latents, full_tokens = GlmImageAdapter(model, grid=GRID, key_dim=None).encode(pixels[:3])
    assert torch.equal(full_tokens, tokens) and torch.allclose(full_latents.norm(dim=-1), torch.ones(3, *GRID))
    projection = key_projection(WIDTH, KEY_DIM)
    assert torch.allclose(latents, full_latents @ projection, atol=1e-6)
    assert torch.allclose(projection.T @ projection, torch.eye(KEY_DIM) * WIDTH / KEY_DIM, atol=1e-5)
    assert db.meta.embed_dim == KEY_DIM and db.meta.key_dim == 4 * KEY_DIM and db.meta.grid == GRID
    assert len(db) == 10 * (GRID[0] - 1) * (GRID[1] - 2)


def test_databases_from_images_and_from_tokens_through_the_registry(setup):
    model, _, _, _ = setup
    assert isinstance(get_adapter(model, ak.models.ImageTokenizer), GlmImageAdapter)
    square = torch.rand(3, 3, 4 * PATCH, 4 * PATCH, generator=torch.Generator().manual_seed(2)) * 2 - 1
    built = ak.PatchDatabase.build(square, model, progress=False)  # the grid from the images' size: 4 x 4
    adapter = GlmImageAdapter(model, grid=(4, 4))
    latents, tokens = adapter.encode(square)
    assert built.meta.grid == (4, 4) and built.meta.embed_dim == adapter.embed_dim == KEY_DIM
    assert torch.equal(built.keys, ak.PatchDatabase.from_latents(latents, tokens, adapter.codebook()).keys)
    from_tokens = ak.PatchDatabase.from_tokens(tokens, adapter.codebook())
    assert torch.equal(from_tokens.keys, ak.PatchDatabase.build(square, model, key_source="codebook",
                                                                progress=False).keys)


def test_fingerprint_names_the_projection(setup):
    model, adapter, db, _ = setup
    grids = torch.randint(0, CODES, (2, *GRID))
    with pytest.warns(UserWarning, match="different VQ codebook"):  # full keys of the same width as another projection
        ak.PatchDatabase.from_keys(db.keys, db.values, CODES, KEY_DIM, GRID, key_source="latent",
                                   fingerprint=GlmImageAdapter(model, key_dim=None).fingerprint()).check_compatible(adapter)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ak.PatchDatabase.from_tokens(grids, adapter.codebook()).check_compatible(adapter)
        db.check_compatible(adapter)


def test_call_layout_text_to_image_and_image_to_image(setup):
    model, adapter, _, _ = setup
    ids, kwargs = _t2i_inputs()
    assert adapter.generation_grid(ids, **kwargs) == GRID
    assert adapter.image_stream(input_ids=ids, **kwargs).offset == TARGET0
    # image-to-image: one source image in the prompt, only the target grid to generate
    i2i = torch.tensor([[CODES + 3, START, IMAGE, IMAGE, IMAGE, IMAGE, END, CODES + 4, START]])
    i2i_kwargs = dict(image_grid_thw=torch.tensor([[1, 2, 2], [1, *GRID]]), images_per_sample=torch.tensor([2]))
    assert adapter.generation_grid(i2i, **i2i_kwargs) == GRID
    assert adapter.image_stream(input_ids=i2i, **i2i_kwargs).offset == 0
    assert adapter.generation_grid(ids) is None  # no image_grid_thw: not an image call
    with pytest.raises(ValueError, match="different image layouts"):
        adapter.generation_grid(ids, image_grid_thw=torch.tensor([[1, *GRID], [1, 2, 2], [1, 4, 4], [1, 2, 2]]),
                                images_per_sample=torch.tensor([2, 2]))


@pytest.mark.parametrize("do_sample,filters", [(False, {}), (True, {}), (True, dict(temperature=0.8, top_k=5, top_p=0.7))],
                         ids=["greedy", "sampled", "sampled-top-k-top-p"])
def test_patched_lam_zero_equals_hf_generate_and_unpatch_restores(setup, do_sample, filters):
    model, _, db, _ = setup
    check_protocol(GlmImageAdapter(model), LogitsProcessorAdapter)
    plain, ours = plain_and_patched(model, db, ak.DAiDConfig(lam=0.0, k=6),
                                    lambda: _generate(model, do_sample=do_sample, **filters))
    assert torch.equal(ours, plain) and ours.shape == (2, TARGET0 + CELLS)


def test_patched_lam_one_draws_retrieved_tokens_on_the_target_grid_only(setup):
    model, adapter, db, _ = setup
    plain, out = plain_and_patched(model, db, ak.DAiDConfig(lam=1.0, k=4), lambda: _generate(model))
    target = out[:, TARGET0:]
    assert assert_tokens_among_retrieved(target, adapter.codebook(), db, GRID, 4) == 2 * (GRID[0] - 1) * (GRID[1] - 2)
    assert torch.equal(out[:, :TARGET0], plain[:, :TARGET0])  # the preview is the model's own (same seed)
    assert not torch.equal(target, plain[:, TARGET0:])


def test_patched_image_to_image_targets_the_only_generated_grid(setup):
    """Image-to-image: a source image in the prompt (pixel_values), one grid to generate, no preview."""
    model, adapter, db, _ = setup
    source, _ = adapter._pack(torch.rand(1, 3, 2 * PATCH, 2 * PATCH, generator=torch.Generator().manual_seed(3)) * 2 - 1)
    ids = torch.tensor([[CODES + 3, START, IMAGE, IMAGE, IMAGE, IMAGE, END, CODES + 4, START]])
    image_kwargs = dict(pixel_values=source, image_grid_thw=torch.tensor([[1, 2, 2], [1, *GRID]]),
                        images_per_sample=torch.tensor([2]))

    def generate():
        torch.manual_seed(0)
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=CELLS, do_sample=True,
                              suppress_tokens=[START, END], **image_kwargs)[:, ids.shape[1]:]

    plain = generate()
    with ak.patched(model, db, ak.DAiDConfig(lam=0.0, k=4)):
        assert torch.equal(generate(), plain)
    with ak.patched(model, db, ak.DAiDConfig(lam=1.0, k=4)):
        out = generate()
    assert assert_tokens_among_retrieved(out, adapter.codebook(), db, GRID, 4) == (GRID[0] - 1) * (GRID[1] - 2)


def test_patched_generate_keeps_streamer_return_dict_and_num_return_sequences(setup):
    model, _, db, _ = setup

    streamer = CollectingStreamer()
    with ak.patched(model, db, ak.DAiDConfig(lam=0.5, k=4)):
        result = _generate(model, batch=1, return_dict_in_generate=True, output_scores=True, streamer=streamer)
        many = _generate(model, batch=1, num_return_sequences=2)
    tokens = result.sequences[:, 4:]
    assert tokens.shape == (1, TARGET0 + CELLS) and len(result.scores) == TARGET0 + CELLS
    assert torch.allclose(result.scores[TARGET0 + GRID[1] + 1].exp().sum(-1), torch.ones(1), atol=1e-5)  # merged
    assert streamer.chunks[-1] is None and torch.equal(torch.cat(streamer.chunks[1:-1]).view(1, -1), tokens)
    assert many.shape == (2, TARGET0 + CELLS)


def test_refusals(setup):
    model, _, db, _ = setup
    with pytest.raises(ValueError, match="FAiD is not available for GlmImageForConditionalGeneration: .*preview grid"):
        ak.patch_model(model, db, ak.FAiDConfig(k=2), blender_weights={})
    with ak.patched(model, db, ak.DAiDConfig(k=4)) as handle:
        with pytest.raises(ValueError, match="generate\\(loop=...\\) is not available for GlmImage"):
            _generate(model, loop="static")
        with pytest.raises(ValueError, match="generate_images runs the library's decode loop"):
            handle.generate_images(_t2i_inputs()[0])
        with pytest.raises(ValueError, match="disagrees with the target grid"):
            _generate(model, grid=(4, 4))
    full = ak.PatchDatabase.from_tokens(torch.randint(0, CODES, (3, *GRID)), GlmImageAdapter(model, key_dim=None).codebook())
    with pytest.raises(ak.DatabaseError, match="codebook width 128 \\(model: 64\\)"):
        ak.patch_model(model, full, ak.DAiDConfig(k=4))  # the registered adapter projects to 64
    assert not ak.is_patched(model)
