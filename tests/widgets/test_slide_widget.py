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


def test_whole_slide_then_cancel_a_second_run(make_napari_viewer, qtbot, tmp_path):
    """Run on whole slide covers the tissue everywhere; Cancel stops a run and keeps it readable."""
    import json
    import time

    from napari_medseg.core.wsi import open_result
    from napari_medseg.widgets.slide import SlideWidget

    slide = make_slide(tmp_path / "slide.tif", (2600, 2100))
    viewer = make_napari_viewer()
    viewer.open(str(slide), plugin="napari-medseg")
    widget = SlideWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Whole slide")
    widget.add_model_path(str(save_rgb_model(tmp_path / "tiny_rgb")))
    widget.tile.value = 256
    widget.run_button.native.click()
    assert not widget.view_button.enabled and widget.cancel_button.enabled
    qtbot.waitUntil(lambda: widget._worker is None, timeout=120_000)
    assert widget.status.value.startswith("Done"), widget.status.value
    out = tmp_path / "slide_tiny_rgb_seg.zarr"
    labels = viewer.layers["slide_tiny_rgb_seg"]
    assert labels.multiscale and labels.data[0].shape == (2600, 2100)
    # the same labels as the engine run directly on the whole slide: every tissue tile done,
    # glass-only tiles skipped (0), nothing left out at the far edges
    from napari_medseg.core.progress import run_sync
    from napari_medseg.core.wsi import segment_slide
    from napari_medseg.io.raster import read_slide
    from napari_medseg.models.registry import load_model

    ref = tmp_path / "ref.zarr"
    run_sync(
        segment_slide(read_slide(slide), load_model(str(tmp_path / "tiny_rgb")), ref, tile=256)
    )
    full = np.asarray(open_result(out)[0])
    np.testing.assert_array_equal(full, np.asarray(open_result(ref)[0]))
    tiles = full[:2560, :2048].reshape(10, 256, 8, 256).any(axis=(1, 3))
    assert tiles.any(axis=0).sum() >= 4 and not tiles.all()  # tissue across, glass skipped
    assert full[-256:, :].any()  # the last rows were covered
    attrs = json.loads((out / "zarr.json").read_text())["attributes"]
    medseg = attrs.get("medseg") or attrs
    assert medseg.get("complete") is True

    # a second run, cancelled as soon as tiles arrive: stops quickly, result readable
    widget.tile.value = 128
    widget.run_button.native.click()
    assert widget.progress.value == 0
    qtbot.waitUntil(lambda: widget.progress.value > 0, timeout=60_000)
    t0 = time.perf_counter()
    widget.cancel_button.native.click()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=10_000)
    assert time.perf_counter() - t0 < 3.0  # between two batches
    assert widget.status.value.startswith("Cancelled"), widget.status.value
    assert widget.run_button.enabled and not widget.cancel_button.enabled
    attrs = json.loads((out / "zarr.json").read_text())["attributes"]
    medseg = attrs.get("medseg") or attrs
    assert medseg.get("complete") is False
    assert open_result(out)[0].shape == (2600, 2100)
