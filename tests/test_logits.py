"""DAiDLogitsProcessor inside a model's own HF generate (tiny Llama with image tokens in its vocabulary,
an end-of-line token per row, CFG through a negative prompt, prefix_allowed_tokens_fn)."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessorList

import arrag_kernels as ak

from .utils import assert_tokens_among_retrieved, seeded_model

BOS, EOS, BOI, CODE0, CODES, GRID, D = 1, 2, 3, 32, 64, (5, 6), 8
EOL = CODE0 + CODES
ROW = GRID[1] + 1  # image tokens of a row, then end-of-line


@pytest.fixture(scope="module")
def setup():
    g = torch.Generator().manual_seed(0)
    codebook = torch.nn.functional.normalize(torch.randn(CODES, D, generator=g), dim=-1)
    db = ak.PatchDatabase.from_tokens(torch.randint(0, CODES, (12, *GRID), generator=g), codebook)
    model = seeded_model(LlamaForCausalLM, LlamaConfig(
        vocab_size=EOL + 1, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=0,
    ))
    return model, db, codebook


def _allowed(batch_id, sent):
    """Image grammar: GRID[1] codes then end-of-line per row, then end of sequence."""
    j = len(sent) - 1 - int((sent == BOI).nonzero().max())
    if j >= GRID[0] * ROW:
        return [EOS]
    return [EOL] if j % ROW == GRID[1] else list(range(CODE0, EOL))


def _generate(model, processor=None, do_sample=True, temperature=1.0, seed=0):
    g = torch.Generator().manual_seed(3)
    ids = torch.cat([torch.full((3, 1), BOS), torch.randint(4, 32, (3, 5), generator=g), torch.full((3, 1), BOI)], 1)
    neg = torch.tensor([[BOS, BOI]]).expand(3, -1)
    torch.manual_seed(seed)
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=GRID[0] * ROW, do_sample=do_sample,
        temperature=temperature, top_k=0, guidance_scale=3.0, negative_prompt_ids=neg,
        negative_prompt_attention_mask=torch.ones_like(neg), prefix_allowed_tokens_fn=_allowed,
        logits_processor=LogitsProcessorList([processor] if processor else []), pad_token_id=0,
    )
    return out[:, ids.shape[1]:]


def _processor(db, codebook, lam, gate=None, **kw):
    return ak.DAiDLogitsProcessor(db, ak.DAiDConfig(lam=lam, k=6, gate=gate), codebook, image_start_token_id=BOI,
                                  image_token_ids=torch.arange(CODE0, EOL), eol_token_id=EOL, **kw)


@pytest.mark.parametrize("do_sample", [False, True], ids=["greedy", "sampled"])
def test_lam_zero_equals_plain_generate(setup, do_sample):
    model, db, codebook = setup
    plain = _generate(model, do_sample=do_sample, temperature=0.9)
    ours = _generate(model, _processor(db, codebook, 0.0, temperature=0.9), do_sample=do_sample)
    assert torch.equal(ours, plain)
    assert bool((plain[:, GRID[1]::ROW] == EOL).all()) and not torch.equal(plain[0], plain[1])


def test_lam_one_draws_only_retrieved_tokens(setup):
    model, db, codebook = setup
    out = _generate(model, _processor(db, codebook, 1.0))
    assert bool((out[:, GRID[1]::ROW] == EOL).all()), "end-of-line tokens must stay at the row ends"
    cells = out.reshape(3, GRID[0], ROW)[:, :, :GRID[1]].reshape(3, -1) - CODE0  # (B, H*W) codes
    retrieves = ak.ops.retrieval_positions(GRID, db.meta.layout)
    assert assert_tokens_among_retrieved(cells, codebook, db, GRID, 6) == 3 * int(retrieves.sum()) > 0
    assert not torch.equal(out, _generate(model))


def test_gate_closing_every_row_is_plain_and_closing_none_is_ungated(setup):
    model, db, codebook = setup
    ungated = _generate(model, _processor(db, codebook, 1.0))
    assert torch.equal(_generate(model, _processor(db, codebook, 1.0, gate=("max_prob", 1.0))), ungated)
    assert torch.equal(_generate(model, _processor(db, codebook, 1.0, gate=("entropy", float("inf")))),
                       _generate(model))


def test_refuses_doubled_cfg_scores(setup):
    _, db, codebook = setup
    with pytest.raises(ValueError, match="patch_model"):
        _processor(db, codebook, 0.5)(torch.tensor([[BOS, BOI]]), torch.zeros(2, EOL + 1))


def test_bad_inputs_are_named(setup):
    """The retriever's checks reach the processor: codebook shape against the database, k against its size."""
    _, db, codebook = setup
    with pytest.raises(ValueError, match=rf"codebook: expected \({CODES}, {D}\) to match the database, got \(64, 4\)"):
        _processor(db, codebook[:, :4], 0.5)
    with pytest.raises(ValueError, match=rf"DAiDConfig.k = {len(db) + 1} is larger than the database \({len(db)} "):
        ak.DAiDLogitsProcessor(db, ak.DAiDConfig(k=len(db) + 1), codebook, image_start_token_id=BOI)


class _FactsAdapter:
    """A family known to the library by facts only (LogitsProcessorAdapter): tokenizer members, the call's
    grid and the image stream's vocabulary ids; no retrieval object."""

    generate_mode = "logits_processor"
    no_loop_reason = "this tiny Llama decodes images in its own generate"
    grid, codebook_size, embed_dim, image_size, device = GRID, CODES, D, 0, torch.device("cpu")

    def __init__(self, codebook):
        self._codebook = codebook

    def codebook(self):
        return self._codebook

    def fingerprint(self):
        return ak.models.codebook_fingerprint(self._codebook)

    def encode(self, pixels):
        raise NotImplementedError

    def generation_grid(self, input_ids, grid=None, **generate_kwargs):
        return GRID if input_ids is not None and bool((input_ids[:, -1] == BOI).all()) else None

    def image_stream(self, **generate_kwargs):
        return ak.models.ImageStream(BOI, torch.arange(CODE0, EOL), EOL)


@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_patching_builds_the_processor_from_adapter_facts(setup, monkeypatch, lam):
    """A new family that only states facts gets DAiD through patch_model: the tokens equal the hand-built
    processor's (sampled, the call's temperature moved into the processor)."""
    model, db, codebook = setup
    adapter = _FactsAdapter(codebook)
    hand = _generate(model, _processor(db, codebook, lam, temperature=0.9))
    assert torch.equal(_generate(model, ak.DAiDLogitsProcessor.for_adapter(adapter, db, ak.DAiDConfig(lam=lam, k=6),
                                                                           temperature=0.9)), hand)
    monkeypatch.setitem(ak.models.ADAPTERS, model.config.model_type, lambda m: adapter)
    with ak.patched(model, db, ak.DAiDConfig(lam=lam, k=6)):
        assert torch.equal(_generate(model, temperature=0.9), hand)
