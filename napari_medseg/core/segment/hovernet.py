"""Nuclei instance segmentation and classification with a HoVerNet MONAI bundle (a generator).

MONAI's ``pathology_nuclei_segmentation_classification`` bundle (HoVer-Net, Graham et al. 2019)
returns three maps per window, not class scores: nucleus probability (NP, 2 channels),
horizontal/vertical distances to the nucleus centre (HV, 2) and nucleus type (TP, K). Its
pipeline, reproduced step by step:

1. **Input** as MONAI reads it: a 2D RGB raster as ``(3, x, y)`` (column-first), scaled by the
   bundle's intensity steps (``ScaleIntensityRanged`` 0..255 to 0..1).
2. **Windows** (``SlidingWindowHoVerNetInferer``): the image is padded by
   ``extra_input_padding`` (46 pixels a side, the cropping of the "fast" network) with
   ``cval``, then to the window size where smaller; windows of ``roi_size`` (256) every
   ``int(roi * (1 - overlap))`` pixels, the last moved back to the border. Each window's smaller
   output (164 x 164) is put back at the window's centre; overlapping centres are averaged with
   equal weight (the importance map is zero outside the centre); the padding is cropped off.
   This loop is ours (it yields progress after each batch and can be cancelled between
   batches); the fidelity test compares its result with MONAI's run of the bundle.
3. **Post-processing**: MONAI's own ``HoVerNetInstanceMapPostProcessing`` (softmax of NP,
   threshold, Sobel borders of HV, distance map, markers, watershed) and
   ``HoVerNetNuclearTypePostProcessing`` (the majority type of each nucleus), with the
   arguments the bundle's config gives them, called on the blended maps.
4. **Back** to the image's own ``(row, col)`` grid.

The result: the nucleus *type* map (one class per nucleus, classes from the card), the
*instance* map (one id per nucleus) and one row per nucleus (id, centroid, area, type, type
fraction).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_medseg.errors import MedsegError
from napari_medseg.progress import Progress

if TYPE_CHECKING:  # pragma: no cover
    from napari_medseg.io.record import ImageRecord
    from napari_medseg.models.networks import LoadedModel

__all__ = ["HOVERNET_KEYS", "blend_hovernet", "segment_hovernet"]

#: HoVerNet's output maps (MONAI's ``HoVerNetBranch`` values) in the order they are used.
HOVERNET_KEYS = ("nucleus_prediction", "horizontal_vertical", "type_prediction")


def _pad_amounts(pad: list[int], ndim: int) -> list[tuple[int, int]]:
    """``F.pad``'s flat (last axis first) list as ``(before, after)`` per spatial axis."""
    pairs = [(int(pad[2 * i]), int(pad[2 * i + 1])) for i in range(len(pad) // 2)]
    pairs = pairs[::-1]  # F.pad lists the last axis first
    return [(0, 0)] * (ndim - len(pairs)) + pairs


def blend_hovernet(
    image: Any,
    net: Any,
    roi: list[int],
    overlap: float,
    input_padding: list[int],
    cval: float = 0.0,
    batch_size: int = 4,
) -> Generator[Progress, None, dict[str, Any]]:
    """HoVerNet's windows, blended as MONAI's ``SlidingWindowHoVerNetInferer`` blends them.

    Parameters
    ----------
    image : torch.Tensor
        ``(C, X, Y)`` float32, MONAI's axis order (column-first for rasters), normalised.
    net : callable
        ``(B, C, *roi)`` to a dict of ``(B, K, *out)`` maps, ``out <= roi`` (centred).
    roi : list of int
        Window size (pixels per spatial axis).
    overlap : float
        Window overlap in ``[0, 1)``.
    input_padding : list of int
        ``extra_input_padding`` as ``torch.nn.functional.pad`` takes it (last axis first).
    cval : float
        Value of the padding.
    batch_size : int
        Windows per forward pass.

    Yields
    ------
    Progress
        After every batch (windows done / total).

    Returns
    -------
    dict of str to torch.Tensor
        Each output map ``(K, X, Y)`` float32 on ``image``'s grid.
    """
    import torch
    import torch.nn.functional as F

    from napari_medseg.core.engine.windows import plan_windows

    nsp = image.ndim - 1
    pads = _pad_amounts(list(input_padding), nsp)
    x = F.pad(image[None], tuple(input_padding), mode="constant", value=cval)[0]
    padded = list(x.shape[1:])
    # MONAI pads an image smaller than the window symmetrically (then crops it off again)
    fit = [(max(r - s, 0) // 2, max(r - s, 0) - max(r - s, 0) // 2) for s, r in zip(padded, roi)]
    if any(a or b for a, b in fit):
        flat = [v for a, b in reversed(fit) for v in (a, b)]
        x = F.pad(x[None], tuple(flat), mode="constant", value=cval)[0]
    shape = list(x.shape[1:])
    plan = plan_windows(shape, roi, overlap)
    total = len(plan)
    sums: dict[str, Any] = {}
    count = torch.zeros(shape, dtype=torch.float32)
    done = 0
    yield Progress(0, total, f"{total} windows")
    for start in range(0, total, batch_size):
        wins = plan[start : start + batch_size]
        batch = torch.stack([x[(slice(None), *w)] for w in wins])
        out = net(batch)
        if not isinstance(out, dict):
            raise MedsegError("a HoVerNet network must return a dictionary of output maps")
        # each output sits at its window's centre (MONAI's process_output pads it back)
        size = out[HOVERNET_KEYS[0]].shape[2:]
        lo = [(r - o) // 2 for r, o in zip(roi, size)]
        centres = [
            tuple(slice(s.start + a, s.start + a + o) for s, a, o in zip(w, lo, size)) for w in wins
        ]
        for centre in centres:
            count[centre] += 1.0
        for key in HOVERNET_KEYS:
            y = out[key].float().cpu()
            if key not in sums:
                sums[key] = torch.zeros((y.shape[1], *shape), dtype=torch.float32)
            for i, centre in enumerate(centres):
                sums[key][(slice(None), *centre)] += y[i]
        done += len(wins)
        yield Progress(done, total, f"window {done}/{total}")
    keep = tuple(slice(f[0] + p[0], f[0] + p[0] + s) for f, p, s in zip(fit, pads, image.shape[1:]))
    c = count[keep]
    if bool((c == 0).any()):
        raise MedsegError(
            "the HoVerNet windows leave pixels uncovered (overlap too small for the network's "
            "output size)"
        )
    return {k: v[(slice(None), *keep)] / c for k, v in sums.items()}


def _kwargs(cls: Any, given: dict) -> dict:
    """The arguments in ``given`` that ``cls`` takes."""
    params = inspect.signature(cls).parameters
    return {k: v for k, v in given.items() if k in params}


def postprocess_hovernet(maps: dict[str, Any], spec: dict) -> tuple[np.ndarray, np.ndarray, dict]:
    """MONAI's HoVerNet post-processing on blended maps.

    Parameters
    ----------
    maps : dict
        ``nucleus_prediction`` ``(2, X, Y)``, ``horizontal_vertical`` ``(2, X, Y)``,
        ``type_prediction`` ``(K, X, Y)`` raw outputs.
    spec : dict
        The card's ``extra["hovernet"]`` (``instance`` and ``type`` keyword arguments).

    Returns
    -------
    instances : numpy.ndarray
        int32 ``(X, Y)``, 0 background, one id per nucleus.
    types : numpy.ndarray
        uint8 ``(X, Y)``, the type of each nucleus's pixels.
    info : dict
        ``{id: {"type": int, "type_prob": float}}`` for the nuclei MONAI keeps (those with a
        contour of at least 3 points).
    """
    from monai.apps.pathology.transforms.post.array import (
        HoVerNetInstanceMapPostProcessing,
        HoVerNetNuclearTypePostProcessing,
    )

    inst_pp = HoVerNetInstanceMapPostProcessing(
        **_kwargs(HoVerNetInstanceMapPostProcessing, spec.get("instance") or {})
    )
    type_pp = HoVerNetNuclearTypePostProcessing(
        **_kwargs(HoVerNetNuclearTypePostProcessing, spec.get("type") or {})
    )
    info, inst = inst_pp(maps["nucleus_prediction"], maps["horizontal_vertical"])
    info, types = type_pp(maps["type_prediction"], info, inst)
    inst_np = np.asarray(getattr(inst, "cpu", lambda: inst)())[0]
    if types is None:
        types_np = np.zeros(inst_np.shape, dtype=np.uint8)
    else:
        types_np = np.asarray(getattr(types, "cpu", lambda: types)())[0]
    kept = {
        int(k): {"type": int(v.get("type", 0)), "type_prob": float(v.get("type_prob", 0.0))}
        for k, v in info.items()
    }
    return inst_np.astype(np.int32), types_np.astype(np.uint8), kept


def nucleus_table(instances: np.ndarray, info: dict, names: dict[int, str]) -> list[dict]:
    """One row per nucleus: id, centroid (row, col in pixels), area (pixels), type.

    Parameters
    ----------
    instances : numpy.ndarray
        ``(rows, cols)`` instance ids on the image's own grid.
    info : dict
        From :func:`postprocess_hovernet`.
    names : dict
        Type id to name.
    """
    from scipy import ndimage

    ids = np.unique(instances)
    ids = ids[ids != 0]
    if not len(ids):
        return []
    areas = ndimage.sum_labels(np.ones(instances.shape), instances, ids)
    centres = ndimage.center_of_mass(np.ones(instances.shape), instances, ids)
    rows = []
    for i, a, c in zip(ids, areas, centres):
        t = info.get(int(i), {})
        tid = int(t.get("type", 0))
        rows.append(
            {
                "id": int(i),
                "row": round(float(c[0]), 2),
                "col": round(float(c[1]), 2),
                "area_px": int(a),
                "type": tid,
                "type_name": names.get(tid, "") if t else "",
                "type_fraction": round(float(t.get("type_prob", 0.0)), 4) if t else None,
            }
        )
    return rows


def segment_hovernet(
    record: ImageRecord,
    model: LoadedModel,
    *,
    device: Any = "auto",
    batch_size: int = 4,
    precision: str = "auto",
    fast_path: bool = True,
) -> Generator[Progress, None, dict]:
    """Segment and classify the nuclei of a 2D RGB image with a HoVerNet bundle.

    :func:`napari_medseg.core.segment.segment.segment` calls this for models whose card has
    ``extra["hovernet"]`` and wraps the result in a ``SegmentationResult``.

    Parameters
    ----------
    record : ImageRecord
        2D RGB image ``(rows, cols, 3)``, 0..255.
    model : LoadedModel
        A HoVerNet MONAI bundle (:func:`napari_medseg.models.loaders.bundle.load_bundle`).
    device : str
        ``"auto"``, ``"cpu"``, ``"cuda"``, ``"mps"``.
    batch_size : int
        Windows per forward pass.
    precision : {"auto", "fp32", "bf16", "fp16"}
        Network precision (:func:`napari_medseg.core.engine.fastpath.prepare_network`).
    fast_path : bool
        ``False`` runs the network as loaded (the reference).

    Returns
    -------
    dict
        ``labels`` (uint8 type map, ``(rows, cols)``), ``instances`` (int32 instance map),
        ``objects`` (one dict per nucleus, :func:`nucleus_table`), ``affine``,
        ``class_names``, ``class_colors``, ``provenance``.
    """
    from napari_medseg.core.engine.fastpath import prepare_network
    from napari_medseg.core.engine.preprocess import to_model_grid
    from napari_medseg.core.engine.windows import resolve_device
    from napari_medseg.core.segment.provenance import run_provenance

    t0 = time.perf_counter()
    card = model.card
    spec = dict((card.extra or {}).get("hovernet") or {})
    if record.spatial_ndim != 2:
        raise MedsegError(
            f"model {card.name!r} segments nuclei in 2D images; {record.name!r} has "
            f"{record.spatial_ndim} spatial axes"
        )
    dev = resolve_device(device)
    timings: dict[str, float] = {}
    yield Progress(0, 0, "preparing the image for the model")
    t = time.perf_counter()
    image, grid = to_model_grid(record, card, device="cpu")
    timings["preprocess"] = time.perf_counter() - t
    t = time.perf_counter()
    net, fast = prepare_network(model.network, dev, precision, guard="values", enabled=fast_path)
    timings["prepare_network"] = time.perf_counter() - t

    def run(batch: Any) -> Any:
        return net(batch.to(dev))

    t = time.perf_counter()
    gen = blend_hovernet(
        image,
        run,
        [int(v) for v in card.patch_size],
        float(card.overlap),
        list(spec.get("input_padding") or [0, 0, 0, 0]),
        cval=float(spec.get("cval", 0.0)),
        batch_size=batch_size,
    )
    try:
        while True:
            try:
                p = next(gen)
            except StopIteration as stop:
                maps = stop.value
                break
            total = max(p.total, 1) + 3
            yield Progress(1 + p.done, total, f"running {card.name} on {dev.type}: {p.message}")
    finally:
        gen.close()
    timings["network"] = time.perf_counter() - t
    yield Progress(total - 2, total, "finding the nuclei (watershed) and their types")
    t = time.perf_counter()
    inst, types, info = postprocess_hovernet(maps, spec)
    del maps
    timings["postprocess"] = time.perf_counter() - t
    yield Progress(total - 1, total, "bringing the result back onto the image grid")
    t = time.perf_counter()
    instances = np.ascontiguousarray(grid.labels_to_source(inst))
    labels = np.ascontiguousarray(grid.labels_to_source(types))
    class_names = {int(c["id"]): c["name"] for c in card.classes}
    objects = nucleus_table(instances, info, class_names)
    timings["resample_back"] = time.perf_counter() - t
    elapsed = time.perf_counter() - t0
    timings["total"] = elapsed
    provenance = run_provenance(
        model,
        record,
        {
            "pipeline": "HoVerNet (MONAI SlidingWindowHoVerNetInferer reproduced; MONAI's "
            "HoVerNet post-processing)",
            "roi_size": [int(v) for v in card.patch_size],
            "overlap": float(card.overlap),
            "input_padding": spec.get("input_padding"),
            "batch_size": batch_size,
            "postprocessing": {"instance": spec.get("instance"), "type": spec.get("type")},
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
    provenance["nuclei"] = len(objects)
    yield Progress(total, total, f"{len(objects)} nuclei in {elapsed:.1f} s")
    return dict(
        labels=labels,
        instances=instances.astype(np.int32, copy=False),
        objects=objects,
        affine=np.asarray(record.affine),
        class_names=class_names,
        class_colors=card.class_colors,
        provenance=provenance,
    )
