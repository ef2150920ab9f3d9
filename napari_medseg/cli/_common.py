"""Helpers shared by the subcommands: common options, output checks, provenance sidecars."""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any


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
    """The provenance sidecar of an output: its whole name + ``.provenance.json``.

    ``s2.nii.gz`` -> ``s2.nii.gz.provenance.json``: outputs that share a stem (``s2.nii.gz``
    and ``s2.nrrd``) keep their own sidecars.
    """
    from napari_medseg._files import provenance_path as _sidecar

    return _sidecar(out)


def write_json_atomic(path: Path, obj: dict) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically (``_files.write_text``)."""
    from napari_medseg._files import write_text

    write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def check_outputs(
    outputs: Iterable[Path | None],
    inputs: Iterable[Path | str | None] = (),
    *,
    overwrite: bool = False,
    folders: Iterable[Path] = (),
    created: Iterable[Path] = (),
    models: Iterable[Path | str | None] = (),
) -> None:
    """Check every file a command will write, before any work starts.

    Parameters
    ----------
    outputs : paths (None entries are skipped)
        Every file or folder the command writes: outputs, probabilities, transforms,
        provenance sidecars, points, models.
    inputs : paths (None entries are skipped)
        Every file or folder the command reads; an output may not be one of them, with or
        without ``--overwrite`` (compared after resolving links).
    overwrite : bool
        ``--overwrite``: existing outputs may be replaced.
    folders : paths
        Outputs that are folders (an OME-Zarr, a model folder); any other existing output must
        be a file.
    created : paths
        Folders the command creates before writing (a batch's output folder): outputs inside
        them need no existing parent, only a writable nearest existing ancestor.
    models : paths (None entries are skipped)
        Model folders the command reads (``-m``, ``--init``): no output may be written inside
        one (``-o MODEL/weights...`` would replace the weights being read).

    Raises
    ------
    ImageReadError
        An input does not exist.
    ImageWriteError
        One sentence: an output is an input, is given twice, exists without ``--overwrite``,
        is a folder where a file goes, or its folder is missing or not writable.
    """
    from napari_medseg.errors import ImageWriteError

    given_ins = [p for p in inputs if p]
    ins = [_resolved(Path(p).expanduser()) for p in given_ins]
    for given_in, src in zip(given_ins, ins):
        if not (src.exists() or src.is_symlink()):
            from napari_medseg.errors import ImageReadError

            raise ImageReadError(f"{given_in} does not exist.")
    dirs = {_resolved(Path(p).expanduser()) for p in folders}
    model_dirs = [_resolved(Path(p).expanduser()) for p in models if p]
    model_dirs = [m for m in model_dirs if m.is_dir()]
    made = {_resolved(Path(p).expanduser()) for p in created}
    seen: dict[Path, Path] = {}
    for given in outputs:
        if given is None:
            continue
        given = Path(given).expanduser()
        out = _resolved(given)
        for src in ins:
            if out == src or _same_file(out, src):
                raise ImageWriteError(
                    f"{given} is also an input of this command; write the result elsewhere."
                )
        for m in model_dirs:
            if m in out.parents:
                raise ImageWriteError(
                    f"{given} is inside the model folder {m}; write the result elsewhere."
                )
        if out in seen:
            raise ImageWriteError(f"{given} is given twice as an output; name each output once.")
        seen[out] = given
        if out.exists() or out.is_symlink():
            if out.is_dir() and out not in dirs:
                raise ImageWriteError(f"{given} is a folder; give a file name for this output.")
            if not overwrite:
                raise ImageWriteError(f"{given} exists; pass --overwrite to replace it.")
        parent = out.parent
        while parent in made and not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            what = "is not a folder" if parent.exists() else "does not exist"
            raise ImageWriteError(f"cannot write {given.name}: folder {parent} {what}.")
        if not _writable(parent):
            raise ImageWriteError(f"cannot write {given.name}: folder {parent} is not writable.")


#: What :func:`napari_medseg.io.write_image` writes (2D-only formats last).
IMAGE_OUTPUTS = (".nii.gz", ".nii", ".nrrd", ".mha", ".tif", ".tiff", ".png")


def check_image_outputs(*paths: Path | None) -> None:
    """Refuse, before any work, an image output whose extension no writer takes."""
    from napari_medseg._files import split_ext
    from napari_medseg.errors import ImageWriteError

    for p in paths:
        if p is not None and split_ext(p)[1] not in IMAGE_OUTPUTS:
            raise ImageWriteError(
                f"cannot write {Path(p).name}: name it .nii.gz, .nii, .nrrd or .mha "
                "(.tif/.png for 2D images)."
            )


def _resolved(p: Path) -> Path:
    try:
        return p.resolve()
    except (OSError, RuntimeError):  # a link loop: compare as given
        return p.absolute()


def _same_file(a: Path, b: Path) -> bool:
    """True when ``a`` and ``b`` are the same existing file (hard links too)."""
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _writable(folder: Path) -> bool:
    """Can a file be created in ``folder``? Tried for real (permissions, ACLs, read-only mounts)."""
    from napari_medseg._files import temp_sibling

    if not os.access(folder, os.W_OK | os.X_OK):
        return False
    try:
        temp_sibling(folder / "write-check").unlink()
    except OSError:
        return False
    return True


def number(
    kind: type = float,
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
) -> Callable[[str], Any]:
    """An argparse ``type`` for a finite number in a range (``lo``/``hi`` None: unbounded).

    ``number(int, 1)`` takes whole numbers >= 1; ``number(float, 0, 1, lo_open=True)`` takes
    0 < x <= 1. NaN and infinity are refused. The error names the range and the value given:
    ``argument --batch-size: must be a whole number >= 1, not 0``.
    """
    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {lo:g}")
    if hi is not None:
        parts.append(f"{'<' if hi_open else '<='} {hi:g}")
    noun = "a whole number" if kind is int else "a number"
    want = f"{noun} {' and '.join(parts)}".strip()

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"must be {want}, not {text!r}") from None
        bad = not math.isfinite(value)
        bad = bad or (lo is not None and (value <= lo if lo_open else value < lo))
        bad = bad or (hi is not None and (value >= hi if hi_open else value > hi))
        if bad:
            raise argparse.ArgumentTypeError(f"must be {want}, not {text}")
        return value

    parse.__name__ = noun.split()[-1]
    return parse


def user_path(p: str) -> Path:
    """A command-line path with ``~`` expanded."""
    return Path(p).expanduser()
