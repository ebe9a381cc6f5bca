"""FAiD training on the tiny model: loss goes down, save/reload is exact, memory vs literal and with
activation checkpointing, index-only (imported official) databases, CLI errors."""

import math

import pytest
import torch

import arrag_kernels as ak
from arrag_kernels.faid import FAiDBlenders, FAiDConfig, load_blenders, save_blenders
from arrag_kernels.faid.finetuned import load_finetuned, save_finetuned
from arrag_kernels.faid.train import FAiDTrainer, encode_images, train_faid
from arrag_kernels.profiling import allocated_bytes, saved_activation_bytes
from arrag_kernels.models import tiny_janus, tiny_prompt_ids

CFG = FAiDConfig(k=4, hops=(1, 2), blenders=2)


@pytest.fixture(autouse=True)
def _reference_ops():
    """Retrieval of every position at once through interpreted Triton takes minutes on CPU."""
    with ak.use_backend("reference"):
        yield


@pytest.fixture(scope="module")
def setup(tiny_images):
    model = tiny_janus(seed=0)  # own instance: training flips requires_grad
    db = ak.PatchDatabase.build(tiny_images, model, progress=False)
    tokens = encode_images(model, tiny_images[:4])
    return model, db, tokens, tiny_prompt_ids(4)


@pytest.fixture(scope="module")
def deep_setup(tiny_images):
    """4 decoder layers: blenders in layers 0 and 2, layers 1 and 3 without one."""
    model = tiny_janus(seed=0, num_layers=4)
    db = ak.PatchDatabase.build(tiny_images, model, progress=False)
    return model, db, encode_images(model, tiny_images[:4]), tiny_prompt_ids(4)


def test_loss_decreases_and_roundtrip(setup, tmp_path):
    model, db, tokens, prompts = setup
    torch.manual_seed(0)
    blenders = FAiDBlenders.for_model(model, CFG)
    trainer = FAiDTrainer(model, db, blenders, lr=3e-3, train_head=False)
    losses = [trainer.step(prompts, tokens) for _ in range(10)]
    with torch.no_grad():
        final = float(trainer.loss(prompts, tokens))
    assert final < losses[0] - 0.03, losses + [final]
    assert all(not p.requires_grad for n, p in model.named_parameters()), "base weights must stay frozen"

    path = save_blenders(blenders, tmp_path / "b.safetensors")
    reloaded = load_blenders(path, model)
    assert reloaded.config == CFG
    trainer.blenders = reloaded
    with torch.no_grad():
        assert float(trainer.loss(prompts, tokens)) == final


def test_dense_matches_literal_and_uses_less_memory(setup):
    model, db, tokens, prompts = setup
    torch.manual_seed(1)
    blenders = FAiDBlenders.for_model(model, CFG)
    dense = FAiDTrainer(model, db, blenders, formulation="dense")
    literal = FAiDTrainer(model, db, blenders, formulation="literal")
    loss_d, bytes_d = saved_activation_bytes(lambda: dense.loss(prompts, tokens))
    loss_l, bytes_l = saved_activation_bytes(lambda: literal.loss(prompts, tokens))
    torch.testing.assert_close(loss_d, loss_l, rtol=1e-5, atol=1e-5)
    print(f"saved activations per training step: dense {bytes_d / 2**20:.2f} MiB, literal {bytes_l / 2**20:.2f} MiB, "
          f"ratio {bytes_l / bytes_d:.1f}x")
    assert bytes_l > 2 * bytes_d


@pytest.mark.parametrize("formulation", ["dense", "literal"])
def test_activation_checkpointing_same_gradients_less_memory(deep_setup, formulation):
    """Checkpointed decoder layers (blender hooks rerun in backward, after the hooks' context has
    exited; the second blender reads the first one's output): same loss and blender gradients, fewer
    bytes kept by the forward, model left as it was."""
    model, db, tokens, prompts = deep_setup
    torch.manual_seed(3)
    blenders = FAiDBlenders.for_model(model, CFG)
    layers = model.model.language_model.layers
    results = {}
    for ckpt in (False, True):
        trainer = FAiDTrainer(model, db, blenders, formulation=formulation, activation_checkpointing=ckpt)
        retrieved = trainer.retrieve_all(tokens)
        blenders.zero_grad(set_to_none=True)
        (loss, saved), retained, _ = allocated_bytes(
            lambda: saved_activation_bytes(lambda: trainer.loss(prompts, tokens, retrieved)))
        assert all("forward" not in layer.__dict__ for layer in layers), "the layer wrappers must be gone"
        loss.backward()
        results[ckpt] = loss.detach(), {n: p.grad for n, p in blenders.named_parameters()}, saved, retained
    (loss, grads, saved, retained), (loss_c, grads_c, saved_c, retained_c) = results[False], results[True]
    torch.testing.assert_close(loss_c, loss, rtol=0, atol=0)
    for n, g in grads.items():
        torch.testing.assert_close(grads_c[n], g, rtol=1e-6, atol=1e-8, msg=lambda m: f"{n}: {m}")
    print(f"{formulation}: saved {saved / 2**20:.2f} -> {saved_c / 2**20:.2f} MiB, "
          f"retained {retained / 2**20:.2f} -> {retained_c / 2**20:.2f} MiB")
    assert saved_c < saved / 4 and retained_c < retained / 2


