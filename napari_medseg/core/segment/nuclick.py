"""Nuclei outlined from clicks with a NuClick MONAI bundle (a generator).

MONAI's ``pathology_nuclick_annotation`` bundle (NuClick, Koohbanani et al. 2020) segments the
nucleus under each click of the user. Its pipeline, reproduced step by step:

1. **Input** as MONAI reads it: a 2D RGB raster as ``(3, x, y)`` (column-first: MONAI's PIL
   reader gives ``x`` = column, ``y`` = row), scaled by the bundle's intensity steps
   (``ScaleIntensityRanged`` 0..255 to -1..1, no clipping).
2. **Patches** (``AddClickSignalsd``): for click ``i`` at ``(x, y)`` a ``bb_size`` square (128)
   starting at ``max(0, x - bb_size // 2)`` along each axis, moved back inside the image where
   it would cross the far border. Channels: the image, this click's map (1 at the click), and
   (``add_exclusion_map``) the other clicks' map (1 at every other click pixel in the patch; a
   click on the same pixel as this one counts as this one, as MONAI's ``click_map -
   this_click_map > 0`` does); with ``gaussian`` each non-empty map is smoothed by MONAI's
   ``GaussianFilter``.
3. **Network** on the ``N`` patches (our batches, with progress and Cancel between batches),
   then the bundle's post-processing per patch: sigmoid, ``AsDiscreted`` threshold
   (``>= threshold``), ``KeepLargestConnectedComponentd`` (MONAI's own
   ``get_largest_connected_component_mask``, so ties go the same way).
4. **Instances**: each patch's mask pasted into one map at its box, id = click order + 1, a
   later click overwriting an earlier one where they overlap (MONAI's ``PostFilterLabeld``
   paste with one id per click), then back to the image's own ``(row, col)`` grid.

Differences from MONAI, on purpose: clicks are given as ``(row, col)`` pixel positions and
rounded to the nearest pixel (MONAI truncates fractional ``[x, y]`` toward zero; whole-pixel
clicks, such as the bundle's centroid files, are the same); a click outside the image is
refused (MONAI drops it silently); an image smaller than a patch is refused (MONAI's boxes
would start at negative positions). The bundle's own config runs one click per image (its
``SqueezeDimd`` refuses more); the patches of several clicks are what MONAI's
``AddClickSignalsd`` makes and MONAI Label runs as one batch.
"""

from __future__ import annotations

import json
import time
from collections.abc import Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_medseg.errors import MedsegError
from napari_medseg.progress import Progress

if TYPE_CHECKING:  # pragma: no cover
    from napari_medseg.io.record import ImageRecord
    from napari_medseg.models.networks import LoadedModel

__all__ = [
    "check_clicks",
    "click_boxes",
    "click_patches",
    "clicks_to_model",
    "paste_instances",
    "read_clicks",
    "segment_clicks",
    "takes_clicks",
]


def takes_clicks(card: Any) -> bool:
    """Whether a model card outlines objects from clicks (a NuClick bundle)."""
    return bool((getattr(card, "extra", None) or {}).get("nuclick"))


def no_clicks_message(name: str) -> str:
    """The sentence for a click model run without clicks."""
    return (
        f"model {name!r} outlines the nuclei you click: give clicks (--clicks FILE on the "
        "command line, a Points layer under Clicks in the Segment dock)"
    )


def check_clicks(card: Any, clicks: Any, given_as: str = "the clicks") -> None:
    """Raise :class:`MedsegError` unless clicks come exactly with a click model.

    A click model (NuClick) without clicks, or clicks for any other model, is refused with
    one sentence; ``given_as`` names how the user gave them (``"--clicks"`` on the command
    line).
    """
    if takes_clicks(card) and clicks is None:
        raise MedsegError(no_clicks_message(card.name))
    if clicks is not None and not takes_clicks(card):
        raise MedsegError(f"model {card.name!r} takes no clicks; leave out {given_as}")


