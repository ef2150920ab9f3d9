"""The ``napari-medseg`` command line: the same engine as the dock widgets, headless.

Every command exits 0 on success and non-zero with one line on stderr on failure. Long work
shows a text progress bar on stderr (``--quiet`` hides it). See ``napari-medseg --help``.

Each subcommand lives in its own module with an ``add_parser(sub)`` that adds it.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from napari_medseg import __version__
from napari_medseg.cli import denoise, detect, info, models, register, segment, train, view

_SUBCOMMANDS: list = [
    info.add_parser,
    models.add_parser,
    segment.add_parser,
    train.add_parser,
    view.add_parser,
    view.add_demo_parser,
    register.add_parser,
    denoise.add_parser,
    detect.add_parser,
]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``napari-medseg`` with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="napari-medseg",
        description="Medical image segmentation for napari, headless. "
        "Images: NIfTI, NRRD, MetaImage, DICOM series folders, PNG/JPEG/TIFF, pyramidal "
        "TIFF/OME-TIFF/SVS.",
    )
    parser.add_argument("--version", action="version", version=f"napari-medseg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    for add in _SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``napari-medseg``; returns the exit code."""
    from napari_medseg.errors import MedsegError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    quiet = getattr(args, "quiet", False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore" if quiet else "default")
        for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
            warnings.simplefilter("ignore", category)  # library housekeeping, not for users
        warnings.showwarning = _show_warning
        try:
            return int(args.func(args) or 0)
        except MedsegError as e:
            print(f"napari-medseg: error: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("napari-medseg: cancelled", file=sys.stderr)
            return 130
        except MemoryError:
            print(
                "napari-medseg: error: out of memory; crop the image or use a coarser model",
                file=sys.stderr,
            )
            return 1
        except (OSError, ValueError, RuntimeError) as e:
            print(f"napari-medseg: error: {type(e).__name__}: {e}", file=sys.stderr)
            return 1


def _show_warning(
    message: Any, category: Any, filename: str, lineno: int, *a: Any, **k: Any
) -> None:
    print(f"napari-medseg: warning: {message}", file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
