"""The miniature workload at tiny sizes: data, each training stage, the evaluation protocol and the demo."""

import argparse
import dataclasses
import math

import pytest
import torch

from arrag_kernels.miniature.data import EmojiEntry, emoji_available, load_emoji_dataset, split_by_base_name

needs_emoji = pytest.mark.skipif(not emoji_available(), reason="Debian packages fonts-noto-color-emoji and "
                                 "unicode-data are not installed (scripts/setup.sh installs them where it can)")


def test_split_keeps_variants_together():
    entries = [EmojiEntry(str(i), f"hand {i % 7}" + (": medium skin tone" if i % 2 else ""), "g", "s") for i in range(40)]
    split = split_by_base_name(entries, (0.6, 0.2, 0.2), seed=3)
    where = {}
    for e, s in zip(entries, split):
        assert where.setdefault(e.base_name, s) == s
    assert split == split_by_base_name(entries, (0.6, 0.2, 0.2), seed=3)  # seeded
    with pytest.raises(ValueError, match="summing to 1"):
        split_by_base_name(entries, (0.5, 0.2, 0.2))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """A few emoji rendered into a private cache and a model trained for a couple of steps."""
    if not emoji_available():
        pytest.skip("emoji Debian packages not installed")
    from arrag_kernels.miniature.train import BlenderConfig, MiniatureConfig, train_miniature

    root = tmp_path_factory.mktemp("mini")
    cfg = MiniatureConfig(limit=80, hidden_size=64, num_layers=2, vq_steps=2, lm_steps=2, clf_steps=2, vq_batch=4,
                          lm_batch=4, clf_batch=4, seed=1)
    meta = train_miniature(root / "w", cfg, progress=False, cache_dir=root / "cache",
                           blender_cfg=BlenderConfig(k=4, steps=2, batch=4, seed=1))
    return root, cfg, meta


@needs_emoji
def test_render_and_cache(quick_run):
    root, cfg, _ = quick_run
    ds = load_emoji_dataset(limit=80, seed=1, cache_dir=root / "cache", progress=False)  # from the cache
    assert ds.images.dtype == torch.uint8 and ds.images.shape[1:] == (32, 32, 3) and 60 <= len(ds) <= 80
    assert ds.images.float().std() > 10  # real, varied pictures, not blank canvases
    px = ds.pixels("train")
    assert px.shape[1] == 3 and -1 <= float(px.min()) and float(px.max()) <= 1
    assert not set(ds.names[i].split(":")[0] for i in ds.indices("train")) & set(
        ds.names[i].split(":")[0] for i in ds.indices("test"))
    with pytest.raises(ValueError, match="empty"):
        load_emoji_dataset(limit=80, seed=1, cache_dir=root / "cache", fractions=(1.0, 0.0, 0.0),
                           progress=False).indices("val")


@needs_emoji
def test_quick_training_writes_loadable_model(quick_run):
    from arrag_kernels.miniature.train import load_miniature

    root, cfg, meta = quick_run
    assert meta["splits"]["train"] > 0 and all(torch.isfinite(torch.tensor(list(meta["losses_last50"].values()))))
    model, clf, meta2 = load_miniature(root / "w")
    assert meta2["config"] == dataclasses.asdict(cfg)
    w = model.model.vqmodel.quantize.embedding.weight
    torch.testing.assert_close(w.norm(dim=1), torch.ones(w.shape[0]), atol=2e-3, rtol=0)  # stored normalised (fp16)
    with pytest.raises(FileNotFoundError, match="no trained miniature model"):
        load_miniature(root / "cache")


@needs_emoji
def test_quick_blenders_stage(quick_run):
    from arrag_kernels.faid import FAiDConfig
    from arrag_kernels.miniature.data import load_emoji_dataset
    from arrag_kernels.miniature.train import blender_split, load_miniature, load_miniature_blenders

    root, cfg, meta = quick_run
    b = meta["blenders"]
    assert b["database_images"] > 0 and b["training_images"] > 0 and b["database_entries"] > 0
    assert math.isfinite(b["loss_first20"]) and math.isfinite(b["loss_last20"])
    model, _, _ = load_miniature(root / "w")
    blenders, bmeta = load_miniature_blenders(root / "w", model)
    assert blenders.config == FAiDConfig(k=4, hops=(1, 2), blenders=2)
    assert bmeta["config"]["hops"] == [1, 2] and bmeta["training_images"] == b["training_images"]
    assert next(blenders.parameters()).dtype == torch.float32
    # database and blender-training images never share a base name (no self-retrieval)
    ds = load_emoji_dataset(limit=80, seed=1, cache_dir=root / "cache", progress=False)
    db_idx, fit_idx = blender_split(ds, 0.7, 1)
    base = lambda idx: {ds.names[i].split(":")[0] for i in idx.tolist()}  # noqa: E731
    assert not base(db_idx) & base(fit_idx) and len(db_idx) + len(fit_idx) == len(ds.indices("train"))
    with pytest.raises(FileNotFoundError, match="no FAiD blenders"):
        load_miniature_blenders(root / "cache", model)


