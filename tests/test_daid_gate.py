"""DAiDConfig.gate: adaptive retrieval (confident rows sample from the model alone) in every loop and in the NLL."""

import math

import pytest
import torch
from transformers import GenerationConfig

import arrag_kernels as ak
from arrag_kernels.decoding.daid import gate_open
from arrag_kernels.eval.nll import image_nll
from arrag_kernels.models import get_adapter, tiny_prompt_ids
from tests.utils import daid_graph_decode_without_host_sync

# the tiny model's post-CFG max probabilities lie in ~[0.0024, 0.0027] (512 codes): this one gates about half
MID_GATE = ("max_prob", 0.0025)
NEVER = ("max_prob", 1.0)  # no row of a float softmax over 512 codes reaches 1
ALWAYS = ("entropy", math.inf)


def _gen(do_sample):
    return GenerationConfig(do_sample=do_sample, guidance_scale=5.0, bos_token_id=1, pad_token_id=0,
                            generation_kwargs={"boi_token_id": 100})


@pytest.fixture(scope="module")
def db(tiny_model, tiny_images):
    return ak.PatchDatabase.build(tiny_images, tiny_model, progress=False)


@pytest.mark.parametrize("gate, expected", [
    (("max_prob", 0.9), ("max_prob", 0.9)), (["entropy", 2], ("entropy", 2.0)), (("max_prob", 1), ("max_prob", 1.0)),
    (("entropy", 0.0), ("entropy", 0.0)),
])
def test_gate_is_normalised(gate, expected):
    assert ak.DAiDConfig(gate=gate).gate == expected
    assert ak.DAiDConfig().gate is None


@pytest.mark.parametrize("gate", ["max_prob", ("max_prob",), ("max_prob", 0.5, 1), ("top1", 0.5), ("max_prob", 0.0),
                                  ("max_prob", 1.5), ("entropy", -0.1), ("max_prob", float("nan")), 0.9])
def test_bad_gates_are_refused(gate):
    with pytest.raises(ValueError, match="DAiDConfig.gate"):
        ak.DAiDConfig(gate=gate)


def test_gate_threshold_must_be_a_number():
    with pytest.raises(TypeError, match="DAiDConfig.gate threshold"):
        ak.DAiDConfig(gate=("max_prob", "0.5"))


def test_gate_open_rows():
    probs = torch.tensor([[0.9, 0.1, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25], [0.5, 0.5, 0.0, 0.0]])
    assert gate_open(probs, None) is None
    assert gate_open(probs, ("max_prob", 0.5)).tolist() == [False, True, False]  # max p >= t: confident
    entropy = [-(0.9 * math.log(0.9) + 0.1 * math.log(0.1)), math.log(4), math.log(2)]
    assert gate_open(probs, ("entropy", 0.5)).tolist() == [e > 0.5 for e in entropy] == [False, True, True]
    assert gate_open(probs, ("entropy", 1.0)).tolist() == [False, True, False]


def test_merge_gates_rows_and_skips_the_search_when_all_are_confident(tiny_model, db):
    adapter = get_adapter(tiny_model)
    tokens = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0))
    step = 20  # a retrieval position (row 2, column 4 of the 8 x 8 grid)
    probs = torch.full((2, 512), 0.5 / 511)
    probs[0, 7] = 0.5  # row 0 confident under max_prob 0.5, row 1 not
    probs[1] = torch.softmax(torch.randn(512, generator=torch.Generator().manual_seed(1)), 0)
    ungated = ak.DAiDSampler(db, ak.DAiDConfig(lam=0.5, k=8), adapter)
    expected = ungated.merge(probs, tokens, step)
    gated = ak.DAiDSampler(db, ak.DAiDConfig(lam=0.5, k=8, gate=("max_prob", 0.5)), adapter)
    merged = gated.merge(probs, tokens, step)
    assert torch.equal(merged[0], probs[0]) and not torch.equal(expected[0], probs[0])
    assert torch.equal(merged[1], expected[1])
    assert gated.searches == 1
    assert torch.equal(gated.merge(probs[:1], tokens[:1], step), probs[:1])  # every row confident on the CPU
    assert gated.searches == 1, "the search ran although the gate closed every row"


