"""The command line: what --help lists works; segment writes on the input's grid."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from napari_medseg.cli import build_parser, main
from tests.conftest import data_path
from tests.widgets.test_segment_widget import _tiny_ct_model


def test_help_lists_only_commands_that_exist():
    out = subprocess.run(
        [sys.executable, "-m", "napari_medseg.cli", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0
    for cmd in (
        "info",
        "models",
        "segment",
        "train",
        "view",
        "demo",
        "register",
        "denoise",
        "detect",
    ):
        assert cmd in out.stdout
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name, parser in sub.choices.items():
        assert parser.get_default("func") is not None, name


def test_models_json_lists_builtin_cards(capsys):
    assert main(["models", "--json"]) == 0
    cards = json.loads(capsys.readouterr().out)
    names = {c["name"] for c in cards}
    assert {"ct_spleen_3d", "mr_spinalcord_3d", "fluo_nuclei_2d"} <= names
    for c in cards:
        assert {"name", "task", "dims", "modality"} <= set(c)


def test_models_table_shows_each_task_and_its_held_out_score(capsys):
    assert main(["models"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "held-out Dice" in rows["fluo_nuclei_2d"]
    assert "detection" in rows["fluo_nuclei_det_2d"] and "box F1" in rows["fluo_nuclei_det_2d"]
    assert "interactive" in rows["click_refine_2d"] and "3 clicks" in rows["click_refine_2d"]


@pytest.fixture
def ct_crop(tmp_path):
    img = nib.load(str(data_path("ct/spleen/image.nii.gz")))
    arr = np.asarray(img.dataobj)[40:73, 50:84, 3:24]  # awkward 33x34x21
    aff = img.affine.copy()
    aff[:3, 3] = (img.affine @ np.r_[40, 50, 3, 1.0])[:3]
    path = tmp_path / "crop.nii.gz"
    nib.save(nib.Nifti1Image(arr.astype(np.int16), aff), str(path))
    return path


def test_segment_writes_on_input_grid_with_provenance(ct_crop, tmp_path, capsys):
    model = _tiny_ct_model(tmp_path / "tiny")
    out = tmp_path / "seg.nii.gz"
    assert main(["segment", str(ct_crop), "-m", str(model), "-o", str(out), "--quiet"]) == 0
    seg, src = nib.load(str(out)), nib.load(str(ct_crop))
    assert seg.shape == src.shape
    np.testing.assert_allclose(seg.affine, src.affine, atol=1e-4)
    assert np.issubdtype(seg.get_data_dtype(), np.integer)
    prov = json.loads((tmp_path / "seg.nii.gz.provenance.json").read_text())
    assert prov["input"] == str(ct_crop) and len(prov["input_sha256"]) == 64
    assert prov["model"]["name"] == "tiny_ct"
    # never overwrite without --overwrite
    before = out.read_bytes()
    assert main(["segment", str(ct_crop), "-m", str(model), "-o", str(out), "--quiet"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert out.read_bytes() == before


def test_segment_batch_folder(ct_crop, tmp_path):
    folder = tmp_path / "cases"
    folder.mkdir()
    shutil.copy(ct_crop, folder / "a.nii.gz")
    shutil.copy(ct_crop, folder / "b.nii.gz")
    model = _tiny_ct_model(tmp_path / "tiny")
    outdir = tmp_path / "out"
    assert main(["segment", str(folder), "-m", str(model), "-o", str(outdir), "--quiet"]) == 0
    assert sorted(p.name for p in outdir.glob("*_seg.nii.gz")) == ["a_seg.nii.gz", "b_seg.nii.gz"]
    assert len(list(outdir.glob("*.provenance.json"))) == 2


def test_segment_with_builtin_model_name_on_nrrd(tmp_path):
    """A built-in model by name, on an LAS NRRD: output on the NRRD's own grid."""
    src = data_path("mri/brain_tumour_nrrd/breast1_image.nrrd")
    out = tmp_path / "breast_seg.nrrd"
    assert main(["segment", str(src), "-m", "mr_spinalcord_3d", "-o", str(out), "--quiet"]) == 0
    import SimpleITK as sitk

    a, b = sitk.ReadImage(str(src)), sitk.ReadImage(str(out))
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-6)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["segment", "{crop}", "-m", "no_such_model", "-o", "{tmp}/x.nii.gz"], "no_such_model"),
        (["segment", "{tmp}/missing.nii.gz", "-m", "{model}", "-o", "{tmp}/x.nii.gz"], "exist"),
        (["segment", "{rgb}", "-m", "{model}", "-o", "{tmp}/x.tif"], "2D"),
    ],
)
def test_segment_errors_are_one_line(argv, message, ct_crop, tmp_path, capsys):
    model = _tiny_ct_model(tmp_path / "tiny")
    fmt = {
        "crop": ct_crop,
        "tmp": tmp_path,
        "model": model,
        "rgb": data_path("pathology/he_tile_tcia.jpg"),
    }
    assert main([a.format(**fmt) for a in argv] + ["--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


@pytest.fixture
def he_png(tmp_path):
    from PIL import Image

    tile = np.asarray(Image.open(data_path("pathology/he_tile_tcia.jpg")).convert("RGB"))
    path = tmp_path / "he.png"
    Image.fromarray(np.ascontiguousarray(tile[:150, :170])).save(path)
    return path


def test_segment_click_model_without_clicks_fails_before_work(he_png, tmp_path, capsys):
    from tests.models.test_bundle_fidelity_nuclick import nuclick_bundle

    bundle = nuclick_bundle(tmp_path)
    out = tmp_path / "o.tif"
    assert main(["segment", str(he_png), "-m", str(bundle), "-o", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "give clicks" in err[0] and "--clicks" in err[0], err
    assert not list(tmp_path.glob("o*"))  # nothing written


def test_segment_clicks_outside_the_image_are_refused(he_png, tmp_path, capsys):
    from tests.models.test_bundle_fidelity_nuclick import nuclick_bundle

    bundle = nuclick_bundle(tmp_path)
    clicks = tmp_path / "clicks.csv"
    clicks.write_text("row,col\n40,50\n149,200\n")  # 150 rows x 170 columns: col 200 is out
    out = tmp_path / "o.tif"
    argv = ["segment", str(he_png), "-m", str(bundle), "-o", str(out), "--clicks", str(clicks)]
    assert main([*argv, "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "click 2 at (row 149, col 200) lies outside the image" in err[0], err
    assert not list(tmp_path.glob("o*"))
    # the bundle's own [x, y] centroid files: [200, 149] is the same click, also outside
    (tmp_path / "c.json").write_text("[[50, 40], [200, 149]]")
    argv[-1] = str(tmp_path / "c.json")
    assert main([*argv, "--quiet"]) == 1
    assert "click 2 at (row 149, col 200)" in capsys.readouterr().err
    (tmp_path / "c.json").write_text("[[50, 40], [160, 149]]")  # inside: it runs
    assert main([*argv, "--quiet"]) == 0
    rows = (tmp_path / "o_objects.csv").read_text().splitlines()
    assert rows[0] == "id,row,col,area_px" and rows[2].startswith("2,149,160,")


def test_segment_clicks_with_a_model_that_takes_none(ct_crop, tmp_path, capsys):
    model = _tiny_ct_model(tmp_path / "tiny")
    clicks = tmp_path / "clicks.csv"
    clicks.write_text("row,col\n10,10\n")
    out = tmp_path / "o.nii.gz"
    argv = ["segment", str(ct_crop), "-m", str(model), "-o", str(out), "--clicks", str(clicks)]
    assert main([*argv, "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "takes no clicks" in err[0], err
    assert not out.exists()


def test_corrupt_weights_and_wrong_sha(tmp_path, ct_crop, capsys):
    model = _tiny_ct_model(tmp_path / "tiny")
    w = model / "weights.safetensors"
    w.write_bytes(w.read_bytes()[:-10] + b"0123456789")
    assert main(["segment", str(ct_crop), "-m", str(model), "-o", str(tmp_path / "o.nii.gz")]) == 1
    assert "sha256" in capsys.readouterr().err
    w.write_bytes(b"garbage")
    card = json.loads((model / "model.json").read_text())
    card["sha256"] = None
    (model / "model.json").write_text(json.dumps(card))
    assert main(["segment", str(ct_crop), "-m", str(model), "-o", str(tmp_path / "o.nii.gz")]) == 1
    assert "corrupt" in capsys.readouterr().err


def _nuclei_dataset(root):
    import tifffile

    img = tifffile.imread(data_path("microscopy/dsb2018_nuclei/image.tif"))
    mask = tifffile.imread(data_path("microscopy/dsb2018_nuclei/mask.tif"))
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for n, (r, c) in enumerate([(0, 0), (0, 64), (64, 0), (64, 64)]):
        tifffile.imwrite(root / "imagesTr" / f"tile{n}_0000.tif", img[r : r + 64, c : c + 64])
        lab = (mask[r : r + 64, c : c + 64] > 0).astype(np.uint8)
        tifffile.imwrite(root / "labelsTr" / f"tile{n}.tif", lab)
    (root / "dataset.json").write_text(
        json.dumps({"labels": {"background": 0, "nucleus": 1}, "channel_names": {"0": "fluo"}})
    )
    return root


def test_train_then_segment_and_fine_tune(tmp_path):
    ds = _nuclei_dataset(tmp_path / "Dataset009_Tiles")
    model = tmp_path / "model"
    argv = ["train", str(ds), "-o", str(model), "--time-budget", "4", "--width", "4", "--quiet"]
    assert main(argv) == 0
    card = json.loads((model / "model.json").read_text())
    assert card["dims"] == 2 and card["classes"][1]["name"] == "nucleus"
    assert 0.0 <= card["metrics"]["val_dice_mean"] <= 1.0
    assert main(argv) == 1  # the model folder exists: never overwritten silently
    out = tmp_path / "seg.tif"
    img = data_path("microscopy/dsb2018_nuclei/image.tif")
    assert main(["segment", str(img), "-m", str(model), "-o", str(out), "--quiet"]) == 0
    import tifffile

    assert tifffile.imread(out).shape == (512, 512)
    tuned = tmp_path / "tuned"
    assert (
        main(
            [
                "train",
                str(ds),
                "-o",
                str(tuned),
                "--init",
                str(model),
                "--time-budget",
                "3",
                "--quiet",
            ]
        )
        == 0
    )
    assert json.loads((tuned / "model.json").read_text())["parent"]


def test_bundle_needs_trust_bundle_flag(ct_crop, tmp_path, capsys):
    from tests.widgets.test_segment_bundle_trust import _tiny_untrusted_bundle

    bundle = _tiny_untrusted_bundle(tmp_path)
    out = tmp_path / "b.nii.gz"
    assert main(["segment", str(ct_crop), "-m", str(bundle), "-o", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "--trust-bundle" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    argv = ["segment", str(ct_crop), "-m", str(bundle), "-o", str(out), "--trust-bundle"]
    assert main([*argv, "--quiet"]) == 0
    assert nib.load(str(out)).shape == nib.load(str(ct_crop)).shape
