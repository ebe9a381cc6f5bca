"""top-k / top-p in the fused DAiD sampler: reference vs HF's warpers, Triton and C++ vs the reference,
and the static loop passing HF's top_k / top_p into the fused op."""

import pytest
import torch
from transformers import GenerationConfig, TopKLogitsWarper, TopPLogitsWarper

import arrag_kernels as ak
from arrag_kernels import _ext
from arrag_kernels.decoding import hf_generate
from arrag_kernels.decoding.static import fusable_cfg
from arrag_kernels.models import tiny_prompt_ids
from arrag_kernels.ops import daid_mix_ref, daid_sample, daid_sample_ref
from arrag_kernels.ops.daid import top_k_top_p_filter_ref

from .utils import backend_device

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
BACKENDS = ["triton"] + (["cpp"] if _ext.HAS_EXT else [])


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.8), (40, 0.95), (1, 0.5), (0, 0.0), (200, 1.0)])
def test_filter_ref_equals_hf_warpers(top_k, top_p):
    scores = torch.randn(5, 97, generator=_gen(top_k)) * 3
    want = scores
    if top_k:
        want = TopKLogitsWarper(top_k)(None, want)
    if top_p < 1:
        want = TopPLogitsWarper(top_p)(None, want)
    assert torch.equal(top_k_top_p_filter_ref(scores, top_k, top_p), want)


def _inputs(B, V, K, cfg, seed, device=DEVICE):
    g = _gen(seed)
    logits = torch.randn(2 * B if cfg else B, V, generator=g) * 3
    dist = torch.rand(B, K, generator=g) * 4
    tokens = torch.randint(-1, V, (B, K), generator=g)  # mostly outside the model's top-k
    active = torch.arange(B) % 3 != 1
    uniforms = torch.rand(B, generator=g)
    return [t.to(device) for t in (logits, dist, tokens, active, uniforms)]


def _merged(logits, dist, tokens, active, *, guidance_scale, temperature, lam, tau, dedup, top_k, top_p):
    scores = logits.float()
    if guidance_scale is not None:
        scores = scores[len(dist):] + guidance_scale * (scores[:len(dist)] - scores[len(dist):])
    scores = top_k_top_p_filter_ref(scores / temperature, top_k, top_p)
    return daid_mix_ref(torch.softmax(scores, -1), dist, tokens, active, lam, tau, dedup)


CASES = [  # B, V, K, guidance, top_k, top_p, dedup
    (3, 97, 7, 5.0, 5, 1.0, "nearest"),
    (2, 61, 9, None, 0, 0.7, "sum"),
    (2, 1025, 33, 3.0, 50, 0.9, "nearest"),
    (3, 1031, 5, None, 1, 1.0, "sum"),
    (2, 97, 3, 2.0, 3, 0.0, "nearest"),
]


