"""nnU-Net v2 model folders, run by napari-medseg, against nnunetv2's own ``nnUNetPredictor``.

Real model folders are made by nnunetv2's own planner and trainer
(``scripts/make_nnunet_model.py``: fingerprint, ``plan_experiment`` with a small GPU memory
target, networks shrunk to CPU size, nnU-Net's random initialisation with a fixed seed per
fold). On real CT and MR volumes our labels must agree with the reference's at Dice >= 0.99 for
every class the reference predicts with >= 1,000 voxels, in 2D and 3D configurations, with
and without mirroring, one fold and an ensemble of two. Randomly initialised nnU-Net networks
do not give noise: their argmax follows the image (5-6 classes of 1,000+ voxels here), so
disagreement in windows, weights, resampling or axes shows. The CT model is planned at 3 mm
and run on the 0.8 x 0.8 x 5 mm spleen CT too (resampling there and back, separate z); the MR
model (two channels: MRI with z-score, and a smoothed copy with RescaleTo01) is planned at 2 mm
and run on the 3 mm LPS abdominal MR.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from napari_medseg.core.segment.segment import segment
from napari_medseg.io import read_image
from napari_medseg.models.networks import ModelLoadError
from napari_medseg.models.registry import list_models, load_model
from napari_medseg.progress import run_sync
from tests.conftest import data_path
from tests.models.nnunet_helpers import (
    agreement,
    model_folders,
    mr_channels,
    reference_labels,
)

pytestmark = pytest.mark.slow

CT_SPLEEN = "ct/spleen/image.nii.gz"
CT_BODY = "ct/totalseg_small/ct.nii.gz"


def _ours(folder: Path, images: list[Path], folds: list[int], mirror: bool) -> np.ndarray:
    from napari_medseg.core.segment.channels import stack_channels

    model = load_model(folder, folds=folds)
    record = stack_channels([read_image(p)[0] for p in images])
    result = run_sync(segment(record, model, device="cpu", tta=mirror))
    assert result.labels.shape == record.spatial_shape
    np.testing.assert_array_equal(result.affine, record.affine)
    prov = result.provenance["parameters"]
    assert prov["folds"] == [str(f) for f in folds]
    assert (prov["mirroring_axes"] is not None) == mirror
    return result.labels


@pytest.mark.parametrize(
    ("config", "image", "folds", "mirror"),
    [
        ("3d_fullres", CT_SPLEEN, [0], False),
        ("3d_fullres", CT_BODY, [0, 1], True),
        ("2d", CT_SPLEEN, [0], True),
        ("2d", CT_BODY, [0, 1], False),
    ],
)
def test_ct_labels_agree_with_nnunet_predictor(
    config: str, image: str, folds: list[int], mirror: bool
) -> None:
    folder = model_folders("ct")[config]
    path = data_path(image)
    ref = reference_labels(folder, [path], folds, mirror)
    ours = _ours(folder, [path], folds, mirror)
    dice = agreement(ref, ours)
    assert len(dice) >= 3, f"too few classes of 1,000+ voxels to judge: {dice}"
    assert min(dice.values()) >= 0.99, dice


def test_mr_two_channel_labels_agree_with_nnunet_predictor(tmp_path: Path) -> None:
    folder = model_folders("mr")["3d_fullres"]
    plans = json.loads((folder / "plans.json").read_text())
    norm = plans["configurations"]["3d_fullres"]["normalization_schemes"]
    assert norm == ["ZScoreNormalization", "RescaleTo01Normalization"]
    images = mr_channels(tmp_path)
    ref = reference_labels(folder, images, [0], True)
    ours = _ours(folder, images, [0], True)
    dice = agreement(ref, ours)  # the initialised MR network paints 2 classes of 1,000+ voxels
    assert len(dice) >= 2, f"too few classes of 1,000+ voxels to judge: {dice}"
    assert min(dice.values()) >= 0.99, dice


def test_cli_one_file_per_channel(tmp_path: Path) -> None:
    """``segment CASE_0000 CASE_0001 -m FOLDER -o OUT --no-mirror``: OUT on the input's grid,
    the same labels as nnUNetPredictor."""
    from napari_medseg.cli import main

    folder = model_folders("mr")["3d_fullres"]
    images = mr_channels(tmp_path)
    out = tmp_path / "seg.nii.gz"
    args = ["segment", *map(str, images), "-m", str(folder), "-o", str(out), "--no-mirror"]
    assert main([*args, "--quiet"]) == 0
    seg = nib.load(str(out))
    src = nib.load(str(images[0]))
    assert seg.shape == src.shape
    np.testing.assert_allclose(seg.affine, src.affine, atol=1e-5)
    ref = reference_labels(folder, images, [0], False)
    dice = agreement(ref, np.asarray(seg.dataobj))
    assert min(dice.values()) >= 0.99, dice
    # one channel for a two-channel model: one sentence, non-zero exit
    assert main(["segment", str(images[0]), "-m", str(folder), "-o", str(tmp_path / "x.nii.gz"),
                 "--quiet"]) != 0  # fmt: skip


def test_card_and_listing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folders = model_folders("ct")
    model = load_model(folders["3d_fullres"], folds=[1])
    card = model.card
    assert model.kind == "nnunet"
    assert card.name == "Dataset901_MedsegCT 3d_fullres"
    assert (card.task, card.dims, card.modality, card.in_channels) == ("segmentation", 3, "CT", 1)
    assert [c["name"] for c in card.classes] == [
        "background", "spleen", "kidneys", "liver", "colon", "back_muscles",
    ]  # fmt: skip
    assert card.license == "Apache-2.0"
    assert card.extra["nnunet"]["folds"] == ["1"]
    assert card.extra["nnunet"]["mirror_axes"] == [0, 1, 2]
    assert card.extra["nnunet"]["normalization_schemes"] == ["CTNormalization"]
    assert load_model(folders["2d"]).card.dims == 2
    assert load_model(model_folders("mr")["3d_fullres"]).card.modality == "MR"
    # the user models folder lists an nnU-Net folder like any model; its name loads it
    monkeypatch.setenv("MEDSEG_MODELS_DIR", str(tmp_path / "models"))
    shutil.copytree(folders["3d_fullres"], tmp_path / "models" / "ct_nnunet")
    entry = next(d for d in list_models() if d["registry_name"] == "ct_nnunet")
    assert entry["kind"] == "nnunet" and entry["dims"] == 3 and entry["modality"] == "CT"
    assert entry["name"] == "ct_nnunet" and entry["title"] == "Dataset901_MedsegCT 3d_fullres"
    assert load_model("ct_nnunet").card.extra["nnunet"]["folds"] == ["0", "1"]
    with pytest.raises(ModelLoadError, match="no fold 7"):
        load_model("ct_nnunet", folds=[7])


def test_untrusted_files_are_refused(tmp_path: Path) -> None:
    """A checkpoint holding Python objects is refused by weights_only; a plans file naming a
    class outside dynamic-network-architectures is refused before anything is imported."""
    import argparse

    import torch

    src = model_folders("ct")["3d_fullres"]
    bad = tmp_path / "Trainer__Plans__3d_fullres"
    shutil.copytree(src, bad)
    ck = bad / "fold_0" / "checkpoint_final.pth"
    state = torch.load(str(ck), weights_only=True)
    state["init_args"]["extra"] = argparse.Namespace(evil=True)
    torch.save(state, str(ck))
    with pytest.raises(ModelLoadError, match="weights only"):
        load_model(bad, folds=[0])
    assert load_model(bad, folds=[1]).card.extra["nnunet"]["folds"] == ["1"]
    plans = json.loads((bad / "plans.json").read_text())
    plans["configurations"]["3d_fullres"]["architecture"]["network_class_name"] = "os.system"
    (bad / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(ModelLoadError, match="not under"):
        load_model(bad, folds=[1])
