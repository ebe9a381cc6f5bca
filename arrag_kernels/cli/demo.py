"""``arrag-kernels demo``: the embedded default job."""

from __future__ import annotations

from arrag_kernels.cli.common import check_device, int_at_least


def _cmd_demo(args):
    from arrag_kernels.demo import main_demo

    check_device(args.device)
    main_demo(args)


def add_subcommands(sub) -> None:
    d = sub.add_parser("demo", help="tiny model + generated images: build a database, generate with and without DAiD")
    d.add_argument("--out", default="demo_out", help="output directory (default: demo_out)")
    d.add_argument("--grid", type=int_at_least(3), default=16, help="image tokens per side of the tiny model (default 16)")
    d.add_argument("--images", type=int_at_least(1), default=64, help="images drawn for the database (default 64)")
    d.add_argument("--batch", type=int_at_least(1), default=4, help="images generated per run (default 4)")
    d.add_argument("--lam", type=float, default=0.5, help="DAiD mixing weight (default 0.5: visible on random weights)")
    d.add_argument("--k", type=int_at_least(1), default=64, help="retrieved neighbours per step (default 64)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--random-weights", action="store_true",
                   help="the random-weight demo on procedural images instead of the trained emoji model")
    d.add_argument("--device", default="cpu")
    d.set_defaults(func=_cmd_demo)
