"""Per-step decode overhead of DAiD and FAiD at Janus-Pro-1B: one CUDA-graphed step per variant.

    pytest benchmarks/bench_decode_step.py --benchmark-only

Each variant's decode is prepared (:meth:`~arrag_kernels.decoding.StaticImageDecoder.prepare`:
buffers for all 576 tokens, prefill), parked at a mid-image retrieval step (the device counters
set there), warmed up with two eager steps, then ONE step is captured in a CUDA graph together
with the counter reset, so every replay is the same step. A timed call replays it ``REPLAYS``
times between two CUDA events (``timing.run(device_events=True)``); ``plain`` (the library's
CUDA-graphed step without retrieval) runs interleaved with every row, round by round, so
``overhead_vs_plain`` (the median of the per-round ratios, minus 1: 0.03 = 3 %) comes from the
same rounds. Rows, batch 16 + CFG then batch 1:

* ``plain-again``: a second capture of the plain step, whose overhead is the measurement's noise;
* ``daid-10M``: DAiD with the exact search over 10M fp16 keys, K = 2048, on the main stream;
* ``daid-10M-overlap`` / ``daid-1M-overlap``: the search on the side stream, below the forward's
  priority, concurrent with the model step;
* ``faid``: FAiD, K = 10 from the 10M keys, hops 1+2, 2 blenders with random weights (their taps
  composed once when the runtime is built, never inside a timed call), its search on the main stream;
* ``faid-overlap``: the same with the search on the side stream, joined at the first blender layer
  (layer 0: it can hide behind the embedding and layer 0's attention only).

The model is ``shapes.JANUS_PRO_1B`` (built on the meta device, filled on the GPU, bf16). On CPU
(plumbing only, numbers meaningless): the tiny model at batch 2, 20k / 10k keys, K = 64, eager
steps on the host clock. The whole-generation rows (plain HF ``generate`` and the library's loops)
are ``bench_decode.py``'s.
"""

from __future__ import annotations

import pytest
import torch

import arrag_kernels as ak
import timing
from arrag_kernels.decoding import StaticImageDecoder
from arrag_kernels.faid import FAiDBlenders
from arrag_kernels.models import get_adapter, tiny_prompt_ids
from arrag_kernels.patching import PatchHandle
from shapes import JANUS_PRO_1B, ModelShape, build_model, synthetic_db

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
FAID = ak.FAiDConfig(k=10, hops=(1, 2), blenders=2)
TINY = ModelShape("tiny", layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=128, text_vocab=256,
                  codebook=512, grid=8, patch=4, dtype="float32")
# GPU: the target shape; CPU: the same code on the tiny model (eager steps: no CUDA graph on CPU)
SHAPE, BATCHES, DB_SIZES, K, REPLAYS = ((JANUS_PRO_1B, (16, 1), (10_000_000, 1_000_000), 2048, 25) if CUDA else
                                        (TINY, (2,), (20_000, 10_000), 64, 2))
PROMPT_LEN, GUIDANCE = 12, 5.0


def _label(n: int) -> str:
    return f"{n // 1_000_000}M" if n >= 1_000_000 else f"{n // 1000}k"


BIG, SMALL = (_label(n) for n in DB_SIZES)
# variant -> (database: "big", "small" or None, DAiD?, overlap?, FAiD?)
VARIANTS = {"plain": (None, False, False, False), "plain-again": (None, False, False, False),
            f"daid-{BIG}": ("big", True, False, False), f"daid-{BIG}-overlap": ("big", True, True, False),
            f"daid-{SMALL}-overlap": ("small", True, True, False), "faid": ("big", False, False, True),
            "faid-overlap": ("big", False, True, True)}


def cfg_embeds(adapter, batch: int, device):
    """(2B, S, D) CFG prompt embeddings and (2B, S) mask for ``batch`` random prompts."""
    from transformers import GenerationConfig

    ids = tiny_prompt_ids(batch, length=PROMPT_LEN).to(device)
    gen = GenerationConfig(bos_token_id=1, pad_token_id=0, generation_kwargs={"boi_token_id": 100})
    embeds = adapter.cfg_inputs(ids, gen)
    return embeds, torch.ones(embeds.shape[:2], dtype=torch.long, device=device)


