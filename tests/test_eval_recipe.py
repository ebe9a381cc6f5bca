"""The paper-recipe study's pieces (issue 24 items 1, 5, 6): the RA-CM3 prefixed forward and sampler, paired
standard errors, the recipe's trainable parameters, and the README's tables printed from results.json."""

import json
from pathlib import Path

import pytest
import torch

from arrag_kernels.eval.nll import image_nll, paired_sem, teacher_forced_logits
from arrag_kernels.eval.sampling import generate_tokens, generate_with_prefix
from arrag_kernels.models import tiny_prompt_ids

ROOT = Path(__file__).parents[1]


def _tokens(n, seed=0):
    return torch.randint(0, 512, (n, 64), generator=torch.Generator().manual_seed(seed))


def test_prefix_sampler_without_prefix_is_the_library_loop(tiny_model):
    """generate_with_prefix (no KV cache, RA-CM3's sampler) draws exactly what generate_tokens draws when the
    prefix is empty: the same CFG distribution and the same random stream."""
    prompts = tiny_prompt_ids(3)
    empty = torch.zeros(3, 0, dtype=torch.long)
    for seed, w in ((3, 5.0), (4, 1.0)):
        torch.testing.assert_close(generate_with_prefix(tiny_model, empty, prompts, seed=seed, guidance_scale=w),
                                   generate_tokens(tiny_model, prompts, seed=seed, guidance_scale=w), rtol=0, atol=0)


