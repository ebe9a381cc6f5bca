"""Test helpers: the one list of backends (``op_backends``), one tolerance table per dtype
(``TOLERANCES``: direct and error-relative comparisons with informative failure messages), NaN-poisoned
output buffers, checks shared by decode tests, and the set-ups the model-family and released-database tests
share (seeded tiny models, latent databases, unpatched/patched generate, a released-layout folder). The
top-k oracle is in tests/oracles.py."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from arrag_kernels import _ext
from arrag_kernels.ops import BACKENDS

CUDA = torch.cuda.is_available()


def _triton_unavailable() -> str | None:
    try:
        import arrag_kernels.ops._triton  # noqa: F401  registers the Triton implementations
    except ImportError as exc:
        return f"triton is not importable ({exc})"
    return None


# Why a backend cannot run in this test session (None: it can). The one list every op test draws on.
UNAVAILABLE = {
    "reference": None,
    "triton": _triton_unavailable(),  # compiled on CUDA, else through the interpreter (TRITON_INTERPRET=1)
    "cpp": None if _ext.HAS_EXT else f"C++ extension unavailable: {_ext.EXT_ERROR}",
}


def op_backends(dispatcher, exclude=(), dtypes: dict | None = None) -> list:
    """pytest parameters of every backend ``dispatcher``'s op implements (in the order of
    ``arrag_kernels.ops.BACKENDS``), each skipped with its reason where it cannot run here. The Triton
    kernels are imported above, so their registrations are visible; a Triton that cannot be imported
    is listed for every op (and skipped).

    With ``dtypes`` ({backend: [dtype, ...]}, key "*" for the others) the parameters are (backend, dtype)
    pairs, each backend with the dtypes it supports (so ``parametrize("backend,dtype", ...)``)."""
    params = []
    for name in BACKENDS:
        implemented = name in dispatcher._impls or (name == "triton" and UNAVAILABLE["triton"] is not None)
        if not implemented or name in exclude:
            continue
        reason = UNAVAILABLE[name]
        marks = pytest.mark.skipif(reason is not None, reason=reason or "")
        if dtypes is None:
            params.append(pytest.param(name, id=name, marks=marks))
        else:
            for dtype in dtypes.get(name, dtypes.get("*", ())):
                params.append(pytest.param(name, dtype, id=f"{name}-{str(dtype).removeprefix('torch.')}", marks=marks))
    return params


# The dtypes Triton kernels are tested in: bfloat16 only compiled (the interpreter computes bf16 wrongly).
TRITON_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])


def backend_device(backend: str) -> str:
    """Where a backend's kernels run in tests: Triton on CUDA when there is one (else through the
    interpreter on the CPU); the C++ extension and the reference on the CPU."""
    return "cuda" if backend == "triton" and CUDA else "cpu"


# torch.library.opcheck arguments: every check compiled on CUDA; under the Triton interpreter only the
# schema and autograd-registration checks (wrap_triton returns the raw interpreted kernel there, which
# fake tensors cannot launch). torch 2.11 refuses test_utils=None, so the CUDA case passes nothing.
OPCHECK_KWARGS = {} if CUDA else {"test_utils": ("test_schema", "test_autograd_registration")}


@dataclass(frozen=True)
class Tolerance:
    """How close a kernel must be, in one compute dtype.

    ``atol``/``rtol``: direct comparison against a reference (``assert_close``). ``factor``/``floor``:
    error-relative comparison in the flash-attention style (``assert_error_relative``): the kernel's
    largest error against a high-precision ground truth may be at most ``factor`` times the reference
    implementation's own largest error in the same dtype, plus ``floor``.
    """

    atol: float
    rtol: float
    factor: float
    floor: float


TOLERANCES = {
    torch.float32: Tolerance(atol=1e-5, rtol=1e-5, factor=2.0, floor=1e-6),
    torch.float16: Tolerance(atol=2e-3, rtol=2e-3, factor=2.0, floor=1e-4),
    torch.bfloat16: Tolerance(atol=2e-2, rtol=2e-2, factor=2.0, floor=1e-3),
}


def _first_mismatch(actual, expected, bad) -> str:
    idx = tuple(int(i) for i in bad.nonzero()[0])
    return f"first mismatch at {idx}: got {actual[idx].item()!r}, expected {expected[idx].item()!r}"


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype = torch.float32, what: str = "",
                 atol: float | None = None):
    """Like torch.testing.assert_close with the table's tolerance (``atol`` raises the table's absolute
    one where a computation's error scale is known); reports max error and first mismatch."""
    tol = TOLERANCES[dtype]
    atol = tol.atol if atol is None else max(atol, tol.atol)
    actual, expected = actual.detach().float().cpu(), expected.detach().float().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    bad = ~torch.isclose(actual, expected, atol=atol, rtol=tol.rtol, equal_nan=False)
    if bad.any():
        err = (actual - expected).abs().nan_to_num(float("inf")).max().item()
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{bad.numel()} elements differ (atol={atol}, rtol={tol.rtol}); max abs error "
            f"{err:.3g}; {_first_mismatch(actual, expected, bad)}"
        )


