"""Model cards: the ``model.json`` that makes a model a folder of data (ARCHITECTURE.md rule 5).

A model folder holds ``model.json`` (this card) and its weights (``weights.safetensors``
preferred; a ``.pt`` state dict is loaded with ``weights_only=True``). The card says everything
the engine needs to run the model on a new image and everything a person needs to trust it.

Example ``model.json``::

    {
      "name": "ct_spleen_3d", "version": "1", "task": "segmentation",
      "dims": 3, "modality": "CT", "in_channels": 1,
      "classes": [{"id": 0, "name": "background"},
                  {"id": 1, "name": "spleen", "color": "#e6194b"}],
      "spacing": [1.6, 1.6, 5.0],          # mm, along the model's axes (see "orientation")
      "orientation": "RAS",                # axis codes the model's axes point to
      "patch_size": [96, 96, 16],          # voxels, model axis order
      "normalization": {"scheme": "ct", "window": [-160, 240]},
      "architecture": {"name": "UNet", "kwargs": {...}},   # a class in monai.networks.nets
      "weights": "weights.safetensors", "sha256": "...",
      "license": "CC-BY-SA-4.0",
      "training": {...}, "metrics": {...}
    }

A box detector (:mod:`napari_medseg.core.detect.boxes`) has ``"task": "detection"`` and a
``"detection"`` block naming its head (``{"head": "centernet", "n_classes": K, ...}``); its
network outputs ``K`` centre heatmaps, ``dims`` log box sizes and ``dims`` centre offsets.

Normalisation schemes (:mod:`napari_medseg.core.engine.preprocess` implements them):

* ``{"scheme": "ct", "window": [lo, hi]}``: clip HU to the window, scale to [0, 1].
* ``{"scheme": "zscore", "foreground_only": true}``: (x - mean) / std, statistics over voxels
  above the image's lowest percentile (the head/body, not the air), per channel.
* ``{"scheme": "percentile", "lower": 0.5, "upper": 99.5}``: clip to percentiles, scale to [0, 1].
* ``{"scheme": "rgb", "mean": [...], "std": [...]}``: per-channel, values in [0, 1] first.
* ``{"scheme": "none"}``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

CARD_NAME = "model.json"
TASKS = ("segmentation", "detection", "denoising", "registration", "interactive")

#: A fixed, readable palette for class colours (index 1 is the first foreground class).
PALETTE = [
    "#000000",
    "#e6194b",
    "#3cb44b",
    "#ffe119",
    "#4363d8",
    "#f58231",
    "#911eb4",
    "#46f0f0",
    "#f032e6",
    "#bcf60c",
    "#fabebe",
    "#008080",
    "#e6beff",
    "#9a6324",
    "#fffac8",
    "#800000",
    "#aaffc3",
    "#808000",
    "#ffd8b1",
    "#000075",
    "#808080",
]


@dataclass
class ModelCard:
    """The contents of ``model.json``; see the module docstring for the meaning of each field."""

    name: str
    task: str = "segmentation"
    dims: int = 3
    modality: str = "CT"
    in_channels: int = 1
    classes: list[dict] = field(default_factory=lambda: [{"id": 0, "name": "background"}])
    spacing: list[float] | None = None
    orientation: str = "RAS"
    patch_size: list[int] = field(default_factory=lambda: [96, 96, 96])
    normalization: dict = field(default_factory=lambda: {"scheme": "none"})
    architecture: dict = field(default_factory=dict)
    weights: str = "weights.safetensors"
    sha256: str | None = None
    version: str = "1"
    description: str = ""
    license: str = "unknown"
    overlap: float = 0.5
    postprocessing: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    parent: str | None = None
    extra: dict = field(default_factory=dict)
    #: box detectors only (``task == "detection"``): the output head, e.g.
    #: ``{"head": "centernet", "n_classes": 1, "size_encoding": "log", "offsets": true,
    #: "min_sigma": 1.0, "peak_threshold": 0.05, "nms_radius": 3}`` (see
    #: :mod:`napari_medseg.core.detect.boxes`); empty for every other model
    detection: dict = field(default_factory=dict)
    #: how the headline score in ``metrics`` was measured, for people deciding whether to trust
    #: the model: ``{"split": "unseen subjects" | "slices of the training subjects" | ...,
    #: "n_training_subjects": int, "n_test_subjects": int, "note": str, "demo": bool}``
    evaluation: dict = field(default_factory=dict)

    @property
    def out_channels(self) -> int:
        """Network output channels: the classes including background.

        For a box detector (``task == "detection"`` with a ``detection`` block): its ``K``
        heatmaps + ``dims`` sizes + ``dims`` offsets (``K`` foreground classes).
        """
        if self.task == "detection" and self.detection:
            fg = [c for c in self.classes if int(c["id"]) != 0]
            k = int(self.detection.get("n_classes") or max(1, len(fg)))
            return k + 2 * int(self.dims)
        return len(self.classes)

    @property
    def class_names(self) -> dict[int, str]:
        return {int(c["id"]): str(c["name"]) for c in self.classes}

    @property
    def class_colors(self) -> dict[int, str]:
        return {
            int(c["id"]): c.get("color") or PALETTE[int(c["id"]) % len(PALETTE)]
            for c in self.classes
        }

    @property
    def is_demo(self) -> bool:
        """True when the card says the model was trained on fewer than 5 subjects.

        Also True when ``evaluation["demo"]`` says so (a model its authors call a demo).
        """
        ev = self.evaluation if isinstance(self.evaluation, dict) else {}
        n = ev.get("n_training_subjects")
        return (isinstance(n, int) and n < 5) or ev.get("demo") is True

    def to_dict(self) -> dict:
        d = asdict(self)
        d["out_channels"] = self.out_channels
        d["demo"] = self.is_demo
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelCard:
        """A card from the parsed ``model.json``, every field the code reads type-checked.

        Raises
        ------
        ValueError
            One sentence naming the first field that is missing or of the wrong type.
        """
        validate_card_dict(d)
        known = {f for f in cls.__dataclass_fields__}
        kwargs = {k: v for k, v in d.items() if k in known}
        extra = {k: v for k, v in d.items() if k not in known and k not in ("out_channels", "demo")}
        card = cls(**kwargs)
        card.extra.update(extra)
        return card

    def weights_path(self, folder: str | Path) -> Path:
        """The weights file of this card inside ``folder``, confined to that folder.

        Raises
        ------
        ValueError
            When ``weights`` is absolute, climbs out with ``..``, resolves (through a symlink)
            outside ``folder``, or names something that is not a regular file (a FIFO or a device
            would hang the sha256). A missing file is not an error here.
        """
        folder = Path(folder)
        check_weights_name(self.weights)
        path = folder / self.weights
        root = folder.resolve()
        real = path.resolve()
        if real != root and root not in real.parents:
            raise ValueError(
                f"weights {self.weights!r} of model {self.name!r} lead outside its model folder "
                "(a symlink); copy the weights file into the folder"
            )
        if path.exists() and not path.is_file():
            raise ValueError(
                f"weights {self.weights!r} of model {self.name!r} is not a regular file"
            )
        return path

    def save(self, folder: str | Path) -> Path:
        """Write ``model.json`` into ``folder`` (atomically) and return its path."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / CARD_NAME
        from napari_medseg._files import write_text

        write_text(path, json.dumps(self.to_dict(), indent=2, default=_json_default) + "\n")
        return path

    @classmethod
    def load(cls, folder: str | Path) -> ModelCard:
        path = Path(folder) / CARD_NAME
        return cls.from_dict(json.loads(path.read_text()))


