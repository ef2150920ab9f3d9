"""One entry point to read any supported image, and one to write a record."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from napari_medseg._files import split_ext
from napari_medseg.errors import ImageReadError, ImageWriteError
from napari_medseg.io.limits import require_regular_file
from napari_medseg.io.record import ImageRecord
from napari_medseg.io.volume import (
    ITK_EXT,
    NIFTI_EXT,
    WRITE_EXT,
    itk_info,
    nifti_info,
    read_itk,
    read_nifti,
    write_volume,
)

RASTER_EXT = (".png", ".jpg", ".jpeg", ".bmp")
TIFF_EXT = (".tif", ".tiff", ".ome.tif", ".ome.tiff", ".svs", ".ndpi", ".scn", ".btf")
DICOM_EXT = (".dcm", ".dicom", ".ima")
SUPPORTED_EXTENSIONS = NIFTI_EXT + ITK_EXT + RASTER_EXT + TIFF_EXT + DICOM_EXT


def read_image(path: str | os.PathLike, series: int | None = None) -> list[ImageRecord]:
    """Read an image file, a DICOM file or a DICOM series folder.

    Parameters
    ----------
    path : path-like
        NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd), DICOM (a file or a
        folder of one or more series), PNG/JPEG/TIFF 2D images, pyramidal TIFF/OME-TIFF/SVS.
    series : int, optional
        For DICOM: decode only this series (``0``: the first by SeriesNumber) and return it
        alone, with ``metadata["series_choice"]`` and a ``read_notes`` line saying which of how
        many was used. Other formats hold one image and ignore it.

    Returns
    -------
    list of ImageRecord
        One record per image (several for a folder with several DICOM series).

    Raises
    ------
    ImageReadError
        With one sentence saying what is wrong.
    """
    p = Path(path)
    if not p.exists():
        raise ImageReadError(f"{p} does not exist.")
    if p.is_dir():
        from napari_medseg.io.dicom import read_dicom

        return read_dicom(p, series=series)
    require_regular_file(p)  # a FIFO or a device named like an image would block or never end
    if not os.access(p, os.R_OK):
        raise ImageReadError(f"{p.name} cannot be read: permission denied.")
    _, ext = split_ext(p)
    if ext in NIFTI_EXT:
        return [read_nifti(p)]
    if ext in ITK_EXT:
        return [read_itk(p)]
    if ext in TIFF_EXT:
        from napari_medseg.io.raster import is_slide, read_raster, read_slide

        return [read_slide(p) if is_slide(p) else read_raster(p)]
    if ext in RASTER_EXT:
        from napari_medseg.io.raster import read_raster

        return [read_raster(p)]
    from napari_medseg.io.dicom import is_dicom_path, read_dicom

    if ext in DICOM_EXT or is_dicom_path(p):
        return read_dicom(p, series=series)
    raise ImageReadError(
        f"{p.name}: unsupported file type {ext or '(no extension)'}; napari-medseg reads "
        "NIfTI, NRRD, MetaImage, DICOM, PNG/JPEG/TIFF and pyramidal TIFF/SVS."
    )


def read_info(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Shape, dtype, geometry and modality of an image, decoding as little as possible.

    NIfTI, NRRD and MetaImage: the header and one middle slice (for the modality guess);
    TIFF stacks: the tags only; DICOM: the headers only (no pixel data of any series); slides:
    lazily, as :func:`read_image`; PNG/JPEG: decoded (they are small). A lying header fails
    here as it would in :func:`read_image`, before anything is allocated.

    Returns
    -------
    list of dict
        One per image (per series for DICOM): ``path``, ``name``, ``shape`` (file axis
        order, as :func:`read_image` returns it), ``dtype``, ``spacing`` (mm, or pixels for
        ``space == "pixel"``), ``affine`` (voxel to RAS mm), ``orientation``, ``space``,
        ``modality``, ``rgb``, ``levels`` (slide pyramid shapes or ``None``).
    """
    p = Path(path)
    if not p.exists():
        raise ImageReadError(f"{p} does not exist.")
    _, ext = split_ext(p)
    if p.is_dir():
        from napari_medseg.io.dicom import dicom_info

        return [_info(d) for d in dicom_info(p)]
    require_regular_file(p)
    if not os.access(p, os.R_OK):
        raise ImageReadError(f"{p.name} cannot be read: permission denied.")
    if ext in NIFTI_EXT:
        return [_info(nifti_info(p))]
    if ext in ITK_EXT:
        return [_info(itk_info(p))]
    if ext in TIFF_EXT:
        from napari_medseg.io.raster import is_slide, tiff_info

        if not is_slide(p):
            return [_info(tiff_info(p))]
    elif ext not in RASTER_EXT:
        from napari_medseg.io.dicom import dicom_info, is_dicom_path

        if ext in DICOM_EXT or is_dicom_path(p):
            return [_info(d) for d in dicom_info(p)]
    return [record_info(r) for r in read_image(p)]


