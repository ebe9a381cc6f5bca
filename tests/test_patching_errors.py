"""patch_model and patched generate refuse bad input with one clear error (issue 14: each test pins a
failure reported against an earlier version, named in its docstring)."""

import pytest

import arrag_kernels as ak
from arrag_kernels.models import tiny_janus_config, tiny_prompt_ids


def test_patch_model_with_a_path_instead_of_a_database(tiny_model):
    """Used to raise AttributeError from inside the sampler."""
    with pytest.raises(TypeError, match=r"db: expected an arrag_kernels.PatchDatabase, got str; load it first: "
                                        r"arrag_kernels.PatchDatabase.load\('some/db'\)"):
        ak.patch_model(tiny_model, "some/db", ak.DAiDConfig())
    assert not ak.is_patched(tiny_model)


def test_num_image_tokens_mismatch_raises_only_for_image_generation(tiny_db):
    """transformers' own Janus test config has num_image_tokens != grid**2: patch_model(model) used to raise
    even with no database and for text generation."""
    from transformers import JanusForConditionalGeneration

    config = tiny_janus_config()
    config.vision_config.num_image_tokens = 49  # the VQ grid is 8x8
    model = JanusForConditionalGeneration(config).eval()
    ids = tiny_prompt_ids(1)
    with ak.patched(model):
        out = model.generate(ids, max_new_tokens=2, do_sample=False, bos_token_id=1, pad_token_id=0)
        assert out.shape == (1, ids.shape[1] + 2)
        with pytest.raises(ValueError, match=r"num_image_tokens = 49 .* 8x8 grid \(64 tokens\); set "
                                             r"vision_config.num_image_tokens = 64"):
            model.generate(ids, generation_mode="image", bos_token_id=1, pad_token_id=0,
                           generation_kwargs={"boi_token_id": 100})
    with pytest.raises(ValueError, match="num_image_tokens = 49"):
        ak.patch_model(model, tiny_db, ak.DAiDConfig(k=8))
    assert not ak.is_patched(model)


def test_guidance_below_one_is_refused_in_patched_generate(tiny_model, tiny_db):
    """guidance_scale in (0, 1) used to reach HF's unbatched CFG processor (no model given) and fail deep inside."""
    ids = tiny_prompt_ids(1)
    with ak.patched(tiny_model, tiny_db, ak.DAiDConfig(k=8)):
        with pytest.raises(ValueError, match=r"guidance_scale must be >= 1 for image generation \(1: no CFG\), got 0.5"):
            tiny_model.generate(ids, generation_mode="image", guidance_scale=0.5, bos_token_id=1, pad_token_id=0,
                                generation_kwargs={"boi_token_id": 100})
