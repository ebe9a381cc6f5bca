"""``arrag-kernels generate``: images from prompts, optionally with DAiD."""

from __future__ import annotations

from pathlib import Path

from arrag_kernels.cli.common import float_in, int_at_least, load_model


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
    model, processor = load_model(args.model, args.device)
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


def add_subcommands(sub) -> None:
    g = sub.add_parser("generate", help="generate images from prompts, optionally with DAiD")
    g.add_argument("--model", default="tiny", help="'tiny' or a local Janus checkpoint directory")
    g.add_argument("--prompt", action="append", default=[], help="text prompt (repeatable; needs a processor)")
    g.add_argument("--prompt-ids", action="append", default=[], help="comma-separated prompt token ids (repeatable)")
    g.add_argument("--out", default="generated", help="output directory for PNG files")
    g.add_argument("--num-images", type=int_at_least(1), default=1, help="images per prompt")
    g.add_argument("--cfg", type=float_in(1.0, False, " (1 = no guidance)"), default=5.0,
                   help="classifier-free guidance scale, >= 1 (1 = no guidance; default 5)")
    g.add_argument("--temperature", type=float_in(0.0, True), default=1.0)
    g.add_argument("--top-k", type=int_at_least(0), default=0, help="top-k filtering before sampling (default 0 = off, as Janus)")
    g.add_argument("--greedy", action="store_true", help="argmax instead of sampling")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--daid", action="store_true", help="retrieval-augmented decoding (needs --db)")
    g.add_argument("--db", help="patch database directory")
    g.add_argument("--verify-full", action="store_true",
                   help="hash the whole database on load (default: a quick check of sizes, checksums of meta.json and sampled pages)")
    g.add_argument("--lam", type=float, default=0.05)
    g.add_argument("--tau", type=float, default=0.6)
    g.add_argument("--k", type=int_at_least(1), default=2048, help="retrieved neighbours per step (<= database entries)")
    g.add_argument("--dedup", choices=["nearest", "sum"], default="nearest")
    g.add_argument("--device", default="cpu")
    g.set_defaults(func=_cmd_generate)
