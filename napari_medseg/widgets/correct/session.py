"""What the Correct & Train panels share: per-layer editing state and layer helpers.

No Qt here beyond what the layers carry: :class:`LayerEdits` is plain data, one per Labels layer
the dock watches, and the functions read napari layers through their public attributes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from napari_medseg.core.correct import edits as C
from napari_medseg.io.geometry import META_KEY, compose_layer_transform
from napari_medseg.widgets._layers import layer_state


@dataclass
class LayerEdits:
    """Editing state of one Labels layer (kept by the dock, keyed by the layer object).

    Attributes
    ----------
    prediction : numpy.ndarray or None
        The model's output as it was before any correction (layer axis order), for the
        provenance's per-class change; None when the layer is not a model output.
    provenance : dict or None
        The model run's provenance the prediction came from (a new run replaces both).
    counts : numpy.ndarray or None
        Voxels per class (index = class id), kept current by paint events.
    signature : tuple or None
        :func:`edit_signature` when ``counts`` was last brought up to date.
    edit_seconds : float
        Time spent editing (gaps over 30 s do not count).
    last_edit : float or None
        ``time.monotonic()`` of the last edit.
    tools : list of str
        Correction tools applied, in order.
    dirty : bool
        Edited since the last autosave.
    unsaved : bool
        Edited since the last saved version.
    edits : int
        Number of edits (brush strokes, tool applications, undo/redo steps).
    autosave : tuple or None
        ``(source key, layer name)`` of the last autosave written for this layer.
    """

    prediction: np.ndarray | None = None
    provenance: dict | None = None
    counts: np.ndarray | None = None
    signature: tuple | None = None
    edit_seconds: float = 0.0
    last_edit: float | None = None
    tools: list[str] = field(default_factory=list)
    dirty: bool = False
    unsaved: bool = False
    edits: int = 0
    autosave: tuple[str, str] | None = None

    def mark_edited(self) -> None:
        """Count one edit: the editing clock runs, the layer needs an autosave and a save."""
        now = time.monotonic()
        if self.last_edit is not None:
            self.edit_seconds += min(now - self.last_edit, 30.0)  # idle time does not count
        self.last_edit = now
        self.dirty = True
        self.unsaved = True
        self.edits += 1


def layer_spacing(layer: Any) -> tuple[float, ...]:
    """Voxel size along each data axis of a layer (mm for scans), from its full transform."""
    m = compose_layer_transform(layer_state(layer))
    n = layer.ndim
    lin = m[-n - 1 : -1, -n - 1 : -1]
    return tuple(float(v) for v in np.sqrt((lin**2).sum(axis=0)))


def model_provenance(layer: Any) -> dict | None:
    """The provenance of the model run that made ``layer`` (None for hand-made labels)."""
    return ((getattr(layer, "metadata", None) or {}).get(META_KEY) or {}).get("provenance") or None


def class_names(layer: Any) -> dict[int, str]:
    """``{class id: name}`` from the layer's metadata (empty when it has none)."""
    if layer is None:
        return {}
    names = dict((layer.metadata or {}).get("class_names") or {})
    return {int(k): str(v) for k, v in names.items()}


def edit_signature(layer: Any) -> tuple:
    """What changes when napari's undo/redo changes the data (they emit no paint event).

    Fast path: the lengths of napari's undo/redo queues (private attributes, read with
    ``getattr`` so a napari without them still works). Fallback: the per-class voxel counts,
    recomputed (a bincount, about 0.1 s per 50 M voxels, debounced): an undo that leaves every
    class count unchanged then goes unnoticed by the editing clock.
    """
    undo = getattr(layer, "_undo_history", None)
    redo = getattr(layer, "_redo_history", None)
    if undo is not None and redo is not None:
        return (id(layer.data), len(undo), len(redo))
    return (id(layer.data), C.class_counts(layer.data).tobytes())
