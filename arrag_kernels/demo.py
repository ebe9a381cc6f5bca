"""The embedded default job.

Main path (:func:`run_miniature_demo`): the trained miniature Janus shipped in
``arrag_kernels/miniature/weights`` (trained on Noto colour emoji rendered at 32 px) with its FAiD
blenders, a database built from the emoji train split, sample grids plain, with DAiD and with FAiD
side by side for held-out (test) prompts, and a table of test metrics. It needs the Debian packages ``fonts-noto-color-emoji`` and
``unicode-data`` (the database and the real images are rendered from them).

Fallback (:func:`run_demo`, also ``demo --random-weights``): a tiny random-weight Janus and
procedurally drawn images (gradients, stripes, checkerboards, discs), saved as PNG files and indexed
through the same folder path a user would take; it shows the machinery and timings, not image quality.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch


def procedural_images(count: int, size: int, seed: int = 0):
    """``count`` RGB PIL images of ``size`` px: seeded mixes of gradients, stripes, checkers and discs."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    images = []
    for i in range(count):
        c0, c1 = torch.rand(3, generator=g), torch.rand(3, generator=g)
        kind = i % 4
        if kind == 0:  # linear gradient in a random direction
            a = torch.rand(1, generator=g) * 6.283
            t = (x * torch.cos(a) + y * torch.sin(a)).clamp(0, 1)
        elif kind == 1:  # stripes
            f = 2 + int(torch.randint(0, 6, (1,), generator=g))
            t = (torch.sin(6.283 * f * (x + y * torch.rand(1, generator=g))) > 0).float()
        elif kind == 2:  # checkerboard
            n = 2 + int(torch.randint(0, 5, (1,), generator=g))
            t = (((x * n).floor() + (y * n).floor()) % 2).float()
        else:  # disc
            cx, cy, r = torch.rand(3, generator=g) * torch.tensor([1.0, 1.0, 0.4]) + torch.tensor([0, 0, 0.1])
            t = (((x - cx) ** 2 + (y - cy) ** 2) < r**2).float()
        rgb = c0[:, None, None] * (1 - t) + c1[:, None, None] * t
        data = (rgb.permute(1, 2, 0) * 255).round().to(torch.uint8).contiguous().numpy()
        images.append(Image.fromarray(data, "RGB"))
    return images


