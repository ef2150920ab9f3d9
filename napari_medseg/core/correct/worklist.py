"""A case list (worklist): a project folder of scans to segment, correct and approve.

::

    PROJECT/
      images/        CASE.nii.gz (.nii, .nrrd, .mha, .png, .tif) or CASE/ (a DICOM folder)
      predictions/   CASE.nii.gz (or CASE_seg.nii.gz): the model's mask, on the image's grid
      corrected/     CASE.v001.nii.gz, CASE.v001.provenance.json, CASE.v002...: saved versions
      status.json    {"cases": {"CASE": {"status": "to do" | "corrected" | "approved", ...}}}

The status file is rewritten atomically on every change, as a locked read-modify-write: the
lock is ``status.json.lock`` beside it (an OS file lock, ``flock`` on POSIX and ``msvcrt.locking``
on Windows, released by the OS when a process dies), so several people or processes updating one
worklist never lose each other's changes. A case without an entry is "to do";
saving a correction with :meth:`Worklist.save_corrected` marks it "corrected"; a reviewer marks
it "approved". :meth:`Worklist.export_dataset` turns the corrected cases into an nnU-Net-layout
dataset for fine-tuning (:func:`napari_medseg.training.segment.train`).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from napari_medseg._files import write_bytes
from napari_medseg.core.correct.mask_store import (
    list_versions,
    save_mask_version,
    user_name,
)
from napari_medseg.errors import MedsegError

__all__ = ["STATUSES", "Case", "StatusNotSavedError", "Worklist", "WorklistError"]

STATUSES = ("to do", "corrected", "approved")
IMAGE_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".png", ".tif", ".tiff")
LOCK_TIMEOUT_S = 30.0


class WorklistError(MedsegError):
    """A worklist folder or case that cannot be used (one sentence for a person)."""


class StatusNotSavedError(WorklistError):
    """The corrected mask was saved, but the case's status could not be updated.

    Attributes
    ----------
    path : pathlib.Path
        The mask version that was saved.
    """

    def __init__(self, message: str, path: Path) -> None:
        super().__init__(message)
        self.path = path


@contextmanager
def file_lock(path: Path, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold an exclusive OS lock on the file ``path`` (created if missing) while in the block.

    ``flock`` on POSIX, ``msvcrt.locking`` on Windows: the OS releases it when the process
    ends, even by ``kill -9``, so a crash never leaves the worklist locked. The file is kept
    (removing it would let two processes lock two different files). Raises
    :class:`WorklistError` after ``timeout`` seconds of waiting.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # the umask decides who may share it
    except PermissionError:
        try:  # another user's lock file we may only read: flock works on it all the same
            fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise WorklistError(f"cannot lock the worklist status ({path}): {e}.") from e
    except OSError as e:
        raise WorklistError(f"cannot lock the worklist status ({path}): {e}.") from e
    try:
        deadline = time.monotonic() + timeout
        while not _try_lock(fd):
            if time.monotonic() > deadline:
                raise WorklistError(
                    f"the worklist status is locked by another program for over {timeout:.0f} s "
                    f"({path}); try again."
                )
            time.sleep(0.01)
        try:
            yield
        finally:
            _unlock(fd)
    finally:
        os.close(fd)


def _try_lock(fd: int) -> bool:
    if os.name == "nt":
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):
        return False
    return True


def _unlock(fd: int) -> None:
    if os.name == "nt":
        import msvcrt

        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        return
    import fcntl

    fcntl.flock(fd, fcntl.LOCK_UN)


def _split(name: str) -> tuple[str, str] | None:
    low = name.lower()
    for e in IMAGE_ENDINGS:
        if low.endswith(e):
            return name[: -len(e)], name[-len(e) :]
    return None


@dataclass
class Case:
    """One scan of a worklist.

    Attributes
    ----------
    name : str
        Case id (the image file name without extension).
    image : pathlib.Path
    prediction : pathlib.Path or None
    corrected : list of pathlib.Path
        Saved corrected versions, oldest first.
    status : str
        One of :data:`STATUSES`.
    info : dict
        The case's entry in ``status.json`` (who changed it and when, notes).
    """

    name: str
    image: Path
    prediction: Path | None
    corrected: list[Path] = field(default_factory=list)
    status: str = "to do"
    info: dict = field(default_factory=dict)

    @property
    def latest(self) -> Path | None:
        """The newest corrected version, else the prediction, else None."""
        return self.corrected[-1] if self.corrected else self.prediction


class Worklist:
    """A project folder of cases (see module docstring).

    Parameters
    ----------
    folder : path-like
        The project folder; it must contain ``images/``.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        if not (self.folder / "images").is_dir():
            raise WorklistError(
                f"{self.folder} is not a worklist: it needs an images/ folder "
                "(with predictions/ and corrected/ beside it)."
            )
        (self.folder / "corrected").mkdir(exist_ok=True)

    @classmethod
    def create(
        cls,
        folder: str | os.PathLike,
        images: Iterable[str | os.PathLike] = (),
        predictions: Mapping[str, str | os.PathLike] | None = None,
        link: bool = True,
    ) -> Worklist:
        """Make a project folder from image files (linked, or copied where links fail).

        ``predictions`` maps case names to mask files put into ``predictions/``.
        """
        root = Path(folder)
        for sub in ("images", "predictions", "corrected"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        for img in images:
            _place(Path(img), root / "images" / Path(img).name, link)
        for case, pred in (predictions or {}).items():
            parts = _split(Path(pred).name)
            ext = parts[1] if parts else ".nii.gz"
            _place(Path(pred), root / "predictions" / f"{case}{ext}", link)
        return cls(root)

    # ------------------------------------------------------------------ status file

    @property
    def status_path(self) -> Path:
        return self.folder / "status.json"

    @property
    def lock_path(self) -> Path:
        """The lock file of the status (``status.json.lock``)."""
        return self.folder / "status.json.lock"

    def _read_status(self) -> dict[str, dict]:
        if not self.status_path.exists():
            return {}
        try:
            data = json.loads(self.status_path.read_text())
        except (OSError, ValueError) as e:
            raise WorklistError(f"{self.status_path} is damaged ({e}).") from e
        return dict(data.get("cases") or {})

    def _write_status(self, cases: dict[str, dict]) -> None:
        body = {"format": "napari-medseg worklist", "cases": cases}
        write_bytes(self.status_path, json.dumps(body, indent=2, sort_keys=True).encode())

    # ------------------------------------------------------------------ cases

    def cases(self) -> list[Case]:
        """All cases, sorted by name."""
        status = self._read_status()
        out = []
        for p in sorted((self.folder / "images").iterdir()):
            if p.name.startswith("."):
                continue
            if p.is_dir():
                name = p.name
            else:
                parts = _split(p.name)
                if parts is None:
                    continue
                name = parts[0]
            info = dict(status.get(name) or {})
            out.append(
                Case(
                    name=name,
                    image=p,
                    prediction=self._prediction(name),
                    corrected=list_versions(self.folder / "corrected", name),
                    status=info.get("status", "to do"),
                    info=info,
                )
            )
        return out

    def _prediction(self, name: str) -> Path | None:
        pdir = self.folder / "predictions"
        if not pdir.is_dir():
            return None
        for stem in (name, f"{name}_seg"):
            for e in IMAGE_ENDINGS:
                p = pdir / f"{stem}{e}"
                if p.exists():
                    return p
        return None

    def case(self, name: str) -> Case:
        for c in self.cases():
            if c.name == name:
                return c
        raise WorklistError(f"case {name!r} is not in the worklist {self.folder.name}.")

    def next_case(
        self, after: str | None = None, statuses: Iterable[str] = ("to do",)
    ) -> Case | None:
        """The next case (after ``after``, wrapping around) whose status is in ``statuses``."""
        want = set(statuses)
        cases = self.cases()
        names = [c.name for c in cases]
        start = names.index(after) + 1 if after in names else 0
        for c in cases[start:] + cases[:start]:
            if c.status in want and c.name != after:
                return c
        return None

    def set_status(
        self,
        name: str,
        status: str,
        note: str | None = None,
        *,
        unless: Iterable[str] = (),
    ) -> bool:
        """Set a case's status (``"to do"``, ``"corrected"`` or ``"approved"``).

        The read-modify-write of ``status.json`` holds the worklist's lock, so concurrent
        updates from other processes are never lost.

        Parameters
        ----------
        name, status : str
        note : str, optional
        unless : iterable of str
            Leave the case as it is when its current status is one of these (checked under
            the lock), e.g. ``("approved",)``.

        Returns
        -------
        bool
            Whether the status was written.
        """
        if status not in STATUSES:
            raise WorklistError(f"status must be one of {', '.join(STATUSES)}, not {status!r}.")
        self.case(name)  # raises for an unknown case
        with file_lock(self.lock_path):
            cases = self._read_status()
            entry = dict(cases.get(name) or {})
            if entry.get("status", "to do") in set(unless):
                return False
            entry.update(
                status=status,
                updated=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                user=user_name(),
            )
            if note is not None:
                entry["note"] = note
            cases[name] = entry
            self._write_status(cases)
        return True

    def summary(self) -> dict[str, int]:
        """Number of cases per status."""
        out = dict.fromkeys(STATUSES, 0)
        for c in self.cases():
            out[c.status] = out.get(c.status, 0) + 1
        return out

    def save_corrected(
        self, name: str, labels_record: Any, provenance: Mapping[str, Any] | None = None
    ) -> Path:
        """Save a corrected mask as the case's next version and mark the case "corrected".

        An approved case stays approved. Raises :class:`StatusNotSavedError` (with the saved
        file as ``.path``) when the mask was saved but the status could not be written.
        """
        self.case(name)
        path = save_mask_version(labels_record, self.folder / "corrected", provenance, name=name)
        try:
            self.set_status(name, "corrected", unless=("approved",))
        except (WorklistError, OSError) as e:
            raise StatusNotSavedError(
                f"saved {path.name}, but the case status was not updated: {e}", path
            ) from e
        return path

    # ------------------------------------------------------------------ training data

    def export_dataset(
        self,
        out_dir: str | os.PathLike,
        statuses: Iterable[str] = ("corrected", "approved"),
        class_names: Mapping[int, str] | None = None,
        link: bool = True,
    ) -> Path:
        """Write an nnU-Net-layout dataset (imagesTr/labelsTr) of the corrected cases.

        Each case contributes its image (``CASE_0000``) and its newest corrected version.

        Returns
        -------
        pathlib.Path
            ``out_dir``.
        """
        want = set(statuses)
        chosen = [c for c in self.cases() if c.status in want and c.corrected]
        if not chosen:
            raise WorklistError("no corrected cases yet: save a corrected mask first.")
        out = Path(out_dir)
        (out / "imagesTr").mkdir(parents=True, exist_ok=True)
        (out / "labelsTr").mkdir(parents=True, exist_ok=True)
        for c in chosen:
            if c.image.is_dir():
                raise WorklistError(
                    f"case {c.name} is a DICOM folder; convert it to NIfTI to train on it."
                )
            parts = _split(c.image.name)
            assert parts is not None
            _place(c.image, out / "imagesTr" / f"{c.name}_0000{parts[1]}", link)
            lab = c.corrected[-1]
            lparts = _split(lab.name)
            _place(lab, out / "labelsTr" / f"{c.name}{lparts[1] if lparts else '.nii.gz'}", link)
        meta: dict[str, Any] = {
            "name": self.folder.name,
            "description": "corrected cases exported from a napari-medseg worklist",
            "numTraining": len(chosen),
            "cases": [c.name for c in chosen],
        }
        if class_names:
            meta["labels"] = {str(v): int(k) for k, v in sorted(class_names.items())}
        write_bytes(out / "dataset.json", json.dumps(meta, indent=2).encode())
        return out


def _place(src: Path, dst: Path, link: bool) -> None:
    if dst.exists() or dst.is_symlink():
        dst.unlink()
    if link:
        try:
            os.symlink(src.resolve(), dst, target_is_directory=src.is_dir())
            return
        except OSError:
            pass
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copy2(src, dst)