def read_clicks(path: str | Path) -> np.ndarray:
    """Read clicks from a file.

    Parameters
    ----------
    path : path-like
        ``.csv`` with a header row naming columns ``row`` and ``col`` (pixel positions on the
        image, row first; other columns are ignored), or ``.json``: a list of ``[x, y]`` pairs
        as the NuClick bundle's centroid files hold them (``x`` = column, ``y`` = row, MONAI's
        column-first raster layout).

    Returns
    -------
    numpy.ndarray
        float64 ``(N, 2)`` clicks as ``(row, col)`` pixel positions.

    Raises
    ------
    MedsegError
        The file cannot be read, has no clicks, or holds something else.
    """
    import csv

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise MedsegError(f"cannot read the clicks file {path}: {e.strerror}") from e
    if path.suffix.lower() == ".json":
        try:
            pairs = json.loads(text)
            xy = np.asarray(pairs, dtype=float)
        except (ValueError, TypeError) as e:
            raise MedsegError(
                f"{path} must hold a JSON list of [x, y] pairs (x = column, y = row)"
            ) from e
        if xy.ndim != 2 or xy.shape[1] != 2 or not len(xy):
            raise MedsegError(f"{path} must hold a JSON list of [x, y] pairs (x = column, y = row)")
        clicks = xy[:, ::-1].copy()  # (x, y) -> (row, col)
    else:
        rows = list(csv.DictReader(text.splitlines()))
        keys = {k.strip().lower(): k for k in (rows[0] if rows else {}) if k is not None}
        if not rows or "row" not in keys or "col" not in keys:
            raise MedsegError(
                f"{path} must be a CSV with a header row and columns row,col (pixel positions), "
                "or a .json list of [x, y] pairs"
            )
        try:
            clicks = np.array([[float(r[keys["row"]]), float(r[keys["col"]])] for r in rows])
        except (TypeError, ValueError) as e:
            raise MedsegError(f"{path} holds a click position that is not a number") from e
    if not np.isfinite(clicks).all():
        raise MedsegError(f"{path} holds a click position that is not a finite number")
    return clicks


def clicks_to_model(clicks: Any, record: ImageRecord, grid: Any) -> np.ndarray:
    """Clicks ``(row, col)`` on the image to whole-pixel indices on the model's grid.

    Parameters
    ----------
    clicks : array-like
        ``(N, 2)`` pixel positions in the image's file axis order (``(row, col)`` for a
        raster), rounded to the nearest pixel (halves up).
    record : ImageRecord
        The image (for its name and shape in messages).
    grid : GridMap
        From :func:`napari_medseg.core.engine.preprocess.to_model_grid`; not resampled.

    Returns
    -------
    numpy.ndarray
        int64 ``(N, 2)`` indices on the model grid (``(x, y)`` = ``(col, row)`` for rasters
        MONAI reads column-first).

    Raises
    ------
    MedsegError
        No clicks, a malformed array, or a click outside the image.
    """
    pts = np.asarray(clicks, dtype=float)
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise MedsegError(
            f"clicks must be (row, col) pixel pairs, not an array of shape {pts.shape}"
        )
    if not len(pts):
        raise MedsegError("there are no clicks: click once on each nucleus to outline")
    if not np.isfinite(pts).all():
        raise MedsegError("a click position is not a finite number")
    idx = np.floor(pts + 0.5).astype(np.int64)
    shape = np.asarray(grid.source_shape[:2])
    bad = np.flatnonzero(((idx < 0) | (idx >= shape)).any(axis=1))
    if len(bad):
        i = int(bad[0])
        raise MedsegError(
            f"click {i + 1} at (row {pts[i, 0]:g}, col {pts[i, 1]:g}) lies outside the image "
            f"{record.name!r} ({shape[0]} rows x {shape[1]} columns)"
            + (f", and {len(bad) - 1} more" if len(bad) > 1 else "")
        )
    for a in grid.flip_axes:
        idx[:, a] = shape[a] - 1 - idx[:, a]
    return idx[:, list(grid.perm)]


