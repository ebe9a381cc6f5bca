"""arrag_kernels.serving.vllm: the DAiD processors for vLLM.

Without vLLM (this environment): request settings, the engine's database, and both processors' logic
driven by stand-ins for vLLM's batch updates (V1) and runner state (Model Runner V2), against
:class:`arrag_kernels.DAiDLogitsProcessor` on the same token histories. With vLLM: tests/vllm_check.py run
inside .venv-vllm (scripts/setup_vllm.sh) on a tiny random model, its results read from a JSON file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import arrag_kernels as ak
from arrag_kernels.ops.daid import top_k_top_p_filter_ref
from arrag_kernels.serving import vllm as akv

from .conftest import DEVICES

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
VLLM_READY = ROOT / ".venv-vllm" / "ARRAG_READY"  # written by scripts/setup_vllm.sh's last step
BOI, OFFSET, CODES, VOCAB, GRID, D = 3, 20, 32, 60, (4, 5), 8
CELLS = GRID[0] * GRID[1]


@pytest.fixture(scope="module", params=["causal", "full"])
def engine(request):
    """A database of random 4 x 5 grids over 32 codes (vocabulary ids 20..51 of 60), registered for engines:
    the AR key (causal hop 1), or full windows with zeros outside (keys that read cells not generated yet)."""
    g = torch.Generator().manual_seed(0)
    codebook = torch.nn.functional.normalize(torch.randn(CODES, D, generator=g), dim=-1)
    layout = {} if request.param == "causal" else {"neighborhood": "full", "border": "zero"}
    db = ak.PatchDatabase.from_tokens(torch.randint(0, CODES, (10, *GRID), generator=g), codebook, **layout)
    akv.register_database("test-engine", db, codebook)
    return db, codebook


def _vllm_config(database="test-engine", **spec):
    return SimpleNamespace(additional_config={"arrag_kernels": {"database": database, **spec}},
                           model_config=SimpleNamespace(get_vocab_size=lambda: VOCAB), speculative_config=None)


def _params(daid=None, **vllm_settings):
    """A stand-in for vllm.SamplingParams (the attributes the processors read)."""
    settings = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, presence_penalty=0.0, frequency_penalty=0.0,
                    repetition_penalty=1.0)
    extra = None if daid is None else {f"arrag_daid_{k}": v for k, v in {"image_token_offset": OFFSET, **daid}.items()}
    return SimpleNamespace(extra_args=extra, **{**settings, **vllm_settings})


def _update(added=(), removed=(), moved=()):
    """A stand-in for vllm's BatchUpdate; moves name their direction like MoveDirectionality."""
    return SimpleNamespace(batch_size=0, added=list(added), removed=list(removed),
                           moved=[(a, b, SimpleNamespace(name=d)) for a, b, d in moved])


def _history(seed: int, length: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, CODES, (length,), generator=g) + OFFSET).tolist()


def _hf_reference(db, codebook, settings: dict, output_ids: list[int], scores: torch.Tensor) -> torch.Tensor:
    """What arrag_kernels.DAiDLogitsProcessor (HF generate) returns for a prompt ending with BOI then ``output_ids``."""
    daid = {k: settings[k] for k in ("lam", "tau", "k", "dedup", "gate") if k in settings}
    processor = ak.DAiDLogitsProcessor(db, ak.DAiDConfig(**daid), codebook, BOI, torch.arange(OFFSET, OFFSET + CODES),
                                       temperature=settings.get("temperature", 1.0), top_k=settings.get("top_k", 0),
                                       top_p=settings.get("top_p", 1.0), image_offset=settings.get("start", 0))
    return processor(torch.tensor([[1, 5, BOI, *output_ids]]), scores[None].clone())[0]


# Four requests of one batch: their DAiD settings (None: DAiD off) and output lengths so far.
BATCH = [
    ({"lam": 0.6, "tau": 0.4, "k": 5, "start": 2}, 14),  # at retrieval cell 12 (the grid after 2 tokens)
    (None, 7),  # not a DAiD request: untouched
    ({"lam": 1.0, "k": 3, "temperature": 0.8, "top_k": 10, "top_p": 0.9}, 16),  # another group, smaller k
    ({"lam": 0.6, "tau": 0.4, "k": 5}, CELLS + 2),  # past the grid: untouched (no filters)
    ({"lam": 0.6, "k": 5, "temperature": 0.5}, CELLS + 1),  # past the grid: its temperature only
]


def _v1_processor(engine):
    processor = akv._V1Processor(_vllm_config(), torch.device("cpu"))
    outputs = [_history(i, n) for i, (_, n) in enumerate(BATCH)]
    processor.update_state(_update(added=[(i, _params(s), [1, BOI], outputs[i]) for i, (s, _) in enumerate(BATCH)]))
    return processor, outputs


