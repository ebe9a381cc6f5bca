"""Evaluation metrics against known values: Frechet distance, precision/recall, FWD, NLL, Fig. 6."""

import math

import pytest
import torch
import torch.nn.functional as F

from arrag_kernels import DAiDConfig, DatabaseError, KeyLayout, PatchDatabase
from arrag_kernels.eval.features import extract, load_extractor
from arrag_kernels.eval.metrics import frechet_distance, frechet_distance_from_stats, fwd, precision_recall
from arrag_kernels.eval.nll import image_nll
from arrag_kernels.eval.retrieval import retrieval_accuracy
from arrag_kernels.eval.sweep import best_cell, save_heatmap, sweep_grid
from arrag_kernels.models import get_adapter, tiny_janus, tiny_prompt_ids
from arrag_kernels.ops import feature_neighbor_keys, retrieval_positions
from arrag_kernels.retrieval import DatabaseMeta

# ---- Frechet distance ------------------------------------------------------------------------


def test_frechet_identical_sets_is_zero():
    x = torch.randn(97, 5, generator=torch.Generator().manual_seed(0))
    assert abs(frechet_distance(x, x.clone())) < 1e-9


def test_frechet_two_gaussians_closed_form():
    # Diagonal covariances: FD = |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2.
    mu1, mu2 = torch.tensor([0.0, 1.0, -2.0]), torch.tensor([1.0, 1.0, 0.5])
    a, b = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([9.0, 1.0, 0.25])
    expected = float((mu1 - mu2).square().sum() + (a.sqrt() - b.sqrt()).square().sum())
    assert frechet_distance_from_stats(mu1, torch.diag(a), mu2, torch.diag(b)) == pytest.approx(expected, abs=1e-10)
    # Non-commuting full covariances: against Tr(S1 + S2 - 2 sqrtm(S1 S2)) with scipy's sqrtm.
    linalg = pytest.importorskip("scipy.linalg")
    g = torch.Generator().manual_seed(1)
    A, B = torch.randn(4, 4, generator=g, dtype=torch.float64), torch.randn(4, 4, generator=g, dtype=torch.float64)
    s1, s2 = A @ A.T + 0.1 * torch.eye(4, dtype=torch.float64), B @ B.T
    ref = float(s1.trace() + s2.trace() - 2 * linalg.sqrtm((s1 @ s2).numpy()).real.trace()) + 1.0
    got = frechet_distance_from_stats(torch.zeros(4), s1, torch.tensor([1.0, 0, 0, 0]), s2)
    assert got == pytest.approx(ref, rel=1e-8)


def test_frechet_from_samples_approaches_closed_form():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(20000, 2, generator=g, dtype=torch.float64)
    y = torch.randn(20000, 2, generator=g, dtype=torch.float64) * 2 + torch.tensor([3.0, 0.0], dtype=torch.float64)
    # |mu|^2 = 9, covariances I and 4I: 2 * (1 - 2)^2 = 2
    assert frechet_distance(x, y) == pytest.approx(11.0, rel=0.03)


def test_frechet_bad_input():
    with pytest.raises(ValueError, match="same per-sample shape"):
        frechet_distance(torch.randn(10, 4), torch.randn(10, 5))
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(torch.randn(1, 4), torch.randn(10, 4))


# ---- precision / recall, FWD ------------------------------------------------------------------


def test_precision_recall_known_cases():
    g = torch.Generator().manual_seed(3)
    real = torch.randn(63, 3, generator=g)
    assert precision_recall(real, real.clone()) == {"precision": 1.0, "recall": 1.0, "k": 3}
    far = precision_recall(real, real + 100.0)
    assert far["precision"] == 0.0 and far["recall"] == 0.0
    # Fakes collapsed onto one real point: all fakes inside the real manifold, few real points covered.
    collapsed = precision_recall(real, real[:1].repeat(20, 1) + 1e-6 * torch.randn(20, 3, generator=g))
    assert collapsed["precision"] == 1.0 and collapsed["recall"] <= 1 / 63 + 1e-9


def test_fwd_identical_zero_and_shift_positive():
    pytest.importorskip("pytorchfwd")
    g = torch.Generator().manual_seed(4)
    x = torch.rand(40, 3, 16, 16, generator=g) * 2 - 1
    assert abs(fwd(x, x.clone(), max_level=2)) < 1e-6
    assert fwd(x, (x * 0.5).clamp(-1, 1), max_level=2) > 1e-3


