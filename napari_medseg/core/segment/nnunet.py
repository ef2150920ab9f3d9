"""Inference with nnU-Net v2 model folders, as ``nnUNetPredictor`` does it (a progress generator).

The steps and their nnunetv2 counterparts (v2.8; ``preprocessing/``, ``inference/``):

1. **Axes.** nnU-Net reads an image as SimpleITK does: a ``(c, z, y, x)`` array, the reverse of
   the file's ``(i, j, k)`` voxel axes, with the spacing reversed too; ``NibabelIOWithReorient``
   reorients to RAS first. Then ``transpose_forward`` from the plans.
2. **Crop to nonzero** (``crop_to_nonzero``): the bounding box of the voxels that are nonzero in
   any channel, holes filled (``binary_fill_holes``; here as the complement of the zero region
   connected to the border, the same set, computed faster).
3. **Normalise** per channel (``CTNormalization``: clip to the fingerprint's 0.5/99.5
   percentiles, minus its mean, over its std; ``ZScoreNormalization``: the image's own mean and
   std, inside the nonzero mask when ``use_mask_for_norm``; ``RescaleTo01Normalization``,
   ``RGBTo01Normalization``, ``NoNormalization``), in float32.
4. **Resample** to the target spacing (``resample_data_or_seg_to_shape``): new shape
   ``round(old spacing / new spacing * shape)``; spline order 3 (``skimage.transform.resize``,
   edge mode, no anti-aliasing, output clipped to the input range); when the spacing is
   anisotropic (ratio > 3) the low-resolution axis is resampled separately, slice by slice in
   plane then nearest neighbour along it.
5. **Sliding window** (``predict_sliding_window_return_logits``): pad to the patch size,
   nnU-Net's window placement (step 0.5 of the patch), nnU-Net's Gaussian (sigma 1/8 of the
   patch, centred at ``patch // 2``, zeros raised to the smallest nonzero weight, rounded to
   float16 as nnU-Net keeps it), **logits** blended (not probabilities), mirroring over every
   non-empty subset of the trainer's ``inference_allowed_mirroring_axes`` averaged with the
   plain prediction, folds averaged. This runs through the engine's
   :func:`~napari_medseg.core.engine.windows.sliding_window` (``layout="nnunet"``), which
   batches windows and accumulates in float32 (nnU-Net: one window at a time, float16
   accumulators on the CPU).
6. **Back** (``convert_predicted_logits_to_segmentation_with_correct_shape``): logits resampled
   to the cropped grid with order 1 (separate-z rule again, nearest along the low-resolution
   axis), argmax (or, for region-based models, ``sigmoid > 0.5`` painted in
   ``regions_class_order``), put back into the uncropped image (background outside the box),
   ``transpose_backward``, and back to the file's axis order: the labels lie voxel for voxel on
   the input with its affine.

Where this is faster than nnUNetPredictor: float32 instead of float64 resampling, the logits
resampled one class at a time with torch (multi-threaded) while keeping a running argmax, instead
of all classes in float64 with scikit-image; windows batched. The results agree with
``nnUNetPredictor``'s (tests/models/test_nnunet_fidelity.py, benchmarks/bench_nnunet.py).
"""

from __future__ import annotations

import datetime as _dt
import time
from collections.abc import Generator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_medseg.errors import MedsegError
from napari_medseg.progress import Progress

if TYPE_CHECKING:  # pragma: no cover
    from napari_medseg.io.record import ImageRecord
    from napari_medseg.models.networks import LoadedModel

__all__ = [
    "crop_to_nonzero",
    "from_nnunet_axes",
    "logits_resampler",
    "nnunet_gaussian",
    "normalize",
    "resample_to_shape",
    "segment_nnunet",
    "separate_z_axis",
    "to_nnunet_axes",
]

ANISO_THRESHOLD = 3.0


# --------------------------------------------------------------------------------- axes


