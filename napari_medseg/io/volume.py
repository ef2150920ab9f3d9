"""Volumes: NIfTI (nibabel), NRRD and MetaImage (SimpleITK), read and written with exact geometry.

Reading returns an :class:`~napari_medseg.io.record.ImageRecord` in the file's own axis order
with the voxel-to-RAS affine nibabel would report. Writing is atomic: the data goes to a
temporary file in the destination folder, which is renamed over the destination only once
complete, so a failed save never damages an earlier file.
"""

from __future__ import annotations

import base64
import os
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from napari_medseg._files import atomic_path, split_ext
from napari_medseg.errors import ImageReadError, ImageWriteError
from napari_medseg.io.geometry import affine_from_itk, itk_from_affine
from napari_medseg.io.modality import guess_modality
from napari_medseg.io.record import ImageRecord

NIFTI_EXT = (".nii", ".nii.gz")
ITK_EXT = (".nrrd", ".nhdr", ".mha", ".mhd")
WRITE_EXT = (".nii.gz", ".nii", ".nrrd", ".mha")


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise ImageReadError(f"{path} does not exist.")
    if path.is_dir():
        raise ImageReadError(f"{path} is a folder, not an image file.")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except PermissionError as e:
        raise ImageReadError(f"{path.name} cannot be read: permission denied.") from e
    except OSError as e:
        raise ImageReadError(f"{path.name} cannot be read: {e.strerror or e}.") from e
    if path.stat().st_size == 0:
        raise ImageReadError(f"{path.name} is empty (0 bytes).")


def _validate(arr: np.ndarray, name: str, max_dims: int = 4) -> None:
    if arr.ndim > max_dims:
        raise ImageReadError(
            f"{name} has {arr.ndim} dimensions (shape {tuple(arr.shape)}); napari-medseg opens "
            f"2D, 3D and 4D (time or channel) images."
        )
    if arr.size == 0 or 0 in arr.shape:
        raise ImageReadError(f"{name} has a zero-sized dimension (shape {tuple(arr.shape)}).")


def warn_non_finite(arr: np.ndarray, name: str) -> int:
    """Warn (once) when an image holds NaN or infinite voxels; return how many."""
    if not np.issubdtype(arr.dtype, np.floating):
        return 0
    n_bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
    if n_bad:
        warnings.warn(
            f"{name} contains {n_bad} NaN or infinite voxels; they are shown as-is and "
            "treated as the image minimum by the models.",
            stacklevel=3,
        )
    return n_bad


# --------------------------------------------------------------------------- NIfTI


def read_nifti(path: str | os.PathLike) -> ImageRecord:
    """Read a NIfTI-1/2 file (.nii, .nii.gz) with nibabel.

    Returns
    -------
    ImageRecord
        ``data`` in nibabel's axis order ``(i, j, k[, t])``, native dtype unless the header's
        scaling makes it float; ``affine`` is ``img.affine`` (voxel to RAS mm).
    """
    import nibabel as nib

    path = Path(path)
    _check_readable(path)
    name, _ = split_ext(path)
    try:
        img = nib.load(str(path))
    except Exception as e:
        raise ImageReadError(
            f"{path.name} is not a valid NIfTI file ({type(e).__name__}: {_short(e)})."
        ) from e
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise ImageReadError(f"{path.name} is not a NIfTI image (it is {type(img).__name__}).")
    shape = img.shape
    if len(shape) > 4:
        raise ImageReadError(
            f"{path.name} has {len(shape)} dimensions (shape {shape}); napari-medseg opens "
            "2D, 3D and 4D (time or channel) images."
        )
    if 0 in shape or len(shape) == 0:
        raise ImageReadError(f"{path.name} has a zero-sized dimension (shape {shape}).")
    try:
        arr = np.asanyarray(img.dataobj)
    except (EOFError, zlib.error, OSError, ValueError) as e:
        raise ImageReadError(
            f"{path.name} is truncated or corrupt: its voxel data could not be read ({_short(e)})."
        ) from e
    if arr.dtype == np.float64:
        arr = arr.astype(np.float32)  # never hold float64 copies of images
    if arr.ndim == 2:
        arr = arr[:, :, None]
    _validate(arr, path.name)
    warn_non_finite(arr, path.name)
    hdr = img.header
    meta: dict[str, Any] = {
        "format": "nifti",
        "header_b64": base64.b64encode(hdr.binaryblock).decode("ascii"),
        "qform_code": int(hdr["qform_code"]),
        "sform_code": int(hdr["sform_code"]),
        "zooms": [float(z) for z in hdr.get_zooms()],
        "xyzt_units": list(hdr.get_xyzt_units()),
        "descrip": hdr["descrip"].tobytes().rstrip(b"\0").decode("latin-1"),
        "dtype": str(arr.dtype),
    }
    return ImageRecord(
        data=arr,
        affine=np.asarray(img.affine, dtype=np.float64),
        space="RAS",
        modality=guess_modality(name, arr, "RAS"),
        name=name,
        path=str(path),
        metadata=meta,
    )


