"""Labels outside the moving image's field of view: warned and recorded, never silent zeros."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from napari_medseg.cli import main
from napari_medseg.core.register.optimise import RegistrationOptions, register
from napari_medseg.io import read_image
from napari_medseg.progress import run_sync
from tests.conftest import data_path

D = "registration/mt_pair/"


def _shifted_labels(tmp_path, shift_mm: float):
    src = nib.load(data_path(D + "mt1_seg.nii.gz"))
    aff = src.affine.copy()
    aff[:3, 3] += shift_mm  # the same mask, drawn 'somewhere else' in the world
    out = tmp_path / f"seg_shift{int(shift_mm)}.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(src.dataobj), aff, src.header), out)
    return out


def _run(labels_path):
    fixed = read_image(data_path(D + "mt0.nii.gz"))[0]
    moving = read_image(data_path(D + "mt1.nii.gz"))[0]
    labels = read_image(labels_path)[0]
    opts = RegistrationOptions(mode="rigid", iterations=5, levels=1, device="cpu")
    return run_sync(register(fixed, moving, opts, moving_labels=labels))


def test_labels_outside_the_moving_fov_warn_and_are_recorded(tmp_path):
    with pytest.warns(UserWarning, match="outside the moving image's field of view"):
        res = _run(_shifted_labels(tmp_path, 500.0))
    rep = res.provenance["labels"]
    assert rep["inside_moving_fov"] == 0.0 and rep["kept"] == 0.0
    assert not np.any(res.warped_labels)
    assert "all zero" in res.provenance["notes"][0]


def test_labels_on_the_moving_grid_give_no_note(tmp_path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        res = _run(data_path(D + "mt1_seg.nii.gz"))
    rep = res.provenance["labels"]
    assert rep["inside_moving_fov"] == 1.0 and rep["kept"] > 0.8 and rep["note"] == ""
    assert res.provenance["notes"] == []


def test_cli_says_it_even_with_quiet(tmp_path, capsys):
    argv = [
        "register", str(data_path(D + "mt0.nii.gz")), str(data_path(D + "mt1.nii.gz")),
        "-o", str(tmp_path / "w.nii.gz"), "--mode", "rigid", "--iterations", "5",
        "--levels", "1", "--labels", str(_shifted_labels(tmp_path, 500.0)),
        "--labels-out", str(tmp_path / "l.nii.gz"), "--device", "cpu", "--quiet",
    ]  # fmt: skip
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "outside the moving image's field of view" in err and "all zero" in err