def test_v1_rows_equal_the_hf_logits_processor_and_others_are_untouched(engine):
    db, codebook = engine
    processor, outputs = _v1_processor(engine)
    scores = torch.randn(len(BATCH), VOCAB, generator=torch.Generator().manual_seed(5))
    out = processor.apply(scores.clone())
    for i, (settings, _) in enumerate(BATCH):
        expected = scores[i] if settings is None else _hf_reference(db, codebook, settings, outputs[i], scores[i])
        torch.testing.assert_close(out[i], expected, rtol=0, atol=1e-6, equal_nan=True, msg=f"row {i}")
    assert torch.equal(out[1], scores[1]) and torch.equal(out[3], scores[3])
    lam1 = out[2].exp()  # lam = 1 at a retrieval cell: only the (at most 3) retrieved tokens remain
    assert 1 <= int((lam1 > 0).sum()) <= 3 and abs(float(lam1.sum()) - 1) < 1e-5


def test_v1_outputs_grow_live_and_rows_follow_moves(engine):
    db, codebook = engine
    processor, outputs = _v1_processor(engine)
    outputs[0].append(OFFSET + 1)  # vLLM appends to the lists it handed over
    # removed first, then moves: a swap, and a one-way move that replaces the request at its target
    processor.update_state(_update(removed=[3], moved=[(0, 1, "SWAP"), (2, 4, "UNIDIRECTIONAL")]))
    scores = torch.randn(len(BATCH), VOCAB, generator=torch.Generator().manual_seed(6))
    out = processor.apply(scores.clone())
    for row, request in [(1, 0), (4, 2)]:
        expected = _hf_reference(db, codebook, BATCH[request][0], outputs[request], scores[row])
        torch.testing.assert_close(out[row], expected, rtol=0, atol=1e-6, msg=f"row {row}")
    for row in (0, 2, 3):  # the plain request, and two empty indices
        assert torch.equal(out[row], scores[row]), f"row {row}"
    processor.update_state(_update(added=[(1, _params(), [1], [])]))  # a plain request replaces a DAiD one
    assert 1 not in processor.requests


def test_v1_lam_zero_is_the_filtered_model_distribution(engine):
    processor = akv._V1Processor(_vllm_config(), torch.device("cpu"))
    settings = {"lam": 0.0, "k": 4, "temperature": 0.7, "top_k": 6, "top_p": 0.8}
    processor.update_state(_update(added=[(0, _params(settings), [1], _history(3, 9))]))
    scores = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(7))
    expected = torch.softmax(top_k_top_p_filter_ref(scores / 0.7, 6, 0.8), dim=-1).log()  # bit for bit
    assert torch.equal(processor.apply(scores.clone()), expected)


def _mrv2_state(outputs: list[list[int]], slots: list[int], device, max_len: int = 40):
    """Stand-ins for Model Runner V2's request state and logits context: request r in slot ``slots[r]``,
    prompt [1, 5, BOI], committed tokens in ``all_token_ids``."""
    num_slots = max(slots) + 2
    history = torch.full((num_slots, max_len), OFFSET + 1, dtype=torch.int32)  # earlier occupants' image tokens
    prompt_len, total_len = torch.zeros(num_slots, dtype=torch.int32), torch.zeros(num_slots, dtype=torch.int32)
    for slot, out in zip(slots, outputs):
        ids = [1, 5, BOI, *out]
        history[slot, :len(ids)] = torch.tensor(ids)
        prompt_len[slot], total_len[slot] = 3, len(ids)
    state = SimpleNamespace(device=torch.device(device), max_num_reqs=num_slots, vocab_size=VOCAB,
                            all_token_ids=SimpleNamespace(gpu=history.to(device)),
                            prompt_len=SimpleNamespace(gpu=prompt_len.to(device)),
                            total_len=SimpleNamespace(gpu=total_len.to(device)))
    mapping = torch.tensor(slots, dtype=torch.int32)
    ctx = SimpleNamespace(expanded_idx_mapping=mapping.to(device), idx_mapping=mapping.to(device),
                          idx_mapping_np=mapping.numpy().astype(np.int32))
    return state, ctx


@pytest.mark.parametrize("device", DEVICES)
def test_mrv2_equals_v1_from_the_device_history(engine, device):
    v1, outputs = _v1_processor(engine)
    scores = torch.randn(len(BATCH), VOCAB, generator=torch.Generator().manual_seed(8))
    expected = v1.apply(scores.clone())
    slots = [5, 0, 3, 1, 6]  # rows map to recycled slots in any order
    state, ctx = _mrv2_state(outputs, slots, device)
    processor = akv._MRV2Processor(_vllm_config(), state)
    needs = [processor.add_request(slot, _params(s)) for slot, (s, _) in zip(slots, BATCH)]
    assert needs == [s is not None for s, _ in BATCH]
    if device == "cuda":  # the step reads nothing back from the device
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        out = processor.apply(scores.to(device), ctx)
    finally:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(out.cpu(), expected, rtol=0, atol=1e-5, equal_nan=True)


def test_mrv2_refuses_speculative_decoding(engine):
    state, _ = _mrv2_state([[]], [0], "cpu")
    config = _vllm_config()
    config.speculative_config = object()
    with pytest.raises(ValueError, match="speculative decoding"):
        akv._MRV2Processor(config, state)


