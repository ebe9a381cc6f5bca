"""Per-step decode overhead of DAiD and FAiD at Janus-Pro-1B, and one whole generation per loop.

    python benchmarks/decode_step.py --jsonl rows.jsonl              # CUDA: batch 16 + CFG, then 1
    python benchmarks/decode_step.py --dry --jsonl rows.jsonl        # CPU: the same plumbing, tiny model
    python benchmarks/decode_step.py --only step                     # or --only generate

Step rows (``kind: "step"``): each variant's decode is prepared
(:meth:`~arrag_kernels.decoding.StaticImageDecoder.prepare`: buffers for all 576 tokens, prefill),
moved to a mid-image retrieval step (the device counters set there), warmed up with two eager
steps, then ONE step is captured in a CUDA graph together with the counter reset, so every replay
is the same step. Variants: ``plain`` (no retrieval; ``plain-again``, a second capture of it, whose
overhead is the measurement's noise), ``daid-10M`` (exact search over 10M fp16 keys, K = 2048, on
the main stream), ``daid-10M-overlap`` and ``daid-1M-overlap`` (the search on the low-priority
side stream), ``faid`` (K = 10 from the 10M keys, hops 1+2, 2 blenders with random weights: taps
composed once when the runtime is built, never inside a replay). Each round replays every variant
``--replays`` times between two CUDA events, in an order rotated from round to round; a row's
``ms_per_step`` is the median over rounds, ``overhead_vs_plain`` the median of the per-round ratios
to ``plain`` minus 1 (0.03 = 3 %).

Whole-generation rows (``kind: "generate"``): one full image generation of each loop, timed once
after a warm-up of the library's loop (HF ``generate`` is eager, ~15 s a call at this size: it runs
once, with no warm-up of its own): ``library_s`` (the CUDA-graph loop without retrieval),
``hf_generate_s`` (plain HF ``generate``) and ``plain_vs_hf_generate_per_image`` (their ratio).

With ``--dry`` (CPU, no CUDA needed): a tiny model, 20k keys, K = 64, eager steps timed with
``time.perf_counter`` (no graph, no side stream), the static loop instead of the CUDA-graph one;
the rows' numbers mean nothing, their fields are the GPU run's. Every row is appended to
``--jsonl`` (flushed) as soon as it is measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import arrag_kernels as ak  # noqa: E402
from arrag_kernels.decoding import StaticImageDecoder  # noqa: E402
from arrag_kernels.faid import FAiDBlenders  # noqa: E402
from arrag_kernels.models import get_adapter, hf_image_generate_kwargs, tiny_prompt_ids  # noqa: E402
from arrag_kernels.patching import PatchHandle  # noqa: E402
from shapes import JANUS_PRO_1B, ModelShape, build_model, synthetic_db  # noqa: E402

FAID = ak.FAiDConfig(k=10, hops=(1, 2), blenders=2)
TINY = ModelShape("tiny", layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=128, text_vocab=256,
                  codebook=512, grid=8, patch=4, dtype="float32")
PROMPT_LEN = 12
GUIDANCE = 5.0


def _embeds(adapter, model, batch: int, device):
    """(2B, S, D) CFG prompt embeddings and (2B, S) mask for ``batch`` random prompts."""
    from transformers import GenerationConfig

    ids = tiny_prompt_ids(batch, length=PROMPT_LEN).to(device)
    gen = GenerationConfig(bos_token_id=1, pad_token_id=0, generation_kwargs={"boi_token_id": 100})
    embeds = adapter.cfg_inputs(ids, gen)
    return embeds, torch.ones(embeds.shape[:2], dtype=torch.long, device=device)


class StepVariant:
    """One variant's decode, prepared and parked at step ``at``; :meth:`replay` runs that step once."""

    def __init__(self, name, adapter, embeds, mask, num_tokens: int, at: int, cuda_graph: bool, daid=None,
                 faid=None, overlap=False):
        self.name = name
        self.decoder = StaticImageDecoder(adapter, process_logits=None, fused_cfg=(GUIDANCE, 1.0), daid=daid,
                                          faid=faid, cuda_graph=cuda_graph, overlap_retrieval=overlap)
        self.decoder.prepare(embeds, mask, num_tokens, do_sample=True)
        self.prompt_len, self.at = embeds.shape[1], at
        self.graph = None
        d = self.decoder
        with d.on_forward_stream():
            for _ in range(2):  # compile, allocate; then the graph (or the eager step on CPU)
                self._step()
            if cuda_graph:
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph, stream=d.forward_stream):
                    self._step()

    def _step(self):
        """Counters back to step ``at`` (step i writes input position S + i - 1), then one step."""
        d = self.decoder
        d.step.fill_(self.at)
        d.cache.write_pos.fill_(self.prompt_len + self.at - 1)
        d.position_ids.fill_(self.prompt_len + self.at - 1)
        d.step_once()

    def timed(self, replays: int) -> float:
        """Seconds per step over ``replays`` back-to-back steps (CUDA events around graph replays;
        perf_counter around eager steps)."""
        with self.decoder.on_forward_stream():
            if self.graph is None:
                t0 = time.perf_counter()
                for _ in range(replays):
                    self._step()
                return (time.perf_counter() - t0) / replays
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(replays):
                self.graph.replay()
            end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / replays


