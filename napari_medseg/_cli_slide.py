"""Whole-slide branch of ``napari-medseg segment`` (called from :func:`napari_medseg.cli._segment`).

``napari-medseg segment SLIDE -m MODEL -o OUT.zarr [--tile N] [--margin M] [--all-tiles]
[--scheduler local|tcp://host:port] [--batch-size B] [--device ...] [--overwrite] [--quiet]``

Used when SLIDE is a pyramidal/large tiled TIFF (:func:`napari_medseg.io.raster.is_slide`) or
OUT ends with ``.zarr``. Writes OME-Zarr multiscale labels (level 0 on the slide's full
resolution grid, see :mod:`napari_medseg.core.wsi`) and ``OUT.provenance.json`` beside it.
Without ``--scheduler`` the run is in this process; ``--scheduler local`` starts a dask
LocalCluster (2 workers), ``--scheduler tcp://...`` uses an existing dask scheduler.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_options", "is_slide_job", "run_segment_slide"]


def add_options(p: argparse.ArgumentParser) -> None:
    """Slide options of ``segment`` (ignored for ordinary images)."""
    g = p.add_argument_group("whole slides (SLIDE is a pyramidal TIFF or OUT ends with .zarr)")
    g.add_argument("--tile", type=int, default=512, help="output tile side in pixels (512)")
    g.add_argument("--margin", type=int, default=64, help="context around each tile (64)")
    g.add_argument("--all-tiles", action="store_true", help="also run on background (glass)")
    g.add_argument(
        "--scheduler",
        default=None,
        help="run on dask.distributed: 'local' (LocalCluster, 2 workers) or tcp://host:port",
    )


def is_slide_job(src: Path, out: Path) -> bool:
    """True when ``segment`` should take the whole-slide path."""
    from .io.raster import is_slide

    return str(out).lower().rstrip("/").endswith(".zarr") or (src.is_file() and is_slide(src))


def run_segment_slide(args: argparse.Namespace) -> int:
    """Run the whole-slide segmentation for parsed ``segment`` arguments; returns 0."""
    from .core.progress import TextProgress, run_sync
    from .core.wsi import segment_slide, segment_slide_dask
    from .io.errors import MedsegError
    from .io.raster import read_slide

    src, out = Path(args.image), Path(args.output)
    if not str(out).lower().rstrip("/").endswith(".zarr"):
        raise MedsegError(
            f"{src.name} is a slide: its labels are written as OME-Zarr; "
            "give an output ending with .zarr"
        )
    if out.exists() and not args.overwrite:
        raise MedsegError(f"{out} exists; pass --overwrite to replace it")
    opts: dict[str, Any] = dict(
        tile=args.tile,
        margin=args.margin,
        batch_size=args.batch_size,
        tissue_only=not args.all_tiles,
        overwrite=args.overwrite,
    )
    bar = TextProgress(quiet=args.quiet)
    if args.scheduler:
        gen = segment_slide_dask(
            src,
            args.model,
            out,
            scheduler=args.scheduler,
            device=args.device if args.device != "auto" else "cpu",
            **opts,
        )
    else:
        from .models.registry import load_model

        model = load_model(args.model, device="cpu", trust_bundle=args.trust_bundle)
        gen = segment_slide(read_slide(src), model, out, device=args.device, **opts)
    result = run_sync(gen, bar)
    prov = dict(result.provenance)
    prov.update(
        input=str(src),
        output=str(out),
        tiles_done=result.tiles_done,
        tiles_total=result.tiles_total,
        skipped=result.skipped,
    )
    name = out.name[: -len(".zarr")] if out.name.lower().endswith(".zarr") else out.name
    prov_path = out.with_name(f"{name}.provenance.json")
    tmp = prov_path.with_name(prov_path.name + ".tmp")
    tmp.write_text(json.dumps(prov, indent=2, default=str) + "\n")
    tmp.replace(prov_path)
    if not args.quiet:
        print(
            f"wrote {out} ({result.tiles_done} tiles, {len(result.levels)} levels, "
            f"{len(result.skipped)} unreadable) and {prov_path.name}",
            file=sys.stderr,
        )
    return 0
