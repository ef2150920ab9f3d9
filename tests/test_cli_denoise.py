"""The ``denoise`` subcommand on real crops: outputs on the input's grid, models, bad input."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from napari_medseg.cli.denoise import add_parser as register
from napari_medseg.errors import MedsegError
from napari_medseg.io import read_image, write_image
from napari_medseg.io.record import ImageRecord
from tests.conftest import data_path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="napari-medseg")
    sub = parser.add_subparsers(dest="command")
    register(sub)
    return parser


def _run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    return args.func(args)


def _nuclei_tif(path, rows=slice(200, 263), cols=slice(300, 371)):
    rec = read_image(data_path("microscopy/dsb2018_nuclei/image.tif"))[0]
    crop = np.asarray(rec.data)[rows, cols]
    noisy = np.random.default_rng(0).poisson(crop.astype(np.float64) + 5).astype(np.uint16)
    write_image(path, ImageRecord(data=noisy, affine=np.eye(3), space="pixel", name="n"))
    return noisy


def test_defaults_and_help():
    args = _parser().parse_args(["denoise", "in.tif", "-o", "out.tif"])
    assert args.method == "auto" and args.time_budget == 90.0 and args.axis is None
    assert args.noise_model == "auto" and not args.no_tta and args.background is None
    assert (
        "--time-budget" in _parser()._subparsers._group_actions[0].choices["denoise"].format_help()
    )


def test_classical_keeps_grid_dtype_and_writes_provenance(tmp_path):
    noisy = _nuclei_tif(tmp_path / "in.tif")
    out = tmp_path / "out.tif"
    assert (
        _run(
            ["denoise", str(tmp_path / "in.tif"), "-o", str(out), "--method", "nlmeans", "--quiet"]
        )
        == 0
    )
    res = read_image(out)[0]
    data = np.asarray(res.data)
    assert data.shape == noisy.shape and data.dtype == np.uint16
    assert noisy.min() <= data.min() and data.max() <= noisy.max()
    assert (
        np.abs(np.diff(data.astype(float), axis=1)).mean()
        < np.abs(np.diff(noisy.astype(float), axis=1)).mean()
    )
    prov = json.loads((tmp_path / "out.tif.provenance.json").read_text())
    assert prov["method"] == "nlmeans" and prov["noise_sigma"] > 0
    with pytest.raises(MedsegError, match="--overwrite"):
        _run(["denoise", str(tmp_path / "in.tif"), "-o", str(out), "--method", "tv", "--quiet"])


def test_n2v2_saves_a_model_that_another_image_reuses(tmp_path):
    _nuclei_tif(tmp_path / "a.tif")
    _nuclei_tif(tmp_path / "b.tif", rows=slice(10, 58), cols=slice(20, 81))
    model = tmp_path / "denoiser"
    assert (
        _run(
            [
                "denoise",
                str(tmp_path / "a.tif"),
                "-o",
                str(tmp_path / "a_dn.tif"),
                "--max-steps",
                "3",
                "--time-budget",
                "0",
                "--save-model",
                str(model),
                "--device",
                "cpu",
                "--quiet",
            ]
        )
        == 0
    )
    card = json.loads((model / "model.json").read_text())
    assert card["task"] == "denoising" and card["training"]["steps"] == 3
    assert (
        _run(
            [
                "denoise",
                str(tmp_path / "b.tif"),
                "-o",
                str(tmp_path / "b_dn.nii.gz"),
                "--model",
                str(model),
                "--device",
                "cpu",
                "--precision",
                "fp32",
                "--quiet",
            ]
        )
        == 0
    )
    prov = json.loads((tmp_path / "b_dn.nii.gz.provenance.json").read_text())
    assert prov["network"]["reused"] is True and prov["model"] == str(model)
    fp = prov["network"]["fast_path"]  # what the prediction ran
    assert fp["precision_requested"] == "fp32" and fp["precision"] == "fp32"
    assert fp["device"] == "cpu" and fp["memory_format"] and fp["threads"] >= 1
    out = read_image(tmp_path / "b_dn.nii.gz")[0]
    assert out.spatial_shape[:2] == (48, 61)


def test_volume_keeps_affine_and_4d_needs_axis(tmp_path):
    src = read_image(data_path("denoising/fmri_30frames.nii.gz"))[0]
    arr = np.asarray(src.data)[14:47, 20:54, :, :3]
    rec = ImageRecord(data=arr, affine=src.affine, space="RAS", modality="MR", name="f")
    write_image(tmp_path / "f.nii.gz", rec)
    with pytest.raises(MedsegError, match="--axis 3"):
        _run(
            [
                "denoise",
                str(tmp_path / "f.nii.gz"),
                "-o",
                str(tmp_path / "o.nii.gz"),
                "--method",
                "tv",
                "--quiet",
            ]
        )
    assert (
        _run(
            [
                "denoise",
                str(tmp_path / "f.nii.gz"),
                "-o",
                str(tmp_path / "o.nii.gz"),
                "--method",
                "tv",
                "--axis",
                "3",
                "--quiet",
            ]
        )
        == 0
    )
    out = read_image(tmp_path / "o.nii.gz")[0]
    assert out.shape == arr.shape and np.asarray(out.data).dtype == np.int16
    np.testing.assert_allclose(out.affine, src.affine, atol=1e-5)


def test_folder_trains_once_on_all_images(tmp_path):
    (tmp_path / "in").mkdir()
    _nuclei_tif(tmp_path / "in" / "a.tif")
    _nuclei_tif(tmp_path / "in" / "b.tif", rows=slice(300, 350), cols=slice(40, 90))
    assert (
        _run(
            [
                "denoise",
                str(tmp_path / "in"),
                "-o",
                str(tmp_path / "out"),
                "--max-steps",
                "2",
                "--time-budget",
                "0",
                "--device",
                "cpu",
                "--quiet",
            ]
        )
        == 0
    )
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tif")) == [
        "a_denoised.tif",
        "b_denoised.tif",
    ]
    pa = json.loads((tmp_path / "out" / "a_denoised.tif.provenance.json").read_text())
    pb = json.loads((tmp_path / "out" / "b_denoised.tif.provenance.json").read_text())
    assert pa["network"]["training"]["n_images"] == 2 and pb["network"]["reused"] is True


def test_bad_input_is_one_sentence(tmp_path):
    flat = ImageRecord(data=np.full((20, 21), 3, np.uint8), affine=np.eye(3), space="pixel")
    write_image(tmp_path / "flat.png", flat)
    with pytest.raises(MedsegError, match="constant"):
        _run(["denoise", str(tmp_path / "flat.png"), "-o", str(tmp_path / "o.png"), "--quiet"])
    with pytest.raises(MedsegError, match="--save-model needs"):
        _run(
            [
                "denoise",
                str(tmp_path / "flat.png"),
                "-o",
                str(tmp_path / "o2.png"),
                "--method",
                "tv",
                "--save-model",
                str(tmp_path / "m"),
                "--quiet",
            ]
        )


def test_background_box_sets_the_noise_model_and_bad_boxes_fail(tmp_path, capsys):
    noisy = _nuclei_tif(tmp_path / "in.tif")
    out = tmp_path / "out.tif"
    argv = ["denoise", str(tmp_path / "in.tif"), "-o", str(out), "--method", "gaussian"]
    assert _run([*argv, "--background", "0:20,:30"]) == 0
    prov = json.loads((tmp_path / "out.tif.provenance.json").read_text())
    nm = prov["noise_model"]
    assert nm["source"] == "background region"
    assert nm["offset"] == pytest.approx(noisy[:20, :30].mean(), rel=1e-4)
    assert "noise model: gain" in capsys.readouterr().err
    for box, msg in [
        ("0:20", "2 spatial axes"),
        ("0:20,a:b", "whole numbers"),
        ("5:5,0:3", "empty"),
    ]:
        with pytest.raises(MedsegError, match=msg):
            _run([*argv, "--overwrite", "--background", box])


def test_save_model_with_auto_on_correlated_noise_fails_and_writes_nothing(tmp_path):
    rec = read_image(data_path("microscopy/dsb2018_nuclei/image.tif"))[0]
    crop = np.asarray(rec.data, dtype=np.float64)[100:164, 150:214]
    white = np.random.default_rng(0).normal(0, 1, (64, 65))
    smeared = (crop + 8 * (white[:, 1:] + white[:, :-1])).astype(np.float32)
    write_image(tmp_path / "in.tif", ImageRecord(data=smeared, affine=np.eye(3), space="pixel"))
    out, folder = tmp_path / "out.tif", tmp_path / "model"
    argv = ["denoise", str(tmp_path / "in.tif"), "-o", str(out), "--save-model", str(folder)]
    with pytest.raises(MedsegError, match="correlated"):
        _run([*argv, "--max-steps", "2", "--quiet"])
    assert not out.exists() and not folder.exists()
