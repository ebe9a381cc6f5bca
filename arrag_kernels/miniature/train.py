"""Train the miniature AR-RAG model on the emoji dataset: VQ tokenizer, then the language model, then a
small classifier whose features serve the Frechet distance.

Stages (each seeded; a few minutes on 2 CPU cores at the default sizes):

1. **VQ** (``train_vq``): the HF Janus VQ encoder/decoder with a cosine codebook: encoder latents
   and codebook rows are L2-normalised, the nearest row by inner product is the token (the same
   argmin HF's quantizer takes once the rows are stored normalised, and what ``get_codebook_entry``
   feeds the decoder), straight-through gradients, MSE reconstruction + codebook + 0.25 commitment
   loss; codes unused over a window are re-seeded from current latents.
2. **LM** (``train_lm``): cross-entropy of the image tokens after the prompt
   ``[BOS, group, subgroup, BOI]`` (``prompt_for``), teacher-forced with the eval module's forward;
   the class tokens are replaced by padding with probability ``cond_dropout`` so that the
   unconditional CFG prompt is learnt too.
3. **Classifier** (``train_classifier``): a 3-layer CNN predicting the subgroup; its pooled
   features are the miniature stand-in for Inception features.
4. **FAiD blenders** (``train_blenders``): the library's :class:`FAiDTrainer` (blenders only; the
   base model, LoRA and head untouched) on the frozen model. So that no training image retrieves
   its own patches, the train split is split again by base name: the database is built from one
   part (``BlenderConfig.db_fraction`` of the base names) and the blenders train on the other.

``python -m arrag_kernels.miniature.train --out DIR`` runs all four and writes
``model.safetensors`` + ``config.json`` (HF ``save_pretrained``, fp16), ``classifier.safetensors``,
``meta.json`` (the config, dataset split sizes, losses, wall times), ``blenders.safetensors`` (fp16)
and ``blenders.json``; ``--blenders-only`` trains stage 4 on an existing ``--out``. ``--out`` has no
default, and the weights shipped in ``arrag_kernels/miniature/weights`` are never written by these
functions (:func:`check_not_shipped`): to replace them, train elsewhere and copy the files by hand
(then update :data:`SHIPPED_SHA256`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..models.tiny import TINY_BOI, TINY_BOS, TINY_PAD, tiny_janus
from .data import EmojiDataset, load_emoji_dataset

WEIGHTS_DIR = Path(__file__).parent / "weights"
# SHA-256 of the shipped weight files: the demo says whether it runs them or something else put there.
SHIPPED_SHA256 = {
    "model.safetensors": "0f8746f2f961d197f5df15cf90196920122f8fb1723232b0d6c36db46c025427",
    "classifier.safetensors": "e543cff25be9b927994159bed51fc253d38a97a1895881f7e33e0587478d4a1b",
    "blenders.safetensors": "2c0918e1c4c4a0b6e7aa091b0815dffb4cd18ba98196322ee2600b1c861248d4",
}
# Prompt layout: [BOS, GROUP_BASE + group, SUBGROUP_BASE + subgroup, BOI]; ids stay below the image token (255).
GROUP_BASE, SUBGROUP_BASE = 3, TINY_BOI + 1


@dataclass(frozen=True)
class MiniatureConfig:
    size: int = 32
    patch_size: int = 4  # grid = size / patch_size
    hidden_size: int = 128
    num_layers: int = 4
    codebook_size: int = 512
    seed: int = 0
    limit: int | None = None  # emoji kept (None: all)
    vq_steps: int = 600
    vq_batch: int = 32
    vq_lr: float = 2e-3
    lm_steps: int = 800
    lm_batch: int = 64
    lm_lr: float = 1e-3
    cond_dropout: float = 0.1
    clf_steps: int = 400
    clf_batch: int = 128

    def __post_init__(self):
        if self.size % self.patch_size:
            raise ValueError(f"size {self.size} must be a multiple of patch_size {self.patch_size}")
        for name in ("vq_steps", "lm_steps", "clf_steps", "vq_batch", "lm_batch", "clf_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"MiniatureConfig.{name}: expected >= 1, got {getattr(self, name)}")

    @property
    def grid(self) -> int:
        return self.size // self.patch_size

    def model_kwargs(self) -> dict:
        return dict(grid=self.grid, hidden_size=self.hidden_size, num_layers=self.num_layers,
                    codebook_size=self.codebook_size, patch_size=self.patch_size)


@dataclass(frozen=True)
class BlenderConfig:
    """Stage 4: FAiD blenders (official placement and K; ``hops``, ``blenders`` as in :class:`FAiDConfig`)."""

    k: int = 10
    hops: tuple[int, ...] = (1, 2)
    blenders: int = 2
    steps: int = 200
    batch: int = 16
    lr: float = 1e-3
    db_fraction: float = 0.7  # of the train split's base names: the database; the rest trains the blenders
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "hops", tuple(self.hops))
        if self.steps < 1 or self.batch < 1:
            raise ValueError(f"BlenderConfig: expected steps and batch >= 1, got {self.steps} and {self.batch}")
        if not 0 < self.db_fraction < 1:
            raise ValueError(f"BlenderConfig.db_fraction: expected a fraction in (0, 1), got {self.db_fraction}")

    def faid(self):
        from ..faid import FAiDConfig

        return FAiDConfig(k=self.k, hops=self.hops, blenders=self.blenders)


def check_not_shipped(out: str | os.PathLike) -> Path:
    """``out`` as a Path; raises ValueError when it is the package's shipped weights directory or inside it
    (the library's tools never write there)."""
    out = Path(out)
    shipped = WEIGHTS_DIR.resolve()
    if out.resolve() == shipped or shipped in out.resolve().parents:
        raise ValueError(f"{str(out)!r} is in the shipped weights directory {str(WEIGHTS_DIR)!r}, which the library "
                         "never writes to; pass another output path (e.g. under /tmp; `arrag-kernels eval --weights "
                         "DIR` evaluates a trained one)")
    return out


def describe_weights(path: str | os.PathLike | None = None) -> str:
    """One line saying which miniature weights ``path`` (default: the shipped directory) holds: the shipped
    files unmodified, or what ``meta.json`` says trained them."""
    path = Path(path) if path else WEIGHTS_DIR
    changed = [name for name, digest in SHIPPED_SHA256.items() if not (path / name).is_file()
               or hashlib.sha256((path / name).read_bytes()).hexdigest() != digest]
    if not changed:
        return f"{path} (the shipped weights)"
    meta = json.loads((path / "meta.json").read_text()) if (path / "meta.json").is_file() else {}
    where = "WARNING: the shipped weights directory holds other files" if path.resolve() == WEIGHTS_DIR.resolve() \
        else "not the shipped weights"
    return (f"{path} ({where}: {', '.join(changed)} differ; trained by "
            f"`{meta.get('command', 'unknown')}`, config {meta.get('config', {})})")


def prompt_for(group_ids: torch.Tensor, subgroup_ids: torch.Tensor) -> torch.Tensor:
    """(B,) group and subgroup indices -> (B, 4) prompt ids ``[BOS, group, subgroup, BOI]``."""
    if len(group_ids) and (int(group_ids.max()) + GROUP_BASE >= TINY_BOI or int(subgroup_ids.max()) + SUBGROUP_BASE >= 255):
        raise ValueError("too many groups or subgroups for the tiny model's 256-id text vocabulary")
    B = group_ids.shape[0]
    return torch.stack([torch.full((B,), TINY_BOS), GROUP_BASE + group_ids, SUBGROUP_BASE + subgroup_ids,
                        torch.full((B,), TINY_BOI)], dim=1)


def prompt_ids(subgroups: str | list[str], emoji_test: str | os.PathLike | None = None,
               num_classes: int | None = None) -> torch.Tensor:
    """The miniature model's prompt recipe: subgroup names of Unicode's ``emoji-test.txt`` (e.g.
    ``"face-smiling"``, ``"animal-mammal"``; the group follows from the subgroup) -> (B, 4) prompt ids
    ``[BOS, group, subgroup, BOI]`` (:func:`prompt_for`), for ``model.generate`` or ``generate --prompt-ids``.

    Label ids are positions in the installed ``emoji-test.txt`` (``unicode-data``), as in training;
    ``num_classes`` (a run's ``meta.json`` value; default: the shipped model's) is checked against it
    so that another Unicode version cannot shift the ids silently."""
    from .data import emoji_labels, emoji_sources, parse_emoji_test

    names = [subgroups] if isinstance(subgroups, str) else list(subgroups)
    if not names:
        raise ValueError("prompt_ids: expected at least one subgroup name, got none")
    entries = parse_emoji_test(emoji_sources(emoji_test=emoji_test)[1])
    group_names, subgroup_names = emoji_labels(entries)
    expected = num_classes if num_classes is not None else json.loads((WEIGHTS_DIR / "meta.json").read_text())["num_classes"]
    if len(subgroup_names) != expected:
        raise ValueError(f"the installed emoji-test.txt has {len(subgroup_names)} subgroups, the model was trained on "
                         f"{expected}: its prompt ids would not match (install the unicode-data it was trained with)")
    group_of = {e.subgroup: e.group for e in entries}
    unknown = [n for n in names if n not in group_of]
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], subgroup_names, n=3)
        raise ValueError(f"unknown emoji subgroup {unknown[0]!r}" + (f" (did you mean {', '.join(close)}?)" if close else "")
                         + f"; expected one of the {len(subgroup_names)} subgroups of emoji-test.txt, e.g. "
                         f"{', '.join(subgroup_names[:3])}")
    return prompt_for(torch.tensor([group_names.index(group_of[n]) for n in names]),
                      torch.tensor([subgroup_names.index(n) for n in names]))


