"""Masked (MaskGIT / Show-o style) decoding with DAiD and FAiD at every unknown cell."""

import math

import pytest
import torch

import arrag_kernels as ak
from arrag_kernels._ext import HAS_EXT
from arrag_kernels.faid import FAiDBlenders, FAiDLayer, blend_dense
from arrag_kernels.masked import (MaskedDAiD, MaskedDecodeConfig, MaskedDecodeStats, MaskedFAiD, MaskedRetriever,
                                  TinyMaskGITAdapter, blend_full, blend_full_literal, masked_decode, masked_positions,
                                  sample_cells, tiny_maskgit, token_database, train_masked_faid, train_maskgit)
from arrag_kernels.models import codebook_fingerprint
from arrag_kernels.ops import retrieval_distribution_ref
from arrag_kernels.retrieval import DatabaseError
from tests.oracles import admissible, exact_distances
from tests.utils import assert_close

FULL = ak.KeyLayout("full", 1, "zero")
OFFSETS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))  # UL U UR L R LL Lo LR


@pytest.fixture(scope="module")
def gen():
    return tiny_maskgit(seed=0)  # 8 x 8 grid, 512 codes, hidden 64, 2 layers


@pytest.fixture(scope="module")
def grids():
    return torch.randint(0, 512, (48, 8, 8), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def db(gen, grids):
    return token_database(grids[:32], gen)  # the last 16 grids are FAiD training data


class _Counting:
    """Wraps ``retriever.db.retrieve`` to record every search (queries as sent)."""

    def __init__(self, retriever):
        self.calls = []
        original = retriever.db.retrieve

        def retrieve(queries, k):
            self.calls.append(queries.clone())
            with ak.use_backend("reference"):
                return original(queries, k)

        retriever.db.retrieve = retrieve


def _rng(seed=5):
    return torch.Generator().manual_seed(seed)


# ---- schedule -----------------------------------------------------------------------------------
def test_cosine_schedule_counts():
    cfg = MaskedDecodeConfig(steps=8)
    counts = cfg.masked_counts(64)
    assert counts[0] == 64 and counts[-1] == 0 and len(counts) == 9
    assert counts[1:-1] == [math.floor(64 * math.cos(math.pi / 2 * (t + 1) / 8)) for t in range(7)]
    assert all(a > b for a, b in zip(counts, counts[1:]))
    assert [cfg.retrieves_at(t) for t in range(8)] == [False] * 4 + [True] * 4  # default: the final half
    with pytest.raises(ValueError, match="exceeds the 16 cells"):
        MaskedDecodeConfig(steps=17).masked_counts(16)
    with pytest.raises(ValueError, match="start_fraction"):
        MaskedDecodeConfig(start_fraction=1.5)


# ---- keys ---------------------------------------------------------------------------------------
class _HandGenerator:
    """Grid 4 x 5, codebook row t = (t, -t): every key cell can be traced to its token id."""

    grid = (4, 5)
    codebook_size = 40
    embed_dim = 2

    def codebook(self):
        t = torch.arange(self.codebook_size, dtype=torch.float32)
        return torch.stack([t, -t], 1)

    def fingerprint(self):
        return codebook_fingerprint(self.codebook())


# The masked path runs on CPU tensors here, so Triton means the interpreter; on a CUDA machine (no
# interpreter) the compiled neighbor_keys / daid_sample kernels are checked by test_neighbor_keys.py
# and test_daid.py.
BACKENDS = ["reference",
            pytest.param("triton", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter only (CPU)")),
            pytest.param("cpp", marks=pytest.mark.skipif(not HAS_EXT, reason="no C++ extension"))]


@pytest.mark.parametrize("backend", BACKENDS)
def test_keys_follow_8_neighbour_order_with_zero_padding(backend):
    hand = _HandGenerator()
    H, W = hand.grid
    tokens = (torch.arange(H * W) + 1).reshape(1, H * W).repeat(2, 1)  # token of (r, c) = r*W + c + 1
    unknown = [[0, 7, 8, 13], [1, 7, 12, 19]]  # flat cells; both rows have 4 unknown cells
    for b, cells in enumerate(unknown):
        tokens[b, cells] = -1
    db = token_database(torch.randint(1, 40, (3, H, W), generator=_rng()), hand)
    retriever = MaskedRetriever(db, 2, hand)
    counter = _Counting(retriever)
    positions = torch.tensor(unknown)
    with ak.use_backend(backend):
        retriever.retrieve(tokens, positions)
    assert len(counter.calls) == 1 and counter.calls[0].shape == (2 * 4, 8 * 2)  # ONE search of B * P cells
    queries = counter.calls[0].view(2, 4, 8, 2)
    for b in range(2):
        for j, p in enumerate(unknown[b]):
            r, c = divmod(p, W)
            expected = []
            for dr, dc in OFFSETS:
                rr, cc = r + dr, c + dc
                inside = 0 <= rr < H and 0 <= cc < W
                expected.append(int(tokens[b, rr * W + cc]) if inside and tokens[b, rr * W + cc] >= 0 else 0)
            assert queries[b, j, :, 0].long().tolist() == expected, (b, p)
            assert queries[b, j, :, 1].long().tolist() == [-x for x in expected]
    # corner (0, 0) of image 0: only R, Lo, LR are inside; R = (0, 1) is known, Lo = (1, 0) known, LR = (1, 1) known
    assert queries[0, 0, :, 0].long().tolist() == [0, 0, 0, 0, 2, 0, 6, 7]
    # (1, 3) of image 0: LR = (2, 4) -> cell 14 known; Lo = (2, 3) = cell 13 unknown -> zero; L = (1, 2) = cell 7 unknown
    assert queries[0, 2, :, 0].long().tolist() == [3, 4, 5, 0, 10, 13, 0, 15]


def test_causal_database_is_refused(gen, grids):
    causal = token_database(grids[:4], gen, ak.KeyLayout("causal", 1, "zero"))
    with pytest.raises(DatabaseError, match="neighborhood='full'"):
        MaskedRetriever(causal, 4, gen)


# ---- DAiD ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dedup", ["nearest", "sum"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_cell_sampling_equals_per_cell_formula(gen, grids, backend, dedup):
    """sample_cells (daid_sample on B*P rows + the drawn token's probability) against the merge formula
    applied cell by cell and an inverse-CDF draw, with cells whose key is invalid (border 'skip')
    keeping the model distribution."""
    db = token_database(grids[:8], gen, ak.KeyLayout("full", 1, "skip"))
    cfg = ak.DAiDConfig(lam=0.3, tau=0.7, k=9, dedup=dedup)
    daid = MaskedDAiD(db, cfg, gen)
    g = _rng(1)
    B, P, V, T = 3, 5, 512, 0.9
    tokens = grids[40:43].reshape(B, -1).clone()
    positions = torch.stack([torch.randperm(64, generator=g)[:P] for _ in range(B)])
    tokens.scatter_(1, positions, -1)
    logits = torch.randn(B * P, V, generator=g) * 3
    u = torch.rand(B * P, generator=g)
    dist, ids, valid = (x.reshape(B * P, -1).squeeze(-1) for x in daid.retrieve(tokens, positions))
    assert 0 < int(valid.sum()) < valid.numel()  # both kinds of cells are covered
    with ak.use_backend(backend):
        got, prob = sample_cells(logits, u, T, (dist, ids, valid), cfg)
        plain, plain_prob = sample_cells(logits, u, T)
    p_model = torch.softmax(logits / T, -1)
    for row in range(B * P):
        p = p_model[row]
        if valid[row]:
            p = (1 - cfg.lam) * p + cfg.lam * retrieval_distribution_ref(dist[row][None], ids[row][None], V, cfg.tau, dedup)[0]
        cdf = p.cumsum(0)
        expected = min(int(torch.searchsorted(cdf, u[row] * cdf[-1], right=True)), V - 1)
        assert int(got[row]) == expected, row
        assert_close(prob[row], p[expected], what=f"merged probability, row {row}")
        plain_expected = min(int(torch.searchsorted(p_model[row].cumsum(0), u[row], right=True)), V - 1)
        assert int(plain[row]) == plain_expected
        assert_close(plain_prob[row], p_model[row, plain_expected], what=f"model probability, row {row}")


@pytest.mark.parametrize("start_fraction", [0.0, 0.5])
def test_lam0_equals_plain_sampler(gen, db, start_fraction):
    cfg = MaskedDecodeConfig(steps=8, start_fraction=start_fraction)
    labels = torch.tensor([0, 3, 7])
    plain = masked_decode(gen, labels, cfg, rng=_rng())
    daid = MaskedDAiD(db, ak.DAiDConfig(lam=0.0, k=16), gen)
    with_daid = masked_decode(gen, labels, cfg, daid=daid, rng=_rng())
    assert daid.searches == 8 - cfg.first_retrieval_step > 0
    assert torch.equal(plain, with_daid)
    assert bool((plain >= 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_lam0_equals_plain_sampler_per_backend(backend):
    """The same on a 3 x 3 grid with 64 codes, keys and the fused merge + draw forced to one backend
    (Triton: interpreted; the search itself runs the reference to keep the test fast)."""
    small = tiny_maskgit(seed=2, grid=(3, 3), codebook_size=64, dim=32, num_layers=1)
    daid = MaskedDAiD(token_database(torch.randint(0, 64, (20, 3, 3), generator=_rng(6)), small),
                      ak.DAiDConfig(lam=0.0, k=8), small)
    _Counting(daid)
    cfg = MaskedDecodeConfig(steps=3, start_fraction=0.0)
    labels = torch.tensor([1, 2])
    with ak.use_backend(backend):
        plain = masked_decode(small, labels, cfg, rng=_rng())
        with_daid = masked_decode(small, labels, cfg, daid=daid, rng=_rng())
    assert daid.searches == 3
    assert torch.equal(plain, with_daid)


def _brute_force_allowed(db, query, k):
    """Token ids of the entries a correct top-k may return (the oracle's tie rule), by direct L2."""
    allowed = admissible(exact_distances(query[None], db.keys), k, atol=1e-4, rtol=0)[0]
    return set(db.values[allowed].tolist())


def test_lam1_tokens_come_from_retrieval(gen, db):
    k = 6
    cfg = MaskedDecodeConfig(steps=8)  # retrieval at steps 4..7
    codebook = gen.codebook()
    history = []
    daid = MaskedDAiD(db, ak.DAiDConfig(lam=1.0, tau=0.5, k=k), gen)
    tokens = masked_decode(gen, torch.tensor([1, 2]), cfg, daid=daid, rng=_rng(), history=history)
    assert torch.equal(history[-1], tokens)
    H, W = gen.grid
    checked = 0
    for t in range(cfg.first_retrieval_step, cfg.steps):
        before, after = history[t - 1], history[t]
        for b, p in ((before < 0) & (after >= 0)).nonzero().tolist():
            r, c = divmod(p, W)
            cells = []
            for dr, dc in OFFSETS:
                rr, cc = r + dr, c + dc
                known = 0 <= rr < H and 0 <= cc < W and before[b, rr * W + cc] >= 0
                cells.append(codebook[before[b, rr * W + cc]] if known else torch.zeros(gen.embed_dim))
            assert int(after[b, p]) in _brute_force_allowed(db, torch.cat(cells), k), (t, b, p)
            checked += 1
    assert checked == 2 * cfg.masked_counts(64)[cfg.first_retrieval_step]  # every cell unmasked in the final half


@pytest.mark.parametrize("start_fraction,first", [(0.0, 0), (0.5, 4), (0.6, 5), (1.0, 8)])
def test_schedule_gate_counts_searches(gen, db, start_fraction, first):
    cfg = MaskedDecodeConfig(steps=8, start_fraction=start_fraction)
    B = 2
    daid = MaskedDAiD(db, ak.DAiDConfig(lam=0.05, k=8), gen)
    counter = _Counting(daid)
    stats = MaskedDecodeStats()
    masked_decode(gen, torch.tensor([4, 5]), cfg, daid=daid, rng=_rng(), stats=stats)
    counts = cfg.masked_counts(64)
    assert [q.shape[0] for q in counter.calls] == [B * counts[t] for t in range(first, 8)]  # one search per step
    assert stats.retrieval_steps == list(range(first, 8))


# ---- FAiD ---------------------------------------------------------------------------------------
def _literal_by_hand(layer, context, retrieved, b, r, c):
    """hhat_k of cell (r, c) with explicit loops: window cells copied one by one, zeros outside."""
    blender = layer.blender
    _, H, W, D = context.shape
    out = 0.0
    for a, h in zip(blender.hop_mix(), blender.hops):
        n = 2 * h + 1
        win = torch.zeros(retrieved.shape[2], D, n, n)
        for i in range(n):
            for j in range(n):
                rr, cc = r + i - h, c + j - h
                if 0 <= rr < H and 0 <= cc < W:
                    win[:, :, i, j] = context[b, rr, cc]
        win[:, :, h, h] = retrieved[b, r * W + c]
        conv_a, conv_b = blender.hop_convs(h)
        out = out + a * conv_b(conv_a(win)).flatten(1)
    return out


@pytest.mark.parametrize("hops", [(1,), (2,), (1, 2)], ids=["h1", "h2", "h12"])
@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_faid_all_positions_fast_equals_literal(hops, reduce):
    torch.manual_seed(0)
    B, H, W, D, K = 2, 5, 7, 12, 3
    layer = FAiDLayer(D, hops)
    if len(hops) > 1:  # a single-hop blender has no hop weights (as the official one)
        with torch.no_grad():
            layer.blender.conv_weights.copy_(torch.randn(len(hops)))
    known = torch.rand(B, H, W, 1) < 0.6
    context = torch.randn(B, H, W, D) * known  # zeros at unknown cells
    retrieved = torch.randn(B, H * W, K, D) * (~known).reshape(B, H * W, 1, 1)  # features at unknown cells only
    with torch.no_grad():
        lit_blend, lit_w = blend_full_literal(layer, context, retrieved, reduce)
        fast_blend, fast_w = blend_full(layer, context, retrieved, reduce)
        for b, r, c in [(0, 0, 0), (1, 2, 3), (1, 4, 6), (0, 3, 1)]:
            hhat = _literal_by_hand(layer, context, retrieved, b, r, c)
            weighted = torch.sigmoid(layer.blender.mlp(hhat)) * hhat
            assert_close(lit_w[b, r * W + c], weighted, what=f"literal vs by hand at {(b, r, c)}")
    assert_close(fast_w, lit_w, what="weighted candidates")
    assert_close(fast_blend, lit_blend, what="blended")
    scale = 1.0 if reduce == "sum" else 1.0 / K
    assert_close(lit_blend, lit_w.sum(2) * scale, what="reduction")


@pytest.mark.parametrize("hops", [(1,), (1, 2)], ids=["h1", "h12"])
def test_masked_blender_equals_the_causal_one_on_a_raster_prefix(hops):
    """Where both apply they agree: a masked grid whose known cells are those before p in raster
    order is the AR state at p, so the full-window blend at p is the causal blend at p (mean)."""
    torch.manual_seed(3)
    B, H, W, D, K = 2, 5, 6, 12, 3
    layer = FAiDLayer(D, hops)
    if len(hops) > 1:
        with torch.no_grad():
            layer.blender.conv_weights.copy_(torch.randn(len(hops)))
    context = torch.randn(B, H, W, D)
    retrieved = torch.randn(B, H * W, K, D)
    with torch.no_grad():
        causal_blend, causal_w = blend_dense(layer, context, retrieved)  # every target, causal windows
        for p in (0, 1, 7, 14, 29):
            known = (torch.arange(H * W) < p).view(1, H, W, 1)
            for blend in (blend_full, blend_full_literal):
                masked_blend, masked_w = blend(layer, context * known, retrieved, "mean")
                assert_close(masked_w[:, p], causal_w[:, p], what=f"{blend.__name__} weighted at {p}")
                assert_close(masked_blend[:, p], causal_blend[:, p], what=f"{blend.__name__} blended at {p}")


def test_faid_hook_fast_equals_literal_in_the_model(gen, db):
    torch.manual_seed(1)
    blenders = FAiDBlenders(gen.hidden_size, gen.num_layers, ak.FAiDConfig(k=4, hops=(1, 2), blenders=2))
    fast, literal = MaskedFAiD(gen, db, blenders), MaskedFAiD(gen, db, blenders, fast=False)
    assert blenders.layer_ids == (0, 1)
    tokens = torch.randint(0, 512, (2, 64), generator=_rng(2))
    positions = torch.stack([torch.randperm(64, generator=_rng(b))[:20] for b in range(2)])
    tokens.scatter_(1, positions, -1)
    labels = torch.tensor([2, 9])
    with torch.no_grad():
        plain = gen.logits(tokens, labels)
        a = gen.logits(tokens, labels, fast.begin_step(tokens, positions, True))
        b = gen.logits(tokens, labels, literal.begin_step(tokens, positions, True))
    assert_close(a, b, what="logits with fast vs literal blenders")
    assert (a - plain).abs().max() > 1e-3  # the blenders do change the model


def test_faid_gate_and_decode(gen, db):
    blenders = FAiDBlenders(gen.hidden_size, gen.num_layers, ak.FAiDConfig(k=4, hops=(1,), blenders=1))
    faid = MaskedFAiD(gen, db, blenders)
    counter = _Counting(faid.retriever)
    cfg = MaskedDecodeConfig(steps=6)
    tokens = masked_decode(gen, torch.tensor([0, 1]), cfg, faid=faid, rng=_rng())
    assert bool((tokens >= 0).all())
    counts = cfg.masked_counts(64)
    assert [q.shape[0] for q in counter.calls] == [2 * counts[t] for t in range(3, 6)]


def test_cells_without_known_neighbours_have_no_valid_hits(gen, db):
    """A cell whose 3 x 3 window holds no known cell queries all zeros: its hits are not valid (left to
    the model by masked_decode, the pipeline step and FAiD alike); cells next to a known one stay valid."""
    tokens = torch.full((2, 64), -1)
    tokens[0, 9] = 5  # row 1, col 1 of image 0; image 1 knows nothing
    positions = torch.tensor([[0, 18, 27, 63], [0, 18, 27, 63]])  # (0,0), (2,2), (3,3), (7,7)
    hits = MaskedRetriever(db, 4, gen).retrieve(tokens, positions)
    assert hits.valid.tolist() == [[True, True, False, False], [False, False, False, False]]
    everywhere = MaskedRetriever(db, 4, gen).retrieve(tokens)
    assert everywhere.valid[0].view(8, 8)[:3, :3].all() and int(everywhere.valid[0].sum()) == 9
    assert not everywhere.valid[1].any()


def test_daid_and_faid_share_one_search_per_step(gen, db):
    """DAiD (k = 8) and FAiD (k = 4) on one database object: one search per retrieving step, FAiD reading
    the first 4 of DAiD's hits, and the same tokens as with two databases (two searches per step)."""
    blenders = FAiDBlenders(gen.hidden_size, gen.num_layers, ak.FAiDConfig(k=4, hops=(1,), blenders=1))
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in blenders.parameters():  # blenders that change the model (fresh ones add nothing)
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    daid_config = ak.DAiDConfig(lam=0.5, tau=0.5, k=8)
    cfg = MaskedDecodeConfig(steps=6)
    labels = torch.tensor([0, 1, 2])

    def decode(daid_db, faid_db, with_faid=True):
        daid = MaskedDAiD(daid_db, daid_config, gen)
        faid = MaskedFAiD(gen, faid_db, blenders) if with_faid else None
        counters = [_Counting(daid)] + ([_Counting(faid.retriever)] if faid and faid_db is not daid_db else [])
        tokens = masked_decode(gen, labels, cfg, daid=daid, faid=faid, rng=_rng())
        return tokens, sum(len(c.calls) for c in counters)

    one = db.to()
    shared, shared_searches = decode(one, one)
    separate, separate_searches = decode(db.to(), db.to())
    daid_only, _ = decode(db.to(), db.to(), with_faid=False)
    retrieving_steps = sum(cfg.retrieves_at(t) for t in range(cfg.steps))
    assert shared_searches == retrieving_steps and separate_searches == 2 * retrieving_steps
    assert torch.equal(shared, separate)
    assert not torch.equal(shared, daid_only)  # FAiD did take part


def test_faid_training_updates_blenders_only(gen, db, grids):
    torch.manual_seed(0)
    blenders = FAiDBlenders(gen.hidden_size, gen.num_layers, ak.FAiDConfig(k=4, hops=(1, 2), blenders=2))
    faid = MaskedFAiD(gen, db, blenders)
    before = {n: p.detach().clone() for n, p in blenders.named_parameters()}
    model_before = [p.detach().clone() for p in gen.model.parameters()]
    train_grids = grids[32:].reshape(16, -1)  # not in the database
    losses = train_masked_faid(faid, train_grids, torch.arange(16) % 10, steps=3, batch_size=4, lr=1e-3)
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    changed = [n for n, p in blenders.named_parameters() if not torch.equal(p, before[n])]
    for i in blenders.layer_ids:  # both blenders (chained) and their norms receive gradient
        assert any(n.startswith(f"layers.{i}.blender.conv") for n in changed)
        assert f"layers.{i}.retrieval_layernorm.weight" in changed
    assert all(torch.equal(p, q) and p.grad is None for p, q in zip(gen.model.parameters(), model_before))


def test_tiny_generator_is_bidirectional_and_trains():
    gen = tiny_maskgit(seed=1, grid=(4, 4), codebook_size=32, dim=32, num_layers=1)
    tokens = torch.full((1, 16), -1)
    later = tokens.clone()
    later[0, 15] = 3
    labels = torch.tensor([0])
    with torch.no_grad():
        assert not torch.allclose(gen.logits(tokens, labels)[0, 0], gen.logits(later, labels)[0, 0])
    data = torch.randint(0, 4, (8, 4, 4), generator=_rng())  # 4 of 32 codes used: learnable quickly
    losses = train_maskgit(gen, data, torch.zeros(8, dtype=torch.long), steps=30, batch_size=8, lr=3e-3)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5


def test_tiny_generator_guidance(gen, db):
    guided = TinyMaskGITAdapter(gen.model, codebook=gen.codebook(), guidance_scale=3.0)
    tokens = torch.randint(0, 512, (2, 64), generator=_rng(4))
    tokens[:, ::3] = -1
    labels = torch.tensor([1, 6])
    null = torch.full_like(labels, gen.model.num_classes)
    blenders = FAiDBlenders(gen.hidden_size, gen.num_layers, ak.FAiDConfig(k=4, hops=(1,), blenders=1))
    faid = MaskedFAiD(gen, db, blenders)
    positions = masked_positions(tokens, 22)
    with torch.no_grad():
        cond, uncond = gen.logits(tokens, labels), gen.logits(tokens, null)
        assert_close(guided.logits(tokens, labels), uncond + 3.0 * (cond - uncond), what="CFG logits")
        hook = faid.begin_step(tokens, positions, True)
        cond_faid = gen.logits(tokens, labels, faid.make_hook(tokens, faid.features(tokens, positions, True)))
        assert_close(guided.logits(tokens, labels, hook), uncond + 3.0 * (cond_faid - uncond), what="CFG with FAiD")


def test_retrieval_recovers_cells_of_structured_images():
    """End to end through keys, one search and the lam = 1 draw: on images where a cell is a function of
    its neighbours (token(r, c) = (a r + b c + s) mod 32), hiding 10% of a held-out image's cells and
    drawing each from retrieval alone returns the true token for most cells (0.93 measured; a random
    draw would be right 1/32 of the time)."""
    g = _rng(0)

    def images(n):
        a, b = torch.randint(1, 4, (2, n, 1, 1), generator=g)
        s = torch.randint(0, 32, (n, 1, 1), generator=g)
        return (a * torch.arange(8).view(1, 8, 1) + b * torch.arange(8).view(1, 1, 8) + s) % 32

    gen = tiny_maskgit(seed=0, codebook_size=32)
    daid = MaskedDAiD(token_database(images(300), gen), ak.DAiDConfig(lam=1.0, tau=0.6, k=16), gen)
    truth = images(50).reshape(50, 64)
    tokens = truth.clone()
    tokens.scatter_(1, torch.rand(50, 64, generator=g).argsort(1)[:, :6], -1)
    positions = masked_positions(tokens, 6)
    dist, ids, valid = (x.reshape(300, -1).squeeze(-1) for x in daid.retrieve(tokens, positions))
    drawn, _ = sample_cells(torch.zeros(300, 32), torch.rand(300, generator=g), 1.0, (dist, ids, valid), daid.config)
    assert (drawn == truth.gather(1, positions).reshape(-1)).float().mean() > 0.85


def test_image_database_through_a_vq_tokenizer(tiny_model, tiny_images):
    """A generator adapter backed by a real VQ tokenizer (the tiny Janus VQ here; any ImageTokenizer, e.g.
    a VQ trained on real images, plugs in the same way) builds a Show-o-style database from images."""
    from arrag_kernels.masked import TinyMaskGIT
    from arrag_kernels.models import get_adapter

    tokenizer = get_adapter(tiny_model)
    torch.manual_seed(0)
    gen = TinyMaskGITAdapter(TinyMaskGIT(tokenizer.grid, tokenizer.codebook_size).eval(), tokenizer=tokenizer)
    db = ak.PatchDatabase.build(tiny_images, gen, neighborhood="full", border="zero", progress=False)
    assert len(db) == tiny_images.shape[0] * 64 and db.meta.key_dim == 8 * tokenizer.embed_dim
    keys = db.keys[:64].view(64, 8, -1)
    latents, _ = tokenizer.encode(tiny_images[:1])
    assert_close(keys[9, 0], latents[0, 0, 0], what="UL of cell (1, 1)")  # key cell 0 of (1, 1) is cell (0, 0)
    assert_close(keys[0, 4], latents[0, 0, 1], what="R of cell (0, 0)")
    assert bool((keys[0, [0, 1, 2, 3, 5]] == 0).all())  # cell (0, 0): UL, U, UR, L and LL are outside the grid
    daid = MaskedDAiD(db, ak.DAiDConfig(lam=0.5, k=8), gen)
    out = masked_decode(gen, torch.tensor([0, 1]), MaskedDecodeConfig(steps=4), daid=daid, rng=_rng())
    assert out.shape == (2, 64) and daid.searches == 2
