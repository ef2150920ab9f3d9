"""Object detection in 2D and 3D (progress generators): instances from a segmentation, or boxes.

:func:`detect` dispatches on the model card: a segmentation model goes through the pipeline
below; a box detector (``task == "detection"``, a centre-heatmap U-Net) goes through
:func:`napari_medseg.core.detect.boxes.detect_boxes` and fills the same table (no instance map).

Pipeline of :func:`detect` (the "instances from a segmentation" model kind of the detection
issue): a segmentation model (e.g. the built-in ``fluo_nuclei_2d``) gives class probabilities on
the source grid (:func:`napari_medseg.core.segment.segment.segment`); its foreground is split into
objects by a distance-transform watershed seeded at the peaks of the (spacing-aware) distance
to the background; every object becomes one row of a table. :func:`detect_classical` does the
same from an Otsu threshold instead of a network (the baseline of the benchmarks).

Large 2D images: the segmentation engine already runs in overlapping, Gaussian-blended tiles
and returns one stitched map; the watershed runs once on that whole map, so every object is
whole and there are no duplicates across tile borders *by construction* (no tile-level boxes to
de-duplicate). The cost is memory: the probabilities of the whole image are held in float32.

The table (:class:`DetectionResult.table`, a :class:`pandas.DataFrame`), one row per object:

==================  ==========================================================================
column              meaning
==================  ==========================================================================
``id``              the object's value in :attr:`DetectionResult.instances` (0 = added by hand)
``class``           class name (majority of the segmentation's classes inside the object)
``score``           mean foreground probability inside the object, in [0, 1]
``y``, ``x``        2D: centre (centroid) in array indices, axis 0 = ``y``, axis 1 = ``x``
``z``, ``y``, ``x`` 3D: centre in array indices of the FILE's axis order as
                    ``napari-medseg info`` reports the shape: ``z`` = axis 0, ``y`` = axis 1,
                    ``x`` = axis 2 (for a NIfTI that is ``i, j, k``; the names are array
                    positions, not anatomy: anatomy is in the ``world_*`` columns)
``world_*``         2D: ``world_y``, ``world_x`` full-resolution pixels (the record's 3x3
                    affine applied to the centre); 3D: ``world_x``, ``world_y``, ``world_z``
                    scanner RAS millimetres (x = R, y = A, z = S; the record's 4x4 affine)
``<axis>_min/max``  bounding box in array indices, ``min`` inclusive, ``max`` exclusive
``area``            2D: pixels (square pixels of the file; x mpp^2 for um^2 where known)
``volume_mm3``      3D: mm^3 (voxel count x voxel volume from the affine)
==================  ==========================================================================

Filtering (:func:`filter_detections`: score threshold, minimum size, NMS-like de-duplication by
box IoU) works on the table alone, after the model, so a widget can re-filter live without
running the network again.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_medseg.errors import MedsegError
from napari_medseg.progress import Progress

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from napari_medseg.io.record import ImageRecord
    from napari_medseg.models.networks import LoadedModel

__all__ = [
    "DetectionResult",
    "axis_names",
    "detect",
    "detect_classical",
    "filter_detections",
    "instances_from_mask",
    "measure_instances",
    "world_names",
]

#: Default colour of a class without one in the model card (QuPath-like red).
DEFAULT_COLOR = "#e6194b"


def axis_names(ndim: int) -> list[str]:
    """Centre column names in array order: ``["y", "x"]`` (2D) or ``["z", "y", "x"]`` (3D)."""
    if ndim not in (2, 3):
        raise MedsegError(f"detection works on 2D images and 3D volumes, not {ndim}D data")
    return ["y", "x"] if ndim == 2 else ["z", "y", "x"]


def world_names(ndim: int) -> list[str]:
    """World columns: ``world_y, world_x`` (2D pixels) or ``world_x, world_y, world_z`` (RAS)."""
    return ["world_y", "world_x"] if ndim == 2 else ["world_x", "world_y", "world_z"]


@dataclass
class DetectionResult:
    """Detected objects of one image, before any score/size filtering.

    Attributes
    ----------
    table : pandas.DataFrame
        One row per object (columns in the module docstring), sorted by ``id``.
    instances : numpy.ndarray or None
        int32 instance map on the source grid (file axis order); object ``id`` has value ``id``.
        None for box detectors (:mod:`napari_medseg.core.detect.boxes`), which have no masks: the
        table's boxes are the result (GeoJSON export then writes Points).
    affine : numpy.ndarray
        The source record's affine (voxel -> RAS mm 4x4, or pixel 3x3).
    space : str
        ``"RAS"`` or ``"pixel"``.
    class_colors : dict
        ``{class name: "#rrggbb"}``.
    provenance : dict
        Model, parameters, timings.
    """

    table: pd.DataFrame
    instances: np.ndarray | None
    affine: np.ndarray
    space: str
    class_colors: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)

    @property
    def ndim(self) -> int:
        """Number of spatial axes (2 or 3)."""
        if self.instances is not None:
            return self.instances.ndim
        return int(np.asarray(self.affine).shape[0]) - 1

    def filtered(self, **kw: Any) -> pd.DataFrame:
        """:func:`filter_detections` on this result's table."""
        return filter_detections(self.table, **kw)


