"""The miniature run's evaluation: every table and figure of the README's results section.

Protocol (all seeded):

* database: the train split, encoded by the model's VQ (official key layout: causal hop 1,
  encoder latents, border skip);
* DAiD sweep lam x tau on the **val** split: teacher-forced NLL and Frechet distance of one sample
  per val prompt (sampling seed 0); the chosen cell minimises val FD (the paper chooses by FID);
* **test** split: plain vs DAiD(chosen) vs FAiD (the blenders shipped beside the weights, see
  ``train.train_blenders``; retrieving from the same train-split database) for ``seeds`` sampling
  seeds: Frechet distance in the emoji classifier's features, FWD, precision/recall (mean and std
  over seeds), teacher-forced NLL (deterministic; standard error over images), plus the VQ
  reconstruction floor;
* optional FAiD sweep hops x blenders (:func:`faid_sweep`, the second half of Fig. 7): blenders
  trained per cell by the shipped ones' recipe, val NLL and val FD, the best val-FD cell on test;
* Fig. 6: retrieval accuracy on up to 1,000 train images (the paper's setting: their own patches
  are in the database) and on the test images (never in it);
* optional paper recipe (:func:`paper_recipe`): FAiD fine-tuned with LoRA q/v + blenders + head,
  learning rate and steps chosen on val, its no-retrieval control and the RA-CM3 baseline
  (:mod:`.finetune`), several training seeds, paired standard errors on test;
* optional studies computed by their own scripts (gate curve, wider DAiD sweep; :func:`add_studies`).

:func:`readme_tables` prints the README's evaluation tables from a ``results.json``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch

from ..config import DAiDConfig
from ..eval.features import extract
from ..eval.metrics import frechet_distance, fwd, precision_recall
from ..eval.nll import image_nll
from ..eval.retrieval import retrieval_accuracy
from ..eval.sampling import decode_tokens, generate_tokens, generate_with_prefix, image_grid
from ..eval.sweep import best_cell, save_heatmap, save_json, sweep_grid
from .data import load_emoji_dataset
from .finetune import recipe_from_dict
from .train import (WEIGHTS_DIR, BlenderConfig, MiniatureConfig, dataset_prompts, encode_tokens, load_miniature,
                    load_miniature_blenders, progress_bar)

# Why results.json has no CLIP score / CMMD (arrag_kernels.eval.clip_score / cmmd exist for real images).
CLIP_NOTE = ("not computed: no local CLIP model is available (nothing can be downloaded here), and the miniature's "
             "prompts are class labels, not captions, so a CLIP score would measure how well an outside CLIP reads "
             "32 px emoji as their subgroup names; the classifier-feature FD stands in for both")
DEFAULT_LAMS = (0.0, 0.05, 0.1, 0.2, 0.4)
DEFAULT_TAUS = (0.3, 0.6, 1.2)


class MiniatureRun:
    """The trained model, classifier, dataset and train-split database of one miniature run."""

    def __init__(self, weights=None, progress: bool = True, cache_dir=None):
        import arrag_kernels as ak

        self.model, self.classifier, self.meta = load_miniature(weights)
        cfg = MiniatureConfig(**self.meta["config"])
        self.ds = load_emoji_dataset(size=cfg.size, limit=cfg.limit, seed=cfg.seed, cache_dir=cache_dir,
                                     progress=progress)
        self.db = ak.PatchDatabase.build(self.ds.pixels("train"), self.model, progress=progress)
        self.progress = progress
        # FAiD blenders (None when the run has none)
        has_blenders = (Path(weights or WEIGHTS_DIR) / "blenders.safetensors").is_file()
        self.blenders, self.blender_meta = (load_miniature_blenders(weights, self.model) if has_blenders
                                            else (None, None))

    def split(self, name: str):
        """(prompts (n, 4), pixels (n, 3, S, S), tokens (n, N)) of a split."""
        idx = self.ds.indices(name)
        pixels = self.ds.pixels(name)
        return dataset_prompts(self.ds, idx), pixels, encode_tokens(self.model, pixels)

    def features(self, pixels):
        return extract(self.classifier, pixels)

    def sample(self, prompts, daid: DAiDConfig | None, seed: int, cfg: float, blenders=None, model=None,
               prefix_tokens=None):
        """Pixels of one sample per prompt: plain, DAiD (``daid``), FAiD (``blenders``) or both; ``model``:
        a fine-tuned copy instead of the run's; ``prefix_tokens``: RA-CM3's retrieved image before each
        prompt (:func:`arrag_kernels.eval.sampling.generate_with_prefix`, no DAiD / FAiD)."""
        model = self.model if model is None else model
        if prefix_tokens is not None:
            tokens = generate_with_prefix(model, prefix_tokens, prompts, seed=seed, guidance_scale=cfg)
        else:
            db = self.db if daid is not None or blenders is not None else None
            tokens = generate_tokens(model, prompts, db, daid, seed=seed, guidance_scale=cfg, blenders=blenders)
        return decode_tokens(model, tokens)

    def nll_result(self, prompts, tokens, daid: DAiDConfig | None = None, blenders=None, model=None,
                   prefix_tokens=None, zero_retrieved: bool = False):
        """:func:`image_nll` (per image and position) of one method (arguments as :meth:`sample`;
        ``zero_retrieved``: FAiD's ablation, as :func:`image_nll`)."""
        db = self.db if daid is not None or blenders is not None else None
        return image_nll(self.model if model is None else model, prompts, tokens, db, daid, blenders=blenders,
                         prefix_tokens=prefix_tokens, zero_retrieved=zero_retrieved)

    def nll(self, prompts, tokens, daid: DAiDConfig | None = None, blenders=None) -> dict:
        return self.nll_result(prompts, tokens, daid, blenders).summary()

    def faid_name(self) -> str:
        c = self.blenders.config
        return f"faid(hops={''.join(map(str, c.hops))},b={c.blenders},k={c.k})"


def split_metrics(run: MiniatureRun, split, seeds, cfg: float, daid=None, blenders=None, grid_path=None,
                  bar=None) -> dict:
    """NLL and, per sampling seed, FD / FWD / precision / recall of one method on a split
    (``split``: (prompts, pixels, tokens, features)); the first seed's samples go to ``grid_path``.
    ``bar``: a progress bar advanced once per seed and once for the NLL (None: a bar of its own)."""
    prompts, real, tokens, real_f = split
    own = progress_bar(len(seeds) + 1, "test metrics", run.progress) if bar is None else contextlib.nullcontext(bar)
    with own as bar:
        return _split_metrics(run, prompts, real, tokens, real_f, seeds, cfg, daid, blenders, grid_path, bar)


def sample_metrics(run: MiniatureRun, real, real_f, fake) -> dict:
    """FD (classifier features), FWD, precision and recall of generated pixels ``fake`` against ``real``
    (``real_f``: its features)."""
    fake_f = run.features(fake)
    pr = precision_recall(real_f, fake_f)
    return {"fd": frechet_distance(real_f, fake_f), "fwd": fwd(real, fake), "precision": pr["precision"],
            "recall": pr["recall"]}


SAMPLE_METRICS = ("fd", "fwd", "precision", "recall")


def _split_metrics(run, prompts, real, tokens, real_f, seeds, cfg, daid, blenders, grid_path, bar) -> dict:
    per_seed = []
    for seed in seeds:
        bar.set_postfix_str(f"sampling seed {seed}")
        fake = run.sample(prompts, daid, seed=seed, cfg=cfg, blenders=blenders)
        per_seed.append(sample_metrics(run, real, real_f, fake))
        if seed == seeds[0] and grid_path is not None:
            image_grid(fake[:128]).save(grid_path)
        bar.update()
    bar.set_postfix_str("teacher-forced NLL")
    nll = run.nll(prompts, tokens, daid, blenders)
    bar.update()
    return {"nll": nll, **{m: _mean_std([r[m] for r in per_seed]) for m in SAMPLE_METRICS}}


def faid_sweep(run: MiniatureRun, val, test, hops=((1,), (1, 2)), blenders=(1, 2), seeds=(0, 1, 2),
               cfg: float = 5.0, blender_cfg: BlenderConfig = BlenderConfig(), out=None) -> dict:
    """FAiD hops x number of blenders: per cell, blenders trained by ``train_blenders`` (``blender_cfg``
    with the cell's hops and blenders), val NLL and val FD of one sample per prompt (seed 0); the
    lowest val FD cell is reported on ``test`` (:func:`split_metrics`). ``val`` / ``test``:
    (prompts, pixels, tokens, features). Heatmaps ``sweep_faid_val_{fd,nll}.png`` go to ``out``."""
    from .train import train_blenders

    trained = {}

    def cell(h: str, b: int) -> dict:
        c = dataclasses.replace(blender_cfg, hops=tuple(int(x) for x in h), blenders=b)
        trained[(h, b)], losses, _ = train_blenders(run.model, run.ds, c, run.progress)
        nll = run.nll(val[0], val[2], None, trained[(h, b)])
        fake = run.sample(val[0], None, seed=0, cfg=cfg, blenders=trained[(h, b)])
        return {"val_nll": nll["nll_all"], "val_nll_retrieval": nll["nll_retrieval"],
                "val_fd": frechet_distance(val[3], run.features(fake)),
                "train_loss_last20": statistics.fmean(losses[-20:])}

    rows = ["".join(map(str, h)) for h in hops]  # the paper's spelling: "12" = hops 1 and 2
    sweep = sweep_grid(cell, rows, list(blenders), row_name="hops", col_name="blenders", progress=run.progress)
    chosen = best_cell(sweep, "val_fd")
    sweep["chosen_by_val_fd"] = chosen
    sweep["test"] = split_metrics(run, test, seeds, cfg, None, trained[(chosen["hops"], chosen["blenders"])])
    if out is not None:
        save_heatmap(sweep, "val_fd", Path(out) / "sweep_faid_val_fd.png", "FAiD: val Frechet distance", "{:.2f}")
        save_heatmap(sweep, "val_nll", Path(out) / "sweep_faid_val_nll.png", "FAiD: val NLL (nats/token)")
    return sweep


RECIPE_LRS = (2e-4, 1e-3)  # the paper's and the shipped blenders'
RECIPE_STEPS = (28, 55, 110)  # 1/2, 1 and 2 epochs of the 883 blender-training images at batch 16 (paper: 1 epoch)
RA_CM3_LRS = (2e-4, 1e-3, 5e-3)  # its own grid reaches higher: a new input layout to learn


def ra_cm3_prefix(run: MiniatureRun, prompts):
    """RA-CM3's retrieved image for each prompt at evaluation: the top-1 train-split image
    (:class:`.finetune.ImageRetrieval`), as VQ tokens."""
    from .finetune import ImageRetrieval

    train_pixels = run.ds.pixels("train")
    return ImageRetrieval(run.classifier, train_pixels, encode_tokens(run.model, train_pixels)).retrieve(prompts)


def recipe_grid(run: MiniatureRun, val, method: str, lrs, step_budgets, seed: int, recipe) -> tuple:
    """``method`` (:data:`.finetune.METHODS`) fine-tuned by ``recipe`` for every learning rate of ``lrs``
    (training seed ``seed``), its val NLL (all positions) after each budget of ``step_budgets`` (one run
    per learning rate, read at checkpoints). Returns (cells, the lowest val NLL cell, {(lr, steps): (model,
    blenders, train_s, losses)})."""
    from .finetune import finetune

    prefix = ra_cm3_prefix(run, val[0]) if method == "ra-cm3" else None
    cells, states = [], {}
    for lr in lrs:
        def checkpoint(step, ft, lr=lr):
            nll = run.nll_result(val[0], val[2], None, ft.blenders, model=ft.model, prefix_tokens=prefix).summary()
            cells.append({"lr": lr, "steps": step, "val_nll": nll["nll_all"], "val_nll_retrieval": nll["nll_retrieval"],
                          "train_s": ft.train_s, "loss_last10": statistics.fmean(ft.losses[-10:])})
            states[(lr, step)] = copy.deepcopy((ft.model, ft.blenders, ft.train_s, ft.losses))

        finetune(run.model, run.classifier, run.ds, dataclasses.replace(
            recipe, method=method, lr=lr, steps=max(step_budgets), seed=seed), step_budgets, checkpoint, run.progress)
    return cells, min(cells, key=lambda c: c["val_nll"]), states


def ra_cm3_own_grid(run: MiniatureRun, val, test, lrs=RA_CM3_LRS, step_budgets=RECIPE_STEPS, seed: int = 0,
                    cfg: float = 5.0, recipe=None, sample_seed: int = 0) -> dict:
    """RA-CM3 with its own learning rate and steps chosen on val (:func:`recipe_grid`, training seed ``seed``),
    then on test: NLL with the paired standard error of its gain over the base model, and the sample
    metrics of one sample per test prompt (one training seed: the prefix sampler has no KV cache)."""
    from ..eval.nll import paired_sem
    from .finetune import RecipeConfig

    t0 = time.perf_counter()
    cells, chosen, states = recipe_grid(run, val, "ra-cm3", lrs, step_budgets, seed, recipe or RecipeConfig())
    model, _, train_s, _ = states[(chosen["lr"], chosen["steps"])]
    prompts, real, tokens, real_f = test
    prefix = ra_cm3_prefix(run, prompts)
    plain, result = run.nll_result(prompts, tokens), run.nll_result(prompts, tokens, model=model, prefix_tokens=prefix)
    r = plain.retrieval
    plain_all, plain_ret, m_all, m_ret = plain.nll.mean(1), plain.nll[:, r].mean(1), result.nll.mean(1), result.nll[:, r].mean(1)
    fake = run.sample(prompts, None, sample_seed, cfg, model=model, prefix_tokens=prefix)
    return {"grid": {"lr": list(lrs), "steps": list(step_budgets), "seed": seed, "chosen_by_val_nll": chosen,
                     "cells": cells},
            "test": {"nll_all": float(m_all.mean()), "nll_retrieval": float(m_ret.mean()),
                     "gain_vs_plain_all": float((plain_all - m_all).mean()),
                     "gain_vs_plain_all_sem": paired_sem(plain_all, m_all),
                     "gain_vs_plain_retrieval": float((plain_ret - m_ret).mean()),
                     "gain_vs_plain_retrieval_sem": paired_sem(plain_ret, m_ret),
                     **sample_metrics(run, real, real_f, fake), "train_s": train_s},
            "wall_s": time.perf_counter() - t0}


def faid_zero_retrieval(run: MiniatureRun, test, recipe, seeds=(0, 1, 2)) -> dict:
    """FAiD trained by ``recipe`` (a :class:`.finetune.RecipeConfig`, e.g. the paper recipe's chosen one) for
    each training seed, scored on test with its retrieval and with zero retrieved features at every
    position (``image_nll(zero_retrieved=True)``): how much of the trained model's NLL comes from the
    retrieved content rather than from the blenders' context term. NLL averaged over the seeds per image;
    gains with paired standard errors over the test images."""
    from ..eval.nll import paired_sem
    from .finetune import finetune

    t0 = time.perf_counter()
    prompts, _, tokens, _ = test
    plain = run.nll_result(prompts, tokens)
    r = plain.retrieval
    per_image = lambda res: (res.nll.mean(1), res.nll[:, r].mean(1))  # noqa: E731
    rows, real, zero = [], [], []
    for seed in seeds:
        ft = finetune(run.model, run.classifier, run.ds, dataclasses.replace(recipe, method="faid", seed=seed),
                      progress=run.progress)
        real.append(per_image(run.nll_result(prompts, tokens, None, ft.blenders, model=ft.model)))
        zero.append(per_image(run.nll_result(prompts, tokens, None, ft.blenders, model=ft.model, zero_retrieved=True)))
        rows.append({"seed": seed, "nll_all": float(real[-1][0].mean()), "nll_all_zero_retrieved": float(zero[-1][0].mean()),
                     "train_s": ft.train_s})
    out = {"recipe": {k: v for k, v in recipe.to_dict().items() if k not in ("method", "seed")}, "seeds": rows,
           "plain": {"nll_all": float(per_image(plain)[0].mean()), "nll_retrieval": float(per_image(plain)[1].mean())}}
    for i, where in enumerate(("all", "retrieval")):
        a = torch.stack([x[i] for x in real]).mean(0)
        z = torch.stack([x[i] for x in zero]).mean(0)
        p = per_image(plain)[i]
        out[where] = {"nll": float(a.mean()), "nll_zero_retrieved": float(z.mean()),
                      "retrieval_gain": float((z - a).mean()), "retrieval_gain_sem": paired_sem(z, a),
                      "zero_retrieved_gain_vs_plain": float((p - z).mean()),
                      "zero_retrieved_gain_vs_plain_sem": paired_sem(p, z)}
    out["wall_s"] = time.perf_counter() - t0
    return out


def paper_recipe(run: MiniatureRun, val, test, lrs=RECIPE_LRS, step_budgets=RECIPE_STEPS, seeds=(0, 1, 2),
                 cfg: float = 5.0, recipe=None, sample_seed: int = 0, out=None) -> dict:
    """FAiD fine-tuned the paper's way, its no-retrieval control and the RA-CM3 baseline
    (:mod:`.finetune`), on the test split with paired standard errors.

    1. FAiD (training seed ``seeds[0]``) for every learning rate of ``lrs``, its val NLL (all positions)
       after each step budget of ``step_budgets`` (one run per learning rate: the states at the
       budgets); the lowest val NLL chooses (lr, steps).
    2. With those settings, FAiD, the control and RA-CM3 for every training seed (FAiD's first seed
       is the grid's run): test NLL per image (FAiD retrieving from the train-split database, RA-CM3
       its top-1 train image) and the sample metrics of one sample per test prompt (sampling seed
       ``sample_seed``, CFG ``cfg``).
    3. Per method: NLL averaged over the seeds per image, with the paired standard error over the
       test images of its gain over the base model; FAiD - control likewise, and per seed; sample
       metrics as mean and std over the training seeds.

    ``val`` / ``test``: (prompts, pixels, tokens, features). ``out``: where ``samples_<method>.png``
    (first seed) go."""
    from ..eval.nll import paired_sem
    from .finetune import METHODS, RecipeConfig, finetune

    recipe = recipe or RecipeConfig()
    t0 = time.perf_counter()
    grid, chosen, states = recipe_grid(run, val, "faid", lrs, step_budgets, seeds[0], recipe)
    best = dataclasses.replace(recipe, lr=chosen["lr"], steps=chosen["steps"])

    prompts, real, tokens, real_f = test
    ra_prefix = ra_cm3_prefix(run, prompts)
    plain = run.nll_result(prompts, tokens)
    r = plain.retrieval
    per_image = lambda res: (res.nll.mean(1), res.nll[:, r].mean(1))  # noqa: E731
    plain_all, plain_ret = per_image(plain)
    methods = {}
    for method in METHODS:
        rows, nlls = [], []
        for seed in seeds:
            if method == "faid" and seed == seeds[0]:
                model, blenders, train_s, losses = states[(chosen["lr"], chosen["steps"])]
            else:
                ft = finetune(run.model, run.classifier, run.ds, dataclasses.replace(best, method=method, seed=seed),
                              progress=run.progress)
                model, blenders, train_s, losses = ft.model, ft.blenders, ft.train_s, ft.losses
            prefix = ra_prefix if method == "ra-cm3" else None
            result = run.nll_result(prompts, tokens, None, blenders, model=model, prefix_tokens=prefix)
            fake = run.sample(prompts, None, sample_seed, cfg, blenders, model=model, prefix_tokens=prefix)
            if seed == seeds[0] and out is not None:
                image_grid(fake[:128]).save(Path(out) / f"samples_{method.replace('-', '')}_recipe.png")
            nlls.append(per_image(result))
            rows.append({"seed": seed, "nll_all": float(nlls[-1][0].mean()), "nll_retrieval": float(nlls[-1][1].mean()),
                         **sample_metrics(run, real, real_f, fake), "train_s": train_s,
                         "loss_last10": statistics.fmean(losses[-10:])})
        m_all = torch.stack([n[0] for n in nlls]).mean(0)
        m_ret = torch.stack([n[1] for n in nlls]).mean(0)
        methods[method] = {
            "nll_all": float(m_all.mean()), "nll_retrieval": float(m_ret.mean()),
            "gain_vs_plain_all": float((plain_all - m_all).mean()), "gain_vs_plain_all_sem": paired_sem(plain_all, m_all),
            "gain_vs_plain_retrieval": float((plain_ret - m_ret).mean()),
            "gain_vs_plain_retrieval_sem": paired_sem(plain_ret, m_ret),
            **{m: _mean_std([row[m] for row in rows]) for m in SAMPLE_METRICS}, "seeds": rows,
            "per_image": (m_all, m_ret, nlls)}
    faid, control = methods["faid"]["per_image"], methods["control"]["per_image"]
    vs_control = {"gain_all": float((control[0] - faid[0]).mean()), "gain_all_sem": paired_sem(control[0], faid[0]),
                  "gain_retrieval": float((control[1] - faid[1]).mean()),
                  "gain_retrieval_sem": paired_sem(control[1], faid[1]),
                  "per_seed": [{"seed": s, "gain_all": float((c[0] - f[0]).mean()), "gain_all_sem": paired_sem(c[0], f[0]),
                                "gain_retrieval": float((c[1] - f[1]).mean()),
                                "gain_retrieval_sem": paired_sem(c[1], f[1])}
                               for s, f, c in zip(seeds, faid[2], control[2])]}
    for m in methods.values():
        del m["per_image"]
    return {"what": "LoRA q/v + head (+ FAiD blenders) fine-tuning, the paper's recipe (arrag_kernels.miniature.finetune); "
                    "NLL in nats/token of the test images, conditional distribution, averaged over training seeds per "
                    "image; gains = plain (or control) - method per image, mean and paired standard error over images; "
                    "sample metrics: one sample per test prompt per training seed, mean and std over the seeds",
            "recipe": {k: v for k, v in best.to_dict().items() if k not in ("method", "seed")},
            "grid": {"lr": list(lrs), "steps": list(step_budgets), "seed": seeds[0], "chosen_by_val_nll": chosen,
                     "cells": grid},
            "seeds": list(seeds), "sample_seed": sample_seed, "cfg": cfg,
            "test": {"plain": {"nll_all": float(plain_all.mean()), "nll_retrieval": float(plain_ret.mean())}, **methods,
                     "faid_vs_control": vs_control},
            "wall_s": time.perf_counter() - t0}


def _mean_std(xs: list[float]) -> dict:
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "values": xs}


