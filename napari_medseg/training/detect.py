"""Train (or fine-tune) a centre-heatmap box detector from an nnU-Net-layout dataset.

:func:`train_detection` is a progress generator like :func:`napari_medseg.training.segment.train`
and shares its pieces: the settings (:class:`.options.TrainOptions`), case listing and reading
(:mod:`.dataset`), the epoch loop (time budget, poly learning rate, best checkpoint:
:class:`.loop.EpochLoop`), the self-configured card and U-Net (:func:`.fingerprint.plan`, then
the output head is changed to ``K + 2 * dims`` channels, see
:mod:`napari_medseg.core.detect.boxes`), the held-out split (:func:`.patches.split_items`: whole
cases with three or more, else a block of rows/slices), the augmentation
(:func:`.augment.augment`), :func:`napari_medseg.core.engine.windows.resolve_device` and the
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
through the trainers' augmentation (:func:`.augment.augment`: flips, 90-degree
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
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_medseg.errors import MedsegError
from napari_medseg.models.card import ModelCard
from napari_medseg.progress import Progress
from napari_medseg.training.augment import augment
from napari_medseg.training.dataset import (
    BOX_ENDINGS,
    Case,
    DatasetError,
    TrainingDataset,
    affine_spacing,
    check_cases_agree,
    list_cases,
    load_case,
    make_dataset,
    parse_labels,
    read_channels,
    read_dataset_json,
)
from napari_medseg.training.loop import EpochLoop, Validation, resolve_budget, training_block
from napari_medseg.training.options import TrainOptions, check_init_fits, make_child
from napari_medseg.training.patches import pad_to, split_items

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

    :func:`.dataset.list_cases` with ``boxes=True``: a label may also be ``CASE.csv`` or
    ``CASE.json`` (boxes).
    """
    return list_cases(folder, boxes=True)


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

    from napari_medseg.core.detect.result import axis_names

    path = Path(path)
    names = axis_names(ndim)
    try:
        if path.suffix.lower() == ".csv":
            table = pd.read_csv(path)
        else:
            doc = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(doc, dict) and doc.get("type") == "FeatureCollection":
                from napari_medseg.io.detections import from_geojson

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
            image, affine, space, rgb = read_channels(name, imgs)
            nsp = image.ndim - 1
            boxes, classes = read_box_labels(lab, nsp, known)
            inst = paint_boxes(boxes, image.shape[1:])
            case = Case(name, image, inst, affine, affine_spacing(affine), space, rgb)
            cmap = {k + 1: (c or default) for k, c in enumerate(classes)}
        else:
            case = load_case(name, imgs, lab)
            ids = np.unique(case.label)
            cmap = {int(k): default for k in ids if k > 0}
        cases.append(case)
        obj_cls.append(cmap)
    if not cases:
        raise DatasetError(f"dataset {folder.name} has no cases.")
    check_cases_agree(folder, cases)
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
    ds = make_dataset(folder, meta, labels, cases)
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
    from napari_medseg.core.detect.boxes import box_centres

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

    from napari_medseg.core.detect.boxes import encode_targets

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
    from napari_medseg.core.detect.boxes import box_centres

    if item.score is None or len(boxes) == 0:
        return np.ones(len(boxes), bool)
    axis, a, b = item.score
    c, _ = box_centres(boxes)
    return (c[:, axis] >= a - 0.5) & (c[:, axis] < b - 0.5)


# --------------------------------------------------------------------------- train


