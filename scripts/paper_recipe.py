"""FAiD fine-tuned the paper's way on the miniature, its no-retrieval control and the RA-CM3 baseline (issue 24
items 1 and 5), on their own: :func:`arrag_kernels.miniature.evaluate.paper_recipe` on the shipped model, the
part of ``arrag-kernels eval --paper-recipe SEEDS`` that trains. Writes a JSON file::

    PYTHONPATH=. OMP_NUM_THREADS=2 python scripts/paper_recipe.py --out docs/miniature/paper_recipe.json

``--ra-cm3-grid`` runs only RA-CM3 with its own learning rate and steps chosen on val
(:func:`arrag_kernels.miniature.evaluate.ra_cm3_own_grid`)::

    PYTHONPATH=. OMP_NUM_THREADS=2 python scripts/paper_recipe.py --ra-cm3-grid --out docs/miniature/ra_cm3_grid.json

``--zero-retrieval FILE`` retrains FAiD with the settings FILE (a ``paper_recipe`` JSON) chose and scores it
with and without its retrieved features (:func:`arrag_kernels.miniature.evaluate.faid_zero_retrieval`)::

    PYTHONPATH=. OMP_NUM_THREADS=2 python scripts/paper_recipe.py --zero-retrieval docs/miniature/paper_recipe.json \
        --out docs/miniature/faid_zero_retrieval.json
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from arrag_kernels.miniature.evaluate import (RA_CM3_LRS, RECIPE_LRS, RECIPE_STEPS, MiniatureRun,
                                              faid_zero_retrieval, paper_recipe, ra_cm3_own_grid)
from arrag_kernels.miniature.finetune import recipe_from_dict


def _numbers(kind):
    return lambda text: tuple(kind(x) for x in text.split(","))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/miniature/paper_recipe.json")
    ap.add_argument("--ra-cm3-grid", action="store_true", help="only RA-CM3 on its own val grid (training seed: the "
                    "first of --seeds)")
    ap.add_argument("--zero-retrieval", default=None, metavar="FILE", help="only FAiD with the settings a paper_recipe "
                    "JSON chose, scored with and without its retrieved features (training seeds: --seeds)")
    ap.add_argument("--lrs", type=_numbers(float), default=None,
                    help=f"learning rates of the val grid (default {RECIPE_LRS}; with --ra-cm3-grid {RA_CM3_LRS})")
    ap.add_argument("--steps", type=_numbers(int), default=RECIPE_STEPS, help="step budgets of the val grid")
    ap.add_argument("--seeds", type=_numbers(int), default=(0, 1, 2), help="training seeds")
    ap.add_argument("--samples", default=None, help="directory for the first seed's sample grids (default: none)")
    args = ap.parse_args(argv)

    t0, load0 = time.perf_counter(), os.getloadavg()
    run = MiniatureRun(progress=True)
    val_p, val_x, val_t = run.split("val")
    test_p, test_x, test_t = run.split("test")
    val, test = (val_p, val_x, val_t, run.features(val_x)), (test_p, test_x, test_t, run.features(test_x))
    if args.zero_retrieval:
        with open(args.zero_retrieval) as f:
            out = faid_zero_retrieval(run, test, recipe_from_dict(json.load(f)["recipe"]), seeds=args.seeds)
    elif args.ra_cm3_grid:
        args.lrs = args.lrs or RA_CM3_LRS
        out = ra_cm3_own_grid(run, val, test, lrs=args.lrs, step_budgets=args.steps, seed=args.seeds[0])
    else:
        args.lrs = args.lrs or RECIPE_LRS
        out = paper_recipe(run, val, test, lrs=args.lrs, step_budgets=args.steps, seeds=args.seeds, out=args.samples)
    out.update(database_entries=len(run.db), script_wall_s=time.perf_counter() - t0,
               loadavg_1min_start_end=[load0[0], os.getloadavg()[0]], torch_threads=torch.get_num_threads(),
               torch=torch.__version__,
               command=f"PYTHONPATH=. OMP_NUM_THREADS={torch.get_num_threads()} python scripts/paper_recipe.py "
                       + ("--ra-cm3-grid " if args.ra_cm3_grid else "")
                       + (f"--zero-retrieval {args.zero_retrieval} " if args.zero_retrieval else
                          f"--lrs {','.join(map(str, args.lrs))} --steps {','.join(map(str, args.steps))} ") +
                       f"--seeds {','.join(map(str, args.seeds))} --out {args.out}")
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps({k: v for k, v in out.items() if k in ("grid", "all", "retrieval", "wall_s")}, indent=1))
    return out


if __name__ == "__main__":
    main()
