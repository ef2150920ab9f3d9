"""Slide detections on a dask.distributed LocalCluster (two workers) equal one process."""

from __future__ import annotations

import functools

import numpy as np
import pytest

pytest.importorskip("distributed", reason="dask.distributed is not installed")

from napari_medseg.core.detect.classical import detect_classical  # noqa: E402
from napari_medseg.core.slides.detect import detect_slide  # noqa: E402
from napari_medseg.io.raster import read_slide  # noqa: E402
from napari_medseg.progress import run_sync  # noqa: E402
from tests.slide_helpers import make_slide  # noqa: E402


def test_local_cluster_two_workers_equals_single_process(tmp_path):
    slide = make_slide(tmp_path / "slide.tif", (1200, 1400))  # real H&E with glass
    opts = dict(tile=256, margin=32, threshold=0.5)
    dark = functools.partial(detect_classical, dark_objects=True)
    ref = run_sync(detect_slide(read_slide(slide), dark, **opts))
    msgs = []
    res = run_sync(
        detect_slide(slide, "classical-dark", scheduler="local", tiles_per_task=3, **opts),
        lambda p: msgs.append(p.message),
    )
    assert any("on 2 workers" in m for m in msgs)
    assert res.tiles_done == ref.tiles_done == ref.tiles_total > 6
    assert len(ref.table) > 20
    np.testing.assert_array_equal(res.table.to_numpy(), ref.table.to_numpy())
    assert len(res.outlines) == len(ref.outlines)
    for a, b in zip(res.outlines, ref.outlines):
        np.testing.assert_array_equal(a, b)