def dataset_prompts(ds: EmojiDataset, idx: torch.Tensor | None = None) -> torch.Tensor:
    p = prompt_for(ds.group_ids(), ds.subgroup_ids())
    return p if idx is None else p[idx]


def progress_bar(total: int, desc: str, progress: bool):
    """The miniature stages' tqdm bar (stderr; ``progress=False``: silent)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", disable=not progress)


def _quantize(vq, z: torch.Tensor):
    """Cosine VQ: (B, d, H, W) latents -> (normalised latents, normalised codes, ids (B*H*W,))."""
    zn = F.normalize(z, dim=1)
    codebook = F.normalize(vq.quantize.embedding.weight, dim=1)
    flat = zn.permute(0, 2, 3, 1).reshape(-1, zn.shape[1])
    ids = (flat @ codebook.T).argmax(1)
    q = codebook[ids].view(zn.shape[0], zn.shape[2], zn.shape[3], -1).permute(0, 3, 1, 2)
    return zn, q, ids


def train_vq(model, pixels: torch.Tensor, cfg: MiniatureConfig, progress: bool = True) -> list[float]:
    """Train ``model``'s VQ on (n, 3, S, S) pixels in [-1, 1]; leaves normalised codebook rows. Returns losses."""
    vq = model.model.vqmodel
    g = torch.Generator().manual_seed(cfg.seed)
    with torch.no_grad():  # start the codebook on real latents (random unit rows mostly go unused)
        z = vq.quant_conv(vq.encoder(pixels[torch.randperm(len(pixels), generator=g)[:64]]))
        flat = F.normalize(z, dim=1).permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        vq.quantize.embedding.weight.copy_(flat[torch.randint(0, len(flat), (cfg.codebook_size,), generator=g)])
    vq.train()
    opt = torch.optim.Adam(vq.parameters(), lr=cfg.vq_lr)
    used = torch.zeros(cfg.codebook_size, dtype=torch.bool)
    losses = []
    with progress_bar(cfg.vq_steps, "training VQ", progress) as bar:
        for step in range(cfg.vq_steps):
            x = pixels[torch.randint(0, len(pixels), (cfg.vq_batch,), generator=g)]
            zn, q, ids = _quantize(vq, vq.quant_conv(vq.encoder(x)))
            recon = vq.decoder(vq.post_quant_conv(zn + (q - zn).detach()))
            loss = F.mse_loss(recon, x) + F.mse_loss(q, zn.detach()) + 0.25 * F.mse_loss(zn, q.detach())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            used[ids] = True
            if (step + 1) % 50 == 0 and step + 1 < cfg.vq_steps:  # re-seed codes unused for 50 steps
                dead = (~used).nonzero().squeeze(1)
                if len(dead):
                    flat = zn.detach().permute(0, 2, 3, 1).reshape(-1, zn.shape[1])
                    with torch.no_grad():
                        vq.quantize.embedding.weight[dead] = flat[torch.randint(0, len(flat), (len(dead),), generator=g)]
                used.zero_()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            bar.update()
    with torch.no_grad():  # stored normalised: HF's argmin and get_codebook_entry then agree with training
        vq.quantize.embedding.weight.copy_(F.normalize(vq.quantize.embedding.weight, dim=1))
    vq.eval()
    return losses


