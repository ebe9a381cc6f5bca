"""FAiD commands: ``train-faid`` (fine-tune blenders) and ``convert`` (official checkpoint -> our blender
file, optionally the base weights under HF names)."""

from __future__ import annotations

from arrag_kernels.cli.common import (check_prompt_ids, float_in, int_at_least, load_model, output_file, retrieval_k,
                                      seed)


def _cmd_train_faid(args):
    import torch

    import arrag_kernels as ak
    from arrag_kernels.faid import FAiDConfig, save_blenders
    from arrag_kernels.faid.finetuned import save_finetuned
    from arrag_kernels.faid.train import train_faid
    from arrag_kernels.models import FAiDAdapter, get_adapter
    from arrag_kernels.retrieval.images import normalise_image_source

    # every argument before any work (loading the model and the database, encoding the images)
    config = FAiDConfig(k=args.k, hops=args.hops, blenders=args.blenders)
    if args.finetuned_out and not (args.lora_rank > 0 or args.train_head):
        raise ValueError("--finetuned-out: nothing to write without --lora-rank > 0 or --train-head")
    try:
        prompt = torch.tensor([[int(t) for t in args.prompt_ids.split(",")]]) if args.prompt_ids else None
    except ValueError:
        raise ValueError(f"--prompt-ids: expected comma-separated integers like 1,5,100, got {args.prompt_ids!r}") from None
    normalise_image_source(args.images)  # the folder exists and holds images
    db = ak.PatchDatabase.load(args.db)
    if config.k > len(db):
        raise ValueError(f"--k {config.k} is larger than the database ({len(db)} entries); pass --k {len(db)} or less")
    model, _ = load_model(args.model, args.device)
    adapter = get_adapter(model, FAiDAdapter)
    db.check_compatible(adapter, strict=True)  # a database of another model's codebook: refused, not warned about
    if prompt is None:
        prompt = adapter.empty_prompt(model.generation_config)
    check_prompt_ids(prompt, model)
    blenders, losses = train_faid(model, db, config, args.images, prompt, steps=args.steps,
                                  batch_size=args.batch_size, lr=args.lr, lora_rank=args.lora_rank,
                                  train_head=args.train_head, seed=args.seed,
                                  activation_checkpointing=args.activation_checkpointing)
    path = save_blenders(blenders, args.out)
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}; wrote blenders to {path}")
    if args.lora_rank > 0 or args.train_head:
        tuned_path = args.finetuned_out or path.with_suffix(".finetuned.safetensors")
        tuned = save_finetuned(model, tuned_path, head=args.train_head)
        print(f"wrote the trained base-model parts (LoRA q/v, generation head) to {tuned}")


def _cmd_convert(args):
    from arrag_kernels.faid import convert_official

    path = convert_official(args.checkpoint, args.out, num_layers=args.num_layers, hidden_size=args.hidden_size,
                            k=args.k, base_out=args.base_out)
    print(f"wrote blenders to {path}" + (f" and HF-named base weights to {args.base_out}" if args.base_out else ""))


def add_subcommands(subparsers) -> None:
    p = subparsers.add_parser("train-faid", help="fine-tune FAiD blenders on images (CE on image tokens)")
    p.add_argument("--model", default="tiny", help="'tiny' or a local checkpoint directory (a family whose adapter can load it: Janus)")
    p.add_argument("--db", required=True, help="database directory (arrag-kernels build-db)")
    p.add_argument("--images", required=True, help="folder of training images")
    p.add_argument("--out", type=output_file, required=True, help="output .safetensors file")
    p.add_argument("--prompt-ids", default=None,
                   help="comma-separated prompt ids (default: the family's prompt without text; Janus: BOS,BOI)")
    p.add_argument("--k", type=retrieval_k, default=10, help="retrieved tokens per position (default 10, as the paper)")
    p.add_argument("--hops", default="12", help="hop set of the blenders' windows: 1, 2 or 12 (= hops 1 and 2; default)")
    p.add_argument("--blenders", type=int_at_least(1), default=2, help="blender layers (default 2: layers 0 and L/2)")
    p.add_argument("--steps", type=int_at_least(1), default=100)
    p.add_argument("--batch-size", type=int_at_least(1), default=4)
    p.add_argument("--lr", type=float_in(0.0, True), default=2e-4)
    p.add_argument("--lora-rank", type=int_at_least(0), default=0, help="> 0: LoRA on q/v via peft")
    p.add_argument("--train-head", action="store_true", help="also train the image head (Janus: generation_head)")
    p.add_argument("--finetuned-out", type=output_file, default=None,
                   help="where LoRA / head weights go (default: <out stem>.finetuned.safetensors)")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute the decoder layers in backward instead of keeping their activations "
                        "(same gradients, less memory, about one more forward of compute)")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_cmd_train_faid)

    c = subparsers.add_parser("convert", help="official AR-RAG FAiD checkpoint -> arrag_kernels blender file")
    c.add_argument("checkpoint", help="official .safetensors / .bin (DeepSeek-Janus naming)")
    c.add_argument("--out", type=output_file, required=True, help="output .safetensors file")
    c.add_argument("--num-layers", type=int_at_least(1), required=True, help="decoder layers of the model (Janus-Pro-1B: 24)")
    c.add_argument("--hidden-size", type=int_at_least(1), required=True, help="hidden size (Janus-Pro-1B: 2048)")
    c.add_argument("--k", type=int_at_least(1), default=10, help="retrieved tokens per step stored in the file's config")
    c.add_argument("--base-out", type=output_file, default=None,
                   help="also write the base-model weights under HF JanusForConditionalGeneration names (.safetensors)")
    c.set_defaults(func=_cmd_convert)
