"""The ``napari-medseg info`` subcommand: an image's geometry as JSON."""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_parser(sub: Any) -> None:
    """Add ``info`` to the subcommands."""
    p = sub.add_parser(
        "info",
        help="print an image's shape, dtype, spacing, affine, orientation and modality as JSON",
        description="Print JSON with shape, dtype, spacing (mm), affine (file voxel indices "
        "to RAS mm, as nibabel reports), orientation codes and modality. A DICOM folder with "
        "several series prints a list, one object per series.",
    )
    p.add_argument("image", help="image file or DICOM folder")
    p.set_defaults(func=_info)


def _info(args: argparse.Namespace) -> int:
    from napari_medseg.io.readers import read_info

    # headers only where that is all it needs: no voxel of a NIfTI/NRRD/TIFF/DICOM is decoded
    # beyond one middle slice for the modality guess
    out = read_info(args.image)
    print(json.dumps(out[0] if len(out) == 1 else out, indent=2))
    return 0
