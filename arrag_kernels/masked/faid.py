"""FAiD for masked decoders: blenders over all cells at once with full (non-causal) windows.

AR-RAG's Show-o adaptation (appendix B.2): blenders sit in the layers ``i % (L // b) == 0``
(:meth:`FAiDConfig.layer_indices`, the blenders of :class:`arrag_kernels.faid.FAiDBlenders`) and
process every cell of the grid in one call. For cell p, hop h and retrieved feature e_k:

    window_h(p, e_k) = the (2h+1)^2 cells around p of the context map x, centre replaced by e_k
    hhat_k(p) = sum_h softmax(omega)_h conv_h2(conv_h1(window_h(p, e_k)))       (valid convolutions)
    blended(p) = sum_k s_k(p) hhat_k(p),   s_k(p) = sigmoid(mlp(hhat_k(p)))      (paper; "mean": / K)

This is the causal blender's math (:mod:`arrag_kernels.faid.modules`) with a full window: x holds
the blender layer's normalised input at known cells and zeros at unknown cells and outside the
grid, so every window is full (all 8 neighbours for h = 1) rather than causal. ``blended`` is
added to the residual after attention at every cell. e_k are the retrieved tokens' input
embeddings through the blender's ``retrieval_layernorm`` at the unknown cells of a retrieving step
and zeros elsewhere (the official AR semantics of steps that do not retrieve: the blend, context
term and biases, is still added); a later blender reads RMSNorm of the previous one's weighted
candidates ``s_k hhat_k`` at every cell, retrieving or not: the chaining of the official inference
script, where the causal path's default ``semantics="train"`` zeroes a later blender's input at
positions without retrieval (:func:`arrag_kernels.faid.modules.retrieved_masks`). Masked decoding has
no official code to follow; this choice is kept so that blenders trained with it stay valid.

Two evaluations, equal up to rounding (tests): :func:`blend_full_literal` cuts every window and runs
K conv stacks per cell (:func:`arrag_kernels.faid.blend_literal`); :func:`blend_full` uses that the
conv pair is affine (:func:`arrag_kernels.faid.blend_dense`): ``hhat_k(p) = sum_h a_h (Y_h(p) +
C_h (e_k - x_p))`` where ``Y_h = conv_h2(conv_h1(pad_h(x)))`` runs once on the whole map and ``C_h``
is the pair's composed centre tap (D x D).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..faid.modules import FAiDBlenders, FAiDLayer, blend_dense, blend_literal, check_blend_args
from .config import random_mask
from .retrieval import MaskedRetriever


def blend_full_literal(layer: FAiDLayer, context: torch.Tensor, retrieved: torch.Tensor, reduce: str = "sum"):
    """Literal evaluation: K copies of every cell's window with e_k in the centre, two convs per hop.

    Args:
        context: (B, H, W, D) normalised layer input, zeros at unknown cells.
        retrieved: (B, H*W, K, D) e_k per cell (zeros where nothing was retrieved).
        reduce: "sum" (paper) or "mean" (official AR code) over the K candidates.

    Returns:
        blended (B, H*W, D), weighted candidates s_k hhat_k (B, H*W, K, D).
    """
    return blend_literal(layer, context.to(retrieved.dtype), None, retrieved, window="full", reduce=reduce)


def blend_full(layer: FAiDLayer, context: torch.Tensor, retrieved: torch.Tensor, reduce: str = "sum"):
    """Fast evaluation, same contract as :func:`blend_full_literal`: per hop one conv pair over the
    whole zero-padded map plus one (K+1)-row product with the composed centre tap per cell."""
    return blend_dense(layer, context, retrieved, window="full", reduce=reduce)


class MaskedFAiD:
    """FAiD state of masked decoding (the ``faid=`` object of :func:`masked_decode`) and its training.

    Args:
        generator: a :class:`~arrag_kernels.masked.MaskedGenerator`.
        db: ``neighborhood="full"`` database; each unknown cell retrieves ``blenders.config.k`` entries.
        blenders: :class:`arrag_kernels.faid.FAiDBlenders` sized for the generator
            (``FAiDBlenders(generator.hidden_size, generator.num_layers, FAiDConfig(...))``).
        reduce: "sum" (paper, default) or "mean" (the official AR code) over the K candidates.
        fast: :func:`blend_full` (True) or :func:`blend_full_literal`.
    """

    def __init__(self, generator, db, blenders: FAiDBlenders, reduce: str = "sum", fast: bool = True, device=None):
        check_blend_args("full", reduce)
        if blenders.config.semantics != "train":
            raise ValueError(f"FAiDConfig.semantics={blenders.config.semantics!r} describes the official "
                             "autoregressive decode script; masked decoding has no such script: use \"train\"")
        if blenders.num_layers != generator.num_layers or blenders.dim != generator.hidden_size:
            raise ValueError(f"blenders were built for {blenders.num_layers} layers of width {blenders.dim}; the "
                             f"generator has {generator.num_layers} layers of width {generator.hidden_size}")
        self.generator, self.blenders, self.reduce = generator, blenders, reduce
        self.blend = blend_full if fast else blend_full_literal
        self.retriever = MaskedRetriever(db, blenders.config.k, generator, device, setting="FAiDConfig.k")

    def features(self, tokens: torch.Tensor, positions: torch.Tensor, retrieve: bool, hits=None) -> torch.Tensor:
        """(B, N, K, D) embeddings of the tokens retrieved for ``positions``; zeros at other cells, for
        padded hits and invalid keys, and everywhere when not ``retrieve``. ``hits``: this step's (B, P)
        hits of a retriever that covers this one (DAiD's, shared by the loop); their first K are used
        instead of searching again."""
        B, N = tokens.shape
        K, D = self.blenders.config.k, self.blenders.dim
        dtype = self.blenders.layer(self.blenders.layer_ids[0]).retrieval_layernorm.weight.dtype
        out = torch.zeros(B, N, K, D, device=tokens.device, dtype=dtype)
        if retrieve:
            _, ids, valid = self.retriever.retrieve(tokens, positions) if hits is None else hits
            ids = ids[..., :K]  # shared hits come nearest first: the K nearest
            keep = ((ids >= 0) & valid.unsqueeze(-1)).unsqueeze(-1)
            e = self.generator.embed_tokens(ids.clamp_min(0)).to(dtype) * keep
            out.scatter_(1, positions[:, :, None, None].expand(*ids.shape, D), e)
        return out

    def make_hook(self, tokens: torch.Tensor, features: torch.Tensor):
        """The generator's layer hook for one forward on grid ``tokens`` with retrieved ``features``."""
        H, W = self.generator.grid
        known = (tokens >= 0).unsqueeze(-1)
        previous = {}

        def hook(i, normed):
            if i not in self.blenders.layer_ids:
                return None
            layer = self.blenders.layer(i)
            source = previous.get("weighted", features)
            e = layer.retrieval_layernorm(source)
            context = (normed * known.to(normed.dtype)).reshape(normed.shape[0], H, W, -1)
            blended, weighted = self.blend(layer, context, e, self.reduce)
            previous["weighted"] = weighted
            return blended.to(normed.dtype)

        return hook

    def begin_step(self, tokens: torch.Tensor, positions: torch.Tensor, retrieve: bool, hits=None):
        """Retrieval for the step's unknown cells (if ``retrieve``; from ``hits`` when the loop shares
        DAiD's search); returns the hook for its forward."""
        return self.make_hook(tokens, self.features(tokens, positions, retrieve, hits))

    def loss(self, token_grids: torch.Tensor, condition: torch.Tensor, rng: torch.Generator | None = None):
        """Masked CE of ground-truth grids (B, N) with a MaskGIT random mask; retrieval at every masked cell
        from the partially known grid, as at a retrieving decode step."""
        B, N = token_grids.shape
        mask = random_mask(token_grids, rng)
        tokens = torch.where(mask, -1, token_grids)
        positions = torch.arange(N, device=tokens.device).expand(B, N)
        with torch.no_grad():
            features = self.features(tokens, positions, True) * mask[:, :, None, None]
        logits = self.generator.logits(tokens, condition, self.make_hook(tokens, features))
        return F.cross_entropy(logits[mask].float(), token_grids[mask])


def train_masked_faid(faid: MaskedFAiD, token_grids: torch.Tensor, condition: torch.Tensor, steps: int,
                      batch_size: int = 8, lr: float = 2e-4, seed: int = 0) -> list[float]:
    """Train ``faid.blenders`` (the generator stays frozen) for ``steps`` AdamW steps on random batches of
    ``token_grids`` (M, N) / ``condition`` (M, ...); returns the loss of every step (before its update).
    Keep the training grids out of ``faid``'s database, or cells retrieve their own patch, and train
    through an adapter without guidance (the loss reads ``generator.logits`` as it is)."""
    params = list(faid.blenders.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator(device=token_grids.device).manual_seed(seed)
    losses = []
    faid.blenders.train()
    try:
        for _ in range(steps):
            idx = torch.randint(0, token_grids.shape[0], (batch_size,), generator=g, device=token_grids.device)
            loss = faid.loss(token_grids[idx], condition[idx], g)
            # gradients of the blenders only: the generator's parameters are neither updated nor given .grad
            for p, grad in zip(params, torch.autograd.grad(loss, params)):
                p.grad = grad
            opt.step()
            losses.append(float(loss.detach()))
    finally:
        faid.blenders.eval()
    return losses