# --------------------------------------------------------------------------- instances


def instances_from_mask(
    mask: np.ndarray,
    spacing: tuple[float, ...] | None = None,
    min_distance: float = 4.0,
    smooth: float = 1.0,
    split: bool = True,
) -> Generator[Progress, None, np.ndarray]:
    """Split a foreground mask into objects with a peak-seeded distance watershed.

    Parameters
    ----------
    mask : (Y, X) or (Z, Y, X) bool array
        Foreground, any axis order.
    spacing : tuple of float, optional
        Voxel size per axis (mm or px); the distance transform and the peak spacing use it so
        that thick slices do not split objects.
    min_distance : float
        Smallest distance between two seeds, in the units of ``spacing`` (pixels for 2D).
    smooth : float
        Gaussian sigma (voxels) applied to the distance map before finding peaks; suppresses
        spurious peaks on ragged outlines.
    split : bool
        False: connected components only (touching objects stay merged).

    Returns
    -------
    numpy.ndarray
        int32 instance map, 0 = background, objects numbered 1..N in raster order.
    """
    from scipy import ndimage as ndi

    mask = np.asarray(mask, dtype=bool)
    nd = mask.ndim
    sp = np.asarray(spacing if spacing is not None else (1.0,) * nd, dtype=float)
    yield Progress(0, 3, "finding connected objects")
    cc, n = ndi.label(mask)
    if n == 0 or not split:
        return cc.astype(np.int32)
    yield Progress(1, 3, f"distance transform of {n} connected objects")
    dist = ndi.distance_transform_edt(mask, sampling=sp)
    if smooth > 0:
        dist = ndi.gaussian_filter(dist, sigma=smooth) * mask
    yield Progress(2, 3, "watershed split of touching objects")
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    md = np.maximum(1, np.round(min_distance / sp)).astype(int)
    footprint = np.ones(tuple(2 * m + 1 for m in md), dtype=bool)
    peaks = peak_local_max(dist, footprint=footprint, labels=cc, exclude_border=False)
    # peaks on a plateau (a column through all slices of a volume, a flat ridge) are adjacent:
    # one seed per connected group of peak voxels
    peak_mask = np.zeros(mask.shape, dtype=bool)
    peak_mask[tuple(peaks.T)] = True
    markers, n_seeds = ndi.label(peak_mask, structure=np.ones((3,) * nd, dtype=bool))
    markers = markers.astype(np.int32, copy=False)
    # components without a peak (tiny or flat) still get a seed: their first voxel
    seeded = np.zeros(n + 1, dtype=bool)
    seeded[cc[tuple(peaks.T)]] = True
    missing = np.flatnonzero(~seeded[1:]) + 1
    if len(missing):
        objs = ndi.find_objects(cc)
        k = int(n_seeds)
        for lab in missing:
            sl = objs[lab - 1]
            local = np.argwhere(cc[sl] == lab)[0]
            k += 1
            markers[tuple(int(s.start) + int(v) for s, v in zip(sl, local))] = k
    inst = watershed(-dist, markers, mask=mask)
    yield Progress(3, 3, f"{int(inst.max())} objects")
    return inst.astype(np.int32)


def _voxel_size(affine: np.ndarray) -> float:
    lin = np.asarray(affine, dtype=float)[:-1, :-1]
    return float(abs(np.linalg.det(lin)))


