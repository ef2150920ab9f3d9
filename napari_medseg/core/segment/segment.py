"""Semantic segmentation of one image with a loaded model (a progress generator).

Pipeline: checks -> normalise + reorient + resample onto the model grid (on the device) ->
sliding-window softmax probabilities (:mod:`napari_medseg.core.engine.windows`) -> back onto the
source file grid -> argmax -> postprocessing -> :class:`SegmentationResult`.

Going back to the source grid (``label_resampling``):

* no resampling (only a reorientation, or none): argmax on the model grid, then transpose/flip
  back. Exact and cheap.
* ``"linear"``: probabilities are interpolated (trilinear) onto the source grid one class at a
  time, keeping the running argmax (smooth boundaries; memory for two float maps).
* ``"nearest"``: argmax on the model grid, then nearest neighbour (fast, blocky when the
  model grid is coarser than the source).
* ``"auto"`` (default): ``"linear"`` on a GPU (up to 64 classes) and on the CPU while the
  interpolation work stays small (``passes x source voxels <= 4e8``, where ``passes`` is 1 for
  two classes, else ``K``; a 512x512x300 CT with 2 classes takes about 1.3 s on 2 cores),
  otherwise ``"nearest"``.

Measured on the real spleen CT label (0.8x0.8x5 mm) taken to a 1.5x1.5x2 mm model grid as soft
probabilities and back: Dice vs the original 0.998 (linear) vs 0.986 (nearest); at
1.6x1.6x5 mm 0.996 vs 0.985. That difference is why linear is the default where affordable.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_medseg.core.segment.provenance import run_provenance
from napari_medseg.errors import MedsegError
from napari_medseg.io.limits import available_memory
from napari_medseg.progress import Progress

if TYPE_CHECKING:  # pragma: no cover
    from napari_medseg.io.record import ImageRecord
    from napari_medseg.models.networks import LoadedModel

__all__ = ["SegmentationResult", "check_channels", "check_inputs", "segment"]

LINEAR_MAX_CLASSES_GPU = 64
LINEAR_MAX_WORK_CPU = 4e8


@dataclass
class SegmentationResult:
    """A label map on the source image's grid, with what it needs to be shown and trusted.

    Attributes
    ----------
    labels : numpy.ndarray
        uint8 (uint16 above 256 class ids) class ids, shape ``record.spatial_shape``, file axis
        order: it lies voxel for voxel on the source image.
    probabilities : numpy.ndarray or None
        float32 ``(K, *record.spatial_shape)`` class probabilities (channel ``k`` is the
        card's ``classes[k]``), when asked for.
    instances : numpy.ndarray or None
        int32 instance ids (0 background, one id per object), shape
        ``record.spatial_shape``, for models that separate objects (HoVerNet's nuclei; then
        ``labels`` holds each object's class; NuClick's clicked nuclei, id = click order + 1).
    objects : list of dict or None
        One row per instance (id, ``row``/``col`` in pixels: HoVerNet's centroid or NuClick's
        click, ``area_px``, HoVerNet's class), with ``instances``.
    affine : numpy.ndarray
        The source record's affine, unchanged.
    class_names, class_colors : dict
        ``{class id: name}``, ``{class id: "#rrggbb"}``.
    provenance : dict
        Model (name, version, source, kind, weights sha256), parameters, library versions,
        device, elapsed seconds, UTC timestamp, input description and notes.
    """

    labels: np.ndarray
    affine: np.ndarray
    class_names: dict[int, str]
    class_colors: dict[int, str]
    provenance: dict = field(default_factory=dict)
    probabilities: np.ndarray | None = None
    instances: np.ndarray | None = None
    objects: list[dict] | None = None


def estimate_memory(record: ImageRecord, model: LoadedModel, probabilities: bool = False) -> int:
    """Rough peak bytes of :func:`segment` on the CPU.

    float32 input on the source grid and on the model grid (with an interactive bundle's empty
    click-guidance channels), the accumulated class probabilities (HoVerNet: its nucleus and
    horizontal/vertical maps too) and the blending weights on the model grid, and the labels
    (HoVerNet: and the instance ids; if asked, the probabilities) on the source grid.
    """
    card = model.card
    extra = card.extra or {}
    n_src = float(np.prod(record.spatial_shape))
    channels = max(1, int(np.prod(record.shape[record.spatial_ndim :])))
    n_model = n_src
    if card.spacing is not None and record.space == "RAS" and card.dims == 3:
        src_vox = float(np.prod(record.spacing))
        n_model = n_src * src_vox / float(np.prod(card.spacing[:3]))
    K = card.out_channels + (4 if extra.get("hovernet") else 0)
    n_guide = int(extra.get("guidance_channels") or 0)
    total = 4 * (channels * n_src + (channels + n_guide) * n_model + (K + 1) * n_model) + 2 * n_src
    if extra.get("hovernet") or extra.get("nuclick"):
        total += 4 * n_src  # the int32 instance map
    if probabilities:
        total += 4 * K * n_src
    return int(total)


def check_memory(record: ImageRecord, model: LoadedModel, probabilities: bool = False) -> None:
    """Say so, in one sentence, before starting work that cannot fit in memory."""
    need = estimate_memory(record, model, probabilities)
    have = available_memory()
    if have is not None and need > have:
        raise MedsegError(
            f"segmenting {record.name!r} (shape {record.shape}) with {model.card.name!r} needs "
            f"about {need / 2**30:.1f} GB of memory but {have / 2**30:.1f} GB is free; crop the "
            "image to the region of interest, or use a model with a coarser spacing"
        )


def check_inputs(record: ImageRecord, model: LoadedModel) -> None:
    """Raise :class:`MedsegError` (one sentence) when the image cannot go into the model."""
    card = model.card
    if card.task != "segmentation":
        raise MedsegError(f"model {card.name!r} is a model for {card.task}, not segmentation")
    shape = record.shape
    if len(shape) == 0 or min(shape) < 1:
        raise MedsegError(f"the image {record.name!r} is empty (shape {shape})")
    nsp = record.spatial_ndim
    if card.dims == 3 and nsp == 2:
        raise MedsegError(
            f"model {card.name!r} is a 3D model and cannot run on the 2D image {record.name!r}; "
            "choose a 2D model"
        )
    if card.dims == 2 and nsp not in (2, 3):
        raise MedsegError(f"model {card.name!r} is 2D and cannot run on a {nsp}D image")
    check_channels(record, card)


def check_channels(record: ImageRecord, card: Any) -> None:
    """Raise :class:`MedsegError` when the image's channels (non-spatial axes, RGB included)
    do not match the model card's ``in_channels``.

    A card with ``extra["guidance_channels"] = n`` (an interactive bundle in automatic mode)
    takes ``in_channels - n`` image channels; the engine adds the ``n`` empty guidance ones.
    A NuClick card (``extra["nuclick"]``) takes ``in_channels - signal_channels``; the click
    maps make the rest.
    """
    shape, nsp = record.shape, record.spatial_ndim
    n_ch = int(np.prod(shape[nsp:])) if len(shape) > nsp else 1
    extra = getattr(card, "extra", None) or {}
    n_guide = int(extra.get("guidance_channels") or 0)
    n_click = int((extra.get("nuclick") or {}).get("signal_channels") or 0)
    made = n_guide + n_click  # channels the engine adds to the image's own
    if n_ch + made != card.in_channels:
        what = "RGB channels" if record.rgb else "channels (or time points)"
        names = extra.get("channel_inputs") or []
        if n_click:
            note = f" (plus {n_click} channels made from the clicks)"
        elif n_guide:
            note = f" (plus {n_guide} empty click-guidance channels)"
        elif names:  # e.g. the renal bundle's contrast phases, one file each
            note = f" ({', '.join(map(str, names))}: one file each, in this order)"
        else:
            note = ""
        raise MedsegError(
            f"model {card.name!r} expects {card.in_channels - made} input channel(s){note} "
            f"but the image {record.name!r} has {n_ch} {what}"
        )


def _precision_of(precision: str, amp: Any) -> str:
    """``precision``, with the older ``amp`` switch read when it is ``"auto"``."""
    if precision == "auto" and amp is not None and not isinstance(amp, str):
        return "bf16" if amp else "fp32"
    return precision


def segment(
    record: ImageRecord,
    model: LoadedModel,
    *,
    device: Any = "auto",
    overlap: float | None = None,
    batch_size: int = 4,
    tta: bool | None = None,
    return_probabilities: bool = False,
    postprocessing: dict | None = None,
    amp: bool | str = "auto",
    label_resampling: str = "auto",
    precision: str = "auto",
    compile: bool = False,
    fast_path: bool = True,
    clicks: Any = None,
) -> Generator[Progress, None, SegmentationResult]:
    """Segment one image; a generator that yields :class:`Progress` and returns the result.

    Parameters
    ----------
    record : ImageRecord
        The image (file axis order, affine to RAS mm or pixels).
    model : LoadedModel
        A segmentation model (:func:`napari_medseg.models.registry.load_model`). Its network is
        moved to ``device``.
    device : str
        ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"mps"``.
    overlap : float, optional
        Window overlap (default: the card's ``overlap``).
    batch_size : int
        Windows per forward pass (halved automatically on GPU out-of-memory).
    tta : bool or None
        Flip test-time augmentation: 4x (2D) or 8x (3D) the network time. ``None``: the
        model's default (off; on for nnU-Net v2 models, whose mirroring over the trainer's
        axes :func:`napari_medseg.core.segment.nnunet.segment_nnunet` runs as nnU-Net does).
    return_probabilities : bool
        Also return float32 probabilities on the source grid (``K`` x the label memory x 4).
    postprocessing : dict, optional
        Steps for :func:`napari_medseg.core.engine.postprocess.apply_postprocessing`; default: the
        card's ``postprocessing``; ``{}`` turns it off.
    amp : bool or "auto"
        Older switch for mixed precision: ``False`` means ``precision="fp32"``, ``True``
        ``"bf16"`` (when ``precision`` is ``"auto"``).
    label_resampling : {"auto", "linear", "nearest"}
        How labels go back to the source grid when the model grid differs (module docstring).
    precision : {"auto", "fp32", "bf16", "fp16"}
        Network precision (:func:`napari_medseg.core.engine.fastpath.prepare_network`):
        ``"auto"`` runs bf16 where the device runs it natively and fp32 elsewhere, and falls
        back to fp32 when the first batches' labels differ from fp32's.
    compile : bool
        ``torch.compile`` the network (pays only for long runs or with a warm compile cache).
    fast_path : bool
        ``False`` runs the network as loaded (fp32, no folding, contiguous): the reference.
    clicks : array-like, optional
        ``(N, 2)`` click positions ``(row, col)`` in pixels on ``record``, for models that
        outline the object under each click (NuClick bundles,
        :func:`napari_medseg.core.segment.nuclick.segment_clicks`); required for them and
        refused for every other model.

    Returns
    -------
    SegmentationResult
        Labels on ``record``'s own grid (shape ``record.spatial_shape``).
    """
    import torch

    from napari_medseg.core.engine import postprocess as pp
    from napari_medseg.core.engine.fastpath import prepare_network
    from napari_medseg.core.engine.preprocess import to_model_grid
    from napari_medseg.core.engine.windows import (
        plan_windows,
        resolve_device,
        slicewise,
        sliding_window,
    )
    from napari_medseg.core.segment.nuclick import check_clicks

    check_clicks(model.card, clicks)
    if clicks is not None:  # NuClick: one nucleus outlined per click
        from napari_medseg.core.segment.nuclick import segment_clicks

        check_inputs(record, model)
        fields = yield from segment_clicks(
            record,
            model,
            clicks,
            device=device,
            batch_size=batch_size,
            precision=_precision_of(precision, amp),
            fast_path=fast_path,
        )
        return SegmentationResult(**fields)
    if getattr(model, "kind", "") == "nnunet":  # nnUNetPredictor's own pipeline, reproduced
        from napari_medseg.core.segment.nnunet import segment_nnunet

        check_channels(record, model.card)
        fields = yield from segment_nnunet(
            record,
            model,
            device=device,
            mirror=True if tta is None else bool(tta),
            batch_size=batch_size,
            return_probabilities=return_probabilities,
            precision=_precision_of(precision, amp),
            fast_path=fast_path,
        )
        return SegmentationResult(**fields)
    if (model.card.extra or {}).get("hovernet"):  # nuclei: MONAI's HoVerNet pipeline
        from napari_medseg.core.segment.hovernet import segment_hovernet

        check_inputs(record, model)
        check_memory(record, model)
        fields = yield from segment_hovernet(
            record,
            model,
            device=device,
            batch_size=batch_size,
            precision=_precision_of(precision, amp),
            fast_path=fast_path,
        )
        return SegmentationResult(**fields)
    t0 = time.perf_counter()
    check_inputs(record, model)
    card = model.card
    dev = resolve_device(device)
    # what reading the image chose or found (missing DICOM slices, one series of several):
    # always in the provenance, whatever warnings a --quiet run hides
    notes: list[str] = [str(n) for n in (record.metadata or {}).get("read_notes", [])]
    overlap = float(card.overlap if overlap is None else overlap)
    K = card.out_channels
    card_pp = dict(card.postprocessing or {})
    # output keys (from MONAI bundles): how channels become labels, not clean-up steps
    activation = str(card_pp.pop("activation", "softmax"))
    card_pp.pop("argmax", None)
    card_pp.pop("label_resampling", None)
    # a MONAI bundle whose Invertd takes the raw outputs (logits) back, its activation after
    raw_back = bool(card_pp.pop("resample_raw_outputs", False))
    model_grid_steps = list(card_pp.pop("model_grid_steps", None) or [])
    channel_labels = [tuple(r) for r in card_pp.pop("channel_labels", None) or []]
    blend_raw = bool((card.extra or {}).get("blend_raw_outputs", False))
    raw_back = raw_back and blend_raw
    threshold = float(card_pp.pop("threshold", 0.5))
    if activation not in ("softmax", "sigmoid"):
        raise MedsegError(f"model {card.name!r} asks for an unknown activation {activation!r}")

    check_memory(record, model, return_probabilities)
    timings: dict[str, float] = {}
    yield Progress(0, 0, "preparing the image for the model")
    t_stage = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image, grid = to_model_grid(record, card, device=dev)
    timings["preprocess"] = time.perf_counter() - t_stage
    n_bad = int(grid.info.get("nonfinite_replaced", 0))
    if n_bad:
        msg = (
            f"the image has {n_bad} NaN/Inf voxels; they were replaced by the smallest finite value"
        )
        notes.append(msg)
        warnings.warn(f"napari-medseg: {msg}", RuntimeWarning, stacklevel=2)
    for w in caught:
        if "NaN/Inf" not in str(w.message):
            warnings.warn(w.message, w.category, stacklevel=2)
    if (card.extra or {}).get("bundle_mode"):  # e.g. DeepEdit without clicks
        notes.append(str(card.extra["bundle_mode"]))

    crop_spec = (card.normalization or {}).get("crop_foreground")
    box = None
    full_model_shape = tuple(image.shape[1:])
    if isinstance(crop_spec, dict):
        # MONAI's CropForeground: the network sees only the foreground's bounding box; outside
        # it the class scores are 0 (as MONAI's Invertd pads them), so the label is background
        from napari_medseg.core.engine.preprocess import foreground_box

        box = foreground_box(image, crop_spec)
        if box is None:
            box = tuple(slice(0, 1) for _ in full_model_shape)
        image = image[(slice(None), *box)]

    roi = [int(v) for v in card.patch_size]
    if (card.extra or {}).get("whole_image"):
        # MONAI's SimpleInferer: the network sees the whole (model-grid) image at once, so
        # image-wide layers (InstanceNorm) and the borders see what they see in MONAI
        roi = [int(v) for v in image.shape[1 : 1 + card.dims]]
    precision = _precision_of(precision, amp)
    t_stage = time.perf_counter()
    net, fast = prepare_network(
        model.network, dev, precision, compile=compile, guard="labels", enabled=fast_path
    )
    timings["prepare_network"] = time.perf_counter() - t_stage
    if card.dims == 2 and len(grid.model_shape) == 3:
        roi = [*roi[:2], 1]
        predictor = slicewise(net)
    else:
        predictor = net
    if len(roi) != image.ndim - 1:
        raise MedsegError(
            f"model {card.name!r} has a {len(card.patch_size)}D patch size {card.patch_size} "
            f"that does not fit its {card.dims}D card"
        )
    if hasattr(predictor, "to"):
        predictor.to(dev)
    if hasattr(predictor, "eval"):
        predictor.eval()

    padded = [max(s, r) for s, r in zip(image.shape[1:], roi)]
    n_passes = len(plan_windows(padded, roi, overlap)) * (2 ** len(roi) if tta else 1)
    total = n_passes + 3
    yield Progress(1, total, f"running {card.name} on {dev.type} ({n_passes} windows)")

    t_stage = time.perf_counter()
    gen = sliding_window(
        image,
        predictor,
        roi,
        overlap=overlap,
        batch_size=batch_size,
        mode=str((card.extra or {}).get("blend_mode", "gaussian")),
        sigma_scale=float((card.extra or {}).get("sigma_scale", 0.125)),
        device=dev,
        amp=False,  # the prepared network runs its own precision
        tta_flips=tta,
        # MONAI bundles blend the network's raw outputs and apply their activation after
        activation=None if blend_raw else activation,
        padding_mode=str((card.extra or {}).get("padding_mode", "constant")),
    )
    try:
        while True:
            try:
                p = next(gen)
            except StopIteration as stop:
                probs = stop.value
                break
            if "CPU" in p.message and "CPU" not in " ".join(notes):
                notes.append(p.message.split("(", 1)[-1].rstrip(")"))
            yield Progress(1 + p.done, total, p.message)
    finally:
        gen.close()
    if probs.shape[0] != K:
        raise MedsegError(
            f"model {card.name!r} produced {probs.shape[0]} output channels but its card lists "
            f"{K} classes"
        )
    final_dev = probs.device
    del image
    if blend_raw and not raw_back:
        probs = torch_activation(probs, activation)
    if box is not None:
        import torch

        full = torch.zeros((probs.shape[0], *full_model_shape), dtype=probs.dtype, device=final_dev)
        full[(slice(None), *box)] = probs
        probs = full
    timings["network"] = time.perf_counter() - t_stage
    if fast.precision_requested == "auto" and fast.fidelity.endswith("instead"):
        notes.append(fast.fidelity)  # reduced precision changed the labels: fp32 ran

    yield Progress(total - 2, total, "bringing the result back onto the image grid")
    t_stage = time.perf_counter()
    ldt = pp.label_dtype(max(int(c["id"]) for c in card.classes) + 1)
    method = label_resampling
    if model_grid_steps and activation == "softmax":
        method = "nearest"  # the clean-up runs on the model grid's labels, as MONAI's does
    if method == "auto" and (card.postprocessing or {}).get("label_resampling") in (
        "linear",
        "nearest",
    ):
        method = card.postprocessing["label_resampling"]  # as the model's authors run it
    if method == "auto":
        if final_dev.type == "cpu":
            passes = 1 if K == 2 else K
            cheap = passes * float(np.prod(record.spatial_shape)) <= LINEAR_MAX_WORK_CPU
        else:
            cheap = K <= LINEAR_MAX_CLASSES_GPU
        method = "linear" if cheap else "nearest"
    if method not in ("linear", "nearest"):
        raise MedsegError(f"label_resampling must be auto, linear or nearest, not {method!r}")
    grid.device = str(final_dev)
    class_names, class_colors = card.class_names, card.class_colors

    def to_source(p: Any) -> np.ndarray:
        """Model-grid probabilities (or raw outputs, ``raw_back``) as probabilities on the
        source grid; raw outputs are interpolated first and activated there, as MONAI does."""
        out = grid.probs_to_source(p)
        if raw_back:
            out = torch_activation(torch.from_numpy(out), activation).numpy()
        return out

    if activation == "sigmoid":
        # independent channels, each thresholded; then either the model's own channel-to-label
        # rule, or channel k -> label k + 1 with larger regions painted first so nested
        # structures (e.g. tumour core inside whole tumour) stay visible
        masks = [to_source(probs[k : k + 1])[0] > threshold for k in range(K)]
        names = [c["name"] for c in card.classes]
        colors = [class_colors[int(c["id"])] for c in card.classes]
        if channel_labels:
            # the model's own rule (a MONAI bundle's Lambdad): label v where channel k is set,
            # the first rule that holds wins
            ldt = pp.label_dtype(max(v for _, v in channel_labels) + 1)
            labels = np.zeros(record.spatial_shape, dtype=ldt)
            for k, v in reversed(channel_labels):
                labels[masks[k]] = v
            class_names = {0: "background", **{v: names[k] for k, v in channel_labels}}
            class_colors = {0: "#000000", **{v: colors[k] for k, v in channel_labels}}
        else:
            ldt = pp.label_dtype(K + 1)
            labels = np.zeros(record.spatial_shape, dtype=ldt)
            for k in sorted(range(K), key=lambda k: -int(masks[k].sum())):
                labels[masks[k]] = k + 1
            class_names = {0: "background", **{k + 1: names[k] for k in range(K)}}
            class_colors = {0: "#000000", **{k + 1: colors[k] for k in range(K)}}
        del masks
        method = "linear, per channel (sigmoid)"
    elif grid.resampled and method == "linear":
        # argmax of the interpolated probabilities (or of the interpolated raw outputs, which
        # is the argmax of their softmax)
        labels = grid.argmax_to_source(probs, dtype=ldt)
    else:
        model_labels = pp.argmax(probs).astype(ldt, copy=False)
        for step in model_grid_steps:
            # a MONAI bundle's clean-up between its argmax and Invertd: on the model grid, with
            # MONAI's full connectivity
            if step.get("op") == "keep_largest":
                model_labels = pp.keep_largest_component(
                    model_labels, step.get("classes"), connectivity=model_labels.ndim
                )
        labels = grid.labels_to_source(model_labels)
        del model_labels
    probabilities = to_source(probs) if return_probabilities else None
    del probs
    timings["resample_back"] = time.perf_counter() - t_stage
    t_stage = time.perf_counter()

    ids = [int(c["id"]) for c in card.classes]
    if activation == "softmax" and ids != list(range(K)):  # channel k is class classes[k]["id"]
        lut = np.asarray(ids, dtype=ldt)
        labels = lut[labels]

    pp_cfg = card_pp if postprocessing is None else postprocessing
    if pp_cfg:
        yield Progress(total - 1, total, "cleaning up the label map")
        labels = pp.apply_postprocessing(labels, pp_cfg, spacing=record.spacing)
    labels = np.ascontiguousarray(labels, dtype=ldt)
    timings["postprocess"] = time.perf_counter() - t_stage

    elapsed = time.perf_counter() - t0
    timings["total"] = elapsed
    provenance = run_provenance(
        model,
        record,
        {
            "overlap": overlap,
            "batch_size": batch_size,
            "tta": bool(tta),
            "roi_size": roi,
            "blend": f"gaussian, {activation} probabilities",
            "threshold": threshold if activation == "sigmoid" else None,
            "amp": {"fp32": "none", "bf16": "bfloat16", "fp16": "float16"}[fast.precision],
            "precision": fast.precision,
            "postprocessing": pp_cfg or {},
            # an area resize (DeepEdit) goes back by area averaging, as MONAI's inverse does
            "label_resampling": (
                ("area" if grid.align == "area" and method == "linear" else method)
                if grid.resampled
                else "none (exact)"
            ),
            "model_spacing": list(grid.model_spacing),
            "model_grid_shape": list(grid.model_shape),
            "orientation": card.orientation if card.dims == 3 else None,
            "normalization": card.normalization,
        },
        device=final_dev,
        device_requested=device,
        elapsed=elapsed,
        timings=timings,
        fast_path=fast.as_dict(),
        notes=notes,
    )
    yield Progress(total, total, f"done in {elapsed:.1f} s")
    return SegmentationResult(
        labels=labels,
        affine=np.asarray(record.affine),
        class_names=class_names,
        class_colors=class_colors,
        provenance=provenance,
        probabilities=probabilities,
    )


def torch_activation(scores: Any, activation: str) -> Any:
    """Softmax over channels (axis 0) or an element-wise sigmoid of blended network outputs."""
    import torch

    if activation == "softmax":
        return torch.softmax(scores.float(), dim=0)
    return torch.sigmoid(scores.float())
