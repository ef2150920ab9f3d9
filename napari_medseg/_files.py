"""File helpers every layer may use: extension splitting and atomic writes.

A package-wide leaf: it imports nothing of ``napari_medseg``.
"""

from __future__ import annotations

import os
from pathlib import Path

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