def measure_instances(
    instances: np.ndarray,
    affine: np.ndarray,
    space: str,
    score_map: np.ndarray | None = None,
    class_map: np.ndarray | None = None,
    class_names: dict[int, str] | None = None,
) -> Generator[Progress, None, pd.DataFrame]:
    """Measure every object of an instance map into the detection table.

    Parameters
    ----------
    instances : (Y, X) or (Z, Y, X) int array
        Objects 1..N on the record's grid (file axis order), 0 = background.
    affine : numpy.ndarray
        The record's voxel-to-world affine (3x3 pixel or 4x4 RAS).
    space : {"RAS", "pixel"}
    score_map : array, optional
        Per-voxel score in [0, 1] (foreground probability); its mean inside an object is the
        object's score (1.0 when absent).
    class_map : int array, optional
        Per-voxel class id; an object's class is its majority id (``class_names[1]`` or
        ``"object"`` when absent).
    class_names : dict, optional
        ``{class id: name}``.

    Returns
    -------
    pandas.DataFrame
        The table described in the module docstring.
    """
    import pandas as pd
    from scipy import ndimage as ndi

    inst = np.asarray(instances)
    nd = inst.ndim
    names = axis_names(nd)
    ids = np.unique(inst)
    ids = ids[ids > 0]
    n = len(ids)
    yield Progress(0, 3, f"measuring {n} objects")
    cols: dict[str, Any] = {"id": ids.astype(np.int64)}
    class_names = class_names or {1: "object"}
    if n == 0:
        empty = {"id": [], "class": [], "score": []}
        for k in [*names, *world_names(nd)]:
            empty[k] = []
        for a in names:
            empty[f"{a}_min"], empty[f"{a}_max"] = [], []
        empty["area" if nd == 2 else "volume_mm3"] = []
        return pd.DataFrame(empty)
    counts = ndi.sum_labels(np.ones(inst.shape, dtype=np.float32), inst, ids)
    centres = np.asarray(ndi.center_of_mass(np.ones(inst.shape, np.float32), inst, ids))
    centres = centres.reshape(n, nd)
    yield Progress(1, 3, "scores and classes")
    if score_map is not None:
        scores = ndi.mean(np.asarray(score_map, dtype=np.float32), inst, ids)
    else:
        scores = np.ones(n)
    if class_map is not None:
        cm = np.asarray(class_map)
        kmax = int(cm.max()) if cm.size else 0
        votes = np.zeros((n, kmax + 1))
        for k in range(1, kmax + 1):
            votes[:, k] = ndi.sum_labels(cm == k, inst, ids)
        cls_ids = votes.argmax(axis=1) if kmax else np.ones(n, dtype=int)
        cls_ids[cls_ids == 0] = 1
    else:
        cls_ids = np.ones(n, dtype=int)
    cols["class"] = [class_names.get(int(c), f"class {int(c)}") for c in cls_ids]
    cols["score"] = np.clip(np.asarray(scores, dtype=float), 0.0, 1.0)
    aff = np.asarray(affine, dtype=float)
    world = centres @ aff[:nd, :nd].T + aff[:nd, nd]
    for i, a in enumerate(names):
        cols[a] = centres[:, i]
    if nd == 2:
        cols["world_y"], cols["world_x"] = world[:, 0], world[:, 1]
    else:
        cols["world_x"], cols["world_y"], cols["world_z"] = world[:, 0], world[:, 1], world[:, 2]
    yield Progress(2, 3, "bounding boxes")
    objs = ndi.find_objects(inst, max_label=int(ids.max()))
    boxes = np.array([[s.start for s in objs[i - 1]] + [s.stop for s in objs[i - 1]] for i in ids])
    for i, a in enumerate(names):
        cols[f"{a}_min"] = boxes[:, i]
        cols[f"{a}_max"] = boxes[:, nd + i]
    if nd == 2:
        cols["area"] = counts * (_voxel_size(aff) if space == "RAS" else 1.0)
    else:
        cols["volume_mm3"] = counts * _voxel_size(aff)
    yield Progress(3, 3, f"{n} objects measured")
    return pd.DataFrame(cols)


