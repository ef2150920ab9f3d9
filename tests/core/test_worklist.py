"""Worklist project folder: cases, status, corrected versions, export for fine-tuning."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import napari_medseg
from napari_medseg.core.correct.worklist import StatusNotSavedError, Worklist, WorklistError
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


_UPDATER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from napari_medseg.core.correct.worklist import Worklist
    folder, worker, go = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    wl = Worklist(folder)
    while not go.exists():  # start together
        time.sleep(0.005)
    for i in range(30):
        wl.set_status(f"c{worker}_{i:02d}", "corrected" if i % 2 else "approved", note=str(i))
    print("done", flush=True)
    """
)


def test_concurrent_status_updates_lose_nothing(tmp_path):
    """4 processes x 30 status updates of one worklist at once: all 120 are kept."""
    root = tmp_path / "proj"
    (root / "images").mkdir(parents=True)
    for w in range(4):
        for i in range(30):  # cases are listed by name; status.json is what is tested here
            (root / "images" / f"c{w}_{i:02d}.nii.gz").write_bytes(b"")
    wl = Worklist(root)
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(Path(napari_medseg.__file__).parents[1])}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _UPDATER, str(root), str(w), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for w in range(4)
    ]
    time.sleep(1.0)  # let them import
    go.touch()
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0 and out.strip() == "done", err[-2000:]
    status = json.loads(wl.status_path.read_text())["cases"]
    assert len(status) == 120, f"{120 - len(status)} of 120 updates were lost"
    for w in range(4):
        for i in range(30):
            entry = status[f"c{w}_{i:02d}"]
            assert entry["note"] == str(i)
            assert entry["status"] == ("corrected" if i % 2 else "approved")
    assert wl.summary() == {"to do": 0, "corrected": 60, "approved": 60}


def test_mask_saved_but_status_not_says_so(project):
    """A status write that fails after the mask is written reports the saved file."""
    case = project.case("t2")
    (pred,) = read_image(case.prediction)
    pred.modality = "label"
    pred.data = np.asarray(pred.data).astype(np.uint8)
    project.lock_path.mkdir()  # the status cannot be locked, hence not written
    with pytest.raises(StatusNotSavedError, match=r"saved t2\.v001\.nii\.gz, but") as err:
        project.save_corrected("t2", pred)
    assert err.value.path == project.folder / "corrected" / "t2.v001.nii.gz"
    assert err.value.path.is_file()
    assert project.case("t2").status == "to do"
    project.lock_path.rmdir()
    project.set_status("t2", "approved")
    project.save_corrected("t2", pred)  # an approved case stays approved
    assert project.case("t2").status == "approved"
