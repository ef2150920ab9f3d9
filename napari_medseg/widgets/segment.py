"""The "Segment" dock widget: pick an image and a model, press Run, get a Labels layer.

The widget is thin (docs/ARCHITECTURE.md rule 3): it reads its inputs, runs
:func:`napari_medseg.core.segment.segment.segment` in a napari worker (progress bar, Cancel via
``worker.quit()``, which stops the generator between two batches) and turns the result into a
Labels layer ``<image>_seg`` on the image's geometry. Running again updates that layer.
"""

from __future__ import annotations

import hashlib
import time
import weakref
from collections import Counter
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FloatSpinBox,
    Label,
    ProgressBar,
    PushButton,
    Select,
)

from napari_medseg.progress import Progress
from napari_medseg.widgets._layers import (
    apply_view_convention,
    is_volume_layer,
    labels_layer_data,
    view_convention_choice,
)
from napari_medseg.widgets._task import ImageInput, JobRunner

if TYPE_CHECKING:
    import napari

LOAD_MODEL = "Load model..."
GET_MODELS = "Get models..."


def _warm_up() -> None:
    """Import torch and MONAI's networks (seconds of work holding the GIL) in the background
    as soon as the dock opens, so that pressing Run later does not stall the viewer."""
    import monai.networks.nets  # noqa: F401
    import torch  # noqa: F401

    from napari_medseg.core.segment import segment as segmentation  # noqa: F401


def _segment_job(record: Any, model_ref: str, options: dict, trust: bool) -> Any:
    """Worker generator: load the model, then segment, yielding :class:`Progress`."""
    from napari_medseg.core.segment.segment import segment
    from napari_medseg.models.registry import load_model

    yield Progress(0, 0, f"loading model {model_ref}")
    model = load_model(model_ref, device="cpu", trust_bundle=trust)
    result = yield from segment(record, model, **options)
    return result


