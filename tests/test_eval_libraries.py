"""Sample metrics through well-kept libraries: FID (torchmetrics) against the project's Frechet distance, CLIP
score (torchmetrics) with a local tiny CLIP, CMMD against brute force and closed forms."""

import math
import string

import pytest
import torch

from arrag_kernels.eval.features import EmojiClassifier, clip_image_embeddings, extract, load_clip
from arrag_kernels.eval.metrics import clip_score, cmmd, fid, frechet_distance

pytest.importorskip("torchmetrics")


def _pixels(n, seed, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, 16, 16, generator=g) * 2 - 1 + shift).clamp(-1, 1)


# ---- FID ------------------------------------------------------------------------------------------------
def test_fid_with_the_project_extractor_equals_the_projects_frechet_distance():
    """torchmetrics' FrechetInceptionDistance(feature=<the miniature's extractor>) on pixels equals the
    project's Frechet distance on the same features (n > d and n < d), batches of any size."""
    torch.manual_seed(0)
    extractor = EmojiClassifier(num_classes=5).eval()
    real, fake = _pixels(160, 1), _pixels(150, 2, shift=0.3)
    want = frechet_distance(extract(extractor, real), extract(extractor, fake))
    assert want > 1e-3
    for batch_size in (64, 1000):
        assert fid(real, fake, extractor=extractor, batch_size=batch_size) == pytest.approx(want, rel=1e-4)
    few = frechet_distance(extract(extractor, real[:40]), extract(extractor, fake[:30]))  # 128-d features, rank-deficient
    assert fid(real[:40], fake[:30], extractor=extractor) == pytest.approx(few, rel=1e-4)


def test_fid_inputs_and_local_inception(tmp_path):
    extractor = EmojiClassifier(num_classes=2)
    with pytest.raises(ValueError, match="exactly one of extractor="):
        fid(_pixels(4, 0), _pixels(4, 1))
    with pytest.raises(FileNotFoundError, match="cannot be downloaded here"):
        fid(_pixels(4, 0), _pixels(4, 1), inception_weights=tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="at least 2"):
        fid(_pixels(1, 0), _pixels(4, 1), extractor=extractor)
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        (tmp_path / "inception.pth").write_bytes(b"")
        with pytest.raises(ImportError, match="needs torch-fidelity"):
            fid(_pixels(4, 0), _pixels(4, 1), inception_weights=tmp_path / "inception.pth")


# ---- CLIP score, CMMD -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny random CLIP (letters-only BPE vocabulary, 32 x 32 images) saved as a local directory."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(text_config=dict(vocab_size=len(vocab), max_position_embeddings=32, bos_token_id=0,
                                         eos_token_id=1, pad_token_id=1, **small),
                        vision_config=dict(image_size=32, patch_size=8, **small), projection_dim=16)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clip")
    CLIPModel(config).save_pretrained(path)
    images = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=CLIPTokenizer(vocab=vocab, merges=[])).save_pretrained(path)
    return path


def test_clip_score_with_a_local_clip_equals_the_direct_computation(clip_dir):
    from transformers import CLIPModel, CLIPProcessor

    pixels = _pixels(6, 3)
    captions = ["a red apple", "blue sky", "cat", "green tree", "sun", "two dogs"]
    got = clip_score(pixels, captions, clip_dir)

    model, processor = CLIPModel.from_pretrained(clip_dir), CLIPProcessor.from_pretrained(clip_dir)
    uint8 = ((pixels + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    with torch.no_grad():
        pixel_values = processor(images=list(uint8), return_tensors="pt")["pixel_values"]
        image = model.get_image_features(pixel_values=pixel_values)
        text = processor(text=captions, return_tensors="pt", padding=True)
        text = model.get_text_features(input_ids=text["input_ids"], attention_mask=text["attention_mask"])
    image, text = image.pooler_output, text.pooler_output
    cos = (image / image.norm(dim=-1, keepdim=True) * (text / text.norm(dim=-1, keepdim=True))).sum(-1)
    want = max(100 * cos.mean().item(), 0.0)
    assert want > 1.0  # the random CLIP scores these pairs above zero: the clamp is not what is compared
    assert got == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="6 images but 2 captions"):
        clip_score(pixels, captions[:2], clip_dir)
    with pytest.raises(FileNotFoundError, match="cannot be downloaded here"):
        load_clip(clip_dir / "nothing")


def test_cmmd_against_brute_force_and_closed_forms(clip_dir):
    # CLIP embeddings: unit rows of the tower's width
    emb = clip_image_embeddings(_pixels(5, 4), clip_dir)
    assert emb.shape == (5, 16) and torch.allclose(emb.norm(dim=-1), torch.ones(5, dtype=torch.float64))
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(7, 4, generator=g, dtype=torch.float64), torch.randn(5, 4, generator=g, dtype=torch.float64)

    def k(a, b, sigma):
        return math.exp(-float((a - b).square().sum()) / (2 * sigma**2))

    for sigma in (0.7, 10.0):
        brute = (sum(k(a, b, sigma) for a in x for b in x) / 49 + sum(k(a, b, sigma) for a in y for b in y) / 25
                 - 2 * sum(k(a, b, sigma) for a in x for b in y) / 35)
        assert cmmd(x, y, sigma=sigma) == pytest.approx(1000 * brute, rel=1e-10)
    # one point each: scale * (2 - 2 k(x, y)); identical sets: 0
    assert cmmd(x[:1], y[:1], sigma=2.0, scale=1.0) == pytest.approx(2 - 2 * k(x[0], y[0], 2.0), rel=1e-12)
    assert abs(cmmd(emb, emb.clone())) < 1e-12
    # two isotropic Gaussians N(0, s^2 I), N(m, s^2 I) in d dims: E k = (sigma^2 / (sigma^2 + 2 s^2))^(d/2) within
    # a set, times exp(-|m|^2 / (2 (sigma^2 + 2 s^2))) across; the all-pairs estimate adds O(1/n)
    d, s, sigma, n = 3, 0.5, 1.0, 2000
    a = torch.randn(n, d, generator=g, dtype=torch.float64) * s
    b = torch.randn(n, d, generator=g, dtype=torch.float64) * s + torch.tensor([1.0, 0, 0], dtype=torch.float64)
    same = (sigma**2 / (sigma**2 + 2 * s**2)) ** (d / 2)
    expected = 2 * same - 2 * same * math.exp(-1.0 / (2 * (sigma**2 + 2 * s**2)))
    assert cmmd(a, b, sigma=sigma, scale=1.0) == pytest.approx(expected, rel=0.03)
