"""FAiD blender modules (official parameterisation) and the three ways to evaluate them.

Notation: D hidden size, K retrieved tokens, hop h in ``hops``, R = max(hops), (H, W) token grid,
e_k in R^D the normalised retrieved features, x the context map (B, H, W, D) holding the blender
layer's normalised input ``input_layernorm(h)`` of already generated positions.

* :func:`blend_literal`: the official formulation, literally: pad the full context map, cut the
  (2h+1)^2 window of every target, make K copies with e_k in the centre cell, run the two valid
  convolutions per hop on each copy. The test oracle and the memory baseline of training.
* the affine form used by decoding (:class:`ComposedBlender`, :func:`arrag_kernels.ops.faid_blend`):
  the conv pair of hop h is one (2h+1)^2-tap linear map A_h plus a bias, so with
  ``T = sum_h softmax(omega)_h A_h`` (zero-padded to radius R)::

      hhat_k = sum_{causal cells u} T[u] x[p + u]  +  T[centre] e_k  +  bias

  the first term is shared by all K candidates; only the causal cells u of the window are non-zero.
* :func:`blend_dense`: the same affine split for every position at once (training): the context
  term runs each hop's conv pair once per position on its causal window (centre zeroed), the
  centre term is a per-position product with the composed centre tap.

All three return ``blended = mean_k w_k hhat_k`` and the weighted candidates ``w_k hhat_k``, which the
official code hands to the next blender (``total_feature = conv_out * w_k``).

Masked decoding (:mod:`arrag_kernels.masked.faid`) uses the same two whole-map evaluations with
``window="full"`` (every cell of the window, zeros at unknown cells, instead of the cells generated
before the target) and, by default, the paper's ``reduce="sum"``.

Official semantics (``llama_conv.py``; README "Semantics"), shared by decoding and training through
:func:`retrieved_masks` and :func:`blender_input`: every blender runs at every image position and its
output is always added; positions that retrieve nothing get zero retrieved features (the context
term and the biases still act); a later blender reads ``retrieval_layernorm`` of the previous
blender's ``w_k hhat_k``. The training forward (``FAiDConfig.semantics="train"``) also zeroes padded
ids (-1) in their own slot of the first blender and a later blender's input where the position
retrieves nothing; the inference script (``"inference-script"``) embeds -1 as code 0 and chains
everywhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import KeyLayout
from ..models import as_faid_adapter
from .config import SEMANTICS, FAiDConfig

# What a target's window holds besides e_k: the cells generated before it (AR decoding, training) or
# every cell of the map, zeros at unknown ones (masked decoding).
WINDOWS = ("causal", "full")
# How the K weighted candidates combine: "mean" (the official AR code) or "sum" (the paper).
REDUCTIONS = ("mean", "sum")


def check_blend_args(window: str, reduce: str) -> None:
    """Raise ValueError unless ``window`` is in :data:`WINDOWS` and ``reduce`` in :data:`REDUCTIONS`."""
    if window not in WINDOWS:
        raise ValueError(f"window: expected one of {WINDOWS} (causal: AR decoding; full: masked), got {window!r}")
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce: expected one of {REDUCTIONS} (mean: official AR code; sum: paper), got {reduce!r}")


class Blender(nn.Module):
    """One blender: per hop h a pair ``conv{h}`` -> ``conv{h}2`` of Conv2d(D, D, h+1) (valid, no
    non-linearity), hop weights ``conv_weights`` (omega, initialised to 1; only with more than one
    hop, as in the official module) and the score MLP ``mlp = Linear(D, D), ReLU, Linear(D, 1)``.
    Parameter names follow the official checkpoints."""

    def __init__(self, dim: int, hops: tuple[int, ...]):
        super().__init__()
        self.dim = dim
        self.hops = tuple(hops)
        for h in self.hops:
            setattr(self, f"conv{h}", nn.Conv2d(dim, dim, h + 1))
            setattr(self, f"conv{h}2", nn.Conv2d(dim, dim, h + 1))
        if len(self.hops) > 1:
            self.conv_weights = nn.Parameter(torch.ones(len(self.hops)))
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, 1))

    @property
    def radius(self) -> int:
        return max(self.hops)

    def hop_convs(self, h: int) -> tuple[nn.Conv2d, nn.Conv2d]:
        return getattr(self, f"conv{h}"), getattr(self, f"conv{h}2")

    def hop_mix(self) -> torch.Tensor:
        """(len(hops),) softmax(omega); a single hop has weight 1 (the official one has no omega)."""
        if len(self.hops) == 1:
            return torch.ones(1, device=self.mlp[0].weight.device)
        return torch.softmax(self.conv_weights.float(), dim=0)

    def score_blend(self, hhat: torch.Tensor, reduce: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
        """(..., K, D) smoothed candidates -> blended (..., D) ``mean_k w_k hhat_k`` (``reduce="sum"``:
        the sum) and the weighted candidates (..., K, D) ``w_k hhat_k``, ``w_k = sigmoid(mlp(hhat_k))``."""
        weighted = torch.sigmoid(self.mlp(hhat)) * hhat
        return (weighted.mean(dim=-2) if reduce == "mean" else weighted.sum(dim=-2)), weighted


class FAiDLayer(nn.Module):
    """What one decoder layer gains: ``blender`` and its ``retrieval_layernorm`` (RMSNorm on e_k)."""

    def __init__(self, dim: int, hops: tuple[int, ...], eps: float = 1e-6):
        super().__init__()
        self.blender = Blender(dim, hops)
        self.retrieval_layernorm = nn.RMSNorm(dim, eps=eps)


class FAiDBlenders(nn.Module):
    """All blenders of a model, keyed by decoder-layer index: ``layers.{i}.blender.*`` and
    ``layers.{i}.retrieval_layernorm.weight`` (the official names without ``language_model.model.``).

    Chaining (official): the first blender reads RMSNorm(aligner(embeddings(ids))); every later one
    reads its own RMSNorm of the previous blender's weighted candidates ``w_k hhat_k`` (see
    :func:`blender_input`).
    """

    def __init__(self, dim: int, num_layers: int, config: FAiDConfig, eps: float = 1e-6):
        super().__init__()
        self.config = config
        self.dim = dim
        self.num_layers = num_layers
        self.layer_ids = config.layer_indices(num_layers)
        self.layers = nn.ModuleDict({str(i): FAiDLayer(dim, config.hops, eps) for i in self.layer_ids})

    def layer(self, i: int) -> FAiDLayer:
        return self.layers[str(i)]

    @classmethod
    def for_model(cls, model, config: FAiDConfig) -> "FAiDBlenders":
        """Blenders sized for a model (or its :class:`arrag_kernels.models.FAiDAdapter`), on its device and
        dtype (default initialisation)."""
        adapter = as_faid_adapter(model)
        blenders = cls(int(adapter.hidden_size), len(adapter.decoder_layers()), config, float(adapter.rms_norm_eps))
        return blenders.to(device=adapter.device, dtype=adapter.dtype)


def retrieved_masks(ids: torch.Tensor, valid: torch.Tensor, dtype, semantics: str = "train"
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Which retrieved features the blenders see, after the official training forward (``"train"``)
    or the official inference script ``t2i_faid.py`` (``"inference-script"``).

    Args:
        ids: (..., K) retrieved token ids, -1 for padding (looked up as code 0 by the caller).
        valid: (...) bool, True where the position retrieves (official: not row 0, column 0 or the
            last column).
        dtype: of the masks.
        semantics: one of :data:`arrag_kernels.faid.config.SEMANTICS`.

    Returns:
        ``first`` (..., K, 1) or (..., 1, 1), the first blender's mask, and ``chained`` (..., 1, 1),
        every later blender's mask on the previous blender's ``w_k hhat_k``:

        * ``"train"``: ``first`` keeps slot k where the position retrieves and ``ids[k] >= 0`` (the
          embeddings of -1 slots are zeroed, the rest of the step is not); ``chained`` keeps every
          slot where the position retrieves (each blender zeroes its retrieved input at
          non-retrieving positions).
        * ``"inference-script"``: ``first`` keeps every slot where the position retrieves (-1 is
          clamped to code 0 and embedded; steps without retrieval pass zeros); ``chained`` is all
          ones (the script zeroes nothing but the first blender's input, so at steps without
          retrieval a later blender reads RMSNorm of the previous blender's output).

    Everything else the script does equals the training forward at decode time: the same steps
    retrieve (``i > W`` and ``(i - 1) % W < W - 2``: row >= 1, 1 <= column <= W - 2), the window holds
    the normalised inputs of the cells generated before the target (the script's zero-filled map is
    the training forward's causal mask), the blend of the mean over K goes to the conditional CFG row
    only. Not reproduced: the script decodes one image at a time and maps a faiss id -1 through
    ``next_codes[-1]`` (the last entry's token) before its clamp ever sees it; here padding comes from
    the database as -1 and is clamped.
    """
    v = valid.unsqueeze(-1)
    if semantics == "train":
        return (v & (ids >= 0)).unsqueeze(-1).to(dtype), v.unsqueeze(-1).to(dtype)
    if semantics == "inference-script":
        first = v.unsqueeze(-1).to(dtype)
        return first, torch.ones_like(first)
    raise ValueError(f"semantics: expected one of {SEMANTICS}, got {semantics!r}")