def _short(e: BaseException) -> str:
    s = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return s[:160]


# --------------------------------------------------------------------------- NRRD / MetaImage


def read_itk(path: str | os.PathLike) -> ImageRecord:
    """Read NRRD (.nrrd, .nhdr) or MetaImage (.mha, .mhd) with SimpleITK.

    ITK's LPS geometry is converted to a voxel-to-RAS affine; the array is transposed from
    SimpleITK's ``(k, j, i)`` to the file's ``(i, j, k)`` order (a view, no copy). A 2D file
    becomes a one-slice volume.
    """
    import SimpleITK as sitk

    path = Path(path)
    _check_readable(path)
    name, ext = split_ext(path)
    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.LoadPrivateTagsOn()
        img = reader.Execute()
    except RuntimeError as e:
        msg = str(e)
        reason = "it is truncated or corrupt" if "ead" in msg else "it is not a valid image"
        raise ImageReadError(
            f"{path.name} could not be read: {reason} ({_first_itk_line(msg)})."
        ) from e
    dim = img.GetDimension()
    if dim > 3:
        raise ImageReadError(
            f"{path.name} has {dim} spatial dimensions; napari-medseg opens 2D and 3D images."
        )
    size = img.GetSize()
    if 0 in size:
        raise ImageReadError(f"{path.name} has a zero-sized dimension (size {size}).")
    ncomp = img.GetNumberOfComponentsPerPixel()
    arr = sitk.GetArrayFromImage(img)  # (k, j, i[, c]) or (j, i[, c])
    origin, spacing, direction = img.GetOrigin(), img.GetSpacing(), img.GetDirection()
    if dim == 2:
        arr = arr[None]
        origin = (*origin, 0.0)
        spacing = (*spacing, 1.0)
        d2 = np.asarray(direction).reshape(2, 2)
        d3 = np.eye(3)
        d3[:2, :2] = d2
        direction = d3.ravel()
    sp = arr.ndim - (1 if ncomp > 1 else 0)
    order = list(range(sp))[::-1] + ([sp] if ncomp > 1 else [])
    arr = arr.transpose(order)
    if arr.dtype == np.float64:
        arr = arr.astype(np.float32)
    _validate(arr, path.name)
    warn_non_finite(arr, path.name)
    affine = affine_from_itk(origin, spacing, direction)
    meta: dict[str, Any] = {"format": ext.lstrip(".")}
    for key in reader.GetMetaDataKeys():
        val = reader.GetMetaData(key)
        if len(val) < 200:
            meta.setdefault("header", {})[key] = val
    rgb = ncomp in (3, 4) and arr.dtype == np.uint8
    modality = "label" if rgb is False and _itk_says_label(meta) else None
    return ImageRecord(
        data=arr,
        affine=affine,
        space="RAS",
        modality=modality or guess_modality(name, arr, "RAS"),
        name=name,
        path=str(path),
        rgb=False,
        metadata=meta,
    )


def _itk_says_label(meta: dict) -> bool:
    hdr = meta.get("header", {})
    return any("Segment" in k for k in hdr)


def _first_itk_line(msg: str) -> str:
    for line in msg.splitlines():
        line = line.strip()
        if line and not line.startswith(("/", "sitk::", "itk::")) and "Description" in line:
            return line.split("Description:", 1)[-1].strip()[:160]
    return msg.strip().splitlines()[-1][:160] if msg.strip() else "unknown error"


# --------------------------------------------------------------------------- writing


def label_dtype(data: np.ndarray) -> np.dtype:
    """Smallest unsigned integer dtype that holds a label map (uint8, uint16 or uint32)."""
    arr = np.asarray(data)
    if arr.size == 0:
        return np.dtype(np.uint8)
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0:
        return np.dtype(np.int32) if hi < 2**31 else np.dtype(np.int64)
    for dt in (np.uint8, np.uint16, np.uint32):
        if hi <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.int64)