@needs_emoji
def test_quick_evaluation_protocol(quick_run):
    pytest.importorskip("pytorchfwd")
    pytest.importorskip("matplotlib")
    from arrag_kernels.miniature.evaluate import evaluate_miniature, format_results

    root, _, _ = quick_run
    out = root / "eval"
    from arrag_kernels.miniature.train import BlenderConfig

    r = evaluate_miniature(out, weights=root / "w", seeds=(0,), lams=(0.0, 0.5), taus=(1.0,), k=4, fig6_k=3,
                           progress=False, cache_dir=root / "cache", faid_hops=((1,),), faid_blenders=(1, 2),
                           blender_cfg=BlenderConfig(k=4, steps=1, batch=4, seed=1))
    sweep = r["faid_sweep"]
    assert [(c["hops"], c["blenders"]) for c in sweep["cells"]] == [("1", 1), ("1", 2)]
    assert sweep["chosen_by_val_fd"]["val_fd"] == min(c["val_fd"] for c in sweep["cells"])
    assert sweep["test"]["nll"]["images"] == r["splits"]["test"]
    assert {"plain", "faid(hops=12,b=2,k=4)", "vq_reconstruction"} <= set(r["test"])
    assert r["test"]["faid(hops=12,b=2,k=4)"]["nll"]["images"] == r["splits"]["test"]
    assert len(r["sweep"]["cells"]) == 2 and r["fig6"]["test"]["positions"] > 0
    assert "| plain |" in format_results(r)
    for name in ("results.json", "sweep_daid_val_fd.png", "fig6_retrieval_accuracy.png", "samples_plain.png",
                 "samples_faid.png", "sweep_faid_val_fd.png"):
        assert (out / name).stat().st_size > 0


def test_demo_falls_back_without_emoji(monkeypatch, tmp_path, capsys):
    import arrag_kernels.miniature.data as data
    from arrag_kernels.demo import main_demo

    monkeypatch.setattr(data, "FONT_PATHS", (str(tmp_path / "missing.ttf"),))
    args = argparse.Namespace(random_weights=False, out=tmp_path, grid=4, images=4, batch=1, seed=0, lam=0.5, k=4,
                              device="cpu")
    results = main_demo(args)
    assert "miniature demo unavailable: the emoji data is not installed" in capsys.readouterr().out
    assert "daid" in results and (tmp_path / "images" / "plain_0.png").is_file()


@needs_emoji
def test_evaluation_reports_progress_for_every_long_phase(quick_run, capsys):
    """Issue 21 item 8: the test-split metrics and Fig. 6 (minutes at full size) show progress bars."""
    pytest.importorskip("pytorchfwd")
    pytest.importorskip("matplotlib")
    from arrag_kernels.miniature.evaluate import evaluate_miniature

    root, _, _ = quick_run
    evaluate_miniature(root / "eval_progress", weights=root / "w", seeds=(0, 1), lams=(0.0,), taus=(1.0,), k=4,
                       fig6_k=3, progress=True, cache_dir=root / "cache")
    err = capsys.readouterr().err
    assert "sweep lam x tau" in err
    assert "test metrics" in err and "sampling seed 1" in err and "teacher-forced NLL" in err
    assert "Fig. 6 retrieval accuracy" in err


