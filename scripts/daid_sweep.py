"""A DAiD sweep on the miniature that covers sharp retrieval distributions (issue 24, item 2).

Teacher-forced NLL only (no sampling) of the shipped miniature model, over lam x tau x dedup x k,
on the train-split database of :class:`arrag_kernels.miniature.evaluate.MiniatureRun`:

* per split, one forward per batch gives the model's distribution, and one search per (batch, k)
  (``Retriever.retrieve`` over every position) gives the hits; every (lam, tau, dedup) cell of that
  k merges the same cached hits (:func:`arrag_kernels.eval.nll.merge_hits`, the merge
  ``image_nll`` does), so the scores equal ``image_nll``'s with that ``DAiDConfig``;
* the cell is chosen on **val** by the conditional-distribution NLL at retrieval positions, and
  reported on **test** with the paired standard error of its gain over plain (per-image
  differences); so are the val-chosen cell of each (dedup, k) and the full evaluation's cell
  (lam 0.2, tau 0.3, nearest, k 256);
* the CFG-distribution NLL (guidance 5, the distribution the sample metrics merge into) of plain
  and of the chosen cell on test, labelled as such.

Deterministic (no sampling; the data split and database are seeded by the shipped run's config).
Writes a JSON file::

    PYTHONPATH=. OMP_NUM_THREADS=2 python scripts/daid_sweep.py --out docs/miniature/daid_sweep.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time

import torch

from arrag_kernels.eval.nll import merge_hits, paired_sem, teacher_forced_logits
from arrag_kernels.models import TeacherForcingAdapter, get_adapter
from arrag_kernels.retrieval.query import Retriever, on_device

LAMS = (0.05, 0.1, 0.2, 0.4)
TAUS = (0.01, 0.02, 0.05, 0.1, 0.3, 0.6, 1.2)
DEDUPS = ("nearest", "sum")
KS = (64, 256, 2048)
CFG = 5.0
EVALUATION_CELL = (0.2, 0.3, "nearest", 256)  # the cell the full evaluation's val NLL chose (results.json)


@torch.no_grad()
def sweep_nll(model, db, prompts: torch.Tensor, tokens: torch.Tensor, cells: dict, batch_size: int = 64) -> dict:
    """Per-token NLL (num_images, N) of ``tokens`` after ``prompts`` for every cell, from one search per (batch, k).

    ``cells``: guidance scale (None: the conditional distribution) -> list of (lam, tau, dedup, k) cells.
    Returns ``{scale: {"plain": nll, cell: nll, ...}}``; each cell's NLL is ``image_nll``'s with
    ``DAiDConfig(lam, tau, k, dedup)`` and ``guidance_scale=scale``.
    """
    adapter = get_adapter(model, TeacherForcingAdapter)
    db = on_device(db, adapter.device)
    retrievers = {k: Retriever(db, k, adapter) for k in sorted({c[3] for cs in cells.values() for c in cs})}
    out = {scale: {name: [] for name in ["plain", *cs]} for scale, cs in cells.items()}
    for start in range(0, tokens.shape[0], batch_size):
        t = tokens[start : start + batch_size].to(adapter.device)
        p = prompts[start : start + batch_size].to(adapter.device)
        cond = teacher_forced_logits(model, p, t).float()
        uncond = (teacher_forced_logits(model, adapter.unconditional_prompt(p, model.generation_config), t).float()
                  if any(s is not None for s in cells) else None)
        hits = {}
        for k, retriever in retrievers.items():
            dist, ids, valid = retriever.retrieve(t)
            hits[k] = (dist, ids, valid & torch.tensor(retriever.retrieves_at, device=t.device))
        for scale, cs in cells.items():
            probs = torch.softmax(cond if scale is None else uncond + scale * (cond - uncond), dim=-1)
            out[scale]["plain"].append(_token_nll(probs, t))
            for lam, tau, dedup, k in cs:
                out[scale][(lam, tau, dedup, k)].append(_token_nll(merge_hits(probs, *hits[k], lam, tau, dedup), t))
    return {scale: {name: torch.cat(v) for name, v in nlls.items()} for scale, nlls in out.items()}


def _token_nll(probs: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return -probs.gather(-1, t.unsqueeze(-1)).squeeze(-1).clamp_min(1e-30).log().cpu()  # as image_nll


def score(nll: torch.Tensor, plain: torch.Tensor, retrieval: torch.Tensor) -> dict:
    """NLL at retrieval positions and over all positions, and the gain over plain (per image, paired SE)."""
    ret, plain_ret = nll[:, retrieval].mean(1), plain[:, retrieval].mean(1)
    return {"nll_retrieval": float(ret.mean()), "nll_all": float(nll.mean()),
            "gain_vs_plain": float((plain_ret - ret).mean()), "gain_vs_plain_sem": paired_sem(plain_ret, ret)}


def cell_dict(cell) -> dict:
    return dict(zip(("lam", "tau", "dedup", "k"), cell))


def main(argv=None) -> dict:
    from arrag_kernels.miniature.evaluate import MiniatureRun
    from arrag_kernels.ops import retrieval_positions

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/miniature/daid_sweep.json")
    args = ap.parse_args(argv)

    t0, load0 = time.perf_counter(), os.getloadavg()
    torch.manual_seed(0)
    run = MiniatureRun(progress=False)
    grid = list(itertools.product(LAMS, TAUS, DEDUPS, KS))
    retrieval = retrieval_positions(get_adapter(run.model, TeacherForcingAdapter).grid, run.db.meta.layout).cpu()

    val_p, _, val_t = run.split("val")
    val = sweep_nll(run.model, run.db, val_p, val_t, {None: grid})[None]
    val_scores = {c: score(val[c], val["plain"], retrieval) for c in grid}
    chosen = min(grid, key=lambda c: val_scores[c]["nll_retrieval"])  # first on ties
    per_variant = {(d, k): min((c for c in grid if c[2:] == (d, k)), key=lambda c: val_scores[c]["nll_retrieval"])
                   for d in DEDUPS for k in KS}
    t_val = time.perf_counter() - t0

    test_p, _, test_t = run.split("test")
    reported = list(dict.fromkeys([chosen, *per_variant.values(), EVALUATION_CELL]))
    test = sweep_nll(run.model, run.db, test_p, test_t, {None: reported, CFG: [chosen]})
    cond, cfg = test[None], test[CFG]
    test_rows = [{**cell_dict(c), "chosen_on_val": c == chosen, "val_nll_retrieval": val_scores[c]["nll_retrieval"],
                  **score(cond[c], cond["plain"], retrieval)} for c in reported]
    plain_test = {"nll_retrieval": float(cond["plain"][:, retrieval].mean()), "nll_all": float(cond["plain"].mean())}
    plain_cfg = {"nll_retrieval": float(cfg["plain"][:, retrieval].mean()), "nll_all": float(cfg["plain"].mean())}
    out = {
        "what": "teacher-forced NLL (nats/token) of the shipped miniature model under DAiD (no sampling); cells "
                "chosen on val by the conditional-distribution NLL at retrieval positions; gain = plain - DAiD per "
                "image (mean over retrieval positions), mean and paired standard error over images",
        "grid": {"lam": list(LAMS), "tau": list(TAUS), "dedup": list(DEDUPS), "k": list(KS)},
        "database_entries": len(run.db), "images": {"val": int(val_t.shape[0]), "test": int(test_t.shape[0])},
        "retrieval_positions": int(retrieval.sum()), "positions": int(retrieval.numel()),
        "val": {"plain_nll_retrieval": float(val["plain"][:, retrieval].mean()),
                "cells": [{**cell_dict(c), **val_scores[c]} for c in grid]},
        "chosen": cell_dict(chosen),
        "test_conditional": {"plain": plain_test, "cells": test_rows},
        "test_cfg_distribution": {"guidance_scale": CFG, "note": "NLL under the CFG distribution l_u + w (l_c - l_u), "
                                  "the one the sample metrics merge retrieval into; not comparable to the "
                                  "conditional NLL", "plain": plain_cfg,
                                  "chosen": {**cell_dict(chosen), **score(cfg[chosen], cfg["plain"], retrieval)}},
        "wall_s": time.perf_counter() - t0, "val_wall_s": t_val,
        "loadavg_1min_start_end": [load0[0], os.getloadavg()[0]],
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "command": "PYTHONPATH=. OMP_NUM_THREADS=2 python scripts/daid_sweep.py --out docs/miniature/daid_sweep.json",
    }
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps({k: out[k] for k in ("chosen", "test_conditional", "test_cfg_distribution", "wall_s")}, indent=1))
    return out


if __name__ == "__main__":
    main()