def assert_error_relative(actual: torch.Tensor, reference: torch.Tensor, truth: torch.Tensor, dtype: torch.dtype,
                          what: str = ""):
    """Flash-attention-style check: ``actual`` (the kernel in ``dtype``) is at most ``factor`` times as far
    from ``truth`` (the same computation in float64, or float32 for fp16/bf16 inputs) as ``reference``
    (the reference implementation in ``dtype``) is, plus ``floor`` (table ``TOLERANCES``)."""
    tol = TOLERANCES[dtype]
    actual, reference, truth = (t.detach().double().cpu() for t in (actual, reference, truth))
    assert actual.shape == truth.shape == reference.shape, \
        f"{what}: shapes {tuple(actual.shape)}, reference {tuple(reference.shape)}, truth {tuple(truth.shape)}"
    err = (actual - truth).abs().nan_to_num(float("inf"))
    assert torch.isfinite(reference).all() and torch.isfinite(truth).all(), \
        f"{what}: the reference or the truth is not finite; an error-relative bound needs finite ones"
    ref_err = (reference - truth).abs().max().item()
    bound = tol.factor * ref_err + tol.floor
    bad = err > bound
    if bad.any():
        raise AssertionError(
            f"{what}: max error {err.max().item():.3g} against the float64 truth exceeds {tol.factor} x the "
            f"reference's {ref_err:.3g} + {tol.floor:g} in {dtype} ({int(bad.sum())}/{bad.numel()} elements); "
            f"{_first_mismatch(actual, truth, bad)}"
        )