def test_fwd_bad_input():
    pytest.importorskip("pytorchfwd")
    with pytest.raises(ValueError, match="same per-sample shape"):
        fwd(torch.zeros(4, 3, 16, 16), torch.zeros(4, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\(n, 3, S, S\)"):
        fwd(torch.zeros(4, 16, 16, 3), torch.zeros(4, 16, 16, 3))


def test_extractor_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="cannot be downloaded here"):
        load_extractor(f"torchscript:{tmp_path / 'inception.pt'}")
    with pytest.raises(ValueError, match="miniature"):
        load_extractor("inception")
    with pytest.raises(ValueError, match="permute"):
        extract(torch.nn.Identity(), torch.zeros(2, 8, 8, 3))


# ---- NLL and Fig. 6 on a toy model and a hand-made database -----------------------------------


@pytest.fixture(scope="module")
def toy():
    """Tiny random Janus, random ground-truth tokens and a database made by hand from them.

    Entry per (image, retrieval position): key = the codebook vectors of the position's true
    neighbours (exactly the decode-time query), value = the true token; a second entry with the
    key shifted by 0.01 holds the next code ``(t + 1) % V``.
    """
    model = tiny_janus(seed=0)
    adapter = get_adapter(model)
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, adapter.codebook_size, (2, 64), generator=g)
    prompts = tiny_prompt_ids(2, seed=1)
    layout = KeyLayout()
    cb = adapter.codebook().float()
    keys, valid = feature_neighbor_keys(cb[tokens].view(2, 8, 8, -1), layout)
    k = keys[:, valid].reshape(-1, keys.shape[-1])
    v = tokens[:, valid].reshape(-1)
    meta = DatabaseMeta(layout=layout, codebook_size=adapter.codebook_size, embed_dim=adapter.embed_dim,
                        grid=adapter.grid, key_source="codebook", model_fingerprint=adapter.fingerprint(), num_images=2)
    db = PatchDatabase(torch.cat([k, k + 0.01]), torch.cat([v, (v + 1) % adapter.codebook_size]), meta)
    return model, adapter, prompts, tokens, db


def _hand_nll(model, prompts, tokens):
    """-log p(t_j | prompt, t_<j) with one uncached forward per position (no shared teacher-forced pass)."""
    out = torch.zeros(tokens.shape, dtype=torch.float64)
    with torch.no_grad():
        for b in range(tokens.shape[0]):
            for j in range(tokens.shape[1]):
                embeds = [model.get_input_embeddings()(prompts[b : b + 1])]
                if j:
                    embeds.append(model.prepare_embeddings_for_image_generation(tokens[b : b + 1, :j]))
                h = model.model.language_model(inputs_embeds=torch.cat(embeds, 1), use_cache=False).last_hidden_state
                logp = torch.log_softmax(model.model.generation_head(h[:, -1]).double(), -1)
                out[b, j] = -logp[0, tokens[b, j]]
    return out


def test_nll_matches_hand_computation(toy):
    model, adapter, prompts, tokens, db = toy
    hand = _hand_nll(model, prompts, tokens)
    plain = image_nll(model, prompts, tokens, batch_size=2)
    torch.testing.assert_close(plain.nll.double(), hand, atol=2e-5, rtol=1e-5)
    assert plain.summary()["nll_all"] == pytest.approx(float(hand.mean()), abs=1e-5)
    # DAiD, k = 1: the nearest entry is the exact key holding the true token, so p_ret is one-hot on it
    # and p(t_j) = (1 - lam) p_model(t_j) + lam at retrieval positions, p_model(t_j) elsewhere.
    lam = 0.3
    daid = image_nll(model, prompts, tokens, db, DAiDConfig(lam=lam, tau=0.6, k=1))
    ret = retrieval_positions(adapter.grid, db.meta.layout)
    expected = torch.where(ret, -torch.log((1 - lam) * torch.exp(-hand) + lam), hand)
    torch.testing.assert_close(daid.nll.double(), expected, atol=2e-5, rtol=1e-5)
    s = daid.summary()
    assert s["nll_retrieval"] == pytest.approx(float(expected[:, ret].mean()), abs=1e-5)
    assert s["nll_non_retrieval"] == pytest.approx(float(hand[:, ~ret].mean()), abs=1e-5)


def _hand_faid_nll(model, adapter, prompts, tokens, db, blenders):
    """-log p(t_j) through the decode-time FAiD runtime (ring buffers, composed blenders) in a
    KV-cached step loop fed the ground truth: an independent path from the trainer's forward."""
    from arrag_kernels.decoding import FAiDRuntime

    runtime = FAiDRuntime(model, adapter, db, blenders)
    out = torch.zeros(tokens.shape, dtype=torch.float64)
    try:
        with torch.no_grad():
            for b in range(tokens.shape[0]):
                grid = torch.full((1, tokens.shape[1]), -1, dtype=torch.long)
                cache = adapter.new_cache()
                embeds = model.get_input_embeddings()(prompts[b : b + 1])
                length = embeds.shape[1]
                for j in range(tokens.shape[1]):
                    runtime.begin_step(grid, j)
                    h = adapter.step(embeds, torch.ones(1, length, dtype=torch.long), cache)
                    out[b, j] = -torch.log_softmax(adapter.image_logits(h).double(), -1)[0, tokens[b, j]]
                    grid[0, j] = tokens[b, j]
                    embeds = adapter.embed_image_tokens(tokens[b : b + 1, j : j + 1])
                    length += 1
    finally:
        runtime.remove()
    return out


