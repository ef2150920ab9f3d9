"""A label on another grid than its image (same shape) is refused before training."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from napari_medseg.cli import main
from napari_medseg.training.dataset import DatasetError, load_dataset
from tests.conftest import data_path


def _dataset(root, label_affine_scale: float = 1.0, label_shift: float = 0.0):
    img = nib.load(data_path("ct/spleen/image.nii.gz"))
    lab = nib.load(data_path("ct/spleen/label.nii.gz"))
    sl = (slice(40, 73), slice(50, 84), slice(3, 24))
    vol = np.asarray(img.dataobj)[sl].astype(np.int16)
    seg = np.asarray(lab.dataobj)[sl].astype(np.uint8)
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    aff[:3, 3] = (-30.0, -40.0, 10.0)
    laff = aff.copy()
    laff[:3, :3] *= label_affine_scale
    laff[:3, 3] += label_shift
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    nib.save(nib.Nifti1Image(vol, aff), root / "imagesTr" / "case_0000.nii.gz")
    nib.save(nib.Nifti1Image(seg, laff), root / "labelsTr" / "case.nii.gz")
    return root


def test_label_with_other_voxel_size_is_refused(tmp_path):
    root = _dataset(tmp_path / "ds", label_affine_scale=1.5)  # 3 mm label on a 2 mm image
    with pytest.raises(DatasetError, match=r"not on its image's grid") as info:
        load_dataset(root)
    msg = str(info.value)
    assert "3 x 3 x 3 mm vs the image's 2 x 2 x 2 mm" in msg and "\n" not in msg


def test_label_shifted_is_refused_and_same_grid_is_accepted(tmp_path):
    with pytest.raises(DatasetError, match=r"origin 5\.00 mm away"):
        load_dataset(_dataset(tmp_path / "a", label_shift=5.0 / np.sqrt(3)))
    ds = load_dataset(_dataset(tmp_path / "b"))
    assert len(ds.cases) == 1 and ds.cases[0].label.shape == (33, 34, 21)


def test_train_cli_refuses_in_one_line(tmp_path, capsys):
    root = _dataset(tmp_path / "ds", label_affine_scale=1.5)
    rc = main(["train", str(root), "-o", str(tmp_path / "model"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "not on its image's grid" in err[0]
    assert not (tmp_path / "model").exists()