def save_pixels(pixels: torch.Tensor, out_dir: Path, prefix: str) -> list[Path]:
    """(B, S, S, 3) pixels in [-1, 1] -> PNG files ``prefix_<i>.png``."""
    from PIL import Image

    out_dir.mkdir(parents=True, exist_ok=True)
    data = ((pixels.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
    paths = []
    for i, img in enumerate(data):
        path = out_dir / f"{prefix}_{i}.png"
        Image.fromarray(img, "RGB").save(path)
        paths.append(path)
    return paths


def real_rows(prompts: torch.Tensor, pixels: torch.Tensor, rows: int, per_row: int):
    """One row per distinct prompt (the first ``rows``): (row prompts (rows, P), (rows * per_row, 3, S, S)
    pixels holding up to ``per_row`` distinct images of that prompt, white where it has fewer)."""
    members = {}
    for i, p in enumerate(prompts.tolist()):
        members.setdefault(tuple(p), []).append(i)
    chosen = list(members.values())[:rows]
    real = torch.ones(len(chosen) * per_row, *pixels.shape[1:])  # white: +1 in [-1, 1]
    for r, idx in enumerate(chosen):
        real[r * per_row : r * per_row + min(per_row, len(idx))] = pixels[idx[:per_row]]
    return prompts[torch.tensor([idx[0] for idx in chosen])], real


def side_by_side(panels: dict[str, torch.Tensor], per_prompt: int, gap: int = 8, scale: int = 2):
    """``panels``: label -> (rows * per_prompt, 3, S, S) pixels in [-1, 1], ``per_prompt`` consecutive
    images per row -> one PIL image: a block of ``per_prompt`` columns per panel, blocks ``gap`` white
    pixels apart, each labelled above; pixels enlarged ``scale`` times (nearest) so that the labels fit."""
    from PIL import Image, ImageDraw

    from arrag_kernels.eval.sampling import image_grid

    blocks = [image_grid(p, columns=per_prompt) for p in panels.values()]
    blocks = [b.resize((b.width * scale, b.height * scale), Image.NEAREST) for b in blocks]
    header = 16
    width = sum(b.width for b in blocks) + gap * (len(blocks) - 1)
    canvas = Image.new("RGB", (width, header + max(b.height for b in blocks)), "white")
    draw = ImageDraw.Draw(canvas)
    x = 0
    for label, block in zip(panels, blocks):
        draw.text((x + 2, 2), label, fill="black")
        canvas.paste(block, (x, header))
        x += block.width + gap
    return canvas


def run_demo(out: str | Path = "demo_out", grid: int = 16, num_images: int = 64, batch: int = 4, seed: int = 0,
             lam: float = 0.5, k: int = 64, device: str = "cpu") -> dict:
    """Build model and database, generate with and without DAiD, write PNGs, print timings."""
    from transformers import GenerationConfig

    import arrag_kernels as ak
    from arrag_kernels.models import get_adapter, hf_image_generate_kwargs, tiny_janus, tiny_prompt_ids
    from arrag_kernels.ops.knn import knn_dispatcher

    out = Path(out)
    model = tiny_janus(seed=seed, grid=grid).to(device)
    adapter = get_adapter(model)
    print(f"model: tiny random Janus, grid {grid}x{grid}, codebook {adapter.codebook_size}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, device {device}")

    image_dir = out / "db_images"
    image_dir.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(procedural_images(num_images, adapter.image_size, seed=seed)):
        im.save(image_dir / f"img_{i:04d}.png")
    t0 = time.perf_counter()
    db = ak.PatchDatabase.build(image_dir, model)
    db.save(out / "db")
    db = ak.PatchDatabase.load(out / "db")
    print(f"database: {db} built and reloaded in {time.perf_counter() - t0:.2f} s")

    prompts = tiny_prompt_ids(batch, seed=seed).to(device)
    mask = torch.ones_like(prompts)
    gen = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, guidance_scale=5.0, bos_token_id=1, pad_token_id=0,
                           generation_kwargs={"boi_token_id": 100})
    results = {}

    def hf_generate():
        torch.manual_seed(seed)
        return model.generate(prompts, attention_mask=mask, generation_config=gen, generation_mode="image",
                              **hf_image_generate_kwargs(model))

    hf_generate()  # warm-up: first calls pay one-off allocation and dispatch costs
    t0 = time.perf_counter()
    hf_tokens = hf_generate()
    results["hf_generate_s"] = time.perf_counter() - t0

    runs = {"plain": None, "daid": ak.DAiDConfig(lam=lam, tau=0.6, k=min(k, len(db)))}
    for name, cfg in runs.items():
        with ak.patched(model, db if cfg else None, cfg) as handle:
            handle.generate_images(prompts, attention_mask=mask, generation_config=gen)  # warm-up
            stats = ak.DecodeStats()
            torch.manual_seed(seed)
            tokens = handle.generate_images(prompts, attention_mask=mask, generation_config=gen, stats=stats)
        results[name] = stats
        paths = save_pixels(model.decode_image_tokens(tokens), out / "images", name)
        print(f"{name:>5}: {stats.summary()}; wrote {len(paths)} PNGs to {out / 'images'}")
        if name == "plain":
            same = bool((tokens == hf_tokens).all())
            print(f"       plain loop reproduces HF generate's sampled tokens: {same}")
            results["plain_equals_hf"] = same
    overhead = results["daid"].total_s / results["plain"].total_s - 1
    queries, keys = torch.zeros(1, db.meta.key_dim, device=device), db.keys.to(device)
    search_backend = knn_dispatcher.select(queries, keys, 1)[0]
    print(f"HF generate (no retrieval), whole call: {1e3 * results['hf_generate_s'] / (grid * grid):.2f} ms/step")
    print(f"DAiD overhead over the same loop without retrieval: {100 * overhead:+.1f}% "
          f"(search backend {search_backend!r} on {device}; retrieval is "
          f"{100 * results['daid'].retrieval_fraction:.1f}% of DAiD decode)")
    results["daid_overhead"] = overhead
    return results


def run_miniature_demo(out: str | Path = "demo_out", lam: float = 0.1, tau: float = 1.2, k: int = 256,
                       cfg: float = 5.0, per_prompt: int = 4, prompts: int = 16, seed: int = 0) -> dict:
    """Trained miniature model: plain, DAiD and FAiD sample grids for test-split prompts, and a results table.

    The default (lam, tau) is the cell `arrag-kernels eval` chose on the val split (README results).
    """
    from arrag_kernels.config import DAiDConfig
    from arrag_kernels.eval.metrics import frechet_distance
    from arrag_kernels.eval.sampling import image_grid
    from arrag_kernels.miniature.evaluate import MiniatureRun
    from arrag_kernels.miniature.train import describe_weights, progress_bar

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"weights: {describe_weights()}")
    t0 = time.perf_counter()
    run = MiniatureRun(progress=True)
    m = run.meta["config"]
    print(f"model: trained miniature Janus ({m['size']} px, {m['size'] // m['patch_size']}x"
          f"{m['size'] // m['patch_size']} tokens, codebook {m['codebook_size']}, hidden {m['hidden_size']}, "
          f"{m['num_layers']} layers), database {run.db} from {run.ds.split.count('train')} train emoji "
          f"({time.perf_counter() - t0:.1f} s)")
    daid = DAiDConfig(lam=lam, tau=tau, k=min(k, len(run.db)))
    test_p, test_x, test_t = run.split("test")
    row_prompts, real = real_rows(test_p, test_x, prompts, per_prompt)
    grid_prompts = row_prompts.repeat_interleave(per_prompt, 0)
    methods = {"plain": (None, None), f"DAiD lam={lam} tau={tau}": (daid, None)}
    if run.blenders is not None:  # shipped beside the weights (miniature/train.py, stage 4)
        c = run.blenders.config
        methods[f"FAiD hops={c.hops_label} b={c.blenders}"] = (None, run.blenders)
    panels = {"real (test)": real}
    for name, (cfg_d, blenders) in methods.items():
        panels[name] = run.sample(grid_prompts, cfg_d, seed=seed, cfg=cfg, blenders=blenders)
    files = []
    for name, pixels in panels.items():
        path = out / f"miniature_{name.split()[0].lower()}.png"
        image_grid(pixels, columns=per_prompt * 4).save(path)
        files.append(path)
    side_by_side(panels, per_prompt).save(out / "miniature_side_by_side.png")
    print(f"wrote {', '.join(str(f) for f in files)} and {out / 'miniature_side_by_side.png'} "
          f"(rows: one test subgroup each; columns: {' | '.join(panels)})")

    test_f = run.features(test_x)
    rows = {}
    with progress_bar(2 * len(methods), f"test metrics ({len(test_p)} emoji)", True) as bar:
        for name, (cfg_d, blenders) in methods.items():
            t1 = time.perf_counter()
            bar.set_postfix_str(f"{name}: NLL")
            nll = run.nll(test_p, test_t, cfg_d, blenders)
            bar.update()
            bar.set_postfix_str(f"{name}: sampling")
            fake = run.sample(test_p, cfg_d, seed=seed, cfg=cfg, blenders=blenders)
            bar.update()
            rows[name] = {"nll": nll["nll_all"], "nll_retrieval": nll["nll_retrieval"],
                          "fd": frechet_distance(test_f, run.features(fake)), "s": time.perf_counter() - t1}
    print(f"\ntest split ({len(test_p)} held-out emoji, sampling seed {seed}, CFG {cfg}; "
          "`arrag-kernels eval` for seeds, FWD, precision/recall and sweeps):")
    print(f"{'method':<24}{'NLL nats/token':>16}{'NLL retr. pos.':>16}{'FD (classifier)':>17}{'time s':>9}")
    for name, r in rows.items():
        print(f"{name:<24}{r['nll']:>16.3f}{r['nll_retrieval']:>16.3f}{r['fd']:>17.2f}{r['s']:>9.1f}")
    return {"files": [str(f) for f in files], "results": rows}


