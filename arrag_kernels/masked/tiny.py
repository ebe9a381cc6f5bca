"""A tiny MaskGIT-style generator: a bidirectional transformer over a VQ token grid.

The project's built-in masked generator for tests, benchmarks and the demo of the masked path.
Class-conditional (one prepended class token; class ``num_classes`` is the null class), pre-norm
blocks with RMSNorm, non-causal attention over all cells, one mask embedding for unknown cells.
``TinyMaskGITAdapter`` wraps it with a VQ codebook into a :class:`~arrag_kernels.masked.MaskedGenerator`;
any VQ tokenizer with ``codebook()`` / ``fingerprint()`` / ``grid`` (e.g. a
:class:`arrag_kernels.models.JanusAdapter`, or another trained VQ) can stand in for the random codebook.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..models.base import codebook_fingerprint
from .config import random_mask


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.input_layernorm = nn.RMSNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.post_attention_layernorm = nn.RMSNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, h: torch.Tensor, add=None) -> torch.Tensor:
        """``add(normed input) -> tensor | None`` joins the residual after attention, before the FFN."""
        B, S, D = h.shape
        x = self.input_layernorm(h)
        q, k, v = self.qkv(x).view(B, S, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        a = self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, S, D))
        if add is not None:
            extra = add(x)
            if extra is not None:
                a = a + extra
        h = h + a
        return h + self.mlp(self.post_attention_layernorm(h))


class TinyMaskGIT(nn.Module):
    """Bidirectional transformer: (B, H*W) ids (-1 = unknown), (B,) class labels -> (B, H*W, V) logits."""

    def __init__(self, grid=(8, 8), codebook_size: int = 512, dim: int = 64, num_layers: int = 2, heads: int = 4,
                 num_classes: int = 10):
        super().__init__()
        self.grid = tuple(grid)
        self.codebook_size = codebook_size
        self.num_classes = num_classes
        self.tok = nn.Embedding(codebook_size + 1, dim)  # row V: the mask token
        self.cls = nn.Embedding(num_classes + 1, dim)  # row num_classes: the null class
        self.pos = nn.Parameter(torch.randn(self.grid[0] * self.grid[1], dim) * 0.02)
        self.layers = nn.ModuleList(_Block(dim, heads) for _ in range(num_layers))
        self.norm = nn.RMSNorm(dim)
        self.head = nn.Linear(dim, codebook_size)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor, hook=None) -> torch.Tensor:
        ids = torch.where(tokens < 0, self.codebook_size, tokens)
        h = torch.cat([self.cls(labels).unsqueeze(1), self.tok(ids) + self.pos], dim=1)
        for i, layer in enumerate(self.layers):
            add = None
            if hook is not None:
                def add(x, i=i):  # the hook sees the image cells only; the class token gets nothing
                    extra = hook(i, x[:, 1:])
                    return None if extra is None else F.pad(extra, (0, 0, 1, 0))
            h = layer(h, add)
        return self.head(self.norm(h[:, 1:]))


class TinyMaskGITAdapter:
    """:class:`~arrag_kernels.masked.MaskedGenerator` view of a :class:`TinyMaskGIT` and its VQ codebook.

    Args:
        model: the transformer.
        codebook: (V, d) VQ codebook rows (normalised here); or pass ``tokenizer``.
        tokenizer: an :class:`arrag_kernels.models.ImageTokenizer` whose codebook and grid the model
            was trained on; its ``encode`` / ``image_size`` make the adapter usable with
            ``PatchDatabase.build(images, adapter, neighborhood="full", border="zero")``.
        guidance_scale: classifier-free guidance w (None: none): ``l = l_u + w (l_c - l_u)`` with the
            null class as the unconditional input, both in one doubled batch; a FAiD hook acts on the
            conditional rows only (as the official FAiD does with CFG).
    """

    def __init__(self, model: TinyMaskGIT, codebook: torch.Tensor | None = None, tokenizer=None,
                 guidance_scale: float | None = None):
        if (codebook is None) == (tokenizer is None):
            raise ValueError("TinyMaskGITAdapter: pass exactly one of codebook= (a (V, d) tensor) or tokenizer=")
        self.model = model
        self.tokenizer = tokenizer
        self.guidance_scale = guidance_scale
        self._codebook = None if codebook is None else F.normalize(codebook.detach().float(), dim=-1)
        cb = self.codebook()
        if cb.shape[0] != model.codebook_size:
            raise ValueError(f"codebook has {cb.shape[0]} rows but the model predicts {model.codebook_size} tokens")
        if tokenizer is not None and tuple(tokenizer.grid) != model.grid:
            raise ValueError(f"tokenizer grid {tuple(tokenizer.grid)} != model grid {model.grid}")
        self.grid = model.grid
        self.codebook_size = model.codebook_size
        self.embed_dim = cb.shape[1]
        self.hidden_size = model.tok.embedding_dim
        self.num_layers = len(model.layers)
        if tokenizer is not None and hasattr(tokenizer, "encode"):
            self.encode, self.image_size = tokenizer.encode, tokenizer.image_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def codebook(self) -> torch.Tensor:
        return self._codebook if self.tokenizer is None else self.tokenizer.codebook()

    def fingerprint(self) -> str:
        return codebook_fingerprint(self.codebook()) if self.tokenizer is None else self.tokenizer.fingerprint()

    def logits(self, tokens, condition, hook=None):
        if self.guidance_scale is None:
            return self.model(tokens, condition, hook)
        B = tokens.shape[0]

        def conditional_rows(i, x):
            extra = hook(i, x[:B])
            return None if extra is None else torch.cat([extra, torch.zeros_like(extra)])

        null = torch.full_like(condition, self.model.num_classes)
        both = self.model(tokens.repeat(2, 1), torch.cat([condition, null]), None if hook is None else conditional_rows)
        cond, uncond = both[:B], both[B:]
        return uncond + self.guidance_scale * (cond - uncond)

    def embed_tokens(self, ids):
        return self.model.tok(ids)


def tiny_maskgit(seed: int = 0, grid=(8, 8), codebook_size: int = 512, embed_dim: int = 8, **model_kwargs):
    """A random-weight :class:`TinyMaskGIT` (eval mode) with a random VQ codebook, as an adapter."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = TinyMaskGIT(grid, codebook_size, **model_kwargs).eval()
        codebook = torch.randn(codebook_size, embed_dim)
    return TinyMaskGITAdapter(model, codebook=codebook)


def train_maskgit(adapter: TinyMaskGITAdapter, token_grids: torch.Tensor, labels: torch.Tensor, steps: int,
                  batch_size: int = 16, lr: float = 1e-3, seed: int = 0) -> list[float]:
    """Brief masked-token training (CE on masked cells) of the adapter's model; returns the losses.

    ``token_grids`` (M, H, W) VQ ids and ``labels`` (M,) classes; 10% of samples use the null class.
    """
    model = adapter.model
    g = torch.Generator(device=token_grids.device).manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    losses = []
    flat = token_grids.reshape(token_grids.shape[0], -1).long()
    for _ in range(steps):
        idx = torch.randint(0, flat.shape[0], (batch_size,), generator=g, device=flat.device)
        target, y = flat[idx], labels[idx].clone()
        y[torch.rand(batch_size, generator=g, device=y.device) < 0.1] = model.num_classes
        mask = random_mask(target, g)
        logits = model(torch.where(mask, -1, target), y)
        loss = F.cross_entropy(logits[mask], target[mask])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses
