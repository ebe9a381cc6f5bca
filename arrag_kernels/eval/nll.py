"""Teacher-forced per-token negative log-likelihood of real images: plain, under DAiD, with FAiD blenders.

For an image with ground-truth tokens t_0..t_{N-1} after a prompt, the model's distribution at
position j is ``p_model(. | prompt, t_<j)`` (one teacher-forced forward for all positions; with
``guidance_scale`` w the CFG logits ``l_u + w (l_c - l_u)`` of the conditional and unconditional
prompts). DAiD's distribution at j is the library's merge (``daid_mix``, as in
:meth:`arrag_kernels.DAiDSampler.merge`) of ``p_model`` with the retrieval distribution of the query
built from the ground-truth neighbours of j (every position's in one search), exactly what the decoder
would see had it generated t_<j (with a
``DAiDConfig.gate``, only where the gate finds ``p_model`` not confident; elsewhere ``p_model``). The NLL
of t_j is ``-log p(t_j)``; it is reported per token, over all positions and over retrieval positions.

With FAiD blenders the conditional logits are those of FAiD's teacher-forced forward, the one the
trainer trains through (:class:`arrag_kernels.faid.train.TeacherForcedFAiD`: the K entries nearest
to each position's ground-truth neighbourhood blended at every position, as decoding would had it
generated t_<j); the unconditional CFG row gets no retrieval term, as at decode time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import DAiDConfig, KeyLayout
from ..models import TeacherForcingAdapter, base, get_adapter


def teacher_forced_logits(model, prompt_ids: torch.Tensor, tokens: torch.Tensor,
                          prefix_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """(B, P) prompts and (B, N) ground-truth image tokens -> (B, N, V) image-head logits of ``model``
    (:func:`arrag_kernels.models.base.teacher_forced_logits` through the family's
    :class:`arrag_kernels.models.TeacherForcingAdapter`).

    ``prefix_tokens`` (B, Q): image tokens placed before the prompt, embedded like generated image
    tokens (``embed_image_tokens``; the RA-CM3 baseline's retrieved image, paper appendix B.1)."""
    adapter = get_adapter(model, TeacherForcingAdapter)
    if prefix_tokens is None:
        return base.teacher_forced_logits(adapter, prompt_ids, tokens)
    if prefix_tokens.dim() != 2 or prefix_tokens.shape[0] != tokens.shape[0]:
        raise ValueError(f"prefix_tokens: expected (B, Q) image tokens with B = {tokens.shape[0]}, got "
                         f"{tuple(prefix_tokens.shape)}")
    start = prefix_tokens.shape[1] + prompt_ids.shape[1] - 1  # the hidden state there predicts token 0
    embeds = torch.cat([adapter.embed_image_tokens(prefix_tokens), adapter.embed_prompt(prompt_ids),
                        adapter.embed_image_tokens(tokens[:, :-1])], dim=1)
    return adapter.image_logits(adapter.hidden_states(embeds)[:, start : start + tokens.shape[1]])


@dataclass
class NLLResult:
    """Per-token NLL (nats) of every image and position: ``nll`` (num_images, N); ``retrieval`` (N,) bool;
    with a DAiD gate, ``gated`` (num_images, N) bool: the gate left that position of that image to the
    model (no merge, a search saved), else None."""

    nll: torch.Tensor
    retrieval: torch.Tensor
    gated: torch.Tensor | None = None

    def summary(self) -> dict:
        r = self.retrieval
        per_image_all = self.nll.mean(1)
        out = {"nll_all": float(per_image_all.mean()), "nll_all_sem": _sem(per_image_all), "images": self.nll.shape[0]}
        if r.any():
            per_image_ret = self.nll[:, r].mean(1)
            out.update(nll_retrieval=float(per_image_ret.mean()), nll_retrieval_sem=_sem(per_image_ret))
        if (~r).any():
            out["nll_non_retrieval"] = float(self.nll[:, ~r].mean())
        out["bits_per_token"] = out["nll_all"] / math.log(2)
        if self.gated is not None and r.any():
            out["searches_saved"] = float(self.gated[:, r].float().mean())  # of the (image, retrieval position) pairs
        return out


def _sem(x: torch.Tensor) -> float:
    return float(x.std() / math.sqrt(x.numel())) if x.numel() > 1 else 0.0


def paired_sem(a: torch.Tensor, b: torch.Tensor) -> float:
    """Standard error of the mean of the paired differences ``a - b`` (per-image scores of two methods on the
    same images)."""
    if a.shape != b.shape:
        raise ValueError(f"paired_sem: expected two scores of the same images, got shapes {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    return _sem((a - b).double())


def merge_hits(probs: torch.Tensor, dist: torch.Tensor, ids: torch.Tensor, active: torch.Tensor, lam: float,
               tau: float, dedup: str) -> torch.Tensor:
    """:func:`arrag_kernels.ops.daid_mix` over every position of a batch at once: (b, N, V) model
    probabilities, (b, N, k) hits (distances and token ids, as ``Retriever.retrieve`` returns them)
    and (b, N) ``active`` -> (b, N, V) float32 DAiD probabilities (inactive rows unchanged)."""
    from ..ops import daid_mix

    k = dist.shape[-1]
    return daid_mix(probs.reshape(-1, probs.shape[-1]), dist.reshape(-1, k), ids.reshape(-1, k), active.reshape(-1),
                    lam, tau, dedup).view(probs.shape)


@torch.no_grad()
def image_nll(model, prompt_ids: torch.Tensor, tokens: torch.Tensor, db=None, daid: DAiDConfig | None = None,
              guidance_scale: float | None = None, generation_config=None, batch_size: int = 64,
              blenders=None, prefix_tokens: torch.Tensor | None = None, zero_retrieved: bool = False) -> NLLResult:
    """Teacher-forced NLL of ``tokens`` (B, N) after ``prompt_ids`` (B, P), plain, under DAiD or with FAiD.

    Args:
        model: a model whose adapter implements :class:`arrag_kernels.models.TeacherForcingAdapter`
            (HF Janus, or any registered family).
        db, daid: a :class:`PatchDatabase` and :class:`DAiDConfig` for DAiD's merged distribution;
            both None for the model alone.
        blenders: trained :class:`arrag_kernels.faid.FAiDBlenders` (retrieving ``blenders.config.k``
            entries from ``db``) for FAiD's distribution; combined with ``daid`` DAiD merges on top.
        guidance_scale: None scores the conditional distribution; w applies CFG, the unconditional
            prompt being the adapter's ``unconditional_prompt`` with the special token ids of
            ``generation_config`` (default: ``model.generation_config``).
        prefix_tokens: (B, Q) image tokens before each prompt (RA-CM3's retrieved image, see
            :func:`teacher_forced_logits`); the unconditional CFG row gets none. Not with ``blenders``.
        zero_retrieved: with ``blenders``, an ablation: every position blends zero retrieved features
            (no search; what the blenders add without retrieval, their context term and biases).
    """
    from ..decoding import DAiDSampler
    from ..faid.train import TeacherForcedFAiD
    from ..ops import retrieval_positions
    from ..retrieval.query import on_device

    adapter = get_adapter(model, TeacherForcingAdapter)
    N = adapter.grid[0] * adapter.grid[1]
    if tokens.dim() != 2 or tokens.shape[1] != N:
        raise ValueError(f"tokens: expected (B, {N}) image tokens for the model's {adapter.grid} grid, got "
                         f"{tuple(tokens.shape)}")
    if prompt_ids.dim() != 2 or prompt_ids.shape[0] != tokens.shape[0]:
        raise ValueError(f"prompt_ids: expected (B, P) with B = {tokens.shape[0]} (one prompt per image), got "
                         f"{tuple(prompt_ids.shape)}")
    if tokens.shape[0] == 0:
        raise ValueError("no images to score (B = 0): the split or image set is empty")
    if (db is None) != (daid is None and blenders is None):
        raise ValueError("DAiD / FAiD NLL needs db together with daid (a DAiDConfig) and/or blenders (FAiDBlenders); "
                         "pass none of them for plain NLL")
    if zero_retrieved and blenders is None:
        raise ValueError("zero_retrieved is an ablation of FAiD: pass blenders too")
    if prefix_tokens is not None and blenders is not None:
        raise ValueError("prefix_tokens (RA-CM3) and blenders (FAiD) cannot be combined: the FAiD forward has no "
                         "prefix; pass one of them")
    if db is not None:  # one device copy for DAiD and FAiD
        db = on_device(db, adapter.device)
    sampler = DAiDSampler(db, daid, adapter) if daid is not None else None
    faid = TeacherForcedFAiD(model, db, blenders.eval()) if blenders is not None else None
    if guidance_scale is not None and generation_config is None:
        generation_config = model.generation_config
    device = adapter.device
    out, gated = [], []
    for start in range(0, tokens.shape[0], batch_size):
        t = tokens[start : start + batch_size].to(device)
        p = prompt_ids[start : start + batch_size].to(device)
        prefix = prefix_tokens[start : start + batch_size].to(device) if prefix_tokens is not None else None
        if faid is None:
            logits = teacher_forced_logits(model, p, t, prefix)
        elif zero_retrieved:  # padding ids and no position retrieving: every retrieved feature masked to zero
            k = blenders.config.k
            logits = faid.logits(p, t, (torch.full((*t.shape, k), -1, dtype=torch.long, device=device),
                                        torch.zeros(t.shape, dtype=torch.bool, device=device)))
        else:
            logits = faid.logits(p, t)
        logits = logits.float()
        if guidance_scale is not None:
            uncond = teacher_forced_logits(model, adapter.unconditional_prompt(p, generation_config), t).float()
            logits = uncond + guidance_scale * (logits - uncond)
        probs = torch.softmax(logits, dim=-1)  # (b, N, V)
        if sampler is not None:  # every position's hits in one search, one merge over the (b * N) rows
            dist, ids, valid = sampler.retrieve(t)
            active = valid & torch.tensor(sampler.retrieves_at, device=device)
            open_rows = sampler.gate_open(probs)  # (b, N), None without a gate
            if open_rows is not None:
                gated.append((active & ~open_rows).cpu())
                active = active & open_rows
            c = sampler.config
            probs = merge_hits(probs, dist, ids, active, c.lam, c.tau, c.dedup)
        out.append(-probs.gather(-1, t.unsqueeze(-1)).squeeze(-1).clamp_min(1e-30).log().cpu())
    # without a database, "retrieval positions" are those of the official key layout
    layout = db.meta.layout if db is not None else KeyLayout()
    gated = torch.cat(gated) if gated else None
    return NLLResult(torch.cat(out), retrieval_positions(adapter.grid, layout).cpu(), gated)
