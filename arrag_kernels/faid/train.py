"""Fine-tuning FAiD blenders (AR-RAG recipe: CE on image tokens, K retrieved tokens per position).

One training sequence is ``prompt + image tokens 0..N-2`` (teacher forcing, conditional rows only):
the hidden state at prompt position P-1+j predicts grid cell j, and the normalised input of image
token u (sequence position P+u) is context cell u. Each target position j is paired with the K
database entries nearest to its neighbourhood query (the same query as at decode time). As in the
official training forward, every blender blends at every position: positions without a key get
zero retrieved features, padded ids zero their own slot (:func:`retrieved_masks`; with
``FAiDConfig.semantics="inference-script"`` the masks of the official inference script instead).

Memory-efficient formulation (``formulation="dense"``, default, :func:`blend_dense`): the context
term of every position comes from one causal window (each hop's conv pair run once on it), and the
centre term from one per-position product with the composed centre tap, so activations are
O(N (K + (2R+1)^2) D) instead of the literal O(N K (2R+1)^2 D) of K copies of every window (``formulation="literal"``, kept to measure
the difference). That only shrinks the blenders' share; ``activation_checkpointing=True`` also drops
the decoder layers' own activations (each layer, blender included, is recomputed in backward), so
a step keeps one (B, S, D) input per layer plus the blender inputs instead of every intermediate.

LoRA on q/v uses ``peft`` (optional); the generation head can be trained too. Both change the base
model in place: :mod:`.finetuned` stores and re-applies them (``save_finetuned`` / ``load_finetuned``),
next to the blender file.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from ..models import FAiDAdapter, get_adapter
from ..models.base import teacher_forced_logits
from ..retrieval.query import Retriever
from .finetuned import add_lora
from .modules import FAiDBlenders, blend_dense, blend_literal, blender_input, retrieved_masks

FORMULATIONS = ("dense", "literal")
_MISSING = object()


class TeacherForcedFAiD:
    """The teacher-forced forward of a FAiD model: image-head logits of every position of ground-truth
    grids, the blenders adding the K entries retrieved for each position at every position (module
    docstring). What :class:`FAiDTrainer` trains through and what evaluation scores with
    (:func:`arrag_kernels.eval.image_nll`); it changes no ``requires_grad`` flag and holds no optimizer.

    Args:
        model: a model whose registered adapter implements :class:`arrag_kernels.models.FAiDAdapter`.
        db: :class:`arrag_kernels.PatchDatabase` for the model's grid; retrieval uses ``blenders.config.k``.
        blenders: the :class:`FAiDBlenders` (read from ``self.blenders`` at every forward).
        formulation, activation_checkpointing: as for :class:`FAiDTrainer`.
    """

    def __init__(self, model, db, blenders: FAiDBlenders, formulation: str = "dense",
                 activation_checkpointing: bool = False):
        if formulation not in FORMULATIONS:
            raise ValueError(f"formulation: expected one of {FORMULATIONS}, got {formulation!r}")
        self.model, self.blenders, self.formulation = model, blenders, formulation
        self.activation_checkpointing = bool(activation_checkpointing)
        self.adapter = get_adapter(model, FAiDAdapter)
        self.retriever = Retriever(db, blenders.config.k, self.adapter, setting="FAiDConfig.k")
        self.grid = self.retriever.grid

    @torch.no_grad()
    def retrieve_all(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N) ground-truth tokens -> retrieved ids (B, N, K) (-1: padding) and valid (B, N) bool (the
        position has a key), every position in one search (:meth:`Retriever.retrieve` of all positions)."""
        _, ids, valid = self.retriever.retrieve(tokens)
        return ids, valid

    def logits(self, prompt_ids: torch.Tensor, tokens: torch.Tensor, retrieved=None) -> torch.Tensor:
        """Teacher-forced image-head logits (B, N, V) of ``tokens`` (B, N) after ``prompt_ids`` (B, P), with
        the blenders at every position. ``retrieved``: ``retrieve_all(tokens)`` computed beforehand (it
        depends on the ground truth only, so it can be cached per image); None retrieves here."""
        B, N = tokens.shape
        if N != self.grid[0] * self.grid[1]:
            raise ValueError(f"tokens must be (B, {self.grid[0] * self.grid[1]}) for grid {self.grid}, got {tuple(tokens.shape)}")
        ids, valid = self.retrieve_all(tokens) if retrieved is None else retrieved
        if ids.shape[:2] != (B, N) or valid.shape != (B, N):
            raise ValueError(f"retrieved: expected ids (B, N, K) and valid (B, N) with (B, N) = {(B, N)}, got "
                             f"{tuple(ids.shape)} and {tuple(valid.shape)}; pass retrieve_all(tokens)")
        features = self.adapter.embed_image_tokens(ids.clamp_min(0))  # (B, N, K, D); padding masked in the blend
        masks = retrieved_masks(ids, valid, features.dtype, self.blenders.config.semantics)
        with _training_hooks(self, features, masks, prompt_ids.shape[1], self.activation_checkpointing):
            return teacher_forced_logits(self.adapter, prompt_ids, tokens)


