"""``arrag-kernels eval``: the miniature run's evaluation (NLL plain vs DAiD vs FAiD, sample metrics, sweeps, Fig. 6)."""

from __future__ import annotations

import argparse
from pathlib import Path

from arrag_kernels.cli.common import float_in, output_dir, retrieval_k


def _number_list(parse_one, what: str):
    """An argparse ``type``: comma-separated values, each through ``parse_one`` (an argparse type)."""

    def parse(text: str) -> list:
        try:
            return [parse_one(x) for x in text.split(",")]
        except (argparse.ArgumentTypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from None

    return parse


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise ValueError(text)
    return value


def _cmd_eval(args):
    from arrag_kernels.miniature.evaluate import evaluate_miniature, format_results

    if args.weights and not (Path(args.weights) / "meta.json").is_file():
        raise ValueError(f"--weights: {args.weights!r} holds no trained miniature model (no meta.json); expected a "
                         "directory written by `python -m arrag_kernels.miniature.train --out DIR`")
    results = evaluate_miniature(out=args.out, weights=args.weights, seeds=args.seeds, lams=args.lams,
                                 taus=args.taus, k=args.k, cfg=args.cfg,
                                 faid_hops=((1,), (1, 2)) if args.faid_sweep else None,
                                 faid_blenders=(1, 2) if args.faid_sweep else None,
                                 recipe_seeds=args.paper_recipe, studies_dir=args.studies)
    sweep = results["sweep"]
    print(f"DAiD chosen on val (FD): lam={sweep['chosen_by_val_fd']['lam']}, tau={sweep['chosen_by_val_fd']['tau']}; "
          f"by val NLL: lam={sweep['chosen_by_val_nll']['lam']}, tau={sweep['chosen_by_val_nll']['tau']}")
    print(format_results(results))
    if "faid_sweep" in results:
        fs = results["faid_sweep"]
        c, t = fs["chosen_by_val_fd"], fs["test"]
        print(f"FAiD sweep: chosen on val FD: hops {c['hops']}, {c['blenders']} blenders; test NLL "
              f"{t['nll']['nll_all']:.3f}, FD {t['fd']['mean']:.2f} ± {t['fd']['std']:.2f}")
    if "paper_recipe" in results:
        t = results["paper_recipe"]["test"]
        print("paper recipe (test NLL, gain vs plain): " + "; ".join(
            f"{m} {t[m]['nll_all']:.3f} ({t[m]['gain_vs_plain_all']:+.3f} ± {t[m]['gain_vs_plain_all_sem']:.3f})"
            for m in ("faid", "control", "ra-cm3")))
    f6 = results["fig6"]
    for name, c in f6.items():
        print(f"Fig. 6 ({name}): l2 at k=1 {c['l2'][0]:.3f}, k={c['k'][-1]} {c['l2'][-1]:.3f}, random {c['random_l2']:.3f}")
    print(f"wrote results.json and PNGs to {args.out} ({results['wall_s']:.0f} s)")


def add_subcommands(sub) -> None:
    e = sub.add_parser("eval", help="evaluate the trained miniature model: NLL plain vs DAiD vs FAiD, Frechet distance, FWD, "
                       "precision/recall, DAiD lam x tau sweep (chosen on val, reported on test), Fig. 6 curve")
    e.add_argument("--weights", default=None, help="trained miniature directory (default: the shipped weights)")
    e.add_argument("--out", type=output_dir, default="eval_out", help="output directory (default eval_out)")
    e.add_argument("--seeds", type=_number_list(int, "integers like 0,1,2"), default=[0, 1, 2],
                   help="sampling seeds for the test metrics (default 0,1,2)")
    e.add_argument("--lams", type=_number_list(_fraction, "numbers in [0, 1] like 0,0.05,0.1"),
                   default=[0.0, 0.05, 0.1, 0.2, 0.4], help="DAiD lam values of the sweep, each in [0, 1]")
    e.add_argument("--taus", type=_number_list(float_in(0.0, True), "numbers > 0 like 0.3,0.6"), default=[0.3, 0.6, 1.2],
                   help="DAiD tau values of the sweep, each > 0")
    e.add_argument("--k", type=retrieval_k, default=256, help="retrieved neighbours per step (default 256)")
    e.add_argument("--cfg", type=float_in(1.0, False, " (1 = no guidance)"), default=5.0,
                   help="classifier-free guidance scale, >= 1 (default 5)")
    e.add_argument("--faid-sweep", action="store_true", help="also the FAiD hops (1 | 1+2) x blenders (1 | 2) sweep "
                   "(trains blenders for each cell: ~13 min more on 2 cores)")
    e.add_argument("--paper-recipe", type=_number_list(int, "integers like 0,1,2"), default=None, metavar="SEEDS",
                   help="also FAiD fine-tuned the paper's way (LoRA q/v + blenders + head; lr and steps chosen on "
                   "val), its no-retrieval control, the RA-CM3 baseline (also on its own val grid) and FAiD's retrieval "
                   "ablation, for these training seeds (trains 16 models for 0,1,2)")
    e.add_argument("--studies", default=None, metavar="DIR", help="directory holding gate.json and daid_sweep.json "
                   "(scripts/daid_gate_curve.py, scripts/daid_sweep.py), copied into results.json")
    e.set_defaults(func=_cmd_eval)