@torch.no_grad()
def encode_tokens(model, pixels: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """(n, 3, S, S) pixels -> (n, H*W) token ids with the model's own (HF) VQ encoder."""
    from ..models import get_adapter

    adapter = get_adapter(model)
    return torch.cat([adapter.encode(pixels[i : i + batch_size])[1].flatten(1).cpu()
                      for i in range(0, len(pixels), batch_size)])


def train_lm(model, prompts: torch.Tensor, tokens: torch.Tensor, cfg: MiniatureConfig, progress: bool = True) -> list[float]:
    """Train everything but the VQ on CE of ``tokens`` (n, N) after ``prompts`` (n, P). Returns losses."""
    from ..eval.nll import teacher_forced_logits
    from ..models.janus import unconditional_prompt

    g = torch.Generator().manual_seed(cfg.seed + 1)
    params = [p for n, p in model.named_parameters() if not n.startswith("model.vqmodel.")]
    opt = torch.optim.AdamW(params, lr=cfg.lm_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lm_lr, total_steps=cfg.lm_steps, pct_start=0.1)
    model.train()
    losses = []
    with progress_bar(cfg.lm_steps, "training LM", progress) as bar:
        for _ in range(cfg.lm_steps):
            idx = torch.randint(0, len(tokens), (cfg.lm_batch,), generator=g)
            p, t = prompts[idx], tokens[idx]
            drop = torch.rand(len(idx), generator=g) < cfg.cond_dropout
            p = torch.where(drop.unsqueeze(1), unconditional_prompt(p, TINY_BOS, TINY_BOI, TINY_PAD), p)
            logits = teacher_forced_logits(model, p, t)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), t.reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            bar.update()
    model.eval()
    return losses