def main_demo(args) -> dict:
    """``arrag-kernels demo``: the miniature demo when its data and weights are there, else the random-weight one.

    ``--lam`` / ``--k`` / ``--seed`` act on both (None: each demo's own default); ``--grid``, ``--images``,
    ``--batch`` and a non-CPU ``--device`` only on the random-weight demo, and are refused (ValueError)
    when the miniature demo would run."""
    from arrag_kernels.miniature.data import DEBIAN_PACKAGES, emoji_available
    from arrag_kernels.miniature.train import WEIGHTS_DIR

    shared = {name: getattr(args, name) for name in ("lam", "k") if getattr(args, name) is not None}
    if not args.random_weights:
        if emoji_available() and (WEIGHTS_DIR / "meta.json").is_file():
            refused = [f"--{name}" for name in ("grid", "images", "batch") if getattr(args, name) is not None]
            refused += [f"--device {args.device}"] if args.device != "cpu" else []
            if refused:
                raise ValueError(f"{', '.join(refused)}: only the random-weight demo takes "
                                 f"{'this' if len(refused) == 1 else 'these'} (the miniature demo runs the shipped "
                                 "model, 8x8 tokens, its 560 test prompts and train-split database, on the CPU); "
                                 "add --random-weights or leave them out")
            return run_miniature_demo(out=args.out, seed=args.seed, **shared)
        why = (f"the emoji data is not installed (apt-get install -y {DEBIAN_PACKAGES})" if not emoji_available()
               else f"no trained weights in {WEIGHTS_DIR}")
        print(f"miniature demo unavailable: {why}; running the random-weight demo instead")
    own = {key: getattr(args, name) for key, name in (("grid", "grid"), ("num_images", "images"), ("batch", "batch"))
           if getattr(args, name) is not None}
    return run_demo(out=args.out, seed=args.seed, device=args.device, **own, **shared)
