"""Retrieval-step ops per provider: reference, C++, triton, and the official per-step pattern.

Groups: ``neighbor_keys`` (query of the next position for every image), ``knn`` (exact top-K over
the database keys), ``daid_sample`` (CFG + softmax + DAiD merge + sampling), and ``step`` (all
three plus the id -> token lookup: what DAiD adds to one decode step).

Providers:
* ``reference``: the library's pure PyTorch ops, on the input's device;
* ``cpp``: the C++ extension's CPU kernels (CPU only);
* ``triton``: the fused kernels (CUDA only: on CPU they would run in the interpreter);
* ``official``: the official AR-RAG pattern: tokens copied to the host, the query assembled there
  image by image, a host-side flat search, ids sent back, then dedup / softmax / mix in several
  small per-row device ops;
* ``triton-graph`` (``knn`` only): the Triton search replayed from a CUDA graph, as the static
  decode loop runs it: device time without Python launch overhead (the search is 4 launches:
  ``ak.ops.knn_plan``). ``knn`` cases on CUDA also record ``x_floor``: time over key bytes / the card's memory
  bandwidth (``cards.card_bytes_per_s``, by device name; absent for a card it does not list).

Each timed call ends with ``torch.cuda.synchronize()`` on CUDA; outputs are checked against the
reference outside the timed call. Every row is a median (``timing.run``); the ``official`` pattern
runs interleaved with every other provider's row, which records ``ratio_to_official`` (< 1: faster).
"""

from __future__ import annotations

import pytest
import torch

import timing
from arrag_kernels import _ext
from arrag_kernels.config import KeyLayout
from arrag_kernels.ops import daid_sample, knn, neighbor_keys, use_backend
from cards import card_bytes_per_s
from shapes import SHAPES, RetrievalShape

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
PROVIDERS = ["reference", "cpp", "triton", "official"]
KNN_PROVIDERS = PROVIDERS + ["triton-graph"]
BYTES_PER_S = card_bytes_per_s(torch.cuda.get_device_name()) if CUDA else None  # a key scan's floor
LAM, TAU, TEMPERATURE = 0.05, 0.6, 1.0
_cache: dict[str, dict] = {}


