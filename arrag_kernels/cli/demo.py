"""``arrag-kernels demo``: the embedded default job."""

from __future__ import annotations

from arrag_kernels.cli.common import check_device, float_between, int_at_least, output_dir, retrieval_k, seed


def _cmd_demo(args):
    from arrag_kernels.demo import main_demo

    check_device(args.device)
    main_demo(args)


def add_subcommands(sub) -> None:
    d = sub.add_parser("demo", help="the trained miniature model on emoji: plain, DAiD and FAiD side by side with "
                       "test metrics (without the emoji packages, or with --random-weights: a tiny random model)")
    d.add_argument("--out", type=output_dir, default="demo_out", help="output directory (default: demo_out)")
    d.add_argument("--lam", type=float_between(0.0, 1.0), default=None,
                   help="DAiD mixing weight (default: 0.1 for the miniature demo, 0.5 for --random-weights)")
    d.add_argument("--k", type=retrieval_k, default=None,
                   help="retrieved neighbours per step (default: 256 miniature, 64 random-weight)")
    d.add_argument("--seed", type=seed, default=0)
    d.add_argument("--random-weights", action="store_true",
                   help="the random-weight demo on procedural images instead of the trained emoji model")
    r = d.add_argument_group("random-weight demo only (refused for the miniature demo)")
    r.add_argument("--grid", type=int_at_least(3), default=None, help="image tokens per side of the tiny model (default 16)")
    r.add_argument("--images", type=int_at_least(1), default=None, help="images drawn for the database (default 64)")
    r.add_argument("--batch", type=int_at_least(1), default=None, help="images generated per run (default 4)")
    r.add_argument("--device", default="cpu", help="torch device (default cpu; the miniature demo runs on the CPU)")
    d.set_defaults(func=_cmd_demo)