def write_volume(
    path: str | os.PathLike,
    data: np.ndarray,
    affine: np.ndarray,
    *,
    is_label: bool = False,
    source: dict | None = None,
    overwrite: bool = True,
) -> Path:
    """Write a volume with its voxel-to-RAS affine, atomically.

    Parameters
    ----------
    path : path-like
        Destination; the extension picks the format: ``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``.
    data : numpy.ndarray
        ``(i, j, k[, t])`` in the file's own axis order (what :func:`read_nifti` returns).
    affine : (4, 4) array
        Voxel to RAS mm.
    is_label : bool
        Store as the smallest unsigned integer dtype that holds the labels.
    source : dict, optional
        ``ImageRecord.metadata`` of the source file; for NIfTI its header (units, codes,
        description) is reused so the mask matches its scan in every tool.
    overwrite : bool
        When False and ``path`` exists, raise :class:`ImageWriteError`.

    Returns
    -------
    pathlib.Path
    """
    path = Path(path)
    _, ext = split_ext(path)
    if ext not in WRITE_EXT:
        raise ImageWriteError(
            f"cannot write {path.name}: choose one of {', '.join(WRITE_EXT)} for volumes."
        )
    if path.exists() and not overwrite:
        raise ImageWriteError(f"{path} exists; pass --overwrite to replace it.")
    if not path.parent.exists():
        raise ImageWriteError(f"cannot write {path.name}: folder {path.parent} does not exist.")
    arr = np.asarray(data)
    if is_label:
        if np.issubdtype(arr.dtype, np.floating) and not np.all(arr == np.round(arr)):
            raise ImageWriteError(f"cannot save {path.name} as labels: values are not integers.")
        arr = arr.astype(label_dtype(arr), copy=False)
    elif arr.dtype == np.float64:
        arr = arr.astype(np.float32)
    elif arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    try:
        with atomic_path(path) as tmp:
            if ext in NIFTI_EXT:
                _write_nifti(tmp, arr, affine, source or {}, is_label)
            else:
                _write_itk(tmp, arr, affine, is_label)
    except ImageWriteError:
        raise
    except PermissionError as e:
        raise ImageWriteError(
            f"cannot write {path.name}: folder {path.parent} is not writable."
        ) from e
    except Exception as e:
        raise ImageWriteError(f"could not write {path.name}: {_short(e)}.") from e
    return path


def _write_nifti(
    path: Path, arr: np.ndarray, affine: np.ndarray, source: dict, is_label: bool
) -> None:
    import nibabel as nib

    hdr = None
    if source.get("format") == "nifti" and source.get("header_b64"):
        raw = base64.b64decode(source["header_b64"])
        try:
            hdr = nib.Nifti1Header(binaryblock=raw) if len(raw) == 348 else None
        except Exception:
            hdr = None
    if hdr is not None:
        hdr = hdr.copy()
        hdr.set_data_shape(arr.shape)
        hdr.set_data_dtype(arr.dtype)
        hdr.set_slope_inter(None, None)
        if is_label:
            hdr["cal_min"], hdr["cal_max"] = 0, 0
            hdr.set_intent("label") if hasattr(hdr, "set_intent") else None
        qcode = int(source.get("qform_code") or 1)
        scode = int(source.get("sform_code") or 1)
    else:
        qcode = scode = 1
    img = nib.Nifti1Image(arr, affine, header=hdr)
    img.set_qform(affine, code=qcode or 1)
    img.set_sform(affine, code=scode or 1)
    if hdr is None:
        img.header.set_xyzt_units("mm", "sec")
    if is_label:
        img.header.set_intent("label")
    img.set_data_dtype(arr.dtype)
    nib.save(img, str(path))


def _write_itk(path: Path, arr: np.ndarray, affine: np.ndarray, is_label: bool) -> None:
    import SimpleITK as sitk

    if arr.ndim != 3:
        raise ImageWriteError(
            f"{path.suffix} files hold one 3D volume; this image has shape {arr.shape}. "
            "Save 4D images as .nii.gz."
        )
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr.transpose(2, 1, 0)))
    origin, spacing, direction = itk_from_affine(affine)
    img.SetOrigin(origin)
    img.SetSpacing(spacing)
    img.SetDirection(direction)
    sitk.WriteImage(img, str(path), True)
