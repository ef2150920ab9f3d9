"""Batch segmentation: in process and on a dask LocalCluster (two workers), same files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_medseg.cli import main
from tests.conftest import data_path


@pytest.fixture
def nuclei_folder(tmp_path):
    """Three real DSB nuclei crops of awkward sizes as 2D TIFF files."""
    import tifffile

    img = tifffile.imread(data_path("microscopy/dsb2018_nuclei/image.tif"))
    folder = tmp_path / "cases"
    folder.mkdir()
    for name, (y, x, h, w) in {
        "a": (0, 0, 97, 131),
        "b": (200, 150, 120, 101),
        "c": (390, 380, 122, 129),
    }.items():
        tifffile.imwrite(folder / f"{name}.tif", img[y : y + h, x : x + w])
    return folder


def test_cli_folder_in_process_and_on_dask_give_identical_outputs(nuclei_folder, tmp_path):
    from napari_medseg.io import read_image

    argv = ["segment", str(nuclei_folder), "-m", "fluo_nuclei_2d", "--quiet", "--device", "cpu"]
    single, dask = tmp_path / "single", tmp_path / "dask"
    assert main([*argv, "-o", str(single)]) == 0
    assert main([*argv, "-o", str(dask), "--scheduler", "local"]) == 0
    names = sorted(p.name for p in dask.iterdir())
    assert names == sorted(
        [f"{n}_seg.tif" for n in "abc"] + [f"{n}_seg.tif.provenance.json" for n in "abc"]
    )
    assert sorted(p.name for p in single.iterdir()) == names
    for n in "abc":
        la = read_image(single / f"{n}_seg.tif")[0].data
        lb = read_image(dask / f"{n}_seg.tif")[0].data
        assert la.shape == read_image(nuclei_folder / f"{n}.tif")[0].data.shape
        assert 0 < int((la > 0).sum()) < la.size  # nuclei found, not everything
        np.testing.assert_array_equal(la, lb)
        prov = json.loads((dask / f"{n}_seg.tif.provenance.json").read_text())
        assert prov["input"] == str(nuclei_folder / f"{n}.tif") and prov["class_voxels"]
    # existing outputs are never replaced silently, with or without dask
    assert main([*argv, "-o", str(dask), "--scheduler", "local"]) == 1


def test_dask_batch_needs_a_model_reference(nuclei_folder, tmp_path):
    from napari_medseg.core.segment.batch import segment_batch
    from napari_medseg.errors import MedsegError
    from napari_medseg.models.registry import load_model

    gen = segment_batch(
        [(nuclei_folder / "a.tif", tmp_path / "a.nii.gz")],
        load_model("fluo_nuclei_2d"),
        scheduler="local",
    )
    with pytest.raises(MedsegError, match="name or folder"):
        next(gen)
