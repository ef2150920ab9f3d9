"""Versioned mask saving with provenance, and autosave recovery that survives kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from napari_medseg.core.correct import mask_store as M
from napari_medseg.io import ImageWriteError, read_image
from napari_medseg.io.record import ImageRecord
from tests.conftest import data_path

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def spleen():
    img_path = data_path("ct/spleen/image.nii.gz")
    (lab,) = read_image(data_path("ct/spleen/label.nii.gz"))
    rec = ImageRecord(
        data=np.asarray(lab.data).astype(np.uint8),
        affine=lab.affine,
        modality="label",
        name="spleen_mask",
        metadata=lab.metadata,
    )
    return img_path, rec


def test_versions_never_overwrite_and_carry_provenance(spleen, tmp_path):
    img_path, rec = spleen
    pred = rec.data.copy()
    corrected = pred.copy()
    corrected[80:90, 80:90, 10] = 1  # added
    corrected[pred.nonzero()[0][:100], pred.nonzero()[1][:100], pred.nonzero()[2][:100]] = 0
    seg_prov = {
        "model": {"name": "ct_spleen_3d", "weights_sha256": "ab" * 32},
        "parameters": {"overlap": 0.5},
    }
    prov = M.build_provenance(
        source_path=img_path,
        corrected=corrected,
        prediction=pred,
        segmentation=seg_prov,
        spacing=rec.spacing,
        class_names={1: "spleen"},
        editing_seconds=12.34,
        tools=["keep largest"],
    )
    p1 = M.save_mask_version(rec, tmp_path, prov)
    assert p1.name == "spleen_mask.v001.nii.gz"
    bytes1 = p1.read_bytes()
    rec2 = ImageRecord(data=corrected, affine=rec.affine, modality="label", name="spleen_mask")
    p2 = M.save_mask_version(rec2, tmp_path / "spleen_mask.nii.gz", prov)
    assert p2.name == "spleen_mask.v002.nii.gz"
    assert p1.read_bytes() == bytes1  # history kept
    assert M.list_versions(tmp_path, "spleen_mask") == [p1, p2]
    # the saved mask lies on the scan's grid and holds the corrected labels
    (back,) = read_image(p2)
    np.testing.assert_allclose(back.affine, rec.affine, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(back.data), corrected)
    info = json.loads((tmp_path / "spleen_mask.v002.provenance.json").read_text())
    assert info["previous_version"] == "spleen_mask.v001.nii.gz"
    assert info["mask"]["version"] == 2 and len(info["mask"]["sha256"]) == 64
    assert info["source_image"]["sha256"] == M.sha256_of(img_path)
    assert info["model"]["weights_sha256"] == "ab" * 32
    assert info["editing"]["seconds"] == 12.3
    c = info["classes"]["1"]
    assert c["added"] == 100 - int(pred[80:90, 80:90, 10].sum()) and c["removed"] == 100
    n_pred = int(pred.sum())
    assert c["dice"] == pytest.approx(2 * (n_pred - 100) / (n_pred + c["voxels"]))
    assert info["user"] and "numpy" in info["software"]
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".")]  # no temp files left


def test_failed_save_leaves_previous_versions_intact(spleen, tmp_path, monkeypatch):
    _, rec = spleen
    p1 = M.save_mask_version(rec, tmp_path)
    before = {f.name: f.read_bytes() for f in tmp_path.iterdir()}

    import napari_medseg.io.volume as vol

    def broken(path, *a, **k):
        Path(path).write_bytes(b"half a file")
        raise OSError("No space left on device")

    monkeypatch.setattr(vol, "_write_nifti", broken)
    with pytest.raises(ImageWriteError, match="No space left"):
        M.save_mask_version(rec, tmp_path)
    assert {f.name: f.read_bytes() for f in tmp_path.iterdir()} == before
    assert M.list_versions(tmp_path, "spleen_mask") == [p1]
    with pytest.raises(ImageWriteError, match="does not exist"):
        M.save_mask_version(rec, tmp_path / "missing" / "x.nii.gz")


def test_autosave_roundtrip_and_clear(tmp_path):
    src = tmp_path / "scan.nii.gz"
    a = M.Autosaver(src, root=tmp_path / "rec")
    assert M.find_recovery(src, root=tmp_path / "rec") is None
    lab = np.zeros((33, 34, 35), np.uint8)
    lab[5:9, 10:20, 30:35] = 2
    a.save(lab, {"layer": "scan_seg", "edits": 3})
    r = M.find_recovery(src, root=tmp_path / "rec")
    assert r is not None and r.meta["edits"] == 3 and r.meta["layer"] == "scan_seg"
    np.testing.assert_array_equal(r.labels, lab)
    assert r.path.stat().st_size < 2000  # only the non-zero box is stored
    # another image has its own recovery slot
    assert M.find_recovery(tmp_path / "other.nii.gz", root=tmp_path / "rec") is None
    a.clear()
    assert M.find_recovery(src, root=tmp_path / "rec") is None


def test_recovery_is_per_layer(tmp_path):
    """Two edited layers of one image: B's autosave never replaces A's, clearing B keeps A."""
    src, root = tmp_path / "scan.nii.gz", tmp_path / "rec"
    a_lab = np.zeros((33, 34, 35), np.uint8)
    a_lab[1:4, 2:6, 3:9] = 1
    b_lab = np.zeros((33, 34, 35), np.uint16)
    b_lab[20:30, 5:7, 0:2] = 300
    M.Autosaver(src, "scan_seg", root=root).save(a_lab, {"edits": 1})
    M.Autosaver(src, "scan_seg [1]", root=root).save(b_lab, {"edits": 2})
    a = M.find_recovery(src, "scan_seg", root=root)
    b = M.find_recovery(src, "scan_seg [1]", root=root)
    assert a is not None and b is not None and a.path != b.path
    np.testing.assert_array_equal(a.labels, a_lab)
    np.testing.assert_array_equal(b.labels, b_lab)
    assert (a.layer, b.layer) == ("scan_seg", "scan_seg [1]")
    assert [r.layer for r in M.find_recoveries(src, root=root)] == ["scan_seg", "scan_seg [1]"]
    M.clear_recovery(src, "scan_seg [1]", root=root)  # B saved for good
    assert M.find_recovery(src, "scan_seg [1]", root=root) is None
    kept = M.find_recovery(src, "scan_seg", root=root)
    assert kept is not None
    np.testing.assert_array_equal(kept.labels, a_lab)
    assert [r.layer for r in M.find_recoveries(src, root=root)] == ["scan_seg"]
    # odd layer names (slashes, dots, unicode) stay inside the image's recovery folder
    odd = M.Autosaver(src, "../../évil/name", root=root).save(a_lab)
    assert odd.parent == M.recovery_dir(src, root) and odd.name.endswith(".autosave.npz")


def test_saved_mask_and_folder_are_fsynced(spleen, tmp_path, monkeypatch):
    """The mask's bytes and its directory entry reach the disk before save returns."""
    _, rec = spleen
    synced = []
    real_fsync = os.fsync

    def spy(fd):
        synced.append(os.fstat(fd).st_ino)
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    path = M.save_mask_version(rec, tmp_path)
    assert path.stat().st_ino in synced  # the mask file itself (hard link of the temp file)
    assert tmp_path.stat().st_ino in synced  # and the folder that now names it
    prov = path.with_name("spleen_mask.v001.provenance.json")
    assert prov.stat().st_ino in synced
    assert synced.index(path.stat().st_ino) < len(synced) - 1  # before the final folder sync