def train_classifier(ds: EmojiDataset, cfg: MiniatureConfig, progress: bool = True):
    """A small CNN predicting the subgroup from (train-split) pixels; returns (classifier, losses)."""
    from ..eval.features import EmojiClassifier

    torch.manual_seed(cfg.seed + 2)
    g = torch.Generator().manual_seed(cfg.seed + 2)
    idx = ds.indices("train")
    x, y = ds.pixels("train"), ds.subgroup_ids()[idx]
    clf = EmojiClassifier(num_classes=len(ds.subgroup_names))
    opt = torch.optim.Adam(clf.parameters(), lr=2e-3)
    clf.train()
    losses = []
    with progress_bar(cfg.clf_steps, "training classifier", progress) as bar:
        for _ in range(cfg.clf_steps):
            b = torch.randint(0, len(x), (cfg.clf_batch,), generator=g)
            xb = x[b]
            flip = torch.rand(len(b), generator=g) < 0.5  # emoji often come in mirrored variants
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            loss = F.cross_entropy(clf(xb), y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            bar.update()
    return clf.eval(), losses


def blender_split(ds: EmojiDataset, db_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Train-split indices (database part, blender-training part), seeded, by base name (skin-tone
    variants of one emoji stay on one side, so no blender-training image finds its own patches or a
    variant's in the database)."""
    idx = ds.indices("train")
    bases = sorted({ds.names[i].split(":")[0].strip() for i in idx.tolist()})
    order = torch.randperm(len(bases), generator=torch.Generator().manual_seed(seed)).tolist()
    in_db = {bases[i] for i in order[: round(db_fraction * len(bases))]}
    mask = torch.tensor([ds.names[i].split(":")[0].strip() in in_db for i in idx.tolist()])
    if mask.all() or not mask.any():
        raise ValueError(f"db_fraction {db_fraction} leaves one part of the {len(bases)} train base names empty")
    return idx[mask], idx[~mask]


def train_blenders(model, ds: EmojiDataset, cfg: BlenderConfig = BlenderConfig(), progress: bool = True):
    """Train FAiD blenders for the frozen ``model`` (see stage 4). Returns (blenders, losses, info)."""
    import arrag_kernels as ak

    from ..faid import FAiDBlenders
    from ..faid.train import FAiDTrainer, check_finite_loss

    db_idx, fit_idx = blender_split(ds, cfg.db_fraction, cfg.seed)
    db = ak.PatchDatabase.build(ds.pixels()[db_idx], model, progress=progress)
    tokens = encode_tokens(model, ds.pixels()[fit_idx])
    prompts = dataset_prompts(ds, fit_idx)
    torch.manual_seed(cfg.seed + 3)
    blenders = FAiDBlenders.for_model(model, cfg.faid())
    flags = [p.requires_grad for p in model.parameters()]
    trainer = FAiDTrainer(model, db, blenders, lr=cfg.lr)
    retrieved = [torch.cat(x) for x in zip(*(trainer.retrieve_all(t) for t in tokens.split(256)))]  # once per image
    g = torch.Generator().manual_seed(cfg.seed + 3)
    losses = []
    with progress_bar(cfg.steps, "training FAiD blenders", progress) as bar:
        for step in range(cfg.steps):
            b = torch.randint(0, len(tokens), (min(cfg.batch, len(tokens)),), generator=g)
            loss = trainer.step(prompts[b], tokens[b], (retrieved[0][b], retrieved[1][b]))
            losses.append(check_finite_loss(loss, step + 1, cfg.steps))
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            bar.update()
    for p, f in zip(model.parameters(), flags):  # the trainer froze the base model for training
        p.requires_grad_(f)
    info = {"database_images": len(db_idx), "database_entries": len(db), "training_images": len(fit_idx)}
    return blenders.eval(), losses, info


def train_and_save_blenders(out: str | os.PathLike, cfg: BlenderConfig = BlenderConfig(), progress: bool = True,
                            cache_dir=None) -> dict:
    """Stage 4 on the trained model in ``out``: writes ``blenders.safetensors`` (fp16) and ``blenders.json``."""
    from ..faid import save_blenders

    out = check_not_shipped(out)
    model, _, meta = load_miniature(out)
    mcfg = MiniatureConfig(**meta["config"])
    ds = load_emoji_dataset(size=mcfg.size, limit=mcfg.limit, seed=mcfg.seed, cache_dir=cache_dir, progress=progress)
    t0 = time.perf_counter()
    blenders, losses, info = train_blenders(model, ds, cfg, progress)
    save_blenders(blenders.half(), out / "blenders.safetensors")
    first = lambda xs: float(torch.tensor(xs[:20]).mean())  # noqa: E731
    last = lambda xs: float(torch.tensor(xs[-20:]).mean())  # noqa: E731
    bmeta = {"config": dataclasses.asdict(cfg), **info, "loss_first20": first(losses), "loss_last20": last(losses),
             "train_s": time.perf_counter() - t0, "torch": torch.__version__,
             "command": f"python -m arrag_kernels.miniature.train --blenders-only --out {out}"}
    (out / "blenders.json").write_text(json.dumps(bmeta, indent=2))
    return bmeta


def load_miniature_blenders(path: str | os.PathLike | None = None, model=None):
    """(FAiDBlenders in fp32, blenders.json) of a trained miniature run (default: the shipped weights)."""
    from ..faid import load_blenders

    path = Path(path) if path else WEIGHTS_DIR
    if not (path / "blenders.safetensors").is_file():
        raise FileNotFoundError(f"{str(path)!r} holds no FAiD blenders (expected blenders.safetensors); run "
                                "`python -m arrag_kernels.miniature.train --blenders-only --out DIR`")
    model = model if model is not None else load_miniature(path)[0]
    meta = json.loads((path / "blenders.json").read_text())
    return load_blenders(path / "blenders.safetensors", model).float().eval(), meta


def train_miniature(out: str | os.PathLike, cfg: MiniatureConfig = MiniatureConfig(), progress: bool = True,
                    cache_dir=None, blender_cfg: BlenderConfig = BlenderConfig()) -> dict:
    """Run all stages and save the model, the classifier, ``meta.json`` and the blenders under ``out``."""
    from safetensors.torch import save_file

    out = check_not_shipped(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    times = {}
    t0 = time.perf_counter()
    ds = load_emoji_dataset(size=cfg.size, limit=cfg.limit, seed=cfg.seed, cache_dir=cache_dir, progress=progress)
    train_idx = ds.indices("train")
    pixels = ds.pixels("train")
    times["data_s"] = time.perf_counter() - t0
    model = tiny_janus(seed=cfg.seed, **cfg.model_kwargs())
    t0 = time.perf_counter()
    vq_losses = train_vq(model, pixels, cfg, progress)
    times["vq_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    tokens = encode_tokens(model, pixels)
    lm_losses = train_lm(model, dataset_prompts(ds, train_idx), tokens, cfg, progress)
    times["lm_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    clf, clf_losses = train_classifier(ds, cfg, progress)
    times["classifier_s"] = time.perf_counter() - t0
    model.half().save_pretrained(out)
    model.float()
    save_file({k: v.contiguous() for k, v in clf.state_dict().items()}, str(out / "classifier.safetensors"))
    tail = lambda xs: float(torch.tensor(xs[-50:]).mean())  # noqa: E731
    meta = {
        "config": dataclasses.asdict(cfg),
        "splits": {s: int(ds.split.count(s)) for s in ("train", "val", "test")},
        "num_classes": len(ds.subgroup_names),
        "losses_last50": {"vq": tail(vq_losses), "lm": tail(lm_losses), "classifier": tail(clf_losses)},
        "times_s": times,
        "torch": torch.__version__,
        "command": f"python -m arrag_kernels.miniature.train --out {out} --seed {cfg.seed}",
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    meta["blenders"] = train_and_save_blenders(out, blender_cfg, progress, cache_dir)
    return meta


def load_miniature(path: str | os.PathLike | None = None):
    """(model, classifier, meta) of a trained miniature run (default: the weights shipped with the package)."""
    from safetensors.torch import load_file
    from transformers import GenerationConfig, JanusForConditionalGeneration

    from ..eval.features import EmojiClassifier

    path = Path(path) if path else WEIGHTS_DIR
    if not (path / "meta.json").is_file():
        raise FileNotFoundError(f"{str(path)!r} holds no trained miniature model (expected meta.json); run "
                                "`python -m arrag_kernels.miniature.train --out DIR`")
    meta = json.loads((path / "meta.json").read_text())
    model = JanusForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config = GenerationConfig(bos_token_id=TINY_BOS, pad_token_id=TINY_PAD, eos_token_id=2,
                                               guidance_scale=5.0, generation_kwargs={"boi_token_id": TINY_BOI})
    clf = EmojiClassifier(num_classes=meta["num_classes"])
    clf.load_state_dict(load_file(str(path / "classifier.safetensors")))
    return model, clf.eval(), meta


def main(argv=None):
    from ..cli.common import USER_ERROR, UserErrorParser, seed, user_error_message

    p = UserErrorParser(prog="python -m arrag_kernels.miniature.train",
                        description="train the miniature AR-RAG model on rendered emoji")
    p.add_argument("--out", required=True, help="directory to write (never the shipped weights directory)")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--quick", action="store_true", help="a handful of emoji and steps (smoke test)")
    p.add_argument("--blenders-only", action="store_true", help="only stage 4 (FAiD blenders) on the model in --out")
    args = p.parse_args(argv)
    cfg = MiniatureConfig(seed=args.seed)
    blender_cfg = BlenderConfig(seed=args.seed)
    if args.quick:
        cfg = dataclasses.replace(cfg, limit=60, vq_steps=3, lm_steps=3, clf_steps=3, vq_batch=8, lm_batch=8,
                                  clf_batch=8)
        blender_cfg = dataclasses.replace(blender_cfg, k=4, steps=3, batch=4)
    try:
        if args.blenders_only:
            print(json.dumps(train_and_save_blenders(args.out, blender_cfg), indent=2))
        else:
            print(json.dumps(train_miniature(args.out, cfg, blender_cfg=blender_cfg), indent=2))
    except Exception as e:  # user errors: one line, exit 2 (as the arrag-kernels CLI); anything else is a bug
        message = user_error_message(e)
        if message is None:
            raise
        p.exit(USER_ERROR, f"{p.prog}: error: {message}\n")


if __name__ == "__main__":
    main()
