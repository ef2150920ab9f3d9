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
    from napari_medseg.io import read_image

    records = read_image(args.image)
    out = [_record_info(r) for r in records]
    print(json.dumps(out[0] if len(out) == 1 else out, indent=2))
    return 0


def _record_info(rec: Any) -> dict:
    return {
        "path": rec.path,
        "name": rec.name,
        "shape": list(rec.shape),
        "dtype": str(rec.data.dtype),
        "spacing": [round(s, 6) for s in rec.spacing],
        "affine": [[float(v) for v in row] for row in rec.affine],
        "orientation": rec.orientation,
        "space": rec.space,
        "modality": rec.modality,
        "rgb": rec.rgb,
        "levels": [list(level.shape) for level in rec.multiscale] if rec.multiscale else None,
    }