def test_lora_training_changes_only_lora_blenders_and_head(setup, tmp_path):
    """LoRA r=4 on q/v + blenders + head: loss goes down, nothing else moves, save/reload is exact."""
    pytest.importorskip("peft", reason="LoRA training needs peft (pip install peft)")
    _, db, tokens, prompts = setup
    model = tiny_janus(seed=0)  # LoRA is injected into this instance
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.manual_seed(2)
    blenders = FAiDBlenders.for_model(model, CFG)
    blenders_before = {n: p.detach().clone() for n, p in blenders.named_parameters()}
    trainer = FAiDTrainer(model, db, blenders, lr=3e-3, lora_rank=4, train_head=True)
    losses = [trainer.step(prompts, tokens) for _ in range(6)]
    with torch.no_grad():
        final = float(trainer.loss(prompts, tokens))
    assert final < losses[0] - 0.03, losses + [final]

    params = dict(model.named_parameters())
    lora = {n for n in params if "lora_" in n}
    assert len(lora) == 8  # lora_A / lora_B of q_proj and v_proj in both layers
    assert all(not torch.equal(params[n], torch.zeros_like(params[n])) for n in lora if "lora_B" in n)
    changed = {n.replace(".base_layer", "") for n, p in params.items()
               if n not in lora and not torch.equal(p, before[n.replace(".base_layer", "")])}
    assert changed == {n for n in before if n.startswith("model.generation_head.")}, changed
    assert all(not torch.equal(p, blenders_before[n]) for n, p in blenders.named_parameters())

    save_blenders(blenders, tmp_path / "b.safetensors")
    save_finetuned(model, tmp_path / "tuned.safetensors", head=True)
    fresh = tiny_janus(seed=0)
    reloaded = FAiDTrainer(fresh, db, load_blenders(tmp_path / "b.safetensors", fresh))
    with torch.no_grad():
        untuned = float(reloaded.loss(prompts, tokens))
        load_finetuned(fresh, tmp_path / "tuned.safetensors")
        assert float(reloaded.loss(prompts, tokens)) == final != untuned
    with pytest.raises(ValueError, match="already has LoRA"):
        load_finetuned(fresh, tmp_path / "tuned.safetensors")

    # a file that does not fit leaves the model as it was (no stray LoRA layers): the right file loads after it
    from safetensors.torch import load_file, save_file

    from arrag_kernels.faid import CheckpointError

    state = load_file(str(tmp_path / "tuned.safetensors"))
    state.pop(next(k for k in state if "lora_B" in k))
    save_file(state, str(tmp_path / "broken.safetensors"), metadata={"lora_rank": "4"})
    other = tiny_janus(seed=0)
    names = {n for n, _ in other.named_parameters()}
    with pytest.raises(CheckpointError, match="does not fit the model: missing"):
        load_finetuned(other, tmp_path / "broken.safetensors")
    assert {n for n, _ in other.named_parameters()} == names
    load_finetuned(other, tmp_path / "tuned.safetensors")


def _save_images(images, folder):
    from PIL import Image

    folder.mkdir()
    for i, img in enumerate(images):
        arr = ((img.permute(1, 2, 0) + 1) * 127.5).clamp(0, 255).byte().numpy()
        Image.fromarray(arr).save(folder / f"{i}.png")
    return folder


def test_cli_train_and_convert(tiny_images, tmp_path):
    """``train-faid`` on the tiny model, then ``convert`` of the result written in the official layout."""
    from safetensors.torch import load_file, save_file

    from arrag_kernels.cli import main

    img_dir = _save_images(tiny_images[:4], tmp_path / "imgs")
    model = tiny_janus(seed=0)
    ak.PatchDatabase.build(img_dir, model, progress=False).save(tmp_path / "db")
    out = tmp_path / "b.safetensors"
    assert main(["train-faid", "--db", str(tmp_path / "db"), "--images", str(img_dir), "--out", str(out),
                 "--k", "4", "--steps", "2", "--batch-size", "2", "--lora-rank", "2", "--train-head",
                 "--activation-checkpointing"]) == 0
    tuned = load_file(str(tmp_path / "b.finetuned.safetensors"))
    assert len(tuned) == 8 + 4 and tuned["generation_head.vision_head.weight"].shape == (512, 64)
    official = {f"language_model.model.{k}": v for k, v in load_file(str(out)).items()}
    save_file(official, str(tmp_path / "official.safetensors"))
    assert main(["convert", str(tmp_path / "official.safetensors"), "--out", str(tmp_path / "c.safetensors"),
                 "--num-layers", "2", "--hidden-size", "64", "--k", "4"]) == 0
    a, b = load_file(str(out)), load_file(str(tmp_path / "c.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert main(["convert", str(tmp_path / "official.safetensors"), "--out", str(tmp_path / "x.safetensors"),
                 "--num-layers", "2", "--hidden-size", "32"]) == 2  # wrong width: clear error, exit 2