def evaluate_miniature(out: str | Path = "eval_out", weights=None, seeds=(0, 1, 2), lams=DEFAULT_LAMS,
                       taus=DEFAULT_TAUS, k: int = 256, cfg: float = 5.0, fig6_k: int = 32, progress: bool = True,
                       cache_dir=None, faid_hops=None, faid_blenders=None,
                       blender_cfg: BlenderConfig = BlenderConfig(), recipe_seeds=None, studies_dir=None) -> dict:
    """Run the protocol above; write ``results.json``, heatmaps, the Fig. 6 plot and sample grids to ``out``
    (``results.json`` is also written after each phase, so an interrupted run leaves what it finished).

    ``faid_hops`` (e.g. ``((1,), (1, 2))``) and ``faid_blenders`` (e.g. ``(1, 2)``) run :func:`faid_sweep`
    (it trains blenders for every cell; both None: no sweep). ``recipe_seeds`` (e.g. ``(0, 1, 2)``) runs
    :func:`paper_recipe` with those training seeds (FAiD the paper's way, its control, RA-CM3; None: not
    run; also :func:`ra_cm3_own_grid` with the first seed). ``studies_dir``: a directory holding ``gate.json`` and ``daid_sweep.json`` (written by
    ``scripts/daid_gate_curve.py`` and ``scripts/daid_sweep.py``), copied into ``results.json`` as
    ``daid_gate`` and ``daid_sweep``."""
    # the studies' files are read first: a missing one stops the run before any work
    studies = add_studies({}, {"daid_gate": Path(studies_dir) / "gate.json",
                               "daid_sweep": Path(studies_dir) / "daid_sweep.json"}) if studies_dir is not None else {}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    run = MiniatureRun(weights, progress, cache_dir)
    val_p, val_x, val_t = run.split("val")
    test_p, test_x, test_t = run.split("test")
    val_f, test_f = run.features(val_x), run.features(test_x)
    k = min(k, len(run.db))
    results = {"weights": run.meta, "database_entries": len(run.db), "k": k, "cfg": cfg, "seeds": list(seeds),
               "splits": {s: int(run.ds.split.count(s)) for s in ("train", "val", "test")},
               "clip_score_cmmd": CLIP_NOTE}

    # DAiD sweep on val: NLL (teacher-forced) and FD of one sample per prompt.
    nll_cache = {}

    def val_cell(lam, tau):
        daid = DAiDConfig(lam=lam, tau=tau, k=k) if lam > 0 else None
        key = (lam, tau) if lam > 0 else 0.0
        if key not in nll_cache:  # lam = 0 is the plain model whatever tau
            nll = run.nll(val_p, val_t, daid)
            fake = run.sample(val_p, daid, seed=0, cfg=cfg)
            nll_cache[key] = {"val_nll": nll["nll_all"], "val_nll_retrieval": nll.get("nll_retrieval"),
                              "val_fd": frechet_distance(val_f, run.features(fake))}
        return nll_cache[key]

    results = {**results, **studies}
    sweep = sweep_grid(val_cell, list(lams), list(taus), progress=progress)
    chosen = best_cell(sweep, "val_fd")
    chosen_nll = best_cell(sweep, "val_nll")
    results["sweep"] = {**sweep, "chosen_by_val_fd": chosen, "chosen_by_val_nll": chosen_nll}
    save_heatmap(sweep, "val_fd", out / "sweep_daid_val_fd.png", "DAiD: val Frechet distance (classifier features)")
    save_heatmap(sweep, "val_nll", out / "sweep_daid_val_nll.png", "DAiD: val NLL (nats/token)")
    save_json(results, out / "results.json")

    # Test: plain vs the chosen DAiD (and the NLL-chosen one when it differs), several sampling seeds.
    methods = {"plain": None}
    if chosen["lam"] > 0:
        methods[f"daid(lam={chosen['lam']},tau={chosen['tau']})"] = DAiDConfig(lam=chosen["lam"], tau=chosen["tau"], k=k)
    if chosen_nll["lam"] > 0 and (chosen_nll["lam"], chosen_nll["tau"]) != (chosen["lam"], chosen["tau"]):
        methods[f"daid(lam={chosen_nll['lam']},tau={chosen_nll['tau']})"] = DAiDConfig(
            lam=chosen_nll["lam"], tau=chosen_nll["tau"], k=k)
    methods = {name: (daid, None) for name, daid in methods.items()}
    if run.blenders is not None:
        methods[run.faid_name()] = (None, run.blenders)
        results["blenders"] = run.blender_meta
    test = {}
    split = (test_p, test_x, test_t, test_f)
    with progress_bar(len(methods) * (len(seeds) + 1), "test metrics", progress) as bar:
        for name, (daid, blenders) in methods.items():
            bar.set_description(f"test metrics: {name}")
            test[name] = split_metrics(run, split, seeds, cfg, daid, blenders,
                                       out / f"samples_{name.split('(')[0]}.png", bar)
    recon = decode_tokens(run.model, test_t)
    test["vq_reconstruction"] = {"fd": frechet_distance(test_f, run.features(recon)), "fwd": fwd(test_x, recon),
                                 **precision_recall(test_f, run.features(recon)),
                                 "mse": float((recon - test_x).square().mean())}
    image_grid(test_x[:128]).save(out / "real_test.png")
    image_grid(recon[:128]).save(out / "reconstruction_test.png")
    results["test"] = test

    # Fig. 6 (before the studies that train: a run stopped during them keeps it).
    with progress_bar(2, "Fig. 6 retrieval accuracy (train, test images)", progress) as bar:
        train_t = encode_tokens(run.model, run.ds.pixels("train")[:1000])
        fig6 = {"train": retrieval_accuracy(run.model, run.db, train_t, k=fig6_k)}
        bar.update()
        fig6["test"] = retrieval_accuracy(run.model, run.db, test_t, k=fig6_k)
        bar.update()
    results["fig6"] = fig6
    save_fig6(fig6, out / "fig6_retrieval_accuracy.png")
    save_json(results, out / "results.json")
    if recipe_seeds is not None:
        results["paper_recipe"] = paper_recipe(run, (val_p, val_x, val_t, val_f), split, seeds=tuple(recipe_seeds),
                                               cfg=cfg, out=out)
        results["ra_cm3_own_grid"] = ra_cm3_own_grid(run, (val_p, val_x, val_t, val_f), split, seed=recipe_seeds[0],
                                                     cfg=cfg)
        results["faid_zero_retrieval"] = faid_zero_retrieval(
            run, split, recipe_from_dict(results["paper_recipe"]["recipe"]), tuple(recipe_seeds))
        save_json(results, out / "results.json")
    if faid_hops is not None or faid_blenders is not None:
        results["faid_sweep"] = faid_sweep(run, (val_p, val_x, val_t, val_f), (test_p, test_x, test_t, test_f),
                                           faid_hops or ((1, 2),), faid_blenders or (2,), seeds, cfg, blender_cfg, out)
        save_json(results, out / "results.json")
    results["wall_s"] = time.perf_counter() - t_start
    save_json(results, out / "results.json")
    return results


