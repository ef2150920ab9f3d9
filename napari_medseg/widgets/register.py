"""The "Register" dock widget: align a moving image to a fixed image and carry labels over.

Thin (docs/ARCHITECTURE.md rule 3): it reads its inputs, runs
:func:`napari_medseg.core.register.optimise.register` in a napari worker (progress bar with the
loss,
Cancel via ``worker.quit()``) and turns the result into layers on the FIXED image's geometry:

* ``<moving>_registered`` (Image): the moving image warped onto the fixed grid;
* ``<labels>_registered`` (Labels): the moving labels, nearest interpolation;
* ``<points>_registered`` (Points): moving points carried into the fixed image;
* ``<moving>_jacobian`` and ``<moving>_deformation_mm`` (Image, deformable only): the
  Jacobian determinant (volume ratio; <= 0 means folding) and the deformation length in mm.

Quality views: a checkerboard of fixed and warped, a blend slider (the warped layer's opacity
over the fixed image: 0 shows the fixed image, 1 the registered one) and the similarity before
and after, in the status line.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FloatSlider,
    FloatSpinBox,
    Label,
    ProgressBar,
    PushButton,
    SpinBox,
)

from napari_medseg.progress import Progress
from napari_medseg.widgets._layers import labels_layer_data, record_from_layer
from napari_medseg.widgets._task import ImageInput, JobRunner, report_error

if TYPE_CHECKING:
    import napari

SIMILARITY_NAMES = {"lncc": "LNCC", "mi": "MI", "mse": "-MSE"}


def _register_job(fixed: Any, moving: Any, options: Any, labels: Any, points_moving: Any) -> Any:
    """Worker generator: register, then carry moving points into the fixed world."""
    from napari_medseg.core.register.optimise import register

    result = yield from register(fixed, moving, options, moving_labels=labels)
    if points_moving is not None and len(points_moving):
        yield Progress(0, 0, "carrying the points into the fixed image")
        result.points = result.transform.map_points_inverse(points_moving)
    return result


def _world_order(ndim: int) -> slice:
    """napari world axes (S, A, R) are RAS reversed for volumes; 2D images share one order."""
    return slice(None, None, -1) if ndim == 3 else slice(None)


class RegisterWidget(ImageInput, Container):
    """Dock widget: fixed, moving, optional moving labels and points, mode, similarity,
    regularisation, iterations, Run / Cancel, progress with the loss, quality views."""

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        super().__init__(labels=True)
        self._viewer = viewer
        self._t0 = 0.0
        self._last: dict = {}
        self.fixed = ComboBox(label="Fixed", choices=self._image_choices, nullable=True)
        self.moving = ComboBox(label="Moving", choices=self._image_choices, nullable=True)
        self.labels = ComboBox(label="Moving labels", choices=self._labels_choices, nullable=True)
        self.points = ComboBox(label="Moving points", choices=self._points_choices, nullable=True)
        self.mode = ComboBox(
            label="Mode", choices=["rigid", "affine", "deformable"], value="deformable"
        )
        self.similarity = ComboBox(
            label="Similarity",
            choices=[
                ("auto", "auto"),
                ("local NCC (same modality)", "lncc"),
                ("mutual information (across modalities)", "mi"),
                ("mean squared error (masks)", "mse"),
            ],
            value="auto",
        )
        self.init = ComboBox(
            label="Initialise",
            choices=[
                ("world positions", "identity"),
                ("centres of mass", "com"),
                ("field-of-view centres", "geometry"),
            ],
            value="identity",
        )
        self.regularization = FloatSpinBox(
            label="Regularisation", value=0.3, min=0.0, max=1000.0, step=0.1
        )
        self.iterations = SpinBox(label="Iterations", value=100, min=1, max=100_000)
        self.device = ComboBox(label="Device", choices=["auto", "cpu", "cuda", "mps"], value="auto")
        self.run_button = PushButton(text="Run")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(label="Progress", min=0, max=100, value=0)
        self.loss = Label(label="Loss", value="")
        self.status = Label(label="", value="Choose a fixed and a moving image, then press Run.")
        self.checkerboard = CheckBox(text="Checkerboard (fixed / registered)", value=False)
        self.blend = FloatSlider(label="Blend", value=0.5, min=0.0, max=1.0, step=0.05)
        self.extend(
            [
                self.fixed,
                self.moving,
                self.labels,
                self.points,
                self.mode,
                self.similarity,
                self.init,
                self.regularization,
                self.iterations,
                self.device,
                self.run_button,
                self.cancel_button,
                self.progress,
                self.loss,
                self.status,
                self.checkerboard,
                self.blend,
            ]
        )
        self.job = JobRunner([self.run_button], self.cancel_button, self.progress, self.status)
        self.run_button.changed.connect(self._on_run)
        self.checkerboard.changed.connect(self._on_checkerboard)
        self.blend.changed.connect(self._on_blend)
        self._follow_layers()

    # ------------------------------------------------------------------ choices

    def _image_choices(self, _w: Any = None) -> list:
        from napari.layers import Image

        return [
            lyr
            for lyr in self._viewer.layers
            if isinstance(lyr, Image) and not lyr.metadata.get("medseg_registration_output")
        ]

    def _labels_choices(self, _w: Any = None) -> list:
        from napari.layers import Labels

        return [lyr for lyr in self._viewer.layers if isinstance(lyr, Labels)]

    def _points_choices(self, _w: Any = None) -> list:
        from napari.layers import Points

        return [lyr for lyr in self._viewer.layers if isinstance(lyr, Points)]

    def _on_layers_changed(self, _event: Any = None) -> None:
        for box in (self.fixed, self.moving, self.labels, self.points):
            box.reset_choices()
        images = self._image_choices()
        if self.fixed.value is None and images:
            self.fixed.value = images[0]
        if self.moving.value is None and len(images) > 1:
            self.moving.value = next(i for i in images if i is not self.fixed.value)

    # ------------------------------------------------------------------ run

    def _options(self) -> Any:
        from napari_medseg.core.register.optimise import RegistrationOptions

        return RegistrationOptions(
            mode=self.mode.value,
            similarity=self.similarity.value,
            regularization=float(self.regularization.value),
            iterations=int(self.iterations.value),
            init=self.init.value,
            device=self.device.value,
        )

    def _moving_points(self, n: int) -> np.ndarray | None:
        layer = self.points.value
        if layer is None or not len(layer.data):
            return None
        world = np.array([layer.data_to_world(p) for p in np.asarray(layer.data)], dtype=float)
        return world[:, -n:][:, _world_order(n)]

    def _on_run(self, _v: Any = None) -> None:
        from napari.utils.notifications import show_error

        fixed_layer, moving_layer = self.fixed.value, self.moving.value
        if fixed_layer is None or moving_layer is None:
            show_error("Choose a fixed and a moving image layer.")
            return
        if fixed_layer is moving_layer:
            show_error("The fixed and moving images are the same layer; choose two images.")
            return
        try:
            fixed = record_from_layer(fixed_layer)
            moving = record_from_layer(moving_layer)
            labels = record_from_layer(self.labels.value) if self.labels.value else None
            points = self._moving_points(moving.spatial_ndim)
        except Exception as e:  # noqa: BLE001 - shown to the user as one sentence
            report_error(self.status, e)
            return
        self._t0 = time.perf_counter()
        self.loss.value = ""
        self.job.start(
            _register_job,
            fixed,
            moving,
            self._options(),
            labels,
            points,
            on_result=lambda result: self._on_result(fixed_layer, moving_layer, fixed, result),
            on_progress=self._show_loss,
        )

    def _show_loss(self, p: Progress) -> None:
        if "loss" in p.info:
            self.loss.value = f"{p.info['loss']:.4f} ({p.info.get('stage', '')})"

    # ------------------------------------------------------------------ results

    def _image_layer(self, name: str, data: Any, kwargs: dict, **display: Any) -> Any:
        kwargs = dict(kwargs, name=name, **display)
        kwargs["metadata"] = dict(kwargs["metadata"], medseg_registration_output=True)
        if name in self._viewer.layers:
            self._viewer.layers.remove(name)
        return self._viewer.add_image(data, **kwargs)

    def _on_fixed_grid(self, fixed: Any, data: np.ndarray, modality: str, name: str) -> tuple:
        from napari_medseg.io.geometry import record_to_layer_data
        from napari_medseg.io.record import ImageRecord

        rec = ImageRecord(
            data=data,
            affine=fixed.affine,
            space=fixed.space,
            modality=modality,
            name=name,
            metadata=fixed.metadata,
        )
        data, kwargs, _ = record_to_layer_data(rec, "image")
        kwargs.pop("name", None)
        return data, kwargs

    def _on_result(self, fixed_layer: Any, moving_layer: Any, fixed: Any, result: Any) -> None:
        base = moving_layer.name
        meta_extra = {"provenance": result.provenance}
        data, kwargs = self._on_fixed_grid(fixed, result.warped, "unknown", f"{base}_registered")
        kwargs.pop("contrast_limits", None)
        lo, hi = np.percentile(result.warped, [0.5, 99.5]) if result.warped.size else (0, 1)
        warped_layer = self._image_layer(
            f"{base}_registered",
            data,
            kwargs,
            colormap="gray",
            blending="translucent",  # over the fixed image: (1 - blend) fixed + blend warped
            opacity=float(self.blend.value),
            contrast_limits=(float(lo), float(hi) if hi > lo else float(lo) + 1.0),
        )
        warped_layer.metadata["medseg"]["provenance"] = result.provenance
        if result.warped_labels is not None and self.labels.value is not None:
            name = f"{self.labels.value.name}_registered"
            ldata, lkw = labels_layer_data(
                fixed_layer, result.warped_labels, fixed, name, meta_extra
            )
            if name in self._viewer.layers:
                self._viewer.layers.remove(name)
            self._viewer.add_labels(
                ldata, name=name, opacity=0.5, **{k: v for k, v in lkw.items() if k != "name"}
            )
        if result.points is not None and self.points.value is not None:
            name = f"{self.points.value.name}_registered"
            n = fixed.spatial_ndim
            if name in self._viewer.layers:
                self._viewer.layers.remove(name)
            self._viewer.add_points(
                result.points[:, _world_order(n)], name=name, size=3, face_color="yellow"
            )
        if result.jacobian is not None:
            jd, jkw = self._on_fixed_grid(fixed, result.jacobian, "unknown", f"{base}_jacobian")
            self._image_layer(
                f"{base}_jacobian",
                jd,
                jkw,
                colormap="bwr",
                contrast_limits=(0.0, 2.0),
                visible=False,
            )
            md, mkw = self._on_fixed_grid(
                fixed, result.magnitude, "unknown", f"{base}_deformation_mm"
            )
            top = float(max(np.percentile(result.magnitude, 99.5), 1e-3))
            self._image_layer(
                f"{base}_deformation_mm",
                md,
                mkw,
                colormap="magma",
                contrast_limits=(0.0, top),
                visible=False,
            )
        self._last = {
            "fixed": fixed,
            "fixed_layer": fixed_layer,
            "warped_layer": warped_layer,
            "result": result,
        }
        if self.checkerboard.value:
            self._on_checkerboard(True)
        self._viewer.layers.selection.active = warped_layer
        secs = time.perf_counter() - self._t0
        sim = SIMILARITY_NAMES.get(result.similarity, result.similarity)
        fold = (
            f"; folding {100 * result.folding_fraction:.2f}% of voxels"
            if result.jacobian is not None
            else ""
        )
        self.progress.value = self.progress.max
        self.status.value = (
            f"Done in {secs:.1f} s. {sim} before {result.similarity_before:.3f} -> after "
            f"{result.similarity_after:.3f}{fold}."
        )

    # ------------------------------------------------------------------ quality views

    def _on_checkerboard(self, value: Any = None) -> None:
        name = "checkerboard"
        if not value:
            if name in self._viewer.layers:
                self._viewer.layers[name].visible = False
            return
        if not self._last:
            self.status.value = "Run a registration first; the checkerboard compares its result."
            return
        from napari_medseg.core.register.warp import checkerboard
        from napari_medseg.io.geometry import layer_to_record_parts
        from napari_medseg.widgets._layers import layer_state

        fixed_layer = self._last["fixed_layer"]
        fixed_arr, _, _, _ = layer_to_record_parts(
            np.asarray(fixed_layer.data), layer_state(fixed_layer)
        )
        board = checkerboard(fixed_arr, self._last["result"].warped)
        data, kwargs = self._on_fixed_grid(self._last["fixed"], board, "unknown", name)
        kwargs.pop("contrast_limits", None)
        self._image_layer(name, data, kwargs, colormap="gray", contrast_limits=(0.0, 1.0))

    def _on_blend(self, value: float) -> None:
        layer = self._last.get("warped_layer") if self._last else None
        if layer is not None and layer in self._viewer.layers:
            layer.opacity = float(value)
