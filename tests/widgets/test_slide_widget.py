"""The Whole slide dock in a real viewer: open a slide, zoom in, press Run on current view."""

from __future__ import annotations

import numpy as np
import pytest

from tests.slide_helpers import make_slide, save_rgb_model

pytestmark = pytest.mark.gui


def test_run_on_current_view_shows_lazy_multiscale_labels(make_napari_viewer, qtbot, tmp_path):
    from napari_medseg.widgets.slide import SlideWidget

    slide = make_slide(tmp_path / "slide.tif", (3000, 2500))
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(slide), plugin="napari-medseg")
    assert layer.multiscale
    widget = SlideWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Whole slide")
    widget.add_model_path(str(save_rgb_model(tmp_path / "tiny_rgb")))
    assert widget.image.value is layer
    viewer.scene.camera.center = (200, 200)
    viewer.scene.camera.zoom = 2.0
    region = widget.current_view_region(layer)
    assert region is not None and region[2] <= 1024 and region[3] <= 1024
    widget.view_button.native.click()  # as a user pressing the button
    assert widget.cancel_button.enabled
    qtbot.waitUntil(lambda: widget._worker is None, timeout=30_000)
    out = tmp_path / "slide_tiny_rgb_view.zarr"
    assert out.is_dir()
    labels = viewer.layers["slide_tiny_rgb_view"]
    assert type(labels).__name__ == "Labels" and labels.multiscale
    assert labels.data[0].shape == (3000, 2500)
    l0 = np.asarray(labels.data[0][:1024, :1024])
    assert l0.any() and not np.asarray(labels.data[0][1536:, 1536:]).any()
    assert widget.status.value.startswith("Done")
    assert labels.metadata["medseg"]["provenance"]["model"]["name"] == "tiny_rgb"