def test_faid_nll_matches_cached_decode_runtime(toy):
    from arrag_kernels.faid import FAiDBlenders, FAiDConfig

    model, adapter, prompts, tokens, db = toy
    torch.manual_seed(7)
    blenders = FAiDBlenders.for_model(model, FAiDConfig(k=2, hops=(1, 2), blenders=2))
    with torch.no_grad():  # large enough to move the distribution visibly
        for p in blenders.parameters():
            p.normal_(0, 0.1)
    hand = _hand_faid_nll(model, adapter, prompts, tokens, db, blenders)
    flags = [p.requires_grad for p in [*model.parameters(), *blenders.parameters()]]
    got = image_nll(model, prompts, tokens, db, blenders=blenders)
    torch.testing.assert_close(got.nll.double(), hand, atol=5e-5, rtol=1e-5)
    assert (got.nll.double() - _hand_nll(model, prompts, tokens)).abs().max() > 1e-2  # FAiD changed something
    assert [p.requires_grad for p in [*model.parameters(), *blenders.parameters()]] == flags  # flags left alone
    with pytest.raises(ValueError, match="db together with daid"):
        image_nll(model, prompts, tokens, blenders=blenders)


def test_nll_cfg(toy):
    model, _, prompts, tokens, _ = toy
    plain = image_nll(model, prompts, tokens)
    # w = 1 is the conditional distribution; w = 0 the unconditional one (prompt padded but BOS / BOI)
    torch.testing.assert_close(image_nll(model, prompts, tokens, guidance_scale=1.0).nll, plain.nll)
    uncond = prompts.clone()
    uncond[:, 1:-1] = 0
    torch.testing.assert_close(image_nll(model, prompts, tokens, guidance_scale=0.0).nll,
                               image_nll(model, uncond, tokens).nll, atol=1e-5, rtol=1e-5)


def test_nll_bad_input(toy):
    model, _, prompts, tokens, db = toy
    with pytest.raises(ValueError, match="empty"):
        image_nll(model, prompts[:0], tokens[:0])
    with pytest.raises(ValueError, match=r"\(B, 64\)"):
        image_nll(model, prompts, tokens[:, :10])
    with pytest.raises(ValueError, match="db together with daid"):
        image_nll(model, prompts, tokens, db=db)


def test_fig6_curve_on_hand_made_database(toy):
    model, adapter, _, tokens, db = toy
    curve = retrieval_accuracy(model, db, tokens, k=2)
    cb = adapter.codebook().float()
    ret = retrieval_positions(adapter.grid, db.meta.layout)
    t = tokens[:, ret]
    assert curve["positions"] == t.numel()
    assert curve["l2"][0] == pytest.approx(0.0, abs=1e-6)  # rank 1: the true token itself
    second = (cb[t] - cb[(t + 1) % adapter.codebook_size]).norm(dim=-1).mean()
    assert curve["l2"][1] == pytest.approx(float(second), rel=1e-5)
    assert 1.0 < curve["random_l2"] < 1.6  # random unit vectors in 8-d: about sqrt(2)


def test_fig6_model_database_mismatch(toy):
    _, _, _, _, db = toy
    other = tiny_janus(seed=0, grid=4)
    with pytest.raises(DatabaseError, match="another model"):
        retrieval_accuracy(other, db, torch.zeros(1, 16, dtype=torch.long))


def test_sweep_choice_and_heatmap(tmp_path):
    pytest.importorskip("matplotlib")
    sweep = sweep_grid(lambda lam, tau: {"m": (lam - 0.1) ** 2 + tau}, [0.0, 0.1, 0.2], [0.5, 1.0], progress=False)
    best = best_cell(sweep, "m")
    assert (best["lam"], best["tau"]) == (0.1, 0.5)
    assert save_heatmap(sweep, "m", tmp_path / "h.png").stat().st_size > 0
    with pytest.raises(ValueError, match="non-empty"):
        sweep_grid(lambda a, b: {}, [], [1.0])


def test_cosine_vq_argmin_agrees_with_hf_quantizer():
    """Stored-normalised codebook rows: HF's L2 argmin picks the max-cosine row the trainer used."""
    from arrag_kernels.miniature.train import _quantize

    model = tiny_janus(seed=0)
    vq = model.model.vqmodel
    with torch.no_grad():
        vq.quantize.embedding.weight.copy_(F.normalize(vq.quantize.embedding.weight, dim=1))
        z = torch.randn(2, 8, 8, 8, generator=torch.Generator().manual_seed(6))
        _, _, ours = _quantize(vq, z)
        _, _, hf = vq.quantize(F.normalize(z, dim=1))
    assert torch.equal(ours, hf)
    assert math.isclose(float(vq.quantize.embedding.weight.detach().norm(dim=1).mean()), 1.0, rel_tol=1e-6)
