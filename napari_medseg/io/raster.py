"""2D images (PNG, JPEG, TIFF), TIFF stacks and lazy pyramidal slides (tiled TIFF, OME-TIFF, SVS).

Plain images
------------
:func:`read_raster` reads a PNG, JPEG, BMP, GIF or non-pyramidal TIFF into memory:

* 2D images have ``space == "pixel"``, a 3x3 identity ``affine`` (``(row, col)`` to full-resolution
  pixels) and the array in the file order ``(row, col[, channel])``. RGB/RGBA stays RGB(A)
  (``rgb=True``, last axis 3 or 4); grayscale keeps its dtype (16-bit stays ``uint16``); other
  channel axes (``CYX`` TIFF) are moved last (``rgb=False``). ``metadata["mpp"]`` (micrometres
  per pixel) when the file states a physical pixel size.
* Modality is a guess: ``"pathology"`` for RGB (bright-field H&E/IHC), ``"microscopy"`` for
  grayscale or multichannel (fluorescence). A person can change it; nothing depends on it beyond
  default display and preprocessing profiles.
* TIFF stacks with a Z axis (``ZYX``, ImageJ hyperstacks, multi-page TIFF) become volumes
  (``space == "RAS"``) in the file order ``(z, y, x[, extra])`` with the geometry SimpleITK
  gives a TIFF stack: identity direction in LPS, i.e. ``x`` runs to patient left, ``y`` to
  posterior, ``z`` to superior, origin 0. Voxel size is 1 mm unless the file states it (TIFF
  resolution tags, ImageJ ``spacing``/``unit``, OME ``PhysicalSize*``), converted to mm.

Slides
------
:func:`read_slide` opens a tiled/pyramidal TIFF, OME-TIFF or SVS *lazily*: one dask array per
pyramid level, full resolution first, read tile by tile through ``tifffile``'s Zarr store when
napari asks for a region. ``record.data`` is level 0, ``record.multiscale`` the list of levels,
``affine`` the 3x3 identity in full-resolution pixels, axes ``(row, col[, extra][, RGB])``.
A large slide without a pyramid gets one built lazily (2x2 mean per level, computed from the full
resolution when a low level is first shown: slower the first time; a warning says so).

A tile that fails to decode does not stop the viewer: it is returned as zeros and ONE warning
names its region (per tile). Files that cannot be opened raise
:class:`~napari_medseg.errors.ImageReadError`.

:func:`make_pyramidal_tiff` writes test and benchmark slides by tiling a real image, one tile at
a time (the full-resolution image is never in memory).
"""

from __future__ import annotations

import itertools
import re
import threading
import warnings
import weakref
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from napari_medseg.errors import ImageReadError
from napari_medseg.io.limits import check_fits_memory, require_regular_file
from napari_medseg.io.record import ImageRecord

__all__ = [
    "SLIDE_SUFFIXES",
    "SafeLevel",
    "SlideFile",
    "is_labels_zarr",
    "is_slide",
    "make_pyramidal_tiff",
    "open_labels_zarr",
    "read_raster",
    "read_slide",
    "synthetic_slide_region",
]

#: Suffixes read by tifffile (TIFF and slide formats built on TIFF).
SLIDE_SUFFIXES = (".tif", ".tiff", ".svs", ".ndpi", ".scn", ".bif", ".btf", ".tf8", ".qptiff")
#: Suffixes read with Pillow.
PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
#: A tiled single-level image larger than this (pixels along a side) is treated as a slide.
SLIDE_MIN_SIDE = 4096
#: Any single-level image with more pixels than this is treated as a slide (read lazily).
SLIDE_MIN_PIXELS = 1 << 27
#: Lazy pyramids stop when the lowest level fits in this many pixels along its longer side.
PYRAMID_TOP = 1024
#: Target side (pixels) of one dask chunk of a slide level (a multiple of the tile size).
CHUNK_SIDE = 1024

_UNIT_TO_UM = {
    "pm": 1e-6, "nm": 1e-3, "µm": 1.0, "um": 1.0, "micron": 1.0, "microns": 1.0,
    "\\u00b5m": 1.0, "mm": 1e3, "cm": 1e4, "m": 1e6, "in": 25400.0, "inch": 25400.0,
}  # fmt: skip


def _suffix(path: Path) -> str:
    return path.suffix.lower()


# --------------------------------------------------------------------------- physical size


def _to_um(value: float, unit: str | None) -> float | None:
    if value is None or not np.isfinite(value) or value <= 0:
        return None
    u = (unit or "µm").strip().lower().replace("\u03bc", "µ")
    factor = _UNIT_TO_UM.get(u)
    return None if factor is None else float(value) * factor


