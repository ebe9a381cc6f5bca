"""Adding DAiD to a standalone LlamaGen-style sampling loop through arrag_kernels' public API.

The first half is the "existing" generator: a class-conditional GPT over a VQ token grid and its
own sampling loop (CFG over [conditional; unconditional] rows, temperature, top-k / top-p,
inverse-CDF sampling with explicit uniforms). It has no adapter and no HF ``generate``.
The second half, :class:`DAiD`, is all a user adds: a database from the training images' token
grids and, per step, query -> search -> fused merge-and-sample in place of the loop's own sampling.

Run: ``python examples/llamagen_daid.py`` (random weights: it shows the wiring, not image quality).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import arrag_kernels as ak


# ---- the standalone generator (not arrag_kernels code) -------------------------------------------
class TinyClassGPT(nn.Module):
    """LlamaGen-style c2i GPT: [class token, image tokens...] -> next image token (no KV cache: tiny)."""

    def __init__(self, num_classes=10, codebook_size=64, grid=(6, 7), dim=64, layers=2, heads=4):
        super().__init__()
        self.num_classes, self.grid = num_classes, grid
        self.cls = nn.Embedding(num_classes + 1, dim)  # the last class is the unconditional one (CFG)
        self.tok = nn.Embedding(codebook_size, dim)
        self.pos = nn.Parameter(0.02 * torch.randn(1 + grid[0] * grid[1], dim))
        block = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, codebook_size)

    def forward(self, classes: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(R,) class ids, (R, t) image tokens so far -> (R, V) logits of image token t."""
        x = torch.cat([self.cls(classes)[:, None], self.tok(tokens)], dim=1) + self.pos[: 1 + tokens.shape[1]]
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        return self.head(self.blocks(x, mask=mask, is_causal=True)[:, -1])


def plain_sample(logits, u, cfg_scale, temperature, top_k, top_p):
    """The loop's own sampler: CFG, temperature, top-k, top-p, softmax, inverse CDF with uniforms u."""
    cond, uncond = logits.float().chunk(2)
    scores = (uncond + cfg_scale * (cond - uncond)) / temperature
    if top_k:
        scores = scores.masked_fill(scores < scores.topk(top_k, dim=-1).values[:, -1:], float("-inf"))
    if top_p < 1:
        sorted_scores, order = scores.sort(dim=-1)
        remove = sorted_scores.softmax(-1).cumsum(-1) <= 1 - top_p
        remove[:, -1] = False
        scores = scores.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    cdf = scores.softmax(-1).cumsum(-1)
    return torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], right=True).squeeze(1).clamp_max(cdf.shape[1] - 1)


@torch.no_grad()
def sample(model, labels, cfg_scale=4.0, temperature=1.0, top_k=0, top_p=1.0, seed=0, daid=None):
    """(B,) class labels -> (B, H*W) image tokens in raster order; ``daid`` replaces the sampler."""
    B, (H, W) = labels.shape[0], model.grid
    tokens = torch.full((B, H * W), -1, dtype=torch.long)
    classes = torch.cat([labels, torch.full_like(labels, model.num_classes)])
    uniforms = torch.rand(H * W, B, generator=torch.Generator().manual_seed(seed))
    for i in range(H * W):
        logits = model(classes, tokens[:, :i].repeat(2, 1))
        if daid is None:
            tokens[:, i] = plain_sample(logits, uniforms[i], cfg_scale, temperature, top_k, top_p)
        else:
            tokens[:, i] = daid(logits, tokens, i, uniforms[i], cfg_scale, temperature, top_k, top_p)
    return tokens


# ---- what a user adds for DAiD (public arrag_kernels API only) -----------------------------------
class DAiD:
    """Retrieval-augmented sampling step: database from training token grids, fused merge + sample."""

    def __init__(self, train_tokens, codebook, lam=0.05, tau=0.6, k=32):
        self.codebook = F.normalize(codebook.float(), dim=-1)  # query vectors of generated tokens
        self.db = ak.PatchDatabase.from_tokens(train_tokens, self.codebook)  # official hop-1 causal keys
        self.config = ak.DAiDConfig(lam=lam, tau=tau, k=k)

    def __call__(self, logits, tokens, i, u, cfg_scale, temperature, top_k, top_p):
        meta, c = self.db.meta, self.config
        positions = torch.full((tokens.shape[0],), i, dtype=torch.long)
        queries, valid = ak.ops.neighbor_keys(tokens, self.codebook, positions, meta.grid, meta.layout)
        dist, hits = self.db.retrieve(queries, c.k)  # valid is False where position i has no key
        return ak.ops.daid_sample(logits, dist, hits, valid, u, guidance_scale=cfg_scale, temperature=temperature,
                                  lam=c.lam, tau=c.tau, dedup=c.dedup, top_k=top_k, top_p=top_p)


def main():
    torch.manual_seed(0)
    model = TinyClassGPT().eval()
    codebook = torch.randn(64, 8)  # the VQ tokenizer's codebook
    train_tokens = torch.randint(0, 64, (50, *model.grid))  # the training images, tokenized
    daid = DAiD(train_tokens, codebook, lam=0.5, k=16)
    labels = torch.arange(4)
    plain = sample(model, labels, top_k=20, top_p=0.95)
    with_daid = sample(model, labels, top_k=20, top_p=0.95, daid=daid)
    print(f"database: {daid.db}")
    print(f"tokens changed by DAiD (lam={daid.config.lam}): {(plain != with_daid).float().mean():.0%} of {plain.numel()}")


if __name__ == "__main__":
    main()
