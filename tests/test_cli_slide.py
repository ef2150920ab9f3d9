"""``napari-medseg segment SLIDE -m MODEL -o OUT.zarr``: whole-slide CLI path."""

from __future__ import annotations

import json

import numpy as np

from napari_medseg.cli import main
from napari_medseg.core.wsi import open_result
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
    prov = json.loads((tmp_path / "slide_seg.provenance.json").read_text())
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
