"""DAiD on HF Janus through patch_model: exactness, retrieval semantics, restore."""

import math

import pytest
import torch
from transformers import GenerationConfig

import arrag_kernels as ak
from arrag_kernels.models import get_adapter, hf_image_generate_kwargs, tiny_prompt_ids
from tests.janus_reference import teacher_forced_cfg_probs
from tests.oracles import exact_distances, tie_order


def _gen(do_sample, **kw):
    return GenerationConfig(do_sample=do_sample, guidance_scale=5.0, bos_token_id=1, pad_token_id=0,
                            generation_kwargs={"boi_token_id": 100}, **kw)


def _generate(model, ids, do_sample, seed=0, **kw):
    torch.manual_seed(seed)
    return model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=_gen(do_sample, **kw),
                          generation_mode="image", **hf_image_generate_kwargs(model))


@pytest.fixture(scope="module")
def db(tiny_model, tiny_images):
    return ak.PatchDatabase.build(tiny_images, tiny_model, progress=False)


@pytest.mark.parametrize("do_sample", [False, True], ids=["greedy", "sampled"])
def test_lam_zero_reproduces_hf(tiny_model, db, do_sample):
    ids = tiny_prompt_ids(3)
    plain = _generate(tiny_model, ids, do_sample, temperature=0.9 if do_sample else None)
    with ak.patched(tiny_model, db, ak.DAiDConfig(lam=0.0, k=32)):
        ours = _generate(tiny_model, ids, do_sample, temperature=0.9 if do_sample else None)
    assert torch.equal(ours, plain)
    assert not torch.equal(plain[0], plain[1])  # prompts differ, images differ: the check is not vacuous


def test_lam_one_samples_only_retrieved_tokens(tiny_model, db):
    ids = tiny_prompt_ids(2, seed=3)
    k = 5
    with ak.patched(tiny_model, db, ak.DAiDConfig(lam=1.0, k=k)) as handle:
        tokens = _generate(tiny_model, ids, do_sample=True, seed=1)
        daid = handle.daid
    adapter = get_adapter(tiny_model)
    checked = 0
    for step, retrieves in enumerate(daid.retrieves_at):
        if not retrieves:
            continue
        prefix = tokens.clone()
        prefix[:, step:] = -1
        _, retrieved, _ = daid.retrieve(prefix, step)
        for b in range(tokens.shape[0]):
            assert tokens[b, step].item() in retrieved[b].tolist(), f"image {b} step {step}"
            checked += 1
    assert checked == 2 * 42
    # the model alone would not have produced these tokens
    assert not torch.equal(tokens, _generate(tiny_model, ids, do_sample=True, seed=1))
    assert adapter.grid == (8, 8)


def _brute_force_retrieval(db, tokens_row, step, codebook, W, k):
    """Query from explicit neighbour cells, distances by direct differences, order by (d, id)."""
    r, c = divmod(step, W)
    cells = [tokens_row[(r + dr) * W + (c + dc)] for dr, dc in [(-1, -1), (-1, 0), (-1, 1), (0, -1)]]
    q = torch.cat([codebook[int(t)] for t in cells])
    dist, ids = tie_order(exact_distances(q[None], db.keys), k)  # the one oracle: equal distances in id order
    return dist[0].double().tolist(), [int(db.values[i]) for i in ids[0]]


def test_merged_distribution_matches_independent_computation(tiny_model, db):
    """With 0 < lam < 1 the sampled distribution equals (1-lam) softmax(CFG logits) + lam p_ret, computed here
    from a full (uncached) forward of the generated sequence and a brute-force search."""
    lam, tau, k = 0.4, 0.6, 16
    ids = tiny_prompt_ids(2, seed=7)
    recorded = {}
    with ak.patched(tiny_model, db, ak.DAiDConfig(lam=lam, tau=tau, k=k, dedup="nearest")) as handle:
        merge = handle.daid.merge

        def recording_merge(model_probs, tokens, step, hits=None):
            out = merge(model_probs, tokens, step, hits)
            recorded[step] = out.clone()
            return out

        handle.daid.merge = recording_merge
        # top_k=0: HF would otherwise fill in its sampling default top_k=50 before the merge
        tokens = _generate(tiny_model, ids, do_sample=True, seed=2, top_k=0)
    assert len(recorded) == 42

    p_model = teacher_forced_cfg_probs(tiny_model, ids, tokens)
    B = ids.shape[0]
    codebook = get_adapter(tiny_model).codebook()
    for step, got in recorded.items():
        for b in range(B):
            dists, toks = _brute_force_retrieval(db, tokens[b].tolist(), step, codebook, 8, k)
            nearest = {}
            for d, t in zip(dists, toks):
                nearest[t] = min(d, nearest.get(t, math.inf))
            z = sum(math.exp(-d / tau) for d in nearest.values())
            want = (1 - lam) * p_model[b, step]
            for t, d in nearest.items():
                want[t] += lam * math.exp(-d / tau) / z
            err = (got[b].double() - want).abs().max().item()
            assert err < 1e-4, f"step {step} image {b}: max error {err:.2e}"