class FAiDTrainer(TeacherForcedFAiD):
    """Trains ``blenders`` (and optionally LoRA q/v adapters and the generation head) on ``model``,
    through the :class:`TeacherForcedFAiD` forward (``logits``, ``retrieve_all``, ``retriever``).

    Args:
        model: a model whose registered adapter implements :class:`arrag_kernels.models.FAiDAdapter` (HF
            ``JanusForConditionalGeneration``); its base weights stay frozen.
        db: :class:`arrag_kernels.PatchDatabase` for the model's grid; retrieval uses ``blenders.config.k``.
        blenders: the :class:`FAiDBlenders` to train (e.g. ``FAiDBlenders.for_model(model, cfg)``).
        lr: AdamW learning rate (paper: 2e-4).
        lora_rank: > 0 adds LoRA of this rank on q_proj / v_proj through ``peft`` (must be installed).
        train_head: also train the image head (the adapter's ``image_head()``; Janus: ``generation_head``).
        formulation: "dense" (memory-efficient) or "literal" (official K conv stacks).
        activation_checkpointing: recompute every decoder layer (blenders included) in backward
            instead of keeping its activations (non-reentrant ``torch.utils.checkpoint``, applied
            only while the forward runs; the model's own checkpointing flags are not touched).
            Same loss and gradients, about one extra forward of compute.
    """

    def __init__(self, model, db, blenders: FAiDBlenders, lr: float = 2e-4, lora_rank: int = 0,
                 train_head: bool = False, formulation: str = "dense", activation_checkpointing: bool = False):
        super().__init__(model, db, blenders, formulation, activation_checkpointing)
        params = list(blenders.parameters()) + base_finetune_params(model, lora_rank, train_head)
        for p in params:
            p.requires_grad_(True)
        self.params = params
        self.optimizer = torch.optim.AdamW(params, lr=lr)

    def loss(self, prompt_ids: torch.Tensor, tokens: torch.Tensor, retrieved=None) -> torch.Tensor:
        """Mean CE of the image tokens ``tokens`` (B, N) after prompts ``prompt_ids`` (B, P)
        (``retrieved``: see :meth:`TeacherForcedFAiD.logits`)."""
        logits = self.logits(prompt_ids, tokens, retrieved)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens.reshape(-1))

    def step(self, prompt_ids: torch.Tensor, tokens: torch.Tensor, retrieved=None) -> float:
        """One optimisation step; returns the loss before the update (``retrieved``: see :meth:`loss`)."""
        self.blenders.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(prompt_ids, tokens, retrieved)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())


def base_finetune_params(model, lora_rank: int = 0, train_head: bool = False) -> list:
    """Freeze every parameter of ``model``, then return (with ``requires_grad`` on) what FAiD's recipe trains
    in the base model: LoRA q/v adapters of rank ``lora_rank`` (> 0; added through peft) and, with
    ``train_head``, the image head. :class:`FAiDTrainer` adds the blenders; a no-retrieval control trains
    these alone."""
    adapter = get_adapter(model, FAiDAdapter)
    for p in model.parameters():
        p.requires_grad_(False)
    params = add_lora(adapter, lora_rank) if lora_rank > 0 else []
    if train_head:
        params += list(adapter.image_head().parameters())
    for p in params:
        p.requires_grad_(True)
    return params


