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

The units: :mod:`~napari_medseg.core.denoise.classical` (scikit-image filters, PSNR),
:mod:`~napari_medseg.core.denoise.n2v` (the network, its training and prediction),
:mod:`~napari_medseg.core.denoise.store` (a trained denoiser is a model folder, ``model.json``
with ``task="denoising"`` + ``weights.safetensors``, written by ``save_denoiser`` and read by
``load_denoiser``, reusable on other images of the same kind: ``denoise(record, model=folder)``);
this module drives them.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_medseg.core.denoise.classical import (
    CLASSICAL_METHODS,
    classical_denoise,
    estimate_noise_sigma,
    restore_values,
)
from napari_medseg.core.denoise.n2v import (
    DEFAULT_TIME_BUDGET,
    MIN_SIZE,
    N2V_METHODS,
    TrainedDenoiser,
    predict_n2v,
    train_n2v,
)
from napari_medseg.core.denoise.store import load_denoiser
from napari_medseg.errors import MedsegError
from napari_medseg.progress import Progress

if TYPE_CHECKING:  # pragma: no cover
    from napari_medseg.io.record import ImageRecord

__all__ = [
    "CLASSICAL_METHODS",
    "DEFAULT_METHOD",
    "DEFAULT_TIME_BUDGET",
    "METHODS",
    "N2V_METHODS",
    "DenoiseResult",
    "denoise",
    "denoise_array",
]

METHODS = N2V_METHODS + CLASSICAL_METHODS
#: The method that measured best in benchmarks/bench_denoise.py (docs/denoising.md).
DEFAULT_METHOD = "n2v2"


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


# --------------------------------------------------------------------------- the network


# --------------------------------------------------------------------------- helpers


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


# --------------------------------------------------------------------------- blind-spot masking


# --------------------------------------------------------------------------- training


# --------------------------------------------------------------------------- prediction


# --------------------------------------------------------------------------- model folders


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
    out = classical_denoise(u, method, s, channel_axis, slice_axis)
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
            res = classical_denoise(u, method, s, cax, slice_axis) * scale + lo
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
    result = restore_values(out, raw if raw.dtype.kind != "f" else data, lo, hi)
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
