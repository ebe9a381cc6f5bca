"""Comparison helpers: one tolerance table per dtype, informative failure messages."""

from __future__ import annotations

import torch

def backend_device(backend: str) -> str:
    """Where a backend's kernels run in tests: Triton on CUDA when there is one (else through the
    interpreter on the CPU); the C++ extension and the reference on the CPU."""
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


# torch.library.opcheck arguments: every check compiled on CUDA; under the Triton interpreter only the
# schema and autograd-registration checks (wrap_triton returns the raw interpreted kernel there, which
# fake tensors cannot launch). torch 2.11 refuses test_utils=None, so the CUDA case passes nothing.
OPCHECK_KWARGS = {} if torch.cuda.is_available() else {"test_utils": ("test_schema", "test_autograd_registration")}


# (atol, rtol) per compute dtype, for kernel-vs-reference comparisons.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype = torch.float32, what: str = "",
                 atol: float | None = None):
    """Like torch.testing.assert_close with the table's tolerance (``atol`` raises the table's absolute
    one where a computation's error scale is known); reports max error and first mismatch."""
    table_atol, rtol = TOLERANCES[dtype]
    atol = table_atol if atol is None else max(atol, table_atol)
    actual, expected = actual.detach().float().cpu(), expected.detach().float().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    bad = ~torch.isclose(actual, expected, atol=atol, rtol=rtol, equal_nan=False)
    if bad.any():
        idx = tuple(int(i) for i in bad.nonzero()[0])
        err = (actual - expected).abs().nan_to_num(float("inf")).max().item()
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{bad.numel()} elements differ (atol={atol}, rtol={rtol}); max abs error {err:.3g}; "
            f"first mismatch at {idx}: got {actual[idx].item()!r}, expected {expected[idx].item()!r}"
        )


def poison(shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """A fresh tensor full of NaN, so elements a kernel forgets to write fail the comparison."""
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
