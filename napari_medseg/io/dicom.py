"""DICOM series reader: a folder (or one file) of DICOM images to one record per series.

Axis order and geometry
-----------------------
Every record is a volume in RAS millimetres (``space == "RAS"``) whose ``data`` is in the file
order ``(i, j, k)``:

* ``i``: column index, runs along the row direction cosine (first half of
  ImageOrientationPatient),
* ``j``: row index, runs along the column direction cosine (second half of IOP),
* ``k``: slice index, slices sorted by the projection of ImagePositionPatient onto the slice
  normal ``row x col``.

That is pydicom's ``pixel_array`` ``(rows, cols)`` stacked to ``(k, rows, cols)`` and transposed
(a view, no copy) to ``(cols, rows, k)``; the affine therefore maps ``(i, j, k)`` to RAS as
nibabel would for the same voxels: origin = IPP of the first slice, columns = row cosine x column
spacing, column cosine x row spacing, normal x slice spacing, converted from LPS to RAS with
:func:`~napari_medseg.io.geometry.affine_from_itk`. The slice spacing comes from the slice
positions (SliceThickness is not the spacing when slices overlap or leave gaps). RGB series keep
the samples as a trailing axis ``(i, j, k, 3)`` with ``rgb=True``.

Intensities are modality values: RescaleSlope/RescaleIntercept (or an RT dose's DoseGridScaling)
are applied; the result is ``int16`` (or ``int32``) when slope and intercept are integers and the
values fit, ``float32`` otherwise (CT in Hounsfield units). Without a rescale the stored dtype is
kept.

Files are grouped by SeriesInstanceUID, then split further when orientation, rows, columns or
samples per pixel differ, or when positions repeat and a tag (echo number, temporal position,
acquisition number, ...) separates the repeats. Series are never mixed.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_medseg.errors import ImageReadError
from napari_medseg.io.geometry import affine_from_itk
from napari_medseg.io.limits import require_regular_file
from napari_medseg.io.record import ImageRecord
from napari_medseg.progress import Progress, ProgressGen, run_sync

__all__ = ["is_dicom_path", "iter_read_dicom", "read_dicom"]

#: File suffixes taken as DICOM without looking inside.
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
#: Pixel data elements (integer, float and double-float images).
_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
#: Tags tried, in order, to separate images that share a slice position within one series.
_SPLIT_TAGS = (
    "EchoNumbers",
    "TemporalPositionIdentifier",
    "DiffusionBValue",
    "TriggerTime",
    "AcquisitionNumber",
    "ImageType",
    "AcquisitionTime",
)
#: Which package decodes which compressed transfer syntax (for error messages).
_DECODER_HINTS = {
    "1.2.840.10008.1.2.4.50": "pylibjpeg and pylibjpeg-libjpeg (or Pillow)",
    "1.2.840.10008.1.2.4.51": "pylibjpeg and pylibjpeg-libjpeg (or Pillow)",
    "1.2.840.10008.1.2.4.57": "pylibjpeg and pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.70": "pylibjpeg and pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.80": "pyjpegls (or pylibjpeg and pylibjpeg-libjpeg)",
    "1.2.840.10008.1.2.4.81": "pyjpegls (or pylibjpeg and pylibjpeg-libjpeg)",
    "1.2.840.10008.1.2.4.90": "pylibjpeg and pylibjpeg-openjpeg (or Pillow with OpenJPEG)",
    "1.2.840.10008.1.2.4.91": "pylibjpeg and pylibjpeg-openjpeg (or Pillow with OpenJPEG)",
    "1.2.840.10008.1.2.4.201": "pylibjpeg and pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.202": "pylibjpeg and pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.203": "pylibjpeg and pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.5": "pylibjpeg and pylibjpeg-rle",
}


# --------------------------------------------------------------------------- quick check


def _has_dicm_preamble(path: str | Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def is_dicom_path(path: str | Path, max_files: int = 50) -> bool:
    """Quick check: is ``path`` a DICOM file or a folder that holds DICOM files?

    Parameters
    ----------
    path : str or Path
        A file (``.dcm``/``.dicom``/``.ima`` suffix, or the ``DICM`` marker at byte 128) or a
        folder (searched recursively, at most ``max_files`` files looked at).
    max_files : int
        How many files of a folder to open before giving up.

    Returns
    -------
    bool
    """
    p = Path(path)
    if p.is_file():
        return p.suffix.lower() in DICOM_SUFFIXES or _has_dicm_preamble(p)
    if not p.is_dir():
        return False
    seen = 0
    for root, dirs, files in os.walk(p):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            f = Path(root) / name
            if not f.is_file():  # a FIFO or device would block the read
                continue
            if f.suffix.lower() in DICOM_SUFFIXES or _has_dicm_preamble(f):
                return True
            seen += 1
            if seen >= max_files:
                return False
    return False


# --------------------------------------------------------------------------- headers


@dataclass
class _Frame:
    """One 2D image of a series: a single-frame file or one frame of a multi-frame file."""

    path: str
    frame: int | None
    header: Any
    rows: int
    cols: int
    samples: int
    position: np.ndarray | None
    orientation: np.ndarray | None
    pixel_spacing: tuple[float, float] | None  # (between rows, between columns) mm
    slope: float
    intercept: float
    instance: int
    extra: dict = field(default_factory=dict)


def _float_list(value: Any) -> list[float] | None:
    if value is None:
        return None
    try:
        return [float(v) for v in value]
    except (TypeError, ValueError):
        return None


def _num(value: Any, default: float) -> float:
    try:
        if value is None or value == "":
            return default
        if hasattr(value, "__len__") and not isinstance(value, str):
            value = value[0]
        return float(value)
    except (TypeError, ValueError, IndexError):
        return default


def _has_pixels(ds: Any) -> bool:
    return any(t in ds for t in _PIXEL_TAGS)


def _read_header(path: str) -> Any | None:
    """Read a DICOM header (pixel data deferred); ``None`` when the file is not DICOM."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, defer_size="2 KB")
    except InvalidDicomError:
        pass
    except Exception:  # noqa: BLE001 - a broken file is "not a DICOM image" here
        return None
    # files without the 128-byte preamble (old ACR-NEMA style): accept only when they start with
    # a plausible group 0x0008 (or 0x0002) tag, so that random files are not force-parsed
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError:
        return None
    if head[:2] not in (b"\x08\x00", b"\x02\x00"):
        return None
    try:
        ds = pydicom.dcmread(path, defer_size="2 KB", force=True)
        if "Rows" not in ds or "Columns" not in ds:
            return None
        return ds
    except Exception:  # noqa: BLE001
        return None