@pytest.mark.parametrize("greedy", [False, True], ids=["sample", "greedy"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[f"b{c[0]}-v{c[1]}-k{c[2]}-w{c[3]}-top{c[4]}-p{c[5]}" for c in CASES])
def test_kernel_matches_reference(case, backend, greedy):
    B, V, K, guidance, top_k, top_p, dedup = case
    logits, dist, tokens, active, uniforms = _inputs(B, V, K, guidance, seed=V + K + top_k, device=backend_device(backend))
    uniforms = None if greedy else uniforms
    kw = dict(guidance_scale=guidance, temperature=0.8, lam=0.4, tau=0.6, dedup=dedup, top_k=top_k, top_p=top_p)
    with ak.use_backend(backend):
        out = daid_sample(logits, dist, tokens, active, uniforms, **kw)
    ref = daid_sample_ref(logits, dist, tokens, active, uniforms, **kw)
    p = _merged(logits, dist, tokens, active, **kw)
    assert bool((p[torch.arange(B), out] > 0).all()), "sampled a token the filter removed"
    for b in (out != ref).nonzero().flatten().tolist():  # only a draw within fp32 rounding of a CDF step
        cdf = p[b].cumsum(0)
        gap = (p[b, ref[b]] - p[b, out[b]]).abs() if greedy else (cdf[min(out[b], ref[b])] - uniforms[b] * cdf[-1]).abs()
        assert gap.item() < 1e-5, f"row {b}: {backend} token {out[b].item()} != reference {ref[b].item()}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_uniform_sweep_hits_every_kept_token(backend):
    """Uniforms over one row: the kernel's inverse CDF equals the reference's, so the kept set and
    its masses agree; with lam = 0.5, retrieved tokens outside the top-k are still drawn. (Each
    row is one interpreted program of ~1 s, hence fewer rows for Triton on CPU.)"""
    n, V = 64 if backend == "cpp" or CUDA else 12, 61
    device = backend_device(backend)
    logits, dist, _, _, _ = _inputs(1, V, 6, 3.0, seed=3, device=device)
    tokens = torch.tensor([[3, 3, 17, -1, 40, 17]], device=device)
    kw = dict(guidance_scale=3.0, temperature=1.0, lam=0.5, tau=0.6, dedup="nearest", top_k=6, top_p=0.9)
    logits = torch.cat([logits[:1].expand(n, -1), logits[1:].expand(n, -1)])
    dist, tokens = dist.expand(n, -1).contiguous(), tokens.expand(n, -1).contiguous()
    active = torch.ones(n, dtype=torch.bool, device=device)
    uniforms = (torch.arange(n, dtype=torch.float32, device=device) + 0.5) / n
    with ak.use_backend(backend):
        out = daid_sample(logits, dist, tokens, active, uniforms, **kw)
    assert torch.equal(out, daid_sample_ref(logits, dist, tokens, active, uniforms, **kw))
    model_kept = set(top_k_top_p_filter_ref(logits[n:n + 1] + 3.0 * (logits[:1] - logits[n:n + 1]), 6, 0.9)
                     .isfinite().nonzero()[:, 1].tolist())
    drawn = set(out.tolist())
    assert drawn <= model_kept | {3, 17, 40} and drawn - model_kept and drawn & model_kept


def test_invalid_filters_are_refused():
    logits, dist, tokens, active, uniforms = _inputs(2, 11, 3, None, seed=0)
    kw = dict(guidance_scale=None, lam=0.1, tau=0.6)
    with pytest.raises(ValueError, match=r"top_k must be an int >= 0"):
        daid_sample(logits, dist, tokens, active, uniforms, top_k=-1, **kw)
    with pytest.raises(ValueError, match=r"top_p must be in \[0, 1\]"):
        daid_sample(logits, dist, tokens, active, uniforms, top_p=1.5, **kw)


def test_fusable_cfg_takes_hf_top_k_top_p(tiny_model):
    ids = tiny_prompt_ids(1)
    gen = GenerationConfig(do_sample=True, temperature=0.9, top_k=20, top_p=0.8, guidance_scale=None)
    from transformers.generation import ClassifierFreeGuidanceLogitsProcessor, LogitsProcessorList

    processors = tiny_model._get_logits_processor(
        generation_config=gen, input_ids_seq_length=ids.shape[1], encoder_input_ids=ids, prefix_allowed_tokens_fn=None,
        logits_processor=LogitsProcessorList([ClassifierFreeGuidanceLogitsProcessor(5.0)]), device="cpu")
    assert fusable_cfg(processors) == (5.0, 0.9, 20, pytest.approx(0.8))
    assert fusable_cfg(processors[:1] + processors[3:] + processors[1:3]) is None  # top-p before temperature


def test_static_loop_fuses_top_k_top_p(tiny_model, tiny_images, monkeypatch):
    """The fused op's top-k / top-p equals HF's warpers run as logits processors: same tokens for the same
    uniforms (auto backend: C++ on CPU, Triton on CUDA; the interpreted kernel is too slow for 64 steps)."""
    db = ak.PatchDatabase.build(tiny_images[:6], tiny_model, progress=False)
    ids = tiny_prompt_ids(2, seed=6)
    gen = GenerationConfig(do_sample=True, temperature=0.9, top_k=30, top_p=0.9, guidance_scale=5.0, bos_token_id=1,
                           pad_token_id=0, generation_kwargs={"boi_token_id": 100})

    def run():
        torch.manual_seed(0)
        with ak.patched(tiny_model, db, ak.DAiDConfig(lam=0.3, k=8)):
            return tiny_model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen,
                                       generation_mode="image", loop="static")

    fused = run()
    monkeypatch.setattr(hf_generate, "fusable_cfg", lambda processors: None)  # HF's warpers, then the op unfiltered
    assert torch.equal(fused, run())


@pytest.mark.skipif(not _ext.HAS_EXT, reason=f"C++ extension not built: {_ext.EXT_ERROR}")
@pytest.mark.parametrize("top_k,top_p", [(7, 1.0), (0, 0.6), (30, 0.85)])
def test_cpp_filtered_probabilities_match_reference(top_k, top_p):
    from tests.utils import assert_close

    logits, dist, tokens, active, uniforms = [t.cpu() for t in _inputs(5, 97, 13, 4.0, seed=top_k)]
    _, probs = _ext._C.daid_sample(
        logits.numpy(), dist.numpy(), tokens.numpy(), active.numpy(), uniforms.numpy(), guidance_scale=4.0,
        temperature=0.7, lam=0.3, tau=0.6, dedup="nearest", return_probs=True, top_k=top_k, top_p=top_p)
    want = _merged(logits, dist, tokens, active, guidance_scale=4.0, temperature=0.7, lam=0.3, tau=0.6,
                   dedup="nearest", top_k=top_k, top_p=top_p)
    assert torch.equal(torch.from_numpy(probs) > 0, want > 0), "kept sets differ"
    assert_close(torch.from_numpy(probs), want, what=f"filtered DAiD probabilities (top_k={top_k}, top_p={top_p})")
