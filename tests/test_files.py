"""The one atomic writer (napari_medseg._files): umask, no leftovers on any exit, folder swaps."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest

from napari_medseg._files import (
    atomic_dir,
    atomic_path,
    is_temp_name,
    provenance_path,
    temp_sibling,
    write_bytes,
    write_text,
)


@pytest.fixture
def umask():
    """Set the process umask for a test and restore it afterwards."""
    old = os.umask(0o022)
    os.umask(old)

    def set_(mask: int) -> None:
        os.umask(mask)

    yield set_
    os.umask(old)


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def _temps(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if is_temp_name(p.name)]


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
@pytest.mark.parametrize("mask, mode", [(0o002, 0o664), (0o022, 0o644), (0o077, 0o600)])
def test_written_files_take_their_mode_from_the_umask(tmp_path, umask, mask, mode):
    """mkstemp gave 0600 whatever the umask: a shared worklist's status was unreadable."""
    umask(mask)
    assert _mode(write_text(tmp_path / "status.json", "{}\n")) == mode
    with atomic_path(tmp_path / "scan.nii.gz") as tmp:
        tmp.write_bytes(b"x")
    assert _mode(tmp_path / "scan.nii.gz") == mode
    with atomic_dir(tmp_path / "res.zarr") as d:
        (d / "zarr.json").write_text("{}")
    assert _mode(tmp_path / "res.zarr") == mode | (0o111 & ~mask)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_volumes_and_model_weights_follow_the_umask(tmp_path, umask):
    """Weights were forced to 0644 and volumes to 0600; both now follow the user's umask."""
    import torch

    from napari_medseg.io.volume import write_volume
    from napari_medseg.models.networks import save_weights

    umask(0o077)  # a private user: nothing readable by others
    save_weights(torch.nn.Linear(2, 2), tmp_path / "weights.safetensors")
    assert _mode(tmp_path / "weights.safetensors") == 0o600
    umask(0o002)  # a shared group folder
    write_volume(tmp_path / "m.nii.gz", np.zeros((4, 5, 6), np.uint8), np.eye(4), is_label=True)
    assert _mode(tmp_path / "m.nii.gz") == 0o664


@pytest.mark.parametrize("exc", [KeyboardInterrupt, SystemExit, OSError])
def test_interrupted_writes_leave_the_old_file_and_no_temporary(tmp_path, exc):
    target = tmp_path / "mask.nii.gz"
    target.write_bytes(b"the saved mask")
    with pytest.raises(exc), atomic_path(target) as tmp:
        tmp.write_bytes(b"half a mask")
        raise exc()
    assert target.read_bytes() == b"the saved mask"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.nii.gz"]


def test_ctrl_c_inside_a_volume_writer_leaves_no_hidden_file(tmp_path, monkeypatch):
    """Ctrl-C during nibabel's write left ``.x.tmp.nii.gz`` files (only Exception was caught)."""
    import nibabel as nib

    from napari_medseg.io.volume import write_volume

    def interrupted(img, filename):
        Path(filename).write_bytes(b"\x1f\x8b partial gzip")
        raise KeyboardInterrupt

    monkeypatch.setattr(nib, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_volume(tmp_path / "x.nii.gz", np.zeros((3, 3, 3), np.uint8), np.eye(4))
    assert list(tmp_path.iterdir()) == []


def test_folder_swap_keeps_the_old_folder_until_the_new_one_is_complete(tmp_path):
    res = tmp_path / "res.zarr"
    res.mkdir()
    (res / "old.txt").write_text("previous result")
    with pytest.raises(RuntimeError), atomic_dir(res, overwrite=True) as d:
        (d / "new.txt").write_text("half")
        raise RuntimeError("the run failed")
    assert [p.name for p in res.iterdir()] == ["old.txt"] and _temps(tmp_path) == []
    with pytest.raises(FileExistsError), atomic_dir(res) as d:  # no overwrite
        (d / "new.txt").write_text("complete")
    assert [p.name for p in res.iterdir()] == ["old.txt"] and _temps(tmp_path) == []
    with atomic_dir(res, overwrite=True) as d:
        (d / "new.txt").write_text("complete")
    assert [p.name for p in res.iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["res.zarr"]


def test_temporary_names_are_unique_hidden_and_keep_the_extension(tmp_path):
    """Two fixed names ('.tmp_x', 'x.tmp') collided when two runs wrote the same file."""
    a, b = temp_sibling(tmp_path / "s.nii.gz"), temp_sibling(tmp_path / "s.nii.gz")
    assert a != b and a.name.startswith(".s.") and a.name.endswith(".tmp.nii.gz")
    assert is_temp_name(a.name) and not is_temp_name("s.nii.gz")
    assert not is_temp_name(".s.nii.gz")
    write_bytes(tmp_path / "s.nii.gz", b"1")
    assert (tmp_path / "s.nii.gz").read_bytes() == b"1"


def test_provenance_sidecars_are_keyed_by_the_whole_output_name():
    """``-o s2.nrrd`` beside ``s2.nii.gz`` clobbered ``s2.provenance.json``."""
    assert provenance_path(Path("o/s2.nii.gz")) != provenance_path(Path("o/s2.nrrd"))
    assert provenance_path(Path("o/s2.nii.gz")) == Path("o/s2.nii.gz.provenance.json")
    assert provenance_path(Path("o/res.zarr")) == Path("o/res.zarr.provenance.json")
