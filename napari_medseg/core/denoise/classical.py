"""Classical denoisers (Gaussian, TV, non-local means, bilateral, wavelet) and PSNR.

All run in the variance-stabilised space of the image's own noise model
(:mod:`~napari_medseg.core.denoise.noise`): :func:`denoise_classical` transforms the image with
the generalised Anscombe transform, where the noise has (close to) one standard deviation
everywhere, filters it, and maps the result back with the exact unbiased inverse. The filters'
strength comes from that space's measured noise level; the Gaussian's width and TV's weight are
chosen per image by J-invariant self-supervised calibration (Batson & Royer, ICML 2019:
the parameter whose blind-spot version best predicts the noisy image,
:func:`skimage.restoration.calibrate_denoiser`), so no ground truth is needed. See
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


def calibrate(
    v: np.ndarray,
    method: str,
    noise_sd: float,
    channel_axis: int | None,
    slicewise_axis: int | None,
) -> tuple[float, float]:
    """Pick the Gaussian width or TV weight by J-invariant self-supervised loss.

    :func:`skimage.restoration.calibrate_denoiser`: each parameter's denoiser runs on the image
    with a grid of pixels replaced by an interpolation of their neighbours, and its output there
    is compared with their noisy values (with independent noise, the true squared error plus the
    noise variance).

    Parameters
    ----------
    v : numpy.ndarray
        The variance-stabilised image (file axis order, optional channel axis); a central
        crop of at most :data:`CALIBRATION_PIXELS` pixels is used.
    method : {"gaussian", "tv"}
    noise_sd : float
        Noise standard deviation in ``v`` (TV weights are multiples of it).

    Returns
    -------
    parameter : float
        Gaussian sigma in pixels, or TV weight in ``v``'s units.
    loss : float
        The self-supervised loss of that parameter.
    """
    from skimage.restoration import calibrate_denoiser

    crop = _central_crop(v, channel_axis, CALIBRATION_PIXELS)
    params = [g if method == "gaussian" else g * noise_sd for g in CALIBRATED[method]]

    def fn(image: np.ndarray, p: float) -> np.ndarray:
        return classical_denoise(image, method, p, channel_axis, slicewise_axis)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, (tested, losses) = calibrate_denoiser(crop, fn, {"p": params}, extra_output=True)
    k = int(np.argmin(losses))
    return float(tested[k]["p"]), float(losses[k])


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
    v = gat_forward(image, noise_model)
    sd = max(estimate_noise_sigma(v, channel_axis), 1e-6)
    info: dict = {"vst": noise_model.gain > 0, "noise_sd": round(sd, 4)}
    if method in CALIBRATED:
        p, loss = calibrate(v, method, sd, channel_axis, slicewise_axis)
        info.update(parameter=round(p, 4), calibration_loss=round(loss, 6))
    else:
        p = sd
        info["parameter"] = round(p, 4)
    out = classical_denoise(v, method, p, channel_axis, slicewise_axis)
    return gat_inverse(out, noise_model), info


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