def _seq_item(ds: Any, *names: str) -> Any | None:
    """``ds.A[0].B[0]...``, ``None`` when any level is missing."""
    cur = ds
    for name in names:
        seq = getattr(cur, name, None) if cur is not None else None
        if not seq:
            return None
        cur = seq[0]
    return cur


def _frames_of(path: str, ds: Any) -> list[_Frame]:
    """Split one DICOM header into its 2D frames with geometry and rescale per frame."""
    rows, cols = int(ds.Rows), int(ds.Columns)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    nframes = int(_num(ds.get("NumberOfFrames", 1), 1) or 1)
    instance = int(_num(ds.get("InstanceNumber", 0), 0))
    pos = _float_list(ds.get("ImagePositionPatient"))
    iop = _float_list(ds.get("ImageOrientationPatient"))
    ps = _float_list(ds.get("PixelSpacing")) or _float_list(ds.get("ImagerPixelSpacing"))
    slope = _num(ds.get("RescaleSlope"), 1.0)
    intercept = _num(ds.get("RescaleIntercept"), 0.0)
    if "DoseGridScaling" in ds:  # RT dose: stored value x DoseGridScaling = Gy
        slope = slope * _num(ds.get("DoseGridScaling"), 1.0)

    shared = _seq_item(ds, "SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")

    def fg(item: Any, seq: str, key: str) -> Any:
        sub = _seq_item(item, seq) if item is not None else None
        return sub.get(key) if sub is not None else None

    if shared is not None or per_frame:
        # enhanced multi-frame: geometry and rescale in functional groups
        out = []
        for f in range(nframes):
            item = per_frame[f] if per_frame and f < len(per_frame) else None

            def get(seq: str, key: str, item: Any = item) -> Any:
                v = fg(item, seq, key)
                return v if v is not None else fg(shared, seq, key)

            fpos = _float_list(get("PlanePositionSequence", "ImagePositionPatient")) or pos
            fiop = _float_list(get("PlaneOrientationSequence", "ImageOrientationPatient")) or iop
            fps = _float_list(get("PixelMeasuresSequence", "PixelSpacing")) or ps
            fsl = _num(get("PixelValueTransformationSequence", "RescaleSlope"), slope)
            fic = _num(get("PixelValueTransformationSequence", "RescaleIntercept"), intercept)
            st = get("PixelMeasuresSequence", "SliceThickness")
            sb = get("PixelMeasuresSequence", "SpacingBetweenSlices")
            out.append(
                _Frame(
                    path,
                    f,
                    ds,
                    rows,
                    cols,
                    samples,
                    np.asarray(fpos, float) if fpos and len(fpos) == 3 else None,
                    np.asarray(fiop, float) if fiop and len(fiop) == 6 else None,
                    (fps[0], fps[1]) if fps and len(fps) >= 2 else None,
                    fsl,
                    fic,
                    instance,
                    {"SliceThickness": _num(st, 0.0), "SpacingBetweenSlices": _num(sb, 0.0)},
                )
            )
        return out

    iop_arr = np.asarray(iop, float) if iop and len(iop) == 6 else None
    pos_arr = np.asarray(pos, float) if pos and len(pos) == 3 else None
    pspacing = (ps[0], ps[1]) if ps and len(ps) >= 2 else None
    if nframes == 1:
        return [
            _Frame(
                path,
                None,
                ds,
                rows,
                cols,
                samples,
                pos_arr,
                iop_arr,
                pspacing,
                slope,
                intercept,
                instance,
            )
        ]
    # classic multi-frame (RT dose, NM, ...): positions from GridFrameOffsetVector along normal
    offsets = _float_list(ds.get("GridFrameOffsetVector"))
    if offsets is None or len(offsets) != nframes:
        step = _num(ds.get("SpacingBetweenSlices"), 0.0) or _num(ds.get("SliceThickness"), 0.0)
        offsets = [f * (step or 1.0) for f in range(nframes)]
    out = []
    for f in range(nframes):
        fpos = None
        if pos_arr is not None and iop_arr is not None:
            normal = np.cross(iop_arr[:3], iop_arr[3:])
            fpos = pos_arr + offsets[f] * normal
        out.append(
            _Frame(
                path,
                f,
                ds,
                rows,
                cols,
                samples,
                fpos,
                iop_arr,
                pspacing,
                slope,
                intercept,
                instance,
                {"offset": offsets[f]},
            )
        )
    return out


