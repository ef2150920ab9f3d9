"""Detection as watershed instances of a segmentation, on a real DSB 2018 nuclei crop."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_medseg._files import is_temp_name
from napari_medseg.core.detect.classical import detect_classical
from napari_medseg.core.detect.detection import detect
from napari_medseg.core.detect.instances import instances_from_mask
from napari_medseg.core.detect.result import filter_detections
from napari_medseg.errors import ImageWriteError, MedsegError
from napari_medseg.io.detections import read_detections, write_detections
from napari_medseg.io.record import ImageRecord
from napari_medseg.progress import Progress, run_sync
from tests.conftest import data_path

# awkward size, inside the model's held-out tiles r000_c256 / r000_c384 (rows 0-127, cols 256-511)
ROWS, COLS = slice(0, 117), slice(259, 503)


def _crop():
    import tifffile

    img = tifffile.imread(data_path("microscopy/dsb2018_nuclei/image.tif"))[ROWS, COLS]
    mask = tifffile.imread(data_path("microscopy/dsb2018_nuclei/mask.tif"))[ROWS, COLS]
    return img, mask


def _centres(mask):
    from scipy import ndimage as ndi

    ids = np.unique(mask)
    ids = ids[ids > 0]
    return np.asarray(ndi.center_of_mass(np.ones(mask.shape), mask, ids)).reshape(-1, 2)


def _f1(pred, gt, dist=6.0):
    from scipy.optimize import linear_sum_assignment

    if len(pred) == 0 or len(gt) == 0:
        return 0.0
    d = np.linalg.norm(pred[:, None] - gt[None], axis=-1)
    r, c = linear_sum_assignment(np.where(d <= dist, d, 1e6))
    tp = int((d[r, c] <= dist).sum())
    return 2 * tp / (len(pred) + len(gt))


@pytest.fixture(scope="module")
def nuclei():
    from napari_medseg.models.registry import load_model

    img, mask = _crop()
    rec = ImageRecord(data=img, affine=np.eye(3), space="pixel", name="dsb_crop")
    model = load_model("fluo_nuclei_2d", device="cpu")
    steps = []
    result = run_sync(detect(rec, model, device="cpu"), steps.append)
    return rec, model, mask, result, steps


def test_model_detection_finds_the_real_nuclei(nuclei):
    rec, _, mask, result, steps = nuclei
    assert all(isinstance(p, Progress) for p in steps) and len(steps) > 5
    t = result.table
    assert list(t.columns[:5]) == ["id", "class", "score", "y", "x"]
    assert result.instances.shape == rec.spatial_shape
    assert set(t["class"]) == {"nucleus"}
    assert ((t.score > 0) & (t.score <= 1)).all()
    kept = filter_detections(t, score_threshold=0.5)
    f1 = _f1(kept[["y", "x"]].to_numpy(), _centres(mask))
    assert f1 > 0.8, f1
    # centres, boxes and areas agree with the instance map
    for row in t.head(5).itertuples():
        obj = result.instances == row.id
        assert obj.sum() == row.area
        np.testing.assert_allclose(np.argwhere(obj).mean(0), [row.y, row.x], atol=1e-6)
        ys, xs = np.nonzero(obj)
        assert (ys.min(), ys.max() + 1, xs.min(), xs.max() + 1) == (
            row.y_min,
            row.y_max,
            row.x_min,
            row.x_max,
        )
    # no two objects share a pixel and every object is one table row
    assert sorted(np.unique(result.instances)[1:]) == sorted(t["id"])


def test_watershed_splits_touching_nuclei(nuclei):
    _, _, mask, result, _ = nuclei
    cc = run_sync(instances_from_mask(result.instances > 0, split=False))
    n_gt = len(np.unique(mask)) - 1
    # connected components merge touching nuclei; the watershed gets closer to the truth
    assert cc.max() < len(result.table)
    assert abs(len(result.table) - n_gt) < abs(cc.max() - n_gt) or len(result.table) == n_gt


def test_filters_work_on_the_table_only(nuclei):
    _, _, _, result, _ = nuclei
    t = result.table
    n = [len(filter_detections(t, score_threshold=s)) for s in (0.0, 0.9, 0.96, 1.0)]
    assert n[0] == len(t) and n[0] >= n[1] >= n[2] >= n[3]
    big = filter_detections(t, min_size=200)
    assert (big.area >= 200).all() and len(big) < len(t)
    import pandas as pd

    doubled = pd.concat([t, t.assign(score=t.score - 0.01)], ignore_index=True)
    dedup = filter_detections(doubled, nms_iou=0.5)
    assert len(dedup) == len(t)
    np.testing.assert_allclose(np.sort(dedup.score), np.sort(t.score))


def test_classical_baseline_on_the_same_crop(nuclei):
    rec, _, mask, _, _ = nuclei
    res = run_sync(detect_classical(rec))
    assert len(res.table) > 10
    assert _f1(res.table[["y", "x"]].to_numpy(), _centres(mask)) > 0.7
    empty = ImageRecord(data=np.zeros((33, 34), np.uint16), affine=np.eye(3), space="pixel")
    assert len(run_sync(detect_classical(empty)).table) == 0


def test_csv_and_geojson_round_trip(nuclei, tmp_path):
    _, _, _, result, _ = nuclei
    t = filter_detections(result.table, score_threshold=0.5)
    p = write_detections(tmp_path / "d.csv", t)
    back = read_detections(p)
    assert list(back.columns) == list(t.columns)
    np.testing.assert_allclose(back[["y", "x", "score"]], t[["y", "x", "score"]], rtol=1e-5)
    assert list(back["class"]) == list(t["class"])
    with pytest.raises(ImageWriteError, match="exists"):
        write_detections(p, t)
    assert not [p for p in tmp_path.iterdir() if is_temp_name(p.name)]

    g = write_detections(
        tmp_path / "d.geojson", t, instances=result.instances, class_colors=result.class_colors
    )
    doc = json.loads(g.read_text())
    assert doc["type"] == "FeatureCollection" and len(doc["features"]) == len(t)
    f0 = doc["features"][0]
    assert f0["geometry"]["type"] == "Polygon"
    assert f0["properties"]["objectType"] == "detection"
    assert f0["properties"]["classification"] == {"name": "nucleus", "color": [230, 25, 75]}
    ring = np.asarray(f0["geometry"]["coordinates"][0])
    # QuPath pixel corners: the outline lies around the object's pixels (x = column + 0.5)
    row0 = t.iloc[0]
    assert row0.x_min <= ring[:, 0].min() + 0.5 and ring[:, 0].max() - 0.5 <= row0.x_max
    back = read_detections(g)
    np.testing.assert_allclose(back[["y", "x", "score"]], t[["y", "x", "score"]], atol=1e-6)
    # a QuPath file without our centroid measurements: the polygon centroid is within 1 px
    for f in doc["features"]:
        for k in ("centroid_y", "centroid_x"):
            del f["properties"]["measurements"][k]
    (tmp_path / "q.geojson").write_text(json.dumps(doc))
    back = read_detections(tmp_path / "q.geojson")
    err = np.abs(back[["y", "x"]].to_numpy() - t[["y", "x"]].to_numpy())
    assert err.max() < 1.0, err.max()


def test_3d_volume_from_the_real_crop(nuclei, tmp_path):
    rec, model, _, _, _ = nuclei
    img = np.asarray(rec.data)[:45, :50]
    vol = np.repeat(img[:, :, None], 5, axis=2)  # (i, j, k): a 2D model runs on k-slices
    aff = np.diag([0.5, 0.5, 2.0, 1.0])
    aff[:3, 3] = [10.0, -20.0, 30.0]
    vrec = ImageRecord(data=vol, affine=aff, space="RAS", name="stack")
    res = run_sync(detect(vrec, model, device="cpu"))
    t = res.table
    assert list(t.columns[3:9]) == ["z", "y", "x", "world_x", "world_y", "world_z"]
    assert "volume_mm3" in t.columns and res.instances.shape == vol.shape
    r2 = run_sync(detect(ImageRecord(data=img, affine=np.eye(3), space="pixel"), model))
    assert abs(len(t) - len(r2.table)) <= max(2, len(r2.table) // 5)
    np.testing.assert_allclose(t["x"], 2.0, atol=0.01)  # the middle of 5 slices along axis 2
    np.testing.assert_allclose(t["world_z"], 30.0 + 2.0 * t["x"])
    np.testing.assert_allclose(t["world_x"], 10.0 + 0.5 * t["z"])
    vox = 0.5 * 0.5 * 2.0
    counts = np.bincount(res.instances.ravel())[t["id"]]
    np.testing.assert_allclose(t["volume_mm3"], counts * vox)
    p = write_detections(tmp_path / "v.csv", t)
    np.testing.assert_allclose(read_detections(p)[["z", "y", "x"]], t[["z", "y", "x"]], rtol=1e-5)
    with pytest.raises(ImageWriteError, match="2D"):
        write_detections(tmp_path / "v.geojson", t)


def test_bad_input_says_so(tmp_path, nuclei):
    from napari_medseg.models.registry import load_model
    from tests.helpers import save_tiny_model

    rec = nuclei[0]
    m3d = load_model(save_tiny_model(tmp_path / "tiny3d"), device="cpu")
    with pytest.raises(MedsegError, match="3D model"):
        run_sync(detect(rec, m3d))
    empty = ImageRecord(data=np.zeros((0, 5), np.uint8), affine=np.eye(3), space="pixel")
    with pytest.raises(MedsegError, match="empty"):
        run_sync(detect_classical(empty))


def test_hematoxylin_nuclei_do_not_depend_on_glass_in_the_tile():
    """H&E: haematoxylin channel over the tissue finds the same nuclei with or without glass in
    the image, where a brightness Otsu ("dark objects") turns into tissue-vs-glass blobs."""
    from tests.slide_helpers import he_tile_with_glass, he_tissue

    def run(arr, **kw):
        rec = ImageRecord(data=arr, affine=np.eye(3), space="pixel", name="he", rgb=True)
        return run_sync(detect_classical(rec, **kw)).table

    tissue, padded = he_tissue(), he_tile_with_glass()
    a, b = run(tissue, stain="hematoxylin"), run(padded, stain="hematoxylin")
    # measured 318 / 314 nuclei, median area 137.5 px (nucleus-sized; see the overlay in docs)
    assert 250 < len(a) < 400 and abs(len(a) - len(b)) <= 0.05 * len(a)
    assert 60 < a["area"].median() < 400 and b["area"].median() == pytest.approx(
        a["area"].median(), rel=0.1
    )
    dark = run(padded, dark_objects=True)
    assert len(dark) < 0.1 * len(b)  # measured 7 blobs: why the stain mode exists
    grey = ImageRecord(data=tissue[..., 0], affine=np.eye(3), space="pixel", name="grey")
    with pytest.raises(MedsegError, match="RGB bright-field"):
        run_sync(detect_classical(grey, stain="hematoxylin"))
