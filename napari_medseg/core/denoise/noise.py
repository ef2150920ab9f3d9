"""A Poisson-Gaussian noise model estimated from one image, and its variance-stabilising transform.

Camera noise in fluorescence microscopy (and, approximately, in low-dose CT/MR magnitude images
away from zero) is signal-dependent: a pixel with expected value ``mu`` has variance
``gain * mu + floor`` (photon shot noise scaled by the camera gain, plus read noise; ``floor``
absorbs the camera offset). A denoiser built for constant-variance noise over-smooths the dark
parts and under-smooths the bright ones. The generalised Anscombe transform (GAT) maps such an
image to one whose noise has unit variance everywhere; any denoiser then works in that space,
and the *exact unbiased inverse* (Makitalo & Foi, IEEE TIP 2013; its closed-form
approximation) maps the result back without the bias a plain algebraic inverse leaves in dark
regions.

Estimation (:func:`estimate_noise_model`) follows the single-image approach of Foi et al.
(IEEE TIP 2008) in a simple robust form: a high-pass residual (a normalised Laplacian, unit gain
on independent noise) is measured in smooth regions, binned by the local mean, the noise
variance in each bin is a trimmed second moment of the residual, and a weighted robust line
``var = gain * mean + floor`` is fitted through the bins. When the user marks a region without
signal (background), its mean and variance fix the offset and read noise and only the gain is
fitted. The residuals' lag-1 correlation along each axis is measured too: camera noise that is
correlated between neighbouring pixels (demosaicing, binning, interpolation) breaks the
blind-spot assumption of Noise2Void, and the denoiser widens its blind spot along those axes.

Axis order: any (the functions treat all axes of the array alike); intensities in the image's
own units.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import ndimage as ndi

from napari_medseg.errors import MedsegError

__all__ = [
    "NoiseModel",
    "estimate_noise_model",
    "gat_forward",
    "gat_inverse",
]

#: Bins of the local mean used in the variance-versus-mean fit.
N_BINS = 24
#: Mean of the smallest 98% of squared standard normal samples (trimmed-variance correction).
TRIM_GAUSSIAN = 0.8735
#: Lag-1 residual correlation above which an axis counts as correlated.
CORRELATED = 0.2


@dataclass
class NoiseModel:
    """Signal-dependent noise ``variance = gain * mean + floor`` in the image's units.

    Attributes
    ----------
    gain : float
        Variance added per unit of signal (camera gain; 0 for pure Gaussian noise).
    floor : float
        Variance at signal 0 (read noise variance minus ``gain`` times the camera offset; may
        be negative when the offset is large).
    offset : float or None
        The camera offset (mean of the user's background region), when one was given.
    read_noise : float or None
        Standard deviation in the background region, when one was given.
    correlation : list of float
        Lag-1 correlation of the noise along each axis (0 for independent pixels).
    source : str
        ``"image"`` (estimated from the whole image) or ``"background region"``.
    bins : list of [mean, variance, count]
        The measured points the line was fitted to (for plots and checks).
    """

    gain: float
    floor: float
    offset: float | None = None
    read_noise: float | None = None
    correlation: list[float] = field(default_factory=list)
    source: str = "image"
    bins: list[list[float]] = field(default_factory=list)

    def variance(self, mean: np.ndarray | float) -> np.ndarray | float:
        """Noise variance at the given expected intensity (clipped at a small positive value)."""
        v = self.gain * np.asarray(mean, dtype=np.float64) + self.floor
        return np.maximum(v, self.min_variance)

    @property
    def min_variance(self) -> float:
        """A positive floor for the variance (1e-6 of the largest binned variance)."""
        top = max((b[1] for b in self.bins), default=1.0)
        return max(1e-6 * top, 1e-12)

    @property
    def signal_dependent(self) -> bool:
        """True when shot noise matters: the variance grows by >= 50% across the bins."""
        if self.gain <= 0 or not self.bins:
            return False
        lo = min(b[0] for b in self.bins)
        hi = max(b[0] for b in self.bins)
        v_lo = float(self.variance(lo))
        return self.gain * (hi - lo) >= 0.5 * v_lo

    def correlated_axes(self) -> list[int]:
        """Axes whose lag-1 noise correlation is at least :data:`CORRELATED`."""
        return [i for i, c in enumerate(self.correlation) if c >= CORRELATED]

    def summary(self) -> str:
        """One line for users: gain, read noise or floor, correlation."""
        parts = [f"gain {self.gain:.3g}"]
        if self.read_noise is not None:
            parts.append(f"read noise {self.read_noise:.3g} (offset {self.offset:.4g})")
        else:
            parts.append(f"variance at 0: {self.floor:.3g}")
        if self.correlation:
            parts.append("correlation " + "/".join(f"{c:.2f}" for c in self.correlation))
        return ", ".join(parts)

    def to_dict(self) -> dict:
        """JSON-ready dict (provenance)."""
        d = asdict(self)
        d["bins"] = [[round(x, 6) for x in b] for b in self.bins]
        return d


def _residual(a: np.ndarray) -> np.ndarray:
    """High-pass residual with unit noise gain: a normalised discrete Laplacian."""
    n = a.ndim
    k = np.zeros((3,) * n, dtype=np.float64)
    c = (1,) * n
    k[c] = 2.0 * n
    for ax in range(n):
        for d in (0, 2):
            idx = list(c)
            idx[ax] = d
            k[tuple(idx)] = -1.0
    k /= np.sqrt((k**2).sum())
    return ndi.convolve(a, k, mode="reflect")


def _lag1_correlation(noise: np.ndarray, mask: np.ndarray) -> list[float]:
    """Lag-1 correlation of a zero-mean noise estimate along each axis, inside ``mask``."""
    out = []
    for ax in range(noise.ndim):
        n = noise.shape[ax]
        if n < 3:
            out.append(0.0)
            continue
        a = np.take(noise, range(n - 1), axis=ax)
        b = np.take(noise, range(1, n), axis=ax)
        m = np.take(mask, range(n - 1), axis=ax) & np.take(mask, range(1, n), axis=ax)
        if m.sum() < 50:
            out.append(0.0)
            continue
        a, b = a[m], b[m]
        den = float(np.sqrt(np.mean(a * a) * np.mean(b * b)))
        out.append(round(float(np.mean(a * b) / den), 4) if den > 0 else 0.0)
    return out


@functools.lru_cache(maxsize=2)
def _white_noise_correlation(ndim: int) -> tuple[float, ...]:
    """Lag-1 correlation per axis of the noise estimate (minus a sigma-2 Gaussian) of white
    noise: what independent pixels read, measured once per dimensionality on 512x512 (2D) or
    96^3 (3D) samples (seed 0), not on every image."""
    shape = (512, 512) if ndim == 2 else (96,) * ndim
    white = np.random.default_rng(0).standard_normal(shape)
    white -= ndi.gaussian_filter(white, 2.0)
    return tuple(_lag1_correlation(white, np.ones(shape, dtype=bool)))


def _smooth_mask(mean: np.ndarray, fraction: float = 0.5) -> np.ndarray:
    """Pixels whose local gradient is in the lowest ``fraction`` (flat regions)."""
    grads = np.gradient(mean)
    g = np.sqrt(sum(x * x for x in grads))
    return g <= np.quantile(g, fraction)


def _bin_variances(mean: np.ndarray, resid: np.ndarray, mask: np.ndarray) -> list[list[float]]:
    m, r = mean[mask], resid[mask]
    if m.size < 200:
        raise MedsegError("the image is too small to estimate its noise (fewer than 200 pixels)")
    edges = np.unique(np.quantile(m, np.linspace(0, 1, N_BINS + 1)))
    bins = []
    idx = np.clip(np.searchsorted(edges, m, side="right") - 1, 0, len(edges) - 2)
    for b in range(len(edges) - 1):
        sel = idx == b
        if sel.sum() < 30:
            continue
        # trimmed second moment (the top 2% of squares dropped, rescaled for a Gaussian): robust
        # to edges and hot pixels like a MAD, but not fooled by quantised values (a MAD of
        # integer data with variance ~1 is often 0)
        r2 = np.sort(r[sel] ** 2)
        keep = r2[: max(1, int(0.98 * r2.size))]
        bins.append([float(m[sel].mean()), float(keep.mean()) / TRIM_GAUSSIAN, float(sel.sum())])
    return bins


def _fit_line(bins: list[list[float]], fixed: tuple[float, float] | None) -> tuple[float, float]:
    """Weighted robust fit of ``var = gain * mean + floor`` (or through a fixed point)."""
    x = np.array([b[0] for b in bins])
    y = np.array([b[1] for b in bins])
    w = np.sqrt(np.array([b[2] for b in bins]))
    if fixed is not None:
        x0, y0 = fixed
        dx, dy = x - x0, y - y0
        gain = float(np.sum(w * dx * dy) / max(np.sum(w * dx * dx), 1e-12))
        gain = max(gain, 0.0)
        return gain, y0 - gain * x0
    if len(x) < 2 or np.ptp(x) <= 0:
        return 0.0, float(np.median(y))
    for _ in range(5):  # iteratively reweighted: bins far off the line (edges, clipping) count less
        A = np.stack([x, np.ones_like(x)], axis=1) * w[:, None]
        (gain, floor), *_ = np.linalg.lstsq(A, y * w, rcond=None)
        res = np.abs(y - (gain * x + floor))
        s = 1.4826 * np.median(res) + 1e-12
        w = np.sqrt(np.array([b[2] for b in bins])) / (1.0 + (res / (2.0 * s)) ** 2)
    if gain < 0:  # noise that shrinks with signal is not shot noise: constant variance
        return 0.0, float(np.average(y, weights=np.array([b[2] for b in bins])))
    return float(gain), float(floor)


def _measure(a: np.ndarray, lo: float, hi: float) -> tuple[np.ndarray, ...]:
    """Local mean, residual, usable-pixel mask and a noise estimate of one 2D/3D block."""
    resid = _residual(a)
    mean = ndi.uniform_filter(a, size=5, mode="reflect")
    flat = _smooth_mask(mean)
    # pixels next to the clipping limits carry no variance information
    unclipped = (ndi.minimum_filter(a, size=3) > lo) & (ndi.maximum_filter(a, size=3) < hi)
    mask = flat & unclipped
    if mask.sum() < 0.05 * mask.size:
        mask = flat
    noise = a - ndi.gaussian_filter(a, 2.0)
    return mean, resid, mask, noise


def estimate_noise_model(
    image: np.ndarray,
    background: np.ndarray | None = None,
    *,
    slice_axis: int | None = None,
) -> NoiseModel:
    """Estimate ``variance = gain * mean + floor`` (and noise correlation) from one image.

    Parameters
    ----------
    image : numpy.ndarray
        One 2D or 3D image (no channel or frame axis), any intensity units; finite values.
    background : numpy.ndarray of bool, optional
        Same shape: pixels without signal (the user's region). Their mean is the camera offset
        and their standard deviation the read noise; only the gain is fitted then.
    slice_axis : int, optional
        For thick-sliced volumes: measure in 2D slices across this axis (and pool them), so
        that the residuals do not mix unrelated slices. ``correlation`` then lists the
        in-plane axes only (in their order in ``image``).

    Returns
    -------
    NoiseModel
    """
    a = np.asarray(image, dtype=np.float64)
    if a.ndim not in (2, 3):
        raise MedsegError(f"noise estimation needs one 2D or 3D image, not shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise MedsegError("noise estimation needs finite values (the image has NaN or Inf)")
    if min(a.shape) < 3 and slice_axis is None:
        slice_axis = int(np.argmin(a.shape)) if a.ndim == 3 else None
    lo, hi = float(a.min()), float(a.max())
    blocks = [a] if slice_axis is None or a.ndim == 2 else list(np.moveaxis(a, slice_axis, 0))
    means, resids, masks, corrs = [], [], [], []
    for b in blocks:
        if min(b.shape) < 3:
            continue
        m, r, k, n = _measure(b, lo, hi)
        means.append(m.ravel())
        resids.append(r.ravel())
        masks.append(k.ravel())
        c = _lag1_correlation(n, k)
        corrs.append((c, int(k.sum())))
    if not means:
        raise MedsegError(f"the image (shape {a.shape}) is too small to estimate its noise")
    mean, resid, mask = np.concatenate(means), np.concatenate(resids), np.concatenate(masks)
    if mask.sum() < 200:
        mask = np.ones_like(mask)
    bins = _bin_variances(mean, resid, mask)
    fixed = None
    offset = read = None
    source = "image"
    if background is not None:
        bg = np.asarray(background, dtype=bool)
        if bg.shape != a.shape:
            raise MedsegError(f"the background region has shape {bg.shape}, the image {a.shape}")
        if bg.sum() < 30:
            raise MedsegError(
                "the background region has fewer than 30 pixels; draw a larger region "
                "without signal"
            )
        offset = float(a[bg].mean())
        read = float(a[bg].std())
        fixed = (offset, read * read)
        source = "background region"
    gain, floor = _fit_line(bins, fixed)
    w = np.array([n for _, n in corrs], dtype=np.float64)
    corr = list(np.average(np.array([c for c, _ in corrs]), axis=0, weights=w + 1e-9))
    # the residual of a sigma-2 Gaussian is itself correlated (negatively) for white noise:
    # rescale so that white noise reads 0 and a copy of the neighbour reads 1
    base = _white_noise_correlation(len(corr))
    corr = [round(max(c - b, 0.0) / max(1.0 - b, 1e-6), 4) for c, b in zip(corr, base)]
    return NoiseModel(
        gain=gain,
        floor=floor,
        offset=offset,
        read_noise=read,
        correlation=corr,
        source=source,
        bins=bins,
    )


def gat_forward(x: np.ndarray, model: NoiseModel) -> np.ndarray:
    """Generalised Anscombe transform: noise of ``model`` becomes unit-variance noise.

    With ``gain > 0``: ``2 / gain * sqrt(max(gain * x + 3/8 gain**2 + floor, 0))``; with
    ``gain == 0`` (Gaussian noise): ``x / sqrt(floor)``. float32 out, same shape.
    """
    x = np.asarray(x, dtype=np.float64)
    if model.gain <= 0:
        return (x / np.sqrt(max(model.floor, model.min_variance))).astype(np.float32)
    a = model.gain
    z = a * x + 0.375 * a * a + model.floor
    return (2.0 / a * np.sqrt(np.maximum(z, 0.0))).astype(np.float32)


def gat_inverse(d: np.ndarray, model: NoiseModel) -> np.ndarray:
    """Exact unbiased inverse of :func:`gat_forward` (closed-form approximation).

    Makitalo & Foi (2013): for the Anscombe transform of Poisson data the exact unbiased
    inverse is ``1/4 D^2 + 1/4 sqrt(3/2) D^-1 - 11/8 D^-2 + 5/8 sqrt(3/2) D^-3 - 1/8``; the
    Poisson-Gaussian case subtracts the normalised Gaussian variance. Values of ``D`` below 0.8
    (where the expansion diverges) use the algebraic inverse. float32 out.
    """
    d = np.asarray(d, dtype=np.float64)
    if model.gain <= 0:
        return (d * np.sqrt(max(model.floor, model.min_variance))).astype(np.float32)
    a = model.gain
    s2 = model.floor / (a * a)  # normalised Gaussian variance (may be negative: offset)
    dd = np.maximum(d, 0.8)
    c = np.sqrt(1.5)
    exact = 0.25 * dd**2 + 0.25 * c / dd - 1.375 / dd**2 + 0.625 * c / dd**3 - 0.125 - s2
    algebraic = 0.25 * d**2 - 0.375 - s2
    y = np.where(d >= 0.8, exact, algebraic)
    return (a * y).astype(np.float32)
