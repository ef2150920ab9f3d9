"""Augmentation of training batches, shared by every trainer.

:func:`default_augmentation` gives the settings for a kind of image and :func:`augment` applies
them to a batch of torch tensors: flips, 90-degree rotations, rotation + scaling (bilinear for
the image, nearest neighbour for the label), and per-sample intensity scale/shift, gamma and
Gaussian noise. All randomness comes from one ``torch.Generator``, so a seeded run repeats
exactly. The segmentation, box-detector and click trainers use it (the detector passes instance
maps as labels, so boxes follow rotated and scaled objects exactly).
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["augment", "default_augmentation"]


def default_augmentation(dims: int, modality: str = "") -> dict:
    """Augmentation settings suited to the kind of image.

    2D (microscopy, pathology): flips along both axes and 90° rotations (no preferred
    orientation). 3D (CT/MR in RAS): no flips or 90° rotations by default, because anatomy is
    not symmetric (the spleen is on the left); small rotations about S and scaling instead.
    All: intensity scale/shift, gamma, Gaussian noise.

    Parameters
    ----------
    dims : {2, 3}
        Spatial dimensions of the model.
    modality : str
        The card's modality (not used yet: the same settings serve every modality).

    Returns
    -------
    dict
        ``flip_axes`` (spatial axes, 0-based), ``rot90`` (in the first two spatial axes),
        ``affine_p`` (probability of rotation + scaling), ``rotate_deg`` (largest angle; about
        S in 3D), ``scale`` ([low, high] zoom), ``intensity_p``, ``gamma_p``, ``noise_p``
        (per-sample probabilities).
    """
    if dims == 2:
        return {
            "flip_axes": [0, 1],
            "rot90": True,
            "affine_p": 0.3,
            "rotate_deg": 180.0,
            "scale": [0.8, 1.25],
            "intensity_p": 0.3,
            "gamma_p": 0.3,
            "noise_p": 0.15,
        }
    return {
        "flip_axes": [],
        "rot90": False,
        "affine_p": 0.25,
        "rotate_deg": 15.0,
        "scale": [0.85, 1.2],
        "intensity_p": 0.3,
        "gamma_p": 0.3,
        "noise_p": 0.15,
    }


def augment(x: Any, y: Any, aug: dict, gen: Any) -> tuple[Any, Any]:
    """Augment a batch: images ``x (B, C, *spatial)`` float and labels ``y (B, 1, *spatial)``.

    Parameters
    ----------
    x : torch.Tensor
        ``(B, C, *spatial)`` float images, spatial axes in model order (R, A, S in 3D; rows,
        columns in 2D). Changed in place where possible.
    y : torch.Tensor
        ``(B, 1, *spatial)`` integer labels (class or instance values), moved with the image.
    aug : dict
        Settings (:func:`default_augmentation`).
    gen : torch.Generator
        The source of every random draw.

    Returns
    -------
    x, y : torch.Tensor
        Contiguous augmented tensors of the same shapes; ``y`` keeps its dtype (int64 after a
        rotation + scaling).
    """
    import torch
    import torch.nn.functional as F

    def rnd() -> float:
        return float(torch.rand(1, generator=gen))

    dims = x.ndim - 2
    for a in aug.get("flip_axes", []):
        if rnd() < 0.5:
            x, y = x.flip(a + 2), y.flip(a + 2)
    if aug.get("rot90") and x.shape[2] == x.shape[3] and rnd() < 0.5:
        k = int(torch.randint(1, 4, (1,), generator=gen))
        x, y = torch.rot90(x, k, (2, 3)), torch.rot90(y, k, (2, 3))
    if rnd() < aug.get("affine_p", 0.0):
        lo, hi = aug.get("scale", [1.0, 1.0])
        s = lo + (hi - lo) * rnd()
        ang = math.radians(aug.get("rotate_deg", 0.0)) * (2 * rnd() - 1)
        cos, sin = math.cos(ang) / s, math.sin(ang) / s
        B = x.shape[0]
        if dims == 2:
            theta = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]], dtype=x.dtype)
        else:
            # grid_sample's (x, y, z) are the last, middle, first array axes: (S, A, R) here,
            # so a rotation about S mixes the y and z rows (A and R)
            theta = torch.tensor(
                [[1 / s, 0, 0, 0], [0, cos, -sin, 0], [0, sin, cos, 0]], dtype=x.dtype
            )
        theta = theta[None].expand(B, -1, -1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        y = F.grid_sample(
            y.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False
        ).long()
    for b in range(x.shape[0]):
        if rnd() < aug.get("intensity_p", 0.0):
            x[b] = x[b] * (0.75 + 0.5 * rnd()) + 0.2 * (2 * rnd() - 1) * x[b].std()
        if rnd() < aug.get("gamma_p", 0.0):
            g = 0.7 + 0.8 * rnd()
            mn, mx = x[b].min(), x[b].max()
            rng_ = (mx - mn).clamp_min(1e-6)
            x[b] = ((x[b] - mn) / rng_).pow(g) * rng_ + mn
        if rnd() < aug.get("noise_p", 0.0):
            x[b] = x[b] + torch.randn(x[b].shape, generator=gen) * 0.1 * rnd() * x[b].std()
    return x.contiguous(), y.contiguous()
