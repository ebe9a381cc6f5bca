"""The static-buffer decode loop (the CUDA-graph path without the graph) against the HF-exact loop."""

import pytest
import torch
from transformers import GenerationConfig

import arrag_kernels as ak
from arrag_kernels.decoding import StaticKVCache
from arrag_kernels.models import tiny_prompt_ids
from tests.janus_reference import teacher_forced_cfg_probs
from tests.utils import daid_graph_decode_without_host_sync


def _gen(do_sample, **kw):
    return GenerationConfig(do_sample=do_sample, guidance_scale=5.0, bos_token_id=1, pad_token_id=0,
                            generation_kwargs={"boi_token_id": 100}, **kw)


@pytest.fixture(scope="module")
def db(tiny_model, tiny_images):
    return ak.PatchDatabase.build(tiny_images, tiny_model, progress=False)


def _left_padded_prompts():
    ids = tiny_prompt_ids(3, length=7, seed=5)
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0  # shorter prompts, left-padded
    ids[2, :4], mask[2, :4] = 0, 0
    ids[1, 2], ids[2, 4] = 1, 1  # BOS after the padding
    return ids, mask


@pytest.mark.parametrize("daid", [False, True], ids=["plain", "daid"])
@pytest.mark.parametrize("top_k", [0, 20], ids=["fused-cfg", "hf-processors"])
def test_static_greedy_equals_dynamic(tiny_model, db, daid, top_k):
    ids, mask = _left_padded_prompts()
    cfg = ak.DAiDConfig(lam=0.5, k=16) if daid else None
    with ak.patched(tiny_model, db if daid else None, cfg) as handle:
        gen = _gen(False, top_k=top_k)
        dynamic = handle.generate_images(ids, attention_mask=mask, generation_config=gen)
        static = handle.generate_images(ids, attention_mask=mask, generation_config=gen, loop="static")
    assert torch.equal(static, dynamic)


@pytest.mark.parametrize("loop", ["static"] + (["cuda-graph"] if torch.cuda.is_available() else []))
def test_overlap_retrieval_gives_identical_tokens(tiny_images, loop):
    """DAiD retrieval on a side stream (CUDA) or inline (CPU, where the option is a no-op): same tokens."""
    from arrag_kernels.models import tiny_janus

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = tiny_janus(seed=0).to(device)
    db = ak.PatchDatabase.build(tiny_images, model, progress=False)
    ids = tiny_prompt_ids(2, seed=3).to(device)
    with ak.patched(model, db, ak.DAiDConfig(lam=0.5, k=16)) as handle:
        for do_sample in (False, True):
            gen = _gen(do_sample, top_k=0)
            torch.manual_seed(0)
            inline = handle.generate_images(ids, generation_config=gen, loop=loop)
            torch.manual_seed(0)
            overlapped = handle.generate_images(ids, generation_config=gen, loop=loop, overlap_retrieval=True)
            assert torch.equal(overlapped, inline), f"do_sample={do_sample}"


@pytest.mark.parametrize("loop", ["dynamic", "static"])
def test_decode_stats_for_every_loop(tiny_model, db, loop):
    """DecodeStats fills for every loop (one entry per step, the prefill included) without changing the tokens;
    the dynamic loop retrieves at the 42 retrieval positions, the static one every step (valid masks the rest)."""
    ids = tiny_prompt_ids(2, seed=5)
    gen = _gen(True, top_k=0)
    with ak.patched(tiny_model, db, ak.DAiDConfig(lam=0.5, k=8)) as handle:
        torch.manual_seed(3)
        plain = handle.generate_images(ids, generation_config=gen, loop=loop)
        stats = ak.DecodeStats()
        torch.manual_seed(3)
        timed = handle.generate_images(ids, generation_config=gen, loop=loop, stats=stats)
    assert torch.equal(timed, plain)
    assert stats.steps == len(stats.step_s) == 64 and stats.total_s == pytest.approx(sum(stats.step_s))
    assert stats.retrieval_steps == (42 if loop == "dynamic" else 64)
    assert 0 < stats.retrieval_s < stats.total_s


def test_static_sampling_is_inverse_cdf_of_the_model_distribution(tiny_model):
    ids = tiny_prompt_ids(2, seed=9)
    with ak.patched(tiny_model) as handle:
        torch.manual_seed(4)
        tokens = tiny_model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=_gen(True, top_k=0),
                                     generation_mode="image", loop="static")
    torch.manual_seed(4)
    uniforms = torch.rand(64, 2)  # the loop draws (num_tokens, B) uniforms first thing
    probs = teacher_forced_cfg_probs(tiny_model, ids, tokens)
    cdf = probs.cumsum(-1)
    for b in range(2):
        for i in range(64):
            t = int(tokens[b, i])
            target = uniforms[i, b].item() * cdf[b, i, -1].item()
            low = cdf[b, i, t - 1].item() if t > 0 else 0.0
            assert low - 1e-5 <= target <= cdf[b, i, t].item() + 1e-5, f"image {b} step {i}: token {t}"
    assert len(set(tokens.flatten().tolist())) > 20  # sampled, not a constant


def test_static_cache_writes_at_device_position():
    cache = StaticKVCache(num_layers=2, batch=1, kv_heads=1, head_dim=2, max_len=5, dtype=torch.float32, device="cpu")
    cache.write_pos = torch.tensor([3])
    k, v = cache.update(torch.ones(1, 1, 1, 2), 2 * torch.ones(1, 1, 1, 2), 1)
    assert k[0, 0, :, 0].tolist() == [0, 0, 0, 1, 0] and v[0, 0, 3].tolist() == [2, 2]
    assert cache.keys[0].abs().sum() == 0


def test_loop_option_errors(tiny_model):
    ids = tiny_prompt_ids(1)
    with ak.patched(tiny_model) as handle:
        with pytest.raises(ValueError, match="loop: expected one of"):
            handle.generate_images(ids, generation_config=_gen(False), loop="fast")
        with pytest.raises(ValueError, match="needs CUDA tensors"):
            handle.generate_images(ids, generation_config=_gen(False), loop="cuda-graph")
        with pytest.raises(ValueError, match="overlap_retrieval needs loop="):
            handle.generate_images(ids, generation_config=_gen(False), overlap_retrieval=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_replay_equals_static_without_host_sync(tiny_images):
    from arrag_kernels.models import tiny_janus

    model = tiny_janus(seed=0).cuda()
    db = ak.PatchDatabase.build(tiny_images, model, progress=False)
    ids = tiny_prompt_ids(2, seed=3).cuda()
    with ak.patched(model, db, ak.DAiDConfig(lam=0.5, k=16)) as handle:
        for do_sample in (False, True):
            gen = _gen(do_sample, top_k=0)
            torch.manual_seed(0)
            static = handle.generate_images(ids, generation_config=gen, loop="static")
            torch.manual_seed(0)
            graphed = handle.generate_images(ids, generation_config=gen, loop="cuda-graph")
            assert torch.equal(graphed, static), f"do_sample={do_sample}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("overlap", [False, True], ids=["inline", "overlap"])
def test_cuda_graph_decode_steps_never_synchronise(tiny_images, overlap):
    """Replays run with torch's sync debug mode set to error: any host synchronisation raises."""
    tokens = daid_graph_decode_without_host_sync(tiny_images, ak.DAiDConfig(lam=0.5, k=16), overlap)
    assert (tokens >= 0).all()
