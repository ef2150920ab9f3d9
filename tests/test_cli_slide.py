"""``napari-medseg segment SLIDE -m MODEL -o OUT.zarr``: whole-slide CLI path."""

from __future__ import annotations

import json

import numpy as np

from napari_medseg.cli import main
from napari_medseg.core.slides.export import open_result
from napari_medseg.io.raster import make_pyramidal_tiff
from tests.slide_helpers import make_slide, save_rgb_model


def test_segment_slide_to_ome_zarr(tmp_path, capsys):
    slide = make_slide(tmp_path / "slide.tif", (2100, 1700))
    model = save_rgb_model(tmp_path / "tiny_rgb")
    out = tmp_path / "slide_seg.zarr"
    rc = main(
        [
            "segment",
            str(slide),
            "-m",
            str(model),
            "-o",
            str(out),
            "--tile",
            "256",
            "--device",
            "cpu",
            "--quiet",
        ]
    )
    assert rc == 0
    levels = open_result(out)
    assert levels[0].shape == (2100, 1700) and levels[0].chunksize == (256, 256)
    assert len(levels) >= 3 and levels[0].compute().any()
    prov = json.loads((tmp_path / "slide_seg.zarr.provenance.json").read_text())
    assert prov["model"]["name"] == "tiny_rgb" and prov["parameters"]["tile"] == 256
    assert 0 < prov["tiles_done"] == prov["tiles_total"]
    # existing output without --overwrite, and a slide with a non-zarr output: one-line errors
    capsys.readouterr()
    assert main(["segment", str(slide), "-m", str(model), "-o", str(out), "--quiet"]) == 1
    assert "exists" in capsys.readouterr().err
    rc = main(["segment", str(slide), "-m", str(model), "-o", str(tmp_path / "x.nii.gz")])
    err = capsys.readouterr().err
    assert rc == 1 and ".zarr" in err and len(err.strip().splitlines()) == 1


def test_segment_blank_slide_says_no_tissue(tmp_path, capsys):
    blank = make_pyramidal_tiff(
        tmp_path / "blank.tif", np.full((64, 64, 3), 245, np.uint8), (5000, 300), tile=256
    )
    model = save_rgb_model(tmp_path / "tiny_rgb")
    rc = main(
        ["segment", str(blank), "-m", str(model), "-o", str(tmp_path / "b.zarr"), "--device", "cpu"]
    )
    assert rc == 1 and "no tissue" in capsys.readouterr().err


def test_segment_slide_to_ome_tiff_and_alongside_zarr(tmp_path):
    import tifffile

    from napari_medseg.io.raster import read_slide

    slide = make_slide(tmp_path / "slide.tif", (1100, 900))
    model = save_rgb_model(tmp_path / "tiny_rgb")
    base = ["segment", str(slide), "-m", str(model), "--tile", "256", "--device", "cpu", "--quiet"]
    # -o OUT.ome.tif: a temporary zarr beside it, exported, removed
    out = tmp_path / "labels.ome.tif"
    assert main([*base, "-o", str(out)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["slide.tif", "tiny_rgb", "labels.ome.tif", "labels.ome.tif.provenance.json"]
    )
    rec = read_slide(out)
    assert rec.data.shape == (1100, 900) and rec.metadata["mpp"] == 0.25
    assert len(rec.multiscale) >= 3
    # -o OUT.zarr --export-ome-tiff FILE: both, level 0 equal pixel for pixel
    z, tif = tmp_path / "seg.zarr", tmp_path / "seg.ome.tif"
    assert main([*base, "-o", str(z), "--export-ome-tiff", str(tif)]) == 0
    l0 = open_result(z)[0].compute()
    assert l0.any()
    np.testing.assert_array_equal(tifffile.imread(tif), l0)
    np.testing.assert_array_equal(rec.data.compute(), l0)  # same model, same slide
    prov = json.loads((tmp_path / "seg.zarr.provenance.json").read_text())
    assert prov["ome_tiff"] == str(tif)
    assert main([*base, "-o", str(out)]) == 1  # exists, no --overwrite