def test_train_on_index_only_databases(tiny_images, tmp_path, capsys):
    """Databases without exact keys (an IVF-PQ build with keep_keys=False, an imported official release):
    ``train_faid`` and ``train-faid`` retrieve through the index. ``--steps 0``: one-line error, no file."""
    pytest.importorskip("faiss")
    from arrag_kernels.cli import main

    model = tiny_janus(seed=0)
    img_dir = _save_images(tiny_images[:4], tmp_path / "imgs")
    built = ak.PatchDatabase.build(tiny_images, model, index="ivfpq", path=tmp_path / "ivf", nlist=8, keep_keys=False,
                                   nprobe=2, train_size=1000, progress=False)
    assert built.keys is None
    _, losses = train_faid(model, built, CFG, img_dir, tiny_prompt_ids(1), steps=2, batch_size=2, log=lambda _: None)
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)

    # the released layout: faiss_ivf_pq_opq.index + next_codes.npy, imported and saved as a database
    official = ak.PatchDatabase.from_official(tmp_path / "ivf", nprobe=4, codebook_size=512, grid=(8, 8),
                                              patches_per_image=42)
    assert official.keys is None
    official.save(tmp_path / "imported")
    args = ["train-faid", "--db", str(tmp_path / "imported"), "--images", str(img_dir), "--k", "4", "--batch-size", "2"]
    with pytest.warns(UserWarning, match="different VQ codebook"):  # an imported release has no model fingerprint
        assert main(args + ["--out", str(tmp_path / "b.safetensors"), "--steps", "1"]) == 0
    assert (tmp_path / "b.safetensors").is_file()
    capsys.readouterr()
    assert main(args + ["--out", str(tmp_path / "zero.safetensors"), "--steps", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("arrag-kernels train-faid: error: argument --steps: expected an integer >= 1, got '0' "
                   "(see arrag-kernels train-faid --help)")
    assert not (tmp_path / "zero.safetensors").exists()


def test_training_retrieves_what_decoding_retrieves(setup):
    """One Retriever class serves DAiD, FAiD decoding, FAiD training and masked decoding: all positions at
    once (training) equal the per-step retrieval of the decode loops, and (B, P) positions equal both."""
    from arrag_kernels.masked import MaskedRetriever
    from arrag_kernels.models import get_adapter
    from arrag_kernels.retrieval.query import Hits, Retriever

    model, db, tokens, _ = setup
    trainer = FAiDTrainer(model, db, FAiDBlenders.for_model(model, CFG))
    assert isinstance(trainer.retriever, Retriever) and issubclass(ak.DAiDSampler, Retriever)
    assert issubclass(MaskedRetriever, Retriever)
    ids, valid = trainer.retrieve_all(tokens)
    decoding = Retriever(db, CFG.k, get_adapter(model), setting="FAiDConfig.k")
    for s in range(tokens.shape[1]):
        _, step_ids, step_valid = decoding.retrieve(tokens, s)
        assert torch.equal(ids[:, s], step_ids) and torch.equal(valid[:, s], step_valid), f"position {s}"
        _, tensor_ids, _ = decoding.retrieve(tokens, torch.tensor([s]))  # (1,) device-tensor step
        assert torch.equal(tensor_ids, step_ids)
    some = torch.tensor([[3, 20, 63], [9, 10, 11]]).repeat(2, 1)  # (B, P) positions
    hits = decoding.retrieve(tokens, some)
    assert isinstance(hits, Hits) and hits.tokens.shape == (4, 3, CFG.k) and hits.valid.shape == (4, 3)
    assert torch.equal(hits.tokens, ids.gather(1, some[..., None].expand(4, 3, CFG.k)))
    assert torch.equal(hits.flat().tokens, hits.tokens.reshape(12, CFG.k)) and hits.distances.dtype == torch.float32
    assert valid.sum() == 4 * 42 and not hasattr(ak.faid, "FAiDRuntime")  # only in arrag_kernels.decoding
