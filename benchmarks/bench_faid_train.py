"""One FAiD training step on the whole model: literal vs dense blenders, with and without activation
checkpointing of the decoder layers.

Times ``FAiDTrainer.step`` (forward, backward, AdamW) given the retrieved ids, which depend on the
ground truth only (computed once per image; their memory is recorded apart as
``retrieval_peak_bytes``), and records the step's memory in ``extra_info``, measured outside the
timed call on fresh blenders (gradients unset):

* ``saved_bytes``: bytes autograd saves in the forward, parameters excluded (:func:`saved_activation_bytes`);
* ``retained_bytes``: bytes allocated by the forward and still alive when it returns (everything the
  graph keeps, checkpoint inputs and blender inputs included);
* ``peak_bytes``: highest allocation above the start during forward + backward (includes the
  trainable parameters' gradients, not the weights nor AdamW's state);
* ``*_ratio``: the literal formulation without checkpointing divided by this provider, same batch.

Cases: ``cpu-tiny`` (D = 64, 2 layers, 24 x 24, K = 10, B = 2, fp32) on CPU; ``janus-pro-1b``
(D = 2048, FFN 5632, 16 heads, 24 layers, codebook 16384, 24 x 24, K = 10, hops "12", 2 blenders,
B = 2, bf16) on CUDA only: on 2 CPU cores one literal step at that width takes ~10 minutes. For a CPU measurement
of that width with fewer layers, run this file as a script::

    python benchmarks/bench_faid_train.py --case janus-pro-1b --layers 4 --batch 1 --device cpu

Run the benchmarks: ``pytest benchmarks/bench_faid_train.py --benchmark-only``.
"""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

import arrag_kernels as ak
import timing
from arrag_kernels.faid import FAiDBlenders, FAiDConfig
from arrag_kernels.faid.train import FAiDTrainer, encode_images
from arrag_kernels.profiling import allocated_bytes, saved_activation_bytes
from arrag_kernels.models import get_adapter, tiny_janus, tiny_janus_config, tiny_prompt_ids


@dataclasses.dataclass(frozen=True)
class TrainCase:
    hidden: int
    layers: int
    codebook: int
    batch: int
    dtype: str
    device: str
    intermediate: int | None = None  # None: tiny_janus's 2 * hidden
    heads: int | None = None  # None: tiny_janus's 4 query / 2 key-value heads
    grid: int = 24
    k: int = 10
    hops: tuple[int, ...] = (1, 2)
    blenders: int = 2
    db_images: int = 8


CASES = {
    "cpu-tiny": TrainCase(hidden=64, layers=2, codebook=512, batch=2, dtype="float32", device="cpu"),
    "janus-pro-1b": TrainCase(hidden=2048, layers=24, codebook=16384, batch=2, dtype="bfloat16", device="cuda",
                              intermediate=5632, heads=16),
}
# provider: (formulation, activation_checkpointing)
PROVIDERS = {"literal": ("literal", False), "dense": ("dense", False),
             "literal-ckpt": ("literal", True), "dense-ckpt": ("dense", True)}
BASELINE = "literal"


def build_model(case: TrainCase):
    """The tiny Janus at ``case``'s sizes (random weights), on its device and dtype."""
    if case.intermediate is None and case.heads is None:
        model = tiny_janus(seed=0, grid=case.grid, hidden_size=case.hidden, num_layers=case.layers,
                           codebook_size=case.codebook)
    else:
        from transformers import JanusForConditionalGeneration

        config = tiny_janus_config(grid=case.grid, hidden_size=case.hidden, num_layers=case.layers,
                                   codebook_size=case.codebook)
        text = config.text_config
        text.intermediate_size = case.intermediate or text.intermediate_size
        text.num_attention_heads = text.num_key_value_heads = case.heads or text.num_attention_heads
        text.head_dim = case.hidden // text.num_attention_heads
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = JanusForConditionalGeneration(config).eval()
    return model.to(device=case.device, dtype=getattr(torch, case.dtype))


@functools.lru_cache(maxsize=1)
def setup(case: TrainCase):
    """(model, database, prompts, tokens) of ``case``; the images are random (memory and time do not
    depend on them)."""
    with ak.use_backend("reference"):
        model = build_model(case)
        side = get_adapter(model).image_size
        images = torch.rand(case.db_images, 3, side, side, generator=torch.Generator().manual_seed(1)) * 2 - 1
        images = images.to(device=case.device, dtype=getattr(torch, case.dtype))
        db = ak.PatchDatabase.build(images, model, progress=False)
        tokens = encode_images(model, images[: case.batch]).to(case.device)
    return model, db, tiny_prompt_ids(case.batch).to(case.device), tokens