def _ome_physical_sizes(tf: Any) -> dict[str, float]:
    """``{"X": um, "Y": um, "Z": um}`` of the first OME image (only those present)."""
    xml = tf.ome_metadata
    if not xml:
        return {}
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return {}
    for el in root.iter():
        if el.tag.endswith("Pixels"):
            out = {}
            for ax in "XYZ":
                v = el.get(f"PhysicalSize{ax}")
                if v is not None:
                    um = _to_um(float(v), el.get(f"PhysicalSize{ax}Unit"))
                    if um:
                        out[ax] = um
            return out
    return {}


def _tag_mpp(page: Any, imagej: dict | None = None) -> tuple[float | None, float | None]:
    """Micrometres per pixel (x, y) from TIFF resolution tags (and the ImageJ unit)."""
    try:
        xres, yres = (float(v) for v in page.resolution)
        unit = int(page.resolutionunit)
    except Exception:  # noqa: BLE001
        return None, None
    if unit == 2:  # inch
        per = 25400.0
    elif unit == 3:  # centimetre
        per = 1e4
    elif imagej and imagej.get("unit"):  # ImageJ: pixels per 'unit' in the description
        per = _to_um(1.0, str(imagej["unit"]))
    else:
        per = None
    # tifffile and others write (1, 1) when nothing is known
    if per is None or (xres, yres) == (1.0, 1.0):
        return None, None
    mx = per / xres if xres > 0 else None
    my = per / yres if yres > 0 else None
    return mx, my


