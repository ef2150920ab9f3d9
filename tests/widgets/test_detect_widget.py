"""The Detect dock in a real viewer: Run, live threshold without a new run, edits are exported."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import data_path

pytestmark = pytest.mark.gui


def _widget(viewer):
    from napari_medseg.widgets.detect import DetectWidget

    widget = DetectWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Detect")
    return widget


def test_run_then_live_threshold_then_export_edits(make_napari_viewer, qtbot, tmp_path):
    import tifffile

    img = tifffile.imread(data_path("microscopy/dsb2018_nuclei/image.tif"))[0:117, 259:503]
    viewer = make_napari_viewer()
    image = viewer.add_image(img, name="nuclei")
    widget = _widget(viewer)
    assert widget.image.value is image
    models = (
        [v for _, v in widget.model.choices]
        if isinstance(widget.model.choices[0], tuple)
        else list(widget.model.choices)
    )
    assert "fluo_nuclei_2d" in models and "ct_spleen_3d" not in models  # 2D image: 2D models
    widget.model.value = "fluo_nuclei_2d"
    widget.device.value = "cpu"
    widget.threshold.value = 0.0
    runs = []
    widget.run_button.native.click()  # as a user pressing Run
    widget._worker.started.connect(lambda: runs.append(1))
    qtbot.waitUntil(lambda: widget._worker is None, timeout=60_000)
    assert widget.status.value.startswith("Done"), widget.status.value
    points = viewer.layers["nuclei_detections"]
    boxes = viewer.layers["nuclei_boxes"]
    n_all = len(points.data)
    assert n_all >= 10 and len(boxes.data) == n_all
    assert list(points.features.columns) == ["id", "class", "score", "area"]
    assert f"nucleus: {n_all}" in widget.counts.value
    # boxes enclose their centres
    for rect, c in zip(boxes.data[:5], points.data[:5]):
        assert rect[:, 0].min() <= c[0] <= rect[:, 0].max()
        assert rect[:, 1].min() <= c[1] <= rect[:, 1].max()

    # move the threshold: layers update at once, no new worker
    scores = np.sort(points.features["score"].to_numpy())
    cut = float(np.round(scores[len(scores) // 2] + 0.005, 2))
    refreshes = widget.n_refreshes
    widget.threshold.value = cut
    assert widget._worker is None
    assert widget.n_refreshes == refreshes + 1
    n_cut = int((scores >= cut).sum())
    assert 0 < len(points.data) == n_cut < n_all
    assert (points.features["score"] >= cut).all()
    assert len(viewer.layers["nuclei_boxes"].data) == n_cut
    assert f"nucleus: {n_cut}" in widget.counts.value

    # user edits: delete one point, add one, move one; export saves exactly that
    points.selected_data = {0}
    points.remove_selected()
    points.add(np.array([[5.0, 7.0]]))
    moved = points.data.copy()
    moved[0] = moved[0] + [3.0, -2.0]
    points.data = moved
    out = widget.export(str(tmp_path / "edited.csv"))
    from napari_medseg.io.detections import read_detections

    t = read_detections(out)
    assert len(t) == n_cut  # -1 deleted +1 added
    np.testing.assert_allclose(t[["y", "x"]].to_numpy(), points.data, atol=1e-4)
    assert t.iloc[-1]["id"] == 0 and t.iloc[-1]["score"] == 1.0
    gj = widget.export(str(tmp_path / "edited.geojson"))
    feats = json.loads(gj.read_text())["features"]
    kinds = [f["geometry"]["type"] for f in feats]
    assert len(feats) == n_cut and kinds[0] == "Point" and kinds[-1] == "Point"
    assert kinds.count("Polygon") == n_cut - 2  # untouched objects keep their outline


def test_volume_gets_points_on_the_scan_and_no_boxes(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    (image,) = viewer.open_sample("napari-medseg", "ct")
    widget = _widget(viewer)
    values = [c[1] if isinstance(c, tuple) else c for c in widget.model.choices]
    assert "ct_spleen_3d" in values and "classical" in values
    widget.model.value = "classical"
    widget.run_button.native.click()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=60_000)
    assert widget.status.value.startswith("Done"), widget.status.value
    name = f"{image.name}_detections"
    points = viewer.layers[name]
    assert points.ndim == 3 and len(points.data) >= 1
    assert f"{image.name}_boxes" not in viewer.layers
    assert "volume_mm3" in points.features.columns
    np.testing.assert_allclose(points.affine.affine_matrix, image.affine.affine_matrix)
    shape = np.asarray(image.data.shape)
    assert ((points.data >= -0.5) & (points.data <= shape - 0.5)).all()
    # the layer centre maps to the same world point as the table's world columns (RAS mm)
    t = widget.shown_table()
    world_sar = points.data_to_world(points.data[0])
    np.testing.assert_allclose(
        world_sar[::-1], t[["world_x", "world_y", "world_z"]].to_numpy()[0], atol=1e-3
    )
