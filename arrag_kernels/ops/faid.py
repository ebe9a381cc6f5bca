"""FAiD blend step in the affine form: context term + centre product + scores + mean over K.

For one image b with n causal context cells c_j (D,), K retrieved features e_k (D,)::

    hhat_k   = sum_j c_j @ taps_t[j] + e_k @ center_t + bias              (D,)
    w_k      = sigmoid(relu(hhat_k @ w1_t + b1) . w2 + b2)                 scalar
    blended  = (1 / K) sum_k w_k hhat_k                                    (D,)

and the weighted candidates w_k hhat_k (K, D), which the official code hands to the next blender.

Weights are stored input-major (``x @ W_t``) so a program reading a block of output columns reads
contiguous rows. Both implementations evaluate the three terms as GEMMs over the whole batch (the
context term (B, n*D) x (n*D, D), the centre and score terms (B*K, D) x (D, D)), so each weight is
read once per step, not once per image. The Triton implementation (``_triton/faid.py``, op
``arrag_kernels::faid_blend_triton``; launch plan: :func:`arrag_kernels.ops.faid_blend_plan`) never
materialises anything of size K x D x D.
"""

from __future__ import annotations

import torch

from ._dispatch import OpDispatcher


def _check_faid_blend(cells, retrieved, taps_t, center_t, bias, w1_t, b1, w2, b2):
    if cells.dim() != 3 or retrieved.dim() != 3 or cells.shape[0] != retrieved.shape[0]:
        raise ValueError(
            f"faid_blend: cells must be (B, n, D) and retrieved (B, K, D) with the same B, got "
            f"{tuple(cells.shape)} and {tuple(retrieved.shape)}"
        )
    B, n, D = cells.shape
    expected = {
        "retrieved": (retrieved, (B, retrieved.shape[1], D)),
        "taps_t": (taps_t, (n, D, D)),
        "center_t": (center_t, (D, D)),
        "bias": (bias, (D,)),
        "w1_t": (w1_t, (D, D)),
        "b1": (b1, (D,)),
        "w2": (w2, (D,)),
        "b2": (b2, (1,)),
    }
    for name, (t, shape) in expected.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"faid_blend: {name} must be {shape} for cells {tuple(cells.shape)}, got {tuple(t.shape)}")
        if t.device != cells.device:
            raise ValueError(f"faid_blend: {name} is on {t.device}, cells on {cells.device}; put all on one device")
    if retrieved.shape[1] < 1:
        raise ValueError("faid_blend: need at least one retrieved feature (K >= 1)")


def faid_blend_ref(cells, retrieved, taps_t, center_t, bias, w1_t, b1, w2, b2):
    """Pure PyTorch reference of :func:`faid_blend` (fp32 accumulation, output in ``retrieved.dtype``)."""
    f = torch.float32
    B, n, D = cells.shape
    # the context term as one (B, n*D) x (n*D, D) GEMM: the taps are read once for the whole batch
    ctx = cells.to(f).reshape(B, n * D) @ taps_t.to(f).reshape(n * D, D) + bias.to(f)  # (B, D)
    hhat = ctx.unsqueeze(1) + retrieved.to(f) @ center_t.to(f)  # (B, K, D)
    w = torch.sigmoid(torch.relu(hhat @ w1_t.to(f) + b1.to(f)) @ w2.to(f) + b2.to(f))  # (B, K)
    weighted = w.unsqueeze(-1) * hhat
    return weighted.mean(dim=1).to(retrieved.dtype), weighted.to(retrieved.dtype)


faid_blend_dispatcher = OpDispatcher("faid_blend")
faid_blend_dispatcher.register("reference")(faid_blend_ref)


def faid_blend(cells, retrieved, taps_t, center_t, bias, w1_t, b1, w2, b2):
    """One FAiD blender step in the affine form (see the module docstring for the math).

    Args:
        cells: (B, n, D) the causal context cells of each target (zeros where outside the grid).
        retrieved: (B, K, D) normalised retrieved features e_k.
        taps_t: (n, D, D) composed hop-mixed taps per causal cell, input-major.
        center_t: (D, D) composed centre tap, input-major.
        bias: (D,) composed bias. w1_t (D, D), b1 (D,), w2 (D,), b2 (1,): the score MLP.

    Returns:
        blended (B, D) and the weighted candidates w_k hhat_k (B, K, D), in ``retrieved``'s dtype.
    """
    _check_faid_blend(cells, retrieved, taps_t, center_t, bias, w1_t, b1, w2, b2)
    return faid_blend_dispatcher(cells, retrieved, taps_t, center_t, bias, w1_t, b1, w2, b2)
