"""Classical denoisers (Gaussian, TV, non-local means, bilateral, wavelet) and PSNR.

All run in the variance-stabilised space of the image's own noise model
(:mod:`~napari_medseg.core.denoise.noise`): :func:`denoise_classical` transforms the image with
the generalised Anscombe transform, where the noise has (close to) one standard deviation
everywhere, filters it, and maps the result back with the exact unbiased inverse. The filters'
strength comes from that space's measured noise level; the Gaussian's width and TV's weight are
chosen per image by J-invariant self-supervised calibration (Batson & Royer, ICML 2019:
the parameter whose blind-spot version best predicts the noisy image, with the blind spot
widened for correlated noise: :func:`invariant_loss`), so no ground truth is needed. See
:mod:`napari_medseg.core.denoise.denoising` for the methods, axes and value rules.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from napari_medseg.core.denoise.noise import NoiseModel, gat_forward, gat_inverse
from napari_medseg.errors import MedsegError

CLASSICAL_METHODS = ("gaussian", "tv", "nlmeans", "bilateral", "wavelet")
#: Methods whose parameter is calibrated per image (J-invariance), with the grid tried: Gaussian
#: sigma in pixels; TV weight in units of the noise standard deviation.
CALIBRATED = {
    "gaussian": (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0),
    "tv": (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0),
}
#: Calibration looks at a central crop of at most this many pixels (parameters transfer).
CALIBRATION_PIXELS = 512 * 512


def _as_float_image(data: Any) -> np.ndarray:
    return np.asarray(data, dtype=np.float32)


def restore_values(out: np.ndarray, like: np.ndarray, lo: float, hi: float) -> np.ndarray:
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


def classical_denoise(
    image: np.ndarray,
    method: str,
    sigma: float,
    channel_axis: int | None,
    slicewise_axis: int | None,
) -> np.ndarray:
    """One classical filter; same shape out.

    ``sigma`` is the noise standard deviation in the image's units (the filters' strength
    follows it), except for ``"gaussian"``, where it is the kernel width in pixels, and
    ``"tv"``, where it is the TV weight itself.
    """
    from skimage import restoration as R

    if method == "gaussian":
        from scipy import ndimage as ndi

        width = float(sigma)  # for "gaussian" ``sigma`` is the kernel width in pixels
        if slicewise_axis is not None or channel_axis is not None:
            w = [width] * image.ndim
            for ax in (slicewise_axis, channel_axis):
                if ax is not None:
                    w[ax] = 0.0
            return ndi.gaussian_filter(image, w).astype(np.float32)
        return ndi.gaussian_filter(image, width).astype(np.float32)
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
    raise MedsegError(
        f"unknown denoising method {method!r}; choose one of {', '.join(CLASSICAL_METHODS)}"
    )


def _central_crop(a: np.ndarray, channel_axis: int | None, pixels: int) -> np.ndarray:
    """The central block of ``a`` with at most ``pixels`` spatial pixels (all channels)."""
    sp = [i for i in range(a.ndim) if i != channel_axis]
    n = int(np.prod([a.shape[i] for i in sp]))
    if n <= pixels:
        return a
    f = (pixels / n) ** (1.0 / len(sp))
    idx = [slice(None)] * a.ndim
    for i in sp:
        k = max(8, int(a.shape[i] * f))
        s0 = (a.shape[i] - k) // 2
        idx[i] = slice(s0, s0 + k)
    return a[tuple(idx)]


def invariant_loss(
    v: np.ndarray,
    fn: Any,
    blind: int = 0,
    channel_axis: int | None = None,
    offsets: int = 4,
) -> float:
    """Self-supervised (J-invariant) loss of a denoiser on one image.

    A grid of pixels (one per ``(2 blind + 3)`` pixels along each spatial axis) is hidden
    together with its ``blind``-pixel neighbourhood: those pixels are replaced by the mean of
    the visible pixels around them, the denoiser runs, and its output at the grid pixels is
    compared with their noisy values. With independent noise this is the true squared error
    plus the noise variance (Batson & Royer, ICML 2019), so it ranks parameters and methods
    without ground truth; ``blind >= 1`` hides the neighbours too, for noise correlated
    between neighbouring pixels (which would otherwise favour filters that copy it).

    Parameters
    ----------
    v : numpy.ndarray
        Variance-stabilised image, file axis order, optional ``channel_axis``.
    fn : callable
        ``fn(image) -> image`` of the same shape.
    blind : int
        Neighbourhood radius hidden with each grid pixel.
    offsets : int
        Grid positions averaged (a fixed, evenly spread subset of all of them).

    Returns
    -------
    float
        Mean squared difference at the hidden grid pixels.
    """
    from scipy import ndimage as ndi

    sp = [i for i in range(v.ndim) if i != channel_axis]
    stride = 2 * blind + 3
    shape = [v.shape[i] for i in sp]
    all_offs = list(np.ndindex(*([stride] * len(sp))))
    pick = np.linspace(0, len(all_offs) - 1, min(offsets, len(all_offs))).round().astype(int)
    size = [2 * blind + 3 if i in sp else 1 for i in range(v.ndim)]
    total, count = 0.0, 0
    for k in pick:
        off = all_offs[int(k)]
        centre = np.zeros(shape, dtype=bool)
        centre[tuple(slice(o, None, stride) for o in off)] = True
        hidden = ndi.binary_dilation(centre, iterations=blind) if blind else centre
        if channel_axis is not None:
            centre_f = np.expand_dims(centre, channel_axis)
            hidden_f = np.expand_dims(hidden, channel_axis)
        else:
            centre_f, hidden_f = centre, hidden
        vis = (~hidden_f).astype(np.float32) * np.ones_like(v, dtype=np.float32)
        num = ndi.uniform_filter(np.where(hidden_f, 0.0, v).astype(np.float32), size)
        den = ndi.uniform_filter(vis, size)
        filled = np.where(hidden_f, num / np.maximum(den, 1e-6), v).astype(np.float32)
        out = fn(filled)
        cm = np.broadcast_to(centre_f, v.shape)
        total += float(np.sum((out[cm] - v[cm]) ** 2))
        count += int(cm.sum())
    return total / max(count, 1)


def calibrate(
    v: np.ndarray,
    method: str,
    noise_sd: float,
    channel_axis: int | None,
    slicewise_axis: int | None,
    blind: int = 0,
) -> tuple[float, float]:
    """Pick the Gaussian width or TV weight by the J-invariant loss (:func:`invariant_loss`).

    Parameters
    ----------
    v : numpy.ndarray
        The variance-stabilised image (file axis order, optional channel axis); a central
        crop of at most :data:`CALIBRATION_PIXELS` pixels is used.
    method : {"gaussian", "tv"}
    noise_sd : float
        Noise standard deviation in ``v`` (TV weights are multiples of it).
    blind : int
        Hidden neighbourhood radius (1 for correlated noise).

    Returns
    -------
    parameter : float
        Gaussian sigma in pixels, or TV weight in ``v``'s units.
    loss : float
        The self-supervised loss of that parameter.
    """
    crop = _central_crop(v, channel_axis, CALIBRATION_PIXELS)
    grid = CALIBRATED[method]
    params = [g if method == "gaussian" else g * noise_sd for g in grid]
    if blind == 0:  # scikit-image's implementation (interpolated single-pixel blind spots)
        from skimage.restoration import calibrate_denoiser

        def fn0(image: np.ndarray, p: float) -> np.ndarray:
            return classical_denoise(image, method, p, channel_axis, slicewise_axis)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, (tested, losses) = calibrate_denoiser(crop, fn0, {"p": params}, extra_output=True)
        k = int(np.argmin(losses))
        return float(tested[k]["p"]), float(losses[k])
    losses = []
    for p in params:

        def fn(image: np.ndarray, p: float = p) -> np.ndarray:
            return classical_denoise(image, method, p, channel_axis, slicewise_axis)

        losses.append(invariant_loss(crop, fn, blind, channel_axis))
    k = int(np.argmin(losses))
    return float(params[k]), float(losses[k])


def denoise_classical(
    image: np.ndarray,
    method: str,
    noise_model: NoiseModel,
    *,
    channel_axis: int | None = None,
    slicewise_axis: int | None = None,
) -> tuple[np.ndarray, dict]:
    """A classical filter in the variance-stabilised space of ``noise_model``.

    Parameters
    ----------
    image : numpy.ndarray
        Finite float image in its own units, file axis order, optional ``channel_axis``.
    method : str
        One of :data:`CLASSICAL_METHODS`.
    noise_model : NoiseModel
        From :func:`~napari_medseg.core.denoise.noise.estimate_noise_model` on this image.
    slicewise_axis : int, optional
        Filter 2D slices across this axis (thick-sliced volumes).

    Returns
    -------
    out : numpy.ndarray
        float32, same shape and units.
    info : dict
        ``vst`` (whether the Anscombe transform ran), ``noise_sd`` (in the stabilised space),
        ``parameter`` and, for calibrated methods, ``calibration_loss``.
    """
    v = stabilise(image, noise_model)
    sd = max(estimate_noise_sigma(v, channel_axis), 1e-6)
    info: dict = {"vst": noise_model.gain > 0, "noise_sd": round(sd, 4)}
    if method in CALIBRATED:
        blind = 0
        p, loss = calibrate(v, method, sd, channel_axis, slicewise_axis, blind)
        info["blind"] = blind
        info.update(parameter=round(p, 4), calibration_loss=round(loss, 6))
    else:
        p = sd
        info["parameter"] = round(p, 4)
    out = classical_denoise(v, method, p, channel_axis, slicewise_axis)
    return unstabilise(out, noise_model), info


def stabilise(image: np.ndarray, noise_model: NoiseModel) -> np.ndarray:
    """The image in the noise model's variance-stabilised space (float32)."""
    return gat_forward(image, noise_model)


def unstabilise(v: np.ndarray, noise_model: NoiseModel) -> np.ndarray:
    """Back from :func:`stabilise` with the exact unbiased inverse (float32)."""
    return gat_inverse(v, noise_model)


def _per_slice(
    image: np.ndarray, axis: int, method: str, sigma: float, channel_axis: int | None
) -> np.ndarray:
    moved = np.moveaxis(image, axis, 0)
    cax = None
    if channel_axis is not None:
        cax = channel_axis - 1 if channel_axis > axis else channel_axis
    out = np.stack([classical_denoise(s, method, sigma, cax, None) for s in moved])
    return np.moveaxis(out, 0, axis)


def psnr(reference: np.ndarray, image: np.ndarray, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB (``data_range`` default: the reference's max - min)."""
    ref = np.asarray(reference, dtype=np.float64)
    img = np.asarray(image, dtype=np.float64)
    rng = float(ref.max() - ref.min()) if data_range is None else float(data_range)
    mse = float(np.mean((ref - img) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(rng * rng / mse)