def _slide_metadata(tf: Any, page: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    mpp = None
    if getattr(tf, "is_ome", False):
        meta["format"] = "ome-tiff"
        sizes = _ome_physical_sizes(tf)
        mpp = sizes.get("X")
        if "Y" in sizes and mpp and abs(sizes["Y"] - mpp) > 1e-9 * mpp:
            meta["mpp_y"] = sizes["Y"]
    elif getattr(tf, "is_svs", False):
        meta["format"] = "svs"
        desc = page.description or ""
        m = re.search(r"MPP\s*=\s*([0-9.eE+-]+)", desc)
        if m:
            mpp = float(m.group(1))
        m = re.search(r"AppMag\s*=\s*([0-9.eE+-]+)", desc)
        if m:
            meta["objective_power"] = float(m.group(1))
    else:
        meta["format"] = "ndpi" if getattr(tf, "is_ndpi", False) else "tiff"
    if mpp is None:
        mx, my = _tag_mpp(page, tf.imagej_metadata if getattr(tf, "is_imagej", False) else None)
        mpp = mx
        if my is not None and mx is not None and abs(my - mx) > 1e-9 * mx:
            meta["mpp_y"] = my
    meta["mpp"] = float(mpp) if mpp else None
    return meta


# --------------------------------------------------------------------------- plain images


def _read_pil(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.seek(0)
            mode = im.mode
            if mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            elif mode in ("LA", "La"):
                im = im.convert("L")
            elif mode in ("CMYK", "YCbCr", "LAB", "HSV", "RGBX", "PA"):
                im = im.convert("RGB")
            elif mode == "1":
                im = im.convert("L")
            arr = np.asarray(im)
    except UnidentifiedImageError as exc:
        raise ImageReadError(f"{path.name} is not an image file that can be read.") from exc
    except Image.DecompressionBombError as exc:
        raise ImageReadError(
            f"{path.name} is too large to open as a plain image; convert it to a tiled pyramidal "
            "TIFF and open that."
        ) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(f"{path.name} is damaged or truncated and cannot be read.") from exc
    if arr.dtype == np.int32 and mode.startswith("I;16"):
        arr = arr.astype(np.uint16)
    return np.array(arr)  # writable copy, never a view on Pillow's buffer


def _open_tiff(path: Path) -> Any:
    import tifffile

    try:
        tf = tifffile.TiffFile(path)
        _ = tf.series[0].shape  # parse the first series now, so broken files fail here
        return tf
    except ImageReadError:
        raise
    except Exception as exc:  # noqa: BLE001 - tifffile raises many types for broken files
        raise ImageReadError(f"{path.name} is not a readable TIFF file ({exc}).") from exc


def _spatial_axes(axes: str) -> tuple[str | None, int, int]:
    """Return (depth axis letter or None, row axis index, col axis index) of a tifffile axes str."""
    y, x = axes.find("Y"), axes.find("X")
    if y < 0 or x < 0:
        raise ImageReadError(f"TIFF axes {axes!r} have no Y and X; it is not an image.")
    for cand in ("Z", "I", "Q"):
        if cand in axes:
            return cand, y, x
    return None, y, x


def read_raster(path: str | Path) -> ImageRecord:
    """Read a 2D image (or a TIFF stack) into memory.

    Parameters
    ----------
    path : str or Path
        PNG, JPEG, BMP, GIF, WebP or TIFF. A pyramidal or very large TIFF is handed to
        :func:`read_slide` (lazy) instead.

    Returns
    -------
    ImageRecord
        2D: ``space="pixel"``, ``data`` ``(row, col[, channel|RGB])``, identity 3x3 affine,
        modality ``"pathology"`` for RGB and ``"microscopy"`` otherwise. 3D TIFF stacks:
        ``space="RAS"``, ``data`` ``(z, y, x[, extra])`` with an LPS-identity affine (see module
        docstring).

    Raises
    ------
    ImageReadError
        Missing, unreadable, truncated or not an image.
    """
    p = Path(path)
    if not p.is_file():
        raise ImageReadError(f"{p} does not exist or is not a file.")
    if _suffix(p) in SLIDE_SUFFIXES:
        if is_slide(p):
            return read_slide(p)
        return _read_tiff(p)
    arr = _read_pil(p)
    return _record_2d(arr, p, rgb=arr.ndim == 3 and arr.shape[-1] in (3, 4), mpp=None)


def _record_2d(arr: np.ndarray, p: Path, rgb: bool, mpp: float | None, **extra: Any) -> ImageRecord:
    meta = {"format": _suffix(p).lstrip("."), "mpp": mpp, "dtype": str(arr.dtype), **extra}
    return ImageRecord(
        data=arr,
        affine=np.eye(3),
        space="pixel",
        modality="pathology" if rgb else "microscopy",
        name=p.name.split(".")[0] or p.stem,
        path=str(p),
        rgb=rgb,
        metadata=meta,
    )


def _check_tiff_payload(series: Any, p: Path) -> None:
    """Before decoding: every page's data inside the file, the decoded stack within memory."""
    size = p.stat().st_size
    for page in series.pages:
        if page is None:
            continue
        try:
            ends = [int(o) + int(c) for o, c in zip(page.dataoffsets, page.databytecounts) if o]
        except Exception:  # noqa: BLE001 - a page tifffile cannot describe fails when decoded
            continue
        if ends and max(ends) > size:
            raise ImageReadError(
                f"{p.name} could not be read: it is truncated (its image data ends "
                f"{max(ends) - size} bytes past the end of the file)."
            )
    shape = tuple(int(v) for v in series.shape)
    check_fits_memory(p.name, int(np.prod(shape)) * np.dtype(series.dtype).itemsize, shape)


def tiff_info(path: str | Path) -> dict[str, Any]:
    """What :func:`read_raster` would return for a (non-slide) TIFF, from its tags alone.

    Returns
    -------
    dict
        ``name``, ``path``, ``shape`` (axis order as :func:`read_raster` gives it), ``dtype``,
        ``affine``, ``space``, ``modality``, ``rgb``, ``metadata``. No pixel is decoded (a
        zlib-compressed stack of a gigabyte costs its tags).
    """
    p = Path(path)
    require_regular_file(p)
    rec = _read_tiff(p, header_only=True)  # data: a zero-stride view, shape and dtype only
    return {
        "name": rec.name,
        "path": rec.path,
        "shape": rec.shape,
        "dtype": str(rec.data.dtype),
        "affine": rec.affine,
        "space": rec.space,
        "modality": rec.modality,
        "rgb": rec.rgb,
        "metadata": rec.metadata,
    }


def _read_tiff(p: Path, header_only: bool = False) -> ImageRecord:
    tf = _open_tiff(p)
    with tf:
        series = tf.series[0]
        axes = series.axes
        page = series.keyframe
        if header_only:
            arr = np.broadcast_to(np.zeros((), series.dtype), tuple(series.shape))
        else:
            _check_tiff_payload(series, p)
            try:
                arr = series.asarray()
            except Exception as exc:  # noqa: BLE001
                raise ImageReadError(
                    f"{p.name} is damaged or truncated and cannot be read."
                ) from exc
        imagej = tf.imagej_metadata if tf.is_imagej else None
        ome = _ome_physical_sizes(tf) if tf.is_ome else {}
        mx, my = _tag_mpp(page, imagej)
        photometric_rgb = int(getattr(page, "photometric", 0)) == 2
    depth, _y, _x = _spatial_axes(axes)
    # RGB samples ('S' axis) last, stays RGB when it is 3 or 4 long
    rgb = False
    if "S" in axes:
        s = axes.index("S")
        arr = np.moveaxis(arr, s, -1)
        axes = axes[:s] + axes[s + 1 :] + "S"
        rgb = arr.shape[-1] in (3, 4)
    elif "C" in axes and photometric_rgb and arr.shape[axes.index("C")] in (3, 4):
        c = axes.index("C")
        arr = np.moveaxis(arr, c, -1)
        axes = axes[:c] + axes[c + 1 :] + "S"
        rgb = True
    if depth is None:
        # 2D: (Y, X, other..., S)
        order = [axes.index("Y"), axes.index("X")]
        order += [i for i, a in enumerate(axes) if a not in "YXS"]
        order += [axes.index("S")] if "S" in axes else []
        if order != sorted(order):
            arr = (
                arr.transpose(order) if header_only else np.ascontiguousarray(arr.transpose(order))
            )
        mpp = ome.get("X") or mx
        return _record_2d(arr, p, rgb=rgb, mpp=mpp, axes="".join(axes[i] for i in order))
    # 3D stack: (Z, Y, X, other..., S), geometry in LPS with identity direction
    order = [axes.index(depth), axes.index("Y"), axes.index("X")]
    order += [i for i, a in enumerate(axes) if a not in (depth, "Y", "X", "S")]
    order += [axes.index("S")] if "S" in axes else []
    if order != list(range(len(order))):
        arr = arr.transpose(order)
    sx_um = ome.get("X") or mx
    sy_um = ome.get("Y") or my or sx_um
    sz_um = ome.get("Z")
    if sz_um is None and imagej and imagej.get("spacing"):
        sz_um = _to_um(float(imagej["spacing"]), str(imagej.get("unit") or ""))
    sx = (sx_um or 1e3) / 1e3
    sy = (sy_um or 1e3) / 1e3
    sz = (sz_um or 1e3) / 1e3
    from napari_medseg.io.geometry import affine_from_itk

    # ITK direction for voxel axes (x, y, z) = identity; our file axes are (z, y, x)
    lps_cols = np.array([[0.0, 0, 1], [0, 1, 0], [1, 0, 0]]).T  # columns: z -> S, y -> P, x -> L
    affine = affine_from_itk((0.0, 0.0, 0.0), (sz, sy, sx), lps_cols)
    return ImageRecord(
        data=arr,
        affine=affine,
        space="RAS",
        modality="pathology" if rgb else "microscopy",
        name=p.name.split(".")[0] or p.stem,
        path=str(p),
        rgb=rgb,
        metadata={
            "format": "tiff",
            "axes": "".join(axes[i] for i in order),
            "spacing_um": [sz_um, sy_um, sx_um],
            "dtype": str(arr.dtype),
        },
    )


# --------------------------------------------------------------------------- slides


class SafeLevel:
    """Array-like over one Zarr level that turns tile decode failures into zeros plus a warning.

    ``dask.array.from_array`` calls ``__getitem__`` with a tuple of slices. The whole region is
    read through Zarr; if that fails, it is read again chunk by chunk (tile by tile) and the
    chunks that still fail are left as zeros, each reported once.

    Parameters
    ----------
    zarr_array : zarr.Array
        One level of ``TiffPageSeries.aszarr(level=...)`` opened with ``zarr.open``.
    axes : str
        The level's tifffile axes (e.g. ``"YXS"``); indexing follows this order.
    level : int
        Pyramid level (0 = full resolution), for messages.
    name : str
        File name, for messages.
    reported : set
        Shared set of ``(level, chunk index)`` already warned about; failed chunks are added.
    owner : SlideFile
        Keeps the open file alive as long as this level is.

    Attributes
    ----------
    shape, dtype, ndim, chunks : the level's (chunks = the TIFF tile, in ``axes`` order).
    """

    def __init__(
        self, zarr_array: Any, axes: str, level: int, name: str, reported: set, owner: Any
    ) -> None:
        self._z = zarr_array
        self._owner = owner  # the open file stays open while any level is alive
        self.shape = tuple(int(s) for s in zarr_array.shape)
        self.dtype = np.dtype(zarr_array.dtype)
        self.ndim = len(self.shape)
        self.chunks = tuple(int(c) for c in zarr_array.chunks)
        self.axes = axes
        self.level = level
        self.name = name
        self._reported = reported
        self._lock = threading.Lock()

    def __getitem__(self, key: Any) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        key = key + (slice(None),) * (self.ndim - len(key))
        try:
            return np.asarray(self._z[key])
        except (MemoryError, KeyboardInterrupt):
            raise
        except Exception:  # noqa: BLE001 - any decode failure: retry tile by tile
            pass
        drop = [i for i, k in enumerate(key) if isinstance(k, (int, np.integer))]
        slices = []
        for k, n in zip(key, self.shape):
            if isinstance(k, (int, np.integer)):
                k = slice(int(k), int(k) + 1)
            if not isinstance(k, slice) or k.indices(n)[2] != 1:
                raise ImageReadError(f"{self.name}: unsupported slide indexing {key!r}.")
            start, stop, _ = k.indices(n)
            slices.append((start, max(start, stop)))
        out = np.zeros([b - a for a, b in slices], dtype=self.dtype)
        ranges = [
            range(a // c, (b - 1) // c + 1) if b > a else range(0)
            for (a, b), c in zip(slices, self.chunks)
        ]
        for idx in itertools.product(*ranges):
            lo = [max(i * c, a) for i, c, (a, _b) in zip(idx, self.chunks, slices)]
            hi = [min((i + 1) * c, b) for i, c, (_a, b) in zip(idx, self.chunks, slices)]
            sel = tuple(slice(low, high) for low, high in zip(lo, hi))
            try:
                block = np.asarray(self._z[sel])
            except (MemoryError, KeyboardInterrupt):
                raise
            except Exception as exc:  # noqa: BLE001
                self._report(idx, exc)
                continue
            dst = tuple(slice(low - a, high - a) for low, high, (a, _b) in zip(lo, hi, slices))
            out[dst] = block
        if drop:
            out = out.reshape([s for i, s in enumerate(out.shape) if i not in drop])
        return out

    def _report(self, idx: tuple, exc: Exception) -> None:
        with self._lock:
            key = (self.level, idx)
            if key in self._reported:
                return
            self._reported.add(key)
        parts = []
        for ax, i, c, n in zip(self.axes, idx, self.chunks, self.shape):
            if ax in "YX":
                word = "rows" if ax == "Y" else "columns"
                parts.append(f"{word} {i * c}-{min((i + 1) * c, n)}")
        region = ", ".join(parts) or f"chunk {idx}"
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        warnings.warn(
            f"Could not decode the tile at {region} of level {self.level} of {self.name} "
            f"({msg}); it is shown as zeros.",
            RuntimeWarning,
            stacklevel=2,
        )


def _chunk_side(tile: int, size: int) -> int:
    if tile >= size:
        return size
    k = max(1, CHUNK_SIDE // tile)
    return min(size, k * tile)


class SlideFile:
    """Owns the open TiffFile of a slide; closes it when the last level array is gone."""

    def __init__(self, tf: Any) -> None:
        self.tf = tf
        weakref.finalize(self, tf.close)


# The names before they were public (tests/io/test_raster.py patches ``_SafeLevel``).
_SafeLevel = SafeLevel
_SlideFile = SlideFile


def _level_dask(
    series: Any, level: int, name: str, token: str, reported: set, owner: SlideFile
) -> Any:
    """One pyramid level as a dask array in the series' own axis order."""
    import dask.array as da
    import zarr

    lvl = series.levels[level]
    axes = lvl.axes
    store = series.aszarr(level=level)
    z = zarr.open(store, mode="r")
    safe = SafeLevel(z, axes, level, name, reported, owner)
    chunks = []
    for ax, c, n in zip(axes, safe.chunks, safe.shape):
        # tiles: a few tiles per chunk; strips (chunk as wide as the image): whole rows
        chunks.append(_chunk_side(c, n) if ax in "YX" else n)
    arr = da.from_array(
        safe,
        chunks=tuple(chunks),
        name=f"medseg-slide-{token}-{level}",
        lock=False,
        asarray=True,
        meta=np.empty((0,) * safe.ndim, dtype=safe.dtype),
    )
    return arr


def _to_yx_last_s(arr: Any, axes: str) -> tuple[Any, str]:
    """Drop length-1 non-spatial axes; order (Y, X, other..., S)."""
    index = tuple(
        0 if (a not in "YXS" and arr.shape[i] == 1) else slice(None) for i, a in enumerate(axes)
    )
    if any(isinstance(i, int) for i in index):
        arr = arr[index]
        axes = "".join(a for a, i in zip(axes, index) if not isinstance(i, int))
    order = [axes.index("Y"), axes.index("X")]
    order += [i for i, a in enumerate(axes) if a not in "YXS"]
    order += [axes.index("S")] if "S" in axes else []
    if order != list(range(len(order))):
        arr = arr.transpose(order)
    return arr, "".join(axes[i] for i in order)


def _lazy_pyramid(level0: Any) -> list:
    """2x2-mean levels of a dask array ``(Y, X, ...)`` until the longer side is <= PYRAMID_TOP."""
    import dask.array as da

    levels = [level0]
    cur = level0
    while max(cur.shape[0], cur.shape[1]) > PYRAMID_TOP and min(cur.shape[0], cur.shape[1]) >= 2:
        dtype = cur.dtype
        nxt = da.coarsen(np.mean, cur, {0: 2, 1: 2}, trim_excess=True)
        if np.issubdtype(dtype, np.integer):
            nxt = da.round(nxt)
        nxt = nxt.astype(dtype)
        side = (CHUNK_SIDE, CHUNK_SIDE, *(-1 for _ in range(cur.ndim - 2)))
        nxt = nxt.rechunk(side)
        levels.append(nxt)
        cur = nxt
    return levels


def _check_complete(series: Any, file_size: int, name: str) -> None:
    """Raise when the full-resolution image data ends past the end of the file (truncated)."""
    page = series.levels[0].keyframe
    try:
        ends = [int(o) + int(c) for o, c in zip(page.dataoffsets, page.databytecounts) if o]
    except Exception:  # noqa: BLE001
        return
    if ends and max(ends) > file_size:
        raise ImageReadError(
            f"{name} is truncated: its image data ends {max(ends) - file_size} bytes past the "
            "end of the file."
        )


def read_slide(path: str | Path) -> ImageRecord:
    """Open a tiled/pyramidal TIFF, OME-TIFF or SVS lazily as a multiscale record.

    Parameters
    ----------
    path : str or Path
        A TIFF-based slide (``.tif``, ``.tiff``, ``.ome.tif``, ``.svs``, ``.ndpi``, ...).

    Returns
    -------
    ImageRecord
        ``data``: full-resolution dask array ``(row, col[, extra][, RGB])``; ``multiscale``: the
        levels, full resolution first (``None`` for a small single-level image);
        ``space="pixel"``, identity 3x3 affine in full-resolution pixels; ``rgb`` for 3/4
        samples; ``metadata`` with ``mpp`` (µm per pixel or ``None``), ``levels`` (shapes),
        ``downsamples``, ``tile``, ``format`` and ``lazy_pyramid`` (True when the pyramid was
        computed on the fly because the file has none). Nothing is read from pixel data until a
        region is computed.

    Raises
    ------
    ImageReadError
        The file does not exist, is not a TIFF or its structure cannot be parsed.
    """
    p = Path(path)
    if not p.is_file():
        raise ImageReadError(f"{p} does not exist or is not a file.")
    tf = _open_tiff(p)
    try:
        series = tf.series[0]
        page = series.keyframe
        meta = _slide_metadata(tf, page)
        st = p.stat()
        token = f"{abs(hash((str(p.resolve()), st.st_mtime_ns, st.st_size))):x}"
        reported: set = set()
        owner = SlideFile(tf)
        _check_complete(series, st.st_size, p.name)
        levels = []
        axes_out = ""
        for i in range(len(series.levels)):
            try:
                arr = _level_dask(series, i, p.name, token, reported, owner)
            except Exception as exc:  # noqa: BLE001
                if i == 0:
                    raise ImageReadError(f"{p.name} cannot be read as a slide ({exc}).") from exc
                warnings.warn(
                    f"Level {i} of {p.name} cannot be read ({exc}); lower levels are skipped.",
                    RuntimeWarning,
                    stacklevel=2,
                )
                break
            arr, axes_out = _to_yx_last_s(arr, series.levels[i].axes)
            if levels and arr.ndim != levels[0].ndim:
                break
            levels.append(arr)
    except ImageReadError:
        tf.close()
        raise
    except Exception as exc:  # noqa: BLE001
        tf.close()
        raise ImageReadError(f"{p.name} cannot be read as a slide ({exc}).") from exc
    rgb = axes_out.endswith("S") and levels[0].shape[-1] in (3, 4)
    lazy = False
    h0, w0 = levels[0].shape[:2]
    if len(levels) == 1 and max(h0, w0) > SLIDE_MIN_SIDE:
        warnings.warn(
            f"{p.name} has no pyramid ({w0}x{h0} pixels); lower resolutions are computed on the "
            "fly from the full resolution, so zooming out is slow the first time. Convert it to a "
            "pyramidal TIFF for fast viewing.",
            UserWarning,
            stacklevel=2,
        )
        levels = _lazy_pyramid(levels[0])
        lazy = True
    tile = None
    if page.is_tiled:
        tile = [int(page.tilelength), int(page.tilewidth)]
    meta.update(
        {
            "levels": [[int(s) for s in lv.shape[:2]] for lv in levels],
            "downsamples": [float(h0) / float(lv.shape[0]) for lv in levels],
            "tile": tile,
            "axes": axes_out,
            "dtype": str(levels[0].dtype),
            "lazy_pyramid": lazy,
            "n_series": len(tf.series),
        }
    )
    return ImageRecord(
        data=levels[0],
        affine=np.eye(3),
        space="pixel",
        modality="pathology" if rgb else "microscopy",
        name=p.name.split(".")[0] or p.stem,
        path=str(p),
        rgb=rgb,
        multiscale=levels if len(levels) > 1 else None,
        metadata=meta,
    )


def is_slide(path: str | Path) -> bool:
    """Is ``path`` a slide to open lazily (a pyramid, or a large tiled/huge TIFF)?

    True for a TIFF-based file whose first series has more than one level, or whose full
    resolution is tiled and longer than :data:`SLIDE_MIN_SIDE` pixels on a side, or holds more
    than :data:`SLIDE_MIN_PIXELS` pixels whatever its layout. False for anything else, including
    files that cannot be opened.
    """
    p = Path(path)
    if not p.is_file() or _suffix(p) not in SLIDE_SUFFIXES:
        return False
    import tifffile

    try:
        with tifffile.TiffFile(p) as tf:
            series = tf.series[0]
            if len(series.levels) > 1:
                return True
            page = series.keyframe
            h, w = int(page.imagelength), int(page.imagewidth)
            if page.is_tiled and max(h, w) > SLIDE_MIN_SIDE:
                return True
            return h * w > SLIDE_MIN_PIXELS
    except Exception:  # noqa: BLE001
        return False


# --------------------------------------------------------------------------- test slides


def _periodic_box_mean(img: np.ndarray, f: int) -> np.ndarray:
    """Mean of each ``f x f`` block of the periodic tiling of ``img``, per start residue.

    ``out[y0, x0] = mean(tiling[y0 : y0 + f, x0 : x0 + f])``, for ``0 <= y0 < h``,
    ``0 <= x0 < w``; exact for any ``f`` (also larger than the tile).
    """
    out = img.astype(np.float64)
    for axis in (0, 1):
        n = out.shape[axis]
        q, r = divmod(f, n)
        total = out.sum(axis=axis, keepdims=True)
        doubled = np.concatenate([out, out], axis=axis)
        csum = np.cumsum(doubled, axis=axis)
        zero = np.zeros_like(total)
        csum = np.concatenate([zero, csum], axis=axis)
        idx = np.arange(n)
        part = np.take(csum, idx + r, axis=axis) - np.take(csum, idx, axis=axis)
        out = (q * total + part) / f
    return out


def synthetic_slide_region(
    tile_image: np.ndarray, rows: tuple[int, int], cols: tuple[int, int], level: int = 0
) -> np.ndarray:
    """Pixels of the virtual slide :func:`make_pyramidal_tiff` writes (before compression).

    Parameters
    ----------
    tile_image : (h, w[, c]) array
        The image tiled periodically over the full-resolution plane.
    rows, cols : (start, stop)
        Region in pixels *of the requested level*.
    level : int
        Pyramid level; level ``l`` is the exact ``2**l x 2**l`` mean of full resolution.

    Returns
    -------
    numpy.ndarray
        ``(rows, cols[, c])`` in the tile's dtype (rounded).
    """
    f = 2**level
    src = tile_image if f == 1 else _periodic_box_mean(tile_image, f)
    h, w = tile_image.shape[:2]
    yy = (np.arange(rows[0], rows[1]) * f) % h
    xx = (np.arange(cols[0], cols[1]) * f) % w
    out = src[yy][:, xx]
    if f != 1 and np.issubdtype(tile_image.dtype, np.integer):
        out = np.round(out)
    return out.astype(tile_image.dtype)


def _tiles(src: np.ndarray, f: int, shape: tuple[int, int], tile: int, dtype: Any) -> Iterator:
    h, w = src.shape[:2]
    for ty in range(0, shape[0], tile):
        yy = ((np.arange(ty, ty + tile)) * f) % h
        rows = src[yy]
        for tx in range(0, shape[1], tile):
            xx = ((np.arange(tx, tx + tile)) * f) % w
            t = rows[:, xx]
            if t.dtype != dtype:
                t = np.round(t).astype(dtype) if np.issubdtype(dtype, np.integer) else t
            yield np.ascontiguousarray(t, dtype=dtype)


def make_pyramidal_tiff(
    path: str | Path,
    tile_image: np.ndarray,
    size: tuple[int, int],
    tile: int = 512,
    levels: int | None = None,
    compression: str | None = "jpeg",
    ome: bool = False,
    mpp: float | None = 0.25,
    quality: int = 90,
) -> Path:
    """Write a tiled, pyramidal (Big)TIFF by tiling ``tile_image``, one tile at a time.

    The full-resolution plane is the periodic tiling of ``tile_image``; level ``l`` is its exact
    ``2**l x 2**l`` mean (see :func:`synthetic_slide_region`), written in SubIFDs of level 0
    (the layout of OME-TIFF pyramids, which tifffile also reads for plain TIFF). No level is ever
    held in memory: tiles are produced by a generator.

    Parameters
    ----------
    path : str or Path
        Output file (``.ome.tif`` recommended when ``ome``).
    tile_image : (h, w, 3) or (h, w) uint8/uint16 array
        A real image (e.g. an H&E tile) to repeat.
    size : (height, width)
        Full-resolution size in pixels.
    tile : int
        Tile side in pixels (multiple of 16).
    levels : int, optional
        Number of levels including full resolution; by default halve until the level fits in
        one tile.
    compression : str or None
        ``"jpeg"`` (RGB/uint8 only), ``"zlib"``, ``"lzw"``, ``None``... as tifffile accepts.
    ome : bool
        Write OME-XML metadata (PhysicalSizeX/Y in µm) instead of tifffile's shaped JSON.
    mpp : float or None
        Micrometres per pixel at full resolution (also written as TIFF resolution tags).
    quality : int
        JPEG quality.

    Returns
    -------
    Path
        ``path``.
    """
    import tifffile

    p = Path(path)
    img = np.asarray(tile_image)
    h, w = int(size[0]), int(size[1])
    if levels is None:
        levels = 1
        while max(h >> (levels - 1), w >> (levels - 1)) > tile:
            levels += 1
    shapes = [(h >> lv, w >> lv) for lv in range(levels)]
    if min(shapes[-1]) < 1:
        raise ValueError(f"{levels} levels are too many for a {h}x{w} image")
    rgb = img.ndim == 3
    extra = img.shape[2:] if rgb else ()
    opts: dict[str, Any] = {
        "tile": (tile, tile),
        "photometric": "rgb" if rgb and img.shape[2] in (3, 4) else "minisblack",
        "compression": compression,
        "dtype": img.dtype,
    }
    if compression == "jpeg":
        opts["compressionargs"] = {"level": int(quality)}
    if rgb and img.shape[2] == 4:
        opts["extrasamples"] = ("unassalpha",)
    metadata: dict[str, Any] | None = None
    if ome:
        metadata = {"axes": "YXS" if rgb else "YX"}
        if mpp:
            metadata.update(
                PhysicalSizeX=mpp, PhysicalSizeXUnit="µm", PhysicalSizeY=mpp,
                PhysicalSizeYUnit="µm",
            )  # fmt: skip
    else:
        metadata = None  # no description: tifffile reads SubIFD pyramids as a "generic" series
    from napari_medseg._files import atomic_path

    with atomic_path(p) as tmp:
        with tifffile.TiffWriter(tmp, bigtiff=True, ome=ome) as tw:
            for lv, shape in enumerate(shapes):
                f = 2**lv
                src = img if f == 1 else _periodic_box_mean(img, f)
                kw = dict(opts)
                if mpp:
                    kw["resolution"] = (1e4 / (mpp * f), 1e4 / (mpp * f))
                    kw["resolutionunit"] = "CENTIMETER"
                if lv == 0:
                    kw["subifds"] = levels - 1
                    kw["metadata"] = metadata
                else:
                    kw["subfiletype"] = 1
                    kw["metadata"] = None
                tw.write(_tiles(src, f, shape, tile, img.dtype), shape=(*shape, *extra), **kw)
    return p


# --------------------------------------------------------------------------- results


def is_labels_zarr(path: str | Path) -> bool:
    """True for a folder holding napari-medseg's OME-Zarr multiscale labels (a slide result)."""
    p = Path(path)
    if not (p.is_dir() and p.name.lower().rstrip("/").endswith(".zarr")):
        return False
    try:
        import json

        attrs = json.loads((p / "zarr.json").read_text()).get("attributes", {})
        return bool(attrs.get("ome", {}).get("multiscales"))
    except (OSError, ValueError):
        return False


def open_labels_zarr(path: str | Path) -> tuple[list, dict]:
    """The levels and attributes of OME-Zarr multiscale labels (a whole-slide result).

    Returns
    -------
    levels : list of dask.array.Array
        ``(rows, cols)`` integer labels, level 0 (the slide's full-resolution pixel grid)
        first, each level half the previous; lazy (read chunk by chunk).
    attrs : dict
        The group attributes (``ome`` metadata, ``class_names``, ``complete``, provenance...).
    """
    import dask.array as da
    import zarr

    p = Path(path)
    if not p.exists():
        raise ImageReadError(f"{p} does not exist")
    try:
        g = zarr.open_group(str(p), mode="r")
        attrs = dict(g.attrs)
        ms = attrs["ome"]["multiscales"][0]
        return [da.from_zarr(g[d["path"]]) for d in ms["datasets"]], attrs
    except Exception as exc:  # noqa: BLE001
        raise ImageReadError(
            f"{p.name} is not a whole-slide result written by napari-medseg"
        ) from exc
