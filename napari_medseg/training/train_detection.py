"""Train (or fine-tune) a centre-heatmap box detector from an nnU-Net-layout dataset.

:func:`train_detection` is a progress generator like :func:`napari_medseg.training.train.train`
and reuses its pieces: case reading (:mod:`.dataset`), the self-configured card and U-Net
(:func:`.fingerprint.plan`, then the output head is changed to ``K + 2 * dims`` channels, see
:mod:`napari_medseg.core.boxdet`), the held-out split (:func:`.train.split_items`: whole
cases with three or more, else a block of rows/slices), intensity augmentation
(:func:`.train._augment`), :func:`napari_medseg.core.engine.resolve_device` and the
sliding-window engine for validation.

Labels (``labelsTr/CASE.<ending>``), one of:

* an **instance mask** on the image's grid (``.tif``, ``.png``, ``.nii.gz``...): 0 =
  background, each object its own integer. All objects are the first foreground class of
  ``dataset.json`` ``labels`` (or ``object``); a mask cannot say an object's class.
* **boxes as CSV** (``CASE.csv``): the columns of the detection CSV that ``napari-medseg
  detect`` writes: ``y_min, y_max, x_min, x_max`` (2D) or ``z_min, z_max, y_min, y_max,
  x_min, x_max`` (3D), array indices of the image file's axis order (``z`` = axis 0 in 3D,
  ``y`` = axis 0 in 2D), ``min`` inclusive, ``max`` exclusive; optional ``class`` (a name, or
  an id of ``dataset.json`` ``labels``). Other columns (``score``, ``id``, centres...) are
  ignored, so a corrected detection CSV is a label file.
* **boxes as JSON** (``CASE.json``): a list of objects with the same keys (or ``{"boxes":
  [...]}``), or a QuPath-style GeoJSON ``FeatureCollection`` (2D; polygons give the boxes).

Boxes are painted into an instance map (larger boxes first) so that the split and the patch
sampling are the same for both kinds; a box that another box covers completely along a side is
shrunk by it (rare for real objects).

Patches: half are centred (with jitter) on an object. The image and INSTANCE patches go
through the segmentation trainer's augmentation (:func:`.train._augment`: flips, 90-degree
rotations, rotation + scaling with nearest-neighbour labels, intensity scale/shift, gamma,
noise; 3D: no flips by default, anatomy is not symmetric), and the targets are computed from
the augmented instance map, so boxes, sizes and offsets are exact for rotated and scaled
objects. An object not whole in the patch (cut by a patch border that is not the image's
border, or pushed partly out by the rotation) is not a target: its region is left out of the
heatmap loss (it would teach the network to fire at partial objects). With box labels
(CSV/JSON) rotation and scaling are off: a rotated box is not the box of the rotated object.

Validation: the held-out data run through the inference path (sliding window, peak decoding);
precision, recall and F1 of boxes at IoU >= 0.5 and of centres within 6 voxels (score >=
0.5), and AP50, pooled over the held-out data. The checkpoint with the best box F1 is saved.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..core.progress import Progress
from ..io.errors import MedsegError
from ..models.card import ModelCard
from .dataset import (
    Case,
    DatasetError,
    TrainingDataset,
    _ending,
    _read,
    list_cases,
    load_case,
    parse_labels,
    read_dataset_json,
)

BOX_ENDINGS = (".csv", ".json")
#: Share of patches centred on an object.
OBJECT_FRACTION = 0.5
#: Score threshold of the validation P/R/F1 (the Detect dock's and CLI's default).
VAL_THRESHOLD = 0.5

__all__ = [
    "DetectionTrainResult",
    "list_detection_cases",
    "load_detection_dataset",
    "read_box_labels",
    "train_detection",
]


@dataclass
class DetectionTrainResult:
    """What :func:`train_detection` returns.

    Attributes
    ----------
    out_dir : pathlib.Path
        The model folder written.
    card : ModelCard
        Its card (``task = "detection"``, ``metrics`` with the held-out scores).
    best_val_f1 : float or None
        Held-out box F1 at IoU 0.5 of the saved checkpoint (None without validation).
    history : list of dict
        One dict per epoch: ``epoch``, ``iterations``, ``loss``, ``val`` (scores), ``time``.
    """

    out_dir: Path
    card: ModelCard
    best_val_f1: float | None
    history: list[dict] = field(default_factory=list)


# --------------------------------------------------------------------------- dataset


def list_detection_cases(folder: str | Path) -> list[tuple[str, list[Path], Path]]:
    """Cases of a detection dataset: ``(name, image paths by channel, label path)``.

    Like :func:`.dataset.list_cases`, but a label may also be ``CASE.csv`` or ``CASE.json``
    (boxes).
    """
    folder = Path(folder)
    lab_dir = folder / "labelsTr"
    boxes = {}
    if lab_dir.is_dir():
        boxes = {
            p.stem: p
            for p in sorted(lab_dir.iterdir())
            if p.suffix.lower() in BOX_ENDINGS and not p.name.startswith(".")
        }
    if not boxes:
        return list_cases(folder)
    img_dir = folder / "imagesTr"
    if not img_dir.is_dir():
        raise DatasetError(f"dataset {folder.name} has no imagesTr/ folder (nnU-Net layout).")
    masks = {}
    for p in sorted(lab_dir.iterdir()):
        e = _ending(p.name)
        if e is not None and not p.name.startswith("."):
            masks[p.name[: -len(e)]] = p
    channels: dict[str, dict[int, Path]] = {}
    for p in sorted(img_dir.iterdir()):
        e = _ending(p.name)
        if e is None or p.name.startswith("."):
            continue
        stem = p.name[: -len(e)]
        if len(stem) >= 6 and stem[-5] == "_" and stem[-4:].isdigit():
            channels.setdefault(stem[:-5], {})[int(stem[-4:])] = p
        else:
            channels.setdefault(stem, {})[0] = p
    if not channels:
        raise DatasetError(f"dataset {folder.name} has no images in imagesTr/.")
    out = []
    for case in sorted(channels):
        idx = sorted(channels[case])
        if idx != list(range(len(idx))):
            raise DatasetError(f"case {case} has channels {idx} in imagesTr/; expected 0..N-1.")
        lab = boxes.get(case) or masks.get(case)
        if lab is None:
            raise DatasetError(
                f"case {case} has no label in labelsTr/ (an instance mask, {case}.csv or "
                f"{case}.json)."
            )
        out.append((case, [channels[case][i] for i in idx], lab))
    return out


def read_box_labels(
    path: str | Path, ndim: int, labels: dict[int, str] | None = None
) -> tuple[np.ndarray, list[str]]:
    """Read boxes from a label CSV/JSON (module docstring).

    Parameters
    ----------
    path : path-like
    ndim : {2, 3}
        Spatial dimensions of the image.
    labels : dict, optional
        ``{id: name}`` of ``dataset.json``, to turn numeric ``class`` values into names.

    Returns
    -------
    boxes : (N, 2*ndim) float array
        Mins then exclusive maxs, array indices (``z, y, x`` order in 3D).
    classes : list of str
        Class name of each box (``""`` when the file has no class column).
    """
    import pandas as pd

    from ..core.detection import axis_names

    path = Path(path)
    names = axis_names(ndim)
    try:
        if path.suffix.lower() == ".csv":
            table = pd.read_csv(path)
        else:
            doc = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(doc, dict) and doc.get("type") == "FeatureCollection":
                from ..io.detections import from_geojson

                table = from_geojson(doc)
            else:
                rows = doc.get("boxes", []) if isinstance(doc, dict) else doc
                table = pd.DataFrame(list(rows))
    except (OSError, ValueError) as e:
        raise DatasetError(f"cannot read boxes from {path.name}: {e}") from e
    need = [f"{a}_{m}" for a in names for m in ("min", "max")]
    missing = [c for c in need if c not in table.columns]
    if len(table) and missing:
        raise DatasetError(
            f"box label {path.name} lacks the column(s) {', '.join(missing)} (a {ndim}D box "
            f"needs {', '.join(need)})."
        )
    if not len(table):
        return np.zeros((0, 2 * ndim)), []
    cols = [f"{a}_min" for a in names] + [f"{a}_max" for a in names]
    boxes = table[cols].to_numpy(float)
    if not np.isfinite(boxes).all():
        raise DatasetError(f"box label {path.name} holds empty or non-numeric coordinates.")
    bad = np.nonzero((boxes[:, ndim:] <= boxes[:, :ndim]).any(axis=1))[0]
    if len(bad):
        raise DatasetError(
            f"box label {path.name}: row {int(bad[0]) + 1} has a max not above its min "
            "(max is exclusive)."
        )
    classes = []
    for v in table["class"] if "class" in table.columns else [""] * len(table):
        s = "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)
        if labels and s.strip().lstrip("-").isdigit() and int(s) in labels:
            s = labels[int(s)]
        classes.append(s)
    return boxes, classes


def _read_image(name: str, paths: list[Path]) -> tuple[np.ndarray, np.ndarray, str, bool]:
    """The image channels of a case with box labels: ``(C, *spatial)`` float32 + geometry."""
    chans, affine, space, rgb, spatial = [], None, "RAS", False, None
    for p in paths:
        data, aff, space, is_rgb = _read(p)
        nsp = 2 if space == "pixel" else 3
        if data.ndim == nsp:
            parts = [data]
        elif data.ndim == nsp + 1:
            parts = [data[..., c] for c in range(data.shape[-1])]
            rgb = rgb or is_rgb
        else:
            raise DatasetError(
                f"case {name}: image {p.name} has an unsupported shape {data.shape}."
            )
        for a in parts:
            if spatial is None:
                spatial, affine = a.shape, aff
            elif a.shape != spatial:
                raise DatasetError(
                    f"case {name}: channel {p.name} has shape {a.shape}, not {spatial}."
                )
            chans.append(np.asarray(a, dtype=np.float32))
    image = np.stack(chans, 0)
    if not np.all(np.isfinite(image)):
        image = np.nan_to_num(image, nan=float(np.nanmin(image)), posinf=0.0, neginf=0.0)
    return image, np.asarray(affine, float), space, rgb


def paint_boxes(boxes: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Instance map of boxes (object ``i`` = value ``i + 1``), larger boxes painted first."""
    d = len(shape)
    lab = np.zeros(shape, np.int32)
    b = np.asarray(boxes, float).reshape(-1, 2 * d)
    lo = np.clip(np.floor(b[:, :d]).astype(int), 0, np.asarray(shape))
    hi = np.clip(np.ceil(b[:, d:]).astype(int), 0, np.asarray(shape))
    order = np.argsort(-np.prod(hi - lo, axis=1), kind="stable")
    for i in order:
        lab[tuple(slice(a, z) for a, z in zip(lo[i], hi[i]))] = i + 1
    return lab