@needs_emoji
def test_quick_paper_recipe(quick_run):
    """FAiD the paper's way, its no-retrieval control and RA-CM3 (issue 24 items 1, 5): the val grid, the
    seeds, the paired errors; the grid's checkpoint at a budget is that budget's own run."""
    pytest.importorskip("pytorchfwd")
    pytest.importorskip("peft")
    from arrag_kernels.miniature.evaluate import MiniatureRun, faid_zero_retrieval, paper_recipe, ra_cm3_own_grid
    from arrag_kernels.miniature.finetune import RecipeConfig, finetune, recipe_from_dict
    from arrag_kernels.miniature.train import BlenderConfig

    root, _, _ = quick_run
    run = MiniatureRun(root / "w", progress=False, cache_dir=root / "cache")
    splits = [(*run.split(name), run.features(run.split(name)[1])) for name in ("val", "test")]
    recipe = RecipeConfig(batch=4, lora_rank=2, warmup_steps=1, blenders=BlenderConfig(k=4, seed=1))
    r = paper_recipe(run, *splits, lrs=(1e-3, 1e-2), step_budgets=(1, 3), seeds=(0, 1), recipe=recipe,
                     out=root)
    cells = r["grid"]["cells"]
    assert [(c["lr"], c["steps"]) for c in cells] == [(1e-3, 1), (1e-3, 3), (1e-2, 1), (1e-2, 3)]
    chosen = r["grid"]["chosen_by_val_nll"]
    assert chosen["val_nll"] == min(c["val_nll"] for c in cells)
    assert (r["recipe"]["lr"], r["recipe"]["steps"]) == (chosen["lr"], chosen["steps"])
    test = r["test"]
    for method in ("faid", "control", "ra-cm3"):
        m = test[method]
        assert [row["seed"] for row in m["seeds"]] == [0, 1]
        assert m["nll_all"] == pytest.approx(sum(row["nll_all"] for row in m["seeds"]) / 2, rel=1e-5)
        assert m["gain_vs_plain_all"] == pytest.approx(test["plain"]["nll_all"] - m["nll_all"], abs=1e-5)
        assert m["gain_vs_plain_all_sem"] > 0 and m["fd"]["std"] >= 0 and len(m["fd"]["values"]) == 2
    vs = test["faid_vs_control"]
    assert vs["gain_all"] == pytest.approx(test["control"]["nll_all"] - test["faid"]["nll_all"], abs=1e-5)
    assert len(vs["per_seed"]) == 2 and vs["gain_all_sem"] > 0
    assert (root / "samples_racm3_recipe.png").stat().st_size > 0
    own = ra_cm3_own_grid(run, *splits, lrs=(1e-3,), step_budgets=(1, 2), recipe=recipe)
    assert [c["steps"] for c in own["grid"]["cells"]] == [1, 2]
    assert own["grid"]["chosen_by_val_nll"]["val_nll"] == min(c["val_nll"] for c in own["grid"]["cells"])
    assert own["test"]["gain_vs_plain_all"] == pytest.approx(test["plain"]["nll_all"] - own["test"]["nll_all"], abs=1e-5)
    assert own["test"]["fd"] > 0 and own["test"]["gain_vs_plain_all_sem"] > 0
    # the retrieval ablation retrains the chosen FAiD: the same models as the recipe's (seeded), then zeroes
    ablation = faid_zero_retrieval(run, splits[1], recipe_from_dict(r["recipe"]), seeds=(0, 1))
    for row, faid_row in zip(ablation["seeds"], test["faid"]["seeds"]):
        assert row["nll_all"] == pytest.approx(faid_row["nll_all"], rel=1e-6)
    assert ablation["all"]["retrieval_gain"] == pytest.approx(
        ablation["all"]["nll_zero_retrieved"] - ablation["all"]["nll"], abs=1e-6)
    assert ablation["all"]["retrieval_gain_sem"] > 0

    # the state after step 1 of a 3-step run is a 1-step run's (the schedule ignores the budget)
    seen = {}
    longer = finetune(run.model, run.classifier, run.ds, RecipeConfig(method="control", steps=3, batch=4, lora_rank=2,
                      warmup_steps=1), checkpoints=(1,), on_checkpoint=lambda s, ft: seen.setdefault(
                      s, [p.detach().clone() for p in ft.model.parameters()]), progress=False)
    short = finetune(run.model, run.classifier, run.ds, RecipeConfig(method="control", steps=1, batch=4, lora_rank=2,
                     warmup_steps=1), progress=False)
    for a, b in zip(seen[1], short.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert all(torch.equal(a, b) for a, b in zip(seen[3], longer.model.parameters()))  # the last step's state
    assert not all(torch.equal(a, b) for a, b in zip(seen[1], seen[3]))
    # the base model is untouched by fine-tuning (each run trains a copy)
    assert not any("lora_" in n for n, _ in run.model.named_parameters())
