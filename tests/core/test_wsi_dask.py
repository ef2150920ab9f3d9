"""Whole-slide inference on a dask.distributed LocalCluster (two workers) equals one process."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("distributed", reason="dask.distributed is not installed")

from napari_medseg.core.slides.export import open_result  # noqa: E402
from napari_medseg.core.slides.segment import segment_slide  # noqa: E402
from napari_medseg.io.raster import read_slide  # noqa: E402
from napari_medseg.models.registry import load_model  # noqa: E402
from napari_medseg.progress import run_sync  # noqa: E402
from tests.slide_helpers import make_slide, save_rgb_model  # noqa: E402


def test_local_cluster_two_workers_equals_single_process(tmp_path):
    slide = make_slide(tmp_path / "slide.tif", (3000, 2500))
    folder = save_rgb_model(tmp_path / "tiny_rgb")
    ref = run_sync(
        segment_slide(read_slide(slide), load_model(str(folder), device="cpu"),
                      tmp_path / "single.zarr", device="cpu", tile=512, batch_size=2)
    )  # fmt: skip
    msgs = []
    res = run_sync(
        segment_slide(slide, str(folder), tmp_path / "dask.zarr", scheduler="local",
                      tile=512, batch_size=2, tiles_per_task=4),
        lambda p: msgs.append(p.message),
    )  # fmt: skip
    assert any("on 2 workers" in m for m in msgs)
    assert res.tiles_done == ref.tiles_done == ref.tiles_total
    a, b = open_result(tmp_path / "single.zarr"), open_result(tmp_path / "dask.zarr")
    assert len(a) == len(b)
    for la, lb in zip(a, b):
        np.testing.assert_array_equal(la.compute(), lb.compute())
    assert a[0].compute().any()