def test_batch_images_get_their_own_retrieval(tiny_model, db):
    ids = tiny_prompt_ids(3, seed=11)
    with ak.patched(tiny_model, db, ak.DAiDConfig(lam=0.5, k=8)) as handle:
        batched = _generate(tiny_model, ids, do_sample=False)
        single = torch.cat([_generate(tiny_model, ids[i : i + 1], do_sample=False) for i in range(3)])
        step = 9  # (1, 1): first retrieval step
        prefix = batched.clone()
        prefix[:, step:] = -1
        _, retrieved, valid = handle.daid.retrieve(prefix, step)
    assert torch.equal(batched, single)
    assert valid.all()
    assert not torch.equal(retrieved[0], retrieved[1])  # different neighbourhoods, different hits


def test_unpatch_restores_exactly(tiny_model, db):
    before = tiny_model.generate
    assert "generate" not in tiny_model.__dict__
    ids = tiny_prompt_ids(1, seed=4)
    ref = _generate(tiny_model, ids, do_sample=False)
    handle = ak.patch_model(tiny_model, db, ak.DAiDConfig(lam=0.9, k=8))
    assert ak.is_patched(tiny_model)
    assert not torch.equal(_generate(tiny_model, ids, do_sample=False), ref)
    with pytest.raises(RuntimeError, match="already patched"):
        ak.patch_model(tiny_model, db, ak.DAiDConfig())
    ak.unpatch_model(tiny_model)
    handle.remove()  # idempotent
    assert "generate" not in tiny_model.__dict__ and tiny_model.generate == before
    assert torch.equal(_generate(tiny_model, ids, do_sample=False), ref)
    with pytest.raises(RuntimeError, match="not patched"):
        ak.unpatch_model(tiny_model)
    with pytest.raises(ZeroDivisionError):
        with ak.patched(tiny_model, db, ak.DAiDConfig(k=8)):
            1 / 0
    assert not ak.is_patched(tiny_model)


def test_text_mode_is_untouched(tiny_model, db):
    ids = tiny_prompt_ids(1)
    ref = tiny_model.generate(ids, max_new_tokens=4, do_sample=False)
    with ak.patched(tiny_model, db, ak.DAiDConfig(k=8)):
        assert torch.equal(tiny_model.generate(ids, max_new_tokens=4, do_sample=False), ref)


def test_bad_configs(tiny_model, db):
    with pytest.raises(ValueError, match=r"lam: expected a value in \[0, 1\]"):
        ak.DAiDConfig(lam=-0.1)
    with pytest.raises(ValueError, match="tau: expected a temperature > 0"):
        ak.DAiDConfig(tau=0)
    with pytest.raises(ValueError, match="larger than the database"):
        ak.patch_model(tiny_model, db, ak.DAiDConfig(k=len(db) + 1))
    with pytest.raises(ValueError, match="needs? a PatchDatabase"):
        ak.patch_model(tiny_model, None, ak.DAiDConfig())
    with pytest.raises(TypeError, match="supports model types"):
        ak.patch_model(torch.nn.Linear(2, 2), db, ak.DAiDConfig())
    assert not ak.is_patched(tiny_model)


@pytest.mark.parametrize("device", [None, "meta"], ids=["model-device", "moved"])
def test_daid_and_faid_share_one_device_copy(tiny_model, db, monkeypatch, device):
    """DAiD + FAiD in one patch: the database goes to the retrieval device at most once (exactly once when
    it is elsewhere: "meta" stands in for a GPU here) and both retrievers search that one copy."""
    from arrag_kernels.faid import FAiDBlenders, FAiDConfig

    moves = []
    move = ak.PatchDatabase.to
    monkeypatch.setattr(ak.PatchDatabase, "to", lambda self, *a, **kw: moves.append(self) or move(self, *a, **kw))
    faid = FAiDConfig(k=4, blenders=2)
    with ak.patched(tiny_model, db, (ak.DAiDConfig(k=8), faid), device=device,
                    blender_weights=FAiDBlenders.for_model(tiny_model, faid)) as handle:
        shared = handle.daid.db
        assert shared is handle.faid.retriever.db is handle.db
        assert len(moves) == (0 if device is None else 1) and (shared is db) == (device is None)
        assert shared.values.device == torch.device(device or "cpu")