# --------------------------------------------------------------------------- validation

#: Intensity normalisation schemes :func:`napari_medseg.core.engine.preprocess.normalize` knows.
SCHEMES = ("none", "ct", "zscore", "percentile", "rgb")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _bad(field_name: str, want: str, got: Any) -> ValueError:
    shown = json.dumps(got, default=str)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return ValueError(f"field {field_name!r} must be {want}, not {shown}")


def check_weights_name(weights: Any) -> None:
    """Refuse a card ``weights`` entry that is not a plain path inside the model folder."""
    if not isinstance(weights, str):
        raise _bad("weights", "a file name inside the model folder", weights)
    pure = PurePosixPath(weights.replace("\\", "/"))
    if pure.is_absolute() or PureWindowsPath(weights).is_absolute() or ".." in pure.parts:
        raise ValueError(
            f"field 'weights' must name a file inside the model folder, not {weights!r} "
            "(no absolute path, no '..')"
        )


def validate_card_dict(d: Any) -> None:
    """Check the types of every ``model.json`` field the code reads.

    Parameters
    ----------
    d : Any
        The parsed JSON.

    Raises
    ------
    ValueError
        One sentence naming the first bad field (``classes: 5``, ``spacing: "x"``, a top-level
        list, ``weights: "/etc/passwd"``, ...).
    """
    if not isinstance(d, dict):
        raise ValueError(
            f"model.json must hold one JSON object of fields, not a {type(d).__name__}"
        )
    name = d.get("name")
    if not isinstance(name, str) or not name.strip():
        raise _bad("name", "a non-empty string", name)
    task = d.get("task", "segmentation")
    if task not in TASKS:
        raise _bad("task", f"one of {', '.join(TASKS)}", task)
    dims = d.get("dims", 3)
    if dims not in (2, 3) or not _is_int(dims):
        raise _bad("dims", "2 or 3", dims)
    for key in ("modality", "orientation", "description", "license"):
        if key in d and not isinstance(d[key], str):
            raise _bad(key, "a string", d[key])
    if "version" in d and not (isinstance(d["version"], str) or _is_num(d["version"])):
        raise _bad("version", "a string", d["version"])
    for key in ("sha256", "parent"):
        if d.get(key) is not None and not isinstance(d[key], str):
            raise _bad(key, "a string or null", d[key])
    in_ch = d.get("in_channels", 1)
    if not _is_int(in_ch) or in_ch < 1:
        raise _bad("in_channels", "a positive integer", in_ch)
    classes = d.get("classes", [{"id": 0, "name": "background"}])
    if not isinstance(classes, list) or not classes:
        raise _bad("classes", 'a non-empty list of {"id": ..., "name": ...} objects', classes)
    ids = set()
    for i, c in enumerate(classes):
        if not isinstance(c, dict):
            raise _bad(f"classes[{i}]", 'an object like {"id": 1, "name": "liver"}', c)
        if not _is_int(c.get("id")) or c["id"] < 0:
            raise _bad(f"classes[{i}].id", "a non-negative integer", c.get("id"))
        if not isinstance(c.get("name"), str):
            raise _bad(f"classes[{i}].name", "a string", c.get("name"))
        if c.get("color") is not None and not isinstance(c["color"], str):
            raise _bad(f"classes[{i}].color", 'a colour string like "#e6194b"', c["color"])
        if c["id"] in ids:
            raise ValueError(f"field 'classes' lists id {c['id']} twice")
        ids.add(c["id"])
    spacing = d.get("spacing")
    if spacing is not None and (
        not isinstance(spacing, list)
        or len(spacing) != dims
        or not all(_is_num(v) and v > 0 for v in spacing)
    ):
        raise _bad("spacing", f"null or a list of {dims} positive numbers (mm)", spacing)
    patch = d.get("patch_size", [96] * dims)
    if (
        not isinstance(patch, list)
        or len(patch) != dims
        or not all(_is_int(v) and v > 0 for v in patch)
    ):
        raise _bad("patch_size", f"a list of {dims} positive integers (voxels)", patch)
    overlap = d.get("overlap", 0.5)
    if not _is_num(overlap) or not 0 <= overlap < 1:
        raise _bad("overlap", "a number from 0 to below 1", overlap)
    for key in (
        "normalization",
        "architecture",
        "postprocessing",
        "training",
        "metrics",
        "evaluation",
        "extra",
    ):
        if key in d and not isinstance(d[key], dict):
            raise _bad(key, "an object", d[key])
    if "detection" in d and not isinstance(d["detection"], dict):
        raise _bad("detection", "an object", d["detection"])
    norm = d.get("normalization") or {"scheme": "none"}
    scheme = norm.get("scheme", "none")
    if not isinstance(scheme, str) or scheme.lower() not in SCHEMES:
        raise _bad("normalization.scheme", f"one of {', '.join(SCHEMES)}", scheme)
    window = norm.get("window")
    if (
        scheme.lower() == "ct"
        and window is not None
        and (
            not isinstance(window, list) or len(window) != 2 or not all(_is_num(v) for v in window)
        )
    ):
        raise _bad("normalization.window", "two numbers [low, high] (HU)", window)
    for key in ("lower", "upper", "foreground_percentile"):
        if key in norm and not _is_num(norm[key]):
            raise _bad(f"normalization.{key}", "a number (percent)", norm[key])
    for key in ("mean", "std"):
        v = norm.get(key)
        if v is not None and not (
            _is_num(v) or (isinstance(v, list) and all(_is_num(x) for x in v))
        ):
            raise _bad(f"normalization.{key}", "a number or a list of numbers", v)
    arch = d.get("architecture") or {}
    if "name" in arch and not isinstance(arch["name"], str):
        raise _bad("architecture.name", "a class name string", arch["name"])
    if "kwargs" in arch and not isinstance(arch["kwargs"], dict):
        raise _bad("architecture.kwargs", "an object of arguments", arch["kwargs"])
    check_weights_name(d.get("weights", "weights.safetensors"))


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    # a FIFO or a device (``weights: /dev/zero``) would block or never end: regular files only
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise ValueError(f"{Path(path).name} is not a regular file")
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()
