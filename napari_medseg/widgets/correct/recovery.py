"""Autosave of every edited Labels layer, and the offer to restore them after a crash.

Every Labels layer the dock watches (all of the viewer's, not only the one chosen in the dock) is
autosaved every few seconds when it changed, to its own recovery slot: the image it was drawn
on plus the layer's name (:class:`napari_medseg.core.correct.mask_store.Autosaver`). So editing
``A``, switching to ``B`` and editing it leaves two autosaves, saving ``B`` removes only ``B``'s,
and a ``kill -9`` loses at most one autosave interval of either. A layer removed from the
viewer with unsaved edits is autosaved first. Opening an image that has autosaves offers to
restore them, each as the Labels layer it was (declined: they stay, and are offered again).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_medseg.io.geometry import META_KEY
from napari_medseg.widgets.correct.session import class_names

if TYPE_CHECKING:
    from napari_medseg.widgets.correct.dock import CorrectWidget

AUTOSAVE_MS = 5000


class RecoveryKeeper:
    """The autosave timer and the restore offer of the Correct & Train dock.

    Parameters
    ----------
    dock : CorrectWidget
        Gives the watched layers, their editing state and source images, and the status line.
    autosave_ms : int
        Autosave interval in milliseconds.
    """

    def __init__(self, dock: CorrectWidget, autosave_ms: int = AUTOSAVE_MS) -> None:
        from qtpy.QtCore import QTimer

        self._dock = dock
        self.timer = QTimer()
        self.timer.setInterval(int(autosave_ms))
        self.timer.timeout.connect(self.autosave)
        self.timer.start()

    def key(self, layer: Any) -> tuple[str, str]:
        """``(source key, layer name)``: the recovery slot of ``layer``."""
        src = self._dock.source_path(layer)
        return (src or f"unsaved:{layer.name}", str(layer.name))

    def autosave(self) -> list[Path]:
        """Autosave every watched layer edited since its last autosave (timer slot).

        Returns
        -------
        list of pathlib.Path
            The autosave files written (empty when nothing changed).
        """
        written = []
        for layer in self._dock.watched_layers():
            path = self.autosave_layer(layer)
            if path is not None:
                written.append(path)
        return written

    def autosave_layer(self, layer: Any) -> Path | None:
        """Autosave one layer if it changed since its last autosave; returns the file."""
        from napari_medseg.core.correct.mask_store import Autosaver, clear_recovery

        st = self._dock.edits(layer)
        if not st.dirty:
            return None
        key = self.key(layer)
        meta = {
            "layer": layer.name,
            "affine": np.asarray(layer.affine.affine_matrix).tolist(),
            "metadata": {META_KEY: (layer.metadata or {}).get(META_KEY)},
            "class_names": class_names(layer),
            "edits": st.edits,
        }
        try:
            path = Autosaver(key[0], key[1]).save(layer.data, meta)
        except OSError as e:
            self._dock.status.value = f"Autosave of {layer.name} failed: {e}"
            return None
        if st.autosave is not None and st.autosave != key:  # renamed: one slot per layer
            clear_recovery(*st.autosave)
        st.autosave = key
        st.dirty = False
        return path

    def clear(self, layer: Any) -> None:
        """Remove ``layer``'s autosave (its mask was saved); other layers' stay."""
        from napari_medseg.core.correct.mask_store import clear_recovery

        st = self._dock.edits(layer)
        for key in {self.key(layer), st.autosave} - {None}:
            clear_recovery(*key)
        st.autosave = None

    def offer(self, layer: Any) -> list[Any]:
        """Offer to restore the autosaves of an image layer just opened; returns new layers."""
        from napari.layers import Image

        from napari_medseg.core.correct.mask_store import find_recoveries

        if not isinstance(layer, Image):
            return []
        path = ((layer.metadata or {}).get(META_KEY) or {}).get("path")
        if not path:
            return []
        shape = tuple(layer.data.shape)
        if getattr(layer, "rgb", False):
            shape = shape[:-1]
        found = [
            r
            for r in find_recoveries(path)
            if tuple(r.labels.shape) == shape[-r.labels.ndim :]
            and (r.layer or f"{layer.name}_seg") not in self._dock.viewer.layers
        ]
        if not found:
            return []
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(found[-1].saved_at))
        names = ", ".join(r.layer or f"{layer.name}_seg" for r in found)
        if not self.ask_restore(
            f"Unsaved corrections of {layer.name} ({names}) from {when} were found."
        ):
            return []
        restored = [self._restore(layer, r) for r in found]
        self._dock.labels.value = restored[-1]
        self._dock.status.value = f"Restored unsaved corrections of {layer.name}: {names}."
        return restored

    def _restore(self, image: Any, rec: Any) -> Any:
        meta = dict(rec.meta.get("metadata") or {})
        if not meta.get(META_KEY):
            meta[META_KEY] = image.metadata.get(META_KEY)
        if rec.meta.get("class_names"):
            meta["class_names"] = {int(k): v for k, v in rec.meta["class_names"].items()}
        new = self._dock.viewer.add_labels(
            rec.labels,
            name=rec.layer or f"{image.name}_seg",
            affine=np.asarray(rec.meta.get("affine") or image.affine.affine_matrix),
            metadata=meta,
            opacity=0.5,
        )
        st = self._dock.edits(new)
        st.prediction = None  # the model's output before these edits is not in the autosave
        st.dirty = st.unsaved = True  # still not saved as a version
        st.edits = int(rec.meta.get("edits") or 0)
        return new

    def ask_restore(self, message: str) -> bool:
        """Ask the user (Yes/No) whether to restore autosaved corrections."""
        from qtpy.QtWidgets import QMessageBox

        answer = QMessageBox.question(
            self._dock.native, "Restore unsaved corrections?", message + "\n\nRestore them?"
        )
        return answer == QMessageBox.StandardButton.Yes
