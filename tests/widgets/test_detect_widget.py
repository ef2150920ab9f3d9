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
    assert "fluo_nuclei_det_2d" in models and "click_refine_2d" not in models
    widget.model.value = "fluo_nuclei_2d"
    widget.device.value = "cpu"
    widget.threshold.value = 0.0
    runs = []
    widget.run_button.native.click()  # as a user pressing Run
    widget.job.worker.started.connect(lambda: runs.append(1))
    qtbot.waitUntil(lambda: widget.job.worker is None, timeout=60_000)
    assert widget.status.value.startswith("Done"), widget.status.value
    points = viewer.layers["nuclei_detections"]
    boxes = viewer.layers["nuclei_boxes"]
    n_all = len(points.data)
    assert n_all >= 10 and len(boxes.data) == n_all
    assert list(points.features.columns) == ["id", "class", "score", "area"]
    # hovering a detection shows its features as a tooltip
    assert viewer.tooltip.visible
    status = points.get_status(points.data_to_world(points.data[0]), world=True)
    assert "score" in str(status["value"]) and "nucleus" in str(status["value"])
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
    assert widget.job.worker is None
    qtbot.waitUntil(lambda: widget.n_refreshes == refreshes + 1, timeout=2000)  # debounced
    n_cut = int((scores >= cut).sum())
    # the objects below the threshold are hidden (napari's `shown`), not deleted
    assert len(points.data) == n_all and 0 < int(points.shown.sum()) == n_cut < n_all
    assert (points.features["score"][points.shown] >= cut).all()
    assert (points.features["score"][~points.shown] < cut).all()
    assert len(viewer.layers["nuclei_boxes"].data) == n_cut
    assert f"nucleus: {n_cut}" in widget.counts.value

    # user edits: delete one shown point, add one, move one; export saves exactly what is shown
    first, second = np.nonzero(points.shown)[0][:2]
    points.selected_data = {int(first)}
    points.remove_selected()
    points.add(np.array([[5.0, 7.0]]))
    assert points.shown[-1]  # a point added by hand is shown
    moved = points.data.copy()
    second = int(second) - 1  # one row above it was removed
    moved[second] = moved[second] + [3.0, -2.0]
    points.data = moved
    out = widget.export(str(tmp_path / "edited.csv"))
    from napari_medseg.io.detections import read_detections

    t = read_detections(out)
    assert len(t) == n_cut  # -1 deleted +1 added
    np.testing.assert_allclose(t[["y", "x"]].to_numpy(), points.data[points.shown], atol=1e-4)
    assert t.iloc[-1]["id"] == 0 and t.iloc[-1]["score"] == 1.0
    gj = widget.export(str(tmp_path / "edited.geojson"))
    feats = json.loads(gj.read_text())["features"]
    kinds = [f["geometry"]["type"] for f in feats]
    assert len(feats) == n_cut and kinds[0] == "Point" and kinds[-1] == "Point"
    assert kinds.count("Polygon") == n_cut - 2  # untouched objects keep their outline


