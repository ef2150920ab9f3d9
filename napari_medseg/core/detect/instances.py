"""Objects from a segmentation: a peak-seeded distance watershed splits the foreground into
instances, and every instance is measured into the detection table.

Pipeline of :func:`detect_instances` (the "instances from a segmentation" model kind of the
detection issue): a segmentation model (e.g. the built-in ``fluo_nuclei_2d``) gives class
probabilities on the source grid (:func:`napari_medseg.core.segment.segment.segment`); its
foreground is split into objects by a distance-transform watershed seeded at the peaks of the
(spacing-aware) distance to the background; every object becomes one row of a table.
:func:`napari_medseg.core.detect.classical.detect_classical` does the same from an Otsu
threshold instead of a network (the baseline of the benchmarks).

Large 2D images: the segmentation engine already runs in overlapping, Gaussian-blended tiles
and returns one stitched map; the watershed runs once on that whole map, so every object is
whole and there are no duplicates across tile borders *by construction* (no tile-level boxes to
de-duplicate). The cost is memory: the probabilities of the whole image are held in float32.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_medseg.core.detect.result import (
    DEFAULT_COLOR,
    DetectionResult,
    axis_names,
    voxel_volume,
    world_names,
)
from napari_medseg.errors import MedsegError
from napari_medseg.progress import Progress

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from napari_medseg.io.record import ImageRecord
    from napari_medseg.models.networks import LoadedModel

__all__ = [
    "check_record",
    "detect_instances",
    "instances_from_mask",
    "measure_instances",
    "stage",
]


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
        cols["area"] = counts * (voxel_volume(aff) if space == "RAS" else 1.0)
    else:
        cols["volume_mm3"] = counts * voxel_volume(aff)
    yield Progress(3, 3, f"{n} objects measured")
    return pd.DataFrame(cols)


def check_record(record: ImageRecord) -> None:
    """Raise :class:`MedsegError` for an empty image or one that is not 2D or 3D."""
    shape = record.shape
    if len(shape) == 0 or min(shape) < 1:
        raise MedsegError(f"the image {record.name!r} is empty (shape {shape})")
    if record.spatial_ndim not in (2, 3):
        raise MedsegError(f"detection works on 2D images and 3D volumes, not {record.name!r}")


def stage(gen: Generator, what: str) -> Generator[Progress, None, Any]:
    """Re-yield a sub-generator's progress with a prefix; return its value."""
    while True:
        try:
            p = next(gen)
        except StopIteration as stop:
            return stop.value
        yield Progress(p.done, p.total, f"{what}: {p.message}", p.info)


def detect_instances(
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
    """Detect objects as watershed instances of a segmentation model's foreground.

    Parameters
    ----------
    record : ImageRecord
        2D image or 3D volume (file axis order).
    model : LoadedModel
        A segmentation model whose dimensions fit the image (a 2D model runs slice by slice
        on a volume, as in :func:`~napari_medseg.core.segment.segment.segment`).
    min_distance : float, optional
        Smallest seed distance of the watershed, in pixels (2D) or mm (3D); default 4 px in
        2D and 4 x the smallest voxel size in 3D.
    split : bool
        False: connected components only.
    device, overlap, batch_size, tta
        Passed to :func:`~napari_medseg.core.segment.segment.segment`.

    Returns
    -------
    DetectionResult
        All objects (no score or size filtering: use
        :func:`~napari_medseg.core.detect.result.filter_detections`).
    """
    from napari_medseg.core.segment.segment import segment

    t0 = time.perf_counter()
    check_record(record)
    card = model.card
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
    inst = yield from stage(
        instances_from_mask(labels > 0, spacing=spacing, min_distance=md, split=split),
        "splitting objects",
    )
    table = yield from stage(
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
