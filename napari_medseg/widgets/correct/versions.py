"""Save panel: the corrected mask as the next numbered version, with provenance.

The saving is :func:`napari_medseg.core.correct.mask_store.save_mask_version` (never overwrites;
the file and its folder are fsynced before it returns), or
:meth:`napari_medseg.core.correct.worklist.Worklist.save_corrected` for a worklist case. Only
after a successful save is the layer's autosave removed, and only that layer's.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import Container, FileEdit, PushButton

from napari_medseg.io.geometry import META_KEY
from napari_medseg.io.record import layer_to_record
from napari_medseg.widgets._layers import layer_state
from napari_medseg.widgets.correct.session import class_names, layer_spacing, model_provenance

if TYPE_CHECKING:
    from napari_medseg.widgets.correct.dock import CorrectWidget


def safe_name(name: str) -> str:
    """A layer name as a file name (``"CT abdomen_seg"`` -> ``"CT_abdomen_seg"``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "mask"


class SavePanel(Container):
    """``Save to`` folder and ``Save mask``.

    Parameters
    ----------
    dock : CorrectWidget
        Gives the layer to save, its source image, its editing state, the worklist case it
        belongs to (if any), the recovery keeper and the status line.
    """

    def __init__(self, dock: CorrectWidget) -> None:
        super().__init__(labels=True)
        self.margins = (0, 0, 0, 0)
        self._dock = dock
        self.save_dir = FileEdit(label="Save to", mode="d", value="")
        self.save_button = PushButton(text="Save mask")
        self.extend([self.save_dir, self.save_button])
        self.save_button.changed.connect(self.save_mask)

    def labels_record(self, layer: Any) -> Any:
        """The layer as an :class:`~napari_medseg.io.record.ImageRecord` on its source grid."""
        attrs = layer_state(layer)
        img = self._dock.image.value
        if not (attrs.get("metadata") or {}).get(META_KEY) and img is not None:
            meta = dict(attrs.get("metadata") or {})
            meta[META_KEY] = img.metadata.get(META_KEY)
            if meta[META_KEY]:
                attrs = {**attrs, "metadata": meta}
        rec = layer_to_record(np.asarray(layer.data), attrs, name=layer.name)
        rec.modality = "label"
        return rec

    def default_dir(self, layer: Any) -> Path:
        """Beside the source image when that folder is writable, else Documents/napari-medseg."""
        import platformdirs

        package = Path(__file__).resolve().parents[2]
        src = self._dock.source_path(layer)
        if src:
            folder = Path(src).parent if Path(src).is_file() else Path(src)
            if os.access(folder, os.W_OK) and package not in folder.resolve().parents:
                return folder
        out = Path(platformdirs.user_documents_dir()) / "napari-medseg"
        out.mkdir(parents=True, exist_ok=True)
        return out

    def save_mask(self, _v: Any = None) -> Path | None:
        """Save the dock's layer as the next version with provenance; returns the file."""
        from napari.utils.notifications import show_error, show_info, show_warning

        from napari_medseg.core.correct.mask_store import build_provenance, save_mask_version
        from napari_medseg.core.correct.worklist import StatusNotSavedError
        from napari_medseg.errors import MedsegError

        dock = self._dock
        target = dock.target()
        if target is None:
            return None
        layer, _ = target
        st = dock.edits(layer)
        chosen = str(self.save_dir.value or "")
        folder = Path(chosen) if chosen not in ("", ".") else self.default_dir(layer)
        not_saved_status = None
        try:
            rec = self.labels_record(layer)
            pred = st.prediction
            prov = build_provenance(
                source_path=dock.source_path(layer),
                corrected=np.asarray(layer.data),
                prediction=pred if pred is not None and pred.shape == layer.data.shape else None,
                segmentation=model_provenance(layer) or {},
                spacing=layer_spacing(layer),
                class_names=class_names(layer),
                editing_seconds=st.edit_seconds,
                tools=st.tools,
                parameters={"layer": layer.name},
            )
            case = dock.cases.active_case(layer)
            if case is not None:
                try:
                    path = dock.cases.worklist.save_corrected(case, rec, prov)
                except StatusNotSavedError as e:  # the mask is safe; its status is not
                    path, not_saved_status = e.path, e
                dock.cases.show_cases()
            else:
                path = save_mask_version(rec, folder, prov, name=safe_name(layer.name))
        except (MedsegError, OSError, ValueError) as e:
            show_error(str(e))
            dock.status.value = f"Not saved: {e}"
            return None
        dock.recovery.clear(layer)  # the mask is on disk (fsynced): its autosave can go
        st.dirty = st.unsaved = False
        if not_saved_status is not None:
            dock.status.value = (
                f"Saved {path.name} in {path.parent}, but the case status was not updated: "
                f"{not_saved_status.__cause__ or not_saved_status}"
            )
            show_warning(str(not_saved_status))
            return path
        dock.status.value = f"Saved {path.name} in {path.parent}."
        show_info(f"Saved {path}")
        return path