def test_volume_gets_points_on_the_scan_and_boxes_on_slices(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    (image,) = viewer.open_sample("napari-medseg", "ct")
    widget = _widget(viewer)
    values = [c[1] if isinstance(c, tuple) else c for c in widget.model.choices]
    assert "ct_spleen_3d" in values and "classical" in values
    assert "fluo_nuclei_det_2d" not in values  # a 2D box detector does not run on a volume
    widget.model.value = "classical"
    widget.run_button.native.click()
    qtbot.waitUntil(lambda: widget.job.worker is None, timeout=60_000)
    assert widget.status.value.startswith("Done"), widget.status.value
    name = f"{image.name}_detections"
    points = viewer.layers[name]
    assert points.ndim == 3 and len(points.data) >= 1
    # 3D boxes: one rectangle on every slice (along napari's slider axis) each box spans
    boxes = viewer.layers[f"{image.name}_boxes"]
    t = widget.shown_table()
    s_ax = widget._perm()[0]  # the file axis napari shows on the slider
    spans = (t[f"{'zyx'[s_ax]}_max"] - t[f"{'zyx'[s_ax]}_min"]).to_numpy()
    assert len(boxes.data) == int(spans.sum())
    assert set(boxes.features["id"]) == set(points.features["id"])
    for rect in boxes.data[:20]:
        assert np.ptp(rect[:, 0]) == 0  # flat in the slider axis: drawn on one slice
    first = t.iloc[0]
    own = [r for r, i in zip(boxes.data, boxes.features["id"]) if i == first["id"]]
    ks = sorted(float(r[0, 0]) for r in own)
    assert ks == list(np.arange(first[f"{'zyx'[s_ax]}_min"], first[f"{'zyx'[s_ax]}_max"]))
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


def test_thousands_of_objects_update_incrementally_and_keep_edits(make_napari_viewer, qtbot):
    """3,000 objects: a threshold step adds/removes only what changed; hand edits survive."""
    from napari_medseg.core.detect.instances import measure_instances
    from napari_medseg.core.detect.result import DetectionResult
    from napari_medseg.io.record import ImageRecord
    from napari_medseg.progress import run_sync

    inst = np.zeros((330, 330), np.int32)
    k = 0
    for y in range(0, 330, 6):
        for x in range(0, 330, 6):
            k += 1
            inst[y : y + 4, x : x + 4] = k
    assert k == 3025
    rng = np.random.default_rng(0)
    score = np.repeat(rng.uniform(0, 1, k + 1)[inst.ravel()], 1).reshape(inst.shape)
    aff = np.eye(3)
    table = run_sync(measure_instances(inst, aff, "pixel", score_map=score))
    result = DetectionResult(table=table, instances=inst, affine=aff, space="pixel")
    viewer = make_napari_viewer()
    image = viewer.add_image(inst.astype(np.float32), name="grid")
    widget = _widget(viewer)
    widget.threshold.value = 0.0
    record = ImageRecord(data=np.asarray(image.data), affine=aff, space="pixel", name="grid")
    widget._on_result(image, record, result)
    points, boxes = viewer.layers["grid_detections"], viewer.layers["grid_boxes"]
    assert len(points.data) == len(boxes.data) == k
    # the user moves one high-scoring object's point
    i = int(np.argmax(points.features["score"].to_numpy()))
    oid = int(points.features["id"][i])
    moved = points.data.copy()
    moved[i] += [1.5, -1.0]
    points.data = moved
    points.selected_data = {i}
    boxes_layer_id = id(boxes)
    for cut in (0.3, 0.35, 0.6, 0.2):
        before = widget.n_refreshes
        widget.threshold.value = cut
        qtbot.waitUntil(lambda b=before: widget.n_refreshes == b + 1, timeout=5000)
        n = int((table["score"] >= cut).sum())
        shown = points.shown
        assert len(points.data) == k  # every object stays in the layer, hidden or shown
        assert int(shown.sum()) == len(viewer.layers["grid_boxes"].data) == n
        assert (points.features["score"][shown] >= cut).all()
        assert sorted(points.features["id"][shown]) == sorted(widget.shown_table()["id"])
        assert sorted(viewer.layers["grid_boxes"].features["id"]) == sorted(
            points.features["id"][shown]
        )
    # same layers updated in place (not rebuilt), and the moved point kept its new place
    assert id(viewer.layers["grid_boxes"]) == boxes_layer_id
    j = int(np.nonzero(points.features["id"].to_numpy() == oid)[0][0])
    np.testing.assert_allclose(points.data[j], moved[i])
    assert points.selected_data == {j}  # the selection survives the threshold steps


def test_save_selected_points_layer_writes_what_is_shown(make_napari_viewer, tmp_path):
    """File > Save Selected Layers on the detections: only the objects above the threshold."""
    from napari_medseg.core.detect.instances import measure_instances
    from napari_medseg.core.detect.result import DetectionResult
    from napari_medseg.io.detections import read_detections
    from napari_medseg.io.record import ImageRecord
    from napari_medseg.progress import run_sync

    inst = np.zeros((60, 60), np.int32)
    for k in range(1, 26):
        y, x = divmod(k - 1, 5)
        inst[y * 12 : y * 12 + 5, x * 12 : x * 12 + 5] = k
    score = np.linspace(0, 1, 26)[inst]
    aff = np.eye(3)
    table = run_sync(measure_instances(inst, aff, "pixel", score_map=score))
    viewer = make_napari_viewer()
    image = viewer.add_image(inst.astype(np.float32), name="grid")
    widget = _widget(viewer)
    widget.threshold.value = 0.6
    record = ImageRecord(data=inst, affine=aff, space="pixel", name="grid")
    widget._on_result(image, record, DetectionResult(table, inst, aff, "pixel"))
    points = viewer.layers["grid_detections"]
    n = int((table["score"] >= 0.6).sum())
    assert 0 < n < 25 and int(points.shown.sum()) == n
    viewer.layers.selection = {points}
    out = tmp_path / "shown.csv"
    assert viewer.layers.save(str(out), selected=True, plugin="napari-medseg") == [str(out)]
    saved = read_detections(out)
    assert len(saved) == n and (saved["score"] >= 0.6).all()
    np.testing.assert_allclose(saved[["y", "x"]].to_numpy(), points.data[points.shown], atol=1e-6)


def test_cached_nms_then_threshold_equals_filter_detections(make_napari_viewer):
    """The dock's cached NMS + threshold gives exactly filter_detections' rows."""
    import pandas as pd

    from napari_medseg.core.detect.result import DetectionResult, filter_detections

    rng = np.random.default_rng(1)
    n = 400
    y, x = rng.uniform(0, 100, n), rng.uniform(0, 100, n)
    h = rng.uniform(2, 12, n)
    table = pd.DataFrame(
        {
            "id": np.arange(1, n + 1),
            "class": "nucleus",
            "score": rng.uniform(0, 1, n).round(2),  # ties on purpose
            "y": y,
            "x": x,
            "y_min": y - h,
            "y_max": y + h,
            "x_min": x - h,
            "x_max": x + h,
            "area": (2 * h) ** 2,
        }
    )
    widget = _widget(make_napari_viewer())
    widget._result = DetectionResult(table=table, instances=None, affine=np.eye(3), space="pixel")
    for thr, size, iou in [(0.5, 0.0, 0.3), (0.2, 50.0, 0.3), (0.7, 50.0, 0.1), (0.0, 0.0, 0.5)]:
        with widget.threshold.changed.blocked(), widget.min_size.changed.blocked():
            widget.threshold.value, widget.min_size.value = thr, size
        with widget.nms_iou.changed.blocked():
            widget.nms_iou.value = iou
        want = filter_detections(table, thr, min_size=size, nms_iou=iou)
        got = widget.shown_table()
        assert 0 < len(got) < n
        assert got["id"].tolist() == want["id"].tolist()


def test_box_detector_from_the_dock_exports_rectangles(make_napari_viewer, qtbot, tmp_path):
    """The built-in box detector: boxes are its regressed boxes; GeoJSON gets rectangles."""
    import tifffile

    # the held-out crop of tests/core/test_boxdet.py: 17 nuclei, 14 found at score 0.5
    img = tifffile.imread(data_path("microscopy/dsb2018_nuclei/image.tif"))[0:117, 259:503]
    viewer = make_napari_viewer()
    viewer.add_image(img, name="nuclei")
    widget = _widget(viewer)
    widget.model.value = "fluo_nuclei_det_2d"
    widget.device.value = "cpu"
    widget.run_button.native.click()
    qtbot.waitUntil(lambda: widget.job.worker is None, timeout=60_000)
    assert widget.status.value.startswith("Done"), widget.status.value
    points, boxes = viewer.layers["nuclei_detections"], viewer.layers["nuclei_boxes"]
    t = widget.shown_table()
    assert int(points.shown.sum()) == len(boxes.data) == len(t) >= 10
    assert (t["score"] >= 0.5).all()
    assert np.ptp(boxes.data[0][:, 0]) == pytest.approx(t["y_max"].iloc[0] - t["y_min"].iloc[0])
    out = widget.export(str(tmp_path / "boxes.geojson"))
    feats = json.loads(out.read_text())["features"]
    assert len(feats) == len(t) and {f["geometry"]["type"] for f in feats} == {"Polygon"}


def test_he_sample_with_the_classical_haematoxylin_detector(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    (image,) = viewer.open_sample("napari-medseg", "pathology")  # the real 300x500 H&E tile
    widget = _widget(viewer)
    values = [c[1] if isinstance(c, tuple) else c for c in widget.model.choices]
    assert "classical-he" in values  # offered for RGB images
    widget.model.value = "classical-he"
    widget.run_button.native.click()
    qtbot.waitUntil(lambda: widget.job.worker is None, timeout=60_000)
    assert widget.status.value.startswith("Done"), widget.status.value
    points = viewer.layers[f"{image.name}_detections"]
    assert 250 < int(points.shown.sum()) < 400  # measured 318 nuclei with the same detector
