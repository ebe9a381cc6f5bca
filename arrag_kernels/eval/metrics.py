"""Sample metrics between a real and a generated image set.

* Frechet distance of Gaussians fitted to features already extracted (:func:`frechet_distance`;
  what the miniature evaluation and the demo report, on cached features, with no dependency):
  ``||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1^1/2 S_2 S_1^1/2)^1/2)``, the trace term computed from
  the eigenvalues of the symmetric PSD matrix ``S_1^1/2 S_2 S_1^1/2`` (no complex sqrtm).
* FID of image sets through torchmetrics' ``FrechetInceptionDistance`` (:func:`fid`): with any
  feature extractor as its ``feature=`` module (the project's extractors, :mod:`.features`) or
  torchmetrics' own Inception from a local weights file (needs ``torch-fidelity``); nothing
  downloads. Tested equal to :func:`frechet_distance` on the same features (the reference).
* CLIP score through torchmetrics' ``CLIPScore`` with a local CLIP directory.
* CMMD (Jayasumana et al. 2024): squared MMD with a Gaussian RBF kernel between CLIP image
  embeddings (no well-kept package exists; a few lines here).
* Precision / recall of Kynkaanniemi et al. 2019 (k-NN manifolds in feature space): precision is
  the share of generated samples inside the union of real k-NN balls, recall the share of real
  samples inside the union of generated ones.
* FWD (Frechet Wavelet Distance, Veeramacheneni et al. 2025) through the authors' ``pytorchfwd``
  package: Haar wavelet packets, per packet a Gaussian over its coefficients, Frechet distances
  averaged over packets. ``pytorchfwd`` pins old scipy / ptwt and needs torchvision for its
  folder CLI, so it is installed without dependencies (``pip install --no-deps pytorchfwd``, see
  ``scripts/setup.sh``) and only its packet transform and distance functions are called here.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .features import Extractor, to_uint8


def _check_sets(a: torch.Tensor, b: torch.Tensor, what: str, min_count: int = 2):
    if a.dim() != b.dim() or a.shape[1:] != b.shape[1:]:
        raise ValueError(f"{what}: the two sets must have the same per-sample shape, got {tuple(a.shape[1:])} and "
                         f"{tuple(b.shape[1:])}; resize the images (or use one extractor) so both match")
    for name, x in (("first", a), ("second", b)):
        if x.shape[0] < min_count:
            raise ValueError(f"{what}: the {name} set has {x.shape[0]} samples, at least {min_count} are needed")


def gaussian_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, d) features -> mean (d,) and unbiased covariance (d, d), float64."""
    x = features.double()
    return x.mean(0), torch.cov(x.T).reshape(x.shape[1], x.shape[1])


def frechet_distance_from_stats(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2)."""
    mu1, mu2, sigma1, sigma2 = (t.double() for t in (mu1, mu2, sigma1, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.numel(), mu1.numel()):
        raise ValueError(f"Frechet distance: expected means (d,) and covariances (d, d) of one d, got "
                         f"{tuple(mu1.shape)}, {tuple(sigma1.shape)}, {tuple(mu2.shape)}, {tuple(sigma2.shape)}")
    w, v = torch.linalg.eigh(sigma1)
    root1 = (v * w.clamp_min(0).sqrt()) @ v.T
    m = root1 @ sigma2 @ root1
    tr_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * tr_sqrt)


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to (n_a, d) and (n_b, d) feature sets."""
    _check_sets(features_a, features_b, "Frechet distance")
    return frechet_distance_from_stats(*gaussian_stats(features_a), *gaussian_stats(features_b))