def train_detection(
    dataset_dir: str | Path,
    out_dir: str | Path,
    options: TrainOptions | None = None,
    **settings: Any,
) -> Generator[Progress, None, DetectionTrainResult]:
    """Train (or fine-tune) a centre-heatmap box detector.

    Parameters
    ----------
    dataset_dir : path-like
        ``imagesTr/`` and ``labelsTr/`` (instance masks, or boxes as CSV/JSON: module
        docstring), optional ``dataset.json``.
    out_dir : path-like
        Model folder to write.
    options : TrainOptions, optional
        The run's settings (default ``TrainOptions()``), as for
        :func:`napari_medseg.training.segment.train`; ``init`` must be a detector with the same
        dimension, channels and classes, and ``augment`` rotation and scaling are switched off
        for box labels.
    **settings
        :class:`TrainOptions` fields as keywords; they replace those of ``options``.

    Yields
    ------
    Progress
        ``info = {"epoch", "iteration", "loss", "val_f1", "phase"}``.

    Returns
    -------
    DetectionTrainResult
    """
    from napari_medseg.training.fingerprint import compute_fingerprint
    from napari_medseg.training.segment import case_to_model_grid

    o = TrainOptions.merged(options, settings)
    out_dir = Path(out_dir)
    time_budget = resolve_budget(o.time_budget, o.max_epochs, "train_detection")
    lr = o.learning_rate()
    ds, obj_cls = yield from load_detection_dataset(dataset_dir)
    box_labels = any(
        lab.suffix.lower() in BOX_ENDINGS for _, _, lab in list_detection_cases(dataset_dir)
    )
    o.check_dims(ds)
    fg_names = [ds.labels[k] for k in sorted(ds.labels) if k != 0]
    yield Progress(0, 0, "dataset fingerprint")
    binary = copy.copy(ds)
    binary.cases = [copy.copy(c) for c in ds.cases]
    for c in binary.cases:
        c.label = (c.label > 0).astype(np.int16)
    binary.labels = {0: "background", 1: "object"}
    fp = compute_fingerprint(binary, seed=o.seed)
    yield Progress(0, 0, "loading torch")
    import torch

    from napari_medseg.core.detect.boxes import (
        DEFAULTS,
        centernet_loss,
        class_list,
        decode,
        detector_spec,
        head_channels,
        init_heatmap_bias,
        is_box_detector,
        predict_maps,
    )
    from napari_medseg.core.detect.scores import detection_scores
    from napari_medseg.core.engine.windows import resolve_device
    from napari_medseg.models.loaders.folder import load_model_folder
    from napari_medseg.models.networks import build_network, save_model

    yield Progress(0, 0, "planning")
    parent_net = None
    if o.init is not None:
        loaded = load_model_folder(o.init)
        card = copy.deepcopy(loaded.card)
        if not is_box_detector(card):
            raise MedsegError(f"model {card.name!r} is not a box detector; cannot fine-tune it.")
        check_init_fits(card, ds)
        old = [str(c["name"]) for c in class_list(card)]
        if old != fg_names and not (len(old) == len(fg_names) == 1):
            raise MedsegError(
                f"model {card.name!r} detects {old} but the dataset has classes {fg_names}; "
                "fine-tuning keeps the classes."
            )
        make_child(card, o.name)
        parent_net = loaded.network
    else:
        card = o.plan_card(_with_classes(binary, ds.labels), fp, out_dir)
        card.task = "detection"
        K = len(fg_names)
        card.detection = {**DEFAULTS, "n_classes": K}
        card.architecture["kwargs"]["out_channels"] = head_channels(K, card.dims)
        card.postprocessing = {}
    spec = detector_spec(card)
    K = int(spec["n_classes"])
    patch = [int(p) for p in card.patch_size]
    batch_size = o.batch_for(card, patch)
    aug = o.augmentation_for(card)
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
    train_items, val_items, split = split_items(
        names, data, card.dims, o.val_fraction, o.seed, patch
    )
    case_of = {n: i for i, n in enumerate(names)}

    def base_case(item_name: str) -> int:
        return case_of.get(item_name, case_of.get(item_name.split("[", 1)[0], 0))

    for it in train_items:
        pad_to(it, patch)
    train_objs = [_objects(it.label, cls_maps[base_case(it.name)]) for it in train_items]
    val_objs = [_objects(v.label, cls_maps[base_case(v.name)]) for v in val_items]
    rng = np.random.default_rng(o.seed)

    yield Progress(0, 0, "building the network")
    dev = resolve_device(o.device)
    torch.manual_seed(o.seed)
    gen = torch.Generator().manual_seed(o.seed)
    if parent_net is not None:
        net = parent_net
    else:
        net = build_network(card)
        init_heatmap_bias(net, head_channels(K, card.dims), K)
    net = net.to(dev).train()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=3e-5)
    loop = EpochLoop(lr, time_budget, o.max_epochs, o.iterations_per_epoch, "val_f1", "val box F1")

    def sample() -> tuple[Any, dict]:
        xs, ys, info = _sample(train_items, train_objs, patch, batch_size, rng)
        x, y = augment(torch.from_numpy(xs), torch.from_numpy(ys.astype(np.int64)), aug, gen)
        tg = _targets(y.numpy(), info, K, spec)
        return x, {k: torch.from_numpy(v) for k, v in tg.items()}

    def batch_loss(batch: tuple[Any, dict]) -> Any:
        x, tgt = batch
        return centernet_loss(net(x.to(dev)), {k: v.to(dev) for k, v in tgt.items()}, K)[0]

    def validate() -> Generator[Progress, None, Validation]:
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
            yield loop.progress(f"validated {v.name}", None, "validation")
        net.train()
        scores = detection_scores(preds, gts, threshold=VAL_THRESHOLD, iou=0.5, distance=6.0)
        f1 = scores["boxes_iou50"]["f1"]
        return Validation({"val": scores}, f1, rank=(f1, scores["ap50"]), details=scores)

    net = yield from loop.run(net, opt, sample, batch_loss, validate if val_items else None)
    history = loop.history
    card.training = training_block(
        loop,
        dataset_dir,
        ds,
        split,
        head={"task": "detection (centre heatmap + log size + offset)"},
        patch_size=patch,
        batch_size=batch_size,
        loss="CenterNet focal heatmap loss (alpha 2, beta 4) + L1 log size + L1 offset",
        sampling={"object_centred_patches": OBJECT_FRACTION},
        augmentations=aug,
        seed=o.seed,
        device=dev,
        init=o.init,
    )
    best = None if loop.best is None else loop.best.details
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
    yield loop.progress("saving the model", None, "save")
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