@pytest.mark.parametrize("extra, match", [
    ({"lam": 0.5}, "arrag_daid_image_token_offset .* is required"),
    ({"image_token_offset": OFFSET, "lam": 2.0}, "DAiDConfig.lam"),
    ({"image_token_offset": OFFSET, "heads": 2}, "unknown DAiD keys \\['arrag_daid_heads'\\]"),
    ({"lam": 0.5, "image_token_offset": None}, "arrag_daid_image_token_offset: expected an int"),
    ({"image_token_offset": OFFSET, "grid": [4]}, "expected \\[H, W\\]"),
    ({"image_token_offset": OFFSET, "top_p": 1.5}, "arrag_daid_top_p in \\[0, 1\\]"),
], ids=["no-offset", "lam", "unknown", "offset-type", "grid", "top-p"])
def test_request_settings_errors_name_the_key(extra, match):
    with pytest.raises((ValueError, TypeError), match=match):
        akv.RequestDAiD.from_extra_args({f"arrag_daid_{key}": value for key, value in extra.items()})


def test_request_settings_parse_and_plain_requests_pass():
    extra = {"arrag_daid_image_token_offset": 9, "arrag_daid_start": 2, "arrag_daid_grid": [4, 5], "arrag_daid_k": 7,
             "arrag_daid_gate": ["max_prob", 0.5], "arrag_daid_top_k": 3, "session_id": "other keys are not ours"}
    settings = akv.RequestDAiD.from_extra_args(extra)
    assert settings == akv.RequestDAiD(ak.DAiDConfig(k=7, gate=("max_prob", 0.5)), 9, 2, (4, 5), top_k=3)
    assert akv.RequestDAiD.from_extra_args(None) is None and akv.RequestDAiD.from_extra_args({"other": 1}) is None
    assert akv.validate_request(_params(None, temperature=0.3)) is None  # vLLM's own sampling for others


@pytest.mark.parametrize("name, value", [("temperature", 0.7), ("top_k", 20), ("top_p", 0.9), ("min_p", 0.1),
                                         ("repetition_penalty", 1.2)])
def test_daid_requests_need_vllm_sampling_neutral(name, value):
    assert akv.validate_request(_params({}, temperature=0.0)) is not None  # greedy is neutral
    with pytest.raises(ValueError, match=f"must leave vLLM's {name}"):
        akv.validate_request(_params({}, **{name: value}))


def test_admission_checks_the_engine_database(engine):
    processor = akv._V1Processor(_vllm_config(), torch.device("cpu"))
    for settings, match in [({"grid": [5, 4]}, "holds \\[4, 5\\] grids"), ({"k": 1000}, "larger than the database"),
                            ({"image_token_offset": 40}, "beyond the vocabulary")]:
        with pytest.raises(ValueError, match=match):
            processor.update_state(_update(added=[(0, _params(settings), [1], [])]))


def test_engine_database_from_saved_files(engine, tmp_path):
    from safetensors.torch import save_file

    db, codebook = engine
    db.save(tmp_path / "db")
    save_file({"codebook": codebook}, str(tmp_path / "codebook.safetensors"))
    config = _vllm_config(str(tmp_path / "db"), codebook=str(tmp_path / "codebook.safetensors"))
    loaded, loaded_codebook = akv.engine_database(config)
    assert torch.equal(loaded.keys, db.keys) and torch.equal(loaded_codebook, codebook)
    assert akv.engine_database(config)[0] is loaded  # loaded once per process
    with pytest.raises(ValueError, match="no 'codebook' file"):
        akv.engine_database(_vllm_config(str(tmp_path / "db")))
    with pytest.raises(ValueError, match="neither a database directory nor a name registered"):
        akv.engine_database(_vllm_config(str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="needs its database in the engine config"):
        akv.engine_database(SimpleNamespace(additional_config={}))


def test_processor_classes_need_vllm_and_say_so():
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="needs vLLM >= 0.32"):
            akv.DAiDProcessor
    else:
        pytest.skip("vLLM is installed here: the classes are checked by tests/vllm_check.py")


def test_vllm_engine_check(tmp_path):
    """tests/vllm_check.py inside .venv-vllm: lam = 0 equals vLLM's own sampling (greedy and seeded), lam = 1
    draws only brute-force top-k tokens, other requests of the batch untouched, non-neutral settings refused."""
    if not VLLM_READY.exists():
        pytest.skip("no vLLM environment: .venv-vllm is absent or incomplete (scripts/setup_vllm.sh builds it; "
                    "CI runs it under a time budget and skips this test when it could not install)")
    result_file = tmp_path / "vllm_check.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the suite's interpreter switch
    run = subprocess.run([str(VLLM_PYTHON), str(ROOT / "tests" / "vllm_check.py"), str(result_file)], env=env,
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result_file.exists(), f"vllm_check.py wrote no result (exit {run.returncode}):\n{run.stderr[-4000:]}"
    result = json.loads(result_file.read_text())
    assert "error" not in result, result["error"]
    assert set(result["checks"]) == {"lam0", "lam1", "refused"}
    failed = {name: c["detail"] for name, c in result["checks"].items() if not c["passed"]}
    assert not failed, failed
    print(f"vLLM check: {result['versions']}, seconds {result['seconds']}", file=sys.stderr)
