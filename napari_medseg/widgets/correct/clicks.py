"""Clicks panel: positive/negative clicks on a Points layer, then refine the class around them.

``Click model``: the random walker (model-free, follows intensity edges, 2D or 3D) or the learned
click model (2D, in the slice of each click); see docs/clicks.md for which wins where. The
refinement is computed by :func:`napari_medseg.core.correct.refine.refine_with_clicks` and
applied as one undo step through the tools panel.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import ComboBox, Container, FloatSpinBox, PushButton

from napari_medseg.io.geometry import META_KEY
from napari_medseg.widgets.correct.session import layer_spacing

if TYPE_CHECKING:
    from napari_medseg.widgets.correct.dock import CorrectWidget

SIGNS = ["positive", "negative"]
CLICK_METHODS = [
    ("random walker (follows edges, any image)", "random_walker"),
    ("learned (click_refine_2d, 2D slices)", "learned"),
]
SIGN_COLORS = {"positive": "#30ff30", "negative": "#ff3030"}


class ClicksPanel(Container):
    """Click sign, click model, reach, Refine (R) and Clear clicks.

    Parameters
    ----------
    dock : CorrectWidget
        Gives the viewer, the layer being corrected, its image and the tools panel that
        applies the refinement.
    """

    def __init__(self, dock: CorrectWidget) -> None:
        super().__init__(labels=True)
        self.margins = (0, 0, 0, 0)
        self._dock = dock
        self.click_sign = ComboBox(label="Click (T toggles)", choices=SIGNS, value=SIGNS[0])
        self.click_method = ComboBox(
            label="Click model", choices=CLICK_METHODS, value="random_walker"
        )
        self.reach = FloatSpinBox(
            label="Click reach (mm; px on 2D images)",
            value=25.0,
            min=1.0,
            max=500.0,
            step=1.0,
            tooltip="Nothing farther than this from every click changes. Smaller suits small "
            "objects (nuclei: 12 px was better for the random walker, docs/clicks.md).",
        )
        self.refine_button = PushButton(text="Refine from clicks (R)")
        self.clear_clicks_button = PushButton(text="Clear clicks")
        self.extend(
            [
                self.click_sign,
                self.click_method,
                self.reach,
                self.refine_button,
                self.clear_clicks_button,
            ]
        )
        self.refine_button.changed.connect(self.refine_clicks)
        self.clear_clicks_button.changed.connect(self.clear_clicks)
        self.click_sign.changed.connect(self._on_sign)

    def clicks_layer(self, create: bool = True) -> Any:
        """The Points layer of positive/negative clicks for the dock's Labels layer."""
        layer = self._dock.bound
        if layer is None:
            return None
        viewer = self._dock.viewer
        name = f"{layer.name} clicks"
        if name in viewer.layers:
            return viewer.layers[name]
        if not create:
            return None
        sign = self.click_sign.value
        pts = viewer.add_points(
            np.zeros((0, layer.ndim)),
            name=name,
            ndim=layer.ndim,
            affine=layer.affine.affine_matrix,
            features={"sign": np.array([], dtype=object)},
            face_color=SIGN_COLORS[sign],
            border_color="white",
            size=4 * float(min(layer_spacing(layer))),
        )
        pts.feature_defaults = {"sign": sign}
        pts.current_face_color = SIGN_COLORS[sign]
        pts.bind_key("t", lambda _l: self.toggle_sign(), overwrite=True)
        pts.bind_key("r", lambda _l: self.refine_clicks(), overwrite=True)
        pts.mode = "add"
        viewer.layers.selection.active = pts
        return pts

    def toggle_sign(self) -> str:
        """Switch between positive and negative clicks (shortcut T on the clicks layer)."""
        self.click_sign.value = SIGNS[1] if self.click_sign.value == SIGNS[0] else SIGNS[0]
        return str(self.click_sign.value)

    def _on_sign(self, value: str) -> None:
        pts = self.clicks_layer(create=False)
        if pts is not None:
            pts.feature_defaults = {"sign": value}
            pts.current_face_color = SIGN_COLORS[value]
        self._dock.status.value = f"Next clicks are {value} (T toggles, R refines)."

    def clear_clicks(self, _v: Any = None) -> None:
        pts = self.clicks_layer(create=False)
        if pts is not None and len(pts.data):
            pts.data = np.zeros((0, pts.ndim))

    def refine_clicks(self, _v: Any = None) -> int:
        """Re-segment the class around the clicks, as one undo step; returns voxels changed."""
        from napari.utils.notifications import show_error

        from napari_medseg.core.correct.refine import refine_with_clicks

        dock = self._dock
        target = dock.target()
        if target is None:
            return 0
        layer = target[0]
        pts = self.clicks_layer(create=True)
        if pts is None or not len(pts.data):
            dock.status.value = "Add clicks first: positive on what is missing, negative on errors."
            return 0
        img_layer = dock.image.value
        if img_layer is None:
            show_error("Choose the image the labels were drawn on: clicks need its intensities.")
            return 0
        img = np.asarray(img_layer.data)
        if getattr(img_layer, "rgb", False):
            img = img[..., :3].mean(axis=-1)
        if img.shape != layer.data.shape:
            show_error("The image and the labels must share a grid to refine from clicks.")
            return 0
        signs = np.asarray(pts.features["sign"]).astype(str)
        coords = np.asarray(pts.data, float)
        method = str(self.click_method.value)
        mode = "3d" if dock.viewer.dims.ndisplay == 3 and method == "random_walker" else "2d"
        # the intensities the reader sees (contrast limits); RGB: the full range. The learned
        # model normalises by itself, except for CT where the window is the meaningful range.
        ct = ((img_layer.metadata or {}).get(META_KEY) or {}).get("modality") == "CT"
        window = None if getattr(img_layer, "rgb", False) else tuple(img_layer.contrast_limits)
        if method == "learned" and not ct:
            window = None
        return dock.tools.run_tool(
            "Refine from clicks",
            lambda a, c, lyr: refine_with_clicks(
                img,
                a,
                c,
                coords[signs == "positive"],
                coords[signs == "negative"],
                layer_spacing(lyr),
                mode=mode,
                axis=dock.slice_axis(lyr),
                window=window,
                method=method,
                reach_mm=float(self.reach.value),
            ),
        )
