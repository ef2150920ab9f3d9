"""Readers and writers; geometry lives in :mod:`napari_medseg.io.geometry`.

``read_image(path)`` opens any supported file or folder and returns a list of
:class:`~napari_medseg.io.record.ImageRecord` (a DICOM folder may hold several series).
``write_image(path, record)`` writes a record with its geometry, atomically.
"""

from __future__ import annotations

from napari_medseg.errors import ImageReadError, ImageWriteError, MedsegError
from napari_medseg.io.readers import SUPPORTED_EXTENSIONS, read_image, write_image
from napari_medseg.io.record import ImageRecord

__all__ = [
    "SUPPORTED_EXTENSIONS",
    "ImageReadError",
    "ImageRecord",
    "ImageWriteError",
    "MedsegError",
    "read_image",
    "write_image",
]