class SegmentWidget(ImageInput, Container):
    """Dock widget: image layer, model, device, overlap, TTA, probabilities, Run / Cancel."""

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        super().__init__(labels=True)
        self._viewer = viewer
        self._extra_models: dict[str, str] = {}
        self._t0 = 0.0
        self._written: Any = weakref.WeakKeyDictionary()  # Labels layer -> digest of our data
        self.image = ComboBox(label="Image", choices=self._image_choices, nullable=True)
        self.channels = Select(label="More channels", choices=self._image_choices, value=[])
        self.channels.tooltip = (
            "Multi-channel models (nnU-Net CASE_0000, CASE_0001, ...): the image layers of "
            "channels 1, 2, ... in the layer list's order, on the Image's grid; none for "
            "one-channel models"
        )
        self.model = ComboBox(label="Model", choices=self._model_choices)
        self.clicks = ComboBox(label="Clicks", choices=self._points_choices, nullable=True)
        self.clicks.tooltip = (
            "Click models (MONAI's NuClick bundle): a Points layer with one point on each "
            "nucleus to outline; the nuclei come back as <image>_nuclei, one id per point in "
            "the layer's order"
        )
        self.load_button = PushButton(text=LOAD_MODEL)
        self.get_button = PushButton(text=GET_MODELS)
        self.get_button.tooltip = (
            "Download a model: a MONAI Model Zoo bundle, a TotalSegmentator task, a URL or a file"
        )
        self._get_dialog: Any = None
        self.device = ComboBox(label="Device", choices=["auto", "cpu", "cuda", "mps"], value="auto")
        self.overlap = FloatSpinBox(label="Overlap", value=0.5, min=0.0, max=0.9, step=0.05)
        self.precision = ComboBox(
            label="Precision", choices=["auto", "fp32", "bf16", "fp16"], value="auto"
        )
        self.precision.tooltip = (
            "auto: bf16 where the device runs it natively (GPUs, CPUs with avx512_bf16/AMX), "
            "fp32 elsewhere, and fp32 whenever bf16 would change the labels"
        )
        self.tta = CheckBox(text="Flip test-time augmentation", value=False)
        self.probabilities = CheckBox(text="Also show probabilities", value=False)
        self.run_button = PushButton(text="Run")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(label="Progress", min=0, max=100, value=0)
        self.status = Label(label="", value="Choose an image and a model, then press Run.")
        self.model_info = Label(label="", value="")
        self.display = view_convention_choice(viewer)
        self.extend(
            [
                self.image,
                self.channels,
                self.model,
                self.clicks,
                self.load_button,
                self.get_button,
                self.model_info,
                self.device,
                self.overlap,
                self.precision,
                self.tta,
                self.probabilities,
                self.run_button,
                self.cancel_button,
                self.progress,
                self.status,
                self.display,
            ]
        )
        self.job = JobRunner(
            [self.run_button],
            self.cancel_button,
            self.progress,
            self.status,
            on_error=self._trust_and_rerun,
        )
        self.run_button.changed.connect(self._on_run)
        self.load_button.changed.connect(self._on_load_model)
        self.get_button.changed.connect(self._on_get_models)
        self.model.changed.connect(self._show_model_info)
        self._follow_layers()
        self._show_model_info()
        self._warmup = self._start_warm_up()

    def _start_warm_up(self) -> Any:
        # a plain daemon thread, not a Qt worker: no Qt object to outlive if napari closes
        import threading

        thread = threading.Thread(target=_warm_up, name="medseg-warm-up", daemon=True)
        thread.start()
        return thread

    def warming_up(self) -> bool:
        """True while torch/MONAI are still being imported in the background."""
        return self._warmup is not None and self._warmup.is_alive()

    # ------------------------------------------------------------------ choices

    def _model_choices(self, _w: Any = None) -> list[tuple[str, str]]:
        from napari_medseg.models.registry import list_models

        choices: list[tuple[str, str]] = []
        for card in list_models():
            if card.get("task", "segmentation") != "segmentation":
                continue
            choices.append(
                (f"{card['name']} ({card.get('modality', '?')}, {card.get('dims')}D)", card["name"])
            )
        for label, path in self._extra_models.items():
            choices.append((label, path))
        return choices

    def _points_choices(self, _w: Any = None) -> list:
        from napari.layers import Points

        return [lyr for lyr in self._viewer.layers if isinstance(lyr, Points)]

    def _takes_clicks(self) -> bool:
        """Whether the chosen model outlines objects from clicks (read from its config)."""
        ref = self.model.value
        if not ref:
            return False
        from napari_medseg.models.loaders.bundle import bundle_takes_clicks
        from napari_medseg.models.registry import resolve_model

        try:
            return bundle_takes_clicks(resolve_model(ref))
        except Exception:  # noqa: BLE001 - an unknown model is reported when it is loaded
            return False

    def _on_layers_changed(self, event: Any = None) -> None:
        super()._on_layers_changed(event)
        self.clicks.reset_choices()
        if event is not None and getattr(event, "type", "") == "inserted":
            layer = event.value
            if (
                is_volume_layer(layer)
                and sum(is_volume_layer(lyr) for lyr in self._viewer.layers) == 1
            ):
                apply_view_convention(self._viewer)
            if self.image.value is None and layer in self._image_choices():
                self.image.value = layer
            if self.clicks.value is None and layer in self._points_choices():
                self.clicks.value = layer  # the new Points layer holds the clicks

    def _show_model_info(self, _v: Any = None) -> None:
        self.clicks.visible = self._takes_clicks()  # shown for click models only
        ref = self.model.value
        if not ref:
            self.model_info.value = "No model installed: use Load model..."
            return
        from napari_medseg.models.registry import list_models

        for card in list_models():
            if card["name"] == ref:
                classes = ", ".join(c["name"] for c in card.get("classes", [])[1:])
                dice = (card.get("metrics") or {}).get("val_dice_mean")
                score = f"; held-out Dice {dice:.2f}" if isinstance(dice, float) else ""
                split = (card.get("evaluation") or {}).get("split")
                if score and split:
                    score += f" ({split})"
                if card.get("demo"):
                    score += "; DEMO model, not for clinical use"
                if card.get("kind") == "nnunet":  # nnUNetPredictor mirrors by default
                    self.tta.value = True
                self.model_info.value = (
                    f"{card.get('modality')} {card.get('dims')}D: {classes}{score}"
                )
                return
        self.model_info.value = ref

    def _on_load_model(self, _v: Any = None) -> None:
        from qtpy.QtWidgets import QFileDialog

        path = QFileDialog.getExistingDirectory(
            self.native, "Choose a model folder or MONAI bundle folder"
        )
        if path:
            self.add_model_path(path)

    def _on_get_models(self, _v: Any = None) -> None:
        """Open the Get models dialog (one per dock, kept between uses)."""
        if self._get_dialog is None:
            from qtpy.QtWidgets import QDialog, QVBoxLayout

            from napari_medseg.widgets.get_models import GetModelsWidget

            widget = GetModelsWidget(on_installed=self._on_models_installed)
            dialog = QDialog(self.native)
            dialog.setWindowTitle("Get models")
            QVBoxLayout(dialog).addWidget(widget.native)
            self._get_dialog = (dialog, widget)
        self._get_dialog[0].show()

    @property
    def get_models_widget(self) -> Any:
        """The Get models dialog's widget (None until the button was pressed)."""
        return None if self._get_dialog is None else self._get_dialog[1]

    def _on_models_installed(self, models: list) -> None:
        """Offer newly pulled models at once, and choose the first segmentation model."""
        self.model.reset_choices()
        offered = {value for _, value in self._model_choices()}
        for m in models:
            if m.name in offered:
                self.model.value = m.name
                break

    def add_model_path(self, path: str) -> None:
        """Offer a model folder, TorchScript file or MONAI bundle from disk in the model list."""
        from pathlib import Path

        label = f"{Path(path).name} (from disk)"
        self._extra_models[label] = str(path)
        self.model.reset_choices()
        self.model.value = str(path)

    # ------------------------------------------------------------------ run

    def _options(self) -> dict:
        return {
            "device": self.device.value,
            "overlap": float(self.overlap.value),
            "tta": bool(self.tta.value),
            "return_probabilities": bool(self.probabilities.value),
            "precision": str(self.precision.value),
        }

    def _on_run(self, _v: Any = None, trust: bool = False) -> None:
        from napari.utils.notifications import show_error

        if not self.model.value and self.image.value is not None:
            show_error("Choose a model, or load one from disk with Load model...")
            return
        chosen = self._chosen_record("segment")
        if chosen is None:
            return
        layer, record = chosen
        extra = [lyr for lyr in (self.channels.value or []) if lyr is not layer]
        if extra:
            from napari_medseg.core.segment.channels import stack_channels
            from napari_medseg.widgets._layers import record_from_layer
            from napari_medseg.widgets._task import report_error

            try:
                record = stack_channels([record, *(record_from_layer(lyr) for lyr in extra)])
            except Exception as e:  # noqa: BLE001 - shown to the user as one sentence
                report_error(self.status, e)
                return
        options = self._options()
        if self._takes_clicks():
            clicks = self._clicks_on(layer, record)
            if clicks is None:
                return
            options["clicks"] = clicks
        self._t0 = time.perf_counter()
        self.job.start(
            _segment_job,
            record,
            self.model.value,
            options,
            trust,
            on_result=lambda result: self._on_result(layer, record, result),
        )

    def _clicks_on(self, layer: Any, record: Any) -> np.ndarray | None:
        """The chosen Points layer's points as ``(row, col)`` pixels on ``record``, or None
        after saying on the status line that a click model needs them."""
        from napari_medseg.widgets._layers import points_to_pixels

        points = self.clicks.value
        if points is None or not len(points.data):
            self.status.value = (
                "This model outlines the nuclei you click: add a Points layer with one point "
                "on each nucleus and choose it under Clicks."
            )
            return None
        return points_to_pixels(points, layer, record)

    def _trust_and_rerun(self, err: BaseException) -> bool:
        """A bundle that needs trust: ask, and run again trusted when the user agrees."""
        if type(err).__name__ == "BundleTrustError" and self._ask_trust(str(err)):
            self.job.detach()  # the refused run is over; its late "finished" is ignored
            self._on_run(trust=True)
            return True
        return False

    def _ask_trust(self, message: str) -> bool:
        from qtpy.QtWidgets import QMessageBox

        answer = QMessageBox.question(
            self.native,
            "Trust this MONAI bundle?",
            f"{message}\n\nRunning it executes Python code from the bundle. "
            "Trust it only if you trust where it came from.",
        )
        return answer == QMessageBox.StandardButton.Yes

    def _on_result(self, source_layer: Any, record: Any, result: Any) -> None:
        name = f"{source_layer.name}_seg"
        meta = {"provenance": result.provenance, "class_names": result.class_names}
        data, kwargs = labels_layer_data(source_layer, result.labels, record, name, meta)
        kept = self._show_labels(name, data, kwargs, result)
        if result.probabilities is not None:
            self._show_probabilities(source_layer, record, result)
        if result.instances is not None:
            self._show_instances(source_layer, record, result)
        secs = time.perf_counter() - self._t0
        counts = np.bincount(np.asarray(result.labels).ravel(), minlength=len(result.class_names))
        voxel = float(np.prod(record.spacing)) if record.space == "RAS" else None
        found = []
        for i, n in enumerate(counts):
            if i and n and i in result.class_names:
                size = f"{n * voxel / 1000:.1f} mL" if voxel else f"{int(n)} px"
                found.append(f"{result.class_names[i]} {size}")
        if result.objects is not None:  # objects (nuclei): counted per class, not in pixels
            per = Counter(r["type_name"] for r in result.objects if r.get("type_name"))
            n_obj = sum(1 for r in result.objects if r.get("area_px", 1))  # NuClick: 0 = none
            found = [f"{n_obj} nuclei"] + [f"{k} {n}" for k, n in per.items()]
        self.progress.value = self.progress.max
        self.status.value = f"Done in {secs:.1f} s. " + (
            ", ".join(found) if found else "Nothing found."
        )
        if kept:
            self.status.value += " " + kept

    def _show_labels(self, name: str, data: Any, kwargs: dict, result: Any) -> str:
        """Put the result in ``name``, or beside it when that layer holds the user's edits.

        A ``name`` layer still holding exactly what this dock wrote is updated in place as one
        undo step (Ctrl+Z brings the previous result back); one that was edited (or that this
        dock did not write) is kept as it is and the result becomes a new layer. Returns a
        sentence for the status line when a layer was kept, else ``""``.
        """
        from napari.layers import Labels
        from napari.utils.colormaps import DirectLabelColormap

        colors: dict[Any, Any] = {0: "transparent", None: "transparent"}
        colors.update({int(k): v for k, v in result.class_colors.items() if int(k) != 0})
        cmap = DirectLabelColormap(color_dict=colors)
        ids = sorted(result.class_names)
        features = {"index": ids, "class": [result.class_names[i] for i in ids]}
        old = self._viewer.layers[name] if name in self._viewer.layers else None
        kept = ""
        if isinstance(old, Labels) and self._replace_in_place(old, data, kwargs):
            layer = old
            layer.colormap = cmap
            layer.features = features
        else:
            if isinstance(old, Labels):
                kept = f"Kept your edited {name}; this result is a new layer."
            layer = self._viewer.add_labels(
                data,
                name=name,
                affine=kwargs["affine"],
                units=kwargs.get("units"),  # mm for scans, like the image
                metadata=kwargs["metadata"],
                colormap=cmap,
                features=features,
                opacity=0.5,
            )
            if kept:
                kept = f"Kept your edited {name}; this result is {layer.name}."
        self._written[layer] = _digest(layer.data)
        self._viewer.layers.selection.active = layer
        return kept

    def _replace_in_place(self, layer: Any, data: Any, kwargs: dict) -> bool:
        """Write ``data`` into ``layer`` as one undo step if it holds only our last result."""
        data = np.asarray(data)
        current = layer.data
        if (
            not isinstance(current, np.ndarray)
            or current.shape != data.shape
            or self._written.get(layer) != _digest(current)  # edited, or not ours
            or not _fits(data, current.dtype)
        ):
            return False
        # metadata first: the Correct dock reads the new provenance when the paint event comes
        layer.metadata = kwargs["metadata"]
        layer.affine = kwargs["affine"]
        changed = np.nonzero(current != data)
        with layer.block_history():
            layer.data_setitem(changed, data[changed])
        return True

    def _show_instances(self, source_layer: Any, record: Any, result: Any) -> None:
        """One id per object (HoVerNet's nuclei) as a Labels layer, the table as features."""
        name = f"{source_layer.name}_nuclei"
        meta = {"provenance": result.provenance, "objects": "one label id per nucleus"}
        data, kwargs = labels_layer_data(source_layer, result.instances, record, name, meta)
        rows = result.objects or []
        features = {
            "index": [0, *(r["id"] for r in rows)],
            "type": ["background", *(r.get("type_name") or "" for r in rows)],
            "area_px": [0, *(r["area_px"] for r in rows)],
        }
        if name in self._viewer.layers:
            self._viewer.layers.remove(name)
        self._viewer.add_labels(
            data,
            name=name,
            affine=kwargs["affine"],
            units=kwargs.get("units"),
            metadata=kwargs["metadata"],
            features=features,
            opacity=0.5,
        )

    def _show_probabilities(self, source_layer: Any, record: Any, result: Any) -> None:
        from napari_medseg.io.geometry import record_to_layer_data
        from napari_medseg.io.record import ImageRecord

        probs = np.asarray(result.probabilities)[1:]  # foreground classes
        prob_rec = ImageRecord(
            data=np.moveaxis(probs, 0, -1),
            affine=record.affine,
            space=record.space,
            modality="probability",
            name=f"{source_layer.name}_prob",
            metadata=record.metadata,
        )
        data, kwargs, _ = record_to_layer_data(prob_rec, "image")
        name = kwargs["name"]
        kwargs.update(colormap="magma", blending="additive", contrast_limits=(0.0, 1.0))
        if name in self._viewer.layers:
            self._viewer.layers.remove(name)
        self._viewer.add_image(data, **kwargs)


def _fits(data: np.ndarray, dtype: np.dtype) -> bool:
    """Whether every value of ``data`` can be stored in ``dtype`` unchanged."""
    if data.dtype == dtype or not data.size:
        return True
    if dtype.kind not in "iu" or data.dtype.kind not in "iub":
        return False
    info = np.iinfo(dtype)
    return info.min <= int(data.min()) and int(data.max()) <= info.max


def _digest(data: Any) -> str:
    """Fingerprint of a label array (shape, dtype, strides and bytes), to tell whether it was
    edited. Read in memory order: layers are transposed views of the file array, and making
    one C-contiguous took 4.3 s for 512x512x300 voxels where this takes 0.15 s."""
    arr = np.asarray(data)
    flat = arr.ravel(order="K")  # a view for a transposed contiguous array
    h = hashlib.sha1(f"{arr.shape}{arr.dtype}{arr.strides}".encode(), usedforsecurity=False)
    h.update(memoryview(np.ascontiguousarray(flat)).cast("B"))
    return h.hexdigest()