def _list_files(path: Path) -> list[str]:
    files = []
    for root, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if name.startswith(".") or name.upper() == "DICOMDIR":
                continue
            full = os.path.join(root, name)
            if os.path.isfile(full):  # regular files only: a FIFO or device would block the read
                files.append(full)
    return files


# --------------------------------------------------------------------------- grouping


def _group_key(fr: _Frame) -> tuple:
    ds = fr.header
    iop = tuple(np.round(fr.orientation, 4)) if fr.orientation is not None else None
    uid = str(ds.get("SeriesInstanceUID", "") or "")
    if not uid:  # anonymised without UIDs: fall back to what tells series apart for a person
        uid = "no-uid:{}:{}".format(ds.get("SeriesNumber", ""), ds.get("SeriesDescription", ""))
    return (
        uid,
        iop,
        fr.rows,
        fr.cols,
        fr.samples,
    )


def _pos_key(fr: _Frame, normal: np.ndarray) -> float:
    return round(float(fr.position @ normal), 3)


def _split_repeats(frames: list[_Frame]) -> list[tuple[str, list[_Frame]]]:
    """Split a group whose slice positions repeat, by the first tag that separates the repeats."""
    if any(f.position is None or f.orientation is None for f in frames):
        return [("", frames)]
    normal = np.cross(frames[0].orientation[:3], frames[0].orientation[3:])
    keys = [_pos_key(f, normal) for f in frames]
    if len(set(keys)) == len(keys):
        return [("", frames)]
    for tag in _SPLIT_TAGS:
        vals = [str(f.header.get(tag, "")) for f in frames]
        if len(set(vals)) < 2:
            continue
        groups: dict[str, list[int]] = {}
        for i, v in enumerate(vals):
            groups.setdefault(v, []).append(i)
        if all(len({keys[i] for i in idx}) == len(idx) for idx in groups.values()):
            return [(f"{tag} {v}", [frames[i] for i in idx]) for v, idx in sorted(groups.items())]
    # no tag separates them: keep the first image at each position
    hdr = frames[0].header
    sname = hdr.get("SeriesDescription", "") or hdr.get("SeriesInstanceUID", "")
    warnings.warn(
        f"{len(keys) - len(set(keys))} DICOM images of series {sname}"
        " repeat a slice position and no tag separates them; the first image at each position "
        "is used.",
        stacklevel=4,
    )
    seen: set[float] = set()
    kept = []
    for f, k in sorted(zip(frames, keys), key=lambda t: (t[0].instance, t[0].frame or 0)):
        if k not in seen:
            seen.add(k)
            kept.append(f)
    return [("", kept)]