@pytest.mark.parametrize("loop", ["dynamic", "static"])
@pytest.mark.parametrize("do_sample", [False, True], ids=["greedy", "sampled"])
def test_extreme_gates_give_ungated_and_plain_tokens(tiny_model, db, loop, do_sample):
    ids = tiny_prompt_ids(3, length=7, seed=5)

    def tokens(daid):
        with ak.patched(tiny_model, db if daid is not None else None, daid) as handle:
            torch.manual_seed(4)
            return handle.generate_images(ids, generation_config=_gen(do_sample), loop=loop)

    ungated, plain = tokens(ak.DAiDConfig(lam=0.5, k=16)), tokens(None)
    assert not torch.equal(ungated, plain)
    assert torch.equal(tokens(ak.DAiDConfig(lam=0.5, k=16, gate=NEVER)), ungated)
    assert torch.equal(tokens(ak.DAiDConfig(lam=0.5, k=16, gate=ALWAYS)), plain)


def test_mid_gate_same_tokens_in_dynamic_and_static_loops(tiny_model, db):
    ids = tiny_prompt_ids(3, length=7, seed=5)
    out = {}
    for name, gate in [("ungated", None), ("gated", MID_GATE)]:
        with ak.patched(tiny_model, db, ak.DAiDConfig(lam=0.5, k=16, gate=gate)) as handle:
            out[name] = [handle.generate_images(ids, generation_config=_gen(False), loop=loop)
                         for loop in ("dynamic", "static")]
    with ak.patched(tiny_model, None, None) as handle:
        plain = handle.generate_images(ids, generation_config=_gen(False))
    dynamic, static = out["gated"]
    assert torch.equal(dynamic, static)
    assert not torch.equal(dynamic, out["ungated"][0]) and not torch.equal(dynamic, plain)


def test_gated_nll_mixes_plain_and_daid_per_position(tiny_model, db):
    prompts = tiny_prompt_ids(3, length=7, seed=5)
    tokens = torch.randint(0, 512, (3, 64), generator=torch.Generator().manual_seed(2))
    plain = image_nll(tiny_model, prompts, tokens)
    ungated = image_nll(tiny_model, prompts, tokens, db, ak.DAiDConfig(lam=0.5, k=16))
    assert ungated.gated is None and "searches_saved" not in ungated.summary()
    gated = image_nll(tiny_model, prompts, tokens, db, ak.DAiDConfig(lam=0.5, k=16, gate=("max_prob", 0.00205)))
    r = gated.retrieval  # the conditional max probabilities lie in ~[0.0020, 0.0021]: this gate closes some
    assert not gated.gated[:, ~r].any()
    saved = gated.gated[:, r].float().mean()
    assert 0 < saved < 1 and gated.summary()["searches_saved"] == pytest.approx(float(saved))
    torch.testing.assert_close(gated.nll, torch.where(gated.gated, plain.nll, ungated.nll), rtol=1e-6, atol=1e-6)
    never = image_nll(tiny_model, prompts, tokens, db, ak.DAiDConfig(lam=0.5, k=16, gate=NEVER))
    assert torch.equal(never.nll, ungated.nll) and never.summary()["searches_saved"] == 0.0


def test_masked_decoding_refuses_a_gate():
    from arrag_kernels.masked import MaskedDAiD, tiny_maskgit, token_database

    gen = tiny_maskgit(seed=0)
    grids = torch.randint(0, gen.codebook_size, (2, *gen.grid), generator=torch.Generator().manual_seed(0))
    db = token_database(grids, gen, ak.KeyLayout(neighborhood="full"))
    with pytest.raises(ValueError, match="not supported by masked decoding"):
        MaskedDAiD(db, ak.DAiDConfig(k=4, gate=("max_prob", 0.9)), gen)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("overlap", [False, True], ids=["inline", "overlap"])
def test_gated_cuda_graph_decode_steps_never_synchronise(tiny_images, overlap):
    """The gate reads p_model on the device only: replays run with torch's sync debug mode set to error."""
    tokens = daid_graph_decode_without_host_sync(tiny_images, ak.DAiDConfig(lam=0.5, k=16, gate=MID_GATE), overlap)
    assert (tokens >= 0).all()
