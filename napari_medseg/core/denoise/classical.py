"""Classical denoisers (scikit-image non-local means, TV, bilateral, wavelet) and PSNR.

See :mod:`napari_medseg.core.denoise.denoising` for the methods, axes and value rules.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_medseg.errors import MedsegError

if TYPE_CHECKING:  # pragma: no cover
    pass

CLASSICAL_METHODS = ("nlmeans", "tv", "bilateral", "wavelet")


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
    raise MedsegError(
        f"unknown denoising method {method!r}; choose one of {', '.join(CLASSICAL_METHODS)}"
    )


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