class _FeatureModule(nn.Module):
    """``fn`` as the ``feature`` module torchmetrics' FID calls on each batch (``num_features`` spares
    it a probe on a dummy 299 x 299 image)."""

    def __init__(self, fn, num_features: int):
        super().__init__()
        self.fn, self.num_features = fn, int(num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def _torchmetrics_fid(feature, **kwargs):
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError as e:
        raise ImportError(f"FID needs torchmetrics ({e}); install it with `pip install torchmetrics==1.9.0`") from e
    return FrechetInceptionDistance(feature=feature, **kwargs)


def _frechet(metric, real, fake, batch_size: int) -> float:
    with torch.no_grad():
        for x, is_real in ((real, True), (fake, False)):
            for i in range(0, len(x), batch_size):
                metric.update(x[i : i + batch_size], real=is_real)
        return float(metric.compute())


def fid(real: torch.Tensor, fake: torch.Tensor, extractor: Extractor | None = None,
        inception_weights: str | os.PathLike | None = None, batch_size: int = 64) -> float:
    """FID between (n, 3, S, S) image sets in [-1, 1] through torchmetrics' ``FrechetInceptionDistance``.

    Exactly one of:
        extractor: a feature extractor (:mod:`.features`: the miniature's classifier, a local
            TorchScript Inception or CLIP tower, any ``pixels -> (n, d)`` callable), passed as
            torchmetrics' ``feature=`` module; it reads the pixels as given, in [-1, 1].
        inception_weights: a local file of torchmetrics' FID Inception-v3 weights
            (``weights-inception-2015-12-05-6726825d.pth``, what torch-fidelity would download), read by
            torchmetrics' own Inception (``feature=2048``; needs ``torch-fidelity``), fed uint8 pixels.
    """
    if (extractor is None) == (inception_weights is None):
        raise ValueError("fid: pass exactly one of extractor= (a feature extractor) or inception_weights= (a local "
                         "Inception weights file)")
    _check_sets(real, fake, "FID")
    if inception_weights is not None:
        path = Path(inception_weights)
        if not path.is_file():
            raise FileNotFoundError(f"Inception weights {str(path)!r} not found: they cannot be downloaded here; "
                                    "copy torchmetrics' FID Inception file (weights-inception-2015-12-05-6726825d.pth) "
                                    "and pass its path")
        try:
            metric = _torchmetrics_fid(2048, feature_extractor_weights_path=os.fspath(path))
        except ModuleNotFoundError as e:
            raise ImportError(f"torchmetrics' Inception needs torch-fidelity ({e}); `pip install torch-fidelity`, or "
                              "export the network to TorchScript and pass it as extractor=") from e
        return _frechet(metric, to_uint8(real), to_uint8(fake), batch_size)
    fn = getattr(extractor, "features", extractor)
    with torch.no_grad():
        num_features = fn(real[:1].float()).shape[-1]
    metric = _torchmetrics_fid(_FeatureModule(lambda x: fn(x.float()), num_features))
    return _frechet(metric, real, fake, batch_size)


def clip_score(pixels: torch.Tensor, captions, clip) -> float:
    """torchmetrics' CLIP score, ``max(100 * mean cos(image, caption), 0)``, of (n, 3, S, S) images in
    [-1, 1] against n captions; ``clip``: a local CLIP directory or :func:`.features.load_clip`'s pair."""
    from torchmetrics.multimodal.clip_score import CLIPScore

    from .features import load_clip

    captions = [captions] if isinstance(captions, str) else list(captions)
    if len(captions) != len(pixels):
        raise ValueError(f"clip_score: {len(pixels)} images but {len(captions)} captions; pass one caption per image")
    pair = load_clip(clip) if isinstance(clip, (str, os.PathLike)) else clip
    metric = CLIPScore(model_name_or_path=lambda: pair)
    with torch.no_grad():
        metric.update(to_uint8(pixels), captions)
        return float(metric.compute())


def cmmd(real: torch.Tensor, fake: torch.Tensor, sigma: float = 10.0, scale: float = 1000.0) -> float:
    """CMMD (Jayasumana et al. 2024) between (n_r, d) and (n_f, d) CLIP image embeddings (L2-normalised,
    :func:`.features.clip_image_embeddings`): ``scale * MMD^2`` with the Gaussian RBF kernel
    ``k(x, y) = exp(-||x - y||^2 / (2 sigma^2))``, ``MMD^2 = mean k(r, r') + mean k(f, f') - 2 mean k(r, f)``
    over all pairs (diagonals included, as the paper's code does). Paper defaults: sigma 10, scale 1000."""
    _check_sets(real, fake, "CMMD", min_count=1)
    real, fake = real.double(), fake.double()

    def mean_kernel(a, b):
        return torch.exp(-torch.cdist(a, b).square() / (2 * sigma**2)).mean()

    return float(scale * (mean_kernel(real, real) + mean_kernel(fake, fake) - 2 * mean_kernel(real, fake)))


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> dict:
    """Improved precision and recall (Kynkaanniemi et al. 2019) of (n_r, d) real and (n_f, d) fake features."""
    _check_sets(real, fake, "precision/recall", min_count=k + 1)
    real, fake = real.double(), fake.double()

    def radii(x):  # distance to the k-th nearest other sample
        return torch.cdist(x, x).kthvalue(k + 1, dim=1).values

    def coverage(points, centres, r):
        return float((torch.cdist(points, centres) <= r.unsqueeze(0)).any(dim=1).double().mean())

    return {"precision": coverage(fake, real, radii(real)), "recall": coverage(real, fake, radii(fake)), "k": k}


def _to_unit_range(images: torch.Tensor) -> torch.Tensor:
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"FWD: expected (n, 3, S, S) images in [-1, 1], got {tuple(images.shape)}")
    return ((images.double() + 1) / 2).clamp(0, 1)  # pytorchfwd reads images with ToTensor: [0, 1]


def fwd(real: torch.Tensor, fake: torch.Tensor, wavelet: str = "Haar", max_level: int = 4) -> float:
    """Frechet Wavelet Distance between (n, 3, S, S) image sets in [-1, 1] (pytorchfwd's defaults)."""
    try:
        from pytorchfwd.freq_math import calculate_frechet_distance, forward_wavelet_packet_transform
    except ImportError as e:
        raise ImportError(f"FWD needs the `pytorchfwd` package ({e}); install it with "
                          "`pip install --no-deps pytorchfwd==1.0.1 ptwt==0.1.8 PyWavelets scipy`") from e
    _check_sets(real, fake, "FWD")
    stats = []
    for images in (real, fake):
        packets = forward_wavelet_packet_transform(_to_unit_range(images), wavelet, max_level, False)
        P = packets.shape[1]
        flat = packets.permute(1, 0, 2, 3, 4).reshape(P, packets.shape[0], -1)  # (P, n, C*h*w)
        stats.append([gaussian_stats(flat[p]) for p in range(P)])
    dists = [calculate_frechet_distance(m1.numpy(), s1.numpy(), m2.numpy(), s2.numpy())
             for (m1, s1), (m2, s2) in zip(*stats)]
    return float(sum(dists) / len(dists))