# --------------------------------------------------------------------------- filtering


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of axis-aligned boxes ``(N, 2D)`` x ``(M, 2D)``: rows are ``mins..., maxs...``."""
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    nd = a.shape[1] // 2
    lo = np.maximum(a[:, None, :nd], b[None, :, :nd])
    hi = np.minimum(a[:, None, nd:], b[None, :, nd:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=-1)
    va = np.prod(a[:, nd:] - a[:, :nd], axis=1)
    vb = np.prod(b[:, nd:] - b[:, :nd], axis=1)
    union = va[:, None] + vb[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def boxes_of(table: pd.DataFrame) -> np.ndarray:
    """``(N, 2*ndim)`` boxes (mins then maxs, array indices) of a detection table."""
    names = [a for a in ("z", "y", "x") if f"{a}_min" in table.columns]
    return table[[f"{a}_min" for a in names] + [f"{a}_max" for a in names]].to_numpy(float)


def filter_detections(
    table: pd.DataFrame,
    score_threshold: float = 0.0,
    min_size: float = 0.0,
    nms_iou: float | None = None,
) -> pd.DataFrame:
    """Keep objects by score and size and drop duplicates; works on the table only (fast).

    Parameters
    ----------
    table : pandas.DataFrame
        A detection table (module docstring).
    score_threshold : float
        Keep ``score >= score_threshold``.
    min_size : float
        Keep ``area >= min_size`` (2D, pixels) or ``volume_mm3 >= min_size`` (3D).
    nms_iou : float, optional
        Greedy non-maximum suppression: in decreasing score order, drop an object whose box
        overlaps a kept one with IoU above this value. Watershed instances never overlap, so
        this only matters for boxes merged from several sources (``None``: off).

    Returns
    -------
    pandas.DataFrame
        The kept rows, original order, index reset.
    """
    keep = table["score"].to_numpy(float) >= float(score_threshold)
    size_col = "area" if "area" in table.columns else "volume_mm3"
    if min_size and size_col in table.columns:
        keep &= table[size_col].to_numpy(float) >= float(min_size)
    out = table[keep]
    if nms_iou is not None and len(out) > 1 and nms_iou < 1.0:
        boxes = boxes_of(out)
        order = np.argsort(-out["score"].to_numpy(float), kind="stable")
        alive = np.ones(len(out), dtype=bool)
        for i in order:
            if not alive[i]:
                continue
            iou = box_iou(boxes[i : i + 1], boxes)[0]
            drop = (iou > nms_iou) & alive
            drop[i] = False
            alive &= ~drop
        out = out[alive]
    return out.reset_index(drop=True)


# --------------------------------------------------------------------------- detectors


def _check_record(record: ImageRecord) -> None:
    shape = record.shape
    if len(shape) == 0 or min(shape) < 1:
        raise MedsegError(f"the image {record.name!r} is empty (shape {shape})")
    if record.spatial_ndim not in (2, 3):
        raise MedsegError(f"detection works on 2D images and 3D volumes, not {record.name!r}")


def detect(
    record: ImageRecord,
    model: LoadedModel,
    *,
    min_distance: float | None = None,
    split: bool = True,
    device: Any = "auto",
    overlap: float | None = None,
    batch_size: int = 4,
    tta: bool = False,
) -> Generator[Progress, None, DetectionResult]:
    """Detect objects with a model: dispatches on the model card.

    * ``task == "detection"`` (a box detector, ``card.detection.head == "centernet"``):
      :func:`napari_medseg.core.detect.boxes.detect_boxes` (centre heatmap peaks + regressed box
      sizes; ``instances`` is None; ``tta`` and ``split`` do not apply).
    * ``task == "segmentation"``: watershed instances of the model's foreground (below).

    Parameters
    ----------
    record : ImageRecord
        2D image or 3D volume (file axis order).
    model : LoadedModel
        A segmentation model whose dimensions fit the image (a 2D model runs slice by slice
        on a volume, as in :func:`~napari_medseg.core.segment.segment.segment`), or a box
        detector of the image's dimension.
    min_distance : float, optional
        Smallest seed distance of the watershed, in pixels (2D) or mm (3D); default 4 px in
        2D and 4 x the smallest voxel size in 3D. For a box detector: the smallest distance
        between two centres (default the card's ``nms_radius``, 3 voxels).
    split : bool
        False: connected components only.
    device, overlap, batch_size, tta
        Passed to :func:`~napari_medseg.core.segment.segment.segment`.

    Returns
    -------
    DetectionResult
        All objects (no score or size filtering: use :func:`filter_detections`).
    """
    from napari_medseg.core.segment.segment import segment

    t0 = time.perf_counter()
    _check_record(record)
    card = model.card
    if card.task == "detection":
        from napari_medseg.core.detect.boxes import HEAD, detect_boxes, detector_spec

        head = detector_spec(card).get("head")
        if head != HEAD:
            raise MedsegError(
                f"model {card.name!r} has a detection head {head!r} this version cannot run "
                f"(only {HEAD!r})"
            )
        result = yield from detect_boxes(
            record,
            model,
            device=device,
            overlap=overlap,
            batch_size=batch_size,
            min_distance=min_distance,
        )
        if tta:
            result.provenance["notes"] = ["flip TTA is not applied to box detectors"]
        return result
    if card.task != "segmentation":
        raise MedsegError(
            f"model {card.name!r} is a model for {card.task}; detection needs a segmentation "
            "model or a box detector"
        )
    seg = yield from segment(
        record,
        model,
        device=device,
        overlap=overlap,
        batch_size=batch_size,
        tta=tta,
        return_probabilities=True,
        postprocessing={},
    )
    probs = seg.probabilities
    fg_prob = 1.0 - np.asarray(probs[0], dtype=np.float32)
    del probs
    labels = np.asarray(seg.labels)
    spacing = record.spacing
    md = float(min_distance) if min_distance is not None else 4.0 * min(spacing)
    inst = yield from _stage(
        instances_from_mask(labels > 0, spacing=spacing, min_distance=md, split=split),
        "splitting objects",
    )
    table = yield from _stage(
        measure_instances(inst, record.affine, record.space, fg_prob, labels, seg.class_names),
        "measuring",
    )
    colors = {
        seg.class_names[k]: seg.class_colors.get(k, DEFAULT_COLOR)
        for k in seg.class_names
        if k != 0
    }
    prov = {
        "task": "detection",
        "method": "segmentation + distance watershed",
        "model": seg.provenance.get("model", {"name": card.name}),
        "parameters": {"min_distance": md, "split": split, "tta": tta, "overlap": overlap},
        "segmentation": seg.provenance,
        "n_objects": len(table),
        "elapsed_s": round(time.perf_counter() - t0, 3),
    }
    return DetectionResult(table, inst, np.asarray(record.affine), record.space, colors, prov)


def _stage(gen: Generator, what: str) -> Generator[Progress, None, Any]:
    """Re-yield a sub-generator's progress with a prefix; return its value."""
    while True:
        try:
            p = next(gen)
        except StopIteration as stop:
            return stop.value
        yield Progress(p.done, p.total, f"{what}: {p.message}", p.info)


def _stain_density(record: ImageRecord, stain: str) -> tuple[np.ndarray, np.ndarray]:
    """Optical density of ``stain`` in an RGB bright-field image, and its tissue mask."""
    if stain != "hematoxylin":
        raise MedsegError(f"unknown stain {stain!r}; the classical detector knows 'hematoxylin'")
    data = np.asarray(record.data)
    if not (record.rgb and data.ndim == 3 and data.shape[-1] in (3, 4)):
        raise MedsegError(
            f"the hematoxylin channel needs a 2D RGB bright-field image; {record.name!r} has "
            f"shape {record.shape}"
        )
    from skimage.color import rgb2hed

    rgb = data[..., :3]
    if rgb.dtype != np.uint8:
        hi = 255.0 if float(np.max(rgb)) > 1.0 else 1.0
        rgb = np.clip(rgb.astype(np.float32) * (255.0 / hi), 0, 255).astype(np.uint8)
    dens = rgb2hed(rgb)[..., 0].astype(np.float32)
    mx = rgb.max(axis=-1).astype(np.float32)
    sat = (mx - rgb.min(axis=-1)) / np.maximum(mx, 1.0)
    tissue = ~((rgb.min(axis=-1) > 215) | (sat < 0.07))
    return dens, tissue


def _intensity(record: ImageRecord) -> np.ndarray:
    """One grey channel of the record (RGB averaged), float32, file axis order."""
    data = np.asarray(record.data, dtype=np.float32)
    nsp = record.spatial_ndim
    if data.ndim > nsp:
        if data.ndim > nsp + 1 or (data.shape[-1] > 4 and not record.rgb):
            raise MedsegError(
                f"the classical detector needs one grey channel; {record.name!r} has shape "
                f"{record.shape}"
            )
        data = data[..., :3].mean(axis=-1)
    return data


def detect_classical(
    record: ImageRecord,
    *,
    sigma: float = 1.0,
    min_distance: float | None = None,
    min_pixels: int = 10,
    dark_objects: bool = False,
    stain: str | None = None,
) -> Generator[Progress, None, DetectionResult]:
    """Baseline detector: Gaussian smoothing, Otsu threshold, distance watershed.

    Parameters
    ----------
    record : ImageRecord
        2D image or 3D volume (grey; RGB is averaged).
    sigma : float
        Gaussian smoothing (voxels) before the threshold.
    min_distance : float, optional
        Watershed seed distance (pixels in 2D, mm in 3D; default as :func:`detect`).
    min_pixels : int
        Connected pieces smaller than this are dropped before the watershed.
    dark_objects : bool
        Objects darker than the background (grey bright-field images).
    stain : {None, "hematoxylin"}
        ``"hematoxylin"`` (RGB bright-field H&E/IHC): nuclei from the haematoxylin optical
        density of a colour deconvolution (:func:`skimage.color.rgb2hed`, Ruifrok & Johnston),
        thresholded (Otsu) over the tissue only, glass excluded (pixels with every channel
        above 215 or saturation below 0.07). On a tile that mixes glass and tissue, a plain
        Otsu on brightness separates tissue from glass instead of nuclei from tissue.

    Returns
    -------
    DetectionResult
        ``score`` = mean over the object of ``0.5 + 0.5 * clip((smoothed - otsu) /
        (p99.5 - otsu), 0, 1)``: 0.5 at the Otsu threshold, 1 at the image's 99.5th
        percentile, so the default threshold 0.5 keeps every Otsu object, as it keeps every
        object of a model's argmax.
    """
    from scipy import ndimage as ndi
    from skimage.filters import threshold_otsu
    from skimage.morphology import remove_small_objects

    t0 = time.perf_counter()
    _check_record(record)
    yield Progress(0, 0, "smoothing and Otsu threshold")
    region = None  # where the threshold is computed (None: everywhere)
    if stain is not None:
        img, region = _stain_density(record, stain)
    else:
        img = _intensity(record)
    if not np.isfinite(img).all():
        img = np.nan_to_num(img, nan=float(np.nanmin(img)) if np.isfinite(img).any() else 0.0)
    if dark_objects and stain is None:
        img = -img
    sm = ndi.gaussian_filter(img, sigma) if sigma > 0 else img
    vals = sm if region is None else sm[region]
    if vals.size < 2 or float(vals.max()) == float(vals.min()):
        mask = np.zeros(sm.shape, dtype=bool)
        t = float(sm.max())
    else:
        t = float(threshold_otsu(vals))
        mask = sm > t
        if region is not None:
            mask &= region
        mask = ndi.binary_fill_holes(mask) if mask.ndim == 2 else mask
        mask = remove_small_objects(mask, max_size=max(0, int(min_pixels) - 1))
    spacing = record.spacing
    md = float(min_distance) if min_distance is not None else 4.0 * min(spacing)
    inst = yield from _stage(
        instances_from_mask(mask, spacing=spacing, min_distance=md), "splitting objects"
    )
    hi = float(np.percentile(vals, 99.5)) if vals.size else t
    # 0.5 at the Otsu threshold (the classical "decision line", like p = 0.5 for a model),
    # 1.0 at the image's 99.5th percentile
    contrast = 0.5 + 0.5 * np.clip((sm - t) / max(hi - t, 1e-6), 0.0, 1.0)
    table = yield from _stage(
        measure_instances(inst, record.affine, record.space, contrast, None, {1: "object"}),
        "measuring",
    )
    prov = {
        "task": "detection",
        "method": "classical: Gaussian + Otsu + distance watershed",
        "model": {"name": "classical"},
        "parameters": {"sigma": sigma, "min_distance": md, "otsu_threshold": t},
        "n_objects": len(table),
        "elapsed_s": round(time.perf_counter() - t0, 3),
    }
    return DetectionResult(
        table, inst, np.asarray(record.affine), record.space, {"object": DEFAULT_COLOR}, prov
    )
