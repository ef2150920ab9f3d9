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
from napari_medseg.io.limits import check_fits_memory, check_payload, require_regular_file
from napari_medseg.io.modality import guess_modality
from napari_medseg.io.record import ImageRecord

NIFTI_EXT = (".nii", ".nii.gz")
ITK_EXT = (".nrrd", ".nhdr", ".mha", ".mhd")
WRITE_EXT = (".nii.gz", ".nii", ".nrrd", ".mha")


def _check_readable(path: Path) -> None:
    require_regular_file(path)  # a FIFO or a device would block or never end
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
    path = Path(path)
    name, _ = split_ext(path)
    img = _open_nifti(path)
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


def _open_nifti(path: Path, stream: bool = False) -> Any:
    """The nibabel image of a NIfTI file, header checked against the file; no voxels kept
    (``stream``: a compressed file is decompressed to its claimed end, counted, not kept)."""
    import nibabel as nib

    _check_readable(path)
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
    check_nifti_payload(path, img, stream)  # before allocating: a lying header ends here
    return img


def nifti_info(path: str | os.PathLike) -> dict[str, Any]:
    """What :func:`read_nifti` would return, from the header and one middle slice.

    Returns
    -------
    dict
        ``name``, ``path``, ``shape`` (as :func:`read_nifti` gives it, 2D as one slice),
        ``dtype``, ``affine`` (voxel to RAS mm), ``modality`` (guessed from the middle slice),
        ``metadata``. Memory: one slice.
    """
    path = Path(path)
    name, _ = split_ext(path)
    img = _open_nifti(path, stream=True)  # a truncated file is found without decoding it
    shape = tuple(int(v) for v in img.shape)
    index: tuple = (slice(None), slice(None))
    if len(shape) >= 3:
        index += (shape[2] // 2,) + (0,) * (len(shape) - 3)
    try:
        sample = np.asanyarray(img.dataobj[index])
    except (EOFError, zlib.error, OSError, ValueError) as e:
        raise ImageReadError(
            f"{path.name} is truncated or corrupt: its voxel data could not be read ({_short(e)})."
        ) from e
    dtype = np.dtype(np.float32) if sample.dtype == np.float64 else sample.dtype
    return {
        "name": name,
        "path": str(path),
        "shape": shape if len(shape) > 2 else (*shape, 1),
        "dtype": str(dtype),
        "affine": np.asarray(img.affine, dtype=np.float64),
        "modality": guess_modality(name, sample, "RAS"),
        "metadata": {"format": "nifti", "zooms": [float(z) for z in img.header.get_zooms()]},
    }


def check_nifti_payload(path: Path, img: Any, stream: bool = False) -> None:
    """Compare a NIfTI header's claimed voxel bytes with the file, without decoding the voxels.

    Raises
    ------
    ImageReadError
        Truncated file or lying header (see :func:`napari_medseg.io.limits.check_payload`), or
        an image that would not fit in memory.
    """
    hdr = img.header
    dtype = hdr.get_data_dtype()
    slope, inter = hdr.get_slope_inter()
    scaled = (slope is not None and slope != 1) or (inter is not None and inter != 0)
    check_payload(
        path,
        path.name,
        shape=tuple(int(s) for s in hdr.get_data_shape()),
        itemsize=dtype.itemsize,
        offset=int(hdr.get_data_offset()),
        gzipped=_is_gzip(path),
        decoded_itemsize=8 if scaled else dtype.itemsize,  # nibabel scales in float64
        stream=stream,
    )


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == b"\x1f\x8b"


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
    name, ext = split_ext(path)
    reader = _itk_reader(path)
    try:
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


def _itk_reader(path: Path, stream: bool = False) -> Any:
    """A SimpleITK reader with the header read and checked against the file; no voxels read
    (``stream``: compressed voxels are decompressed to their claimed end, counted, not kept)."""
    import SimpleITK as sitk

    _check_readable(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.LoadPrivateTagsOn()
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise ImageReadError(
            f"{path.name} could not be read: it is not a valid image ({_first_itk_line(str(e))})."
        ) from e
    size = tuple(int(v) for v in reader.GetSize())
    if 0 in size:
        raise ImageReadError(f"{path.name} has a zero-sized dimension (size {size}).")
    ncomp = int(reader.GetNumberOfComponents())
    one = sitk.Image([1] * reader.GetDimension(), reader.GetPixelID(), ncomp)
    item = sitk.GetArrayViewFromImage(one).dtype.itemsize * ncomp
    data, offset, compressed, start = _itk_payload(path)
    if data is None:  # an encoding we cannot size cheaply (ascii, bzip2, lists): memory only
        check_fits_memory(path.name, int(np.prod(size)) * item, size)
    else:
        check_payload(
            data,
            path.name,
            shape=size,
            itemsize=item,
            offset=offset,
            gzipped=compressed,
            data_start=start,
            decoded_itemsize=max(item, 4 * ncomp),  # float64 becomes float32
            stream=stream,
        )
    return reader


def _header_text(path: Path, limit: int = 1 << 16) -> str:
    with open(path, "rb") as fh:
        return fh.read(limit).decode("latin-1")


def _itk_payload(path: Path) -> tuple[Path | None, int, bool, int]:
    """Where the voxels of a NRRD/MetaImage file are: ``(data file, offset, compressed,
    start of the compressed stream)``; data file ``None`` when it cannot be told cheaply."""
    text = _header_text(path)
    _, ext = split_ext(path)
    if ext in (".nrrd", ".nhdr"):
        end = text.find("\n\n")
        if end < 0:
            return None, 0, False, 0
        fields = {}
        for line in text[:end].splitlines()[1:]:
            if ":" in line and not line.startswith("#"):
                k, v = line.split(":", 1)
                fields[k.strip().lower()] = v.lstrip("=").strip()
        enc = fields.get("encoding", "raw").lower()
        if enc not in ("raw", "gzip", "gz") or "line skip" in fields or "lineskip" in fields:
            return None, 0, False, 0
        skip = int(fields.get("byte skip", fields.get("byteskip", "0")) or 0)
        detached = fields.get("data file", fields.get("datafile"))
        if skip < 0 or (detached and (" " in detached or detached.upper().startswith("LIST"))):
            return None, 0, False, 0
        data = (path.parent / detached) if detached else path
        header_len = 0 if detached else len(text[: end + 2].encode("latin-1"))
        if enc == "raw":
            return data, header_len + skip, False, 0
        return data, skip, True, header_len
    # MetaImage: "Key = Value" lines up to ElementDataFile
    fields = {}
    header_len = 0
    for line in text.splitlines(keepends=True):
        header_len += len(line.encode("latin-1"))
        if "=" in line:
            k, v = line.split("=", 1)
            fields[k.strip().lower()] = v.strip()
        if line.strip().lower().startswith("elementdatafile"):
            break
    else:
        return None, 0, False, 0
    edf = fields.get("elementdatafile", "")
    compressed = fields.get("compresseddata", "false").lower() == "true"
    hsize = int(fields.get("headersize", "0") or 0)
    if hsize < 0 or " " in edf or edf.upper().startswith("LIST") or "%" in edf:
        return None, 0, False, 0
    data = path if edf.upper() == "LOCAL" else path.parent / edf
    start = header_len if edf.upper() == "LOCAL" else 0
    if compressed:
        return data, 0, True, start
    return data, start + hsize, False, 0


def itk_info(path: str | os.PathLike) -> dict[str, Any]:
    """What :func:`read_itk` would return, from the header (and one middle slice).

    Returns
    -------
    dict
        ``name``, ``path``, ``shape`` ``(i, j, k[, c])``, ``dtype``, ``affine`` (voxel to RAS
        mm), ``modality`` (guessed from the middle slice), ``metadata``.
    """
    import SimpleITK as sitk

    path = Path(path)
    name, ext = split_ext(path)
    reader = _itk_reader(path, stream=True)
    size = [int(v) for v in reader.GetSize()]
    dim = len(size)
    if dim > 3:
        raise ImageReadError(
            f"{path.name} has {dim} spatial dimensions; napari-medseg opens 2D and 3D images."
        )
    ncomp = int(reader.GetNumberOfComponents())
    origin, spacing = reader.GetOrigin(), reader.GetSpacing()
    direction = reader.GetDirection()
    if dim == 3:  # the middle slice only (streamed where the format allows it)
        reader.SetExtractIndex([0, 0, size[2] // 2])
        reader.SetExtractSize([size[0], size[1], 0])
    try:
        sample = sitk.GetArrayFromImage(reader.Execute())
    except RuntimeError as e:
        raise ImageReadError(
            f"{path.name} could not be read: it is truncated or corrupt "
            f"({_first_itk_line(str(e))})."
        ) from e
    if dim == 2:
        size, origin, spacing = [*size, 1], (*origin, 0.0), (*spacing, 1.0)
        d3 = np.eye(3)
        d3[:2, :2] = np.asarray(direction).reshape(2, 2)
        direction = d3.ravel()
    dtype = np.dtype(np.float32) if sample.dtype == np.float64 else sample.dtype
    return {
        "name": name,
        "path": str(path),
        "shape": tuple(size) + ((ncomp,) if ncomp > 1 else ()),
        "dtype": str(dtype),
        "affine": affine_from_itk(origin, spacing, direction),
        "modality": guess_modality(name, sample, "RAS"),
        "metadata": {"format": ext.lstrip(".")},
    }


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
