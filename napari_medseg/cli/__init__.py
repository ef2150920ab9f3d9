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
from typing import Any, NoReturn

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


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr (exit code 2)."""

    def error(self, message: str) -> NoReturn:  # noqa: D102 - argparse's hook
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``napari-medseg`` with every subcommand."""
    parser = _Parser(
        prog="napari-medseg",
        description="Medical image segmentation for napari, headless. "
        "Images: NIfTI, NRRD, MetaImage, DICOM series folders, PNG/JPEG/TIFF, pyramidal "
        "TIFF/OME-TIFF/SVS.",
    )
    parser.add_argument("--version", action="version", version=f"napari-medseg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    for add in _SUBCOMMANDS:
        add(sub)
    debug_help = "on an error, also print the Python traceback (for bug reports)"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    for p in sub.choices.values():  # also accepted after the subcommand
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``napari-medseg``; returns the exit code.

    Every failure ends in one line on stderr and a non-zero exit code: 2 for bad arguments,
    1 for errors, 130 when interrupted; ``--debug`` adds the traceback.
    """
    from napari_medseg.errors import MedsegError

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a bad argument (already reported)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    quiet = getattr(args, "quiet", False)
    debug = getattr(args, "debug", False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore" if quiet else "default")
        for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
            warnings.simplefilter("ignore", category)  # library housekeeping, not for users
        warnings.showwarning = _show_warning
        try:
            return int(args.func(args) or 0)
        except KeyboardInterrupt:
            _report(None, "cancelled", debug)
            return 130
        except MemoryError:
            _report(None, "error: out of memory; crop the image or use a coarser model", debug)
            return 1
        except MedsegError as e:
            _report(e, f"error: {_one_line(e)}", debug)
            return 1
        except (OSError, ValueError, RuntimeError) as e:
            _report(e, f"error: {type(e).__name__}: {_one_line(e)}", debug)
            return 1
        except Exception as e:  # noqa: BLE001 - a bug still ends in one sentence
            hint = "" if debug else " (run again with --debug for the traceback)"
            _report(e, f"error: unexpected {type(e).__name__}: {_one_line(e)}{hint}", debug)
            return 1


def _one_line(e: BaseException, limit: int = 400) -> str:
    """The exception's message on one line (whitespace collapsed, at most ``limit`` chars)."""
    if isinstance(e, OSError) and e.strerror:  # "[Errno 13] ..." -> "Permission denied: path"
        text = f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    else:
        text = str(e)
    text = " ".join(text.split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _report(e: BaseException | None, line: str, debug: bool) -> None:
    """Print ``napari-medseg: <line>`` on stderr, after the traceback with ``--debug``."""
    if debug:
        import traceback

        traceback.print_exc(file=sys.stderr)
    sys.stderr.flush()
    print(f"napari-medseg: {line}", file=sys.stderr)


def _show_warning(
    message: Any, category: Any, filename: str, lineno: int, *a: Any, **k: Any
) -> None:
    print(f"napari-medseg: warning: {message}", file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
