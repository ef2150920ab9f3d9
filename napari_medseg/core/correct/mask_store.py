"""Saving corrected masks safely: numbered versions with provenance, and crash recovery.

Versions
--------
:func:`save_mask_version` writes ``<name>.v001.nii.gz``, ``<name>.v002.nii.gz``, ... beside a
``<name>.v00N.provenance.json``. A save never replaces an existing file: the mask is written to a
temporary file in the destination folder (atomically, by :func:`napari_medseg.io.write_image`)
and then *hard-linked* to the first free version name, which fails instead of overwriting when
another save took that name first. A save that fails at any point leaves every earlier file as
it was and no partial file behind.

Recovery
--------
:class:`Autosaver` keeps the latest unsaved labels of one Labels layer drawn on one image in
``<user data dir>/recovery/<image name>-<hash of its path>/<layer name>-<hash>.autosave.npz``
(``$MEDSEG_RECOVERY_DIR`` overrides the root; labels saved without a layer name use
``autosave.npz`` in that folder). Recovery is keyed per layer: two edited layers of one image
have two autosaves, and saving one never removes the other's. Each autosave replaces the
previous one of the same layer atomically (temporary file, fsync, rename), so a crash (even
``kill -9``) at any moment leaves the last completed autosave readable: at most one autosave
interval of editing is lost. :func:`find_recoveries` lists an image's autosaves,
:func:`find_recovery` reads one back and :func:`clear_recovery` removes one once its mask is
saved (and flushed to disk: :func:`save_mask_version` fsyncs the mask and its folder first).
"""

from __future__ import annotations

import datetime as _dt
import getpass
import hashlib
import io
import json
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_medseg._files import fsync_dir, is_temp_name, split_ext, temp_sibling, write_bytes
from napari_medseg.errors import ImageWriteError

__all__ = [
    "Autosaver",
    "Recovery",
    "build_provenance",
    "clear_recovery",
    "correction_stats",
    "find_recoveries",
    "find_recovery",
    "list_versions",
    "recovery_dir",
    "recovery_path",
    "recovery_root",
    "save_mask_version",
    "sha256_of",
    "software_versions",
    "user_name",
]

MASK_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha", ".tif", ".png")
_VERSION_RE = re.compile(r"^(?P<name>.+)\.v(?P<n>\d{3,})(?P<ext>\.[A-Za-z0-9.]+)$")


# --------------------------------------------------------------------------- hashing, versions


def sha256_of(path: str | os.PathLike | None, chunk: int = 1 << 20) -> str | None:
    """SHA-256 of a file, or of a folder (DICOM series: relative names and contents, sorted).

    Returns None when ``path`` is None or does not exist.
    """
    if path is None:
        return None
    p = Path(path)
    if not p.exists():
        return None
    h = hashlib.sha256()
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    for f in files:
        if p.is_dir():
            h.update(str(f.relative_to(p)).encode() + b"\0")
        with open(f, "rb") as fh:
            while block := fh.read(chunk):
                h.update(block)
    return h.hexdigest()


def software_versions() -> dict[str, str]:
    """Versions of the libraries behind a result, for provenance (package metadata, no imports).

    One helper for every provenance record (saved masks, segmentation, slides, detections).
    """
    from importlib import metadata

    out: dict[str, str] = {}
    for dist in (
        "napari-medseg",
        "napari",
        "numpy",
        "scipy",
        "scikit-image",
        "nibabel",
        "SimpleITK",
        "torch",
        "monai",
    ):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    if "napari-medseg" not in out:
        from napari_medseg import __version__

        out["napari-medseg"] = __version__
    import platform

    out["python"] = platform.python_version()
    return out


def _target(dest: str | os.PathLike, name: str | None, ext: str | None) -> tuple[Path, str, str]:
    """(folder, base name, extension) from a folder or a file path."""
    d = Path(dest)
    base, e = split_ext(d.name)
    if d.is_dir() or e not in MASK_EXTENSIONS:
        folder, base, e = d, name or "mask", ext or ".nii.gz"
    else:
        folder = d.parent
        e = ext or e
    m = _VERSION_RE.match(base + e)
    if m:  # "liver.v003.nii.gz" given as destination: continue that series
        base = m.group("name")
    if not e.startswith("."):
        e = "." + e
    return folder, base, e


