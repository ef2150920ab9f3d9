"""File helpers every layer may use: extension splitting (:func:`split_ext`) and atomic writes.

Atomic writes: nothing half-written, nothing left behind, the user's umask honoured.

Every file napari-medseg writes goes through :func:`atomic_path` (a writer that wants a path,
such as nibabel, SimpleITK, tifffile or safetensors), :func:`write_bytes` / :func:`write_text`
(bytes or text already in memory), or :func:`atomic_dir` (a folder: OME-Zarr results, model
folders). Each one

* writes to a unique hidden name in the destination folder
  (``.<stem>.<pid>-<random>.tmp<ext>``: the extension is kept so writers that choose the format
  from it still do; two runs writing the same file never share a temporary name),
* creates it with ``0o666`` (folders ``0o777``) so the user's umask gives the final mode, as for
  any file the user saves (``tempfile.mkstemp`` would give ``0o600``, unreadable for the other
  people of a shared worklist),
* flushes the data and the folder entry to disk (``fsync``) and renames it over the destination,
* removes the temporary on any exit that is not a success, ``KeyboardInterrupt`` included.

This module is a leaf: it imports nothing from napari-medseg.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "MULTI_EXTENSIONS",
    "TEMP_TAG",
    "atomic_dir",
    "atomic_path",
    "fsync_dir",
    "is_temp_name",
    "provenance_path",
    "split_ext",
    "temp_sibling",
    "write_bytes",
    "write_text",
]

#: Marks every temporary name (``.<stem>.<pid>-<hex>.tmp<ext>``).
TEMP_TAG = ".tmp"
_TEMP_RE = re.compile(r"^\..*\.\d+-[0-9a-f]{8}\.tmp(\.[^.]+)*$")

#: Endings of more than one dot that name one format.
MULTI_EXTENSIONS = (".nii.gz", ".ome.tiff", ".ome.tif", ".ome.zarr")


def split_ext(path: str | os.PathLike) -> tuple[str, str]:
    """Split a path's file name into ``(stem, extension)``, keeping double extensions.

    Parameters
    ----------
    path : str or path-like
        A file path or name; only its last component is used.

    Returns
    -------
    stem : str
        The file name without its extension, in its own case.
    ext : str
        The extension in lower case with its leading dot (``".nii.gz"``, ``".ome.tif"``,
        ``".png"``), or ``""`` when the name has none.

    Examples
    --------
    >>> split_ext("a/b/scan.nii.gz")
    ('scan', '.nii.gz')
    >>> split_ext("Slide.OME.TIF")
    ('Slide', '.ome.tif')
    """
    name = Path(path).name
    low = name.lower()
    for ext in MULTI_EXTENSIONS:
        if low.endswith(ext):
            return name[: -len(ext)], ext
    stem, ext = os.path.splitext(name)
    return stem, ext.lower()


def provenance_path(output: str | os.PathLike) -> Path:
    """The provenance sidecar of an output file or folder: its whole name + ``.provenance.json``.

    ``out/s2.nii.gz`` -> ``out/s2.nii.gz.provenance.json``; ``res.zarr`` ->
    ``res.zarr.provenance.json``. Keyed by the whole name, so ``s2.nii.gz`` and ``s2.nrrd`` in
    one folder keep their own sidecars.
    """
    p = Path(output)
    return p.with_name(f"{p.name.rstrip('/')}.provenance.json")


def is_temp_name(name: str) -> bool:
    """True for a name :func:`temp_sibling` makes (left over only if the process was killed)."""
    return _TEMP_RE.match(name) is not None


def temp_sibling(path: str | os.PathLike, *, folder: bool = False) -> Path:
    """Create and return a new, uniquely named temporary file (or folder) beside ``path``.

    The name is ``.<stem>.<pid>-<random>.tmp<ext>`` in ``path``'s folder; the file is created
    empty with ``O_EXCL`` and mode ``0o666`` (folders ``0o777``) less the umask, so the caller
    owns it and its final mode is the one the user's umask gives.

    Raises
    ------
    OSError
        The folder does not exist or cannot be written.
    """
    path = Path(path)
    stem, ext = split_ext(path)
    for _ in range(100):
        tmp = path.with_name(f".{stem}.{os.getpid()}-{secrets.token_hex(4)}{TEMP_TAG}{ext}")
        try:
            if folder:
                os.mkdir(tmp, 0o777)
            else:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"no free temporary name beside {path}")  # pragma: no cover


def _fsync_file(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - unreadable after writing: nothing to flush from here
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse fsync on read-only fds
        pass
    finally:
        os.close(fd)


def fsync_dir(folder: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # Windows: folders cannot be opened, renames are durable there
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, mode: int | None = None) -> Iterator[Path]:
    """Hand out a temporary path beside ``path``; rename it over ``path`` when the block succeeds.

    Parameters
    ----------
    path : path-like
        Final file. Its folder must exist.
    mode : int, optional
        Final permission bits; default ``0o666`` less the umask (the mode the writer created the
        file with).

    Yields
    ------
    pathlib.Path
        An empty file with ``path``'s extension for the writer to replace or fill.

    Notes
    -----
    On success the file is fsynced, renamed over ``path`` and the folder fsynced. On any
    exception (``KeyboardInterrupt`` and ``SystemExit`` too) the temporary is removed and the
    exception propagates; ``path`` is untouched.
    """
    path = Path(path)
    tmp = temp_sibling(path)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"the writer did not create {tmp.name}")
        if mode is not None:
            os.chmod(tmp, mode)
        _fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        _remove(tmp)
        raise


def write_bytes(path: str | os.PathLike, data: bytes, *, mode: int | None = None) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`); return ``path``."""
    path = Path(path)
    with atomic_path(path, mode=mode) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    return path


def write_text(path: str | os.PathLike, text: str, *, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (newlines as given); return ``path``."""
    return write_bytes(path, text.encode(encoding))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Hand out a temporary folder beside ``path``; put it in ``path``'s place on success.

    Parameters
    ----------
    path : path-like
        Final folder (an OME-Zarr result, a model folder). Its parent must exist.
    overwrite : bool
        Replace an existing ``path`` on success; when False and ``path`` exists at the end,
        :class:`FileExistsError` is raised and ``path`` is untouched.

    Yields
    ------
    pathlib.Path
        An empty folder (mode ``0o777`` less the umask) to fill.

    Notes
    -----
    On success every file in the folder is fsynced, an existing ``path`` is moved aside, the
    new folder renamed into place and the old one deleted; a failing or interrupted block
    removes the temporary folder and leaves ``path`` as it was.
    """
    path = Path(path)
    tmp = temp_sibling(path, folder=True)
    try:
        yield tmp
        for root, _dirs, files in os.walk(tmp):
            for f in files:
                _fsync_file(Path(root) / f)
        if path.exists() or path.is_symlink():
            if not overwrite:
                raise FileExistsError(f"{path} exists")
            old = temp_sibling(path, folder=True)
            os.rmdir(old)  # only the unique name is needed
            os.rename(path, old)
            try:
                os.rename(tmp, path)
            except BaseException:
                os.rename(old, path)
                raise
            _remove(old)
        else:
            os.rename(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        _remove(tmp)
        raise
