"""``arrag-kernels generate``: images from prompts, optionally with DAiD and/or FAiD."""

from __future__ import annotations

from pathlib import Path

from arrag_kernels.cli.common import (check_prompt_ids, float_between, float_in, int_at_least, load_model, output_dir,
                                      retrieval_k, seed)


# DAiD flags: None on the command line means "not given" (refused without --daid), then these values.
DAID_DEFAULTS = {"lam": 0.05, "tau": 0.6, "k": 2048, "dedup": "nearest"}


def _prompt_ids(args):
    """--prompt-ids rows as a (B, P) tensor, or None when the prompts are text (--prompt)."""
    import torch

    if not args.prompt and not args.prompt_ids:
        raise ValueError("give at least one --prompt or --prompt-ids")
    if args.prompt and args.prompt_ids:
        raise ValueError("give --prompt (text, needs a processor) or --prompt-ids, not both")
    if not args.prompt_ids:
        return None
    try:
        rows = [[int(t) for t in s.split(",")] for s in args.prompt_ids]
    except ValueError:
        raise ValueError(f"--prompt-ids: expected comma-separated integers like 1,5,100, got {args.prompt_ids}") from None
    if len({len(r) for r in rows}) != 1:
        raise ValueError("--prompt-ids: every prompt must have the same number of ids")
    return torch.tensor(rows)


def _prompt_inputs(args, ids, encode_prompts):
    import torch

    if ids is not None:
        return ids, torch.ones_like(ids)
    if encode_prompts is None:
        raise ValueError("--prompt needs a tokenizer/processor saved with the model; use --prompt-ids for this model")
    return encode_prompts(args.prompt)


def _check_flags(args) -> None:
    """Every retrieval flag needs the method it belongs to: refused instead of silently ignored."""
    given = [f"--{name}" for name in DAID_DEFAULTS if getattr(args, name) is not None]
    if given and not args.daid:
        raise ValueError(f"{', '.join(given)} set DAiD and act only with --daid")
    if args.db and not (args.daid or args.faid):
        raise ValueError("--db is read only with --daid or --faid")
    if (args.daid or args.faid) and not args.db:
        flag = "--daid" if args.daid else "--faid"
        raise ValueError(f"{flag} needs --db PATH (build one with `arrag-kernels build-db --model` the same model)")
    if args.finetuned and not args.faid:
        raise ValueError("--finetuned (LoRA / head weights written by train-faid) acts only with --faid")
    for flag, path in (("--faid", args.faid), ("--finetuned", args.finetuned)):
        if path and not Path(path).is_file():
            raise ValueError(f"{flag}: {path!r} is not a file (expected the .safetensors written by train-faid)")
    for name, value in DAID_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def _cmd_generate(args):
    import torch
    from transformers import GenerationConfig

    import arrag_kernels as ak
    from arrag_kernels.demo import save_pixels

    _check_flags(args)
    ids = _prompt_ids(args)
    db, daid = None, None
    if args.db:  # before loading the model: a bad database or --k fails fast
        db = ak.PatchDatabase.load(args.db, verify="full" if args.verify_full else "quick")
    if args.daid:
        if args.k > len(db):
            raise ValueError(f"--k {args.k} is larger than the database ({len(db)} entries); pass --k {len(db)} or less")
        daid = ak.DAiDConfig(lam=args.lam, tau=args.tau, k=args.k, dedup=args.dedup)
    model, encode_prompts = load_model(args.model, args.device)
    if db is not None:  # a database of another model's codebook is refused here, not just warned about
        db.check_compatible(ak.models.get_adapter(model, ak.models.ImageTokenizer), strict=True)
    blenders = None
    if args.faid:
        from arrag_kernels.faid import load_blenders
        from arrag_kernels.faid.finetuned import load_finetuned

        if args.finetuned:
            load_finetuned(model, args.finetuned)
        blenders = load_blenders(args.faid, model).to(args.device)
    ids, mask = _prompt_inputs(args, ids, encode_prompts)
    check_prompt_ids(ids, model)
    ids, mask = ids.to(args.device), mask.to(args.device)
    gen = model.generation_config
    gen = GenerationConfig(**{**gen.to_dict(), "do_sample": not args.greedy, "temperature": args.temperature,
                              "top_k": args.top_k, "guidance_scale": args.cfg,
                              "num_return_sequences": args.num_images})
    configs = tuple(c for c in (daid, blenders.config if blenders is not None else None) if c is not None)
    torch.manual_seed(args.seed)
    with ak.patched(model, db, configs[0] if len(configs) == 1 else configs or None,
                    blender_weights=blenders) as handle:
        stats = ak.DecodeStats()
        tokens = handle.generate_images(ids, attention_mask=mask, generation_config=gen, stats=stats, progress=True)
    prefix = "_".join(name for name, on in (("daid", args.daid), ("faid", args.faid)) if on) or "plain"
    paths = save_pixels(handle.adapter.decode_pixels(tokens), Path(args.out), prefix)
    print(f"{stats.summary()}\nwrote {', '.join(str(p) for p in paths)}")


def add_subcommands(sub) -> None:
    g = sub.add_parser("generate", help="generate images from prompts, optionally with DAiD and/or FAiD")
    g.add_argument("--model", default="tiny", help="'tiny' or a local checkpoint directory (a family whose adapter can load it: Janus)")
    g.add_argument("--prompt", action="append", default=[], help="text prompt (repeatable; needs a processor)")
    g.add_argument("--prompt-ids", action="append", default=[], help="comma-separated prompt token ids (repeatable)")
    g.add_argument("--out", type=output_dir, default="generated", help="output directory for PNG files")
    g.add_argument("--num-images", type=int_at_least(1), default=1, help="images per prompt")
    g.add_argument("--cfg", type=float_in(1.0, False, " (1 = no guidance)"), default=5.0,
                   help="classifier-free guidance scale, >= 1 (1 = no guidance; default 5)")
    g.add_argument("--temperature", type=float_in(0.0, True), default=1.0)
    g.add_argument("--top-k", type=int_at_least(0), default=0, help="top-k filtering before sampling (default 0 = off, as Janus)")
    g.add_argument("--greedy", action="store_true", help="argmax instead of sampling")
    g.add_argument("--seed", type=seed, default=0)
    g.add_argument("--daid", action="store_true", help="retrieval-augmented decoding (needs --db)")
    g.add_argument("--db", help="patch database directory")
    g.add_argument("--verify-full", action="store_true",
                   help="hash the whole database on load (default: a quick check of sizes, checksums of meta.json and sampled pages)")
    g.add_argument("--lam", type=float_between(0.0, 1.0), default=None, help="DAiD mixing weight in [0, 1] (default 0.05)")
    g.add_argument("--tau", type=float_in(0.0, True), default=None, help="DAiD retrieval temperature > 0 (default 0.6)")
    g.add_argument("--k", type=retrieval_k, default=None,
                   help="DAiD: retrieved neighbours per step (<= database entries; default 2048)")
    g.add_argument("--dedup", choices=["nearest", "sum"], default=None, help="DAiD: duplicate tokens (default nearest)")
    g.add_argument("--faid", default=None, metavar="BLENDERS",
                   help="FAiD with these blenders (the .safetensors train-faid or convert writes; needs --db)")
    g.add_argument("--finetuned", default=None,
                   help="FAiD: the LoRA / head file train-faid writes beside the blenders (<out stem>.finetuned.safetensors)")
    g.add_argument("--device", default="cpu")
    g.set_defaults(func=_cmd_generate)
