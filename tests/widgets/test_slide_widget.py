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
    qtbot.waitUntil(lambda: widget.job.worker is None, timeout=30_000)
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

    from napari_medseg.core.slides.export import open_result
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
    qtbot.waitUntil(lambda: widget.job.worker is None, timeout=120_000)
    assert widget.status.value.startswith("Done"), widget.status.value
    out = tmp_path / "slide_tiny_rgb_seg.zarr"
    labels = viewer.layers["slide_tiny_rgb_seg"]
    assert labels.multiscale and labels.data[0].shape == (2600, 2100)
    # the same labels as the engine run directly on the whole slide: every tissue tile done,
    # glass-only tiles skipped (0), nothing left out at the far edges
    from napari_medseg.core.slides.segment import segment_slide
    from napari_medseg.io.raster import read_slide
    from napari_medseg.models.registry import load_model
    from napari_medseg.progress import run_sync

    ref = tmp_path / "ref.zarr"
    run_sync(
        segment_slide(read_slide(slide), load_model(str(tmp_path / "tiny_rgb")), ref, tile=256)
    )
    full = np.asarray(open_result(out)[0])
    np.testing.assert_array_equal(full, np.asarray(open_result(ref)[0]))
    tiles = full[:2560, :2048].reshape(10, 256, 8, 256).any(axis=(1, 3))
    assert tiles.any(axis=0).sum() >= 4 and not tiles.all()  # tissue across, glass skipped
    assert full[-256:, :].any()  # the last rows were covered
    # File > Open on the saved result reopens it lazily, on the slide
    (again,) = viewer.open(str(out), plugin="napari-medseg")
    assert type(again).__name__ == "Labels" and again.multiscale
    assert again.data[0].shape == (2600, 2100)
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
    qtbot.waitUntil(lambda: widget.job.worker is None, timeout=10_000)
    assert time.perf_counter() - t0 < 3.0  # between two batches
    assert widget.status.value.startswith("Cancelled"), widget.status.value
    assert widget.run_button.enabled and not widget.cancel_button.enabled
    attrs = json.loads((out / "zarr.json").read_text())["attributes"]
    medseg = attrs.get("medseg") or attrs
    assert medseg.get("complete") is False
    assert open_result(out)[0].shape == (2600, 2100)


def test_detect_on_current_view_gives_points_and_geojson(make_napari_viewer, qtbot, tmp_path):
    """Detect task: the classical H&E nuclei detector (haematoxylin) on the slide, current view."""
    import json

    from napari_medseg.widgets.slide import SlideWidget

    slide = make_slide(tmp_path / "slide.tif", (3000, 2500))
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(slide), plugin="napari-medseg")
    widget = SlideWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Whole slide")
    widget.task.value = "detect"
    assert not widget.threshold.native.isHidden() and widget.tile.value == 1024
    values = [c[1] if isinstance(c, tuple) else c for c in widget.model.choices]
    assert "classical-he" in values and "fluo_nuclei_2d" in values
    widget.model.value = "classical-he"
    viewer.scene.camera.center = (400, 400)
    viewer.scene.camera.zoom = 1.5
    region = widget.current_view_region(layer)
    assert region is not None
    widget.view_button.native.click()
    qtbot.waitUntil(lambda: widget.job.worker is None, timeout=60_000)
    assert widget.status.value.startswith("Done"), widget.status.value
    points = viewer.layers["slide_classical-he_view"]
    n_all = len(widget._result.table)
    # the view lies in the first 1024x1024 tile, which holds 2 whole copies of the real
    # 300x500 H&E tissue (the slide tiles it with glass every 600 rows and 1200 columns); on
    # the tissue alone the same detector finds 318 nuclei: about 2 x 318 expected
    assert 0.9 * 2 * 318 < n_all < 1.1 * 2 * 318, n_all
    assert widget._result.table["area"].median() < 400  # nuclei, not tissue blobs
    # the tiles covering the view were searched, not the whole 3000 x 2500 slide
    t = widget.tile.value
    y0, x0, y1, x1 = (np.array(region) // t) * t + np.array([0, 0, t, t])
    y1, x1 = int(np.ceil(region[2] / t) * t), int(np.ceil(region[3] / t) * t)
    assert y1 * x1 < 3000 * 2500
    assert (points.data[:, 0] >= y0).all() and (points.data[:, 0] <= y1).all()
    assert (points.data[:, 1] >= x0).all() and (points.data[:, 1] <= x1).all()
    np.testing.assert_allclose(points.affine.affine_matrix, layer.affine.affine_matrix)
    # the score threshold filters the shown objects live, without a new run
    widget.threshold.value = 0.0
    assert len(points.data) == int(points.shown.sum()) == n_all
    cut = float(np.median(widget._result.table["score"]))
    points.selected_data = {0}
    widget.threshold.value = cut
    # hidden with napari's `shown` mask, not deleted: the layer and its selection stay
    assert len(points.data) == n_all and points.selected_data == {0}
    n_cut = int((widget._result.table["score"] >= cut).sum())
    assert int(points.shown.sum()) == n_cut < n_all
    assert (points.features["score"][points.shown] >= cut).all()
    # saved beside the slide in QuPath's GeoJSON: every object, outlines for the watershed ones
    doc = json.loads((tmp_path / "slide_classical-he_view.geojson").read_text())
    assert len(doc["features"]) == n_all
    assert doc["features"][0]["geometry"]["type"] == "Polygon"
