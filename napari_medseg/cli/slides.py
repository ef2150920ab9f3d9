"""Whole-slide branch of ``napari-medseg segment`` (called from :mod:`napari_medseg.cli.segment`).

``napari-medseg segment SLIDE -m MODEL -o OUT.zarr|OUT.ome.tif [--tile N] [--margin M]
[--all-tiles] [--level L] [--export-ome-tiff FILE] [--scheduler local|tcp://host:port]
[--batch-size B] [--device ...] [--overwrite] [--quiet]``

Used when SLIDE is a pyramidal/large tiled TIFF (:func:`napari_medseg.io.raster.is_slide`) or
OUT ends with ``.zarr``. Writes OME-Zarr multiscale labels (level 0 on the slide's full
resolution grid, see :mod:`napari_medseg.core.slides.export`) and ``OUT.provenance.json`` beside it
(OUT's whole name + ``.provenance.json``). The Zarr is written under a temporary name beside OUT
and put in OUT's place only when the run succeeds: with ``--overwrite`` a failing or interrupted
run leaves the previous result as it was.
With ``-o OUT.ome.tif`` (or ``.tif``/``.tiff``) the labels go to a temporary Zarr beside OUT,
are exported as a tiled, pyramidal OME-TIFF (:func:`napari_medseg.core.slides.export.
export_labels_ome_tiff`) and the Zarr is removed; ``--export-ome-tiff FILE`` keeps the Zarr
and also writes FILE.
Without ``--scheduler`` the run is in this process; ``--scheduler local`` starts a dask
LocalCluster (2 workers), ``--scheduler tcp://...`` uses an existing dask scheduler.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
from pathlib import Path
from typing import Any

from napari_medseg._files import atomic_dir, temp_sibling
from napari_medseg.cli._common import (
    check_outputs,
    number,
    provenance_path,
    user_path,
    write_json_atomic,
)

__all__ = ["add_options", "is_slide_job", "run_segment_slide"]

_TIFF_SUFFIXES = (".ome.tif", ".ome.tiff", ".tif", ".tiff")


def _is_tiff(path: Path) -> bool:
    return str(path).lower().endswith(_TIFF_SUFFIXES)


def add_options(p: argparse.ArgumentParser) -> None:
    """Slide options of ``segment`` (ignored for ordinary images)."""
    g = p.add_argument_group("whole slides (SLIDE is a pyramidal TIFF or OUT ends with .zarr)")
    g.add_argument(
        "--tile", type=number(int, 16), default=512, help="output tile side in pixels (512)"
    )
    g.add_argument(
        "--margin", type=number(int, 0), default=64, help="context around each tile (64)"
    )
    g.add_argument("--all-tiles", action="store_true", help="also run on background (glass)")
    g.add_argument(
        "--level",
        type=number(int, 0),
        default=None,
        help="pyramid level to run on (default: from the model's spacing and the slide's mpp)",
    )
    g.add_argument(
        "--export-ome-tiff",
        metavar="FILE",
        default=None,
        help="also write the labels as a tiled, pyramidal OME-TIFF (with OUT.zarr)",
    )
    g.add_argument(
        "--scheduler",
        default=None,
        help="run on dask.distributed: 'local' (LocalCluster, 2 workers) or tcp://host:port",
    )


def is_slide_job(src: Path, out: Path) -> bool:
    """True when ``segment`` should take the whole-slide path."""
    from napari_medseg.io.raster import is_slide

    return str(out).lower().rstrip("/").endswith(".zarr") or (src.is_file() and is_slide(src))


def run_segment_slide(args: argparse.Namespace) -> int:
    """Run the whole-slide segmentation for parsed ``segment`` arguments; returns 0."""
    from napari_medseg.core.slides.export import export_labels_ome_tiff
    from napari_medseg.core.slides.segment import segment_slide
    from napari_medseg.errors import MedsegError
    from napari_medseg.io.raster import read_slide
    from napari_medseg.progress import TextProgress, run_sync

    src, out = user_path(args.image), user_path(args.output)
    tiff_out = out if _is_tiff(out) else None
    if tiff_out is None and not str(out).lower().rstrip("/").endswith(".zarr"):
        raise MedsegError(
            f"{src.name} is a slide: its labels are written as OME-Zarr or OME-TIFF; "
            "give an output ending with .zarr or .ome.tif"
        )
    extra = user_path(args.export_ome_tiff) if getattr(args, "export_ome_tiff", None) else None
    if extra is not None and tiff_out is not None:
        raise MedsegError("--export-ome-tiff goes with a .zarr output; OUT is already a TIFF")
    prov_path = provenance_path(out)
    model_path = user_path(args.model)
    check_outputs(
        [out, extra, prov_path],
        [src, model_path if model_path.exists() else None],
        overwrite=args.overwrite,
        folders=[out] if tiff_out is None else (),
        models=[model_path],
    )
    opts: dict[str, Any] = dict(
        tile=args.tile,
        margin=args.margin,
        batch_size=args.batch_size,
        tissue_only=not args.all_tiles,
        level=getattr(args, "level", None),
        overwrite=True,  # a fresh temporary folder of ours
    )
    bar = TextProgress(quiet=args.quiet)
    with contextlib.ExitStack() as stack:
        if tiff_out is None:  # swapped into OUT's place only on success
            zarr_out = stack.enter_context(atomic_dir(out, overwrite=args.overwrite))
        else:  # scratch Zarr for the TIFF export, removed on any exit
            zarr_out = temp_sibling(out.with_name(f"{out.name}.zarr"), folder=True)
            stack.callback(shutil.rmtree, zarr_out, ignore_errors=True)
        if args.scheduler:
            gen = segment_slide(
                src,
                args.model,
                zarr_out,
                scheduler=args.scheduler,
                device=args.device if args.device != "auto" else "cpu",
                **opts,
            )
        else:
            from napari_medseg.models.registry import load_model

            model = load_model(args.model, device="cpu", trust_bundle=args.trust_bundle)
            gen = segment_slide(read_slide(src), model, zarr_out, device=args.device, **opts)
        result = run_sync(gen, bar)
        tif = tiff_out or extra
        if tif is not None:
            run_sync(export_labels_ome_tiff(zarr_out, tif, overwrite=True), bar)
    prov = dict(result.provenance)
    prov.update(
        input=str(src),
        output=str(out),
        tiles_done=result.tiles_done,
        tiles_total=result.tiles_total,
        skipped=result.skipped,
    )
    if extra is not None:
        prov["ome_tiff"] = str(extra)
    write_json_atomic(prov_path, prov)
    if not args.quiet:
        also = f", {extra}" if extra is not None else ""
        print(
            f"wrote {out}{also} ({result.tiles_done} tiles, {len(result.levels)} levels, "
            f"{len(result.skipped)} unreadable) and {prov_path.name}",
            file=sys.stderr,
        )
    return 0