def list_versions(dest: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Saved versions of a mask series, oldest first.

    Parameters
    ----------
    dest : path-like
        The folder, or a file path whose name gives the series (``liver.nii.gz``).
    name : str, optional
        Series name when ``dest`` is a folder.
    """
    folder, base, _ = _target(dest, name, None)
    if not folder.is_dir():
        return []
    found = []
    for f in folder.iterdir():
        m = _VERSION_RE.match(f.name)
        if m and m.group("name") == base and not f.name.endswith(".provenance.json"):
            found.append((int(m.group("n")), f))
    return [f for _, f in sorted(found)]


def _version_of(path: Path) -> int:
    m = _VERSION_RE.match(path.name)
    return int(m.group("n")) if m else 0


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    write_bytes(path, data)  # the package's one atomic writer (umask, fsync, cleanup)


def _claim(tmp: Path, final: Path) -> bool:
    """Give ``tmp`` the name ``final`` unless ``final`` exists (never overwrites)."""
    try:
        os.link(tmp, final)
        return True
    except FileExistsError:
        return False
    except OSError:  # no hard links here (some network or FAT file systems)
        try:
            fd = os.open(final, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        os.close(fd)
        os.replace(tmp, final)
        return True


def save_mask_version(
    labels_record: Any,
    dest: str | os.PathLike,
    provenance: Mapping[str, Any] | None = None,
    *,
    name: str | None = None,
    ext: str | None = None,
) -> Path:
    """Save a mask as the next numbered version, with a provenance JSON beside it.

    Parameters
    ----------
    labels_record : ImageRecord
        The labels in the source file's axis order with its affine (``modality="label"``).
    dest : path-like
        A folder (the series is named after ``name`` or the record's name) or a file path
        such as ``out/liver.nii.gz`` (series ``liver``, format from the extension).
    provenance : dict, optional
        What to store in ``<name>.vNNN.provenance.json`` (see :func:`build_provenance`). The
        saved file's name, version, sha256 and the previous version are added.
    name, ext : str, optional
        Series name and extension (``".nii.gz"`` by default; ``.nrrd``, ``.mha``; ``.tif``/``.png``
        for 2D masks).

    Returns
    -------
    pathlib.Path
        The mask file written, e.g. ``out/liver.v003.nii.gz``.

    Raises
    ------
    ImageWriteError
        When the folder is missing or not writable, or writing fails; earlier versions are
        untouched.
    """
    from napari_medseg.io import write_image

    folder, base, e = _target(dest, name or getattr(labels_record, "name", None), ext)
    if not folder.is_dir():
        raise ImageWriteError(f"cannot save the mask: folder {folder} does not exist.")
    tmp = temp_sibling(folder / f"{base}{e}")  # mode from the umask, not 0600
    try:
        try:
            write_image(tmp, labels_record, is_label=True, overwrite=True)
        except ImageWriteError:
            raise
        except Exception as err:  # noqa: BLE001 - one sentence for a person
            raise ImageWriteError(f"could not save the mask in {folder}: {err}") from err
        _fsync_file(tmp)  # the data is on disk before any autosave of it may be deleted
        digest = sha256_of(tmp)
        existing = list_versions(folder, base)
        n = (_version_of(existing[-1]) if existing else 0) + 1
        while True:
            final = folder / f"{base}.v{n:03d}{e}"
            if _claim(tmp, final):
                break
            n += 1
    finally:
        tmp.unlink(missing_ok=True)
    prov = dict(provenance or {})
    prov["mask"] = {
        **dict(prov.get("mask") or {}),
        "file": final.name,
        "version": n,
        "sha256": digest,
        "shape": [int(s) for s in np.shape(labels_record.data)],
        "spacing": list(getattr(labels_record, "spacing", ())),
    }
    prev = [p for p in list_versions(folder, base) if _version_of(p) < n]
    prov["previous_version"] = prev[-1].name if prev else None
    prov.setdefault("saved_at", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    try:
        _atomic_write_bytes(
            folder / f"{base}.v{n:03d}.provenance.json",
            json.dumps(_jsonable(prov), indent=2).encode(),
        )
    except OSError as err:
        fsync_dir(folder)
        raise ImageWriteError(
            f"saved {final.name} but could not write its provenance file: {err}"
        ) from err
    fsync_dir(folder)  # the new names (mask and provenance) survive a crash too
    return final


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


# --------------------------------------------------------------------------- provenance


def correction_stats(
    prediction: np.ndarray | None,
    corrected: np.ndarray,
    spacing: Sequence[float] | None = None,
    class_names: Mapping[int, str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Per-class change between the model's prediction and the corrected mask.

    Parameters
    ----------
    prediction, corrected : numpy.ndarray
        Label maps on the same grid (any axis order, the same for both). Without a
        prediction only the corrected counts are given.
    spacing : sequence of float, optional
        Voxel size in mm along the same axes (for volumes in mm^3).
    class_names : dict, optional

    Returns
    -------
    dict
        ``{class id (str): {"name", "voxels", "mm3", "prediction_voxels", "added", "removed",
        "dice"}}`` for every non-zero class in either map; ``dice`` is
        ``2|P∩C| / (|P| + |C|)`` (1.0 when both are empty).
    """
    from napari_medseg.core.correct.edits import class_counts

    corr = np.asarray(corrected)
    vox = float(np.prod(np.asarray(spacing, float)[-corr.ndim :])) if spacing is not None else None
    cc = class_counts(corr)
    out: dict[str, dict[str, Any]] = {}
    if prediction is None:
        for c, n in enumerate(cc):
            if c and n:
                out[str(c)] = {
                    "name": (class_names or {}).get(c),
                    "voxels": int(n),
                    "mm3": n * vox if vox else None,
                }
        return out
    pred = np.asarray(prediction)
    if pred.shape != corr.shape:
        raise ValueError(f"prediction {pred.shape} and mask {corr.shape} differ in shape")
    pc = class_counts(pred)
    diff = pred != corr
    n = max(pc.size, cc.size)
    added = np.bincount(corr[diff].astype(np.int64), minlength=n)
    removed = np.bincount(pred[diff].astype(np.int64), minlength=n)
    pc = np.pad(pc, (0, n - pc.size))
    cc = np.pad(cc, (0, n - cc.size))
    for c in range(1, n):
        if not (pc[c] or cc[c]):
            continue
        inter = pc[c] - removed[c]
        out[str(c)] = {
            "name": (class_names or {}).get(c),
            "voxels": int(cc[c]),
            "mm3": float(cc[c] * vox) if vox else None,
            "prediction_voxels": int(pc[c]),
            "added": int(added[c]),
            "removed": int(removed[c]),
            "dice": float(2 * inter / (pc[c] + cc[c])),
        }
    return out


def build_provenance(
    *,
    source_path: str | os.PathLike | None,
    corrected: np.ndarray,
    prediction: np.ndarray | None = None,
    segmentation: Mapping[str, Any] | None = None,
    spacing: Sequence[float] | None = None,
    class_names: Mapping[int, str] | None = None,
    editing_seconds: float | None = None,
    tools: Sequence[str] | None = None,
    parameters: Mapping[str, Any] | None = None,
    hash_source: bool = True,
) -> dict[str, Any]:
    """The provenance record of a corrected mask.

    Parameters
    ----------
    source_path : path-like or None
        The image the mask was drawn on (hashed with SHA-256 when ``hash_source``).
    corrected : numpy.ndarray
        The mask being saved.
    prediction : numpy.ndarray, optional
        The model's output before correction (same grid and axis order).
    segmentation : dict, optional
        The provenance of the model run (``SegmentationResult.provenance``): model name,
        version, weights sha256, parameters.
    spacing : sequence of float, optional
        Voxel size in mm along the axes of ``corrected``.
    class_names : dict, optional
    editing_seconds : float, optional
        Time the user spent editing this mask.
    tools : sequence of str, optional
        Correction tools used, in order.
    parameters : dict, optional
        Anything else worth keeping (tool settings).
    """
    seg = dict(segmentation or {})
    return {
        "format": "napari-medseg corrected mask provenance",
        "format_version": 1,
        "source_image": {
            "path": str(source_path) if source_path else None,
            "sha256": sha256_of(source_path) if hash_source else None,
        },
        "model": seg.get("model"),
        "segmentation_parameters": seg.get("parameters"),
        "segmentation": {k: v for k, v in seg.items() if k not in ("model", "parameters")},
        "parameters": dict(parameters or {}),
        "editing": {
            "seconds": None if editing_seconds is None else round(float(editing_seconds), 1),
            "tools": list(tools or []),
        },
        "classes": correction_stats(prediction, corrected, spacing, class_names),
        "compared_to": "model prediction" if prediction is not None else None,
        "software": software_versions(),
        "user": user_name(),
        "saved_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def user_name() -> str | None:
    """The login name of the person saving (None where the system has none)."""
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in some containers
        return None


# --------------------------------------------------------------------------- autosave / recovery


def recovery_root() -> Path:
    """Root folder of autosaves: ``$MEDSEG_RECOVERY_DIR`` or ``<user data dir>/recovery``."""
    env = os.environ.get("MEDSEG_RECOVERY_DIR")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("napari-medseg")) / "recovery"


def _key(source: str | os.PathLike) -> str:
    s = str(source)
    if "://" not in s and not s.startswith("unsaved:"):
        s = os.path.realpath(s)
    return hashlib.sha256(s.encode()).hexdigest()[:16]


def recovery_dir(source: str | os.PathLike, root: str | os.PathLike | None = None) -> Path:
    """Folder holding the autosaves of the image at ``source`` (a path, or any stable key)."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(str(source)).name)[:40] or "image"
    base = Path(root) if root is not None else recovery_root()
    return base / f"{stem}-{_key(source)}"


AUTOSAVE_FILE = "autosave.npz"
LAYER_SUFFIX = ".autosave.npz"


def recovery_path(
    source: str | os.PathLike, layer: str | None = None, root: str | os.PathLike | None = None
) -> Path:
    """The autosave file of Labels layer ``layer`` drawn on the image at ``source``.

    Parameters
    ----------
    source : path-like or str
        The image's path (or a stable key such as ``"unsaved:name"``).
    layer : str, optional
        The Labels layer's name. None: the one slot for labels without a layer name
        (``autosave.npz``).
    root : path-like, optional
        The recovery root (default :func:`recovery_root`).
    """
    folder = recovery_dir(source, root)
    if layer is None:
        return folder / AUTOSAVE_FILE
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", layer).strip("._")[:40] or "labels"
    digest = hashlib.sha256(layer.encode()).hexdigest()[:12]
    return folder / f"{safe}-{digest}{LAYER_SUFFIX}"


@dataclass
class Recovery:
    """An autosave read back by :func:`find_recovery`.

    Attributes
    ----------
    labels : numpy.ndarray
        The full label map as it was autosaved (same axis order as given to
        :meth:`Autosaver.save`).
    meta : dict
        What the autosave stored (source, layer name, affine, edit count, ...).
    path : pathlib.Path
        The autosave file.
    saved_at : float
        Unix time of the autosave.
    """

    labels: np.ndarray
    meta: dict
    path: Path
    saved_at: float

    @property
    def layer(self) -> str | None:
        """Name of the Labels layer that was autosaved (None when it had none)."""
        name = self.meta.get("layer")
        return str(name) if name else None


class Autosaver:
    """Atomic autosaves of one Labels layer's unsaved labels (see module docstring).

    Parameters
    ----------
    source : path-like or str
        Path of the image the labels belong to (or a stable key such as ``"unsaved:name"``).
    layer : str, optional
        Name of the Labels layer: each layer of an image has its own autosave.
    root : path-like, optional
        The recovery root (default :func:`recovery_root`).
    """

    def __init__(
        self,
        source: str | os.PathLike,
        layer: str | None = None,
        root: str | os.PathLike | None = None,
    ) -> None:
        self.source = str(source)
        self.layer = layer
        self.root = Path(root) if root is not None else None
        self.dir = recovery_dir(source, root)
        self.last_saved: float | None = None

    @property
    def path(self) -> Path:
        return recovery_path(self.source, self.layer, self.root)

    def save(self, labels: Any, meta: Mapping[str, Any] | None = None) -> Path:
        """Write ``labels`` (only the bounding box of non-zero voxels is stored) atomically."""
        arr = np.asarray(labels)
        self.dir.mkdir(parents=True, exist_ok=True)
        nz = arr != 0
        from napari_medseg.core.correct.edits import bounding_box

        box = bounding_box(nz) or tuple(slice(0, 0) for _ in arr.shape)
        now = time.time()
        info = {**dict(meta or {}), "source": self.source, "saved_at": now}
        if self.layer is not None:
            info["layer"] = self.layer
        buf = io.BytesIO()
        np.savez(
            buf,
            crop=np.ascontiguousarray(arr[box]),
            offset=np.array([s.start for s in box], np.int64),
            shape=np.array(arr.shape, np.int64),
            meta=np.frombuffer(json.dumps(_jsonable(info)).encode(), dtype=np.uint8),
        )
        _atomic_write_bytes(self.path, buf.getvalue())
        fsync_dir(self.dir)
        self.last_saved = now
        return self.path

    def clear(self) -> None:
        """Remove this layer's autosave (after its mask was saved for good)."""
        clear_recovery(self.source, self.layer, root=self.root)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _read_recovery(path: Path) -> Recovery | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            shape = tuple(int(s) for s in z["shape"])
            crop = z["crop"]
            offset = [int(o) for o in z["offset"]]
            meta = json.loads(bytes(z["meta"]).decode())
        labels = np.zeros(shape, dtype=crop.dtype)
        labels[tuple(slice(o, o + n) for o, n in zip(offset, crop.shape))] = crop
        saved_at = float(meta.get("saved_at", path.stat().st_mtime))
    except Exception:  # noqa: BLE001 - a damaged autosave is no autosave
        return None
    return Recovery(labels, meta, path, saved_at)


def find_recovery(
    source: str | os.PathLike,
    layer: str | None = None,
    root: str | os.PathLike | None = None,
) -> Recovery | None:
    """The autosave of layer ``layer`` of the image at ``source``, or None (also when unreadable).

    ``layer=None`` reads the slot of labels saved without a layer name; use
    :func:`find_recoveries` for every layer's autosave.
    """
    path = recovery_path(source, layer, root)
    if not path.is_file():
        return None
    return _read_recovery(path)


def find_recoveries(
    source: str | os.PathLike, root: str | os.PathLike | None = None
) -> list[Recovery]:
    """Every readable autosave of the image at ``source`` (one per layer), oldest first."""
    folder = recovery_dir(source, root)
    if not folder.is_dir():
        return []
    found = []
    for f in sorted(folder.glob("*.npz")):
        if f.name.startswith(".") or not f.is_file():
            continue
        rec = _read_recovery(f)
        if rec is not None:
            found.append(rec)
    return sorted(found, key=lambda r: r.saved_at)


def clear_recovery(
    source: str | os.PathLike,
    layer: str | None = None,
    root: str | os.PathLike | None = None,
) -> None:
    """Delete the autosave of layer ``layer`` of ``source`` (nothing happens when there is none).

    Other layers' autosaves of the same image are kept.
    """
    path = recovery_path(source, layer, root)
    path.unlink(missing_ok=True)
    for f in path.parent.glob(f".{split_ext(path)[0]}.*"):  # left by a crash mid-autosave
        if is_temp_name(f.name):  # napari_medseg._files temporary names
            f.unlink(missing_ok=True)
    try:
        path.parent.rmdir()  # only when no other layer's autosave is left
    except OSError:
        pass
