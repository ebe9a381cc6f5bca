"""Command line: ``arrag-kernels <command>`` or ``python -m arrag_kernels <command>``.

Commands: ``demo`` (the embedded default job), ``build-db``, ``generate``; feature packages add
theirs through ``add_subcommands(subparsers)`` functions listed in ``_SUBCOMMAND_PROVIDERS``.

Every user error (bad argument, missing or corrupted file, unavailable device) prints one line
``arrag-kernels <command>: error: ...`` to stderr, no traceback, and exits with ``USER_ERROR`` (2,
argparse's own code); 0 is success; anything else is a bug worth reporting.
"""

from __future__ import annotations

import argparse
import importlib
import pickle
import sys
from pathlib import Path

USER_ERROR = 2

# Modules with an ``add_subcommands(subparsers)`` function, imported lazily.
_SUBCOMMAND_PROVIDERS: list[str] = [
    "arrag_kernels.faid.cli",
    "arrag_kernels.eval.cli",
]


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block) and the library's user-error exit code."""

    def error(self, message):
        self.exit(USER_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return value

    return parse


def _float_in(low: float, low_open: bool, hint: str = ""):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not (value > low if low_open else value >= low) or value == float("inf"):
            raise argparse.ArgumentTypeError(f"expected a number {'>' if low_open else '>='} {low}{hint}, got {text!r}")
        return value

    return parse


def _check_device(spec: str) -> None:
    import torch

    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device: expected a torch device such as cpu, cuda or cuda:1, got {spec!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {spec}: CUDA is not available here (torch.cuda.is_available() is False); "
                             "use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def _load_model(spec: str, device: str):
    """``tiny`` (the embedded random model) or a local HF checkpoint directory."""
    from arrag_kernels.models import tiny_janus

    _check_device(device)
    if spec == "tiny":
        return tiny_janus(seed=0).to(device), None
    path = Path(spec)
    if not path.is_dir():
        raise ValueError(f"--model: expected 'tiny' or a local checkpoint directory, got {spec!r} (not a directory)")
    if not (path / "config.json").is_file():
        raise ValueError(f"--model: {spec!r} holds no Hugging Face checkpoint (no config.json); expected 'tiny' or a "
                         "directory written by save_pretrained")
    from transformers import AutoProcessor, JanusForConditionalGeneration

    try:
        model = JanusForConditionalGeneration.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"--model: cannot load a Janus model from {spec!r}: {str(e).splitlines()[0]}") from e
    model = model.to(device).eval()
    try:
        processor = AutoProcessor.from_pretrained(path)
    except (OSError, ValueError, TypeError):
        processor = None  # no tokenizer saved with the checkpoint: only --prompt-ids works
    return model, processor


def _cmd_demo(args):
    from arrag_kernels.demo import main_demo

    _check_device(args.device)
    main_demo(args)


def _cmd_build_db(args):
    import arrag_kernels as ak

    model, _ = _load_model(args.model, args.device)
    kwargs = dict(neighborhood=args.neighborhood, hops=args.hops, border=args.border, key_source=args.key_source,
                  batch_size=args.batch_size, index=args.index)
    if args.index == "ivfpq":  # built on disk: chunked, resumable, saved atomically at --out
        db = ak.PatchDatabase.build(args.images, model, path=args.out, nlist=args.nlist, m=args.m, nbits=args.nbits,
                                    opq=args.opq, nprobe=args.nprobe, chunk_images=args.chunk_images, **kwargs)
        print(f"wrote {db} (nlist {args.nlist}, nprobe {db.nprobe}) to {args.out}")
        return
    db = ak.PatchDatabase.build(args.images, model, **kwargs)
    path = db.save(args.out)
    print(f"wrote {db} to {path}")


def _cmd_import_official(args):
    import arrag_kernels as ak

    from .retrieval.builders import describe_official

    db = ak.PatchDatabase.from_official(args.dir, nprobe=args.nprobe, codebook_size=args.codebook_size,
                                        grid=tuple(args.grid))
    facts, assumed = describe_official(db)
    print(f"{args.dir}: {facts}\n{assumed}; override with --codebook-size and --grid")
    if args.out:
        print(f"wrote {db.save(args.out)}")


def _prompt_inputs(args, model, processor):
    import torch

    if args.prompt_ids:
        try:
            rows = [[int(t) for t in s.split(",")] for s in args.prompt_ids]
        except ValueError:
            raise ValueError(f"--prompt-ids: expected comma-separated integers like 1,5,100, got {args.prompt_ids}") from None
        if len({len(r) for r in rows}) != 1:
            raise ValueError("--prompt-ids: every prompt must have the same number of ids")
        ids = torch.tensor(rows)
        return ids, torch.ones_like(ids)
    if processor is None:
        raise ValueError("--prompt needs a tokenizer/processor saved with the model; use --prompt-ids for this model")
    enc = processor(text=args.prompt, generation_mode="image", padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def _cmd_generate(args):
    import torch
    from transformers import GenerationConfig

    import arrag_kernels as ak
    from arrag_kernels.demo import save_pixels

    if not args.prompt and not args.prompt_ids:
        raise ValueError("give at least one --prompt or --prompt-ids")
    db, cfg = None, None
    if args.daid:  # before loading the model: a bad database or --k fails fast
        if not args.db:
            raise ValueError("--daid needs --db PATH (build one with `arrag-kernels build-db`)")
        db = ak.PatchDatabase.load(args.db, verify="full" if args.verify_full else "quick")
        if args.k > len(db):
            raise ValueError(f"--k {args.k} is larger than the database ({len(db)} entries); pass --k {len(db)} or less")
        cfg = ak.DAiDConfig(lam=args.lam, tau=args.tau, k=args.k, dedup=args.dedup)
    model, processor = _load_model(args.model, args.device)
    ids, mask = _prompt_inputs(args, model, processor)
    ids, mask = ids.to(args.device), mask.to(args.device)
    gen = model.generation_config
    gen = GenerationConfig(**{**gen.to_dict(), "do_sample": not args.greedy, "temperature": args.temperature,
                              "top_k": args.top_k, "guidance_scale": args.cfg,
                              "num_return_sequences": args.num_images})
    torch.manual_seed(args.seed)
    with ak.patched(model, db, cfg) as handle:
        stats = ak.DecodeStats()
        tokens = handle.generate_images(ids, attention_mask=mask, generation_config=gen, stats=stats, progress=True)
    paths = save_pixels(model.decode_image_tokens(tokens), Path(args.out), "daid" if args.daid else "plain")
    print(f"{stats.summary()}\nwrote {', '.join(str(p) for p in paths)}")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="arrag-kernels", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="tiny model + generated images: build a database, generate with and without DAiD")
    d.add_argument("--out", default="demo_out", help="output directory (default: demo_out)")
    d.add_argument("--grid", type=_int_at_least(3), default=16, help="image tokens per side of the tiny model (default 16)")
    d.add_argument("--images", type=_int_at_least(1), default=64, help="images drawn for the database (default 64)")
    d.add_argument("--batch", type=_int_at_least(1), default=4, help="images generated per run (default 4)")
    d.add_argument("--lam", type=float, default=0.5, help="DAiD mixing weight (default 0.5: visible on random weights)")
    d.add_argument("--k", type=_int_at_least(1), default=64, help="retrieved neighbours per step (default 64)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--random-weights", action="store_true",
                   help="the random-weight demo on procedural images instead of the trained emoji model")
    d.add_argument("--device", default="cpu")
    d.set_defaults(func=_cmd_demo)

    b = sub.add_parser("build-db", help="encode a folder of images into a patch database")
    b.add_argument("images", help="folder of images (searched recursively)")
    b.add_argument("--out", required=True, help="database directory to write (atomically)")
    b.add_argument("--model", default="tiny", help="'tiny' or a local Janus checkpoint directory")
    b.add_argument("--neighborhood", choices=["causal", "full"], default="causal")
    b.add_argument("--hops", default="1", help="hop set, e.g. 1, 2 or 12 (default 1)")
    b.add_argument("--border", choices=["skip", "zero"], default="skip")
    b.add_argument("--key-source", choices=["latent", "codebook"], default="latent")
    b.add_argument("--batch-size", type=_int_at_least(1), default=16)
    b.add_argument("--device", default="cpu")
    b.add_argument("--index", choices=["flat", "faiss-flat", "ivfpq"], default="flat",
                   help="flat (exact), faiss-flat, or ivfpq (FAISS OPQ + IVF-PQ, official layout; needs faiss)")
    b.add_argument("--nlist", type=_int_at_least(1), default=800, help="ivfpq: IVF lists (official: 800)")
    b.add_argument("--m", type=_int_at_least(1), default=8, help="ivfpq: PQ sub-quantizers (official: 8)")
    b.add_argument("--nbits", type=_int_at_least(1), default=8, help="ivfpq: bits per PQ code (official: 8)")
    b.add_argument("--opq", action=argparse.BooleanOptionalAction, default=True, help="ivfpq: OPQ rotation (official: on)")
    b.add_argument("--nprobe", type=_int_at_least(1), default=1, help="ivfpq: lists probed per query, saved with the index")
    b.add_argument("--chunk-images", type=_int_at_least(1), default=1024, help="ivfpq: images per resumable chunk")
    b.set_defaults(func=_cmd_build_db)

    o = sub.add_parser("import-official", help="validate a released AR-RAG database (faiss_ivf_pq_opq.index + "
                       "next_codes.npy) and optionally save it as a database directory")
    o.add_argument("dir", help="directory holding faiss_ivf_pq_opq.index and next_codes.npy")
    o.add_argument("--nprobe", type=_int_at_least(1), default=1, help="lists probed per query (set on the inner IVF)")
    o.add_argument("--codebook-size", type=_int_at_least(1), default=16384,
                   help="VQ codebook size; not stored in the files (Janus-Pro: 16384)")
    o.add_argument("--grid", type=_int_at_least(1), nargs=2, metavar=("H", "W"), default=[24, 24],
                   help="token grid of the database's images; not stored in the files (Janus-Pro, 384 px: 24 24)")
    o.add_argument("--out", help="database directory to write (atomically); omit to only validate")
    o.set_defaults(func=_cmd_import_official)

    g = sub.add_parser("generate", help="generate images from prompts, optionally with DAiD")
    g.add_argument("--model", default="tiny", help="'tiny' or a local Janus checkpoint directory")
    g.add_argument("--prompt", action="append", default=[], help="text prompt (repeatable; needs a processor)")
    g.add_argument("--prompt-ids", action="append", default=[], help="comma-separated prompt token ids (repeatable)")
    g.add_argument("--out", default="generated", help="output directory for PNG files")
    g.add_argument("--num-images", type=_int_at_least(1), default=1, help="images per prompt")
    g.add_argument("--cfg", type=_float_in(1.0, False, " (1 = no guidance)"), default=5.0,
                   help="classifier-free guidance scale, >= 1 (1 = no guidance; default 5)")
    g.add_argument("--temperature", type=_float_in(0.0, True), default=1.0)
    g.add_argument("--top-k", type=_int_at_least(0), default=0, help="top-k filtering before sampling (default 0 = off, as Janus)")
    g.add_argument("--greedy", action="store_true", help="argmax instead of sampling")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--daid", action="store_true", help="retrieval-augmented decoding (needs --db)")
    g.add_argument("--db", help="patch database directory")
    g.add_argument("--verify-full", action="store_true",
                   help="hash the whole database on load (default: a quick check of sizes, checksums of meta.json and sampled pages)")
    g.add_argument("--lam", type=float, default=0.05)
    g.add_argument("--tau", type=float, default=0.6)
    g.add_argument("--k", type=_int_at_least(1), default=2048, help="retrieved neighbours per step (<= database entries)")
    g.add_argument("--dedup", choices=["nearest", "sum"], default="nearest")
    g.add_argument("--device", default="cpu")
    g.set_defaults(func=_cmd_generate)

    for module in _SUBCOMMAND_PROVIDERS:
        importlib.import_module(module).add_subcommands(sub)
    return p


def _user_error_message(args, e: BaseException) -> str | None:
    """The one-line message of a user error, None for anything else (a bug: let it raise)."""
    from safetensors import SafetensorError

    if isinstance(e, SystemExit):
        return e.code if isinstance(e.code, str) else None
    if isinstance(e, (pickle.UnpicklingError, SafetensorError)):  # never echo torch's advice to unpickle anything
        what = repr(getattr(args, "checkpoint", None) or "the input file")
        return (f"cannot read {what} as a checkpoint: expected a .safetensors file or a torch.save file holding only "
                f"tensors ({type(e).__name__})")
    if isinstance(e, (ValueError, OSError, ImportError)):
        lines = str(e).strip().splitlines()
        return lines[0] if lines else type(e).__name__
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (Exception, SystemExit) as e:
        message = _user_error_message(args, e)
        if message is None:
            raise
        print(f"arrag-kernels {args.command}: error: {message}", file=sys.stderr)
        return USER_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
