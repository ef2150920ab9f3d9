"""Box detection with a centre-heatmap U-Net (CenterNet-style), in 2D and 3D.

The network is an ordinary MONAI U-Net (built by :func:`napari_medseg.models.networks.
build_network` from the card) whose ``K + 2 * dims`` output channels are, on the model grid at
full resolution (stride 1):

================  ===========================================================================
channels          meaning
================  ===========================================================================
``0 .. K-1``      one centre heatmap per class (logits; sigmoid gives the heatmap in [0, 1])
``K .. K+d-1``    box extent per axis, ``log(extent in voxels)``, read at the centre voxel
``K+d .. K+2d-1`` sub-voxel centre offset per axis (``centre - peak voxel``, in [-0.5, 0.5))
================  ===========================================================================

Targets (:func:`encode_targets`): for every object a Gaussian of peak 1 at the voxel nearest
its box centre, ``sigma = max(min_sigma, extent / 6)`` per axis (anisotropic in 3D), the maximum
where Gaussians overlap; size and offset targets only at the centre voxels. Loss
(:func:`centernet_loss`): penalty-reduced focal loss on the heatmap (CenterNet, alpha 2, beta 4)
normalised by the number of objects, plus L1 on log size and offset at the centres.

Decoding (:func:`decode`): peaks of the heatmap that equal their neighbourhood maximum
(max-pool non-maximum suppression, window ``2 * r + 1`` voxels, ``r = nms_radius``, 3 by
default) and reach ``peak_threshold``;
score = heatmap value at the peak; box = centre +- extent / 2. A box is written as in every
detection table: array indices, ``min`` inclusive, ``max`` exclusive, so an integer box
``[m, M)`` has centre ``(m + M - 1) / 2`` and extent ``M - m``, and encode -> decode returns it
exactly.

Large images: the heatmap, size and offset maps go through the shared sliding-window engine
(:func:`napari_medseg.core.engine.windows.sliding_window`, overlapping windows, Gaussian blending;
the
heatmap is blended after the sigmoid, the size and offset maps as raw values). Peaks are found
once on the stitched map, so an object on a window border gives ONE peak: there are no
duplicates across tile borders to remove (``filter_detections(nms_iou=...)`` stays available
for the rare double peak on a plateau).
"""

from __future__ import annotations

import math
import time
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_medseg.core.detect.result import (
    DEFAULT_COLOR,
    DetectionResult,
    axis_names,
    voxel_volume,
)
from napari_medseg.errors import MedsegError
from napari_medseg.progress import Progress

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    import torch

    from napari_medseg.io.record import ImageRecord
    from napari_medseg.models.card import ModelCard
    from napari_medseg.models.networks import LoadedModel

__all__ = [
    "HEAD",
    "centernet_loss",
    "check_detector_inputs",
    "decode",
    "detect_boxes",
    "detector_spec",
    "encode_targets",
    "head_channels",
    "is_box_detector",
]

#: The ``card.detection["head"]`` value of this module's detectors.
HEAD = "centernet"

#: Defaults of ``card.detection`` (merged under what the card says).
DEFAULTS = {
    "head": HEAD,
    "size_encoding": "log",
    "offsets": True,
    "min_sigma": 1.0,
    "sigma_factor": 1.0 / 6.0,
    "peak_threshold": 0.05,
    # CenterNet's 3x3 max-pool acts at output stride 4 (a peak rules +-4 input pixels); this
    # head is at stride 1, where a 3x3 window leaves a second peak 2 voxels from the first on
    # the broad Gaussian of a large object (24 such doubles among 136 nuclei of the DSB image)
    "nms_radius": 3,
}


# --------------------------------------------------------------------------- card helpers


def is_box_detector(card: ModelCard) -> bool:
    """True when the card describes a centre-heatmap box detector (``task == "detection"``)."""
    det = getattr(card, "detection", None) or card.extra.get("detection") or {}
    return card.task == "detection" and det.get("head", HEAD) == HEAD


def detector_spec(card: ModelCard) -> dict:
    """``card.detection`` with defaults filled in; ``n_classes`` = foreground classes."""
    det = dict(DEFAULTS)
    det.update(getattr(card, "detection", None) or card.extra.get("detection") or {})
    fg = [c for c in card.classes if int(c["id"]) != 0]
    det.setdefault("n_classes", max(1, len(fg)))
    return det


