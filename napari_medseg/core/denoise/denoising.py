"""Denoising: self-supervised Noise2Void / N2V2 trained on the noisy image itself, and classical
filters from scikit-image (docs/ARCHITECTURE.md rule 2: long work is a generator).

Methods
-------
``"n2v2"`` (default), ``"n2v"``
    Blind-spot self-supervision (Krull et al., CVPR 2019; N2V2: Höck et al., ECCV-W 2022). A
    small U-Net is trained on random patches of the image: a few pixels of each patch
    (``mask_fraction``, stratified on a grid) are replaced by a neighbour's value (N2V) or by
    the median of their 5x5(x5) neighbourhood without the centre (N2V2), and the network
    learns to predict their *noisy* values from the surroundings. Because pixel noise is
    independent, the best it can do is predict the clean signal. N2V2 also drops the top-level
    skip connection and uses max-blur pooling, the changes the N2V2 paper makes against
    checkerboard artefacts. Training stops at a time budget (seconds) or a step count; the
    learning rate follows a cosine over the budget. Prediction runs the trained network over
    the image with :func:`napari_medseg.core.engine.windows.sliding_window` (Gaussian-blended
    tiles).
``"nlmeans"``, ``"tv"``, ``"bilateral"``, ``"wavelet"``
    :func:`skimage.restoration.denoise_nl_means` (``h = 0.8 sigma``, fast mode),
    :func:`~skimage.restoration.denoise_tv_chambolle` (``weight = sigma``),
    :func:`~skimage.restoration.denoise_bilateral` (``sigma_color = 2 sigma``, 2D slices) and
    :func:`~skimage.restoration.denoise_wavelet` (BayesShrink, soft); ``sigma`` is the noise
    standard deviation estimated with :func:`skimage.restoration.estimate_sigma` (median
    absolute deviation of the finest wavelet coefficients) on the image scaled to [0, 1].

Geometry, axes and values
-------------------------
Everything works on an :class:`~napari_medseg.io.record.ImageRecord`: the array in the file's
own axis order (spatial axes first, then frames or RGB). The result has the *same shape, dtype,
affine and metadata*; values are clipped to the input's ``[min, max]`` and rounded for integer
types, so a saved result keeps the value range and geometry of the source. 2D images run in
2D; volumes run in 3D when every axis has at least 16 voxels and the slices are no more than
3x thicker than the in-plane spacing, otherwise slice by slice (2D) along the thickest axis.
RGB is denoised as three channels together (the blind spot covers all three at once).

Bad input (one clear sentence, :class:`~napari_medseg.errors.MedsegError`): constant
images, images without a finite value, images smaller than the network needs (8 pixels per
axis), 4D data without ``axis`` (the frame axis: each frame is denoised; N2V trains one
network on all frames). NaN/Inf voxels are filled for the computation and put back unchanged.

A trained denoiser is a model folder (``model.json`` with ``task="denoising"`` +
``weights.safetensors``), written by :func:`save_denoiser` and read by :func:`load_denoiser`,
reusable on other images of the same kind (``denoise(record, model=folder)``).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_medseg.errors import MedsegError
from napari_medseg.progress import Progress

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from napari_medseg.io.record import ImageRecord
    from napari_medseg.models.networks import LoadedModel

__all__ = [
    "CLASSICAL_METHODS",
    "DEFAULT_METHOD",
    "DEFAULT_TIME_BUDGET",
    "METHODS",
    "N2V_METHODS",
    "DenoiseResult",
    "TrainedDenoiser",
    "denoise",
    "denoise_array",
    "estimate_noise_sigma",
    "load_denoiser",
    "predict_n2v",
    "save_denoiser",
    "train_n2v",
]

N2V_METHODS = ("n2v2", "n2v")
CLASSICAL_METHODS = ("nlmeans", "tv", "bilateral", "wavelet")
METHODS = N2V_METHODS + CLASSICAL_METHODS
#: The method that measured best in benchmarks/bench_denoise.py (docs/denoising.md).
DEFAULT_METHOD = "n2v2"
#: Seconds of training by default: a 512x512 image takes about two minutes on 2 CPU cores.
DEFAULT_TIME_BUDGET = 90.0
#: Smallest size (pixels) along each axis the N2V network accepts.
MIN_SIZE = 8
_ARCH = "N2VUNet"


# --------------------------------------------------------------------------- results


@dataclass
class DenoiseResult:
    """A denoised image on the source grid.

    Attributes
    ----------
    data : numpy.ndarray
        Same shape, axis order (file order) and dtype as the input record's data, values within
        the input's ``[min, max]``.
    affine : numpy.ndarray
        The source record's affine, unchanged.
    method : str
        The method used.
    losses : list of float
        Training loss per step (N2V methods; empty otherwise).
    model : TrainedDenoiser or None
        The trained (or reused) network, ready for :func:`save_denoiser`.
    provenance : dict
        Method, parameters, estimated noise sigma, seconds, notes.
    """

    data: np.ndarray
    affine: np.ndarray
    method: str
    losses: list[float] = field(default_factory=list)
    model: TrainedDenoiser | None = None
    provenance: dict = field(default_factory=dict)


@dataclass
class TrainedDenoiser:
    """A blind-spot network with what it needs to run on another image.

    Attributes
    ----------
    network : torch.nn.Module
        Maps ``(B, C, *patch)`` z-scored intensities to the same shape.
    dims : int
        2 (images, or volumes slice by slice) or 3.
    channels : int
        Input/output channels (1, or 3 for RGB).
    variant : str
        ``"n2v"`` or ``"n2v2"``.
    patch_size : list of int
        Training patch (pixels per axis).
    training : dict
        Steps, seconds, last loss, mask fraction, source images.
    """

    network: Any
    dims: int
    channels: int
    variant: str
    patch_size: list[int]
    training: dict = field(default_factory=dict)
    modality: str = "unknown"
    losses: list[float] = field(default_factory=list)


# --------------------------------------------------------------------------- the network


def _n2v_unet_class() -> Any:
    """The N2V U-Net class, built lazily so that importing this module does not import torch."""
    global _N2VUNET
    if _N2VUNET is not None:
        return _N2VUNET
    import torch
    from torch import nn

    def conv(dims: int) -> Any:
        return nn.Conv2d if dims == 2 else nn.Conv3d

    def norm(dims: int) -> Any:
        return nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d

    class Block(nn.Sequential):
        def __init__(self, dims: int, cin: int, cout: int) -> None:
            super().__init__(
                conv(dims)(cin, cout, 3, padding=1),
                norm(dims)(cout),
                nn.ReLU(inplace=True),
                conv(dims)(cout, cout, 3, padding=1),
                norm(dims)(cout),
                nn.ReLU(inplace=True),
            )

    class MaxBlurPool(nn.Module):
        """Max-pool with stride 1, then a [1, 2, 1] blur with stride 2 (N2V2)."""

        def __init__(self, dims: int, channels: int) -> None:
            super().__init__()
            self.dims = dims
            k1 = torch.tensor([1.0, 2.0, 1.0])
            k = k1[:, None] * k1[None, :] if dims == 2 else k1[:, None, None] * k1[None, :, None]
            if dims == 3:
                k = k * k1[None, None, :]
            k = k / k.sum()
            self.register_buffer("kernel", k[None, None].repeat(channels, *([1] * (dims + 1))))
            self.channels = channels

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            import torch.nn.functional as F

            if self.dims == 2:
                x = F.max_pool2d(F.pad(x, (0, 1, 0, 1), mode="replicate"), 2, stride=1)
                x = F.pad(x, (1, 1, 1, 1), mode="replicate")
                return F.conv2d(x, self.kernel, stride=2, groups=self.channels)
            x = F.max_pool3d(F.pad(x, (0, 1, 0, 1, 0, 1), mode="replicate"), 2, stride=1)
            x = F.pad(x, (1, 1, 1, 1, 1, 1), mode="replicate")
            return F.conv3d(x, self.kernel, stride=2, groups=self.channels)

    class N2VUNet(nn.Module):
        """U-Net of ``depth`` poolings for blind-spot denoising.

        Input and output ``(B, channels, *spatial)``; every spatial size must be a multiple of
        ``2**depth``. ``n2v2=True``: max-blur pooling and no skip connection at full
        resolution (Höck et al. 2022). No residual connection: adding the input back would
        pass each pixel's own noise through the blind spot at prediction time.
        """

        def __init__(
            self,
            dims: int = 2,
            channels: int = 1,
            features: int = 32,
            depth: int = 2,
            n2v2: bool = True,
        ) -> None:
            super().__init__()
            self.dims, self.depth, self.n2v2 = dims, depth, n2v2
            f = [features * 2**i for i in range(depth + 1)]
            self.down = nn.ModuleList()
            self.pools = nn.ModuleList()
            cin = channels
            for i in range(depth):
                self.down.append(Block(dims, cin, f[i]))
                self.pools.append(
                    MaxBlurPool(dims, f[i])
                    if n2v2
                    else (nn.MaxPool2d if dims == 2 else nn.MaxPool3d)(2)
                )
                cin = f[i]
            self.bottom = Block(dims, f[depth - 1], f[depth])
            self.up = nn.ModuleList()
            self.dec = nn.ModuleList()
            for i in reversed(range(depth)):
                self.up.append(nn.Upsample(scale_factor=2, mode="nearest"))
                skip = 0 if (n2v2 and i == 0) else f[i]
                self.dec.append(Block(dims, f[i + 1] + skip, f[i]))
            self.head = conv(dims)(f[0], channels, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            skips = []
            h = x
            for block, pool in zip(self.down, self.pools):
                h = block(h)
                skips.append(h)
                h = pool(h)
            h = self.bottom(h)
            for k, (up, dec) in enumerate(zip(self.up, self.dec)):
                i = self.depth - 1 - k
                h = up(h)
                if not (self.n2v2 and i == 0):
                    h = torch.cat([h, skips[i]], dim=1)
                h = dec(h)
            return self.head(h)

    _N2VUNET = N2VUNet
    return N2VUNet


_N2VUNET: Any = None


def build_n2v_network(
    dims: int, channels: int, features: int = 32, depth: int = 2, n2v2: bool = True
) -> Any:
    """A fresh N2V U-Net (see the module docstring); ``torch.nn.Module``."""
    return _n2v_unet_class()(
        dims=int(dims),
        channels=int(channels),
        features=int(features),
        depth=int(depth),
        n2v2=bool(n2v2),
    )


# --------------------------------------------------------------------------- helpers


def _as_float_image(data: Any) -> np.ndarray:
    return np.asarray(data, dtype=np.float32)


def _restore_values(out: np.ndarray, like: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Clip to the input's range and cast back to its dtype (rounding for integers)."""
    out = np.clip(out, lo, hi)
    if np.issubdtype(like.dtype, np.integer):
        out = np.rint(out)
    elif like.dtype == np.bool_:
        out = out >= 0.5
    return out.astype(like.dtype, copy=False)