def record_info(rec: ImageRecord) -> dict[str, Any]:
    """The :func:`read_info` dict of a record already in memory."""
    return _info(
        {
            "path": rec.path,
            "name": rec.name,
            "shape": rec.shape,
            "dtype": str(rec.data.dtype),
            "affine": rec.affine,
            "space": rec.space,
            "modality": rec.modality,
            "rgb": rec.rgb,
            "levels": [list(level.shape) for level in rec.multiscale] if rec.multiscale else None,
        }
    )


def _info(d: dict[str, Any]) -> dict[str, Any]:
    from napari_medseg.io.geometry import orientation_codes

    aff = np.asarray(d["affine"], dtype=np.float64)
    space = d.get("space", "RAS")
    spacing = np.sqrt((aff[:-1, :-1] ** 2).sum(axis=0))
    return {
        "path": d.get("path"),
        "name": d.get("name"),
        "shape": [int(v) for v in d["shape"]],
        "dtype": str(d["dtype"]),
        "spacing": [round(float(v), 6) for v in spacing],
        "affine": [[float(v) for v in row] for row in aff],
        "orientation": orientation_codes(aff) if space == "RAS" else "",
        "space": space,
        "modality": d.get("modality"),
        "rgb": bool(d.get("rgb", False)),
        "levels": d.get("levels"),
    }


def write_image(
    path: str | os.PathLike,
    record: ImageRecord,
    *,
    is_label: bool | None = None,
    overwrite: bool = True,
) -> Path:
    """Write a record with its geometry, atomically.

    Volumes go to ``.nii.gz``, ``.nii``, ``.nrrd`` or ``.mha``; 2D ``pixel``-space images also
    to ``.png`` or ``.tif``.

    Parameters
    ----------
    path : path-like
    record : ImageRecord
        Data in file axis order with its affine.
    is_label : bool, optional
        Defaults to ``record.modality == "label"``.
    overwrite : bool
        When False an existing file is an error.
    """
    path = Path(path)
    is_label = record.modality == "label" if is_label is None else is_label
    _, ext = split_ext(path)
    if record.space == "pixel":
        if ext in (".png", ".tif", ".tiff"):
            return _write_raster(path, record, is_label, overwrite)
        if ext in WRITE_EXT:
            # a 2D image as a one-slice volume in pixel units (1 pixel = 1 mm)
            arr = np.asarray(record.data)
            aff = np.eye(4)
            aff[:2, :2] = record.affine[:2, :2]
            aff[:2, 3] = record.affine[:2, 2]
            vol = arr[:, :, None] if not record.rgb else arr[:, :, None, :]
            return write_volume(path, vol, aff, is_label=is_label, source={}, overwrite=overwrite)
        raise ImageWriteError(f"cannot write a 2D image to {path.name}: use .png, .tif or .nii.gz.")
    return write_volume(
        path,
        np.asarray(record.data),
        record.affine,
        is_label=is_label,
        source=record.metadata,
        overwrite=overwrite,
    )


def _write_raster(path: Path, record: ImageRecord, is_label: bool, overwrite: bool) -> Path:
    import tifffile

    from napari_medseg._files import atomic_path
    from napari_medseg.io.volume import label_dtype

    if path.exists() and not overwrite:
        raise ImageWriteError(f"{path} exists; pass --overwrite to replace it.")
    if not path.parent.is_dir():
        raise ImageWriteError(f"cannot write {path.name}: folder {path.parent} does not exist.")
    arr = np.asarray(record.data)
    if is_label:
        arr = arr.astype(label_dtype(arr), copy=False)
    if path.suffix.lower() == ".png" and arr.dtype not in (np.uint8, np.uint16):
        raise ImageWriteError(f"PNG holds 8- or 16-bit images; save {path.name} as .tif instead.")
    try:
        with atomic_path(path) as tmp:
            if path.suffix.lower() == ".png":
                from skimage.io import imsave

                imsave(str(tmp), arr, check_contrast=False)
            else:
                tifffile.imwrite(str(tmp), arr, photometric="rgb" if record.rgb else "minisblack")
    except PermissionError as e:
        raise ImageWriteError(
            f"cannot write {path.name}: folder {path.parent} is not writable."
        ) from e
    except Exception as e:
        raise ImageWriteError(f"could not write {path.name}: {e}.") from e
    return path