class ParkedStep:
    """A decode prepared and parked at step ``at``; :meth:`run` runs that same step ``n`` times
    (graph replays on CUDA, eager steps elsewhere), joined back to the current stream."""

    def __init__(self, adapter, embeds, mask, num_tokens: int, at: int, cuda_graph: bool, daid=None, faid=None,
                 overlap=False):
        self.decoder = StaticImageDecoder(adapter, process_logits=None, fused_cfg=(GUIDANCE, 1.0), daid=daid,
                                          faid=faid, cuda_graph=cuda_graph, overlap_retrieval=overlap)
        self.decoder.prepare(embeds, mask, num_tokens, do_sample=True)
        self.prompt_len, self.at = embeds.shape[1], at
        self.graph = None
        d = self.decoder
        with d.on_forward_stream():
            for _ in range(2):  # compile, allocate; then the graph
                self._step()
            if cuda_graph:
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph, stream=d.forward_stream):
                    self._step()
        self._join()

    def _step(self):
        """Counters back to step ``at`` (step i writes input position S + i - 1), then one step."""
        d = self.decoder
        d.step.fill_(self.at)
        d.cache.write_pos.fill_(self.prompt_len + self.at - 1)
        d.position_ids.fill_(self.prompt_len + self.at - 1)
        d.step_once()

    def _join(self):
        if self.decoder.forward_stream is not None:
            torch.cuda.current_stream().wait_stream(self.decoder.forward_stream)

    def run(self, n: int) -> None:
        with self.decoder.on_forward_stream():
            for _ in range(n):
                self.graph.replay() if self.graph is not None else self._step()
        self._join()


@pytest.fixture(scope="module")
def model():
    return build_model(SHAPE, DEVICE)


@pytest.fixture(scope="module")
def databases(model):
    big = synthetic_db(model, DB_SIZES[0], DEVICE)
    small = ak.PatchDatabase(big.keys[: DB_SIZES[1]], big.values[: DB_SIZES[1]], big.meta)  # a view: no copy
    return {"big": big, "small": small}


_parked: dict[int, dict[str, ParkedStep]] = {}


def parked_steps(model, databases, batch: int) -> dict[str, ParkedStep]:
    """Every variant's parked step at ``batch`` (built once; one batch's on the device at a time)."""
    if batch in _parked:
        return _parked[batch]
    _parked.clear()
    if CUDA:
        torch.cuda.empty_cache()
    adapter = get_adapter(model)
    H, W = adapter.grid
    embeds, mask = cfg_embeds(adapter, batch, DEVICE)
    kw = dict(num_tokens=H * W, at=(H // 2) * W + W // 2, cuda_graph=CUDA)  # a retrieval position mid-image
    daid = {size: ak.DAiDSampler(db, ak.DAiDConfig(lam=0.05, tau=0.6, k=K), adapter) for size, db in databases.items()}
    steps = {}
    for name, (db, use_daid, overlap, use_faid) in VARIANTS.items():
        if not use_faid:
            steps[name] = ParkedStep(adapter, embeds, mask, daid=daid[db] if use_daid else None, overlap=overlap, **kw)
    torch.manual_seed(0)
    handle = PatchHandle(model, databases["big"], FAID, blender_weights=FAiDBlenders.for_model(model, FAID))
    try:  # FAiD's layer hooks exist only while its steps are recorded: the other graphs are already made
        for name, (_, _, overlap, use_faid) in VARIANTS.items():
            if use_faid:
                steps[name] = ParkedStep(adapter, embeds, mask, faid=handle.faid, overlap=overlap, **kw)
    finally:
        handle.faid.remove()
    _parked[batch] = steps
    return steps


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "plain"])
@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"b{b}")
def test_decode_step(benchmark, model, databases, batch, variant):
    steps = parked_steps(model, databases, batch)
    row, plain = steps[variant], steps["plain"]
    db, use_daid, _, use_faid = VARIANTS[variant]
    benchmark.group = f"decode-step-{SHAPE.name}-b{batch}"
    benchmark.extra_info.update(variant=variant, batch=batch, at_step=row.at, replays=REPLAYS,
                                db_keys=len(databases[db]) if db else 0, k=K if use_daid else FAID.k if use_faid else 0)
    timing.run(benchmark, lambda: row.run(REPLAYS), {"plain": lambda: plain.run(REPLAYS)}, device_events=True)
    if "median_s" in benchmark.extra_info:
        benchmark.extra_info["ms_per_step"] = 1e3 * benchmark.extra_info["median_s"] / REPLAYS
        benchmark.extra_info["overhead_vs_plain"] = benchmark.extra_info["ratio_to_plain"] - 1
    tokens = row.decoder.tokens
    assert bool((tokens[:, row.at] >= 0).all()) and bool((tokens[:, row.at + 1:] == -1).all())
