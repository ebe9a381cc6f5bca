"""Sample metrics between a real and a generated image set.

* Frechet distance of Gaussians fitted to features (FID when the features are Inception's):
  ``||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1^1/2 S_2 S_1^1/2)^1/2)``, the trace term computed from
  the eigenvalues of the symmetric PSD matrix ``S_1^1/2 S_2 S_1^1/2`` (no complex sqrtm).
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

import torch


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
