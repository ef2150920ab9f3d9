"""Denoising: self-supervised Noise2Void / N2V2 trained on the noisy image itself, and classical
filters from scikit-image (docs/ARCHITECTURE.md rule 2: long work is a generator).

Methods
-------
Every method first estimates the image's noise model (:mod:`~napari_medseg.core.denoise.noise`:
``variance = gain * signal + floor`` and the noise's lag-1 correlation, from the image alone or
with a ``background`` region without signal) and works in its variance-stabilised space
(generalised Anscombe transform; the exact unbiased inverse maps results back).

``"auto"`` (default)
    When the noise is independent between pixels: an N2V2 network trained on the stabilised
    image, predicted with test-time augmentation (8 rotations/flips), averaged with the mean of
    the self-calibrated Gaussian and TV filters. When the noise is correlated between
    neighbours (lag-1 correlation >= 0.2 along an axis: reconstructed MR, interpolated data),
    blind-spot networks learn to reproduce it, so ``auto`` uses the mean of the two filters
    alone and says why in the provenance. The choice and every number behind it are in
    docs/denoising.md.
``"n2v2"``, ``"n2v"``
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
    tiles). With signal-dependent noise the network sees the stabilised image
    (``noise_model="off"``: the raw one).
``"gaussian"``, ``"tv"``, ``"nlmeans"``, ``"bilateral"``, ``"wavelet"``
    :mod:`~napari_medseg.core.denoise.classical` in the stabilised space: the Gaussian width
    and TV weight are calibrated per image by J-invariant self-supervised loss; non-local means
    (``h = 0.8 sigma``), bilateral (``sigma_color = 2 sigma``, 2D slices) and wavelet
    (BayesShrink) use the stabilised image's noise sigma (median absolute deviation of the
    finest wavelet coefficients).

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
    denoise_classical,
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
from napari_medseg.core.denoise.noise import (
    NoiseModel,
    estimate_noise_model,
    gat_forward,
    gat_inverse,
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
    "noise_model_of",
]

METHODS = ("auto", *N2V_METHODS, *CLASSICAL_METHODS)
#: The method that measured best in benchmarks/bench_denoise.py (docs/denoising.md).
DEFAULT_METHOD = "auto"
#: Classical filters ``auto`` calibrates and averages.
AUTO_PARTNERS = ("gaussian", "tv")
#: Test-time augmentation is on by default up to this many voxels per frame.
TTA_MAX_PIXELS = 4_000_000


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


def noise_model_of(
    image: np.ndarray,
    channel_axis: int | None,
    slice_axis: int | None,
    background: np.ndarray | None = None,
) -> NoiseModel:
    """The noise model of one frame (file axis order, optional colour ``channel_axis``).

    Grey images: :func:`~napari_medseg.core.denoise.noise.estimate_noise_model` (Poisson-
    Gaussian). Colour images (RGB: camera processing mixes the channels): constant variance,
    the square of :func:`estimate_noise_sigma`.
    """
    a = np.asarray(image, dtype=np.float32)
    if channel_axis is not None:
        sd = max(estimate_noise_sigma(a, channel_axis), 1e-6)
        return NoiseModel(gain=0.0, floor=sd * sd, source="colour image: constant variance")
    try:
        return estimate_noise_model(a, background, slice_axis=slice_axis)
    except MedsegError:
        if background is not None:
            raise
        sd = max(estimate_noise_sigma(a), 1e-6)  # too small for the fit: constant variance
        return NoiseModel(gain=0.0, floor=sd * sd, source="image too small: constant variance")


def denoise_array(
    image: np.ndarray,
    method: str,
    *,
    spacing: Sequence[float] | None = None,
    channel_axis: int | None = None,
    background: np.ndarray | None = None,
) -> np.ndarray:
    """A classical method on one finite float image (no generator; these take seconds).

    Parameters
    ----------
    image : numpy.ndarray
        2D or 3D (file axis order) plus ``channel_axis``; any intensity units.
    method : {"gaussian", "tv", "nlmeans", "bilateral", "wavelet"}
    spacing : sequence of float, optional
        Voxel size per spatial axis: thick-sliced volumes are filtered slice by slice.
    background : numpy.ndarray of bool, optional
        Region without signal for the noise model (module docstring).

    Returns
    -------
    numpy.ndarray
        float32, same shape.
    """
    a = np.asarray(image, dtype=np.float32)
    nsp = a.ndim - (1 if channel_axis is not None else 0)
    slice_axis = None
    if nsp == 3:
        _, slice_axis = _plan_dims(
            a.shape[:3] if channel_axis != 0 else a.shape[1:], spacing or (1.0, 1.0, 1.0)
        )
    nm = noise_model_of(a, channel_axis, slice_axis, background)
    out, _ = denoise_classical(a, method, nm, channel_axis=channel_axis, slicewise_axis=slice_axis)
    return out


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
    background: np.ndarray | None = None,
    noise_model: str = "auto",
    tta: bool | None = None,
    precision: str = "auto",
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
    background : numpy.ndarray of bool, optional
        Spatial mask (the record's spatial shape) of a region without signal: fixes the camera
        offset and read noise of the noise model (module docstring).
    noise_model : {"auto", "off"}
        ``"off"``: networks train on the raw intensities even when the noise is
        signal-dependent (classical filters always use the model; with constant-variance noise
        it is a plain scaling).
    tta : bool, optional
        Average the network's predictions over rotations/flips (default: on for images of at
        most :data:`TTA_MAX_PIXELS` voxels per frame).
    precision : {"auto", "fp32", "bf16", "fp16"}
        The network's precision when predicting (:func:`predict_n2v`); the provenance records
        what ran (``network.fast_path``).
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
    slice_plan = _plan_dims(spatial, spacing)[1] if nsp == 3 else None

    def put(i: int, res: np.ndarray) -> None:
        if frame_axis is None:
            out[...] = res
        else:
            idx = [slice(None)] * data.ndim
            idx[frame_axis] = i
            out[tuple(idx)] = res

    bg = None if background is None else np.asarray(background, dtype=bool)
    yield Progress(0, 1, "estimating the noise model")
    models = [noise_model_of(frame(i), cax, slice_plan, bg) for i in frames]
    nm0 = models[0]
    prov["noise_model"] = nm0.to_dict()
    prov["noise_model_summary"] = nm0.summary()
    # noise standard deviation at the median intensity, in the image's units
    prov["noise_sigma"] = float(np.sqrt(nm0.variance(float(np.median(frame(frames[0]))))))
    if method == "auto" and not reuse:
        corr = nm0.correlated_axes()
        if corr or min(s for k, s in enumerate(spatial) if k != slice_plan) < MIN_SIZE * 4:
            why = (
                f"the noise is correlated between neighbouring pixels along axes {corr} "
                f"(lag-1 correlation {', '.join(f'{c:.2f}' for c in nm0.correlation)}), which "
                "blind-spot networks learn to copy"
                if corr
                else "the image is too small to train a network on"
            )
            prov["auto"] = {"network": False, "reason": why}
            notes.append(f"auto: classical filter only: {why}")
        else:
            prov["auto"] = {
                "network": True,
                "blend": "mean of n2v2 and the classical mean (calibrated gaussian and tv)",
            }
    use_net = method in N2V_METHODS or (
        method == "auto" and (reuse or prov.get("auto", {}).get("network", False))
    )
    partners: list[dict] = []
    need_classical = method in CLASSICAL_METHODS or (method == "auto" and not reuse)
    if reuse and (model.training or {}).get("blend_with_classical"):
        need_classical = True
    if need_classical:
        cands = (method,) if method in CLASSICAL_METHODS else AUTO_PARTNERS
        for k, i in enumerate(frames):
            yield Progress(
                k,
                len(frames),
                f"{'classical' if method == 'auto' else method}: frame {k + 1}/{len(frames)}"
                if frame_axis is not None
                else f"{method}: calibrating and filtering",
            )
            results = []
            for c in cands:
                res, info = denoise_classical(
                    frame(i), c, models[k], channel_axis=cax, slicewise_axis=slice_plan
                )
                info["method"] = c
                results.append((res, info))
            # auto: the mean of the calibrated Gaussian and TV results (never the worse of
            # the two on the benchmark cases, within 0.25 dB of the better)
            merged = results[0][0] if len(results) == 1 else np.mean([r for r, _ in results], 0)
            partners.append(
                results[0][1] if len(results) == 1 else {"mean of": [x for _, x in results]}
            )
            put(i, merged)
        prov["classical"] = partners[0] if len(partners) == 1 else partners[:3]
        yield Progress(len(frames), len(frames), "classical filter done")
    if use_net:
        if reuse:
            ndims, slice_axis = model.dims, None
            if nsp == 3 and ndims == 2:
                slice_axis = slice_plan
                if slice_axis is None:
                    slice_axis = int(np.argmin(spatial))
            vst = bool((model.training or {}).get("vst", False))
        else:
            ndims, slice_axis = _plan_dims(spatial, spacing) if nsp == 3 else (2, None)
            if dims == 2 and nsp == 3 and slice_axis is None:
                ndims, slice_axis = 2, int(np.argmin(spatial))
            elif dims == 3 and nsp == 3:
                ndims, slice_axis = 3, None
            elif dims == 3 and nsp == 2:
                raise MedsegError("a 3D denoiser needs a volume; this image is 2D")
            vst = nm0.signal_dependent and noise_model != "off"
        _check_size(spatial, slice_axis, record.name)

        def net_input(k: int, i: int) -> np.ndarray:
            f = frame(i)
            return gat_forward(f, models[k]) if vst else f

        if not reuse:
            imgs = [net_input(k, i) for k, i in enumerate(frames)]
            for extra in train_on:
                e = np.asarray(extra.data, dtype=np.float32)
                if e.shape[:nsp] and extra.spatial_ndim != nsp:
                    raise MedsegError(
                        f"the training image {extra.name!r} is {extra.spatial_ndim}D, "
                        f"not {nsp}D like {record.name!r}"
                    )
                e[~np.isfinite(e)] = 0.0
                if vst:
                    e = gat_forward(e, noise_model_of(e, cax, slice_plan, None))
                imgs.append(e)
            trained = yield from train_n2v(
                imgs,
                variant="n2v2" if method == "auto" else method,
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
            trained.training["vst"] = vst
            trained.training["blend_with_classical"] = method == "auto"
            losses = list(trained.losses)
            model = trained
        else:
            trained = model
        blend = bool((model.training or {}).get("blend_with_classical")) and bool(partners)
        spatial_n = int(np.prod(spatial))
        use_tta = bool(tta) if tta is not None else spatial_n <= TTA_MAX_PIXELS
        fast_report: dict = {}
        for k, i in enumerate(frames):
            res = yield from predict_n2v(
                model,
                net_input(k, i),
                slice_axis=slice_axis,
                channel_axis=cax,
                device=device,
                tta=use_tta,
                precision=precision,
                report=fast_report,
            )
            if blend:  # mean of the network and the classical result, in the stabilised space
                cl = np.take(out, i, axis=frame_axis) if frame_axis is not None else out
                cl = gat_forward(cl, models[k]) if vst else cl
                res = 0.5 * (res + cl)
            put(i, gat_inverse(res, models[k]) if vst else res)
            if frame_axis is not None:
                yield Progress(k + 1, len(frames), f"denoised frame {k + 1}/{len(frames)}")
        prov["network"] = {
            "dims": model.dims,
            "slice_axis": slice_axis,
            "variant": model.variant,
            "reused": reuse,
            "vst": vst,
            "tta": use_tta,
            "blend_with_classical": blend,
            "fast_path": fast_report,
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
