"""Fine-tuning from corrected worklist cases: a new model version with parent, cases, scores."""

from __future__ import annotations

import numpy as np
import pytest

from napari_medseg.core.correct.worklist import Worklist
from napari_medseg.io import read_image
from napari_medseg.progress import run_sync
from tests.conftest import data_path


def tiny_cord_model(folder):
    import torch

    from napari_medseg.models.card import ModelCard
    from napari_medseg.models.networks import build_network, save_model

    torch.manual_seed(0)
    card = ModelCard(
        name="tiny_cord",
        dims=3,
        modality="MR",
        classes=[{"id": 0, "name": "background"}, {"id": 1, "name": "cord", "color": "#ffff00"}],
        spacing=[1.0, 1.0, 2.0],
        patch_size=[16, 16, 16],
        normalization={"scheme": "zscore"},
        architecture={
            "name": "UNet",
            "kwargs": {
                "spatial_dims": 3,
                "in_channels": 1,
                "out_channels": 2,
                "channels": [4, 8],
                "strides": [2],
                "num_res_units": 0,
            },
        },
    )
    save_model(folder, card, build_network(card))
    return folder


def corrected_worklist(root, names=("t2", "t1w", "mt0", "mt1")):
    files = {
        "t2": ("mri/spinal_cord/t2.nii.gz", "mri/spinal_cord/t2_seg-manual.nii.gz"),
        "t1w": ("mri/spinal_cord/t1w.nii.gz", "mri/spinal_cord/t1w_seg-manual.nii.gz"),
        "mt0": ("registration/mt_pair/mt0.nii.gz", "registration/mt_pair/mt0_seg.nii.gz"),
        "mt1": ("registration/mt_pair/mt1.nii.gz", "registration/mt_pair/mt1_seg.nii.gz"),
    }
    wl = Worklist.create(root, [data_path(files[n][0]) for n in names])
    for n in names:
        (lab,) = read_image(data_path(files[n][1]))
        lab.modality = "label"
        lab.data = (np.asarray(lab.data) > 0).astype(np.uint8)
        wl.save_corrected(n, lab, {"note": "ground truth as the correction"})
    return wl


def test_finetune_writes_a_new_version_with_parent_cases_and_scores(tmp_path, monkeypatch):
    from napari_medseg.models.card import ModelCard
    from napari_medseg.models.registry import list_models
    from napari_medseg.training.from_corrections import finetune_from_corrections

    monkeypatch.setenv("MEDSEG_MODELS_DIR", str(tmp_path / "models"))
    parent = tiny_cord_model(tmp_path / "tiny_cord")
    wl = corrected_worklist(tmp_path / "proj")
    seen = []
    result = run_sync(
        finetune_from_corrections(wl, parent, time_budget=4.0, device="cpu", batch_size=2, seed=0),
        seen.append,
    )
    out = result.out_dir
    assert out.parent == tmp_path / "models" and out.name.startswith("tiny_cord-ft")
    card = ModelCard.load(out)
    assert card.parent == "tiny_cord@1" and card.version != "1"
    assert sorted(card.training["corrections"]["cases"]) == ["mt0", "mt1", "t1w", "t2"]
    assert card.training["fine_tuned_from"] == str(parent)
    ba = card.metrics["before_after"]
    assert set(ba["cases"]) == set(card.training["val_cases"]) and ba["cases"]
    for which in ("before", "after"):
        assert 0.0 <= ba["mean_dice"][which] <= 1.0
    assert any("loss" in (p.info or {}) for p in seen)
    # the parent stays, the new version is listed beside it (switch back = choose it)
    assert (parent / "model.json").exists()
    assert out.name in [m["name"] for m in list_models()]


def test_finetune_on_every_case_without_hold_out(tmp_path, monkeypatch):
    """hold_out=False trains on all corrected cases: no validation split, no before/after."""
    from napari_medseg.models.card import ModelCard
    from napari_medseg.training.from_corrections import finetune_from_corrections

    monkeypatch.setenv("MEDSEG_MODELS_DIR", str(tmp_path / "models"))
    parent = tiny_cord_model(tmp_path / "tiny_cord")
    wl = corrected_worklist(tmp_path / "proj")
    result = run_sync(
        finetune_from_corrections(
            wl, parent, time_budget=3.0, device="cpu", batch_size=2, seed=0, hold_out=False
        )
    )
    card = ModelCard.load(result.out_dir)
    assert card.training["corrections"]["held_out"] is False
    assert not card.training.get("val_cases")
    assert "before_after" not in card.metrics
    assert sorted(card.training["train_cases"]) == ["mt0", "mt1", "t1w", "t2"]


def test_finetune_needs_corrected_cases(tmp_path):
    from napari_medseg.core.correct.worklist import WorklistError
    from napari_medseg.training.from_corrections import finetune_from_corrections

    parent = tiny_cord_model(tmp_path / "tiny_cord")
    wl = Worklist.create(tmp_path / "proj", [data_path("mri/spinal_cord/t2.nii.gz")])
    with pytest.raises(WorklistError):
        run_sync(finetune_from_corrections(wl, parent, out_dir=tmp_path / "x", time_budget=2.0))