def head_channels(n_classes: int, dims: int) -> int:
    """Network output channels: ``n_classes`` heatmaps, ``dims`` sizes, ``dims`` offsets."""
    return int(n_classes) + 2 * int(dims)


def class_list(card: ModelCard) -> list[dict]:
    """Foreground classes in heatmap-channel order (``[{"id", "name", "color"}]``)."""
    fg = [c for c in card.classes if int(c["id"]) != 0]
    return sorted(fg, key=lambda c: int(c["id"])) or [{"id": 1, "name": "object"}]


# --------------------------------------------------------------------------- targets


def box_centres(boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centres and extents (array indices) of ``(N, 2*d)`` boxes (mins, then exclusive maxs)."""
    b = np.asarray(boxes, dtype=float).reshape(len(boxes), -1)
    d = b.shape[1] // 2
    lo, hi = b[:, :d], b[:, d:]
    return (lo + hi - 1.0) / 2.0, hi - lo


def encode_targets(
    boxes: np.ndarray,
    classes: np.ndarray | None,
    shape: tuple[int, ...],
    n_classes: int = 1,
    *,
    ignore: np.ndarray | None = None,
    min_sigma: float = 1.0,
    sigma_factor: float = 1.0 / 6.0,
) -> dict[str, np.ndarray]:
    """Training targets of one image (patch) from its boxes.

    Parameters
    ----------
    boxes : (N, 2*d) array
        Boxes in array indices of ``shape``'s axes: ``mins..., maxs...`` (max exclusive).
    classes : (N,) int array, optional
        Heatmap channel of each box (0..n_classes-1); all 0 when None.
    shape : tuple of int
        Spatial shape ``(Y, X)`` or ``(Z, Y, X)`` (any axis order; the boxes use the same).
    n_classes : int
    ignore : (M, 2*d) array, optional
        Boxes whose region is left out of the heatmap loss (objects cut by a patch border).
    min_sigma, sigma_factor : float
        Gaussian sigma per axis ``max(min_sigma, sigma_factor * extent)`` voxels.

    Returns
    -------
    dict
        ``heatmap`` (K, *shape) float32 in [0, 1]; ``size`` (d, *shape) float32 log extents;
        ``offset`` (d, *shape) float32; ``centre`` (*shape) bool (voxels carrying size and
        offset targets); ``weight`` (*shape) float32 (heatmap loss weight, 0 in ``ignore``).
    """
    shape = tuple(int(s) for s in shape)
    d = len(shape)
    boxes = np.asarray(boxes, dtype=float).reshape(-1, 2 * d)
    cls = np.zeros(len(boxes), int) if classes is None else np.asarray(classes, int)
    heat = np.zeros((n_classes, *shape), np.float32)
    size = np.zeros((d, *shape), np.float32)
    off = np.zeros((d, *shape), np.float32)
    centre = np.zeros(shape, bool)
    weight = np.ones(shape, np.float32)
    if ignore is not None:
        for b in np.asarray(ignore, dtype=float).reshape(-1, 2 * d):
            sl = tuple(
                slice(int(max(0, math.floor(lo))), int(min(s, math.ceil(hi))))
                for lo, hi, s in zip(b[:d], b[d:], shape)
            )
            weight[sl] = 0.0
    if len(boxes) == 0:
        return {"heatmap": heat, "size": size, "offset": off, "centre": centre, "weight": weight}
    c, ext = box_centres(boxes)
    ext = np.maximum(ext, 1e-3)
    # larger objects first: where two centres fall on one voxel, the smaller one wins
    order = np.argsort(-np.prod(ext, axis=1), kind="stable")
    for i in order:
        p = np.clip(np.floor(c[i] + 0.5).astype(int), 0, np.asarray(shape) - 1)
        sig = np.maximum(min_sigma, sigma_factor * ext[i])
        rad = np.ceil(3 * sig).astype(int)
        sl = tuple(slice(max(0, pj - rj), min(s, pj + rj + 1)) for pj, rj, s in zip(p, rad, shape))
        g = np.ones((), np.float32)
        for a in range(d):
            x = np.arange(sl[a].start, sl[a].stop, dtype=np.float32) - p[a]
            ga = np.exp(-0.5 * (x / sig[a]) ** 2).astype(np.float32)
            g = g[..., None] * ga
        k = int(cls[i])
        region = heat[(k, *sl)]
        np.maximum(region, g, out=region)
        weight[tuple(p)] = 1.0  # a centre is never ignored
        centre[tuple(p)] = True
        for a in range(d):
            size[(a, *p)] = math.log(ext[i, a])
            off[(a, *p)] = c[i, a] - p[a]
    return {"heatmap": heat, "size": size, "offset": off, "centre": centre, "weight": weight}


# --------------------------------------------------------------------------- loss


def centernet_loss(
    out: torch.Tensor, targets: dict[str, torch.Tensor], n_classes: int
) -> tuple[torch.Tensor, dict[str, float]]:
    """Focal heatmap loss + L1 log-size + L1 offset, averaged per object.

    Parameters
    ----------
    out : torch.Tensor
        Raw network output ``(B, K + 2d, *sp)``.
    targets : dict of torch.Tensor
        Batched :func:`encode_targets` arrays: ``heatmap (B, K, *sp)``, ``size``/``offset``
        ``(B, d, *sp)``, ``centre``/``weight`` ``(B, *sp)``.
    n_classes : int

    Returns
    -------
    loss : torch.Tensor (scalar)
    parts : dict
        ``heatmap``, ``size``, ``offset`` as floats.
    """
    import torch

    K = n_classes
    d = out.ndim - 2
    hm = torch.sigmoid(out[:, :K].float()).clamp(1e-4, 1 - 1e-4)
    gt = targets["heatmap"]
    w = targets["weight"][:, None]
    pos = (gt >= 1.0 - 1e-6).float()
    n_pos = pos.sum().clamp_min(1.0)
    pos_l = -torch.log(hm) * (1 - hm) ** 2 * pos
    neg_l = -torch.log(1 - hm) * hm**2 * (1 - gt) ** 4 * (1 - pos)
    l_hm = ((pos_l + neg_l) * w).sum() / n_pos
    m = targets["centre"][:, None].float()
    n_c = m.sum().clamp_min(1.0) * d
    l_size = (torch.abs(out[:, K : K + d] - targets["size"]) * m).sum() / n_c
    l_off = (torch.abs(out[:, K + d : K + 2 * d] - targets["offset"]) * m).sum() / n_c
    loss = l_hm + l_size + l_off
    parts = {"heatmap": float(l_hm.detach()), "size": float(l_size.detach()),
             "offset": float(l_off.detach())}  # fmt: skip
    return loss, parts


def init_heatmap_bias(net: Any, n_out: int, n_classes: int, prior: float = 0.1) -> bool:
    """Set the heatmap channels' bias of the last convolution to ``logit(prior)`` (CenterNet).

    Returns True when a convolution with ``n_out`` output channels was found.
    """
    import torch

    last = None
    for mod in net.modules():
        if isinstance(mod, torch.nn.modules.conv._ConvNd) and mod.out_channels == n_out:
            last = mod
    if last is None or last.bias is None:
        return False
    with torch.no_grad():
        last.bias[:n_classes] = math.log(prior / (1 - prior))
    return True


# --------------------------------------------------------------------------- decoding


def head_activation(net: Any, n_classes: int) -> Any:
    """Wrap a detector network: sigmoid on the heatmap channels, raw size and offset."""
    import torch

    class _Head(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.inner(x)
            if isinstance(y, (list, tuple)):
                y = y[0]
            return torch.cat([torch.sigmoid(y[:, :n_classes]), y[:, n_classes:]], dim=1)

    return _Head(net)


def decode(
    maps: Any,
    n_classes: int,
    *,
    peak_threshold: float = 0.05,
    nms_radius: int | tuple[int, ...] = 1,
    max_objects: int | None = 100000,
) -> dict[str, np.ndarray]:
    """Boxes from blended detector maps.

    Parameters
    ----------
    maps : torch.Tensor or numpy.ndarray
        ``(K + 2d, *sp)``: heatmaps already in [0, 1] (after the sigmoid), log sizes, offsets.
    n_classes : int
    peak_threshold : float
        Smallest heatmap value kept as an object.
    nms_radius : int or tuple of int
        Max-pool window ``2 * r + 1`` voxels per axis: a peak must be the largest value within
        ``r`` voxels (two centres closer than that cannot both be found).
    max_objects : int, optional
        Keep at most this many peaks (highest scores).

    Returns
    -------
    dict
        ``boxes`` (N, 2d) float (mins, exclusive maxs, array indices), ``centres`` (N, d),
        ``scores`` (N,), ``classes`` (N,) heatmap channel, sorted by decreasing score.
    """
    import torch
    import torch.nn.functional as F

    t = torch.as_tensor(maps).float().cpu()
    d = t.ndim - 1
    K = n_classes
    if t.shape[0] != head_channels(K, d) and t.shape[0] != K + d:
        raise MedsegError(
            f"detector output has {t.shape[0]} channels; {K} classes in {d}D need "
            f"{head_channels(K, d)}"
        )
    hm = t[:K]
    r = (nms_radius,) * d if np.isscalar(nms_radius) else tuple(nms_radius)  # type: ignore[arg-type]
    k = tuple(2 * int(v) + 1 for v in r)
    pool = F.max_pool2d if d == 2 else F.max_pool3d
    mx = pool(hm[None], kernel_size=k, stride=1, padding=tuple(int(v) for v in r))[0]
    peaks = (hm == mx) & (hm >= float(peak_threshold))
    idx = torch.nonzero(peaks, as_tuple=False)  # (N, 1 + d): class, voxel
    scores = hm[tuple(idx.T)]
    order = torch.argsort(scores, descending=True, stable=True)
    if max_objects is not None:
        order = order[: int(max_objects)]
    idx, scores = idx[order], scores[order]
    if len(idx) > 1:
        # ties (e.g. two voxels of a saturated sigmoid, exactly 1.0) both survive the max-pool:
        # keep the first (highest score, then raster order) of peaks within the window
        from scipy.spatial import cKDTree

        pts = idx[:, 1:].numpy() / np.maximum(np.asarray(r, float), 1e-9)
        pairs = cKDTree(pts).query_pairs(1.0 + 1e-9, p=np.inf, output_type="ndarray")
        if len(pairs):
            cls_np = idx[:, 0].numpy()
            pairs = np.sort(pairs, axis=1)
            pairs = pairs[cls_np[pairs[:, 0]] == cls_np[pairs[:, 1]]]
            alive = np.ones(len(idx), bool)
            for i, j in pairs[np.argsort(pairs[:, 0], kind="stable")]:
                if alive[i]:
                    alive[j] = False
            keep = torch.from_numpy(np.nonzero(alive)[0])
            idx, scores = idx[keep], scores[keep]
    vox = idx[:, 1:]
    sel = (slice(None), *tuple(vox.T))
    log_size = t[K : K + d][sel].T if len(vox) else torch.zeros((0, d))
    if t.shape[0] >= K + 2 * d and len(vox):
        offset = t[K + d : K + 2 * d][sel].T
    else:
        offset = torch.zeros((len(vox), d))
    centres = vox.double() + offset.double()
    ext = torch.exp(log_size.double().clamp(-10, 20))
    lo = centres - (ext - 1) / 2
    hi = lo + ext
    return {
        "boxes": torch.cat([lo, hi], 1).numpy().reshape(-1, 2 * d),
        "centres": centres.numpy().reshape(-1, d),
        "scores": scores.double().numpy(),
        "classes": idx[:, 0].numpy().astype(int),
    }


# --------------------------------------------------------------------------- inference


def check_detector_inputs(record: ImageRecord, card: ModelCard) -> None:
    """Raise :class:`MedsegError` (one sentence) when the image cannot go into the detector."""
    shape = record.shape
    if len(shape) == 0 or min(shape) < 1:
        raise MedsegError(f"the image {record.name!r} is empty (shape {shape})")
    nsp = record.spatial_ndim
    if card.dims == 3 and nsp == 2:
        raise MedsegError(
            f"model {card.name!r} is a 3D detector and cannot run on the 2D image "
            f"{record.name!r}; choose a 2D detector"
        )
    if card.dims == 2 and nsp != 2:
        raise MedsegError(
            f"model {card.name!r} is a 2D detector and cannot run on the {nsp}D image "
            f"{record.name!r}; choose a 3D detector"
        )
    from napari_medseg.core.segment.segment import check_channels

    check_channels(record, card)


def to_source_boxes(
    boxes: np.ndarray, centres: np.ndarray, model_affine: np.ndarray, source_affine: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Map model-grid boxes and centres to the source grid (file axis order, array indices).

    The box's outer voxel edges (``min - 0.5``, ``max - 0.5``) are mapped through
    ``inv(source_affine) @ model_affine`` (axis permutation, flips, scaling) and the enclosing
    axis-aligned box is taken; without reorientation or resampling this is the identity.
    """
    d = centres.shape[1] if centres.ndim == 2 else boxes.shape[1] // 2
    m = np.linalg.inv(np.asarray(source_affine, float)) @ np.asarray(model_affine, float)
    lin, t = m[:d, :d], m[:d, d]
    if np.allclose(lin, np.eye(d)) and np.allclose(t, 0):
        return boxes.copy(), centres.copy()
    c_src = centres @ lin.T + t
    lo, hi = boxes[:, :d] - 0.5, boxes[:, d:] - 0.5
    corners = []
    for bits in np.ndindex(*(2,) * d):
        corners.append(np.where(np.asarray(bits, bool)[None], hi, lo) @ lin.T + t)
    cs = np.stack(corners, 0)
    out = np.concatenate([cs.min(0) + 0.5, cs.max(0) + 0.5], axis=1)
    return out, c_src


def boxes_table(
    boxes: np.ndarray,
    centres: np.ndarray,
    scores: np.ndarray,
    class_names: list[str],
    classes: np.ndarray,
    affine: np.ndarray,
    space: str,
    shape: tuple[int, ...],
) -> pd.DataFrame:
    """The detection table (:mod:`napari_medseg.core.detect.result` columns) of decoded boxes.

    ``id`` = 1..N in decreasing score order; boxes are clipped to the image; ``area`` (2D,
    pixels) and ``volume_mm3`` (3D) are those of the ellipse (ellipsoid) inscribed in the box,
    the size of a round object that fills it (a box detector has no mask).
    """
    import pandas as pd

    d = len(shape)
    names = axis_names(d)
    n = len(scores)
    b = np.asarray(boxes, float).reshape(n, 2 * d)
    lo = np.clip(b[:, :d], 0, np.asarray(shape, float))
    hi = np.clip(b[:, d:], 0, np.asarray(shape, float))
    c = np.asarray(centres, float).reshape(n, d)
    aff = np.asarray(affine, float)
    world = c @ aff[:d, :d].T + aff[:d, d]
    cols: dict[str, Any] = {
        "id": np.arange(1, n + 1, dtype=np.int64),
        "class": [class_names[int(k)] if int(k) < len(class_names) else "object" for k in classes],
        "score": np.clip(np.asarray(scores, float), 0.0, 1.0),
    }
    for i, a in enumerate(names):
        cols[a] = c[:, i]
    if d == 2:
        cols["world_y"], cols["world_x"] = world[:, 0], world[:, 1]
    else:
        cols["world_x"], cols["world_y"], cols["world_z"] = world[:, 0], world[:, 1], world[:, 2]
    for i, a in enumerate(names):
        cols[f"{a}_min"] = lo[:, i]
        cols[f"{a}_max"] = hi[:, i]
    ext = np.clip(hi - lo, 0, None)
    if d == 2:
        px = voxel_volume(aff) if space == "RAS" else 1.0
        cols["area"] = math.pi / 4 * ext[:, 0] * ext[:, 1] * px
    else:
        cols["volume_mm3"] = math.pi / 6 * np.prod(ext, axis=1) * voxel_volume(aff)
    return pd.DataFrame(cols)


def predict_maps(
    image: Any,
    net: Any,
    card: ModelCard,
    *,
    device: Any = "cpu",
    overlap: float | None = None,
    batch_size: int = 4,
    amp: bool | str = "auto",
    spec: dict | None = None,
) -> Generator[Progress, None, torch.Tensor]:
    """Blended detector maps ``(K + 2d, *sp)`` of a normalised model-grid image ``(C, *sp)``.

    ``spec``: the card's :func:`detector_spec` when the caller has it already.
    """
    from napari_medseg.core.engine.windows import sliding_window

    spec = detector_spec(card) if spec is None else spec
    K = int(spec["n_classes"])
    roi = [int(v) for v in card.patch_size]
    if len(roi) != len(image.shape) - 1:
        raise MedsegError(
            f"model {card.name!r} has a {len(roi)}D patch size that does not fit the "
            f"{len(image.shape) - 1}D image"
        )
    from napari_medseg.core.engine.fastpath import prepare_network

    precision = "fp32" if amp is False else ("bf16" if amp is True else "auto")
    fast, _ = prepare_network(net, device, precision, guard="values")
    predictor = head_activation(fast, K)
    predictor.to(device).eval()
    maps = yield from sliding_window(
        image,
        predictor,
        roi,
        overlap=float(card.overlap if overlap is None else overlap),
        batch_size=batch_size,
        mode="gaussian",
        device=device,
        amp=amp,
        activation=None,
    )
    if maps.shape[0] != head_channels(K, len(roi)):
        raise MedsegError(
            f"model {card.name!r} produced {maps.shape[0]} output channels but a {len(roi)}D "
            f"detector of {K} class(es) needs {head_channels(K, len(roi))}"
        )
    return maps


def detect_boxes(
    record: ImageRecord,
    model: LoadedModel,
    *,
    device: Any = "auto",
    overlap: float | None = None,
    batch_size: int = 4,
    min_distance: float | None = None,
    peak_threshold: float | None = None,
    amp: bool | str = "auto",
) -> Generator[Progress, None, DetectionResult]:
    """Detect boxes with a centre-heatmap detector; yields Progress, returns a DetectionResult.

    Parameters
    ----------
    record : ImageRecord
        2D image for a 2D detector, 3D volume for a 3D one (file axis order).
    model : LoadedModel
        A card with ``task = "detection"`` and ``detection.head = "centernet"``.
    device, overlap, batch_size, amp
        As in :func:`napari_medseg.core.segment.segment.segment`.
    min_distance : float, optional
        Smallest distance between two centres (pixels in 2D, mm in 3D): the max-pool window
        radius. Default: the card's ``nms_radius`` (3 voxels).
    peak_threshold : float, optional
        Smallest heatmap value kept (default the card's, 0.05); the score slider filters more.

    Returns
    -------
    DetectionResult
        ``instances`` is None (a box detector has no masks).
    """
    from napari_medseg.core.correct.mask_store import software_versions as _versions
    from napari_medseg.core.engine.preprocess import to_model_grid
    from napari_medseg.core.engine.windows import resolve_device

    t0 = time.perf_counter()
    card = model.card
    check_detector_inputs(record, card)
    spec = detector_spec(card)  # once per call: predict_maps takes it
    if spec.get("head") != HEAD:
        raise MedsegError(
            f"model {card.name!r} has a detection head {spec.get('head')!r} this version cannot "
            f"run (only {HEAD!r})"
        )
    K = int(spec["n_classes"])
    dev = resolve_device(device)
    yield Progress(0, 0, "preparing the image for the detector")
    image, grid = to_model_grid(record, card, device=dev)
    if min_distance is not None:
        radius = tuple(max(1, round(float(min_distance) / s)) for s in grid.model_spacing)
    else:
        radius = (int(spec["nms_radius"]),) * card.dims
    thr = float(spec["peak_threshold"] if peak_threshold is None else peak_threshold)
    maps = yield from predict_maps(
        image,
        model.network,
        card,
        device=dev,
        overlap=overlap,
        batch_size=batch_size,
        amp=amp,
        spec=spec,
    )
    del image
    yield Progress(0, 0, "finding centre peaks")
    dec = decode(maps, K, peak_threshold=thr, nms_radius=radius)
    del maps
    boxes, centres = to_source_boxes(
        dec["boxes"], dec["centres"], grid.model_affine, np.asarray(record.affine)
    )
    classes = class_list(card)
    names = [str(c["name"]) for c in classes]
    table = boxes_table(
        boxes,
        centres,
        dec["scores"],
        names,
        dec["classes"],
        record.affine,
        record.space,
        tuple(record.spatial_shape),
    )
    colors = {str(c["name"]): c.get("color") or DEFAULT_COLOR for c in classes}
    prov = {
        "task": "detection",
        "method": "centre-heatmap box detector (CenterNet-style U-Net)",
        "model": model.provenance(),
        "parameters": {
            "peak_threshold": thr,
            "nms_radius_voxels": list(radius),
            "overlap": float(card.overlap if overlap is None else overlap),
            "roi_size": [int(v) for v in card.patch_size],
            "blend": "gaussian; heatmap after sigmoid, sizes and offsets raw",
            "normalization": card.normalization,
            "model_grid_shape": list(grid.model_shape),
        },
        "input": {"name": record.name, "path": record.path, "shape": list(record.shape)},
        "versions": _versions(),
        "device": str(dev),
        "n_objects": len(table),
        "elapsed_s": round(time.perf_counter() - t0, 3),
    }
    yield Progress(1, 1, f"{len(table)} objects")
    return DetectionResult(table, None, np.asarray(record.affine), record.space, colors, prov)