def _reorient(record: ImageRecord) -> tuple[np.ndarray, Any]:
    """(data reoriented to RAS, orientation to undo it) for ``NibabelIOWithReorient``."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(record.affine)
    data = np.asarray(record.data)
    spatial = nib.orientations.apply_orientation(data, ornt)
    return spatial, ornt


def to_nnunet_axes(record: ImageRecord, reader: str = "SimpleITKIO") -> tuple[np.ndarray, list]:
    """The image as nnU-Net's reader gives it: float32 ``(c, z, y, x)`` and its spacing.

    Parameters
    ----------
    record : ImageRecord
        3D volume (``(i, j, k)`` or ``(i, j, k, c)``) or 2D image (``(row, col[, c])``).
    reader : str
        The plans' ``image_reader_writer``.

    Returns
    -------
    data : numpy.ndarray
        ``(C, *spatial)`` float32 in nnU-Net's axis order (2D images: ``(C, 1, row, col)``).
    spacing : list of float
        Spacing per axis of ``data`` (mm; 2D images ``[999, 1, 1]`` as NaturalImage2DIO).
    """
    nsp = record.spatial_ndim
    if nsp == 2:
        arr = np.asarray(record.data, dtype=np.float32)
        arr = arr[..., None] if arr.ndim == 2 else arr.reshape(*arr.shape[:2], -1)
        return np.ascontiguousarray(np.moveaxis(arr, -1, 0)[:, None]), [999.0, 1.0, 1.0]
    spacing = [float(s) for s in record.spacing]
    if reader == "NibabelIOWithReorient":
        arr, ornt = _reorient(record)
        # reoriented axis d is the file's axis i with ornt[i, 0] == d
        spacing = [spacing[int(np.flatnonzero(ornt[:, 0] == d)[0])] for d in range(3)]
    else:
        arr = np.asarray(record.data)
    arr = arr.reshape(*arr.shape[:3], -1).astype(np.float32, copy=False)
    data = np.ascontiguousarray(arr.transpose(3, 2, 1, 0))
    return data, spacing[::-1]


def from_nnunet_axes(labels: np.ndarray, record: ImageRecord, reader: str) -> np.ndarray:
    """Inverse of :func:`to_nnunet_axes` for a label map (no channel axis)."""
    if record.spatial_ndim == 2:
        return np.ascontiguousarray(labels[0])
    out = labels.transpose(2, 1, 0)
    if reader == "NibabelIOWithReorient":
        import nibabel as nib

        ornt = nib.orientations.io_orientation(record.affine)
        out = out.transpose([int(d) for d in ornt[:, 0]])  # file axis i <- RAS axis ornt[i, 0]
        flips = tuple(i for i in range(3) if ornt[i, 1] < 0)
        if flips:
            out = np.flip(out, flips)
    return np.ascontiguousarray(out)


# --------------------------------------------------------------------------------- crop


def crop_to_nonzero(data: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[list[int]]]:
    """nnU-Net's ``crop_to_nonzero`` without a segmentation.

    Parameters
    ----------
    data : numpy.ndarray
        ``(C, *spatial)``.

    Returns
    -------
    cropped : numpy.ndarray
        ``data`` inside the bounding box (a view).
    mask : numpy.ndarray
        bool, the hole-filled nonzero mask inside the box (nnU-Net's ``seg >= 0``).
    bbox : list of [start, stop]
        Per spatial axis.
    """
    from scipy import ndimage as ndi

    nonzero = np.any(data != 0, axis=0)
    if nonzero.all():
        bbox = [[0, s] for s in nonzero.shape]
        return data, nonzero, bbox
    # binary_fill_holes == not (zero region face-connected to the border)
    zero = ~nonzero
    lab, _ = ndi.label(zero)
    border = np.zeros_like(zero)
    for ax in range(zero.ndim):
        idx = [slice(None)] * zero.ndim
        idx[ax] = 0
        border[tuple(idx)] = True
        idx[ax] = -1
        border[tuple(idx)] = True
    outside_ids = np.unique(lab[border & zero])
    outside = np.isin(lab, outside_ids[outside_ids > 0])
    filled = ~outside
    if not filled.any():
        bbox = [[0, s] for s in filled.shape]
    else:
        bbox = []
        for ax in range(filled.ndim):
            other = tuple(a for a in range(filled.ndim) if a != ax)
            hit = np.flatnonzero(filled.any(axis=other))
            bbox.append([int(hit[0]), int(hit[-1]) + 1])
    sl = tuple(slice(a, b) for a, b in bbox)
    return data[(slice(None), *sl)], filled[sl], bbox


# --------------------------------------------------------------------------------- normalise


def normalize(data: np.ndarray, mask: np.ndarray, plan: Any) -> np.ndarray:
    """Per-channel normalisation of nnU-Net (in place on a float32 copy; returns it).

    Parameters
    ----------
    data : numpy.ndarray
        ``(C, *spatial)`` float32, cropped.
    mask : numpy.ndarray
        bool nonzero mask (for ``use_mask_for_norm``).
    plan : NnunetPlan
        Normalisation schemes, masks, intensity properties.
    """
    out = np.array(data, dtype=np.float32, copy=True)
    for c, scheme in enumerate(plan.normalization_schemes):
        img = out[c]
        if scheme == "CTNormalization":
            props = plan.intensity_properties.get(str(c))
            if not props:
                raise MedsegError(
                    f"the nnU-Net plans lack the intensity properties of channel {c} "
                    "(CTNormalization needs them)"
                )
            np.clip(img, props["percentile_00_5"], props["percentile_99_5"], out=img)
            img -= props["mean"]
            img /= max(props["std"], 1e-8)
        elif scheme == "ZScoreNormalization":
            if plan.use_mask_for_norm[c]:
                vals = img[mask]
                mean, std = vals.mean(), vals.std()
                img[mask] = (vals - mean) / max(std, 1e-8)
            else:
                mean, std = img.mean(), img.std()
                img -= mean
                img /= max(std, 1e-8)
        elif scheme == "RescaleTo01Normalization":
            img -= img.min()
            img /= np.clip(img.max(), a_min=1e-8, a_max=None)
        elif scheme == "RGBTo01Normalization":
            if img.min() < 0 or img.max() > 255:
                raise MedsegError(
                    "the model expects RGB values in 0..255 (RGBTo01Normalization) but the "
                    f"image's channel {c} holds {img.min():g}..{img.max():g}"
                )
            img /= 255.0
        elif scheme != "NoNormalization":
            raise MedsegError(f"nnU-Net normalisation {scheme!r} is not supported")
    return out


# --------------------------------------------------------------------------------- resample


def compute_new_shape(shape: Sequence[int], old: Sequence[float], new: Sequence[float]) -> list:
    """nnU-Net's ``compute_new_shape``: ``int(round(old / new * shape))`` per axis."""
    return [round(o / n * s) for o, n, s in zip(old, new, shape)]


def separate_z_axis(
    current: Sequence[float], new: Sequence[float], force: bool | None = None
) -> int | None:
    """nnU-Net's ``determine_do_sep_z_and_axis``: the axis resampled on its own, or None."""

    def lowres(sp: Sequence[float]) -> np.ndarray:
        sp = np.asarray(sp, dtype=float)
        return np.where(max(sp) / sp == 1)[0]

    def aniso(sp: Sequence[float]) -> bool:
        return bool(np.max(sp) / np.min(sp) > ANISO_THRESHOLD)

    if force is not None:
        axis = lowres(current) if force else None
    elif aniso(current):
        axis = lowres(current)
    elif aniso(new):
        axis = lowres(new)
    else:
        axis = None
    if axis is None or len(axis) != 1:
        return None
    return int(axis[0])


def _zoom(img: np.ndarray, shape: Sequence[int], order: int) -> np.ndarray:
    """``skimage.transform.resize(img, shape, order, mode="edge", anti_aliasing=False)`` for a
    float image, in float32 (scipy's spline zoom with ``grid_mode=True``, clipped to the input
    range as scikit-image clips)."""
    from scipy import ndimage as ndi

    if tuple(img.shape) == tuple(shape):
        return img.astype(np.float32, copy=False)
    factors = [1.0 / (s / t) for s, t in zip(img.shape, shape)]
    out = ndi.zoom(img, factors, order=order, mode="nearest", grid_mode=True, output=np.float32)
    if order != 0:
        np.clip(out, img.min(), img.max(), out=out)
    return out


def _along_axis_indices(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each output position along one axis, nearest neighbour as
    ``map_coordinates(order=0, mode="nearest")`` at nnU-Net's ``(k + 0.5) * s - 0.5``."""
    from scipy import ndimage as ndi

    coords = float(n_in) / n_out * (np.arange(n_out) + 0.5) - 0.5
    return ndi.map_coordinates(
        np.arange(n_in, dtype=np.float64), [coords], order=0, mode="nearest"
    ).astype(np.int64)


def _linear_along_axis(arr: np.ndarray, axis: int, n_out: int) -> np.ndarray:
    """Linear interpolation along one axis (order_z=1), nnU-Net's coordinates, edge clamped."""
    n_in = arr.shape[axis]
    coords = float(n_in) / n_out * (np.arange(n_out) + 0.5) - 0.5
    coords = np.clip(coords, 0, n_in - 1)
    lo = np.floor(coords).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    w = (coords - lo).astype(np.float32)
    shape = [1] * arr.ndim
    shape[axis] = n_out
    w = w.reshape(shape)
    return np.take(arr, lo, axis=axis) * (1 - w) + np.take(arr, hi, axis=axis) * w


def resample_to_shape(
    data: np.ndarray,
    new_shape: Sequence[int],
    current_spacing: Sequence[float],
    new_spacing: Sequence[float],
    order: int = 3,
    order_z: int = 0,
    force_separate_z: bool | None = None,
) -> np.ndarray:
    """nnU-Net's ``resample_data_or_seg_to_shape`` for images (``is_seg=False``), float32.

    Parameters
    ----------
    data : numpy.ndarray
        ``(C, *spatial)`` (3 spatial axes).
    new_shape : sequence of int
        Output spatial shape.
    current_spacing, new_spacing : sequence of float
        Decide whether an anisotropic axis is resampled separately (:func:`separate_z_axis`).
    order, order_z : int
        Spline order in plane (or everywhere) and along the separate axis (0 or 1).
    """
    new_shape = [int(s) for s in new_shape]
    if list(data.shape[1:]) == new_shape:
        return data
    axis = separate_z_axis(current_spacing, new_spacing, force_separate_z)
    out = np.zeros((data.shape[0], *new_shape), dtype=np.float32)
    for c in range(data.shape[0]):
        img = data[c]
        if axis is None:
            out[c] = _zoom(img, new_shape, order)
            continue
        plane = [s for a, s in enumerate(new_shape) if a != axis]
        tmp_shape = list(new_shape)
        tmp_shape[axis] = img.shape[axis]
        tmp = np.zeros(tmp_shape, dtype=np.float32)
        for k in range(img.shape[axis]):
            idx = [slice(None)] * 3
            idx[axis] = k
            tmp[tuple(idx)] = _zoom(img[tuple(idx)], plane, order)
        if img.shape[axis] != new_shape[axis]:
            if order_z == 0:
                src = _along_axis_indices(img.shape[axis], new_shape[axis])
                out[c] = np.take(tmp, src, axis=axis)
            else:
                out[c] = _linear_along_axis(tmp, axis, new_shape[axis])
        else:
            out[c] = tmp
    return out


def logits_resampler(
    src_shape: Sequence[int],
    dst_shape: Sequence[int],
    current_spacing: Sequence[float],
    new_spacing: Sequence[float],
    kw: dict,
    device: Any,
) -> Any:
    """A function mapping one class's logits ``(*src_shape)`` (torch) to ``(*dst_shape)`` as
    nnU-Net's ``resampling_fn_probabilities`` (order 1: linear, align_corners=False, which is
    scikit-image's order-1 resize; separate-z: bilinear in plane, nearest or linear along)."""

    src_shape, dst_shape = [int(s) for s in src_shape], [int(s) for s in dst_shape]
    if src_shape == dst_shape:
        return lambda x: x
    inner = _resampler(src_shape, dst_shape, current_spacing, new_spacing, kw, device)

    def rounded(x: Any) -> Any:
        # computed in float32, stored in the logits' dtype (nnU-Net: float64, stored as float16)
        return inner(x.float()).to(x.dtype)

    return rounded


def _resampler(
    src_shape: list[int],
    dst_shape: list[int],
    current_spacing: Sequence[float],
    new_spacing: Sequence[float],
    kw: dict,
    device: Any,
) -> Any:
    import torch
    import torch.nn.functional as F

    order, order_z = int(kw.get("order", 1)), int(kw.get("order_z", 0))
    if order not in (0, 1) or order_z not in (0, 1):
        raise MedsegError(
            f"nnU-Net probability resampling of order {order}/{order_z} is not supported "
            "(nnU-Net's default is 1 in plane, 0 along a separate axis)"
        )
    axis = separate_z_axis(current_spacing, new_spacing, kw.get("force_separate_z"))
    mode3, mode2 = ("trilinear", "bilinear") if order == 1 else ("nearest-exact", "nearest-exact")
    if axis is None:

        def full(x: Any) -> Any:
            y = F.interpolate(x[None, None], size=dst_shape, mode=mode3, **_ac(order))
            return y[0, 0]

        return full
    plane = [s for a, s in enumerate(dst_shape) if a != axis]
    if src_shape[axis] != dst_shape[axis]:
        if order_z == 0:
            idx = torch.as_tensor(
                _along_axis_indices(src_shape[axis], dst_shape[axis]), device=device
            )
        else:
            idx = None
    else:
        idx = None

    def sep(x: Any) -> Any:
        xm = x.movedim(axis, 0)[:, None]  # (n_axis, 1, a, b)
        y = F.interpolate(xm, size=plane, mode=mode2, **_ac(order))[:, 0]
        if src_shape[axis] != dst_shape[axis]:
            if idx is not None:
                y = y.index_select(0, idx)
            else:
                y = torch.from_numpy(_linear_along_axis(y.cpu().numpy(), 0, dst_shape[axis])).to(
                    y.device
                )
        return y.movedim(0, axis)

    return sep


def _ac(order: int) -> dict:
    return {"align_corners": False} if order == 1 else {}


# --------------------------------------------------------------------------------- gaussian


def nnunet_gaussian(patch_size: Sequence[int], sigma_scale: float = 1.0 / 8) -> np.ndarray:
    """nnU-Net's ``compute_gaussian``: a delta at ``patch // 2`` blurred with
    ``sigma = patch * sigma_scale`` (scipy, truncated at 4 sigma, constant border), scaled to a
    peak of 10, rounded to float16, zeros raised to the smallest nonzero value; float32."""
    from scipy.ndimage import gaussian_filter

    tmp = np.zeros(tuple(int(p) for p in patch_size))
    tmp[tuple(int(p) // 2 for p in patch_size)] = 1
    g = gaussian_filter(tmp, [p * sigma_scale for p in patch_size], 0, mode="constant", cval=0)
    g /= np.max(g) / 10.0
    import torch

    h = torch.from_numpy(g).to(torch.float16)  # torch's float64 -> float16 rounding, as nnU-Net
    zero = h == 0
    if bool(zero.any()):
        h[zero] = h[~zero].min()
    return h.float().numpy()


# --------------------------------------------------------------------------------- pipeline


def segment_nnunet(
    record: ImageRecord,
    model: LoadedModel,
    *,
    device: Any = "auto",
    mirror: bool = True,
    batch_size: int = 4,
    return_probabilities: bool = False,
    precision: str = "auto",
    fast_path: bool = True,
) -> Generator[Progress, None, dict]:
    """Segment one image with an nnU-Net v2 model as ``nnUNetPredictor`` does.

    :func:`napari_medseg.core.segment.segment.segment` calls this for nnU-Net models (after
    checking the channels) and wraps the result in a ``SegmentationResult``.

    Parameters
    ----------
    record : ImageRecord
        3D volume ``(i, j, k[, c])`` (one channel per model input channel; stack the files of a
        multi-channel case on the last axis) or a 2D image for 2D models.
    model : LoadedModel
        From :func:`napari_medseg.models.loaders.nnunet.load_nnunet` (``kind == "nnunet"``).
    device : str
        ``"auto"``, ``"cpu"``, ``"cuda"``, ``"mps"``.
    mirror : bool
        Mirroring test-time augmentation over the trainer's allowed axes (nnU-Net's default).
    batch_size : int
        Windows per forward pass.
    return_probabilities : bool
        Also return the class (or region) probabilities on the input grid, float32
        ``(K, *record.spatial_shape)`` (1 for background outside the nonzero box).
    precision : {"auto", "fp32", "bf16", "fp16"}
        Each fold's network goes through
        :func:`napari_medseg.core.engine.fastpath.prepare_network` (precision, BatchNorm
        folding, memory format, inference mode, threads; the labels guard falls back to fp32
        when a reduced precision changes them). On a GPU, ``"auto"`` keeps nnUNetPredictor's own
        float16 autocast instead.
    fast_path : bool
        ``False``: the network as loaded (the reference the fidelity tests compare with).

    Returns
    -------
    dict
        ``labels`` (on the input's own voxel grid, file axis order), ``affine`` (the input's),
        ``class_names``, ``class_colors``, ``provenance``, ``probabilities`` (or None): the
        fields of ``SegmentationResult``.
    """
    import torch

    from napari_medseg.core.correct.mask_store import software_versions
    from napari_medseg.core.engine.windows import resolve_device, slicewise, sliding_window
    from napari_medseg.models.loaders.nnunet import NnunetPlan

    t0 = time.perf_counter()
    card = model.card
    plan = NnunetPlan.from_dict(card.extra["nnunet"])
    ens = model.network
    dev = resolve_device(device)
    nsp = record.spatial_ndim
    if nsp == 2 and plan.dims == 3:
        raise MedsegError(
            f"model {card.name!r} is a 3D nnU-Net model and cannot run on the 2D image "
            f"{record.name!r}"
        )
    timings: dict[str, float] = {}
    yield Progress(0, 0, "preparing the image as nnU-Net does")
    t = time.perf_counter()
    data, spacing = to_nnunet_axes(record, plan.image_reader_writer)
    if not np.isfinite(data).all():
        raise MedsegError(
            f"the image {record.name!r} holds NaN or infinite values; nnU-Net cannot run on it"
        )
    tf = plan.transpose_forward
    data = np.ascontiguousarray(data.transpose([0, *[a + 1 for a in tf]]))
    spacing = [spacing[a] for a in tf]
    shape_before_crop = data.shape[1:]
    cropped, mask, bbox = crop_to_nonzero(data)
    del data
    shape_cropped = cropped.shape[1:]
    target = list(plan.spacing)
    if len(target) < 3:
        target = [spacing[0], *target]
    new_shape = compute_new_shape(shape_cropped, spacing, target)
    normed = normalize(cropped, mask, plan)
    del cropped, mask
    rd = plan.resampling_data
    image = resample_to_shape(
        normed, new_shape, spacing, target, rd["order"], rd["order_z"], rd["force_separate_z"]
    )
    del normed
    timings["preprocess_s"] = time.perf_counter() - t

    # --- network: logits blended over windows, mirrors and folds
    patch = [int(p) for p in plan.patch_size]
    weight = nnunet_gaussian(patch)
    net: Any = ens.network
    x = torch.from_numpy(image)
    if plan.dims == 2:  # slices along the first axis: put it last, window depth 1
        x = x.permute(0, 2, 3, 1)
        roi = [*patch, 1]
        weight = weight[..., None]
    else:
        roi = patch
    axes = plan.mirror_axes if mirror else None
    n_folds = len(plan.folds)
    from napari_medseg.core.engine.windows import plan_windows

    padded = [max(s, r) for s, r in zip(x.shape[1:], roi)]
    n_win = len(plan_windows(padded, roi, 0.5, "nnunet"))
    n_flip = 2 ** len(axes) if axes else 1
    total = n_folds * n_win * n_flip + 2
    yield Progress(
        1,
        total,
        f"running {card.name} on {dev.type}: {n_win} windows x {n_flip} "
        f"mirrors x {n_folds} fold(s)",
    )
    t = time.perf_counter()
    logits = None
    fast_info: dict | None = None
    for i in range(n_folds):
        ens.use_fold(i)
        ens.to(dev)
        ens.eval()
        amp: Any = False
        if dev.type == "cpu" or precision != "auto" or not fast_path:
            from napari_medseg.core.engine.fastpath import prepare_network

            fold_net, fast = prepare_network(
                ens.network, dev, precision, guard="labels", enabled=fast_path
            )
            if fast_info is None:
                fast_info = fast.as_dict()
        else:  # a GPU with "auto": nnUNetPredictor's own float16 autocast, as it runs there
            fold_net, amp = ens.network, "auto"
            if fast_info is None:
                fast_info = {
                    "device": dev.type,
                    "precision_requested": precision,
                    "precision": "fp16",
                    "note": "nnUNetPredictor's float16 autocast on the GPU",
                }
        predictor = slicewise(fold_net) if plan.dims == 2 else fold_net
        gen = sliding_window(
            x,
            predictor,
            roi,
            overlap=0.5,
            batch_size=batch_size,
            device=dev,
            amp=amp,  # a prepared network runs its own precision
            tta_flips=bool(axes),
            activation=None,
            layout="nnunet",
            weight_map=weight,
            flip_axes=axes,
            acc_dtype=torch.float16,  # nnU-Net's accumulators (and half the memory)
            out_dtype=torch.float16,
        )
        try:
            while True:
                try:
                    p = next(gen)
                except StopIteration as stop:
                    out = stop.value
                    break
                yield Progress(
                    1 + i * n_win * n_flip + p.done, total, f"fold {plan.folds[i]}: {p.message}"
                )
        finally:
            gen.close()
        logits = out if logits is None else logits.add_(out.to(logits.device))
    del x, net
    assert logits is not None
    if n_folds > 1:
        logits /= n_folds
    if plan.dims == 2:
        logits = logits.permute(0, 3, 1, 2)
    if logits.shape[0] != plan.num_heads:
        raise MedsegError(
            f"model {card.name!r} produced {logits.shape[0]} channels, its dataset.json "
            f"implies {plan.num_heads}"
        )
    timings["network_s"] = time.perf_counter() - t

    # --- back to the cropped grid, argmax, uncrop, axes back
    yield Progress(total - 1, total, "bringing the result back onto the image grid")
    t = time.perf_counter()
    cur = list(plan.spacing) if len(plan.spacing) == 3 else [spacing[0], *plan.spacing]
    resample = logits_resampler(
        logits.shape[1:],
        shape_cropped,
        cur,
        spacing,
        plan.resampling_probabilities,
        logits.device,
    )
    regions = plan.regions_class_order
    K = int(logits.shape[0])
    ids = list(regions) if regions is not None else list(range(K))
    ldt = np.uint8 if max(ids) < 255 else np.uint16
    probs_c = None
    if return_probabilities:
        res = torch.stack([resample(logits[k]).float() for k in range(K)])
        probs_c = torch.sigmoid(res) if regions is not None else torch.softmax(res, 0)
        del res
    if regions is not None:
        seg = torch.zeros(tuple(shape_cropped), dtype=torch.int16, device=logits.device)
        for k, c in enumerate(regions):
            r = probs_c[k] if probs_c is not None else torch.sigmoid(resample(logits[k]).float())
            seg[r > 0.5] = int(c)
    else:
        best = resample(logits[0]).clone()
        seg = torch.zeros(tuple(shape_cropped), dtype=torch.int16, device=logits.device)
        for k in range(1, K):
            r = resample(logits[k])
            better = r > best
            seg[better] = k
            torch.where(better, r, best, out=best)
        del best
    del logits
    labels = np.zeros(shape_before_crop, dtype=ldt)
    sl = tuple(slice(a, b) for a, b in bbox)
    labels[sl] = seg.cpu().numpy().astype(ldt)
    labels = labels.transpose(plan.transpose_backward)
    labels = from_nnunet_axes(labels, record, plan.image_reader_writer)
    probabilities = None
    if probs_c is not None:
        full = np.zeros((K, *shape_before_crop), dtype=np.float32)
        if regions is None:
            full[0] = 1.0
        full[(slice(None), *sl)] = probs_c.cpu().numpy()
        full = full.transpose([0, *[a + 1 for a in plan.transpose_backward]])
        probabilities = np.stack(
            [from_nnunet_axes(p, record, plan.image_reader_writer) for p in full]
        )
    timings["export_s"] = time.perf_counter() - t
    if labels.shape != tuple(record.spatial_shape):
        raise MedsegError(
            f"internal error: labels {labels.shape} do not match the image {record.spatial_shape}"
        )

    class_names = {int(c["id"]): c["name"] for c in card.classes}
    class_colors = card.class_colors
    elapsed = time.perf_counter() - t0
    provenance = {
        "task": "segmentation",
        "model": model.provenance(),
        "parameters": {
            "pipeline": "nnU-Net v2 (nnUNetPredictor reproduced)",
            "configuration": plan.configuration,
            "folds": list(plan.folds),
            "checkpoint": plan.checkpoint,
            "mirroring_axes": list(axes) if axes else None,
            "tile_step_size": 0.5,
            "blend": "nnU-Net gaussian (sigma 1/8), logits",
            "batch_size": batch_size,
            "target_spacing": [float(s) for s in target],
            "network_grid_shape": [int(s) for s in image.shape[1:]],
            "crop_bbox": bbox,
            "normalization": list(plan.normalization_schemes),
            "precision": (fast_info or {}).get("precision", "fp32"),
            "timings_s": {k: round(v, 3) for k, v in timings.items()},
        },
        "input": record.describe(),
        "fast_path": fast_info or {},
        "versions": software_versions(),
        "device": str(dev),
        "device_requested": str(device),
        "elapsed_s": round(elapsed, 3),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "notes": list((fast_info or {}).get("notes", [])),
    }
    yield Progress(total, total, f"done in {elapsed:.1f} s")
    return dict(
        labels=np.ascontiguousarray(labels),
        affine=np.asarray(record.affine),
        class_names=class_names,
        class_colors=class_colors,
        provenance=provenance,
        probabilities=probabilities,
    )