@contextlib.contextmanager
def _training_hooks(faid: TeacherForcedFAiD, features, masks, prompt_len: int, checkpointing: bool = False):
    """Adds ``blended`` at every image-predicting position of a full teacher-forced sequence
    (``masks``: the first and the chained blenders' masks of :func:`retrieved_masks`).

    Each blender layer's ``forward`` is wrapped (on the instance, undone on exit) so that the hooks
    capturing the context (``input_layernorm``) and adding the blend (``self_attn``) exist exactly
    for the duration of that layer's call. With ``checkpointing`` every decoder layer runs under
    non-reentrant ``torch.utils.checkpoint``: backward recomputes the layer, hooks included, after
    this context has exited. The recomputation must see what the forward saw, so a blender reads its
    input from the tensor the previous blender produced in the forward (``w_k hhat_k``, written
    once), never from state a later layer has overwritten.
    """
    H, W = faid.grid
    N = H * W
    layers = faid.adapter.decoder_layers()
    ids = list(faid.blenders.layer_ids)
    previous = dict(zip(ids, [None] + ids[:-1]))
    weighted_of = {}  # blender layer -> its w_k hhat_k from the forward: the next blender's retrieved features

    def capture(ctx):
        def hook(module, args, output):
            cells = output[:, prompt_len:]  # context cells 0..N-2 (cell N-1 is never anyone's context)
            cells = F.pad(cells, (0, 0, 0, N - cells.shape[1]))
            ctx["map"] = cells.reshape(cells.shape[0], H, W, -1)

        return hook

    def blend(i, ctx):
        def hook(module, args, output):
            layer = faid.blenders.layer(i)
            if previous[i] is None:
                e = blender_input(layer, features, masks[0])
            else:
                e = blender_input(layer, weighted_of[previous[i]], masks[1])
            if faid.formulation == "dense":
                blended, weighted = blend_dense(layer, ctx["map"], e)
            else:
                positions = torch.arange(N, device=e.device).expand(e.shape[0], N)
                blended, weighted = blend_literal(layer, ctx["map"], positions, e)
            if i != ids[-1]:
                weighted_of.setdefault(i, weighted)  # a recomputation must not replace the forward's tensor
            attn = output[0]
            delta = F.pad(blended, (0, 0, prompt_len - 1, attn.shape[1] - (prompt_len - 1 + N)))
            return (attn + delta.to(attn.dtype), *output[1:])

        return hook

    def with_blender(i, forward):
        def run(*args, **kwargs):
            ctx = {}
            norm, attention = faid.adapter.blender_sites(layers[i])
            handles = [norm.register_forward_hook(capture(ctx)), attention.register_forward_hook(blend(i, ctx))]
            try:
                return forward(*args, **kwargs)
            finally:
                for h in handles:
                    h.remove()

        return run

    def checkpointed(forward):
        def run(*args, **kwargs):
            return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

        return run

    saved = {}
    try:
        for i, layer in enumerate(layers):
            if i not in ids and not checkpointing:
                continue
            saved[i] = layer.__dict__.get("forward", _MISSING)
            forward = with_blender(i, layer.forward) if i in ids else layer.forward
            layer.forward = checkpointed(forward) if checkpointing else forward
        yield
    finally:
        for i, original in saved.items():
            del layers[i].forward
            if original is not _MISSING:
                layers[i].forward = original


class NonFiniteLossError(ValueError):
    """Training stopped at a NaN / inf loss (nothing is returned or written). A ValueError: the CLI
    reports it as a user error (exit 2)."""


def check_finite_loss(loss: float, step: int, steps: int) -> float:
    """``loss`` if finite, else :class:`NonFiniteLossError` naming the step."""
    if not math.isfinite(loss):
        raise NonFiniteLossError(f"training stopped: the loss is {loss} at step {step} of {steps}, nothing was saved "
                                 "(check the model and the images for inf/NaN values, or lower the learning rate)")
    return loss