# --------------------------------------------------------------------------- pixels


def _decode_error(path: str, ds: Any, exc: Exception) -> ImageReadError:
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    text = str(exc)
    name = Path(path).name
    if ts is not None and (
        "missing dependencies" in text
        or "Unable to decompress" in text
        or "Unable to decode" in text
        or "no pixel data decoders" in text.lower()
        or isinstance(exc, NotImplementedError)
    ):
        hint = _DECODER_HINTS.get(str(ts), "pylibjpeg with its plugins, or python-gdcm")
        return ImageReadError(
            f"DICOM file {name} is compressed with {getattr(ts, 'name', ts)}, which no installed "
            f"decoder reads; install {hint} (pip install ...) and open it again."
        )
    if "less than expected" in text or "truncated" in text.lower():
        return ImageReadError(f"DICOM file {name} is truncated: its pixel data is incomplete.")
    first = text.splitlines()[0] if text else type(exc).__name__
    return ImageReadError(f"Could not decode the pixels of DICOM file {name}: {first}")


def _read_pixels(path: str, header: Any) -> np.ndarray:
    """Pixel array of a file, frames first for multi-frame files (``(f, rows, cols[, s])``)."""
    import pydicom

    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:  # noqa: BLE001
        raise ImageReadError(f"Could not read DICOM file {Path(path).name}: {exc}.") from exc
    if not _has_pixels(ds):
        raise ImageReadError(f"DICOM file {Path(path).name} has no pixel data.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom's chatter about odd VRs
            arr = ds.pixel_array
    except Exception as exc:  # noqa: BLE001
        raise _decode_error(path, ds, exc) from exc
    return np.asarray(arr)


# --------------------------------------------------------------------------- records


def _scalar_meta(value: Any) -> Any:
    if value is None:
        return None
    try:
        if hasattr(value, "__len__") and not isinstance(value, str):
            return [float(v) for v in value]
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def _metadata(frames: list[_Frame], n_files: int, spacing: float, label: str) -> dict:
    ds = frames[0].header
    pid = str(ds.get("PatientID", "") or "")
    slopes = sorted({f.slope for f in frames})
    intercepts = sorted({f.intercept for f in frames})
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    meta: dict[str, Any] = {
        "format": "dicom",
        "Modality": str(ds.get("Modality", "") or ""),
        "SeriesDescription": str(ds.get("SeriesDescription", "") or ""),
        "SeriesNumber": _scalar_meta(ds.get("SeriesNumber")),
        "SeriesInstanceUID": str(ds.get("SeriesInstanceUID", "") or ""),
        "StudyInstanceUID": str(ds.get("StudyInstanceUID", "") or ""),
        "Manufacturer": str(ds.get("Manufacturer", "") or ""),
        "PatientIDHash": hashlib.sha256(pid.encode()).hexdigest()[:16] if pid else None,
        "WindowCenter": _scalar_meta(ds.get("WindowCenter")),
        "WindowWidth": _scalar_meta(ds.get("WindowWidth")),
        "RescaleSlope": slopes[0] if len(slopes) == 1 else slopes,
        "RescaleIntercept": intercepts[0] if len(intercepts) == 1 else intercepts,
        "SliceThickness": _scalar_meta(ds.get("SliceThickness")),
        "slice_spacing": spacing,
        "TransferSyntaxUID": str(ts) if ts is not None else None,
        "n_files": n_files,
        "n_slices": len(frames),
        "first_file": frames[0].path,
    }
    if label:
        meta["split_by"] = label
    return meta


def _geometry(frames: list[_Frame], name: str) -> tuple[list[_Frame], np.ndarray, float]:
    """Sort frames along the slice normal; return them, the affine and the slice spacing."""
    f0 = frames[0]
    ps = f0.pixel_spacing
    if ps is None:
        ps = (1.0, 1.0)
    geometric = all(f.position is not None and f.orientation is not None for f in frames)
    if geometric:
        iop = f0.orientation
        row, col = iop[:3], iop[3:]
        normal = np.cross(row, col)
        normal = normal / (np.linalg.norm(normal) or 1.0)
        frames = sorted(frames, key=lambda f: (float(f.position @ normal), f.instance))
        pos = np.array([f.position for f in frames])
        origin = pos[0]
    else:
        if len(frames) > 1:
            warnings.warn(
                f"DICOM series {name!r} has no ImagePositionPatient/ImageOrientationPatient; "
                "slices are ordered by InstanceNumber with an identity orientation.",
                stacklevel=4,
            )
        frames = sorted(frames, key=lambda f: (f.instance, f.frame or 0))
        row, col, normal = np.eye(3)
        origin = f0.position if f0.position is not None else np.zeros(3)
        pos = None

    third = normal
    ds = f0.header
    if len(frames) == 1 or pos is None:
        thickness = f0.extra.get("SliceThickness") or _num(ds.get("SliceThickness"), 0.0)
        between = f0.extra.get("SpacingBetweenSlices") or _num(ds.get("SpacingBetweenSlices"), 0)
        # one slice: its thickness; several without positions: the stated spacing
        spacing = (thickness or 1.0) if len(frames) == 1 else (between or thickness or 1.0)
    else:
        proj = pos @ normal
        steps = np.diff(proj)
        n = len(frames)
        spacing = float((proj[-1] - proj[0]) / (n - 1))
        if spacing <= 0:
            raise ImageReadError(
                f"DICOM series {name!r} has all its slices at one position and cannot be stacked."
            )
        if float(steps.max() - steps.min()) > max(0.01 * spacing, 1e-3):
            spacing, n = _regular_step(steps, name)
        step_vec = (pos[-1] - pos[0]) / (n - 1)
        inplane = step_vec - normal * spacing
        if np.linalg.norm(inplane) > 0.01 * spacing:
            warnings.warn(
                f"DICOM series {name!r} has tilted slices (gantry tilt); its affine is sheared to "
                "keep every slice at its true position.",
                stacklevel=4,
            )
            third = step_vec / np.linalg.norm(step_vec)
            spacing_vec = float(np.linalg.norm(step_vec))
            affine = affine_from_itk(
                origin, (ps[1], ps[0], spacing_vec), np.column_stack([row, col, third])
            )
            return frames, affine, spacing
    affine = affine_from_itk(origin, (ps[1], ps[0], spacing), np.column_stack([row, col, third]))
    return frames, affine, float(spacing)


def _regular_step(steps: np.ndarray, name: str) -> tuple[float, int]:
    """The regular slice step of a series with missing slices, and its slice count with gaps.

    Gaps that are whole multiples of the smallest step are missing slices: the series is placed
    on that step's grid, every slice at its true position, the missing ones left for the caller
    to mark. Any other irregular spacing cannot be placed on one grid without resampling, and
    resampling would blur the acquired slices and invent the ones in between: it is refused.
    """
    base = float(steps.min())
    ratios = steps / base
    whole = np.round(ratios)
    n = int(whole.sum()) + 1
    if np.all(np.abs(ratios - whole) <= 0.02) and n <= 2 * (len(steps) + 1):
        return base, n
    raise ImageReadError(
        f"DICOM series {name!r} has irregular slice spacing (steps from {steps.min():.3f} to "
        f"{steps.max():.3f} mm, not whole multiples of one step); napari-medseg does not "
        "resample slices onto a regular grid, so it is not opened (convert it with a tool that "
        "resamples, such as dcm2niix, knowingly)."
    )


def _series_name(frames: list[_Frame], label: str) -> tuple[str, str]:
    """(name, modality) of a series as a person reads them."""
    ds0 = frames[0].header
    desc = str(ds0.get("SeriesDescription", "") or "").strip()
    modality = str(ds0.get("Modality", "") or "unknown").strip() or "unknown"
    number = ds0.get("SeriesNumber", "")
    name = desc or (f"{modality} series {number}".strip() if number != "" else modality)
    if label:
        name = f"{name} ({label})"
    return name, modality


def _slots(frames: list[_Frame], affine: np.ndarray, spacing: float) -> list[int] | None:
    """Slice index of each sorted frame on the regular grid (``None`` when none is missing)."""
    if len(frames) < 2 or frames[0].position is None or frames[0].orientation is None:
        return None
    iop = frames[0].orientation
    normal = np.cross(iop[:3], iop[3:])
    normal = normal / (np.linalg.norm(normal) or 1.0)
    proj = np.array([f.position @ normal for f in frames])
    slots = np.rint((proj - proj[0]) / spacing).astype(int).tolist()
    return None if slots[-1] == len(frames) - 1 else slots


def _iter_build_record(
    frames: list[_Frame], label: str, done0: int, total: int
) -> ProgressGen[ImageRecord]:
    name, modality = _series_name(frames, label)
    frames, affine, spacing = _geometry(frames, name)
    slots = _slots(frames, affine, spacing)

    rows, cols, samples = frames[0].rows, frames[0].cols, frames[0].samples
    cache: dict[str, np.ndarray] = {}
    raw: np.ndarray | None = None
    for k, fr in enumerate(frames):
        if fr.frame is None:
            arr = _read_pixels(fr.path, fr.header)
        else:
            if fr.path not in cache:
                full = _read_pixels(fr.path, fr.header)
                nfr = int(_num(fr.header.get("NumberOfFrames", 1), 1))
                if nfr == 1 and full.ndim == (2 if samples == 1 else 3):
                    full = full[None]
                cache = {fr.path: full}  # keep only the current multi-frame file
            arr = cache[fr.path][fr.frame]
        want = (rows, cols) if samples == 1 else (rows, cols, samples)
        if arr.shape != want:
            raise ImageReadError(
                f"DICOM file {Path(fr.path).name} holds a {arr.shape} image where its series "
                f"{name!r} has {want} images; the series cannot be stacked."
            )
        if raw is None:
            raw = np.empty((len(frames), *want), dtype=arr.dtype)
        elif arr.dtype != raw.dtype:
            raw = raw.astype(np.result_type(raw.dtype, arr.dtype))
        raw[k] = arr
        if k % 4 == 0 or k == len(frames) - 1:
            yield Progress(done0 + k + 1, total, f"reading {name}: slice {k + 1}/{len(frames)}")
    assert raw is not None
    data = _apply_rescale(raw, frames, samples)
    meta = _metadata(frames, len({f.path for f in frames}), spacing, label)
    if slots is not None:
        # every acquired slice at its true position; the missing ones are blank (the series'
        # lowest value, air for CT), flagged here, in a warning and in every result's provenance
        full = np.full((slots[-1] + 1, *data.shape[1:]), data.min(), dtype=data.dtype)
        full[slots] = data
        data = full
        missing = sorted(set(range(slots[-1] + 1)) - set(slots))
        note = (
            f"DICOM series {name!r} has {len(missing)} missing slice(s) (slice spacing "
            f"{spacing:.3f} mm); every acquired slice is at its true position and the missing "
            f"ones (k = {', '.join(map(str, missing[:10]))}{', ...' if len(missing) > 10 else ''}) "
            "are left blank at the lowest value: do not trust results there."
        )
        meta["missing_slices"] = missing
        meta.setdefault("read_notes", []).append(note)
        meta["n_slices"] = int(data.shape[0])
        warnings.warn(note, UserWarning, stacklevel=3)
    perm = (2, 1, 0) if samples == 1 else (2, 1, 0, 3)
    n_files = meta["n_files"]
    return ImageRecord(
        data=data.transpose(perm),
        affine=affine,
        space="RAS",
        modality=modality,
        name=name,
        path=str(Path(frames[0].path).parent if n_files > 1 else frames[0].path),
        rgb=samples in (3, 4),
        metadata=meta,
    )


def _apply_rescale(raw: np.ndarray, frames: list[_Frame], samples: int) -> np.ndarray:
    """Modality values: ``stored * slope + intercept`` per slice, in the tightest exact dtype."""
    slopes = np.array([f.slope for f in frames], dtype=np.float64)
    inters = np.array([f.intercept for f in frames], dtype=np.float64)
    if samples != 1 or (np.all(slopes == 1) and np.all(inters == 0)):
        return raw
    if (
        raw.dtype.kind in "ui"
        and np.all(slopes == np.round(slopes))
        and np.all(inters == np.round(inters))
    ):
        lo_raw = raw.reshape(len(frames), -1).min(axis=1).astype(np.float64)
        hi_raw = raw.reshape(len(frames), -1).max(axis=1).astype(np.float64)
        a, b = lo_raw * slopes + inters, hi_raw * slopes + inters
        lo, hi = float(np.minimum(a, b).min()), float(np.maximum(a, b).max())
        for dt in (np.int16, np.int32):
            info = np.iinfo(dt)
            if info.min <= lo and hi <= info.max:
                out = np.empty(raw.shape, dtype=dt)
                for k in range(len(frames)):
                    s, c = int(slopes[k]), int(inters[k])
                    out[k] = raw[k].astype(np.int64 if dt is np.int32 else np.int32) * s + c
                return out
    out = np.empty(raw.shape, dtype=np.float32)
    for k in range(len(frames)):
        out[k] = raw[k].astype(np.float32) * np.float32(slopes[k]) + np.float32(inters[k])
    return out


# --------------------------------------------------------------------------- public API


def _iter_parts(p: Path) -> ProgressGen[list[tuple[str, list[_Frame]]]]:
    """Read every header of a folder or file (no pixels); return ``(label, frames)`` per series,
    in the order the records are returned (SeriesNumber, then UID, then first instance)."""
    if not p.exists():
        raise ImageReadError(f"{p} does not exist.")
    if not p.is_dir():
        require_regular_file(p)
    files = _list_files(p) if p.is_dir() else [str(p)]
    if not files:
        raise ImageReadError(f"Folder {p} is empty: it holds no DICOM images.")
    total_files = len(files)
    frames: list[_Frame] = []
    not_images = 0
    headers_ok = 0
    for n, f in enumerate(files):
        ds = _read_header(f)
        if ds is not None:
            headers_ok += 1
            if _has_pixels(ds) and "Rows" in ds and "Columns" in ds:
                frames.extend(_frames_of(f, ds))
            else:
                not_images += 1
        if n % 16 == 0 or n == total_files - 1:
            yield Progress(n + 1, total_files, f"reading DICOM headers {n + 1}/{total_files}")
    if not frames:
        if p.is_file():
            if headers_ok:
                raise ImageReadError(
                    f"DICOM file {p.name} has no pixel data (it is a report, plan or structure "
                    "set, not an image)."
                )
            raise ImageReadError(f"{p.name} is not a DICOM file.")
        if headers_ok:
            raise ImageReadError(
                f"Folder {p} holds {headers_ok} DICOM files but none with pixel data "
                "(reports, plans or structure sets only)."
            )
        raise ImageReadError(f"No DICOM images were found in folder {p}.")

    groups: dict[tuple, list[_Frame]] = {}
    for fr in frames:
        groups.setdefault(_group_key(fr), []).append(fr)
    parts: list[tuple[tuple, str, list[_Frame]]] = []
    for key, grp in groups.items():
        for label, sub in _split_repeats(grp):
            parts.append((key, label, sub))

    def order(item: tuple[tuple, str, list[_Frame]]) -> tuple:
        key, label, sub = item
        num = _num(sub[0].header.get("SeriesNumber"), float("inf"))
        return (num, key[0], min(f.instance for f in sub), label)

    parts.sort(key=order)
    # a series split by orientation/size gets a label too, so names stay unique
    uid_count: dict[str, int] = {}
    for key, _label, _sub in parts:
        uid_count[key[0]] = uid_count.get(key[0], 0) + 1
    out: list[tuple[str, list[_Frame]]] = []
    seen_uid: dict[str, int] = {}
    for key, label, sub in parts:
        if uid_count[key[0]] > 1 and not label:
            seen_uid[key[0]] = seen_uid.get(key[0], 0) + 1
            label = f"part {seen_uid[key[0]]}"
        out.append((label, sub))
    return out


def iter_read_dicom(path: str | Path, series: int | None = None) -> ProgressGen[list[ImageRecord]]:
    """Read a DICOM folder or file, yielding progress; returns one record per series.

    Parameters
    ----------
    path : str or Path
        A folder (searched recursively; file names and suffixes do not matter) or one file.
    series : int, optional
        Decode only this series (index in the returned order; ``0`` is the first by
        SeriesNumber). The others' headers are read, their pixels never. The record's
        ``metadata["series_choice"]`` (and ``read_notes``) then says which one was taken out of
        how many. ``None`` decodes every series.

    Yields
    ------
    Progress
        Headers read, then slices decoded.

    Returns
    -------
    list of ImageRecord
        One per series (split further where geometry differs), sorted by SeriesNumber (only
        the chosen one with ``series``). Each ``data`` is ``(i, j, k)`` = (column, row, slice)
        in the file order described in the module docstring, ``affine`` maps it to RAS mm. A
        series with missing slices (gaps that are whole multiples of its slice step) has every
        acquired slice at its true position and blank (lowest value) slices at the missing
        ones, listed in ``metadata["missing_slices"]`` and ``metadata["read_notes"]``.

    Raises
    ------
    ImageReadError
        No DICOM images, a file that is not DICOM, missing or undecodable pixel data, slice
        spacing that is irregular but not a case of missing slices, ``series`` out of range.
    """
    p = Path(path)
    parts = yield from _iter_parts(p)
    if series is not None:
        if not 0 <= series < len(parts):
            raise ImageReadError(
                f"{p.name} holds {len(parts)} series; series {series + 1} does not exist."
            )
        chosen = parts[series]
        names = [_series_name(sub, label)[0] for label, sub in parts]
        rec = yield from _iter_build_record(chosen[1], chosen[0], 0, len(chosen[1]))
        if len(parts) > 1:
            others = [n for i, n in enumerate(names) if i != series]
            shown = ", ".join(repr(n) for n in others[:5]) + (", ..." if len(others) > 5 else "")
            note = (
                f"{p.name} holds {len(parts)} DICOM series; used {names[series]!r} "
                f"(number {series + 1} by SeriesNumber), not {shown}"
            )
            rec.metadata["series_choice"] = {
                "n_series": len(parts),
                "index": series,
                "used": names[series],
                "others": others,
            }
            rec.metadata.setdefault("read_notes", []).insert(0, note)
        return [rec]
    total = sum(len(sub) for _, sub in parts)
    records: list[ImageRecord] = []
    done = 0
    for label, sub in parts:
        rec = yield from _iter_build_record(sub, label, done, total)
        done += len(sub)
        records.append(rec)
    return records


def read_dicom(path: str | Path, series: int | None = None) -> list[ImageRecord]:
    """Read a DICOM folder or a single DICOM file; one :class:`ImageRecord` per series.

    Parameters
    ----------
    path : str or Path
        Folder (recursive, any file names) or one DICOM file. A single-frame file becomes a
        one-slice volume of shape ``(cols, rows, 1)`` whose slice thickness is SliceThickness
        (or 1 mm); a multi-frame file becomes a volume.
    series : int, optional
        Decode only this series (see :func:`iter_read_dicom`).

    Returns
    -------
    list of ImageRecord
        ``data`` in ``(i, j, k)`` order (column, row, slice; see the module docstring),
        ``affine`` voxel to RAS mm, ``modality`` from the Modality tag, JSON-able ``metadata``
        (PatientID only as a hash).

    Raises
    ------
    ImageReadError
        With one sentence saying what is wrong.
    """
    return run_sync(iter_read_dicom(path, series=series))


def dicom_info(path: str | Path) -> list[dict[str, Any]]:
    """Shape, stored dtype, geometry and modality of each series from the headers alone.

    No pixel data is decoded (``info`` on a folder of several series costs its headers).

    Returns
    -------
    list of dict
        Per series, in :func:`read_dicom` order: ``name``, ``shape`` ``(i, j, k[, samples])``
        (missing slices counted), ``dtype`` (the stored one; rescaled series say ``float32``
        when slope/intercept are not integers, else ``int16``/``int32`` by the bit depth),
        ``affine``, ``modality``, ``rgb``, ``path``, ``metadata``.
    """
    p = Path(path)
    parts = run_sync(_iter_parts(p))
    out = []
    for label, sub in parts:
        name, modality = _series_name(sub, label)
        frames, affine, spacing = _geometry(sub, name)
        slots = _slots(frames, affine, spacing)
        n = slots[-1] + 1 if slots else len(frames)
        f0 = frames[0]
        shape = (f0.cols, f0.rows, n) + ((f0.samples,) if f0.samples != 1 else ())
        n_files = len({f.path for f in frames})
        meta = _metadata(frames, n_files, spacing, label)
        if slots:
            meta["missing_slices"] = sorted(set(range(n)) - set(slots))
        out.append(
            {
                "name": name,
                "shape": shape,
                "dtype": _stored_dtype(frames),
                "affine": affine,
                "modality": modality,
                "rgb": f0.samples in (3, 4),
                "path": str(Path(f0.path).parent if n_files > 1 else f0.path),
                "metadata": meta,
            }
        )
    return out


def _stored_dtype(frames: list[_Frame]) -> str:
    ds = frames[0].header
    bits = int(_num(ds.get("BitsAllocated"), 16))
    signed = int(_num(ds.get("PixelRepresentation"), 0)) == 1
    if bits == 32 and "FloatPixelData" in ds:
        return "float32"
    if bits == 64 and "DoubleFloatPixelData" in ds:
        return "float64"
    stored = f"{'int' if signed else 'uint'}{max(8, bits)}"
    if all(f.slope == 1 and f.intercept == 0 for f in frames) or frames[0].samples != 1:
        return stored
    if all(float(f.slope).is_integer() and float(f.intercept).is_integer() for f in frames):
        bits_stored = int(_num(ds.get("BitsStored"), bits))
        lo = -(2 ** (bits_stored - 1)) if signed else 0
        hi = 2 ** (bits_stored - 1) - 1 if signed else 2**bits_stored - 1
        ends = [v * f.slope + f.intercept for f in frames for v in (lo, hi)]
        return "int16" if -(2**15) <= min(ends) and max(ends) < 2**15 else "int32"
    return "float32"