def make_trainer(case: TrainCase, provider: str) -> FAiDTrainer:
    model, db, _, _ = setup(case)
    formulation, ckpt = PROVIDERS[provider]
    torch.manual_seed(0)
    blenders = FAiDBlenders.for_model(model, FAiDConfig(k=case.k, hops=case.hops, blenders=case.blenders))
    return FAiDTrainer(model, db, blenders, formulation=formulation, activation_checkpointing=ckpt)


def step_memory(trainer: FAiDTrainer, prompts, tokens, device) -> tuple[float, dict]:
    """(loss, {"saved_bytes", "retained_bytes", "peak_bytes", "retrieval_peak_bytes"}) of one forward +
    backward given the retrieved ids, and of the retrieval itself."""
    trainer.optimizer.zero_grad(set_to_none=True)
    params = [*trainer.model.parameters(), *trainer.blenders.parameters()]
    retrieved, _, retrieval_peak = allocated_bytes(lambda: trainer.retrieve_all(tokens), device)
    (loss, saved), retained, fwd_peak = allocated_bytes(
        lambda: saved_activation_bytes(lambda: trainer.loss(prompts, tokens, retrieved), params), device)
    _, _, bwd_peak = allocated_bytes(loss.backward, device)
    trainer.optimizer.zero_grad(set_to_none=True)
    return float(loss.detach()), {"saved_bytes": saved, "retained_bytes": retained,
                                  "peak_bytes": max(fwd_peak, retained + bwd_peak),
                                  "retrieval_peak_bytes": retrieval_peak}


@functools.lru_cache(maxsize=8)
def measure(case: TrainCase, provider: str) -> tuple[float, dict]:
    _, _, prompts, tokens = setup(case)
    with ak.use_backend("reference" if case.device == "cpu" else "auto"):
        return step_memory(make_trainer(case, provider), prompts, tokens, case.device)


def ratios(case: TrainCase, provider: str) -> dict:
    _, base = measure(case, BASELINE)
    _, mem = measure(case, provider)
    return {f"{k.removesuffix('_bytes')}_ratio": base[k] / mem[k]
            for k in ("saved_bytes", "retained_bytes", "peak_bytes")}


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("case_name", list(CASES))
def test_faid_train_step(benchmark, case_name, provider):
    case = CASES[case_name]
    if case.device == "cuda" and not torch.cuda.is_available():
        pytest.skip("the Janus-Pro-1B width needs a CUDA GPU (on CPU: run this file as a script with --layers)")
    _, _, prompts, tokens = setup(case)
    loss, mem = measure(case, provider)
    ref_loss, _ = measure(case, "dense")
    tol = 2e-2 if case.dtype == "bfloat16" else 1e-5
    assert abs(loss - ref_loss) <= tol * max(1.0, abs(ref_loss)), (provider, loss, ref_loss)
    trainer = make_trainer(case, provider)
    backend = "reference" if case.device == "cpu" else "auto"
    with ak.use_backend(backend):
        retrieved = trainer.retrieve_all(tokens)

    def run():
        return trainer.step(prompts, tokens, retrieved)  # float(loss): synchronises

    timing.run(benchmark, run, min_rounds=1)  # a memory benchmark: its time is a side note
    benchmark.extra_info.update(
        provider=provider, **dataclasses.asdict(case), **mem, **ratios(case, provider),
        memory_note="peak_bytes includes trainable gradients; ratios: literal without checkpointing / this",
    )


def _table(case: TrainCase, providers) -> None:
    """Print the memory table of ``providers`` (the literal baseline is measured first), row by row."""
    import time

    mib = 2**20
    print("| provider | saved MiB | retained MiB | peak MiB | saved x | retained x | peak x | loss | s |")
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    for provider in dict.fromkeys([BASELINE, *providers]):
        t0 = time.perf_counter()
        loss, mem = measure(case, provider)
        r = ratios(case, provider)
        print(f"| {provider} | {mem['saved_bytes'] / mib:.1f} | {mem['retained_bytes'] / mib:.1f} | "
              f"{mem['peak_bytes'] / mib:.1f} | {r['saved_ratio']:.1f} | {r['retained_ratio']:.1f} | "
              f"{r['peak_ratio']:.1f} | {loss:.5f} | {time.perf_counter() - t0:.0f} |", flush=True)
    print(f"retrieval (apart): peak {mem['retrieval_peak_bytes'] / mib:.1f} MiB")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="memory of one FAiD training step, all providers")
    parser.add_argument("--case", choices=list(CASES), default="cpu-tiny")
    parser.add_argument("--providers", default=",".join(PROVIDERS),
                        help="comma-separated subset of " + ",".join(PROVIDERS))
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--grid", type=int, default=None)
    parser.add_argument("--k", type=int, default=None)
    args = parser.parse_args()
    overrides = {k: v for k, v in dict(layers=args.layers, batch=args.batch, dtype=args.dtype, device=args.device,
                                       grid=args.grid, k=args.k).items() if v is not None}
    case = dataclasses.replace(CASES[args.case], **overrides)
    print(case, flush=True)
    _table(case, args.providers.split(","))
