"""``napari-medseg register`` on real pairs: outputs on the fixed grid, points, transforms."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from napari_medseg.cli import main as cli_main
from napari_medseg.io import read_image
from tests.conftest import data_path


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """The test machine's 2 cores are shared: one torch thread avoids OpenMP contention."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def main():
    """The ``napari-medseg`` entry point."""
    return cli_main


def test_register_writes_warped_labels_points_and_transform(main, tmp_path, capsys):
    d = "registration/mt_pair/"
    fixed, moving = data_path(d + "mt0.nii.gz"), data_path(d + "mt1.nii.gz")
    labels = data_path(d + "mt1_seg.nii.gz")
    frec = read_image(fixed)[0]
    # three fixed voxel centres as world RAS points
    idx = np.array([[10, 12, 1], [20, 20, 2], [30, 25, 3]], dtype=float)
    pts = idx @ frec.affine[:3, :3].T + frec.affine[:3, 3]
    pcsv = tmp_path / "pts.csv"
    pcsv.write_text("x,y,z\n" + "\n".join(",".join(f"{v:.4f}" for v in p) for p in pts) + "\n")
    out = tmp_path / "warped.nii.gz"
    argv = [
        "register", str(fixed), str(moving), "-o", str(out),
        "--mode", "deformable", "--iterations", "30",
        "--labels", str(labels), "--labels-out", str(tmp_path / "lab.nii.gz"),
        "--points", str(pcsv), "--points-out", str(tmp_path / "moved.csv"),
        "--save-transform", str(tmp_path / "T"), "--jacobian", str(tmp_path / "jac.nii.gz"),
        "--device", "cpu",
    ]  # fmt: skip
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "lncc similarity" in err and "folding" in err
    warped = read_image(out)[0]
    np.testing.assert_allclose(warped.affine, frec.affine, atol=1e-4)
    assert warped.shape == frec.shape
    lab = read_image(tmp_path / "lab.nii.gz")[0]
    assert lab.shape == frec.shape and set(np.unique(np.asarray(lab.data))) <= {0, 1}
    fseg = np.asarray(read_image(data_path(d + "mt0_seg.nii.gz"))[0].data) > 0
    wseg = np.asarray(lab.data) > 0
    dice = 2 * (fseg & wseg).sum() / (fseg.sum() + wseg.sum())
    assert dice > 0.85  # 0.843 before registration
    for f in ("T.json", "T.tfm", "T_displacement.nii.gz", "jac.nii.gz"):
        assert (tmp_path / f).exists(), f
    from napari_medseg.core.register.transform_io import load_transform, read_points_csv

    moved = read_points_csv(tmp_path / "moved.csv")
    np.testing.assert_allclose(
        moved, load_transform(tmp_path / "T.json").map_points(pts), atol=1e-3
    )
    # a provenance JSON beside every file written: method, transform, inputs, its output
    saved = load_transform(tmp_path / "T.json")
    outs = {
        "warped": out,
        "labels": tmp_path / "lab.nii.gz",
        "points": tmp_path / "moved.csv",
        "jacobian": tmp_path / "jac.nii.gz",
    }
    tfiles = [tmp_path / f for f in ("T.json", "T_displacement.nii.gz", "T.tfm")]
    mask = os.umask(0)
    os.umask(mask)
    for kind, path in [*outs.items(), *(("transform", f) for f in tfiles)]:
        side = path.with_name(path.name + ".provenance.json")
        assert side.is_file(), side
        assert side.stat().st_mode & 0o777 == 0o666 & ~mask
        prov = json.loads(side.read_text())
        assert prov["output"] == str(path) and prov["output_kind"] == kind
        assert prov["task"] == "registration" and prov["options"]["mode"] == "deformable"
        assert prov["options"]["iterations"] == 30 and prov["similarity"] == "lncc"
        np.testing.assert_allclose(prov["transform"]["matrix_ras"], saved.matrix, atol=1e-9)
        assert prov["transform"]["grid_shape"] is not None  # deformable: a control grid
        assert prov["inputs"] == {
            "fixed": str(fixed),
            "moving": str(moving),
            "labels": str(labels),
            "points": str(pcsv),
        }
        assert prov["outputs"] == {
            **{k: str(v) for k, v in outs.items()},
            "transform": [str(f) for f in tfiles],
        }
        assert prov["similarity_after"] > prov["similarity_before"]
    # existing outputs are not overwritten without --overwrite
    assert main(argv) == 1
    assert "--overwrite" in capsys.readouterr().err


def _errors(capsys) -> list[str]:
    """The error lines on stderr (the progress bar may precede them on its own line)."""
    return [ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln]


def test_register_bad_input_is_one_line(main, tmp_path, capsys):
    vol = data_path("registration/mt_pair/mt0.nii.gz")
    flat = data_path("microscopy/dsb2018_nuclei/image.tif")
    assert main(["register", str(vol), str(flat), "-o", str(tmp_path / "w.nii.gz")]) == 1
    err = _errors(capsys)
    assert len(err) == 1 and "same dimensionality" in err[0]
    # a moving image 400 mm away: say so and offer --init com
    import nibabel as nib

    img = nib.load(str(vol))
    aff = img.affine.copy()
    aff[:3, 3] += 400.0
    far = tmp_path / "far.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), aff), str(far))
    assert main(["register", str(vol), str(far), "-o", str(tmp_path / "w.nii.gz")]) == 1
    err = _errors(capsys)
    assert len(err) == 1 and "do not overlap" in err[0] and "--init com" in err[0]
    assert not (tmp_path / "w.nii.gz").exists()


@pytest.mark.parametrize("existing", ["w.nii.gz", "lab.nii.gz", "T.json", "T.tfm"])
def test_register_existing_provenance_needs_overwrite(main, tmp_path, capsys, existing):
    """An existing sidecar stops the command before any work; --overwrite replaces it."""
    d = "registration/mt_pair/"
    fixed, moving = data_path(d + "mt0.nii.gz"), data_path(d + "mt1.nii.gz")
    side = tmp_path / f"{existing}.provenance.json"
    side.write_text("{}\n")
    argv = [
        "register", str(fixed), str(moving), "-o", str(tmp_path / "w.nii.gz"),
        "--mode", "rigid", "--iterations", "5", "--levels", "1",
        "--labels", str(data_path(d + "mt1_seg.nii.gz")),
        "--labels-out", str(tmp_path / "lab.nii.gz"),
        "--save-transform", str(tmp_path / "T"), "--device", "cpu", "--quiet",
    ]  # fmt: skip
    assert main(argv) == 1
    err = _errors(capsys)
    assert len(err) == 1 and side.name in err[0] and "--overwrite" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == [side.name]  # nothing written
    assert side.read_text() == "{}\n"
    if existing != "w.nii.gz":
        return  # one run with --overwrite is enough
    assert main([*argv, "--overwrite"]) == 0
    prov = json.loads(side.read_text())
    assert prov["output_kind"] == "warped" and prov["options"]["mode"] == "rigid"
    assert prov["transform"]["grid_shape"] is None  # rigid: no control grid