# Studies that scripts compute on their own, each writing a JSON file: results.json key -> the script.
STUDY_SCRIPTS = {"daid_gate": "scripts/daid_gate_curve.py", "daid_sweep": "scripts/daid_sweep.py",
                 "paper_recipe": "scripts/paper_recipe.py", "ra_cm3_own_grid": "scripts/paper_recipe.py --ra-cm3-grid",
                 "faid_zero_retrieval": "scripts/paper_recipe.py --zero-retrieval"}


def add_studies(results: dict, studies: dict) -> dict:
    """``results`` with each study file's content (``studies``: key of :data:`STUDY_SCRIPTS` -> path) under its
    key, and ``provenance[key]`` naming the file and the command that wrote it."""
    unknown = sorted(set(studies) - set(STUDY_SCRIPTS))
    if unknown:
        raise ValueError(f"unknown study keys {unknown}; expected some of {sorted(STUDY_SCRIPTS)}")
    out = {**results, "provenance": dict(results.get("provenance", {}))}
    for key, path in studies.items():
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{key}: {str(path)!r} not found; write it with {STUDY_SCRIPTS[key]}")
        out[key] = json.loads(path.read_text())
        out["provenance"][key] = {"file": str(path), "command": out[key].get("command")}
    return out


def save_fig6(fig6: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4))
    for (name, curve), colour in zip(fig6.items(), ("C0", "C1")):
        ax.plot(curve["k"], curve["l2"], color=colour, label=f"k-th retrieved ({name} images)")
        ax.axhline(curve["random_l2"], color=colour, ls="--", label=f"random code ({name})")
    ax.set_xlabel("k (rank of the retrieved token)")
    ax.set_ylabel("l2 distance to ground truth (codebook)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _method_label(name: str, results: dict) -> str:
    """README wording of a ``results["test"]`` key."""
    if name == "plain":
        return "plain"
    if name.startswith("daid("):
        sweep = results["sweep"]
        why = [f"val {m}" for m, key in (("FD", "chosen_by_val_fd"), ("NLL", "chosen_by_val_nll"))
               if name == f"daid(lam={sweep[key]['lam']},tau={sweep[key]['tau']})"]
        lam, tau = name[len("daid(lam="):-1].split(",tau=")
        return f"DAiD lam {lam}, tau {tau} (chosen by {' and '.join(why)})"
    c = results["blenders"]["config"]
    return (f"FAiD hops {'+'.join(map(str, c['hops']))}, {c['blenders']} blenders, K = {c['k']} (official config; "
            f"shipped: blenders only, {c['steps']} steps)")


def _pm(metric: dict, fmt: str) -> str:
    return f"{metric['mean']:{fmt}} ± {metric['std']:{fmt}}"


def _test_row(label: str, r: dict) -> str:
    n = r["nll"]
    return (f"| {label} | {n['nll_all']:.3f} ± {n['nll_all_sem']:.3f} | {n['nll_retrieval']:.3f} ± "
            f"{n['nll_retrieval_sem']:.3f} | {_pm(r['fd'], '.2f')} | {_pm(r['fwd'], '.3f')} | "
            f"{_pm(r['precision'], '.3f')} | {_pm(r['recall'], '.3f')} |")


def format_results(results: dict) -> str:
    """The README's test table (Markdown): every method of ``results["test"]``, the FAiD sweep's
    val-chosen cell, the VQ floor."""
    lines = [f"| method (test, {results['splits']['test']} images) | NLL all | NLL at retrieval positions | "
             "FD (classifier) | FWD | precision | recall |", "|---|---|---|---|---|---|---|"]
    for name, r in results["test"].items():
        if name != "vq_reconstruction":
            lines.append(_test_row(_method_label(name, results), r))
    if "faid_sweep" in results:
        c = results["faid_sweep"]["chosen_by_val_fd"]
        hops = "hop 1" if c["hops"] == "1" else f"hops {'+'.join(c['hops'])}"
        lines.append(_test_row(f"FAiD {hops}, {c['blenders']} blender{'s' * (c['blenders'] > 1)} (chosen by val FD "
                               "in the sweep below)", results["faid_sweep"]["test"]))
    v = results["test"]["vq_reconstruction"]
    lines.append(f"| VQ reconstruction of the test images (tokenizer floor) | - | - | {v['fd']:.2f} | {v['fwd']:.3f} | "
                 f"{v['precision']:.3f} | {v['recall']:.3f} |")
    return "\n".join(lines)


RECIPE_LABELS = {"faid": "FAiD: LoRA q/v + blenders + head", "control": "control: LoRA q/v + head, no retrieval",
                 "ra-cm3": "RA-CM3: top-1 train image prepended, LoRA q/v + head"}


def _grid_table(grid: dict, title: str) -> list[str]:
    """A val grid (lr rows x step-budget columns, val NLL; the chosen cell in bold) as Markdown lines."""
    chosen = grid["chosen_by_val_nll"]
    lines = [f"| {title} | " + " | ".join(f"{s} steps" for s in grid["steps"]) + " |", "|---|" + "---|" * len(grid["steps"])]
    for lr in grid["lr"]:
        cells = {c["steps"]: c["val_nll"] for c in grid["cells"] if c["lr"] == lr}
        lines.append(f"| lr {lr:g} | " + " | ".join(
            (f"**{cells[s]:.4f}**" if (lr, s) == (chosen["lr"], chosen["steps"]) else f"{cells[s]:.4f}")
            for s in grid["steps"]) + " |")
    return lines


def _gains(m: dict) -> str:
    return (f"{m['nll_all']:.3f} | {m['gain_vs_plain_all']:.3f} ± {m['gain_vs_plain_all_sem']:.3f} | "
            f"{m['nll_retrieval']:.3f} | {m['gain_vs_plain_retrieval']:.3f} ± {m['gain_vs_plain_retrieval_sem']:.3f}")


def format_recipe(results: dict) -> str:
    """The paper-recipe tables (Markdown): the val grid(s), then test with paired standard errors."""
    pr = results["paper_recipe"]
    own = results.get("ra_cm3_own_grid")
    lines = _grid_table(pr["grid"], f"FAiD: val NLL (training seed {pr['grid']['seed']})")
    if own is not None:
        lines += [""] + _grid_table(own["grid"], f"RA-CM3: val NLL (training seed {own['grid']['seed']})")
    t = pr["test"]
    lines += ["", f"| test ({results['splits']['test']} images) | NLL all | gain vs plain (all) | NLL at retrieval "
              "positions | gain vs plain (retrieval positions) | FD (classifier) | FWD | precision | recall |",
              "|---|---|---|---|---|---|---|---|---|",
              f"| plain (base model; sample metrics over {len(results['seeds'])} sampling seeds, table above) | {t['plain']['nll_all']:.3f} | 0 | {t['plain']['nll_retrieval']:.3f} | 0 | "
              f"{_pm(results['test']['plain']['fd'], '.2f')} | {_pm(results['test']['plain']['fwd'], '.3f')} | "
              f"{_pm(results['test']['plain']['precision'], '.3f')} | {_pm(results['test']['plain']['recall'], '.3f')} |"]
    recipe = f"lr {pr['recipe']['lr']:g}, {pr['recipe']['steps']} steps, {len(pr['seeds'])} training seeds"
    for method, label in RECIPE_LABELS.items():
        m = t[method]
        lines.append(f"| {label} ({recipe}) | {_gains(m)} | {_pm(m['fd'], '.2f')} | {_pm(m['fwd'], '.3f')} | "
                     f"{_pm(m['precision'], '.3f')} | {_pm(m['recall'], '.3f')} |")
    if own is not None:
        c, m = own["grid"]["chosen_by_val_nll"], own["test"]
        lines.append(f"| RA-CM3, its own val grid (lr {c['lr']:g}, {c['steps']} steps, training seed "
                     f"{own['grid']['seed']}) | {_gains(m)} | {m['fd']:.2f} | {m['fwd']:.3f} | {m['precision']:.3f} | "
                     f"{m['recall']:.3f} |")
    zero = results.get("faid_zero_retrieval")
    if zero is not None:
        a, r = zero["all"], zero["retrieval"]
        lines.append(f"| FAiD with its retrieved features zeroed at test (the same models retrained) | "
                     f"{a['nll_zero_retrieved']:.3f} | {a['zero_retrieved_gain_vs_plain']:.3f} ± "
                     f"{a['zero_retrieved_gain_vs_plain_sem']:.3f} | {r['nll_zero_retrieved']:.3f} | "
                     f"{r['zero_retrieved_gain_vs_plain']:.3f} ± {r['zero_retrieved_gain_vs_plain_sem']:.3f} | - | - | - | - |")
        lines.append(f"| FAiD: retrieval's part (gain = zeroed - with retrieval) | - | {a['retrieval_gain']:.3f} ± "
                     f"{a['retrieval_gain_sem']:.3f} | - | {r['retrieval_gain']:.3f} ± {r['retrieval_gain_sem']:.3f} | - | "
                     "- | - | - |")
    v = t["faid_vs_control"]
    lines.append(f"| FAiD vs control (gain = control - FAiD) | - | {v['gain_all']:.3f} ± {v['gain_all_sem']:.3f} | - | "
                 f"{v['gain_retrieval']:.3f} ± {v['gain_retrieval_sem']:.3f} | - | - | - | - |")
    return "\n".join(lines)


def _share(x: float) -> str:
    return "< 0.1 %" if 0 < x < 5e-4 else f"{100 * x:.1f} %"


def format_gate(results: dict) -> str:
    """The DAiD gate table (Markdown) of ``results["daid_gate"]`` (``gate.json``)."""
    splits = results["daid_gate"]["splits"]
    names = ("val", "test")
    lines = ["| gate | " + " | ".join(f"{s}: searches saved | {s}: NLL at retrieval positions | {s}: gain vs plain"
                                      for s in names) + " |", "|---|" + "---|" * 6,
             "| plain (no DAiD) | " + " | ".join(f"100 % | {splits[s]['plain_nll_retrieval']:.3f} | 0" for s in names)
             + " |"]
    for i, row in enumerate(splits["val"]["gates"]):
        gate = row["gate"]
        label = ("none (DAiD everywhere)" if gate is None else f"max prob >= {gate[1]:g}" if gate[0] == "max_prob"
                 else f"entropy <= {gate[1]:g} nats")
        cells = []
        for s in names:
            r = splits[s]["gates"][i]
            cells.append(f"{_share(r['searches_saved'])} | {r['nll_retrieval']:.3f} | {r['gain_vs_plain']:.4f} ± "
                         f"{r['gain_vs_plain_sem']:.4f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_daid_sweep(results: dict) -> str:
    """The wider DAiD sweep table (Markdown) of ``results["daid_sweep"]`` (``daid_sweep.json``)."""
    ds = results["daid_sweep"]
    val = ds["val"]["cells"]
    key = lambda c: (c["lam"], c["tau"], c["dedup"], c["k"])  # noqa: E731
    best = {}
    for c in val:
        v = (c["dedup"], c["k"])
        if v not in best or c["nll_retrieval"] < best[v]["nll_retrieval"]:
            best[v] = c
    evaluation = results["sweep"]["chosen_by_val_nll"]
    t, plain = ds["test_conditional"], ds["test_conditional"]["plain"]
    lines = ["| DAiD cell (lam, tau, dedup, k) | chosen on val | val: NLL at retrieval positions | test: NLL at retrieval "
             "positions | test: NLL all | test: gain vs plain (retrieval positions) |", "|---|---|---|---|---|---|",
             f"| plain | - | {ds['val']['plain_nll_retrieval']:.3f} | {plain['nll_retrieval']:.3f} | "
             f"{plain['nll_all']:.3f} | 0 |"]
    for c in t["cells"]:
        if c["chosen_on_val"]:
            why = "**overall**"
        elif key(best[(c["dedup"], c["k"])]) == key(c):
            why = f"best {c['dedup']}, k {c['k']}"
        elif key(c) == (evaluation["lam"], evaluation["tau"], "nearest", results["k"]):
            why = "the evaluation's (val NLL, grid above)"
        else:
            raise ValueError(f"daid_sweep: the test cell {key(c)} is neither chosen nor a variant's best nor the "
                             "evaluation's")
        lines.append(f"| {c['lam']:g}, {c['tau']:g}, {c['dedup']}, {c['k']} | {why} | {c['val_nll_retrieval']:.3f} | "
                     f"{c['nll_retrieval']:.3f} | {c['nll_all']:.3f} | {c['gain_vs_plain']:.3f} ± "
                     f"{c['gain_vs_plain_sem']:.3f} |")
    return "\n".join(lines)


def format_faid_sweep(results: dict) -> str:
    """The FAiD hops x blenders val table (Markdown) of ``results["faid_sweep"]``."""
    fs = results["faid_sweep"]
    lines = ["| val (NLL / FD) | " + " | ".join(f"{b} blender{'s' * (b > 1)}" for b in fs["blenders"]) + " |",
             "|---|" + "---|" * len(fs["blenders"])]
    for h in fs["hops"]:
        cells = {c["blenders"]: c for c in fs["cells"] if c["hops"] == h}
        label = "hop 1" if h == "1" else f"hops {'+'.join(h)}"
        lines.append(f"| {label} | " + " | ".join(f"{cells[b]['val_nll']:.3f} / {cells[b]['val_fd']:.2f}"
                                                  for b in fs["blenders"]) + " |")
    return "\n".join(lines)


def readme_tables(results: dict) -> dict:
    """Every README evaluation table printed from ``results`` (a ``results.json``): name -> Markdown. Only
    the studies ``results`` holds are printed."""
    tables = {"test": format_results(results)}
    for name, key, fn in (("paper_recipe", "paper_recipe", format_recipe), ("daid_gate", "daid_gate", format_gate),
                          ("daid_sweep", "daid_sweep", format_daid_sweep), ("faid_sweep", "faid_sweep", format_faid_sweep)):
        if key in results:
            tables[name] = fn(results)
    return tables
