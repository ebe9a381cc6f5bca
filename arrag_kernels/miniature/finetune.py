"""Fine-tuning the miniature model the paper's way (issue 24 item 1, paper appendix B.1 / B.3), for three methods:

* ``"faid"``: LoRA on q/v + FAiD blenders + the generation head, through the library's
  :class:`arrag_kernels.faid.train.FAiDTrainer` (the official blender configuration, K = 10);
* ``"control"``: the same recipe without blenders (LoRA + head only): same data, steps, batches,
  learning rate, schedule and seed, no retrieval. The difference FAiD - control is what retrieval
  (through the blenders) adds to the same fine-tuning. Blenders fed zero features would keep the
  blenders' retrieval-free context term (a trained causal convolution at every position), but the
  decode loops have no switch that feeds them zeros where a key exists, so the control's samples could
  not come from the library's loop; without blenders it decodes as an ordinary model;
* ``"ra-cm3"``: the image-level baseline RA-CM3 (appendix B.1): the top-1 database image for the
  prompt, VQ tokens embedded like generated tokens and prepended to the prompt
  (:func:`arrag_kernels.eval.nll.teacher_forced_logits` with ``prefix_tokens``), fine-tuned by the
  same recipe. The paper's text query is CLIP cosine similarity between the caption and the database
  images; the miniature's "caption" is its class label, and the analogue of that similarity is the
  emoji classifier's log-probability of the prompt's subgroup for each database image
  (:class:`ImageRetrieval`).

Recipe (:class:`RecipeConfig`): AdamW without weight decay, linear warm-up over 6 steps (10 % of one epoch
of the 883 training images at batch 16; the paper warms up over 10 % of its one epoch) then constant
(paper B.3), batch 16, LoRA rank 8 (the paper's r = 128 is 1/16 of Janus-Pro-1B's width 2048; 8 is 1/16 of 128,
alpha = 2r), conditional rows only. The data are the train split's blender-training part
(:func:`arrag_kernels.miniature.train.blender_split`, seed 0: 883 images whose base names are not in
the 1,894-image training-time database, so no image retrieves its own patches or itself). Each
training run starts from a copy of the base model (the caller's stays untouched).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .train import BlenderConfig, blender_split, dataset_prompts, encode_tokens, progress_bar

METHODS = ("faid", "control", "ra-cm3")


@dataclass(frozen=True)
class RecipeConfig:
    """One fine-tuning run: ``method`` (:data:`METHODS`), learning rate, steps, batch, LoRA rank, warm-up
    steps, training seed (initialisation and batch order); ``blenders``: only its ``k``, ``hops``,
    ``blenders`` (FAiD's placement and K) and ``db_fraction`` are read (the database split is always the
    seed-0 one, so every training seed sees the same data; its steps, batch, lr and seed are those of
    the shipped blenders' stage, not used here)."""

    method: str = "faid"
    lr: float = 2e-4
    steps: int = 55
    batch: int = 16
    lora_rank: int = 8
    warmup_steps: int = 6
    seed: int = 0
    blenders: BlenderConfig = BlenderConfig()

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"RecipeConfig.method: expected one of {METHODS}, got {self.method!r}")
        if self.steps < 1 or self.batch < 1 or self.lora_rank < 1:
            raise ValueError(f"RecipeConfig: expected steps, batch and lora_rank >= 1, got {self.steps}, {self.batch}, "
                             f"{self.lora_rank}")
        if not (self.lr > 0 and self.warmup_steps >= 0):
            raise ValueError(f"RecipeConfig: expected lr > 0 and warmup_steps >= 0, got {self.lr} and "
                             f"{self.warmup_steps}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def recipe_from_dict(d: dict) -> RecipeConfig:
    """Inverse of :meth:`RecipeConfig.to_dict` (missing fields: the defaults; e.g. a results.json ``recipe``,
    which leaves out method and seed)."""
    return RecipeConfig(**{**d, "blenders": BlenderConfig(**d.get("blenders", {}))})


class ImageRetrieval:
    """RA-CM3's text-to-image retrieval on the miniature: the database image that the emoji classifier
    finds most likely to show the prompt's subgroup (the stand-in for CLIP caption-image similarity).

    Args:
        classifier: the miniature's :class:`arrag_kernels.eval.features.EmojiClassifier`.
        pixels: (n, 3, S, S) database images; tokens: their (n, N) VQ tokens.
    """

    def __init__(self, classifier, pixels: torch.Tensor, tokens: torch.Tensor):
        with torch.no_grad():
            scores = torch.cat([torch.log_softmax(classifier(x), -1) for x in pixels.split(256)])  # (n, classes)
        self.best = scores.argmax(0)  # per subgroup: the database image with the highest score
        self.tokens = tokens

    def retrieve(self, prompts: torch.Tensor) -> torch.Tensor:
        """(B, 4) prompts ``[BOS, group, subgroup, BOI]`` -> (B, N) tokens of their top-1 database image."""
        from .train import SUBGROUP_BASE

        return self.tokens[self.best[prompts[:, 2] - SUBGROUP_BASE]]


@dataclass
class Finetuned:
    """A trained run: its config, the fine-tuned model copy, the blenders (``"faid"``; None otherwise), the
    loss of every step and the wall time."""

    config: RecipeConfig
    model: object
    blenders: object = None
    losses: list = dataclasses.field(default_factory=list)
    train_s: float = 0.0


def finetune(model, classifier, ds, cfg: RecipeConfig, checkpoints=(), on_checkpoint=None,
             progress: bool = True) -> Finetuned:
    """Train a copy of ``model`` by ``cfg`` on the blender-training part of the train split.

    ``on_checkpoint(step, run)`` is called after each step in ``checkpoints`` (and after the last) with
    the run so far, in eval mode; the schedule does not depend on ``steps``, so the state at step s is
    that of an s-step run with the same settings (a step budget grid from one run). Returns the final run."""
    import arrag_kernels as ak

    from ..faid import FAiDBlenders
    from ..faid.train import FAiDTrainer, base_finetune_params, check_finite_loss
    from ..eval.nll import teacher_forced_logits

    t0 = time.perf_counter()
    db_idx, fit_idx = blender_split(ds, cfg.blenders.db_fraction, seed=0)
    model = copy.deepcopy(model)
    tokens = encode_tokens(model, ds.pixels()[fit_idx])
    prompts = dataset_prompts(ds, fit_idx)
    torch.manual_seed(cfg.seed + 3)
    run = Finetuned(cfg, model)
    if cfg.method == "faid":
        db = ak.PatchDatabase.build(ds.pixels()[db_idx], model, progress=progress)
        run.blenders = FAiDBlenders.for_model(model, cfg.blenders.faid())
        trainer = FAiDTrainer(model, db, run.blenders, lr=cfg.lr, lora_rank=cfg.lora_rank, train_head=True)
        params = trainer.params
        retrieved = [torch.cat(x) for x in zip(*(trainer.retrieve_all(t) for t in tokens.split(256)))]

        def loss_of(b):
            run.blenders.train()
            return trainer.loss(prompts[b], tokens[b], (retrieved[0][b], retrieved[1][b]))
    else:
        params = base_finetune_params(model, cfg.lora_rank, train_head=True)
        prefix = None
        if cfg.method == "ra-cm3":
            db_pixels = ds.pixels()[db_idx]
            prefix = ImageRetrieval(classifier, db_pixels, encode_tokens(model, db_pixels)).retrieve(prompts)

        def loss_of(b):
            logits = teacher_forced_logits(model, prompts[b], tokens[b], None if prefix is None else prefix[b])
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[b].reshape(-1))
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)  # the paper: AdamW, no weight decay
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (cfg.warmup_steps + 1)))
    model.train()
    g = torch.Generator().manual_seed(cfg.seed + 3)
    with progress_bar(cfg.steps, f"fine-tuning {cfg.method} (lr {cfg.lr:g}, seed {cfg.seed})", progress) as bar:
        for step in range(cfg.steps):
            b = torch.randint(0, len(tokens), (min(cfg.batch, len(tokens)),), generator=g)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_of(b)
            loss.backward()
            optimizer.step()
            schedule.step()
            run.losses.append(check_finite_loss(float(loss.detach()), step + 1, cfg.steps))
            bar.set_postfix(loss=f"{run.losses[-1]:.3f}")
            bar.update()
            if on_checkpoint is not None and (step + 1 in checkpoints or step + 1 == cfg.steps):
                model.eval()
                if run.blenders is not None:
                    run.blenders.eval()
                run.train_s = time.perf_counter() - t0
                on_checkpoint(step + 1, run)
                model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    if run.blenders is not None:
        run.blenders.eval()
    run.train_s = time.perf_counter() - t0
    return run