def load_detection_dataset(
    folder: str | Path,
) -> Generator[Progress, None, tuple[TrainingDataset, list[dict[int, str]]]]:
    """Read a detection dataset; yields per case, returns the dataset and object classes.

    Returns
    -------
    dataset : TrainingDataset
        Cases with ``label`` = instance map (from the mask or the painted boxes); ``labels``
        = ``{0: "background", 1..K: class names}``.
    object_classes : list of dict
        Per case, ``{instance value: class name}``.
    """
    folder = Path(folder)
    meta = read_dataset_json(folder)
    known = parse_labels(meta.get("labels"))
    entries = list_detection_cases(folder)
    cases: list[Case] = []
    obj_cls: list[dict[int, str]] = []
    default = (known or {}).get(1, "object")
    for i, (name, imgs, lab) in enumerate(entries):
        yield Progress(i, len(entries), f"reading {name} ({i + 1}/{len(entries)})")
        if lab.suffix.lower() in BOX_ENDINGS:
            image, affine, space, rgb = _read_image(name, imgs)
            nsp = image.ndim - 1
            boxes, classes = read_box_labels(lab, nsp, known)
            inst = paint_boxes(boxes, image.shape[1:])
            lin = affine[:-1, :-1]
            spacing = tuple(float(v) for v in np.sqrt((lin**2).sum(axis=0)))
            case = Case(name, image, inst, affine, spacing, space, rgb)
            cmap = {k + 1: (c or default) for k, c in enumerate(classes)}
        else:
            case = load_case(name, imgs, lab)
            ids = np.unique(case.label)
            cmap = {int(k): default for k in ids if k > 0}
        cases.append(case)
        obj_cls.append(cmap)
    if not cases:
        raise DatasetError(f"dataset {folder.name} has no cases.")
    if len({c.dims for c in cases}) > 1:
        raise DatasetError(f"dataset {folder.name} mixes 2D and 3D cases.")
    if len({c.image.shape[0] for c in cases}) > 1:
        raise DatasetError(f"dataset {folder.name}: cases have different channel counts.")
    if known:
        names = [known[k] for k in sorted(known) if k != 0]
        extra = sorted({c for m in obj_cls for c in m.values()} - set(names))
        if extra:
            raise DatasetError(
                f"box class {extra[0]!r} is not listed in dataset.json labels {names}."
            )
    else:
        names = sorted({c for m in obj_cls for c in m.values()}) or ["object"]
    labels = {0: "background", **{k + 1: n for k, n in enumerate(names)}}
    raw_ch = meta.get("channel_names") or meta.get("modality") or {}
    n = cases[0].image.shape[0]
    if cases[0].rgb and not raw_ch:
        channel_names = {0: "R", 1: "G", 2: "B"}
    else:
        channel_names = {int(k): str(v) for k, v in raw_ch.items()}
        for i in range(n):
            channel_names.setdefault(i, "unknown")
    ds = TrainingDataset(
        path=folder,
        name=str(meta.get("name") or folder.name),
        labels=labels,
        channel_names=channel_names,
        description=str(meta.get("description", "")),
        cases=cases,
        json=meta,
    )
    return ds, obj_cls


