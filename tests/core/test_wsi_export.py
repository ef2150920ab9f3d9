"""Slide labels (OME-Zarr) exported as a tiled, pyramidal OME-TIFF, chunk row by chunk row."""

from __future__ import annotations

import numpy as np
import pytest

from napari_medseg._files import is_temp_name
from napari_medseg.core.slides.export import export_labels_ome_tiff, open_result
from napari_medseg.core.slides.segment import segment_slide
from napari_medseg.errors import MedsegError
from napari_medseg.io.raster import read_slide
from napari_medseg.progress import run_sync
from tests.slide_helpers import make_slide, save_rgb_model


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    import torch

    from napari_medseg.models.registry import load_model

    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("exp")
    slide = make_slide(d / "s.tif", (1500, 1300))  # mpp 0.25
    model = load_model(str(save_rgb_model(d / "m")), device="cpu")
    run_sync(segment_slide(read_slide(slide), model, d / "s.zarr", tile=256, margin=32,
                           device="cpu"))  # fmt: skip
    return d / "s.zarr"


def test_ome_tiff_levels_equal_the_zarr_levels(result, tmp_path):
    import tifffile

    out = tmp_path / "labels.ome.tif"
    seen = []
    got = run_sync(export_labels_ome_tiff(result, out), seen.append)
    assert got == out and not [p for p in tmp_path.iterdir() if is_temp_name(p.name)]
    levels = open_result(result)
    assert len(levels) == 4 and seen[-1].done == seen[-1].total == 6 + 3 + 2 + 1
    with tifffile.TiffFile(out) as tf:
        assert tf.is_ome and len(tf.pages) == 1  # lower levels are SubIFDs of level 0
        s = tf.series[0]
        assert s.axes == "YX" and len(s.levels) == len(levels)
        page = tf.pages[0]
        assert page.is_tiled and (page.tilelength, page.tilewidth) == (256, 256)
        assert page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        for k, lv in enumerate(levels):
            np.testing.assert_array_equal(s.levels[k].asarray(), lv.compute())
    rec = read_slide(out)
    assert rec.metadata["mpp"] == pytest.approx(0.25) and rec.metadata["format"] == "ome-tiff"
    assert rec.data.dtype == np.uint8 and len(rec.multiscale) == len(levels)
    l0 = levels[0].compute()
    assert l0.any()
    np.testing.assert_array_equal(rec.data.compute(), l0)
    np.testing.assert_array_equal(rec.multiscale[2].compute(), levels[2].compute())


def test_export_tile_option_refuses_overwrite_and_cancel_removes_part(result, tmp_path):
    import tifffile

    out = tmp_path / "l.ome.tif"
    run_sync(export_labels_ome_tiff(result, out, tile=128, compression=None))
    with tifffile.TiffFile(out) as tf:
        assert tf.pages[0].tilewidth == 128
        np.testing.assert_array_equal(tf.series[0].asarray(), open_result(result)[0].compute())
    with pytest.raises(MedsegError, match="exists"):
        run_sync(export_labels_ome_tiff(result, out))
    with pytest.raises(MedsegError, match="multiple of 16"):
        run_sync(export_labels_ome_tiff(result, tmp_path / "x.ome.tif", tile=100))
    with pytest.raises(MedsegError, match="not a whole-slide result"):
        run_sync(export_labels_ome_tiff(tmp_path, tmp_path / "y.ome.tif"))
    gen = export_labels_ome_tiff(result, tmp_path / "c.ome.tif", tile=16)
    next(gen)
    gen.close()
    assert not list(tmp_path.glob("c.ome.tif*"))
