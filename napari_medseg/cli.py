"""The ``napari-medseg`` command line: the same engine as the dock widgets, headless.

Every command exits 0 on success and non-zero with one line on stderr on failure. Long work
shows a text progress bar on stderr (``--quiet`` hides it). See ``napari-medseg --help``.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__


def _info(args: argparse.Namespace) -> int:
    from .io import read_image

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="napari-medseg",
        description="Medical image segmentation for napari, headless. "
        "Images: NIfTI, NRRD, MetaImage, DICOM series folders, PNG/JPEG/TIFF, pyramidal "
        "TIFF/OME-TIFF/SVS.",
    )
    parser.add_argument("--version", action="version", version=f"napari-medseg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "info",
        help="print an image's shape, dtype, spacing, affine, orientation and modality as JSON",
        description="Print JSON with shape, dtype, spacing (mm), affine (file voxel indices "
        "to RAS mm, as nibabel reports), orientation codes and modality. A DICOM folder with "
        "several series prints a list, one object per series.",
    )
    p.add_argument("image", help="image file or DICOM folder")
    p.set_defaults(func=_info)
    for register in _EXTRA_COMMANDS:
        register(sub)
    return parser


_EXTRA_COMMANDS: list = []


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``napari-medseg``; returns the exit code."""
    from .io.errors import MedsegError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    quiet = getattr(args, "quiet", False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore" if quiet else "default")
        warnings.showwarning = _show_warning
        try:
            return int(args.func(args) or 0)
        except MedsegError as e:
            print(f"napari-medseg: error: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("napari-medseg: cancelled", file=sys.stderr)
            return 130
        except (OSError, ValueError, RuntimeError) as e:
            print(f"napari-medseg: error: {type(e).__name__}: {e}", file=sys.stderr)
            return 1


def _show_warning(
    message: Any, category: Any, filename: str, lineno: int, *a: Any, **k: Any
) -> None:
    print(f"napari-medseg: warning: {message}", file=sys.stderr)


def _path(p: str) -> Path:
    return Path(p).expanduser()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