def estimate_noise_sigma(image: np.ndarray, channel_axis: int | None = None) -> float:
    """Noise standard deviation of an image, in its own intensity units.

    Parameters
    ----------
    image : numpy.ndarray
        2D or 3D (plus ``channel_axis``), any intensity units; must be finite.
    channel_axis : int, optional
        Axis of colour channels (the estimate is averaged over channels).

    Returns
    -------
    float
        Median-absolute-deviation estimate of Gaussian noise sigma from the finest wavelet
        detail coefficients (Donoho), :func:`skimage.restoration.estimate_sigma`.
    """
    from skimage.restoration import estimate_sigma

    a = np.asarray(image, dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = estimate_sigma(a, channel_axis=channel_axis, average_sigmas=True)
    return float(s)


def _classical(
    image: np.ndarray,
    method: str,
    sigma: float,
    channel_axis: int | None,
    slicewise_axis: int | None,
) -> np.ndarray:
    """One classical filter on an image scaled to [0, 1]; same shape out."""
    from skimage import restoration as R

    if method == "nlmeans":
        # 3D nlmeans on thick slices mixes unrelated slices: use 2D there as well
        if slicewise_axis is not None:
            return _per_slice(image, slicewise_axis, method, sigma, channel_axis)
        return R.denoise_nl_means(
            image,
            h=0.8 * sigma,
            sigma=sigma,
            fast_mode=True,
            patch_size=5,
            patch_distance=6,
            channel_axis=channel_axis,
        ).astype(np.float32)
    if method == "tv":
        if slicewise_axis is not None:
            return _per_slice(image, slicewise_axis, method, sigma, channel_axis)
        return R.denoise_tv_chambolle(
            image, weight=max(sigma, 1e-4), channel_axis=channel_axis
        ).astype(np.float32)
    if method == "bilateral":
        nsp = image.ndim - (1 if channel_axis is not None else 0)
        if nsp == 3:  # skimage's bilateral filter is 2D only
            return _per_slice(
                image,
                slicewise_axis if slicewise_axis is not None else 2,
                method,
                sigma,
                channel_axis,
            )
        return R.denoise_bilateral(
            image,
            sigma_color=max(2.0 * sigma, 1e-3),
            sigma_spatial=1.5,
            win_size=5,
            channel_axis=channel_axis,
        ).astype(np.float32)
    if method == "wavelet":
        try:
            import pywt  # noqa: F401
        except ImportError:
            raise MedsegError(
                "wavelet denoising needs the PyWavelets package (pip install PyWavelets); "
                "choose another method or install it"
            ) from None
        if slicewise_axis is not None:
            return _per_slice(image, slicewise_axis, method, sigma, channel_axis)
        return R.denoise_wavelet(
            image,
            sigma=sigma,
            mode="soft",
            method="BayesShrink",
            rescale_sigma=True,
            channel_axis=channel_axis,
            convert2ycbcr=False,
        ).astype(np.float32)
    raise MedsegError(f"unknown denoising method {method!r}; choose one of {', '.join(METHODS)}")


def _per_slice(
    image: np.ndarray, axis: int, method: str, sigma: float, channel_axis: int | None
) -> np.ndarray:
    moved = np.moveaxis(image, axis, 0)
    cax = None
    if channel_axis is not None:
        cax = channel_axis - 1 if channel_axis > axis else channel_axis
    out = np.stack([_classical(s, method, sigma, cax, None) for s in moved])
    return np.moveaxis(out, 0, axis)


def _plan_dims(spatial_shape: Sequence[int], spacing: Sequence[float]) -> tuple[int, int | None]:
    """(network dims, slice axis or None) for an image of this shape and spacing."""
    nsp = len(spatial_shape)
    if nsp == 2:
        return 2, None
    sp = np.asarray(spacing, dtype=float)
    thick = int(len(sp) - 1 - np.argmax(sp[::-1]))  # last axis among the thickest
    inplane = [s for i, s in enumerate(sp) if i != thick]
    aniso = sp[thick] / max(min(inplane), 1e-9)
    if min(spatial_shape) >= 16 and aniso <= 3.0:
        return 3, None
    # slice by slice along the thickest axis (ties: the smallest axis)
    if aniso <= 1.0 + 1e-6:
        thick = int(np.argmin(spatial_shape))
    return 2, thick


def _check_size(spatial_shape: Sequence[int], slice_axis: int | None, name: str) -> None:
    plane = [s for i, s in enumerate(spatial_shape) if i != slice_axis]
    if min(plane) < MIN_SIZE:
        raise MedsegError(
            f"the image {name!r} is too small for the denoising network "
            f"({'x'.join(map(str, spatial_shape))}); it needs at least {MIN_SIZE} pixels along "
            "each axis: use a classical method (nlmeans, tv, bilateral, wavelet)"
        )


def _zscore_stats(a: np.ndarray, channel_axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std per channel (shape (C,)), from a strided sample."""
    if channel_axis is None:
        x = a.reshape(1, -1)
    else:
        x = np.moveaxis(a, channel_axis, 0).reshape(a.shape[channel_axis], -1)
    step = max(1, x.shape[1] // 2_000_000)
    x = x[:, ::step].astype(np.float64)
    mean = x.mean(axis=1)
    std = x.std(axis=1)
    std = np.where(std > 0, std, 1.0)
    return mean.astype(np.float32), std.astype(np.float32)


# --------------------------------------------------------------------------- blind-spot masking


def _blind_spot_batch(
    x: torch.Tensor,
    mask_fraction: float,
    variant: str,
    gen: torch.Generator,
    radius: int = 2,
    blind_radius: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask a few pixels of each patch for blind-spot training.

    Parameters
    ----------
    x : torch.Tensor
        ``(B, C, *patch)`` patches (2 or 3 spatial axes).
    mask_fraction : float
        Fraction of pixels to mask, on a stratified grid (one per cell of ``1/fraction`` pixels).
    variant : {"n2v", "n2v2"}
        Replacement: a random neighbour within ``radius`` (N2V) or the median of the
        neighbourhood without the centre (N2V2). All channels of a pixel are masked together.
    gen : torch.Generator
        Random source (CPU).
    blind_radius : int
        0: classic single-pixel blind spot. ``b > 0``: the ``(2b+1)`` block around each
        masked pixel is hidden too (for noise correlated between neighbouring pixels, e.g.
        interpolated or reconstructed MR); replacements then come from ``radius + b`` away and
        masked pixels keep ``b + 2`` pixels from the patch border.

    Returns
    -------
    masked : torch.Tensor
        ``x`` with the chosen pixels replaced.
    mask : torch.Tensor
        ``(B, 1, *patch)`` float, 1 at the masked pixels.
    """
    import torch

    B, C, *P = x.shape
    d = len(P)
    cell = max(1, round((1.0 / mask_fraction) ** (1.0 / d)))
    grids = [torch.arange(0, p, cell) for p in P]
    starts = torch.stack(torch.meshgrid(*grids, indexing="ij"), dim=-1).reshape(-1, d)  # (N, d)
    N = starts.shape[0]
    off = torch.stack(
        [torch.randint(0, cell, (B, N), generator=gen) for _ in range(d)], dim=-1
    )  # (B, N, d)
    pos = (starts[None] + off).clamp(max=torch.tensor(P) - 1)  # (B, N, d)
    if blind_radius > 0:
        edge = int(blind_radius) + 2
        pos = torch.minimum(pos.clamp(min=edge), torch.tensor(P) - 1 - edge)
        radius = radius + int(blind_radius)
    pos = pos.to(x.device)
    lim = torch.tensor(P, device=x.device) - 1
    flat_strides = torch.tensor(
        [int(np.prod(P[i + 1 :])) for i in range(d)], device=x.device, dtype=torch.long
    )
    xf = x.reshape(B, C, -1)
    centre = (pos * flat_strides).sum(-1)  # (B, N)
    bidx = torch.arange(B, device=x.device)[:, None].expand(B, N)
    if variant == "n2v2":
        rng = torch.arange(-radius, radius + 1)
        offs = torch.stack(torch.meshgrid(*([rng] * d), indexing="ij"), dim=-1).reshape(-1, d)
        offs = offs[offs.abs().amax(-1) > blind_radius].to(x.device)  # without the centre
        nb = pos[:, :, None, :] + offs[None, None]
        nb = torch.where(nb < 0, -nb, nb)  # reflect at the border: never onto the centre
        nb = torch.where(nb > lim, 2 * lim - nb, nb)
        nbf = (nb * flat_strides).sum(-1)  # (B, N, K)
        K = nbf.shape[-1]
        vals = xf[bidx[..., None].expand(B, N, K), :, nbf]  # (B, N, K, C)
        repl = vals.median(dim=2).values  # (B, N, C)
    else:
        o = torch.randint(-radius, radius + 1, (B, N, d), generator=gen).to(x.device)
        zero = (o == 0).all(-1)
        while bool(zero.any()):  # never copy the pixel onto itself
            o[zero] = torch.randint(-radius, radius + 1, (int(zero.sum()), d), generator=gen).to(
                x.device
            )
            zero = (o == 0).all(-1)
        nb = pos + o
        nb = torch.where(nb < 0, -nb, nb)
        nb = torch.where(nb > lim, 2 * lim - nb, nb)
        # a neighbour clamped back onto the centre (at the border): step inwards instead
        same = (nb == pos).all(-1)
        if bool(same.any()):
            nb[same] = torch.where(pos[same] > 0, pos[same] - 1, pos[same] + 1)
        nbf = (nb * flat_strides).sum(-1)
        repl = xf[bidx, :, nbf]  # (B, N, C)
    masked = xf.clone()
    if blind_radius > 0:
        # structured blind spot: hide the pixel's neighbours too (noise correlated over
        # ``blind_radius`` pixels), each replaced by a pixel from outside the hidden block
        b = int(blind_radius)
        rng = torch.arange(-b, b + 1)
        block = torch.stack(torch.meshgrid(*([rng] * d), indexing="ij"), dim=-1).reshape(-1, d)
        for o in block.to(x.device):
            r = torch.randint(-(b + 2), b + 3, (B, N, d), generator=gen).to(x.device)
            inside = r.abs().amax(-1) <= b
            while bool(inside.any()):
                r[inside] = torch.randint(
                    -(b + 2), b + 3, (int(inside.sum()), d), generator=gen
                ).to(x.device)
                inside = r.abs().amax(-1) <= b
            tgt = torch.minimum((pos + o).clamp(min=0), lim)
            src = torch.minimum((pos + r).clamp(min=0), lim)
            masked[bidx, :, (tgt * flat_strides).sum(-1)] = xf[
                bidx, :, (src * flat_strides).sum(-1)
            ]
        if variant == "n2v":
            repl = masked[bidx, :, centre]
    masked[bidx, :, centre] = repl
    mask = torch.zeros((B, 1, xf.shape[-1]), device=x.device, dtype=x.dtype)
    mask[bidx, 0, centre] = 1.0
    return masked.reshape(x.shape), mask.reshape((B, 1, *P))


# --------------------------------------------------------------------------- training


def _training_views(
    arrays: Sequence[np.ndarray], dims: int, slice_axis: int | None, channel_axis: int | None
) -> list[np.ndarray]:
    """Each array as ``(C, *spatial)`` float32 samples of ``dims`` spatial axes (slices split)."""
    out = []
    for a in arrays:
        a = np.asarray(a, dtype=np.float32)
        a = a[None] if channel_axis is None else np.moveaxis(a, channel_axis, 0)
        if slice_axis is not None and a.ndim == 4:
            a = np.moveaxis(a, slice_axis + 1, 1)  # (C, S, *plane)
            out.extend(np.ascontiguousarray(a[:, i]) for i in range(a.shape[1]))
        else:
            out.append(np.ascontiguousarray(a))
    return out


def _patch_size(samples: Sequence[np.ndarray], dims: int, want: int) -> list[int]:
    """The largest patch <= ``want`` (multiple of 4) that fits every sample."""
    mins = np.min([s.shape[1:] for s in samples], axis=0)
    return [max(MIN_SIZE, min(want, int(m) // 4 * 4)) for m in mins]


def train_n2v(
    images: Sequence[np.ndarray],
    *,
    variant: str = "n2v2",
    dims: int = 2,
    slice_axis: int | None = None,
    channel_axis: int | None = None,
    time_budget: float = DEFAULT_TIME_BUDGET,
    max_steps: int | None = None,
    patch_size: int | None = None,
    batch_size: int | None = None,
    features: int = 16,
    mask_fraction: float = 0.05,
    blind_radius: int = 0,
    learning_rate: float = 2e-3,
    device: Any = "auto",
    seed: int = 0,
    modality: str = "unknown",
    init: TrainedDenoiser | None = None,
) -> Generator[Progress, None, TrainedDenoiser]:
    """Train a blind-spot network on noisy images; yields after every step.

    Parameters
    ----------
    images : sequence of numpy.ndarray
        Noisy images, finite values, each ``(*spatial[, C])`` with ``C`` at ``channel_axis``;
        2D ``(row, col)`` or 3D in file axis order. They are z-scored each with its own mean
        and standard deviation (per channel).
    variant : {"n2v2", "n2v"}
        Masking and network variant (module docstring).
    dims : {2, 3}
        Network dimensionality; ``dims=2`` on volumes trains on slices along ``slice_axis``.
    slice_axis : int, optional
        Spatial axis the 2D network runs across for volumes.
    channel_axis : int, optional
        Channel axis of the arrays (RGB: ``-1`` or the last index).
    time_budget : float
        Seconds of training (wall clock); the learning rate decays on a cosine over it.
    max_steps : int, optional
        Stop after this many steps even if time is left.
    patch_size : int, optional
        Patch edge in pixels (default 64 in 2D, 32 in 3D, shrunk to fit the image).
    batch_size : int, optional
        Patches per step (default 8 in 2D, 2 in 3D).
    features : int
        Channels of the first U-Net level (16 keeps a CPU step near 0.1 s).
    mask_fraction : float
        Fraction of pixels masked per patch (N2V's paper: 0.002; higher gives a stronger
        training signal per step, which short CPU budgets need).
    blind_radius : int
        Hide the ``(2b+1)`` neighbourhood of each masked pixel too (structured blind spot),
        meant for noise correlated between neighbours (the fMRI frames' noise correlates
        0.26/0.41 between adjacent voxels); at a 30 s budget it did not help there
        (docs/denoising.md), so the default is 0.
    learning_rate : float
        Adam learning rate at the start of the cosine.
    device : str
        ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"mps"``.
    seed : int
        Seeds patch sampling, masking and the weights.
    init : TrainedDenoiser, optional
        Continue training this network (fine-tune) instead of a fresh one.

    Yields
    ------
    Progress
        ``done``/``total`` in tenths of a second of the budget (or steps with ``max_steps``
        and no budget); ``info = {"loss", "step", "elapsed"}``.

    Returns
    -------
    TrainedDenoiser
    """
    import torch

    from napari_medseg.core.engine.windows import resolve_device

    if variant not in N2V_METHODS:
        raise MedsegError(f"unknown blind-spot variant {variant!r}; use n2v or n2v2")
    if not images:
        raise MedsegError("no images to train the denoiser on")
    dev = resolve_device(device)
    samples = _training_views(images, dims, slice_axis, channel_axis)
    channels = int(samples[0].shape[0])
    if any(s.shape[0] != channels for s in samples):
        raise MedsegError("the training images do not all have the same number of channels")
    if any(s.ndim - 1 != dims for s in samples):
        raise MedsegError(f"the training images do not all fit a {dims}D network")
    normed = []
    shp = (-1, *([1] * dims))
    for s in samples:
        mean, std = _zscore_stats(s, 0)
        normed.append(torch.from_numpy((s - mean.reshape(shp)) / std.reshape(shp)))
    want = int(patch_size or (64 if dims == 2 else 32))
    patch = _patch_size(samples, dims, want)
    if init is not None:
        patch = [min(p, q) for p, q in zip(patch, init.patch_size)] or patch
    bsz = int(batch_size or (8 if dims == 2 else 2))

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    if init is not None:
        if init.dims != dims or init.channels != channels:
            raise MedsegError(
                f"the denoiser to fine-tune is {init.dims}D with {init.channels} channel(s), "
                f"the images need {dims}D with {channels}"
            )
        net = init.network
    else:
        net = build_n2v_network(dims, channels, features=features, n2v2=(variant == "n2v2"))
    net.to(dev).train()
    opt = torch.optim.Adam(net.parameters(), lr=learning_rate)
    weights = np.array([s[0].size for s in samples], dtype=float)
    weights /= weights.sum()
    rs = np.random.default_rng(seed)
    losses: list[float] = []
    budget = float(time_budget) if time_budget and time_budget > 0 else math.inf
    if budget == math.inf and not max_steps:
        raise MedsegError("give the denoiser a time budget (seconds) or a number of steps")
    total = int(budget * 10) if budget < math.inf else int(max_steps or 0)
    t0 = time.perf_counter()
    step = 0
    # On a busy CPU, torch's threads wait for each other at every operation; a small network
    # then trains many times faster on one thread (measured 0.035 s vs 2.7 s per step on 2
    # shared cores under load). Steps 2-4 run on the default threads, 5-7 on one thread,
    # and the faster setting is kept; the process setting is restored at the end.
    orig_threads = torch.get_num_threads()
    tune = dev.type == "cpu" and orig_threads > 1
    step_times: dict[int, list[float]] = {orig_threads: [], 1: []}
    chosen_threads = orig_threads
    yield Progress(0, total, f"training {variant.upper()} on {len(samples)} image(s)")
    try:
        while True:
            t_step = time.perf_counter()
            elapsed = t_step - t0
            frac = max(elapsed / budget, (step / max_steps) if max_steps else 0.0)
            if frac >= 1.0:
                break
            lr = learning_rate * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))
            for g in opt.param_groups:
                g["lr"] = lr
            batch = []
            picks = rs.choice(len(normed), size=bsz, p=weights)
            for k in picks:
                s = normed[k]
                sl = [slice(None)]
                for ax, p in enumerate(patch):
                    n = s.shape[ax + 1]
                    st = int(rs.integers(0, n - p + 1))
                    sl.append(slice(st, st + p))
                crop = s[tuple(sl)]
                # augment: flips and in-plane 90 degree turns of the last two axes
                for ax in range(1, dims + 1):
                    if rs.random() < 0.5:
                        crop = torch.flip(crop, (ax,))
                if patch[-1] == patch[-2] and rs.random() < 0.5:
                    crop = torch.rot90(crop, 1, (dims - 1, dims))
                batch.append(crop)
            x = torch.stack(batch).to(dev)
            masked, mask = _blind_spot_batch(
                x, mask_fraction, variant, gen, blind_radius=blind_radius
            )
            pred = net(masked)
            loss = (((pred - x) ** 2) * mask).sum() / (mask.sum() * channels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            lv = float(loss.detach())
            if not math.isfinite(lv):
                raise MedsegError(
                    "denoiser training diverged (the loss became NaN); try a lower learning rate"
                )
            losses.append(lv)
            if tune:
                dt = time.perf_counter() - t_step
                if 2 <= step <= 4:
                    step_times[orig_threads].append(dt)
                elif 5 <= step <= 7:
                    step_times[1].append(dt)
                if step == 4:
                    torch.set_num_threads(1)
                elif step == 7:
                    one = float(np.median(step_times[1]))
                    many = float(np.median(step_times[orig_threads]))
                    chosen_threads = 1 if one < 0.8 * many else orig_threads
                    torch.set_num_threads(chosen_threads)
                    tune = False
            elapsed = time.perf_counter() - t0
            done = int(min(elapsed, budget) * 10) if budget < math.inf else step
            yield Progress(
                min(done, total),
                total,
                f"training {variant.upper()}: step {step}, loss {lv:.4f}, "
                f"{elapsed:.0f}/{budget:.0f} s"
                if budget < math.inf
                else f"training {variant.upper()}: step {step}/{max_steps}, loss {lv:.4f}",
                {"loss": lv, "step": step, "elapsed": elapsed},
            )
    finally:
        net.eval()
        torch.set_num_threads(orig_threads)
    yield Progress(total, total, f"trained {variant.upper()}: {step} steps")
    tail = losses[-50:]
    return TrainedDenoiser(
        network=net,
        dims=dims,
        channels=channels,
        variant=variant,
        patch_size=list(patch),
        modality=modality,
        losses=losses,
        training={
            "method": variant,
            "steps": step,
            "seconds": round(time.perf_counter() - t0, 2),
            "time_budget": None if budget == math.inf else budget,
            "max_steps": max_steps,
            "batch_size": bsz,
            "mask_fraction": mask_fraction,
            "blind_radius": blind_radius,
            "learning_rate": learning_rate,
            "final_loss": float(np.mean(tail)) if tail else None,
            "n_images": len(images),
            "n_samples": len(samples),
            "seed": seed,
            "cpu_threads": chosen_threads if dev.type == "cpu" else None,
            "losses_every_10": [round(v, 5) for v in losses[::10]],
            **({"fine_tuned": True} if init is not None else {}),
        },
    )


# --------------------------------------------------------------------------- prediction


def predict_n2v(
    model: TrainedDenoiser,
    image: np.ndarray,
    *,
    slice_axis: int | None = None,
    channel_axis: int | None = None,
    device: Any = "auto",
    tile: int | None = None,
    batch_size: int = 4,
) -> Generator[Progress, None, np.ndarray]:
    """Run a trained blind-spot network over an image with the tiled engine.

    Parameters
    ----------
    model : TrainedDenoiser
    image : numpy.ndarray
        Finite float image ``(*spatial[, C])`` (file axis order); z-scored with its own
        statistics for the network and scaled back afterwards.
    slice_axis : int, optional
        For a 2D network on a volume: the spatial axis it runs across.
    channel_axis : int, optional
    device : str
    tile : int, optional
        Window edge (default 256 in 2D, 64 in 3D; a multiple of 4).
    batch_size : int
        Windows per forward pass.

    Returns
    -------
    numpy.ndarray
        float32, same shape as ``image``.
    """
    import torch

    from napari_medseg.core.engine.windows import resolve_device, slicewise, sliding_window

    dev = resolve_device(device)
    a = np.asarray(image, dtype=np.float32)
    a = a[None] if channel_axis is None else np.moveaxis(a, channel_axis, 0)  # (C, *spatial)
    if a.shape[0] != model.channels:
        raise MedsegError(
            f"the denoiser expects {model.channels} channel(s) but the image has {a.shape[0]}"
        )
    nsp = a.ndim - 1
    if model.dims == 3 and nsp == 2:
        raise MedsegError("this denoiser is 3D and cannot run on a 2D image; use a 2D denoiser")
    mean, std = _zscore_stats(a, 0)
    shp = (-1, *([1] * nsp))
    x = (a - mean.reshape(shp)) / std.reshape(shp)
    from napari_medseg.core.engine.fastpath import prepare_network

    net, _ = prepare_network(model.network, dev, "auto", guard="values")
    edge = int(tile or (256 if model.dims == 2 else 64))
    if model.dims == 2 and nsp == 3:
        sa = 2 if slice_axis is None else int(slice_axis)
        x = np.moveaxis(x, sa + 1, -1)  # (C, *plane, S)
        roi = [_round4(min(edge, s)) for s in x.shape[1:3]] + [1]
        predictor = slicewise(net)
        batch_size = max(batch_size, 8)
    else:
        sa = None
        roi = [_round4(min(edge, s)) for s in x.shape[1:]]
        predictor = net
    threads = (model.training or {}).get("cpu_threads")
    orig_threads = torch.get_num_threads()
    if dev.type == "cpu" and threads and threads < orig_threads:
        torch.set_num_threads(int(threads))  # what training measured faster on this CPU
    try:
        y = yield from sliding_window(
            torch.from_numpy(np.ascontiguousarray(x)),
            predictor,
            roi,
            overlap=0.25,
            batch_size=batch_size,
            device=dev,
            activation=None,
            amp=False,
            pad_value=0.0,
        )
    finally:
        torch.set_num_threads(orig_threads)
    out = y.detach().cpu().numpy()
    if sa is not None:
        out = np.moveaxis(out, -1, sa + 1)
    out = out * std.reshape(shp) + mean.reshape(shp)
    return out[0] if channel_axis is None else np.moveaxis(out, 0, channel_axis)


def _round4(n: int) -> int:
    return max(MIN_SIZE, int(math.ceil(n / 4) * 4))


# --------------------------------------------------------------------------- model folders


def save_denoiser(
    folder: str | Path, model: TrainedDenoiser, name: str | None = None, description: str = ""
) -> Path:
    """Write a trained denoiser as a model folder (card ``task="denoising"`` + safetensors).

    Returns
    -------
    pathlib.Path
        The folder.
    """
    from napari_medseg.models.card import ModelCard
    from napari_medseg.models.networks import save_model

    folder = Path(folder)
    net = model.network
    names = ["red", "green", "blue"] if model.channels == 3 else None
    card = ModelCard(
        name=name or folder.name,
        task="denoising",
        dims=model.dims,
        modality=model.modality,
        in_channels=model.channels,
        classes=[
            {"id": i, "name": names[i] if names else f"channel {i}"} for i in range(model.channels)
        ],
        spacing=None,
        orientation="",
        patch_size=list(model.patch_size),
        normalization={"scheme": "zscore", "per_image": True},
        architecture={
            "name": _ARCH,
            "kwargs": {
                "dims": model.dims,
                "channels": model.channels,
                "features": int(net.down[0][0].out_channels),
                "depth": int(net.depth),
                "n2v2": bool(net.n2v2),
            },
        },
        description=description
        or f"{model.variant.upper()} self-supervised denoiser trained on "
        f"{model.training.get('n_images', 1)} noisy image(s)",
        license="same as the training images",
        training=dict(model.training),
        extra={"variant": model.variant},
    )
    return save_model(folder, card, net)


def load_denoiser(ref: str | Path | LoadedModel, device: Any = "cpu") -> TrainedDenoiser:
    """Read a denoiser model folder (or a registry name) written by :func:`save_denoiser`.

    Raises
    ------
    MedsegError
        Not a model folder, not a denoising model, damaged weights.
    """
    from napari_medseg.models.loaders.folder import open_model_folder
    from napari_medseg.models.networks import (
        LoadedModel,
        ModelLoadError,
        build_network,
        load_state_dict,
    )

    if isinstance(ref, LoadedModel):
        card, net = ref.card, ref.network
    else:
        from napari_medseg.models.registry import resolve_model

        folder = resolve_model(ref)
        if folder.is_file():
            folder = folder.parent
        checked = open_model_folder(folder)  # card, weights in the folder, sha256
        card, wpath = checked.card, checked.weights
        if card.task != "denoising":
            raise ModelLoadError(f"model {card.name!r} is a model for {card.task}, not a denoiser")
        arch = card.architecture or {}
        if arch.get("name") == _ARCH:
            try:
                net = build_n2v_network(**arch.get("kwargs", {}))
            except TypeError as e:
                raise ModelLoadError(
                    f"model {card.name!r}: architecture arguments do not fit: {e}"
                ) from e
        else:
            net = build_network(card)
        try:
            net.load_state_dict(load_state_dict(wpath))
        except RuntimeError as e:
            raise ModelLoadError(
                f"weights of model {card.name!r} do not fit its architecture: {str(e)[:200]}"
            ) from e
    if card.task != "denoising":
        raise ModelLoadError(f"model {card.name!r} is a model for {card.task}, not a denoiser")
    net.eval().to(str(device))
    return TrainedDenoiser(
        network=net,
        dims=int(card.dims),
        channels=int(card.in_channels),
        variant=str(card.extra.get("variant", "n2v2")),
        patch_size=list(card.patch_size),
        training=dict(card.training),
        modality=card.modality,
    )


# --------------------------------------------------------------------------- the whole job


def _frames(record: ImageRecord, axis: int | None) -> tuple[list[int], int | None, int | None]:
    """(list of frame indices or [-1], frame axis, channel axis) of a record's data."""
    nsp = record.spatial_ndim
    shape = record.shape
    channel_axis = len(shape) - 1 if record.rgb else None
    extra = [i for i in range(nsp, len(shape)) if i != channel_axis]
    if axis is not None and axis < 0:
        axis += len(shape)
    if not extra:
        if axis is not None and axis >= nsp:
            raise MedsegError(
                f"the image {record.name!r} has no frame axis {axis}; its shape is {shape}"
            )
        return [-1], None, channel_axis
    if len(extra) > 1:
        raise MedsegError(
            f"the image {record.name!r} has {len(shape)} axes {shape}; denoising takes 2D or 3D "
            "images with at most one frame axis"
        )
    if axis is None:
        if shape[extra[0]] == 1:
            return [0], extra[0], channel_axis
        raise MedsegError(
            f"the image {record.name!r} has {shape[extra[0]]} frames along axis {extra[0]} "
            f"(shape {shape}); say which axis holds the frames to denoise each frame "
            f"(command line: --axis {extra[0]})"
        )
    if axis != extra[0]:
        raise MedsegError(
            f"axis {axis} of the image {record.name!r} (shape {shape}) is a spatial or colour "
            f"axis; the frame axis is {extra[0]}"
        )
    return list(range(shape[axis])), axis, channel_axis


def denoise_array(
    image: np.ndarray,
    method: str,
    *,
    spacing: Sequence[float] | None = None,
    channel_axis: int | None = None,
    sigma: float | None = None,
) -> np.ndarray:
    """A classical method on one finite float image (no generator; these take seconds).

    Parameters
    ----------
    image : numpy.ndarray
        2D or 3D (file axis order) plus ``channel_axis``; any intensity units.
    method : {"nlmeans", "tv", "bilateral", "wavelet"}
    spacing : sequence of float, optional
        Voxel size per spatial axis: thick-sliced volumes are filtered slice by slice.
    sigma : float, optional
        Noise sigma in the image's units (default: estimated).

    Returns
    -------
    numpy.ndarray
        float32, same shape.
    """
    a = np.asarray(image, dtype=np.float32)
    nsp = a.ndim - (1 if channel_axis is not None else 0)
    lo, hi = float(a.min()), float(a.max())
    scale = hi - lo if hi > lo else 1.0
    u = (a - lo) / scale
    s = (sigma / scale) if sigma else estimate_noise_sigma(u, channel_axis)
    s = max(s, 1e-4)
    slice_axis = None
    if nsp == 3:
        _, slice_axis = _plan_dims(
            a.shape[:3] if channel_axis != 0 else a.shape[1:], spacing or (1.0, 1.0, 1.0)
        )
    out = _classical(u, method, s, channel_axis, slice_axis)
    return out * scale + lo


def denoise(
    record: ImageRecord,
    method: str = DEFAULT_METHOD,
    *,
    model: Any = None,
    time_budget: float = DEFAULT_TIME_BUDGET,
    max_steps: int | None = None,
    axis: int | None = None,
    device: Any = "auto",
    seed: int = 0,
    dims: int | None = None,
    train_on: Sequence[ImageRecord] = (),
    **train_kwargs: Any,
) -> Generator[Progress, None, DenoiseResult]:
    """Denoise one image; a generator that yields :class:`Progress` and returns the result.

    Parameters
    ----------
    record : ImageRecord
        The noisy image (file axis order; spatial axes, then frames or RGB).
    method : str
        One of :data:`METHODS`; ignored when ``model`` is given.
    model : str, Path, LoadedModel or TrainedDenoiser, optional
        A trained denoiser to reuse (no training).
    time_budget : float
        Training seconds for N2V methods.
    max_steps : int, optional
        Training steps limit for N2V methods.
    axis : int, optional
        The frame (time) axis of 4D data, in file order: each frame is denoised (N2V trains
        one network on all frames).
    device : str
    seed : int
    dims : {2, 3}, optional
        Force a 2D (slice by slice) or 3D network on volumes (default: automatic, module
        docstring).
    train_on : sequence of ImageRecord
        More noisy images of the same kind to train on, besides ``record``.
    **train_kwargs
        Passed to :func:`train_n2v` (``patch_size``, ``batch_size``, ``features``,
        ``mask_fraction``, ``learning_rate``).

    Returns
    -------
    DenoiseResult
        Same shape, dtype and affine as ``record``.
    """
    t0 = time.perf_counter()
    reuse = model is not None
    if reuse and not isinstance(model, TrainedDenoiser):
        model = load_denoiser(model)
    if reuse:
        method = model.variant
    method = str(method).lower()
    if method not in METHODS:
        raise MedsegError(
            f"unknown denoising method {method!r}; choose one of {', '.join(METHODS)}"
        )
    raw = np.asarray(record.data)
    if raw.size == 0:
        raise MedsegError(f"the image {record.name!r} is empty (shape {record.shape})")
    if raw.dtype.kind not in "iufb":
        raise MedsegError(f"the image {record.name!r} has {raw.dtype} values, not intensities")
    frames, frame_axis, channel_axis = _frames(record, axis)
    data = raw.astype(np.float32)
    finite = np.isfinite(data)
    n_bad = int(data.size - finite.sum())
    notes: list[str] = []
    if n_bad == data.size:
        raise MedsegError(f"the image {record.name!r} has no finite value (all NaN or Inf)")
    if n_bad:
        data[~finite] = float(np.median(data[finite]))
        notes.append(
            f"{n_bad} NaN/Inf voxels were filled with the median for denoising and kept as "
            "they were in the result"
        )
    lo, hi = float(data[finite].min()), float(data[finite].max())
    if hi <= lo:
        raise MedsegError(
            f"the image {record.name!r} is constant (every voxel is {lo:g}); there is no noise "
            "to remove"
        )
    nsp = record.spatial_ndim
    spatial = record.spatial_shape
    spacing = record.spacing

    def frame(i: int) -> np.ndarray:
        return data if i < 0 else np.take(data, i, axis=frame_axis)

    # channel axis index inside one frame (the frame axis comes before RGB)
    cax = None
    if channel_axis is not None:
        cax = channel_axis - (1 if frame_axis is not None else 0)
    out = np.empty_like(data)
    losses: list[float] = []
    prov: dict = {"method": method, "frames": len(frames) if frame_axis is not None else None}
    trained: TrainedDenoiser | None = None
    if method in CLASSICAL_METHODS:
        sig = []
        for k, i in enumerate(frames):
            yield Progress(
                k,
                len(frames),
                f"{method}: frame {k + 1}/{len(frames)}"
                if frame_axis is not None
                else f"{method}: denoising",
            )
            f = frame(i)
            scale = hi - lo
            u = (f - lo) / scale
            s = max(estimate_noise_sigma(u, cax), 1e-4)
            sig.append(s * scale)
            slice_axis = _plan_dims(spatial, spacing)[1] if nsp == 3 else None
            res = _classical(u, method, s, cax, slice_axis) * scale + lo
            if frame_axis is None:
                out[...] = res
            else:
                idx = [slice(None)] * data.ndim
                idx[frame_axis] = i
                out[tuple(idx)] = res
        prov["noise_sigma"] = float(np.mean(sig))
        yield Progress(len(frames), len(frames), f"{method}: done")
    else:
        if reuse:
            ndims, slice_axis = model.dims, None
            if nsp == 3 and ndims == 2:
                slice_axis = _plan_dims(spatial, spacing)[1]
                if slice_axis is None:
                    slice_axis = int(np.argmin(spatial))
        else:
            ndims, slice_axis = _plan_dims(spatial, spacing) if nsp == 3 else (2, None)
            if dims == 2 and nsp == 3 and slice_axis is None:
                ndims, slice_axis = 2, int(np.argmin(spatial))
            elif dims == 3 and nsp == 3:
                ndims, slice_axis = 3, None
            elif dims == 3 and nsp == 2:
                raise MedsegError("a 3D denoiser needs a volume; this image is 2D")
        _check_size(spatial, slice_axis, record.name)
        if not reuse:
            imgs = [frame(i) for i in frames]
            for extra in train_on:
                e = np.asarray(extra.data, dtype=np.float32)
                if e.shape[:nsp] and extra.spatial_ndim != nsp:
                    raise MedsegError(
                        f"the training image {extra.name!r} is {extra.spatial_ndim}D, "
                        f"not {nsp}D like {record.name!r}"
                    )
                e[~np.isfinite(e)] = 0.0
                imgs.append(e)
            trained = yield from train_n2v(
                imgs,
                variant=method,
                dims=ndims,
                slice_axis=slice_axis,
                channel_axis=cax,
                time_budget=time_budget,
                max_steps=max_steps,
                device=device,
                seed=seed,
                modality=record.modality,
                **train_kwargs,
            )
            losses = list(trained.losses)
            model = trained
        else:
            trained = model
        for k, i in enumerate(frames):
            res = yield from predict_n2v(
                model, frame(i), slice_axis=slice_axis, channel_axis=cax, device=device
            )
            if frame_axis is None:
                out[...] = res
            else:
                idx = [slice(None)] * data.ndim
                idx[frame_axis] = i
                out[tuple(idx)] = res
            if frame_axis is not None:
                yield Progress(k + 1, len(frames), f"denoised frame {k + 1}/{len(frames)}")
        prov["network"] = {
            "dims": model.dims,
            "slice_axis": slice_axis,
            "variant": model.variant,
            "reused": reuse,
            "training": {k: v for k, v in model.training.items() if k != "losses_every_10"},
        }
    result = _restore_values(out, raw if raw.dtype.kind != "f" else data, lo, hi)
    if raw.dtype.kind == "f" and result.dtype != raw.dtype:
        result = result.astype(raw.dtype)
    if n_bad:
        result[~finite] = raw[~finite]
    prov.update(
        seconds=round(time.perf_counter() - t0, 2),
        notes=notes,
        input={"name": record.name, "shape": list(record.shape), "dtype": str(raw.dtype)},
    )
    return DenoiseResult(
        data=result,
        affine=np.asarray(record.affine).copy(),
        method=method,
        losses=losses,
        model=trained,
        provenance=prov,
    )


def psnr(reference: np.ndarray, image: np.ndarray, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB (``data_range`` default: the reference's max - min)."""
    ref = np.asarray(reference, dtype=np.float64)
    img = np.asarray(image, dtype=np.float64)
    rng = float(ref.max() - ref.min()) if data_range is None else float(data_range)
    mse = float(np.mean((ref - img) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(rng * rng / mse)