_CHILD = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from napari_medseg.core.correct.mask_store import Autosaver
    src, root, interval = sys.argv[1], sys.argv[2], float(sys.argv[3])
    saver = Autosaver(src, root=root)
    lab = np.zeros((64, 128, 128), np.uint8)
    edits, last = 0, time.time()
    while True:
        # one "brush stroke" every 10 ms: voxel row `edits` becomes label 1
        lab.reshape(-1, 128)[edits] = 1 + edits % 3
        edits += 1
        time.sleep(0.01)
        if time.time() - last >= interval:
            saver.save(lab, {"edits": edits})
            last = time.time()
            print(f"saved {edits} {last:.3f}", flush=True)
    """
)


@pytest.mark.parametrize("delay", [0.0, 0.23])
def test_kill_9_mid_edit_loses_at_most_one_interval(tmp_path, delay):
    interval = 0.5
    src, root = str(tmp_path / "scan.nii.gz"), str(tmp_path / "recovery")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, src, root, str(interval)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    seen = []
    try:
        while len(seen) < 3:
            line = proc.stdout.readline()
            assert line, "the autosaving process died"
            seen.append(line.split())
        time.sleep(delay)
        killed_at = time.time()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    r = M.find_recovery(src, root=root)
    assert r is not None
    edits = int(r.meta["edits"])
    assert edits >= int(seen[-1][1])  # at least the last autosave we saw completing
    # the file holds exactly the state of that autosave (no torn write)
    expect = np.zeros((64, 128, 128), np.uint8)
    rows = expect.reshape(-1, 128)
    for e in range(edits):
        rows[e] = 1 + e % 3
    np.testing.assert_array_equal(r.labels, expect)
    # and what is lost is at most one interval of work (+ slack for a busy machine)
    assert killed_at - r.saved_at <= interval + 0.5