# --------------------------------------------------------------------------- items


@dataclass
class _Objects:
    """Boxes of one training/validation item (on the model grid, item coordinates)."""

    boxes: np.ndarray  # (N, 2d) float
    classes: np.ndarray  # (N,) heatmap channel
    ids: np.ndarray  # (N,) instance values


def _objects(label: np.ndarray, cls_of: dict[int, int]) -> _Objects:
    from scipy import ndimage as ndi

    d = label.ndim
    objs = ndi.find_objects(np.asarray(label, dtype=np.int64))
    boxes, classes, ids = [], [], []
    for i, sl in enumerate(objs):
        if sl is None:
            continue
        boxes.append([s.start for s in sl] + [s.stop for s in sl])
        classes.append(cls_of.get(i + 1, 0))
        ids.append(i + 1)
    return _Objects(
        np.asarray(boxes, float).reshape(-1, 2 * d),
        np.asarray(classes, int),
        np.asarray(ids, np.int64),
    )


def _sample(
    items: list[Any],
    objs: list[_Objects],
    patch: list[int],
    batch: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, list[tuple[set, set, dict]]]:
    """A batch of image and instance-map patches, and which objects each patch holds whole.

    Returns ``(images (B, C, *patch), instances (B, 1, *patch), info)``; ``info[b]`` =
    ``(ids whole in the patch, ids whole but touching its border, {id: class channel})``. Half
    the patches are centred (with jitter) on an object.
    """
    from ..core.boxdet import box_centres

    d = len(patch)
    p = np.asarray(patch)
    xs, ys, info = [], [], []
    weights = np.asarray([max(1, len(o.boxes)) for o in objs], float)
    for _ in range(batch):
        k = int(rng.choice(len(items), p=weights / weights.sum()))
        it, ob = items[k], objs[k]
        shape = np.asarray(it.label.shape)
        if len(ob.boxes) and rng.random() < OBJECT_FRACTION:
            c, _ = box_centres(ob.boxes[rng.integers(len(ob.boxes))][None])
            jit = rng.integers(-(p // 4), p // 4 + 1)
            start = np.clip(np.round(c[0]).astype(int) - p // 2 + jit, 0, shape - p)
        else:
            start = np.array([rng.integers(0, s - q + 1) for s, q in zip(shape, p)])
        sl = tuple(slice(int(a), int(a) + int(q)) for a, q in zip(start, p))
        xs.append(it.image[(slice(None), *sl)])
        ys.append(it.label[sl])
        bb = ob.boxes - np.concatenate([start, start])[None]
        inside = (bb[:, :d] >= 0).all(1) & (bb[:, d:] <= p).all(1)
        touching = inside & ((bb[:, :d] == 0).any(1) | (bb[:, d:] == p).any(1))
        cls = dict(zip(ob.ids.tolist(), ob.classes.tolist()))
        info.append((set(ob.ids[inside].tolist()), set(ob.ids[touching].tolist()), cls))
    return np.stack(xs), np.stack(ys)[:, None], info


def _targets(
    labels: np.ndarray, info: list[tuple[set, set, dict]], n_classes: int, spec: dict
) -> dict[str, np.ndarray]:
    """Targets of augmented instance patches ``(B, 1, *patch)``.

    An object is a target when it was whole in the patch before augmentation and, after it,
    does not newly touch the patch border (a rotation or scaling can push it partly out); all
    other objects in the patch are left out of the heatmap loss (``ignore``).
    """
    from scipy import ndimage as ndi

    from ..core.boxdet import encode_targets

    out = []
    for b in range(labels.shape[0]):
        lab = np.asarray(labels[b, 0])
        whole, touching, cls_of = info[b]
        pos, cls, ign = [], [], []
        for i, sl in enumerate(ndi.find_objects(lab)):
            if sl is None:
                continue
            box = [s.start for s in sl] + [s.stop for s in sl]
            touches = any(s.start == 0 or s.stop == n for s, n in zip(sl, lab.shape))
            if (i + 1) in whole and (not touches or (i + 1) in touching):
                pos.append(box)
                cls.append(cls_of.get(i + 1, 0))
            else:
                ign.append(box)
        out.append(
            encode_targets(
                np.asarray(pos, float),
                np.asarray(cls, int),
                lab.shape,
                n_classes,
                ignore=np.asarray(ign, float) if ign else None,
                min_sigma=float(spec["min_sigma"]),
                sigma_factor=float(spec["sigma_factor"]),
            )
        )
    return {k: np.stack([t[k] for t in out]) for k in out[0]}


def _scored_boxes(item: Any, boxes: np.ndarray) -> np.ndarray:
    """Which boxes (by centre) lie in the scored part of a validation item."""
    from ..core.boxdet import box_centres

    if item.score is None or len(boxes) == 0:
        return np.ones(len(boxes), bool)
    axis, a, b = item.score
    c, _ = box_centres(boxes)
    return (c[:, axis] >= a - 0.5) & (c[:, axis] < b - 0.5)


# --------------------------------------------------------------------------- train


def train_detection(
    dataset_dir: str | Path,
    out_dir: str | Path,
    *,
    dims: int | None = None,
    init: str | Path | None = None,
    time_budget: float | None = 600.0,
    max_epochs: int | None = None,
    device: str = "auto",
    val_fraction: float = 0.2,
    seed: int = 0,
    width: int = 16,
    batch_size: int | None = None,
    patch_size: list[int] | None = None,
    name: str | None = None,
    lr: float | None = None,
    iterations_per_epoch: int = 50,
    voxel_budget: int | None = None,
    augment: dict | None = None,
    license: str | None = None,
    spacing: list[float] | None = None,
    num_res_units: int | None = None,
) -> Generator[Progress, None, DetectionTrainResult]:
    """Train (or fine-tune) a centre-heatmap box detector.

    Parameters
    ----------
    dataset_dir : path-like
        ``imagesTr/`` and ``labelsTr/`` (instance masks, or boxes as CSV/JSON: module
        docstring), optional ``dataset.json``.
    out_dir : path-like
        Model folder to write.
    dims : {2, 3}, optional
        Must match the images; detected when None.
    init : path-like, optional
        A detector model folder to fine-tune (same dimension, channels and classes).
    time_budget : float or None
        Seconds of training, validation included (None needs ``max_epochs``).
    max_epochs : int, optional
    device : str
        ``"auto"``, ``"cpu"``, ``"cuda"``, ``"mps"``.
    val_fraction : float
        Share of cases (>= 3 cases) or of rows/slices of each case held out.
    seed : int
    width : int
        First-level channels of the U-Net (doubles per level up to 4x).
    batch_size, patch_size : optional
        Override the planned batch and patch (model axis order).
    name : str, optional
    lr : float, optional
        AdamW learning rate, poly decay (default 3e-3, 1e-3 when fine-tuning).
    iterations_per_epoch : int
        An epoch also ends after ``max(time_budget / 8, 1)`` seconds.
    voxel_budget : int, optional
    augment : dict, optional
        Overrides of :func:`.train.default_augmentation` (e.g. ``{"affine_p": 0.5}``);
        rotation and scaling are switched off for box labels.
    license : str, optional
    spacing : list of float, optional
        Target spacing (3D, mm along R, A, S).
    num_res_units : int, optional
        Residual units per U-Net level (default: the planner's 2).

    Yields
    ------
    Progress
        ``info = {"epoch", "iteration", "loss", "val_f1", "phase"}``.

    Returns
    -------
    DetectionTrainResult
    """
    from .fingerprint import compute_fingerprint, plan
    from .train import _augment, _bump_version, _pad_to, default_augmentation, split_items

    out_dir = Path(out_dir)
    time_budget = math.inf if time_budget is None else float(time_budget)
    if not math.isfinite(time_budget) and not max_epochs:
        raise ValueError("train_detection() needs a finite time_budget or max_epochs")
    if lr is None:
        lr = 1e-3 if init is not None else 3e-3
    ds, obj_cls = yield from load_detection_dataset(dataset_dir)
    box_labels = any(
        lab.suffix.lower() in BOX_ENDINGS for _, _, lab in list_detection_cases(dataset_dir)
    )
    if dims is not None and dims != ds.dims:
        raise DatasetError(f"dims={dims} was asked but the dataset holds {ds.dims}D images.")
    fg_names = [ds.labels[k] for k in sorted(ds.labels) if k != 0]
    yield Progress(0, 0, "dataset fingerprint")
    binary = copy.copy(ds)
    binary.cases = [copy.copy(c) for c in ds.cases]
    for c in binary.cases:
        c.label = (c.label > 0).astype(np.int16)
    binary.labels = {0: "background", 1: "object"}
    fp = compute_fingerprint(binary, seed=seed)
    yield Progress(0, 0, "loading torch")
    import torch

    from ..core.boxdet import (
        DEFAULTS,
        centernet_loss,
        class_list,
        decode,
        detection_scores,
        detector_spec,
        head_channels,
        init_heatmap_bias,
        is_box_detector,
        predict_maps,
    )
    from ..core.engine import resolve_device
    from ..models.networks import build_network, load_model_folder, save_model
    from .train import case_to_model_grid

    yield Progress(0, 0, "planning")
    parent_net = None
    if init is not None:
        loaded = load_model_folder(init)
        card = copy.deepcopy(loaded.card)
        if not is_box_detector(card):
            raise MedsegError(f"model {card.name!r} is not a box detector; cannot fine-tune it.")
        if card.dims != ds.dims:
            raise MedsegError(
                f"model {card.name!r} is {card.dims}D but the dataset holds {ds.dims}D images."
            )
        if card.in_channels != ds.in_channels:
            raise MedsegError(
                f"model {card.name!r} takes {card.in_channels} channel(s) but the dataset "
                f"images have {ds.in_channels}."
            )
        old = [str(c["name"]) for c in class_list(card)]
        if old != fg_names and not (len(old) == len(fg_names) == 1):
            raise MedsegError(
                f"model {card.name!r} detects {old} but the dataset has classes {fg_names}; "
                "fine-tuning keeps the classes."
            )
        card.parent = f"{card.name}@{card.version}"
        card.version = _bump_version(card.version)
        if name:
            card.name = name
        parent_net = loaded.network
        card.metrics, card.training = {}, {}
    else:
        card = plan(
            _with_classes(binary, ds.labels),
            fp,
            name=name or out_dir.name,
            width=width,
            voxel_budget=voxel_budget,
            patch_size=patch_size,
            spacing=spacing,
        )
        card.task = "detection"
        K = len(fg_names)
        card.detection = {**DEFAULTS, "n_classes": K}
        kw = card.architecture["kwargs"]
        kw["out_channels"] = head_channels(K, card.dims)
        if num_res_units is not None:
            kw["num_res_units"] = int(num_res_units)
        card.postprocessing = {}
        card.license = license or str(ds.json.get("licence") or ds.json.get("license") or "unknown")
    spec = detector_spec(card)
    K = int(spec["n_classes"])
    patch = [int(p) for p in card.patch_size]
    if batch_size is None:
        budget = 2 * 96**3 // 4 if card.dims == 3 else 8 * 128**2
        batch_size = int(np.clip(budget // int(np.prod(patch)), 2, 16))
    aug = default_augmentation(card.dims, card.modality)
    aug.update(augment or {})
    if box_labels:
        # a rotated or scaled painted box is not the box of the rotated object: flips and
        # 90-degree rotations only (exact for boxes)
        aug["affine_p"] = 0.0
    cls_index = {n: i for i, n in enumerate(fg_names)}

    data, names, cls_maps = [], [], []
    for i, c in enumerate(ds.cases):
        yield Progress(0, 0, f"preprocessing {c.name} ({i + 1}/{len(ds.cases)})")
        img, lab, _ = case_to_model_grid(c, card)
        data.append((img, lab))
        names.append(c.name)
        cls_maps.append({k: cls_index.get(v, 0) for k, v in obj_cls[i].items()})
    train_items, val_items, split = split_items(names, data, card.dims, val_fraction, seed, patch)
    case_of = {n: i for i, n in enumerate(names)}

    def base_case(item_name: str) -> int:
        return case_of.get(item_name, case_of.get(item_name.split("[", 1)[0], 0))

    for it in train_items:
        _pad_to(it, patch)
    train_objs = [_objects(it.label, cls_maps[base_case(it.name)]) for it in train_items]
    val_objs = [_objects(v.label, cls_maps[base_case(v.name)]) for v in val_items]
    rng = np.random.default_rng(seed)

    yield Progress(0, 0, "building the network")
    dev = resolve_device(device)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    if parent_net is not None:
        net = parent_net
    else:
        net = build_network(card)
        init_heatmap_bias(net, head_channels(K, card.dims), K)
    net = net.to(dev).train()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=3e-5)

    history: list[dict] = []
    best: dict | None = None
    best_state = None
    best_epoch = 0
    iteration = epoch = 0
    last_val: float | None = None
    train_start = time.monotonic()
    epoch_cap = max(time_budget / 8.0, 1.0)
    total_iters = (max_epochs or 0) * iterations_per_epoch

    def elapsed() -> float:
        return time.monotonic() - train_start

    def progress(msg: str, loss: float | None, phase: str) -> Progress:
        info = {"epoch": epoch, "iteration": iteration, "loss": loss, "val_f1": last_val,
                "phase": phase}  # fmt: skip
        if max_epochs and not math.isfinite(time_budget):
            return Progress(iteration, total_iters, msg, info)
        return Progress(int(min(elapsed(), time_budget)), int(time_budget), msg, info)

    def poly_lr() -> float:
        frac = elapsed() / time_budget if math.isfinite(time_budget) else 0.0
        if max_epochs:
            frac = max(frac, iteration / max(total_iters, 1))
        return lr * (1 - min(frac, 0.999)) ** 0.9

    def validate() -> Generator[Progress, None, dict]:
        net.eval()
        preds, gts = [], []
        for v, ob in zip(val_items, val_objs):
            maps = yield from predict_maps(v.image, net, card, device=dev, batch_size=1, amp=False)
            dec = decode(maps, K, peak_threshold=float(spec["peak_threshold"]),
                         nms_radius=int(spec["nms_radius"]))  # fmt: skip
            d = card.dims
            hi = np.asarray(v.label.shape, float)
            dec["boxes"][:, :d] = np.clip(dec["boxes"][:, :d], 0, hi)  # as the detection table
            dec["boxes"][:, d:] = np.clip(dec["boxes"][:, d:], 0, hi)
            keep = _scored_boxes(v, dec["boxes"])
            preds.append((dec["boxes"][keep], dec["scores"][keep]))
            gts.append(ob.boxes[_scored_boxes(v, ob.boxes)])
            yield progress(f"validated {v.name}", None, "validation")
        net.train()
        return detection_scores(preds, gts, threshold=VAL_THRESHOLD, iou=0.5, distance=6.0)

    stop = False
    val_time = 0.0
    while not stop:
        epoch += 1
        net.train()
        losses: list[float] = []
        ep_start = time.monotonic()
        for _ in range(iterations_per_epoch):
            if (losses and elapsed() + val_time >= time_budget) or elapsed() >= time_budget:
                stop = True
                break
            xs, ys, info = _sample(train_items, train_objs, patch, batch_size, rng)
            x, y = _augment(torch.from_numpy(xs), torch.from_numpy(ys.astype(np.int64)), aug, gen)
            tg = _targets(y.numpy(), info, K, spec)
            tgt = {k: torch.from_numpy(v) for k, v in tg.items()}
            for g in opt.param_groups:
                g["lr"] = poly_lr()
            opt.zero_grad(set_to_none=True)
            loss, _ = centernet_loss(net(x.to(dev)), {k: v.to(dev) for k, v in tgt.items()}, K)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 12.0)
            opt.step()
            iteration += 1
            losses.append(float(loss.detach()))
            yield progress(
                f"epoch {epoch} iteration {iteration} loss {losses[-1]:.3f}", losses[-1], "train"
            )
            if time.monotonic() - ep_start > epoch_cap:
                break
        if not losses:
            epoch -= 1
            break
        if (max_epochs and epoch >= max_epochs) or elapsed() >= time_budget:
            stop = True
        rec: dict[str, Any] = {
            "epoch": epoch,
            "iterations": iteration,
            "loss": round(float(np.mean(losses)), 4),
            "lr": round(poly_lr(), 6),
        }
        if val_items:
            v0 = time.monotonic()
            scores = yield from validate()
            val_time = time.monotonic() - v0
            f1 = scores["boxes_iou50"]["f1"]
            last_val = f1
            rec["val"] = scores
            key = (f1, scores["ap50"])
            if best is None or key > (best["boxes_iou50"]["f1"], best["ap50"]):
                best, best_epoch = scores, epoch
                best_state = {k: t.detach().cpu().clone() for k, t in net.state_dict().items()}
        rec["time"] = round(elapsed(), 1)
        history.append(rec)
        yield progress(
            f"epoch {epoch} done: loss {rec['loss']:.3f}"
            + (f", val box F1 {last_val:.3f}" if last_val is not None else ""),
            rec["loss"],
            "epoch",
        )

    if iteration == 0:
        raise MedsegError("the time budget ended before the first training iteration.")
    train_time = elapsed()
    if best_state is not None:
        net.load_state_dict(best_state)
    net = net.cpu().eval()
    card.training = {
        "dataset": {
            "path": str(Path(dataset_dir).resolve()),
            "name": ds.name,
            "description": ds.description,
        },
        "n_train_cases": len(split["train_cases"]),
        "n_val_cases": len(split["val_cases"]),
        "train_cases": split["train_cases"],
        "val_cases": split["val_cases"],
        "validation_split": split,
        "recipe": {
            "task": "detection (centre heatmap + log size + offset)",
            "patch_size": patch,
            "batch_size": batch_size,
            "optimizer": "AdamW",
            "lr": lr,
            "lr_schedule": "poly 0.9 over the time budget",
            "loss": "CenterNet focal heatmap loss (alpha 2, beta 4) + L1 log size + L1 offset",
            "epochs": epoch,
            "iterations": iteration,
            "iterations_per_epoch": iterations_per_epoch,
            "time_s": round(train_time, 1),
            "time_budget_s": time_budget,
            "object_centred_patches": OBJECT_FRACTION,
            "augmentations": aug,
            "seed": seed,
            "device": str(dev),
            "best_epoch": best_epoch,
        },
        "history": history,
        "fine_tuned_from": str(init) if init is not None else None,
    }
    if best is not None:
        grid = "the model grid (card spacing, RAS axes)" if card.dims == 3 else "the image pixels"
        card.metrics = {
            "val_detection": best,
            "val_f1_iou50": best["boxes_iou50"]["f1"],
            "val_f1_iou50_last_epoch": history[-1].get("val", {}).get("boxes_iou50", {}).get("f1"),
            "score_threshold": VAL_THRESHOLD,
            "held_out": split["held_out"],
            "val_cases": split["val_cases"],
            "computed_on": f"{grid}; P/R/F1 at score >= {VAL_THRESHOLD}: boxes matched one to "
            "one at IoU >= 0.5 and centres within 6 voxels; AP50 over all scores; pooled over "
            "the held-out data. The saved checkpoint is the best epoch by box F1, so the figure "
            "is slightly optimistic (see val_f1_iou50_last_epoch)",
        }
    else:
        card.metrics = {"held_out": split["held_out"]}
    yield progress("saving the model", None, "save")
    save_model(out_dir, card, net)
    return DetectionTrainResult(
        out_dir=out_dir,
        card=card,
        best_val_f1=None if best is None else best["boxes_iou50"]["f1"],
        history=history,
    )


def _with_classes(ds: TrainingDataset, labels: dict[int, str]) -> TrainingDataset:
    """A shallow copy of ``ds`` whose ``labels`` are the detector's classes (for the planner)."""
    out = copy.copy(ds)
    out.labels = dict(labels)
    return out
