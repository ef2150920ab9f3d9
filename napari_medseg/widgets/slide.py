"""The "Whole slide" dock widget: run a 2D model over a slide, tile by tile.

Thin (docs/ARCHITECTURE.md rule 3): it reads the slide layer's file path and the chosen model and
runs, in a napari worker (progress, ``Cancel`` = ``worker.quit()`` between two tiles or batches):

* **Segment**: :func:`napari_medseg.core.slides.segment.segment_slide`, shown as a lazy multiscale
Labels
  layer read from the Zarr (:func:`napari_medseg.core.slides.export.open_result`), refreshed while
  tiles
  arrive. Saved beside the slide: ``<slide>_<model>_view.zarr`` ("Run on current view") and
  ``<slide>_<model>_seg.zarr`` ("Run on whole slide").
* **Detect**: :func:`napari_medseg.core.slides.detect.detect_slide` (a model, or the classical
  Otsu + watershed detector for bright or dark objects), shown as a Points layer at object
  centres (features: id, class, score, area in level-0 pixels; coloured by score) that grows
  while tiles arrive and is replaced by the final, border-de-duplicated table at the end; the
  score threshold filters it live. Saved beside the slide as QuPath GeoJSON (outlines where the
  detector gives them): ``<slide>_<model>_view.geojson`` / ``..._det.geojson``.

A new run of the same kind replaces its result.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from magicgui.widgets import (
    ComboBox,
    Container,
    FloatSlider,
    Label,
    ProgressBar,
    PushButton,
    SpinBox,
)

from napari_medseg.progress import Progress
from napari_medseg.widgets._task import JobRunner

if TYPE_CHECKING:
    import napari


def _slide_job(path: str, model_ref: str, out: str, options: dict) -> Any:
    """Worker generator: open slide and model, then :func:`segment_slide`."""
    from napari_medseg.core.slides.segment import segment_slide
    from napari_medseg.io.raster import read_slide
    from napari_medseg.models.registry import load_model

    yield Progress(0, 0, f"loading model {model_ref}")
    model = load_model(model_ref, device="cpu")
    record = read_slide(path)
    yield Progress(0, 0, "finding tissue")
    result = yield from segment_slide(record, model, out, overwrite=True, **options)
    return result


TASKS = [("Segment (labels)", "segment"), ("Detect objects (points)", "detect")]
CLASSICAL = [
    ("classical: nuclei on H&E/IHC (haematoxylin channel, Otsu + watershed)", "classical-he"),
    ("classical: bright objects, e.g. fluorescence (Otsu + watershed)", "classical"),
    ("classical: dark objects on grey bright-field (Otsu + watershed)", "classical-dark"),
]


def _detect_slide_job(path: str, model_ref: str, out: str, options: dict) -> Any:
    """Worker generator: open slide and detector, :func:`detect_slide`, save GeoJSON."""
    from napari_medseg.core.detect.detection import load_detector
    from napari_medseg.core.slides.detect import detect_slide
    from napari_medseg.core.slides.export import write_slide_detections
    from napari_medseg.io.raster import read_slide

    yield Progress(0, 0, f"loading {model_ref}")
    detector = load_detector(model_ref)
    record = read_slide(path)
    yield Progress(0, 0, "finding tissue")
    result = yield from detect_slide(record, detector, **options)
    yield Progress(result.tiles_done, result.tiles_total, f"saving {Path(out).name}")
    write_slide_detections(out, result, overwrite=True)
    return result


def slide_path_of(layer: Any) -> str | None:
    """The file a slide layer was opened from (napari-medseg metadata or napari's source)."""
    meta = (getattr(layer, "metadata", None) or {}).get("medseg") or {}
    path = meta.get("path") or getattr(getattr(layer, "source", None), "path", None)
    return str(path) if path else None


class SlideWidget(Container):
    """Dock widget: slide layer, model, tile size, Run on current view / whole slide, Cancel."""

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        super().__init__(labels=True)
        self._viewer = viewer
        self._extra_models: dict[str, str] = {}
        self._labels_layer: Any = None
        self._last_refresh = 0.0
        self._t0 = 0.0
        self._points: Any = None
        self._result: Any = None
        self.image = ComboBox(label="Slide", choices=self._image_choices, nullable=True)
        self.task = ComboBox(label="Task", choices=TASKS, value="segment")
        self.model = ComboBox(label="Model", choices=self._model_choices)
        self.device = ComboBox(label="Device", choices=["auto", "cpu", "cuda", "mps"], value="auto")
        self.tile = SpinBox(label="Tile (px)", value=512, min=64, max=4096, step=64)
        self.threshold = FloatSlider(
            label="Score threshold", value=0.5, min=0.0, max=1.0, step=0.01, visible=False
        )
        self.view_button = PushButton(text="Run on current view")
        self.run_button = PushButton(text="Run on whole slide")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(label="Progress", min=0, max=100, value=0)
        self.status = Label(label="", value="Open a slide, choose a 2D model, then run.")
        self.extend(
            [
                self.image,
                self.task,
                self.model,
                self.device,
                self.tile,
                self.threshold,
                self.view_button,
                self.run_button,
                self.cancel_button,
                self.progress,
                self.status,
            ]
        )
        self.view_button.changed.connect(lambda _v=None: self._start(view=True))
        self.run_button.changed.connect(lambda _v=None: self._start(view=False))
        self.job = JobRunner(
            [self.view_button, self.run_button],
            self.cancel_button,
            self.progress,
            self.status,
            percent=True,
            starting="Starting...",
            cancelling="Cancelling (the partial result stays readable)...",
            cancelled="Cancelled: the tiles done so far stay in the saved result, "
            "marked incomplete; run again to finish.",
            keeps_partial=True,
        )
        self.task.changed.connect(self._on_task)
        self.threshold.changed.connect(self._filter_points)
        viewer.layers.events.inserted.connect(self._refresh_choices)
        viewer.layers.events.removed.connect(self._refresh_choices)
        self._refresh_choices()

    # ------------------------------------------------------------------ choices

    def _image_choices(self, _w: Any = None) -> list:
        from napari.layers import Image

        return [ly for ly in self._viewer.layers if isinstance(ly, Image) and slide_path_of(ly)]

    def _model_choices(self, _w: Any = None) -> list[tuple[str, str]]:
        from napari_medseg.models.registry import list_models

        detect = getattr(self, "task", None) is not None and self.task.value == "detect"
        tasks = ("segmentation", "detection") if detect else ("segmentation",)
        out = [
            (f"{c['name']} ({c.get('modality', '?')}, {c.get('task', 'segmentation')})", c["name"])
            for c in list_models()
            if c.get("task", "segmentation") in tasks and c.get("dims") == 2
        ]
        return (CLASSICAL if detect else []) + out + list(self._extra_models.items())

    def _on_task(self, _v: Any = None) -> None:
        self.model.reset_choices()
        self.threshold.visible = self.task.value == "detect"
        if self.task.value == "detect" and self.tile.value < 1024:
            self.tile.value = 1024  # detection tiles: bigger is cheaper (fewer borders)

    def _refresh_choices(self, _e: Any = None) -> None:
        self.image.reset_choices()
        if self.image.value is None and self.image.choices:
            self.image.value = self.image.choices[-1]

    def add_model_path(self, path: str) -> None:
        """Offer a model folder from disk and select it."""
        self._extra_models[f"{Path(path).name} (folder)"] = str(path)
        self.model.reset_choices()
        self.model.value = str(path)

    # ------------------------------------------------------------------ running

    def current_view_region(self, layer: Any) -> tuple[int, int, int, int] | None:
        """Level-0 pixels ``(y0, x0, y1, x1)`` of the part of ``layer`` on screen.

        From the camera (centre, zoom) and the canvas size, mapped through the layer's
        transform; ``None`` (the whole slide) when that fails.
        """
        import numpy as np

        try:
            viewer = self._viewer
            scene = getattr(viewer, "scene", None)
            cam = scene.camera if scene is not None else viewer.camera
            centre = np.asarray(cam.center, dtype=float)[-2:]
            size = np.asarray(viewer.canvas.size, dtype=float)[-2:]
            half = size / (2.0 * float(cam.zoom))
            a = np.asarray(layer.world_to_data(tuple(centre - half)), dtype=float)[-2:]
            b = np.asarray(layer.world_to_data(tuple(centre + half)), dtype=float)[-2:]
            lo, hi = np.minimum(a, b), np.maximum(a, b)
            h, w = layer.level_shapes[0][:2] if layer.multiscale else layer.data.shape[:2]
            y0, x0 = max(0, int(lo[0])), max(0, int(lo[1]))
            y1, x1 = min(int(h), int(np.ceil(hi[0]))), min(int(w), int(np.ceil(hi[1])))
            if y1 <= y0 or x1 <= x0:
                return None
            return y0, x0, y1, x1
        except Exception:  # noqa: BLE001 - no camera information: the whole slide
            return None

    def _start(self, view: bool) -> None:
        from napari.utils.notifications import show_error

        if self.job.running:
            return
        layer = self.image.value
        if layer is None:
            show_error("Open a slide (a pyramidal TIFF) and choose it as Slide.")
            return
        detect = self.task.value == "detect"
        if not self.model.value:
            show_error("Choose a 2D model" + (" or a classical detector." if detect else "."))
            return
        path = Path(slide_path_of(layer))
        model_name = Path(str(self.model.value)).name
        stem = f"{path.name.split('.')[0]}_{model_name}"
        if detect:
            out = path.with_name(f"{stem}_{'view' if view else 'det'}.geojson")
        else:
            out = path.with_name(f"{stem}_{'view' if view else 'seg'}.zarr")
        opts = {"tile": int(self.tile.value), "device": self.device.value}
        if view:
            opts["region"] = self.current_view_region(layer)
        self._remove_labels(out)
        self._t0 = time.perf_counter()
        args = (str(path), str(self.model.value), str(out), opts)
        if detect:
            self._start_points(out, layer)
            self.job.start(
                _detect_slide_job,
                *args,
                on_result=lambda r: self._on_detected(r, out),
                on_progress=self._on_detect_progress,
                on_finished=self._on_finished,
            )
        else:
            self.job.start(
                _slide_job,
                *args,
                on_result=lambda r: self._on_result(r, out, layer),
                on_progress=lambda p: self._on_progress(p, out, layer),
                on_finished=self._on_finished,
            )

    def _remove_labels(self, out: Path) -> None:
        name = out.name.rsplit(".", 1)[0]
        if name in self._viewer.layers:
            self._viewer.layers.remove(name)
        self._labels_layer = None
        self._points = None

    # ------------------------------------------------------------------ detections

    def _start_points(self, out: Path, layer: Any) -> None:
        import numpy as np
        import pandas as pd

        self._result = None
        self._live: list = []
        self._points = self._viewer.add_points(
            np.zeros((0, 2)),
            name=out.name.rsplit(".", 1)[0],
            features=pd.DataFrame({"id": [], "class": [], "score": [], "area": []}),
            affine=layer.affine.affine_matrix[-3:, -3:],
            size=8,
            face_color="yellow",
            border_color="white",
            border_width=0.1,
            metadata={"medseg": {"path": str(out), "source": slide_path_of(layer)}},
        )

    def _show_table(self, table: Any) -> None:
        """Show ``table`` rows (level-0 ``y``, ``x``) in the Points layer."""
        import numpy as np

        if self._points is None:
            return
        cols = [c for c in ("id", "class", "score", "area") if c in table.columns]
        self._points.data = table[["y", "x"]].to_numpy(float).reshape(-1, 2)
        self._points.features = table[cols].reset_index(drop=True)
        if len(table):
            self._points.face_color = "score"
            self._points.face_colormap = "viridis"
            self._points.face_contrast_limits = (0.0, 1.0)
            # a dot a third of the object's diameter (4-16 px): the nucleus stays visible
            diam = np.sqrt(table["area"].to_numpy(float) * 4 / np.pi) if "area" in cols else 30
            self._points.size = np.clip(np.nan_to_num(diam, nan=30.0) / 3.0, 4.0, 16.0)

    def _on_detect_progress(self, p: Progress) -> None:
        import pandas as pd

        rows = (p.info or {}).get("detections")
        if rows is not None and len(rows):
            self._live.append(rows)
            now = time.perf_counter()
            if now - self._last_refresh > 0.5:  # the layer grows twice a second at most
                self._show_table(pd.concat(self._live, ignore_index=True))
                self._filter_points()
                self._last_refresh = now

    def _on_detected(self, result: Any, out: Path) -> None:
        self._result = result
        self._live = []
        self._show_table(result.table)
        self._filter_points()
        if self._points is not None:
            self._points.metadata["medseg"]["provenance"] = result.provenance
        self.progress.value = 100
        bad = f", {len(result.skipped)} unreadable tiles" if result.skipped else ""
        self.status.value = (
            f"Done in {time.perf_counter() - self._t0:.1f} s: {len(result.table)} objects in "
            f"{result.tiles_done} tiles{bad}; saved {out.name}"
        )

    def _filter_points(self, _v: Any = None) -> None:
        """Show the detections above the score threshold (no new run): the Points layer's
        ``shown`` mask hides the others, so they stay in the layer with the user's edits and
        selection, and a slider step costs no rebuild. Points without a score (added by hand)
        stay shown."""

        if self._points is None or "score" not in self._points.features.columns:
            return
        score = self._points.features["score"].to_numpy(float)
        self._points.shown = ~(score < float(self.threshold.value))

    def _show(self, out: Path, layer: Any) -> None:
        from napari_medseg.core.slides.export import open_result

        name = out.name[: -len(".zarr")]
        levels = open_result(out)
        self._labels_layer = self._viewer.add_labels(
            levels,
            name=name,
            multiscale=True,
            affine=layer.affine.affine_matrix[-3:, -3:],
            metadata={"medseg": {"path": str(out), "source": slide_path_of(layer)}},
            opacity=0.5,
        )

    def _on_progress(self, p: Progress, out: Path, layer: Any) -> None:
        if p.total and self._labels_layer is None and out.exists():
            self._show(out, layer)
        elif self._labels_layer is not None and p.info.get("tiles"):
            now = time.perf_counter()
            if now - self._last_refresh > 0.5:
                self._labels_layer.refresh()
                self._last_refresh = now

    def _on_result(self, result: Any, out: Path, layer: Any) -> None:
        self._remove_labels(out)
        self._show(out, layer)
        self._labels_layer.metadata["medseg"]["provenance"] = result.provenance
        self.progress.value = 100
        bad = f", {len(result.skipped)} unreadable tiles" if result.skipped else ""
        self.status.value = (
            f"Done in {time.perf_counter() - self._t0:.1f} s: "
            f"{result.tiles_done} tiles{bad}; saved {out.name}"
        )

    def _on_finished(self, cancelled: bool) -> None:
        if self._labels_layer is not None:
            self._labels_layer.refresh()
