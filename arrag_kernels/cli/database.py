"""Database commands: ``build-db`` (encode a folder of images), ``merge-db`` (one database from a
partitioned build's parts) and ``import-official`` (a released AR-RAG database)."""

from __future__ import annotations

import argparse

from arrag_kernels.cli.common import check_model_spec, int_at_least, load_model, output_dir
from arrag_kernels.retrieval.integrity import VERIFY_MODES


def _cmd_build_db(args):
    import sys

    import arrag_kernels as ak
    from arrag_kernels.retrieval.images import list_image_files, readable_images

    ak.KeyLayout(neighborhood=args.neighborhood, hops=args.hops, border=args.border)  # bad values fail before work
    check_model_spec(args.model or "tiny", args.device)
    files = list_image_files(args.images)
    images, bad = readable_images(files)  # every file opened before the model loads and the encoding starts
    if bad and (args.stop_on_bad_image or not images):
        why = "--stop-on-bad-image" if images else f"none of the {len(files)} images can be read"
        raise ValueError(f"cannot read image {str(bad[0][0])!r}: {bad[0][1]} ({why}; {len(bad)} unreadable: "
                         f"{', '.join(p.name for p, _ in bad[:5])}{', ...' if len(bad) > 5 else ''})")
    model, _ = load_model(args.model or "tiny", args.device)
    if args.model is None:  # after the checks: an error stays one line
        print("arrag-kernels build-db: warning: no --model given: building for the random tiny test model; a "
              "database fits only the model that built it, so pass --model DIR (or --model tiny to mean it)",
              file=sys.stderr)
    kwargs = dict(neighborhood=args.neighborhood, hops=args.hops, border=args.border, key_source=args.key_source,
                  batch_size=args.batch_size, index=args.index)
    if args.index == "ivfpq":  # built on disk: chunked, resumable, saved atomically at --out
        db = ak.PatchDatabase.build(images, model, path=args.out, nlist=args.nlist, m=args.m, nbits=args.nbits,
                                    opq=args.opq, nprobe=args.nprobe, chunk_images=args.chunk_images, **kwargs)
        print(f"wrote {db} (nlist {args.nlist}, nprobe {db.nprobe}) to {args.out}")
    else:
        db = ak.PatchDatabase.build(images, model, **kwargs)
        print(f"wrote {db} to {db.save(args.out)}")
    if bad:
        print(f"skipped {len(bad)} unreadable of {len(files)} images (--stop-on-bad-image stops instead):")
        for path, why in bad:
            print(f"  {path}: {why}")


def _cmd_merge_db(args):
    from arrag_kernels.retrieval.ondisk import merge_parts
    from arrag_kernels.retrieval.parts import check_merge_target, merge_in_memory

    check_merge_target(args.parts, args.out)
    if args.on_disk:  # one part in memory at a time; faiss-cpu searches it (lists memory-mapped)
        import arrag_kernels as ak

        path = merge_parts(args.parts, args.out, verify=args.verify)
        print(f"wrote {ak.PatchDatabase.load(path, verify='none')} (on-disk inverted lists) to {path}")
    else:
        db = merge_in_memory(args.parts, verify=args.verify)
        print(f"wrote {db} to {db.save(args.out)}")


def _cmd_import_official(args):
    import arrag_kernels as ak

    from arrag_kernels.retrieval.builders import describe_official

    db = ak.PatchDatabase.from_official(args.dir, nprobe=args.nprobe, codebook_size=args.codebook_size,
                                        grid=tuple(args.grid))
    facts, assumed = describe_official(db)
    print(f"{args.dir}: {facts}\n{assumed}; override with --codebook-size and --grid")
    if args.out:
        print(f"wrote {db.save(args.out)}")


def add_subcommands(sub) -> None:
    b = sub.add_parser("build-db", help="encode a folder of images into a patch database")
    b.add_argument("images", help="folder of images (searched recursively)")
    b.add_argument("--out", type=output_dir, required=True, help="database directory to write (atomically)")
    b.add_argument("--model", default=None, help="a local checkpoint directory (a family whose adapter can load it: "
                   "Janus), or 'tiny' (a random test model; the default, with a warning)")
    b.add_argument("--neighborhood", choices=["causal", "full"], default="causal")
    b.add_argument("--hops", default="1", help="hop set: 1, 2 or 12 (= hops 1 and 2); default 1")
    b.add_argument("--border", choices=["skip", "zero"], default="skip")
    b.add_argument("--key-source", choices=["latent", "codebook"], default="latent")
    b.add_argument("--batch-size", type=int_at_least(1), default=16)
    b.add_argument("--device", default="cpu")
    b.add_argument("--index", choices=["flat", "faiss-flat", "ivfpq"], default="flat",
                   help="flat (exact), faiss-flat, or ivfpq (FAISS OPQ + IVF-PQ, official layout; needs faiss)")
    b.add_argument("--nlist", type=int_at_least(1), default=800, help="ivfpq: IVF lists (official: 800)")
    b.add_argument("--m", type=int_at_least(1), default=8, help="ivfpq: PQ sub-quantizers (official: 8)")
    b.add_argument("--nbits", type=int_at_least(1), default=8, help="ivfpq: bits per PQ code (official: 8)")
    b.add_argument("--opq", action=argparse.BooleanOptionalAction, default=True, help="ivfpq: OPQ rotation (official: on)")
    b.add_argument("--nprobe", type=int_at_least(1), default=1, help="ivfpq: lists probed per query, saved with the index")
    b.add_argument("--chunk-images", type=int_at_least(1), default=1024, help="ivfpq: images per resumable chunk")
    b.add_argument("--stop-on-bad-image", action="store_true",
                   help="stop at an unreadable image (default: skip it; the skipped files are listed at the end)")
    b.set_defaults(func=_cmd_build_db)

    m = sub.add_parser("merge-db", help="merge a partitioned database (the parts of a torchrun or Ray build) into one")
    m.add_argument("parts", help="the partitioned database directory (parts.json, trained.index, part-*/)")
    m.add_argument("--out", type=output_dir, required=True, help="merged database directory to write (atomically)")
    m.add_argument("--on-disk", action="store_true",
                   help="merge into faiss on-disk inverted lists, one part in memory at a time (for databases larger "
                        "than memory; searched by faiss-cpu); default: merged in memory and saved")
    m.add_argument("--verify", choices=VERIFY_MODES, default="quick",
                   help="checks of the parts' files first: quick (sizes and page digests, default), full (hash every "
                        "file) or none")
    m.set_defaults(func=_cmd_merge_db)

    o = sub.add_parser("import-official", help="validate a released AR-RAG database (faiss_ivf_pq_opq.index + "
                       "next_codes.npy) and optionally save it as a database directory")
    o.add_argument("dir", help="directory holding faiss_ivf_pq_opq.index and next_codes.npy")
    o.add_argument("--nprobe", type=int_at_least(1), default=1, help="lists probed per query (set on the inner IVF)")
    o.add_argument("--codebook-size", type=int_at_least(1), default=16384,
                   help="VQ codebook size; not stored in the files (Janus-Pro: 16384)")
    o.add_argument("--grid", type=int_at_least(1), nargs=2, metavar=("H", "W"), default=[24, 24],
                   help="token grid of the database's images; not stored in the files (Janus-Pro, 384 px: 24 24)")
    o.add_argument("--out", type=output_dir, help="database directory to write (atomically); omit to only validate")
    o.set_defaults(func=_cmd_import_official)
