"""Model cards: the ``model.json`` that makes a model a folder of data (DESIGN.md rule 5).

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
from dataclasses import asdict, dataclass, field
from pathlib import Path
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

    def to_dict(self) -> dict:
        d = asdict(self)
        d["out_channels"] = self.out_channels
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelCard:
        known = {f for f in cls.__dataclass_fields__}
        kwargs = {k: v for k, v in d.items() if k in known}
        extra = {k: v for k, v in d.items() if k not in known and k != "out_channels"}
        card = cls(**kwargs)
        card.extra.update(extra)
        if card.task not in TASKS:
            raise ValueError(f"model card task must be one of {TASKS}, got {card.task!r}")
        if card.dims not in (2, 3):
            raise ValueError(f"model card dims must be 2 or 3, got {card.dims!r}")
        return card

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
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()