def click_boxes(clicks: np.ndarray, shape: tuple[int, int], bb_size: int) -> np.ndarray:
    """Each click's patch as ``AddClickSignalsd`` places it.

    Parameters
    ----------
    clicks : numpy.ndarray
        int ``(N, 2)`` model-grid indices ``(x, y)``.
    shape : tuple of int
        Model-grid shape ``(X, Y)``, each at least ``bb_size``.
    bb_size : int
        Patch side (pixels).

    Returns
    -------
    numpy.ndarray
        int64 ``(N, 4)`` boxes ``[x0, y0, x1, y1]`` (ends exclusive), ``bb_size`` square.
    """
    c = np.asarray(clicks, dtype=np.int64)
    n = np.asarray(shape, dtype=np.int64)
    start = np.maximum(0, c - bb_size // 2)
    end = np.minimum(start + bb_size, n)
    start = end - bb_size  # moved back inside where it crossed the far border
    return np.concatenate([start, end], axis=1)


def click_patches(image: Any, clicks: np.ndarray, boxes: np.ndarray, index: Any, spec: dict) -> Any:
    """The network input of the clicks ``index``: image patch plus click maps.

    Parameters
    ----------
    image : torch.Tensor
        ``(C, X, Y)`` float32, normalised, on the model grid.
    clicks : numpy.ndarray
        int ``(N, 2)`` all clicks ``(x, y)`` (the other clicks' map uses them all).
    boxes : numpy.ndarray
        From :func:`click_boxes`.
    index : sequence of int
        The clicks to build patches for.
    spec : dict
        The card's ``extra["nuclick"]`` (``add_exclusion_map``, ``gaussian``, ``sigma``,
        ``truncated``).

    Returns
    -------
    torch.Tensor
        ``(len(index), C + 1 or 2, bb, bb)`` float32: image, this click, (other clicks).
    """
    import torch

    exclusion = bool(spec.get("add_exclusion_map", True))
    smooth = None
    if spec.get("gaussian"):
        from monai.networks.layers import GaussianFilter

        smooth = GaussianFilter(
            spatial_dims=2,
            sigma=float(spec.get("sigma", 1.0)),
            truncated=float(spec.get("truncated", 2.0)),
        )

    def signal(m: torch.Tensor) -> torch.Tensor:
        if smooth is None or not bool(m.any()):
            return m
        return smooth(m[None, None])[0, 0]

    out = []
    for i in index:
        x0, y0, x1, y1 = (int(v) for v in boxes[i])
        patch = image[:, x0:x1, y0:y1]
        this = torch.zeros(patch.shape[1:], dtype=image.dtype, device=image.device)
        cx, cy = int(clicks[i, 0]) - x0, int(clicks[i, 1]) - y0
        this[cx, cy] = 1
        maps = [patch, signal(this)[None]]
        if exclusion:
            other = torch.zeros_like(this)
            inside = (
                (clicks[:, 0] >= x0)
                & (clicks[:, 0] < x1)
                & (clicks[:, 1] >= y0)
                & (clicks[:, 1] < y1)
            )
            pts = clicks[inside]
            other[pts[:, 0] - x0, pts[:, 1] - y0] = 1
            other[cx, cy] = 0  # this click's pixel (and any duplicate of it) is not "other"
            maps.append(signal(other)[None])
        out.append(torch.cat(maps))
    return torch.stack(out)


def _masks(logits: Any, spec: dict) -> np.ndarray:
    """The bundle's post-processing of ``(B, 1, bb, bb)`` outputs: ``(B, bb, bb)`` bool."""
    import torch

    y = logits.float().cpu()
    if spec.get("sigmoid", True):
        y = torch.sigmoid(y)
    masks = (y >= float(spec.get("threshold", 0.5)))[:, 0].numpy()
    keep = spec.get("keep_largest")
    if keep is not None:
        from monai.transforms.utils import get_largest_connected_component_mask

        for b in range(len(masks)):
            if masks[b].any():
                masks[b] = get_largest_connected_component_mask(
                    masks[b],
                    connectivity=keep.get("connectivity"),
                    num_components=int(keep.get("num_components", 1)),
                )
    return masks


def paste_instances(
    instances: np.ndarray, masks: np.ndarray, boxes: np.ndarray, ids: Any
) -> np.ndarray:
    """Paste patch masks into an instance map, in order (a later id overwrites an earlier one).

    Parameters
    ----------
    instances : numpy.ndarray
        int ``(X, Y)`` map on the model grid, changed in place.
    masks : numpy.ndarray
        bool ``(B, bb, bb)``.
    boxes : numpy.ndarray
        ``(B, 4)`` boxes ``[x0, y0, x1, y1]`` of the masks.
    ids : sequence of int
        The id of each mask.

    Returns
    -------
    numpy.ndarray
        ``instances``.
    """
    for m, (x0, y0, x1, y1), k in zip(masks, boxes, ids):
        instances[x0:x1, y0:y1][m] = int(k)
    return instances


def segment_clicks(
    record: ImageRecord,
    model: LoadedModel,
    clicks: Any,
    *,
    device: Any = "auto",
    batch_size: int = 4,
    precision: str = "auto",
    fast_path: bool = True,
) -> Generator[Progress, None, dict]:
    """Outline the nucleus under each click of a 2D RGB image with a NuClick bundle.

    :func:`napari_medseg.core.segment.segment.segment` calls this for models whose card has
    ``extra["nuclick"]`` and wraps the result in a ``SegmentationResult``.

    Parameters
    ----------
    record : ImageRecord
        2D RGB image ``(rows, cols, 3)``, 0..255, at least ``bb_size`` (128) pixels a side.
    model : LoadedModel
        A NuClick MONAI bundle (:func:`napari_medseg.models.loaders.bundle.load_bundle`).
    clicks : array-like
        ``(N, 2)`` click positions ``(row, col)`` in pixels on ``record`` (rounded to the
        nearest pixel), one per nucleus; the order gives the ids.
    device : str
        ``"auto"``, ``"cpu"``, ``"cuda"``, ``"mps"``.
    batch_size : int
        Patches per forward pass.
    precision : {"auto", "fp32", "bf16", "fp16"}
        Network precision (:func:`napari_medseg.core.engine.fastpath.prepare_network`).
    fast_path : bool
        ``False`` runs the network as loaded (the reference).

    Yields
    ------
    Progress
        After every batch of patches (cancellable between batches).

    Returns
    -------
    dict
        ``labels`` (uint8 ``(rows, cols)``, 1 = nucleus), ``instances`` (int32 ``(rows,
        cols)``, click ``i`` gives id ``i + 1``; 0 background), ``objects`` (one dict per
        click: ``id``, the click's ``row``/``col`` (pixels), ``area_px`` of its id in the map,
        0 where nothing was found or a later click covered it), ``affine``, ``class_names``,
        ``class_colors``, ``provenance``.
    """
    from napari_medseg.core.engine.fastpath import prepare_network
    from napari_medseg.core.engine.preprocess import to_model_grid
    from napari_medseg.core.engine.windows import resolve_device
    from napari_medseg.core.segment.provenance import run_provenance

    t0 = time.perf_counter()
    card = model.card
    spec = dict((card.extra or {}).get("nuclick") or {})
    if clicks is None or not len(np.asarray(clicks)):
        raise MedsegError(no_clicks_message(card.name))
    if record.spatial_ndim != 2:
        raise MedsegError(
            f"model {card.name!r} outlines nuclei in 2D images; {record.name!r} has "
            f"{record.spatial_ndim} spatial axes"
        )
    bb = int(spec.get("bb_size", 128))
    if min(record.spatial_shape) < bb:
        raise MedsegError(
            f"model {card.name!r} looks at {bb} x {bb} pixels around each click; the image "
            f"{record.name!r} ({record.spatial_shape[0]} x {record.spatial_shape[1]}) is smaller"
        )
    dev = resolve_device(device)
    timings: dict[str, float] = {}
    yield Progress(0, 0, "preparing the image for the model")
    t = time.perf_counter()
    image, grid = to_model_grid(record, card, device="cpu")
    if grid.resampled:
        raise MedsegError(f"model {card.name!r} runs on the image's own pixels, not resampled")
    xy = clicks_to_model(clicks, record, grid)
    shape = tuple(int(s) for s in image.shape[1:])
    boxes = click_boxes(xy, shape, bb)
    timings["preprocess"] = time.perf_counter() - t
    t = time.perf_counter()
    net, fast = prepare_network(model.network, dev, precision, enabled=fast_path)
    timings["prepare_network"] = time.perf_counter() - t

    n = len(xy)
    total = n + 2
    inst = np.zeros(shape, dtype=np.int32)
    t = time.perf_counter()
    t_post = 0.0
    yield Progress(1, total, f"{n} clicks")
    for start in range(0, n, max(1, int(batch_size))):
        index = list(range(start, min(start + max(1, int(batch_size)), n)))
        batch = click_patches(image, xy, boxes, index, spec)
        out = net(batch.to(dev))
        tp = time.perf_counter()
        masks = _masks(out, spec)
        paste_instances(inst, masks, boxes[index], [i + 1 for i in index])
        t_post += time.perf_counter() - tp
        done = index[-1] + 1
        yield Progress(1 + done, total, f"running {card.name} on {dev.type}: nucleus {done}/{n}")
    timings["network"] = time.perf_counter() - t - t_post
    timings["postprocess"] = t_post
    t = time.perf_counter()
    instances = np.ascontiguousarray(grid.labels_to_source(inst))
    area = np.bincount(instances.ravel(), minlength=n + 1)
    pts = np.floor(np.asarray(clicks, dtype=float) + 0.5).astype(int)
    objects = [
        {"id": i + 1, "row": int(pts[i, 0]), "col": int(pts[i, 1]), "area_px": int(area[i + 1])}
        for i in range(n)
    ]
    labels = (instances > 0).astype(np.uint8)
    timings["resample_back"] = time.perf_counter() - t
    elapsed = time.perf_counter() - t0
    timings["total"] = elapsed
    found = int((area[1:] > 0).sum())
    class_names = {int(c["id"]): c["name"] for c in card.classes}
    provenance = run_provenance(
        model,
        record,
        {
            "pipeline": "NuClick (MONAI AddClickSignalsd patches reproduced; sigmoid, threshold, "
            "largest component per patch; patches pasted in click order)",
            "clicks_row_col": pts.tolist(),
            "nuclick": spec,
            "batch_size": batch_size,
            "precision": fast.precision,
            "normalization": card.normalization,
        },
        device=dev,
        device_requested=device,
        elapsed=elapsed,
        timings=timings,
        fast_path=fast.as_dict(),
        notes=fast.notes,
    )
    provenance["clicks"] = n
    provenance["nuclei"] = found
    yield Progress(total, total, f"{found} of {n} clicked nuclei outlined in {elapsed:.1f} s")
    return dict(
        labels=labels,
        instances=instances,
        objects=objects,
        affine=np.asarray(record.affine),
        class_names=class_names,
        class_colors=card.class_colors,
        provenance=provenance,
    )
