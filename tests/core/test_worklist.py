"""Worklist project folder: cases, status, corrected versions, export for fine-tuning."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_medseg.core.correct.worklist import Worklist, WorklistError
from napari_medseg.io import read_image
from tests.conftest import data_path


@pytest.fixture
def project(tmp_path):
    sc = "mri/spinal_cord/"
    images = [
        data_path(sc + "t2.nii.gz"),
        data_path(sc + "t1w.nii.gz"),
        data_path(sc + "t2s.nii.gz"),
    ]
    preds = {
        "t2": data_path(sc + "t2_seg-manual.nii.gz"),
        "t1w": data_path(sc + "t1w_seg-manual.nii.gz"),
    }
    return Worklist.create(tmp_path / "proj", images, preds)


def test_cases_status_and_next(project):
    cases = project.cases()
    assert [c.name for c in cases] == ["t1w", "t2", "t2s"]
    assert [c.status for c in cases] == ["to do"] * 3
    assert cases[1].prediction.name == "t2.nii.gz" and cases[2].prediction is None
    assert project.next_case().name == "t1w"
    assert project.next_case(after="t1w").name == "t2"
    assert project.next_case(after="t2s").name == "t1w"  # wraps around
    project.set_status("t1w", "approved", note="ok")
    assert project.next_case().name == "t2"
    assert project.summary() == {"to do": 2, "corrected": 0, "approved": 1}
    info = json.loads(project.status_path.read_text())["cases"]["t1w"]
    assert info["status"] == "approved" and info["note"] == "ok" and info["user"]
    with pytest.raises(WorklistError):
        project.set_status("t2", "done")
    with pytest.raises(WorklistError):
        project.set_status("nope", "approved")
    with pytest.raises(WorklistError):
        Worklist(project.folder / "images")


def test_save_corrected_and_export_dataset(project, tmp_path):
    from napari_medseg.training.dataset import list_cases, load_case

    case = project.case("t2")
    (pred,) = read_image(case.prediction)
    pred.modality = "label"
    pred.data = np.asarray(pred.data).astype(np.uint8)
    p1 = project.save_corrected("t2", pred, {"note": "first"})
    p2 = project.save_corrected("t2", pred)
    assert (p1.name, p2.name) == ("t2.v001.nii.gz", "t2.v002.nii.gz")
    c = project.case("t2")
    assert c.status == "corrected" and c.latest == p2
    assert project.next_case().name == "t1w"
    with pytest.raises(WorklistError, match="no corrected"):
        Worklist.create(tmp_path / "empty", [case.image]).export_dataset(tmp_path / "ds0")
    ds = project.export_dataset(tmp_path / "ds", class_names={0: "background", 1: "cord"})
    found = list_cases(ds)
    assert [(n, len(imgs)) for n, imgs, _ in found] == [("t2", 1)]
    loaded = load_case(*found[0])
    assert loaded.label.shape == np.asarray(pred.data).shape
    assert json.loads((ds / "dataset.json").read_text())["labels"] == {"background": 0, "cord": 1}
