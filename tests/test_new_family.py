"""Issue 20's done-when: a new model family needs its adapter file (tests/toy_family.py) and one
registration line to get DAiD, FAiD, NLL and the CLI; nothing else in the library changes."""

import pytest
import torch
from transformers import GenerationConfig

import arrag_kernels as ak
from arrag_kernels.cli import main
from arrag_kernels.demo import procedural_images
from arrag_kernels.eval import decode_tokens, generate_tokens, image_nll
from arrag_kernels.faid import FAiDBlenders, FAiDConfig, load_blenders
from arrag_kernels.faid.train import FAiDTrainer
from arrag_kernels.models import FAiDAdapter, check_protocol, get_adapter, load_pretrained

from .toy_family import ToyAdapter, ToyModel, toy_model

ak.register_adapter(ToyAdapter.model_type, ToyAdapter)  # the one registration line

FAID = FAiDConfig(k=4, hops=(1, 2), blenders=2)


@pytest.fixture(scope="module")
def setup():
    model = toy_model(seed=0)
    images = torch.rand(12, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    db = ak.PatchDatabase.build(images, model, progress=False)
    tokens = get_adapter(model).encode(images[:4])[1].flatten(1)
    prompts = torch.tensor([[1, 5, 6], [1, 7, 8], [1, 9, 10], [1, 11, 12]])
    return model, db, tokens, prompts


def _generate(model, prompts, **kw):
    """Greedy, so that the dynamic and static loops (different samplers) give the same tokens."""
    gen = GenerationConfig(do_sample=False, guidance_scale=3.0, bos_token_id=1, pad_token_id=0)
    torch.manual_seed(0)
    return model.generate(prompts, attention_mask=torch.ones_like(prompts), generation_config=gen,
                          generation_mode="image", **kw)


def test_the_adapter_is_a_full_faid_adapter(setup):
    model, db, _, _ = setup
    check_protocol(get_adapter(model), FAiDAdapter)
    assert len(db) > 0 and db.meta.grid == (4, 4)


def test_daid_generation(setup):
    model, db, _, prompts = setup
    with ak.patched(model, db, ak.DAiDConfig(lam=0.9, tau=0.1, k=8)) as handle:
        daid = {loop: _generate(model, prompts[:2], loop=loop) for loop in ("dynamic", "static")}
        assert isinstance(handle.adapter, ToyAdapter)
    with ak.patched(model):
        plain = _generate(model, prompts[:2])
    assert daid["dynamic"].shape == (2, 16) and int(daid["dynamic"].max()) < 64
    assert torch.equal(daid["dynamic"], daid["static"])
    assert not torch.equal(daid["dynamic"], plain)  # the retrieval distribution took part
    assert not ak.is_patched(model)


def test_faid_decoding_and_training(setup):
    model, db, tokens, prompts = setup
    torch.manual_seed(0)
    blenders = FAiDBlenders.for_model(model, FAID)
    with torch.no_grad():
        for p in blenders.parameters():
            p.normal_(0, 0.2)
    with ak.use_backend("reference"):
        with ak.patched(model, db, FAID, blender_weights=blenders):
            faid = _generate(model, prompts[:2])
        with ak.patched(model):
            plain = _generate(model, prompts[:2])
        assert faid.shape == (2, 16) and not torch.equal(faid, plain)  # the blenders changed the hidden states
        trainer = FAiDTrainer(toy_model(seed=0), db, load_blenders(blenders.state_dict(), model, FAID))
        losses = [trainer.step(prompts, tokens) for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def test_nll_plain_daid_faid(setup):
    model, db, tokens, prompts = setup
    plain = image_nll(model, prompts, tokens)
    assert plain.nll.shape == (4, 16) and torch.isfinite(plain.nll).all()
    daid = image_nll(model, prompts, tokens, db, ak.DAiDConfig(lam=0.5, tau=0.6, k=4))
    assert not torch.allclose(daid.nll, plain.nll)
    blenders = FAiDBlenders.for_model(model, FAID)
    with torch.no_grad():
        for p in blenders.parameters():
            p.normal_(0, 0.2)
    faid = image_nll(model, prompts, tokens, db, blenders=blenders)
    assert not torch.allclose(faid.nll, plain.nll)
    # CFG with w = 0 is the toy family's own unconditional prompt (BOS kept, the rest padded)
    uncond = prompts.clone()
    uncond[:, 1:] = 0
    cfg = image_nll(model, prompts, tokens, guidance_scale=0.0, generation_config=model.generation_config)
    torch.testing.assert_close(cfg.nll, image_nll(model, uncond, tokens).nll, atol=1e-5, rtol=1e-5)


def test_eval_sampling(setup):
    model, db, tokens, prompts = setup
    sampled = generate_tokens(model, prompts[:2], db, ak.DAiDConfig(lam=0.5, k=4), guidance_scale=3.0)
    assert sampled.shape == (2, 16)
    pixels = decode_tokens(model, tokens)
    assert pixels.shape == (4, 3, 16, 16) and pixels.abs().max() <= 1
    torch.testing.assert_close(pixels, get_adapter(model).decode_pixels(tokens).permute(0, 3, 1, 2))


def test_cli_on_a_saved_checkpoint(setup, tmp_path, capsys):
    model = setup[0]
    model.save_pretrained(tmp_path / "ckpt")
    loaded, encode_prompts = load_pretrained(tmp_path / "ckpt")
    assert isinstance(loaded, ToyModel) and encode_prompts is None
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, im in enumerate(procedural_images(6, 16)):
        im.save(folder / f"{i}.png")
    ckpt, db = str(tmp_path / "ckpt"), str(tmp_path / "db")
    assert main(["build-db", str(folder), "--model", ckpt, "--out", db]) == 0
    assert main(["generate", "--model", ckpt, "--prompt-ids", "1,5,6", "--num-images", "2", "--daid", "--db", db,
                 "--k", "8", "--out", str(tmp_path / "gen")]) == 0
    assert sorted(p.name for p in (tmp_path / "gen").iterdir()) == ["daid_0.png", "daid_1.png"]
    assert main(["train-faid", "--model", ckpt, "--db", db, "--images", str(folder), "--out",
                 str(tmp_path / "blenders.safetensors"), "--steps", "2", "--batch-size", "2", "--k", "4"]) == 0
    trained = load_blenders(tmp_path / "blenders.safetensors", loaded)
    assert trained.config.hops == (1, 2) and trained.config.k == 4
    assert main(["generate", "--model", ckpt, "--prompt", "a cat", "--out", str(tmp_path / "gen")]) == 2
    assert "needs a tokenizer" in capsys.readouterr().err
