"""The ``detect`` subcommand on a real nuclei crop: CSV/GeoJSON outputs, no overwrite, errors."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from napari_medseg.cli.detect import add_parser as register
from napari_medseg.errors import MedsegError
from napari_medseg.io import read_image, write_image
from napari_medseg.io.detections import read_detections
from napari_medseg.io.record import ImageRecord
from tests.conftest import data_path


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="napari-medseg")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture
def nuclei_tif(tmp_path):
    rec = read_image(data_path("microscopy/dsb2018_nuclei/image.tif"))[0]
    crop = np.asarray(rec.data)[0:101, 260:371]
    path = tmp_path / "nuclei.tif"
    write_image(path, ImageRecord(data=crop, affine=np.eye(3), space="pixel", name="n"))
    return path


def test_csv_then_geojson_and_no_overwrite(nuclei_tif, tmp_path, capsys):
    out = tmp_path / "det.csv"
    assert (
        _run(["detect", str(nuclei_tif), "-m", "fluo_nuclei_2d", "-o", str(out), "--device", "cpu"])
        == 0
    )
    table = read_detections(out)
    assert 5 <= len(table) <= 30
    assert {"score", "class", "y", "x", "world_y", "world_x"} <= set(table.columns)
    assert (table.score >= 0.5).all()
    assert "wrote" in capsys.readouterr().err
    prov = json.loads((tmp_path / "det.csv.provenance.json").read_text())
    assert prov["model"]["name"] == "fluo_nuclei_2d" and prov["n_written"] == len(table)
    before = out.read_bytes()
    with pytest.raises(MedsegError, match="overwrite"):
        _run(["detect", str(nuclei_tif), "-m", "fluo_nuclei_2d", "-o", str(out)])
    assert out.read_bytes() == before
    assert (
        _run(
            [
                "detect",
                str(nuclei_tif),
                "-m",
                "fluo_nuclei_2d",
                "-o",
                str(out),
                "--threshold",
                "0.97",
                "--overwrite",
                "--quiet",
            ]
        )
        == 0
    )
    assert len(read_detections(out)) < len(table)
    gj = tmp_path / "det.geojson"
    assert (
        _run(
            [
                "detect",
                str(nuclei_tif),
                "-m",
                "classical",
                "-o",
                str(gj),
                "--quiet",
                "--min-size",
                "30",
            ]
        )
        == 0
    )
    doc = json.loads(gj.read_text())
    assert doc["features"] and all(
        f["properties"]["objectType"] == "detection" for f in doc["features"]
    )
    assert all(f["properties"]["measurements"]["area"] >= 30 for f in doc["features"])


def test_errors_are_one_line_and_exit_1(nuclei_tif, tmp_path, capsys, monkeypatch):
    from napari_medseg.cli import main

    assert (
        main(["detect", str(nuclei_tif), "-m", "ct_spleen_3d", "-o", str(tmp_path / "x.csv")]) == 1
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "3D" in err[0]
    assert main(["detect", str(nuclei_tif), "-m", "classical", "-o", str(tmp_path / "x.txt")]) == 1
    assert not (tmp_path / "x.csv").exists()


def test_bad_model_and_suffix_raise(nuclei_tif, tmp_path):
    with pytest.raises(MedsegError, match="3D"):
        _run(["detect", str(nuclei_tif), "-m", "ct_spleen_3d", "-o", str(tmp_path / "x.csv")])
    with pytest.raises(MedsegError, match="csv"):
        _run(["detect", str(nuclei_tif), "-m", "classical", "-o", str(tmp_path / "x.txt")])
    assert not list(tmp_path.glob("x.*"))


# --------------------------------------------------------------------------- whole slides


def test_detect_on_a_fluorescence_slide_with_the_builtin_model(tmp_path, capsys):
    """A pyramidal TIFF tiling the real DSB image, searched tile by tile with the trained
    ``fluo_nuclei_2d``: one feature per nucleus in level-0 pixels, with its outline."""
    from napari_medseg.cli import main
    from tests.slide_helpers import make_fluo_slide

    slide = make_fluo_slide(tmp_path / "fluo.tif", (640, 800))
    gj = tmp_path / "nuclei.geojson"
    args = ["detect", str(slide), "-m", "fluo_nuclei_2d", "--tile", "320", "--margin", "48"]
    assert main([*args, "--device", "cpu", "--min-size", "20", "-o", str(gj)]) == 0
    assert "level-0 pixels" in capsys.readouterr().err
    feats = json.loads(gj.read_text())["features"]
    assert feats and all(f["geometry"]["type"] == "Polygon" for f in feats)
    assert all(f["properties"]["measurements"]["area"] >= 20 for f in feats)
    t = read_detections(gj)
    # the 512x512 image holds 125 manually outlined nuclei; the slide is 1.95 copies of it
    assert 0.7 * 125 * 1.95 < len(t) < 1.3 * 125 * 1.95, len(t)
    assert (t.score >= 0.5).all() and t.y.between(0, 640).all() and t.x.between(0, 800).all()
    prov = json.loads((tmp_path / "nuclei.geojson.provenance.json").read_text())
    assert prov["model"]["name"] == "fluo_nuclei_2d" and prov["tiles_done"] == 6
    assert prov["parameters"]["level"] == 0 and prov["n_written"] == len(t)
    assert main([*args, "-o", str(gj), "--quiet"]) == 1  # exists, no --overwrite


def test_detect_on_a_fluorescence_slide_with_the_box_detector(tmp_path):
    """The built-in box detector tile by tile on a slide: boxes (GeoJSON rectangles) in level-0
    pixels, about one per nucleus, none doubled at tile borders."""
    from napari_medseg.cli import main
    from napari_medseg.core.detect.result import box_iou, boxes_of
    from tests.slide_helpers import make_fluo_slide

    slide = make_fluo_slide(tmp_path / "fluo.tif", (640, 800))
    gj = tmp_path / "boxes.geojson"
    args = ["detect", str(slide), "-m", "fluo_nuclei_det_2d", "--tile", "320", "--margin", "48"]
    assert main([*args, "--device", "cpu", "-o", str(gj), "--quiet"]) == 0
    feats = json.loads(gj.read_text())["features"]
    assert feats and all(f["geometry"]["type"] == "Polygon" for f in feats)
    assert all(len(f["geometry"]["coordinates"][0]) == 5 for f in feats)  # rectangles
    t = read_detections(gj)
    assert 0.6 * 125 * 1.95 < len(t) < 1.3 * 125 * 1.95, len(t)
    assert t.y.between(0, 640).all() and t.x.between(0, 800).all()
    # tiles vs one pass over the whole (small) slide: the same objects, none lost or doubled
    # at the tile borders
    from napari_medseg.core.detect.detection import detect
    from napari_medseg.core.detect.result import filter_detections
    from napari_medseg.io.raster import read_slide
    from napari_medseg.models.registry import load_model
    from napari_medseg.progress import run_sync

    level0 = np.asarray(read_slide(slide).data)
    rec = ImageRecord(data=level0, affine=np.eye(3), space="pixel", name="whole")
    whole = run_sync(detect(rec, load_model("fluo_nuclei_det_2d"), device="cpu"))
    ref = filter_detections(whole.table, 0.5)
    assert abs(len(t) - len(ref)) <= 0.05 * len(ref), (len(t), len(ref))
    iou = box_iou(boxes_of(t), boxes_of(ref))
    assert (iou.max(axis=1) > 0.5).mean() > 0.9  # tiled boxes match whole-image boxes


def test_detect_classical_dark_nuclei_on_an_he_slide(tmp_path):
    """The classical detector (no network; Otsu per tile, dark objects) on a slide tiling the real
    H&E tile: about as many nuclei per area as on the tile itself."""
    import functools

    from napari_medseg.cli import main
    from napari_medseg.core.detect.classical import detect_classical
    from napari_medseg.progress import run_sync
    from tests.slide_helpers import he_tissue, make_tissue_slide

    slide = make_tissue_slide(tmp_path / "he.tif", (900, 1500))  # 9 copies of the tile
    out = tmp_path / "he.csv"
    assert main(["detect", str(slide), "-m", "classical", "--dark-objects", "-o", str(out),
                 "--tile", "512", "--quiet"]) == 0  # fmt: skip
    n = len(read_detections(out))
    rec = ImageRecord(data=he_tissue(), affine=np.eye(3), space="pixel", name="he", rgb=True)
    ref = run_sync(functools.partial(detect_classical, dark_objects=True)(rec)).table
    ref = ref[ref.score >= 0.5]
    assert len(ref) > 200 and 0.75 * 9 * len(ref) < n < 1.25 * 9 * len(ref)


def test_detect_he_nuclei_on_a_slide_with_glass_by_haematoxylin(tmp_path):
    """--stain hematoxylin on a slide with glass between tissue: nuclei, not tissue blobs."""
    from napari_medseg.cli import main
    from tests.slide_helpers import make_slide

    slide = make_slide(tmp_path / "he.tif", (1200, 1200))  # 2 copies of the 300x500 tissue
    out = tmp_path / "he.geojson"
    argv = ["detect", str(slide), "-m", "classical", "--stain", "hematoxylin", "-o", str(out)]
    assert main([*argv, "--tile", "512", "--quiet"]) == 0
    t = read_detections(out)
    # 318 nuclei on the tissue alone (tests/core/test_detection.py), twice here
    assert 0.85 * 2 * 318 < len(t) < 1.15 * 2 * 318, len(t)