def _inputs(shape: RetrievalShape) -> dict:
    """Random database and decode state of one shape (built once per shape)."""
    if shape.name in _cache:
        return _cache[shape.name]
    _cache.clear()  # one large database in memory at a time
    g = torch.Generator(device=DEVICE).manual_seed(0)
    H, W = shape.grid
    B, N, V, d = shape.batch, shape.db_size, shape.vocab, shape.embed_dim
    layout = KeyLayout(hops=(shape.hops,))
    dtype = getattr(torch, shape.key_dtype)
    # Official keys: per-cell L2-normalised 8-d vectors.
    keys = torch.randn(N, shape.key_dim // d, d, generator=g, device=DEVICE)
    keys = torch.nn.functional.normalize(keys, dim=-1).flatten(1).to(dtype)
    codebook = torch.nn.functional.normalize(torch.randn(V, d, generator=g, device=DEVICE), dim=-1)
    step = (H // 2) * W + W // 2  # a retrieval position mid-image
    tokens = torch.randint(0, V, (B, H * W), generator=g, device=DEVICE)
    tokens[:, step:] = -1
    host_keys = keys.float().cpu()
    _cache[shape.name] = dict(
        layout=layout,
        keys=keys,
        values=torch.randint(0, V, (N,), generator=g, device=DEVICE, dtype=torch.int32),
        codebook=codebook,
        tokens=tokens,
        positions=torch.full((B,), step, device=DEVICE, dtype=torch.long),
        logits=torch.randn(2 * B, V, generator=g, device=DEVICE) * 3,
        uniforms=torch.rand(B, generator=g, device=DEVICE),
        active=torch.ones(B, dtype=torch.bool, device=DEVICE),
        host_keys=host_keys,
        host_key_norms=(host_keys * host_keys).sum(1),
        host_codebook=codebook.cpu(),
    )
    return _cache[shape.name]


# --- the official per-step pattern --------------------------------------------------------------


def official_neighbor_keys(x, shape):
    H, W = shape.grid
    toks = x["tokens"].cpu()  # device -> host round trip
    step = int(x["positions"][0])
    r, c = divmod(step, W)
    rows = []
    for b in range(toks.shape[0]):  # one image at a time, one neighbour at a time
        cells = [x["host_codebook"][toks[b, (r + dr) * W + c + dc]] for dr, dc in x["layout"].offsets]
        rows.append(torch.cat(cells))
    return torch.stack(rows).to(DEVICE)


def official_knn(queries, x, k):
    q = queries.float().cpu()  # query to the host, flat search there, ids back
    dist = (q * q).sum(1, keepdim=True) + x["host_key_norms"] - 2.0 * (q @ x["host_keys"].T)
    d, i = torch.topk(dist.clamp_min_(0.0), k, dim=1, largest=False, sorted=True)
    return d.to(DEVICE), i.to(DEVICE)


def official_daid_sample(logits, dist, ret_tokens, uniforms, shape):
    cond, uncond = logits.float().chunk(2)
    probs = torch.softmax((uncond + shape.guidance * (cond - uncond)) / TEMPERATURE, dim=-1)
    for b in range(probs.shape[0]):  # per row: unique, nearest per token, softmax, scatter, mix
        uniq, inv = torch.unique(ret_tokens[b].long(), return_inverse=True)
        nearest = torch.full(uniq.shape, float("inf"), device=DEVICE).scatter_reduce(0, inv, dist[b], "amin")
        p_ret = torch.zeros_like(probs[b]).index_put_((uniq,), torch.softmax(-nearest / TAU, 0))
        probs[b] = (1 - LAM) * probs[b] + LAM * p_ret
    cdf = probs.cumsum(-1)
    return torch.searchsorted(cdf, uniforms.unsqueeze(1) * cdf[:, -1:], right=True).squeeze(1)


# --- one function per (group, provider) ----------------------------------------------------------


def _library_ops(backend):
    def nk(x, shape):
        with use_backend(backend):
            return neighbor_keys(x["tokens"], x["codebook"], x["positions"], shape.grid, x["layout"])[0]

    def search(q, x, k):
        with use_backend(backend):
            return knn(q, x["keys"], k)

    def sample(logits, dist, ret_tokens, uniforms, shape):
        with use_backend(backend):
            return daid_sample(
                logits, dist, ret_tokens, torch.ones_like(uniforms, dtype=torch.bool), uniforms,
                guidance_scale=shape.guidance, temperature=TEMPERATURE, lam=LAM, tau=TAU,
            )

    return nk, search, sample


OPS = {
    "reference": _library_ops("reference"),
    "cpp": _library_ops("cpp"),
    "triton": _library_ops("triton"),
    "official": (official_neighbor_keys, official_knn, official_daid_sample),
}


def _step(provider, x, shape):
    nk, search, sample = OPS[provider]
    q = nk(x, shape)
    dist, ids = search(q, x, shape.k)
    return sample(x["logits"], dist, x["values"][ids], x["uniforms"], shape)


def _skip_reason(provider, shape) -> str | None:
    if shape.gpu_only and not CUDA:
        return f"{shape.name} is a GPU shape ({shape.db_size} keys); no CUDA device here"
    if provider.startswith("triton") and not CUDA:
        return "Triton on CPU runs only in the interpreter: far too slow to be a meaningful timing"
    if provider == "cpp" and CUDA:
        return "the C++ kernels run on CPU tensors; this run's inputs are on CUDA"
    if provider == "cpp" and not _ext.HAS_EXT:
        return f"C++ extension unavailable: {_ext.EXT_ERROR}"
    return None


def _run(benchmark, group, provider, shape, fn, official=None, nbytes=None):
    """Time ``fn`` as this row, the ``official`` pattern of the same group interleaved with it."""
    benchmark.group = f"{group}-{shape.name}"
    benchmark.extra_info.update(provider=provider, shape=shape.name, batch=shape.batch, db_size=shape.db_size, k=shape.k)
    out = timing.run(benchmark, fn, {"official": official} if official is not None and provider != "official" else None)
    if nbytes is not None and "median_s" in benchmark.extra_info:
        benchmark.extra_info["GB/s"] = nbytes / benchmark.extra_info["median_s"] / 1e9
        if BYTES_PER_S is not None:
            benchmark.extra_info["x_floor"] = benchmark.extra_info["median_s"] * BYTES_PER_S / nbytes
    return out


SHAPE_IDS = [s.name for s in SHAPES]


@pytest.fixture
def x(shape, provider) -> dict:
    """The case's inputs, or a skip with the reason this provider cannot run this shape."""
    if (reason := _skip_reason(provider, shape)) is not None:
        pytest.skip(reason)
    return _inputs(shape)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_neighbor_keys(benchmark, shape, provider, x):
    out = _run(benchmark, "neighbor_keys", provider, shape, lambda: OPS[provider][0](x, shape),
               lambda: OPS["official"][0](x, shape))
    torch.testing.assert_close(out, OPS["reference"][0](x, shape))


def _graphed(fn):
    """Capture ``fn()`` once in a CUDA graph: (replay, the graph's outputs)."""
    fn()  # compile and allocate outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph.replay, out


@pytest.mark.parametrize("provider", KNN_PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_knn(benchmark, shape, provider, x):
    q = OPS["reference"][0](x, shape)
    nbytes = x["keys"].numel() * x["keys"].element_size()
    official = lambda: OPS["official"][1](q, x, shape.k)  # noqa: E731
    if provider == "triton-graph":
        replay, (dist, ids) = _graphed(lambda: OPS["triton"][1](q, x, shape.k))
        _run(benchmark, "knn", provider, shape, replay, official, nbytes)
    else:
        dist, ids = _run(benchmark, "knn", provider, shape, lambda: OPS[provider][1](q, x, shape.k), official, nbytes)
    ref_dist, ref_ids = OPS["reference"][1](q, x, shape.k)
    torch.testing.assert_close(dist, ref_dist, atol=1e-4, rtol=1e-4)
    # Ids may differ only among (near-)equal distances.
    assert (ids == ref_ids).float().mean().item() > 0.99


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_daid_sample(benchmark, shape, provider, x):
    q = OPS["reference"][0](x, shape)
    dist, ids = OPS["reference"][1](q, x, shape.k)
    ret_tokens = x["values"][ids]
    args = (x["logits"], dist, ret_tokens, x["uniforms"], shape)
    out = _run(benchmark, "daid_sample", provider, shape, lambda: OPS[provider][2](*args),
               lambda: OPS["official"][2](*args))
    # Inverse-CDF draws can differ only when a uniform falls within rounding of a CDF step.
    assert (out == OPS["reference"][2](*args)).float().mean().item() >= 0.9


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_step(benchmark, shape, provider, x):
    out = _run(benchmark, "step", provider, shape, lambda: _step(provider, x, shape),
               lambda: _step("official", x, shape))
    assert (out == _step("reference", x, shape)).float().mean().item() >= 0.9