def blender_input(layer: FAiDLayer, features: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """e_k = ``retrieval_layernorm(features) * keep`` (a mask of :func:`retrieved_masks`). RMSNorm maps
    0 to 0, so zeroing after the norm equals the official zeroing before it."""
    return layer.retrieval_layernorm(features) * keep


# ---- the affine form ------------------------------------------------------------------------------
def compose_hop(blender: Blender, h: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The conv pair of hop h as one linear map: A (D, D, 2h+1, 2h+1) and bias (D,), such that
    ``conv_h2(conv_h1(window)) = sum_{i,j} A[:, :, i, j] @ window[:, i, j] + bias``.

    A[u] = sum_{t2 + t1 = u} W2[t2] @ W1[t1];  bias = b2 + sum_{t2} W2[t2] @ b1. Differentiable.
    """
    conv_a, conv_b = blender.hop_convs(h)
    w1, w2 = conv_a.weight.float(), conv_b.weight.float()  # (D, D, h+1, h+1)
    parts = []
    for i in range(h + 1):
        for j in range(h + 1):
            prod = torch.einsum("om,mikl->oikl", w2[:, :, i, j], w1)  # window cells (i + k, j + l)
            parts.append(F.pad(prod, (j, h - j, i, h - i)))
    taps = torch.stack(parts).sum(0)
    bias = conv_b.bias.float() + w2.sum(dim=(2, 3)) @ conv_a.bias.float()
    return taps, bias


def centre_tap(conv_a: nn.Conv2d, conv_b: nn.Conv2d, h: int) -> torch.Tensor:
    """(D_out, D_in) map from the window centre to the output of ``conv_b(conv_a(window))``: the centre
    tap of :func:`compose_hop` alone. Intermediate cell (i, j) reads the centre through
    ``w1[h-i, h-j]`` and feeds the output through ``w2[i, j]``."""
    w1, w2 = conv_a.weight, conv_b.weight
    return sum(w2[:, :, i, j] @ w1[:, :, h - i, h - j] for i in range(h + 1) for j in range(h + 1))


def composed_taps(blender: Blender) -> tuple[torch.Tensor, torch.Tensor]:
    """Hop-mixed taps T (D, D, 2R+1, 2R+1) and bias (D,), fp32: ``sum_h softmax(omega)_h (A_h, b_h)``."""
    R = blender.radius
    mix = blender.hop_mix()
    taps, bias = 0.0, 0.0
    for a, h in zip(mix, blender.hops):
        A, b = compose_hop(blender, h)
        taps = taps + a * F.pad(A, (R - h,) * 4)
        bias = bias + a * b
    return taps, bias


def causal_offsets(radius: int) -> tuple[tuple[int, int], ...]:
    """(dr, dc) of the already generated cells of the (2R+1)^2 window, raster order."""
    return KeyLayout(neighborhood="causal", hops=(radius,)).offsets


def causal_tap_mask(radius: int, device=None) -> torch.Tensor:
    """(2R+1, 2R+1) float: 1 on the cells strictly before the centre in raster order, else 0."""
    n = 2 * radius + 1
    mask = torch.zeros(n, n, device=device)
    for dr, dc in causal_offsets(radius):
        mask[radius + dr, radius + dc] = 1.0
    return mask


class ComposedBlender:
    """Inference weights of one blender in the layouts :func:`arrag_kernels.ops.faid_blend` reads.

    Attributes (``dtype`` on ``device``): ``taps_t`` (n, D_in, D_out) for the n causal offsets
    ``offsets`` (contiguous: the (n*D_in, D_out) right operand of the blend's context GEMM); ``center_t`` (D_in, D_out); ``bias`` (D,); ``w1_t`` (D_in, D_out), ``b1`` (D,),
    ``w2`` (D,), ``b2`` (1,) of the score MLP. Built once at load time (fp32 composition).
    """

    def __init__(self, blender: Blender, dtype=None):
        with torch.no_grad():
            T, bias = composed_taps(blender)
            R = blender.radius
            dtype = dtype or blender.mlp[0].weight.dtype
            self.radius = R
            self.offsets = causal_offsets(R)
            self.taps_t = torch.stack([T[:, :, R + dr, R + dc].t() for dr, dc in self.offsets]).to(dtype).contiguous()
            self.center_t = T[:, :, R, R].t().to(dtype).contiguous()
            self.bias = bias.to(dtype).contiguous()
            self.w1_t = blender.mlp[0].weight.t().to(dtype).contiguous()
            self.b1 = blender.mlp[0].bias.to(dtype).contiguous()
            self.w2 = blender.mlp[2].weight[0].to(dtype).contiguous()
            self.b2 = blender.mlp[2].bias.to(dtype).contiguous()

    def blend(self, cells: torch.Tensor, retrieved: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, n, D) causal context cells (zeros where absent), (B, K, D) e_k -> (blended (B, D),
        weighted candidates w_k hhat_k (B, K, D))."""
        from ..ops import faid_blend

        return faid_blend(cells, retrieved, self.taps_t, self.center_t, self.bias, self.w1_t, self.b1, self.w2, self.b2)


# ---- whole-map evaluations --------------------------------------------------------------------------
def _windows(context: torch.Tensor, positions: torch.Tensor, h: int, window: str) -> torch.Tensor:
    """(B, H, W, D) map, (B, P) flat targets -> (B, P, D, 2h+1, 2h+1) windows from the zero-padded
    map; ``"causal"`` zeroes every cell at or after the target (raster order): what was generated
    before it."""
    B, H, W, D = context.shape
    n = 2 * h + 1
    padded = F.pad(context.permute(0, 3, 1, 2), (h, h, h, h))  # (B, D, H+2h, W+2h), zeros outside
    windows = F.unfold(padded, n)  # (B, D*n*n, H*W)
    idx = positions.unsqueeze(1).expand(B, windows.shape[1], positions.shape[1])
    windows = torch.gather(windows, 2, idx).view(B, D, n, n, -1).permute(0, 4, 1, 2, 3)
    if window == "full":
        return windows
    raster = torch.arange(H * W, device=context.device, dtype=torch.float32).view(1, 1, H, W)
    raster = F.pad(raster, (h, h, h, h), value=float("inf"))
    cell_pos = F.unfold(raster, n)[0]  # (n*n, H*W) raster index of each window cell
    cell_pos = cell_pos[:, positions].permute(1, 2, 0).reshape(B, -1, 1, n, n)  # (B, P, 1, n, n)
    return windows * (cell_pos < positions.view(B, -1, 1, 1, 1)).to(windows.dtype)


def blend_literal(layer: FAiDLayer, context: torch.Tensor, positions: torch.Tensor | None, retrieved: torch.Tensor,
                  window: str = "causal", reduce: str = "mean"):
    """Official formulation, literally (K conv stacks per target).

    Args:
        layer: the blender layer.
        context: (B, H, W, D) normalised layer inputs on the grid (``window="causal"``: cells at or
            after a target are ignored for that target; ``"full"``: zeros at unknown cells).
        positions: (B, P) flat target positions r * W + c; None: every cell (P = H * W).
        retrieved: (B, P, K, D) e_k (already through ``retrieval_layernorm``).
        window, reduce: see :data:`WINDOWS`, :data:`REDUCTIONS`.

    Returns:
        blended (B, P, D), weighted candidates w_k hhat_k (B, P, K, D).
    """
    check_blend_args(window, reduce)
    blender = layer.blender
    B, P, K, D = retrieved.shape
    if positions is None:
        positions = torch.arange(P, device=retrieved.device).expand(B, P)
    mix = blender.hop_mix()
    hhat = 0.0
    for a, h in zip(mix, blender.hops):
        win = _windows(context, positions, h, window)  # (B, P, D, n, n)
        win = win.unsqueeze(2).repeat(1, 1, K, 1, 1, 1)  # K copies
        win[..., h, h] = retrieved
        conv_a, conv_b = blender.hop_convs(h)
        out = conv_b(conv_a(win.reshape(B * P * K, D, 2 * h + 1, 2 * h + 1)))
        hhat = hhat + a * out.view(B, P, K, D)
    return blender.score_blend(hhat.to(retrieved.dtype), reduce)


def _hop_context(conv_a: nn.Conv2d, conv_b: nn.Conv2d, x: torch.Tensor, h: int, window: str) -> torch.Tensor:
    """(B, D, H, W) map -> (B, H*W, D): hop h's conv pair at every position on its window without e_k.
    ``"causal"``: the cells before the position, centre zeroed (one window per position);
    ``"full"``: the whole window, centre x_p included (one convolution of the zero-padded map)."""
    B, D, H, W = x.shape
    if window == "full":
        return conv_b(conv_a(F.pad(x, (h,) * 4))).flatten(2).transpose(1, 2)
    n = 2 * h + 1
    windows = F.unfold(F.pad(x, (h,) * 4), n).view(B, D, n, n, H * W)
    windows = windows * causal_tap_mask(h, x.device).to(x.dtype)[:, :, None]
    windows = windows.permute(0, 4, 1, 2, 3).reshape(B * H * W, D, n, n)
    return conv_b(conv_a(windows)).view(B, H * W, D)


def blend_dense(layer: FAiDLayer, context: torch.Tensor, retrieved: torch.Tensor, window: str = "causal",
                reduce: str = "mean"):
    """Affine form at every grid position at once (training, masked decoding; memory-efficient).

    Args:
        context: (B, H, W, D) normalised inputs of every position (teacher forcing; ``"full"``:
            zeros at unknown cells).
        retrieved: (B, H*W, K, D) e_k per target position.
        window, reduce: see :data:`WINDOWS`, :data:`REDUCTIONS`.

    Returns:
        blended (B, H*W, D), weighted candidates (B, H*W, K, D): equal to :func:`blend_literal` at all
        positions.

    The conv pair is affine, so with C_h its centre tap (:func:`centre_tap`) and c_p what the context
    term put in the window's centre (0 for ``"causal"``, x_p for ``"full"``)::

        hhat_k(p) = sum_h a_h context_h(p) + (sum_h a_h C_h) (e_k - c_p)

    The context term of hop h is its conv pair run once per position, not K times (causal: on the
    window with the centre and later cells zeroed; full: one convolution of the whole map).
    Activations are one window per position, not K copies of it, and the full taps T are never
    built: at D = 2048 their D x D x (2R+1)^2 autograd graph alone would outweigh the literal
    formulation.
    """
    check_blend_args(window, reduce)
    blender = layer.blender
    B, H, W, D = context.shape
    dtype = retrieved.dtype
    x = context.permute(0, 3, 1, 2).to(dtype)
    ctx, centre = 0.0, 0.0
    for a, h in zip(blender.hop_mix(), blender.hops):
        conv_a, conv_b = blender.hop_convs(h)
        ctx = ctx + a.to(dtype) * _hop_context(conv_a, conv_b, x, h, window)
        centre = centre + a * centre_tap(conv_a, conv_b, h).float()
    if window == "full":  # the whole-map convolution counted x_p in the centre: swap it for e_k
        retrieved = retrieved - context.to(dtype).reshape(B, H * W, 1, D)
    hhat = ctx.unsqueeze(2) + retrieved @ centre.to(dtype).t()
    return blender.score_blend(hhat, reduce)
