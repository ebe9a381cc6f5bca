"""``arrag-kernels eval``: the miniature run's evaluation (NLL plain vs DAiD vs FAiD, sample metrics, sweeps, Fig. 6)."""

from __future__ import annotations


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"expected comma-separated numbers like 0.05,0.1, got {text!r}") from None


def _cmd_eval(args):
    from arrag_kernels.miniature.evaluate import evaluate_miniature, format_results

    seeds = [int(s) for s in _floats(args.seeds)]
    results = evaluate_miniature(out=args.out, weights=args.weights, seeds=seeds, lams=_floats(args.lams),
                                 taus=_floats(args.taus), k=args.k, cfg=args.cfg,
                                 faid_hops=((1,), (1, 2)) if args.faid_sweep else None,
                                 faid_blenders=(1, 2) if args.faid_sweep else None)
    sweep = results["sweep"]
    print(f"DAiD chosen on val (FD): lam={sweep['chosen_by_val_fd']['lam']}, tau={sweep['chosen_by_val_fd']['tau']}; "
          f"by val NLL: lam={sweep['chosen_by_val_nll']['lam']}, tau={sweep['chosen_by_val_nll']['tau']}")
    print(format_results(results))
    if "faid_sweep" in results:
        fs = results["faid_sweep"]
        c, t = fs["chosen_by_val_fd"], fs["test"]
        print(f"FAiD sweep: chosen on val FD: hops {c['hops']}, {c['blenders']} blenders; test NLL "
              f"{t['nll']['nll_all']:.3f}, FD {t['fd']['mean']:.2f} ± {t['fd']['std']:.2f}")
    f6 = results["fig6"]
    for name, c in f6.items():
        print(f"Fig. 6 ({name}): l2 at k=1 {c['l2'][0]:.3f}, k={c['k'][-1]} {c['l2'][-1]:.3f}, random {c['random_l2']:.3f}")
    print(f"wrote results.json and PNGs to {args.out} ({results['wall_s']:.0f} s)")


def add_subcommands(sub) -> None:
    e = sub.add_parser("eval", help="evaluate the trained miniature model: NLL plain vs DAiD vs FAiD, Frechet distance, FWD, "
                       "precision/recall, DAiD lam x tau sweep (chosen on val, reported on test), Fig. 6 curve")
    e.add_argument("--weights", default=None, help="trained miniature directory (default: the shipped weights)")
    e.add_argument("--out", default="eval_out", help="output directory (default eval_out)")
    e.add_argument("--seeds", default="0,1,2", help="sampling seeds for the test metrics (default 0,1,2)")
    e.add_argument("--lams", default="0,0.05,0.1,0.2,0.4", help="DAiD lam values of the sweep")
    e.add_argument("--taus", default="0.3,0.6,1.2", help="DAiD tau values of the sweep")
    e.add_argument("--k", type=int, default=256, help="retrieved neighbours per step (default 256)")
    e.add_argument("--cfg", type=float, default=5.0, help="classifier-free guidance scale (default 5)")
    e.add_argument("--faid-sweep", action="store_true", help="also the FAiD hops (1 | 1+2) x blenders (1 | 2) sweep "
                   "(trains blenders for each cell: ~30 min on 2 cores)")
    e.set_defaults(func=_cmd_eval)