def _iqr(values):
    if len(values) < 2:
        return 0.0
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[2] - q[0]


def measure_steps(variants: list[StepVariant], rounds: int, replays: int) -> dict[str, dict]:
    """A/B-interleaved rounds (order rotated each round): per variant its median seconds per step,
    IQR, and the median per-round ratio to the first variant (the baseline)."""
    times = {v.name: [] for v in variants}
    for r in range(rounds):
        for v in variants[r % len(variants):] + variants[:r % len(variants)]:
            times[v.name].append(v.timed(replays))
    base = times[variants[0].name]
    return {name: {"s_per_step": statistics.median(ts), "iqr_s": _iqr(ts), "rounds": rounds, "replays": replays,
                   "ratio_to_plain": statistics.median(t / b for t, b in zip(ts, base))}
            for name, ts in times.items()}


def _emit(jsonl, row: dict) -> None:
    print(json.dumps(row), flush=True)
    if jsonl is not None:
        with open(jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")


def step_rows(model, dbs: dict, batch: int, device, dry: bool, rounds: int, replays: int, jsonl) -> None:
    adapter = get_adapter(model)
    H, W = adapter.grid
    at = (H // 2) * W + W // 2  # a retrieval position mid-image
    embeds, mask = _embeds(adapter, model, batch, device)
    k = 64 if dry else 2048
    big, small = dbs["big"], dbs["small"]
    daid = {key: ak.DAiDSampler(db, ak.DAiDConfig(lam=0.05, tau=0.6, k=k), adapter) for key, (_, db) in dbs.items()}
    keys = {"plain": 0, "faid": len(big[1]), f"daid-{big[0]}": len(big[1]), f"daid-{big[0]}-overlap": len(big[1]),
            f"daid-{small[0]}-overlap": len(small[1])}
    keys["plain-again"] = 0
    specs = [("plain", {}), ("plain-again", {}), (f"daid-{big[0]}", dict(daid=daid["big"])),
             (f"daid-{big[0]}-overlap", dict(daid=daid["big"], overlap=True)),
             (f"daid-{small[0]}-overlap", dict(daid=daid["small"], overlap=True))]
    kw = dict(num_tokens=H * W, at=at, cuda_graph=not dry)
    variants = [StepVariant(name, adapter, embeds, mask, **kw, **extra) for name, extra in specs]
    torch.manual_seed(0)
    handle = PatchHandle(model, big[1], FAID, blender_weights=FAiDBlenders.for_model(model, FAID))
    try:  # FAiD's layer hooks exist only while its step is recorded: the other graphs are already made
        variants.append(StepVariant("faid", adapter, embeds, mask, faid=handle.faid, **kw))
    finally:
        handle.faid.remove()
    results = measure_steps(variants, rounds, replays)
    for name, res in results.items():
        row = {"kind": "step", "name": f"b{batch}-{name}", "variant": name, "batch": batch, "at_step": at,
               "ms_per_step": 1e3 * res["s_per_step"], "iqr_ms": 1e3 * res["iqr_s"], "rounds": res["rounds"],
               "replays": res["replays"], "k": FAID.k if name == "faid" else (0 if name == "plain" else k),
               "db_keys": keys[name]}
        if name != "plain":
            row["overhead_vs_plain"] = res["ratio_to_plain"] - 1
        _emit(jsonl, row)
    del variants
    if device.type == "cuda":
        torch.cuda.empty_cache()


def generate_rows(model, batch: int, device, dry: bool, jsonl) -> None:
    """One timed whole generation of the library's plain loop (after one warm-up) and of HF ``generate``."""
    from transformers import GenerationConfig

    ids = tiny_prompt_ids(batch, length=PROMPT_LEN).to(device)
    mask = torch.ones_like(ids)
    gen = GenerationConfig(do_sample=True, top_k=0, guidance_scale=GUIDANCE, bos_token_id=1, pad_token_id=0,
                           generation_kwargs={"boi_token_id": 100})
    loop = "static" if dry else "cuda-graph"
    handle = PatchHandle(model, None, None)  # not installed: model.generate stays HF's

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def timed(fn) -> float:
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        assert out.shape[0] == batch
        return time.perf_counter() - t0

    library = lambda: handle.generate_images(ids, attention_mask=mask, generation_config=gen, loop=loop)  # noqa: E731
    timed(library)  # warm-up: compilation, cuBLAS, the allocator
    library_s = timed(library)
    hf_s = timed(lambda: model.generate(ids, attention_mask=mask, generation_config=gen, generation_mode="image",
                                        **hf_image_generate_kwargs(model)))
    _emit(jsonl, {"kind": "generate", "name": f"b{batch}-generate", "batch": batch, "loop": loop,
                  "library_s": library_s, "hf_generate_s": hf_s, "library_ms_per_image": 1e3 * library_s / batch,
                  "hf_generate_ms_per_image": 1e3 * hf_s / batch, "plain_vs_hf_generate_per_image": library_s / hf_s})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry", action="store_true", help="CPU plumbing: tiny model, eager steps")
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 1])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--replays", type=int, default=25)
    parser.add_argument("--only", choices=("step", "generate"), default=None,
                        help="step rows only, or whole-generation rows only (default: both)")
    parser.add_argument("--jsonl", type=Path, default=None, help="append every row to this file as it is measured")
    args = parser.parse_args(argv)
    if not args.dry and not torch.cuda.is_available():
        parser.error("no CUDA device (use --dry for the CPU plumbing)")
    device = torch.device("cpu" if args.dry else "cuda")
    t0 = time.perf_counter()
    model = build_model(TINY if args.dry else JANUS_PRO_1B, device)
    sizes = (20_000, 10_000) if args.dry else (10_000_000, 1_000_000)
    print(f"decode_step: model in {time.perf_counter() - t0:.1f} s", flush=True)
    with torch.no_grad():
        if args.only in (None, "step"):
            big = synthetic_db(model, sizes[0], device)
            small = ak.PatchDatabase(big.keys[: sizes[1]], big.values[: sizes[1]], big.meta)  # a view, no copy
            label = lambda n: f"{n // 1_000_000}M" if n >= 1_000_000 else f"{n // 1000}k"  # noqa: E731
            dbs = {"big": (label(sizes[0]), big), "small": (label(sizes[1]), small)}
            for batch in args.batches:
                step_rows(model, dbs, batch, device, args.dry, args.rounds, args.replays, args.jsonl)
        if args.only in (None, "generate"):
            for batch in args.batches:
                generate_rows(model, batch, device, args.dry, args.jsonl)
    return 0


if __name__ == "__main__":
    sys.exit(main())
