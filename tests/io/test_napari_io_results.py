"""Results saved beside a slide reopen in napari: OME-Zarr labels and QuPath GeoJSON."""

from __future__ import annotations

import numpy as np
import pytest

from tests.slide_helpers import make_slide, save_rgb_model


def test_slide_labels_zarr_reopen_as_lazy_multiscale_labels(tmp_path):
    from napari_medseg.core.slides.segment import segment_slide
    from napari_medseg.io.napari_io import get_reader
    from napari_medseg.io.raster import read_slide
    from napari_medseg.models.registry import load_model
    from napari_medseg.progress import run_sync

    slide = make_slide(tmp_path / "s.tif", (1300, 1100))
    out = tmp_path / "s_tiny_seg.zarr"
    model = load_model(str(save_rgb_model(tmp_path / "tiny_rgb")))
    run_sync(segment_slide(read_slide(slide), model, out, tile=256))
    reader = get_reader(str(out))
    assert reader is not None
    ((levels, kwargs, kind),) = reader(str(out))
    assert kind == "labels" and kwargs["multiscale"] and kwargs["name"] == "s_tiny_seg"
    assert levels[0].shape == (1300, 1100) and levels[1].shape == (650, 550)
    assert type(levels[0]).__module__.startswith("dask")  # lazy, not loaded
    assert kwargs["metadata"]["medseg"]["class_names"]["1"] == "nuclei"
    assert kwargs["metadata"]["medseg"]["complete"] is True
    assert np.asarray(levels[0][:300, :500]).any()


def test_geojson_reopens_as_points_with_features(tmp_path):
    import pandas as pd

    from napari_medseg.io.detections import write_detections
    from napari_medseg.io.napari_io import get_reader

    table = pd.DataFrame(
        {
            "id": [1, 2],
            "class": ["nucleus", "nucleus"],
            "score": [0.9, 0.4],
            "y": [10.0, 20.5],
            "x": [30.0, 5.25],
            "world_y": [10.0, 20.5],
            "world_x": [30.0, 5.25],
            "y_min": [8, 18],
            "y_max": [13, 23],
            "x_min": [28, 3],
            "x_max": [33, 8],
            "area": [20.0, 21.0],
        }
    )
    path = write_detections(tmp_path / "det.geojson", table)
    ((data, kwargs, kind),) = get_reader(str(path))(str(path))
    assert kind == "points" and kwargs["name"] == "det"
    np.testing.assert_allclose(data, table[["y", "x"]].to_numpy(), atol=1e-6)
    assert list(kwargs["features"]["score"]) == pytest.approx([0.9, 0.4])
    assert list(kwargs["features"]["class"]) == ["nucleus", "nucleus"]


def test_a_foreign_zarr_is_not_taken_for_a_result(tmp_path):
    from napari_medseg.io.raster import is_labels_zarr

    (tmp_path / "x.zarr").mkdir()
    assert not is_labels_zarr(tmp_path / "x.zarr")