def poison(shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """A fresh buffer full of NaN for an op to write into, so elements it forgets to write fail the comparison."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def replay_without_host_sync(loop, model, ids: torch.Tensor, num_tokens: int = 64) -> torch.Tensor:
    """Run a CUDA-graph ``StaticImageDecoder`` on CFG inputs for prompt ``ids`` twice (the first call
    compiles kernels and fills caches) and return the second call's tokens, run with torch's sync debug
    mode set to error: any host synchronisation inside it raises."""
    uncond = ids.clone()
    uncond[:, 1:-1] = 0  # keep BOS and the image-start token, pad the text: the unconditional rows
    embeds = model.get_input_embeddings()(torch.cat([ids, uncond]))
    mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=ids.device)
    loop.run(embeds, mask, num_tokens, do_sample=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        return loop.run(embeds, mask, num_tokens, do_sample=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def daid_graph_decode_without_host_sync(images, config, overlap: bool) -> torch.Tensor:
    """A tiny Janus on CUDA with DAiD (``config``) in a CUDA-graph ``StaticImageDecoder`` (CFG 5, ``overlap``
    retrieval), over a database of ``images``: the tokens of :func:`replay_without_host_sync`."""
    import arrag_kernels as ak
    from arrag_kernels.decoding import StaticImageDecoder
    from arrag_kernels.models import get_adapter, tiny_janus, tiny_prompt_ids

    model = tiny_janus(seed=0).cuda()
    adapter = get_adapter(model)
    db = ak.PatchDatabase.build(images, model, progress=False)
    daid = ak.DAiDSampler(db, config, adapter)
    loop = StaticImageDecoder(adapter, process_logits=None, fused_cfg=(5.0, 1.0), daid=daid, cuda_graph=True,
                              overlap_retrieval=overlap)
    return replay_without_host_sync(loop, model, tiny_prompt_ids(2, seed=3).cuda())


def seeded_model(model_class, config, seed: int = 0):
    """``model_class(config).eval()`` with the weights drawn under ``torch.manual_seed(seed)``, leaving the
    global random state as it was (the tiny random HF models of the adapter tests)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return model_class(config).eval()


def latent_database_setup(model, adapter, pixels_shape) -> tuple:
    """``(model, adapter, db, pixels)`` of an adapter test module: random images of ``pixels_shape`` (N, 3, H, W)
    in [-1, 1) (seed 1) and the database of the adapter's latents and tokens of them, with its fingerprint."""
    import arrag_kernels as ak

    pixels = torch.rand(pixels_shape, generator=torch.Generator().manual_seed(1)) * 2 - 1
    latents, tokens = adapter.encode(pixels)
    db = ak.PatchDatabase.from_latents(latents, tokens, adapter.codebook(), fingerprint=adapter.fingerprint())
    return model, adapter, db, pixels


def plain_and_patched(model, db, config, generate) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens of ``generate()`` (one call of the model's own HF generate) unpatched and inside
    ``ak.patched(model, db, config)``; asserts that leaving the patch restores the class's ``generate``,
    which then gives the unpatched tokens again."""
    import arrag_kernels as ak

    plain = generate()
    with ak.patched(model, db, config):
        patched = generate()
    assert "generate" not in model.__dict__ and model.generate.__func__ is type(model).generate
    assert torch.equal(generate(), plain), "unpatched again, generate gives other tokens"
    return plain, patched


def write_released_database(folder, nbits: int, token_range: tuple[int, int]):
    """A released-layout (official AR-RAG) database in ``folder``: OPQ + IVF-PQ (4 lists, 4 sub-quantizers of
    ``nbits`` bits) over 600 random 32-d keys, token ids drawn from [low, high) (all seeded 0). Returns the
    faiss index; skips the test without faiss."""
    import numpy as np

    faiss = pytest.importorskip("faiss")
    from arrag_kernels.retrieval.faiss_index import make_ivfpq_index

    rng = np.random.default_rng(0)
    keys = rng.standard_normal((600, 32)).astype(np.float32)
    index = make_ivfpq_index(32, 4, m=4, nbits=nbits, opq=True)
    index.train(keys)
    index.add(keys)
    # the release's own file names, spelled out (not the library's constants) so a renamed constant fails
    faiss.write_index(index, str(folder / "faiss_ivf_pq_opq.index"))
    np.save(folder / "next_codes.npy", rng.integers(*token_range, 600).astype(np.int32))
    return index


class CollectingStreamer:
    """A ``transformers`` streamer that keeps every chunk ``generate`` hands it (None marks the end)."""

    def __init__(self):
        self.chunks = []

    def put(self, value):
        self.chunks.append(value.clone())

    def end(self):
        self.chunks.append(None)


def assert_tokens_among_retrieved(cells: torch.Tensor, codebook: torch.Tensor, db, grid, k: int) -> int:
    """Every token of the (B, H*W) code grids ``cells`` at a retrieval position is among the ``k`` tokens
    the database returns for the neighbourhood of its already generated cells (what lam = 1 must draw).
    Returns the number of tokens checked."""
    import arrag_kernels as ak

    B = cells.shape[0]
    steps = ak.ops.retrieval_positions(grid, db.meta.layout).nonzero().flatten().tolist()
    for step in steps:
        prefix = cells.clone()
        prefix[:, step:] = -1
        queries, _ = ak.ops.neighbor_keys(prefix, codebook, torch.full((B,), step), grid, db.meta.layout)
        _, hits = db.retrieve(queries, k)
        for b in range(B):
            assert cells[b, step].item() in hits[b].tolist(), f"image {b} step {step}"
    return B * len(steps)


def record_launches(monkeypatch, kernels_module) -> tuple[list, dict]:
    """Records what a Triton op module launches: ``(launches, scratch)``, filled as the op runs, with
    (kernel name, grid) per launch and the scratch buffers its ``_scratch(shape, device)`` allocated.
    For the modules that launch through ``launch`` and allocate through ``_scratch`` (knn, ivfpq, faid),
    so their plans can be pinned against what actually runs."""
    launches, scratch = [], {}
    launch, allocate = kernels_module.launch, kernels_module._scratch

    def recording_launch(kernel, grid, *args, **meta):
        launches.append((getattr(kernel, "__name__", None) or kernel.fn.__name__, tuple(grid)))
        launch(kernel, grid, *args, **meta)

    def recording_scratch(shape, device):
        scratch.update(allocate(shape, device))
        return scratch

    monkeypatch.setattr(kernels_module, "launch", recording_launch)
    monkeypatch.setattr(kernels_module, "_scratch", recording_scratch)
    return launches, scratch


def assert_plan_pins_run(plan: dict, launches: list, scratch: dict, kernel_prefix: str, launch_count: int,
                         sample_buffer: str, survivor_buffer: str) -> None:
    """A sample / bound / filter / select plan (``knn_plan``, ``ivfpq_plan``) against what its search launched
    and allocated (:func:`record_launches`): launch count, kernels and grids in order, every scratch buffer's
    bytes, and the sample and survivor widths."""
    assert plan["launches"] == len(launches) == launch_count
    assert [(f"{kernel_prefix}{kn['name']}_kernel", kn["grid"]) for kn in plan["kernels"]] == launches
    assert plan["scratch"] == {name: t.nbytes for name, t in scratch.items()}
    assert plan["scratch_bytes"] == sum(t.nbytes for t in scratch.values())
    assert plan["sample"] == scratch[sample_buffer].shape[1] and plan["capacity"] == scratch[survivor_buffer].shape[1]


def forbid_host_reads(monkeypatch, what: str) -> None:
    """Capture safety as far as the CPU shows: until ``monkeypatch.undo()``, any ``.item()`` /
    ``.tolist()`` / ``bool()`` / ``int()`` / ``float()`` / index use of a tensor called from the package's
    own code (each a device-to-host synchronisation on CUDA) raises, naming ``what``."""
    import sys

    def refuse(name):
        original = getattr(torch.Tensor, name)

        def guarded(self, *args, **kwargs):
            if sys._getframe(1).f_globals.get("__name__", "").startswith("arrag_kernels"):
                raise AssertionError(f"{what} called Tensor.{name}")
            return original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, guarded)

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        refuse(name)
