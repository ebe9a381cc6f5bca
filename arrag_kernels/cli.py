"""Command line: ``arrag-kernels <command>`` or ``python -m arrag_kernels <command>``.

Commands: ``demo`` (the embedded default job), ``build-db``, ``generate``; feature packages add
theirs through ``add_subcommands(subparsers)`` functions listed in ``_SUBCOMMAND_PROVIDERS``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

# Modules with an ``add_subcommands(subparsers)`` function, imported lazily.
_SUBCOMMAND_PROVIDERS: list[str] = [
    "arrag_kernels.faid.cli",
    "arrag_kernels.eval.cli",
]


def _load_model(spec: str, device: str):
    """``tiny`` (the embedded random model) or a local HF checkpoint directory."""
    from arrag_kernels.models import tiny_janus

    if spec == "tiny":
        return tiny_janus(seed=0).to(device), None
    path = Path(spec)
    if not path.is_dir():
        raise SystemExit(f"--model: expected 'tiny' or a local checkpoint directory, got {spec!r} (not a directory)")
    from transformers import AutoProcessor, JanusForConditionalGeneration

    model = JanusForConditionalGeneration.from_pretrained(path).to(device).eval()
    try:
        processor = AutoProcessor.from_pretrained(path)
    except (OSError, ValueError, TypeError):
        processor = None  # no tokenizer saved with the checkpoint: only --prompt-ids works
    return model, processor


def _cmd_demo(args):
    from arrag_kernels.demo import main_demo

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

    db = ak.PatchDatabase.from_official(args.dir, nprobe=args.nprobe, codebook_size=args.codebook_size)
    print(f"{args.dir}: {db}, nprobe {db.nprobe} (set on the inner IVF)")
    if args.out:
        print(f"wrote {db.save(args.out)}")


def _prompt_inputs(args, model, processor):
    import torch

    if args.prompt_ids:
        rows = [[int(t) for t in s.split(",")] for s in args.prompt_ids]
        if len({len(r) for r in rows}) != 1:
            raise SystemExit("--prompt-ids: every prompt must have the same number of ids")
        ids = torch.tensor(rows)
        return ids, torch.ones_like(ids)
    if processor is None:
        raise SystemExit("--prompt needs a tokenizer/processor saved with the model; use --prompt-ids for this model")
    enc = processor(text=args.prompt, generation_mode="image", padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def _cmd_generate(args):
    import torch
    from transformers import GenerationConfig

    import arrag_kernels as ak
    from arrag_kernels.demo import save_pixels

    if not args.prompt and not args.prompt_ids:
        raise SystemExit("generate: give at least one --prompt or --prompt-ids")
    model, processor = _load_model(args.model, args.device)
    ids, mask = _prompt_inputs(args, model, processor)
    ids, mask = ids.to(args.device), mask.to(args.device)
    gen = model.generation_config
    gen = GenerationConfig(**{**gen.to_dict(), "do_sample": not args.greedy, "temperature": args.temperature,
                              "top_k": args.top_k, "guidance_scale": args.cfg,
                              "num_return_sequences": args.num_images})
    db, cfg = None, None
    if args.daid:
        if not args.db:
            raise SystemExit("--daid needs --db PATH (build one with `arrag-kernels build-db`)")
        db = ak.PatchDatabase.load(args.db)
        cfg = ak.DAiDConfig(lam=args.lam, tau=args.tau, k=args.k, dedup=args.dedup)
    torch.manual_seed(args.seed)
    with ak.patched(model, db, cfg) as handle:
        stats = ak.DecodeStats()
        tokens = handle.generate_images(ids, attention_mask=mask, generation_config=gen, stats=stats, progress=True)
    paths = save_pixels(model.decode_image_tokens(tokens), Path(args.out), "daid" if args.daid else "plain")
    print(f"{stats.summary()}\nwrote {', '.join(str(p) for p in paths)}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="arrag-kernels", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="tiny model + generated images: build a database, generate with and without DAiD")
    d.add_argument("--out", default="demo_out", help="output directory (default: demo_out)")
    d.add_argument("--grid", type=int, default=16, help="image tokens per side of the tiny model (default 16)")
    d.add_argument("--images", type=int, default=64, help="images drawn for the database (default 64)")
    d.add_argument("--batch", type=int, default=4, help="images generated per run (default 4)")
    d.add_argument("--lam", type=float, default=0.5, help="DAiD mixing weight (default 0.5: visible on random weights)")
    d.add_argument("--k", type=int, default=64, help="retrieved neighbours per step (default 64)")
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
    b.add_argument("--batch-size", type=int, default=16)
    b.add_argument("--device", default="cpu")
    b.add_argument("--index", choices=["flat", "faiss-flat", "ivfpq"], default="flat",
                   help="flat (exact), faiss-flat, or ivfpq (FAISS OPQ + IVF-PQ, official layout; needs faiss)")
    b.add_argument("--nlist", type=int, default=800, help="ivfpq: IVF lists (official: 800)")
    b.add_argument("--m", type=int, default=8, help="ivfpq: PQ sub-quantizers (official: 8)")
    b.add_argument("--nbits", type=int, default=8, help="ivfpq: bits per PQ code (official: 8)")
    b.add_argument("--opq", action=argparse.BooleanOptionalAction, default=True, help="ivfpq: OPQ rotation (official: on)")
    b.add_argument("--nprobe", type=int, default=1, help="ivfpq: lists probed per query, saved with the index")
    b.add_argument("--chunk-images", type=int, default=1024, help="ivfpq: images per resumable chunk")
    b.set_defaults(func=_cmd_build_db)

    o = sub.add_parser("import-official", help="validate a released AR-RAG database (faiss_ivf_pq_opq.index + "
                       "next_codes.npy) and optionally save it as a database directory")
    o.add_argument("dir", help="directory holding faiss_ivf_pq_opq.index and next_codes.npy")
    o.add_argument("--nprobe", type=int, default=1, help="lists probed per query (set on the inner IVF)")
    o.add_argument("--codebook-size", type=int, default=16384, help="VQ codebook size (Janus-Pro: 16384)")
    o.add_argument("--out", help="database directory to write (atomically); omit to only validate")
    o.set_defaults(func=_cmd_import_official)

    g = sub.add_parser("generate", help="generate images from prompts, optionally with DAiD")
    g.add_argument("--model", default="tiny", help="'tiny' or a local Janus checkpoint directory")
    g.add_argument("--prompt", action="append", default=[], help="text prompt (repeatable; needs a processor)")
    g.add_argument("--prompt-ids", action="append", default=[], help="comma-separated prompt token ids (repeatable)")
    g.add_argument("--out", default="generated", help="output directory for PNG files")
    g.add_argument("--num-images", type=int, default=1, help="images per prompt")
    g.add_argument("--cfg", type=float, default=5.0, help="classifier-free guidance scale")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0, help="top-k filtering before sampling (default 0 = off, as Janus)")
    g.add_argument("--greedy", action="store_true", help="argmax instead of sampling")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--daid", action="store_true", help="retrieval-augmented decoding (needs --db)")
    g.add_argument("--db", help="patch database directory")
    g.add_argument("--lam", type=float, default=0.05)
    g.add_argument("--tau", type=float, default=0.6)
    g.add_argument("--k", type=int, default=2048)
    g.add_argument("--dedup", choices=["nearest", "sum"], default="nearest")
    g.add_argument("--device", default="cpu")
    g.set_defaults(func=_cmd_generate)

    for module in _SUBCOMMAND_PROVIDERS:
        importlib.import_module(module).add_subcommands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:  # user errors: one line, no traceback
        print(f"arrag-kernels {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
