"""Helpers shared by the subcommands: common options, output checks, provenance sidecars."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_common(p: argparse.ArgumentParser, device: bool = True) -> None:
    """Add ``--device`` (unless ``device`` is False) and ``--quiet`` to a subcommand."""
    if device:
        p.add_argument(
            "--device",
            default="auto",
            choices=["auto", "cpu", "cuda", "mps"],
            help="compute device",
        )
    p.add_argument("--quiet", action="store_true", help="no progress bar or warnings")


def check_output(path: Path, overwrite: bool) -> Path:
    """Return ``path``, or raise when it exists and ``overwrite`` is False."""
    from napari_medseg.errors import ImageWriteError

    if path.exists() and not overwrite:
        raise ImageWriteError(f"{path} exists; pass --overwrite to replace it.")
    return path


def provenance_path(out: Path) -> Path:
    from napari_medseg._files import split_ext

    stem, _ = split_ext(out)
    return out.with_name(f"{stem}.provenance.json")


def write_json_atomic(path: Path, obj: dict) -> None:
    """Write ``obj`` as indented JSON to ``path`` through a temporary file and a rename."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    tmp.replace(path)


def user_path(p: str) -> Path:
    """A command-line path with ``~`` expanded."""
    return Path(p).expanduser()