@contextlib.contextmanager
def fp32_training(model):
    """The model's floating-point parameters and buffers in fp32 while the block runs, their own dtypes
    restored after it (parameters added meanwhile, e.g. LoRA, stay fp32). fp16/bf16 weights would get
    fp16 AdamW states (its eps underflows to 0: NaN from the second step) and a lossy forward; fp32
    master weights cost twice the memory of a half-precision model for the duration."""
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    dtypes = {name: t.dtype for name, t in tensors.items() if t.is_floating_point()}
    model.float()
    try:
        yield model
    finally:
        with torch.no_grad():
            for name, t in {**dict(model.named_parameters()), **dict(model.named_buffers())}.items():
                if name in dtypes and t.dtype != dtypes[name]:
                    t.data = t.data.to(dtypes[name])


def check_training_args(steps: int, batch_size: int, lr: float, lora_rank: int) -> None:
    """:func:`train_faid`'s numeric arguments, checked before any work (ValueError naming the bad one)."""
    if int(steps) < 1:
        raise ValueError(f"steps: expected at least 1 training step, got {steps}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size: expected at least 1 image per step, got {batch_size}")
    if int(lora_rank) < 0:
        raise ValueError(f"lora_rank: expected 0 (no LoRA) or a positive rank, got {lora_rank}")
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr: expected a finite learning rate > 0, got {lr}")


def encode_images(model, images, batch_size: int = 16) -> torch.Tensor:
    """Training targets: (B, N) token ids of images (folder, paths or a (B, 3, S, S) tensor in [-1, 1])."""
    from ..retrieval.images import iter_image_batches, normalise_image_source

    adapter = get_adapter(model)
    _, source = normalise_image_source(images)
    out = [adapter.encode(batch)[1].flatten(1) for batch in iter_image_batches(source, adapter.image_size, batch_size)]
    return torch.cat(out)


def train_faid(model, db, config, images, prompt_ids: torch.Tensor, steps: int = 100, batch_size: int = 4,
               lr: float = 2e-4, lora_rank: int = 0, train_head: bool = False, seed: int = 0,
               activation_checkpointing: bool = False, log=print) -> tuple[FAiDBlenders, list[float]]:
    """Train fresh blenders for ``config`` on ``images`` with one prompt row per image or a shared (1, P) prompt.

    Returns the trained blenders (fp32) and the loss of every step; LoRA (``lora_rank > 0``) and the
    head (``train_head``) are trained in ``model`` itself (save them with :func:`save_finetuned`).
    Training runs in fp32 whatever the model's dtype (:func:`fp32_training`; its dtypes are restored
    afterwards, the head rounded back to them) and stops with :class:`NonFiniteLossError` at the first
    NaN / inf loss. ``activation_checkpointing`` recomputes the decoder layers in backward (see
    :class:`FAiDTrainer`).
    """
    check_training_args(steps, batch_size, lr, lora_rank)
    torch.manual_seed(seed)
    tokens = encode_images(model, images)  # on the model's device, where the trainer retrieves
    prompts = prompt_ids.to(tokens.device)
    if prompts.shape[0] == 1:
        prompts = prompts.expand(tokens.shape[0], -1)
    elif prompts.shape[0] != tokens.shape[0]:
        raise ValueError(f"prompt_ids: expected 1 or {tokens.shape[0]} rows (one per image), got {prompts.shape[0]}")
    with fp32_training(model):
        blenders = FAiDBlenders.for_model(model, config)
        trainer = FAiDTrainer(model, db, blenders, lr=lr, lora_rank=lora_rank, train_head=train_head,
                              activation_checkpointing=activation_checkpointing)
        losses = []
        g = torch.Generator().manual_seed(seed)
        for s in range(steps):
            idx = torch.randint(0, tokens.shape[0], (min(batch_size, tokens.shape[0]),), generator=g).to(tokens.device)
            losses.append(check_finite_loss(trainer.step(prompts[idx], tokens[idx]), s + 1, steps))
            log(f"step {s + 1}/{steps}: loss {losses[-1]:.4f}")
    return blenders.eval(), losses