def test_prefix_changes_the_distribution_and_keeps_teacher_forcing(tiny_model):
    prompts, tokens, prefix = tiny_prompt_ids(2), _tokens(2), _tokens(2, seed=1)
    with torch.no_grad():
        plain = teacher_forced_logits(tiny_model, prompts, tokens)
        empty = teacher_forced_logits(tiny_model, prompts, tokens, torch.zeros(2, 0, dtype=torch.long))
        with_prefix = teacher_forced_logits(tiny_model, prompts, tokens, prefix)
        changed_last = tokens.clone()
        changed_last[:, -1] = (changed_last[:, -1] + 1) % 512
        same = teacher_forced_logits(tiny_model, prompts, changed_last, prefix)
    torch.testing.assert_close(empty, plain)
    assert with_prefix.shape == plain.shape and not torch.allclose(with_prefix, plain)
    torch.testing.assert_close(same, with_prefix)  # the last token is never an input
    # image_nll scores the prefixed conditional distribution
    nll = image_nll(tiny_model, prompts, tokens, prefix_tokens=prefix).nll
    expected = -torch.log_softmax(with_prefix.float(), -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(nll, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"prefix_tokens: expected \(B, Q\)"):
        teacher_forced_logits(tiny_model, prompts, tokens, prefix[:1])


def test_prefix_and_blenders_are_refused(tiny_model, tiny_db):
    from arrag_kernels.faid import FAiDBlenders, FAiDConfig

    blenders = FAiDBlenders.for_model(tiny_model, FAiDConfig(k=4))
    with pytest.raises(ValueError, match="cannot be combined"):
        image_nll(tiny_model, tiny_prompt_ids(2), _tokens(2), tiny_db, blenders=blenders, prefix_tokens=_tokens(2))


def test_paired_sem_closed_form():
    a = torch.tensor([3.0, 5.0, 7.0, 9.0])
    b = torch.tensor([2.0, 3.0, 4.0, 5.0])  # differences 1, 2, 3, 4: std sqrt(5/3), n = 4
    assert paired_sem(a, b) == pytest.approx((5 / 3) ** 0.5 / 2, rel=1e-12)
    assert paired_sem(a, a + 1) == 0.0  # a constant shift has no spread
    with pytest.raises(ValueError, match="same images"):
        paired_sem(a, b[:3])


def test_recipe_trains_lora_and_head_only():
    pytest.importorskip("peft")
    from arrag_kernels.faid.train import base_finetune_params
    from arrag_kernels.models import tiny_janus

    model = tiny_janus(seed=0)
    params = base_finetune_params(model, lora_rank=2, train_head=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("model.generation_head.") for n in trainable)
    assert any("q_proj.lora_A" in n for n in trainable) and any("v_proj.lora_B" in n for n in trainable)
    assert {id(p) for p in params} == {id(p) for p in model.parameters() if p.requires_grad}
    assert not base_finetune_params(tiny_janus(seed=0), lora_rank=0, train_head=False)  # nothing trainable


def test_readme_tables_are_printed_from_results_json():
    """Every evaluation table of the README is what readme_tables prints from docs/miniature/results.json."""
    from arrag_kernels.miniature.evaluate import readme_tables

    results = json.loads((ROOT / "docs" / "miniature" / "results.json").read_text())
    readme = (ROOT / "README.md").read_text()
    tables = readme_tables(results)
    assert {"test", "paper_recipe", "daid_gate", "daid_sweep"} <= set(tables)
    for name, table in tables.items():
        assert table in readme, f"README's {name} table differs from readme_tables(results.json)[{name!r}]:\n{table}"


def test_add_studies_records_where_each_study_came_from(tmp_path):
    from arrag_kernels.miniature.evaluate import add_studies

    (tmp_path / "gate.json").write_text(json.dumps({"splits": {}, "command": "python scripts/daid_gate_curve.py"}))
    results = {"test": {"plain": {}}}
    merged = add_studies(results, {"daid_gate": tmp_path / "gate.json"})
    assert merged["daid_gate"]["splits"] == {} and merged["test"] == results["test"]
    assert merged["provenance"]["daid_gate"] == {"file": str(tmp_path / "gate.json"),
                                                 "command": "python scripts/daid_gate_curve.py"}
    assert "provenance" not in results  # the input is not modified
    with pytest.raises(ValueError, match="unknown study keys"):
        add_studies(results, {"gate": tmp_path / "gate.json"})
    with pytest.raises(FileNotFoundError, match="scripts/paper_recipe.py"):
        add_studies(results, {"paper_recipe": tmp_path / "missing.json"})


def test_eval_missing_studies_stops_before_any_work(tmp_path, monkeypatch, capsys):
    from arrag_kernels import cli
    from arrag_kernels.miniature import evaluate

    monkeypatch.setattr(evaluate, "MiniatureRun", lambda *a, **k: pytest.fail("the evaluation started"))
    assert cli.main(["eval", "--out", str(tmp_path / "out"), "--studies", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("arrag-kernels eval: error: daid_gate:") and "daid_gate_curve.py" in err[0]


def test_zero_retrieved_is_faid_without_its_retrieved_features(tiny_model, tiny_images):
    """image_nll(zero_retrieved=True): the blenders' output with every retrieved feature zero, so it does not
    depend on what the database holds, unlike FAiD with retrieval."""
    import arrag_kernels as ak
    from arrag_kernels.faid import FAiDBlenders, FAiDConfig

    torch.manual_seed(0)
    blenders = FAiDBlenders.for_model(tiny_model, FAiDConfig(k=4))
    with torch.no_grad():
        for p in blenders.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # blenders that matter
    prompts, tokens = tiny_prompt_ids(2), _tokens(2)
    dbs = [ak.PatchDatabase.build(tiny_images[i : i + 4], tiny_model, progress=False) for i in (0, 8)]
    real = [image_nll(tiny_model, prompts, tokens, db, blenders=blenders).nll for db in dbs]
    zero = [image_nll(tiny_model, prompts, tokens, db, blenders=blenders, zero_retrieved=True).nll for db in dbs]
    assert not torch.allclose(real[0], real[1])  # retrieval matters for FAiD ...
    torch.testing.assert_close(zero[0], zero[1], rtol=0, atol=0)  # ... and is gone in the ablation
    assert not torch.allclose(zero[0], real[0])
    assert not torch.allclose(zero[0], image_nll(tiny_model, prompts, tokens).nll)  # the blenders still act
    with pytest.raises(ValueError, match="pass blenders too"):
        image_nll(tiny_model, prompts, tokens, zero_retrieved=True)
