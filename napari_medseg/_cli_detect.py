"""The ``napari-medseg detect`` subcommand (hooked into :mod:`napari_medseg.cli` by ``register``).

``napari-medseg detect IMAGE -m MODEL -o OUT.csv|OUT.geojson [--threshold T] [--min-size S]
[--nms-iou I] [--min-distance D] [--device auto|cpu|cuda|mps] [--overwrite] [--quiet]``

MODEL is a segmentation model (registry name, model folder, bundle) whose foreground is split
into objects by a distance watershed, or ``classical`` (Gaussian + Otsu + watershed, no
network). The CSV has one row per object (columns in :mod:`napari_medseg.core.detection`);
GeoJSON follows QuPath's convention (2D only). A provenance JSON is written beside OUT.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

__all__ = ["register", "run_detect"]


def register(sub: Any) -> None:
    """Add the ``detect`` subcommand to an ``argparse`` subparsers object."""
    p = sub.add_parser(
        "detect",
        help="detect objects (nuclei, cells, lesions) and write them as CSV or GeoJSON",
        description="Run a segmentation model, split its foreground into objects with a "
        "distance watershed and write one row (CSV) or feature (GeoJSON, QuPath convention, "
        "2D only) per object: score, class, centre in array indices of IMAGE's axis order "
        "(y, x; z, y, x in 3D) and in world units (pixels in 2D, RAS mm in 3D), box, area or "
        "volume. -m classical uses Otsu + watershed instead of a network.",
    )
    p.add_argument("image", help="image file or DICOM folder")
    p.add_argument("-m", "--model", required=True, help="model name, folder, or 'classical'")
    p.add_argument("-o", "--output", required=True, help="output .csv or .geojson")
    p.add_argument(
        "--threshold", type=float, default=0.5, help="keep objects with score >= T (0.5)"
    )
    p.add_argument(
        "--min-size",
        type=float,
        default=0.0,
        help="keep objects with area >= S pixels (2D) or volume >= S mm^3 (3D)",
    )
    p.add_argument(
        "--nms-iou", type=float, default=None, help="drop boxes overlapping a better one above I"
    )
    p.add_argument(
        "--min-distance",
        type=float,
        default=None,
        help="smallest distance between two object centres (px in 2D, mm in 3D; default 4 voxels)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="compute device"
    )
    p.add_argument("--quiet", action="store_true", help="no progress or summary on stderr")
    p.set_defaults(func=run_detect)


def run_detect(args: argparse.Namespace) -> int:
    """Run the subcommand; returns the exit code (errors raise :class:`MedsegError`)."""
    from .core.detection import detect, detect_classical, filter_detections
    from .core.progress import TextProgress, run_sync
    from .io import read_image
    from .io.detections import write_detections
    from .io.errors import ImageWriteError, MedsegError

    out = Path(args.output).expanduser()
    if out.suffix.lower() not in (".csv", ".geojson", ".json"):
        raise ImageWriteError(f"cannot write detections to {out.name}: use .csv or .geojson")
    if out.exists() and not args.overwrite:
        raise ImageWriteError(f"{out} exists; pass --overwrite to replace it.")
    if not 0.0 <= args.threshold <= 1.0:
        raise MedsegError(f"--threshold must be between 0 and 1, not {args.threshold}")
    recs = read_image(Path(args.image).expanduser())
    record = recs[0]
    if len(recs) > 1 and not args.quiet:
        print(
            f"napari-medseg: {args.image} holds {len(recs)} series; using the first "
            f"({record.name})",
            file=sys.stderr,
        )
    if record.spatial_ndim == 3 and out.suffix.lower() != ".csv":
        raise ImageWriteError("GeoJSON (QuPath) export is for 2D images; use a .csv for 3D")
    bar = TextProgress(quiet=args.quiet)
    if args.model == "classical":
        gen = detect_classical(record, min_distance=args.min_distance)
    else:
        from .models.registry import load_model

        model = load_model(args.model, device="cpu")
        if model.card.task != "segmentation":
            raise MedsegError(
                f"model {model.card.name!r} is a {model.card.task} model; detect needs a "
                "segmentation model (its foreground is split into objects)"
            )
        gen = detect(record, model, device=args.device, min_distance=args.min_distance)
    result = run_sync(gen, bar)
    table = filter_detections(
        result.table,
        score_threshold=args.threshold,
        min_size=args.min_size,
        nms_iou=args.nms_iou,
    )
    written = write_detections(
        out,
        table,
        instances=result.instances,
        affine=result.affine if result.space == "pixel" else None,
        class_colors=result.class_colors,
        overwrite=True,
    )
    from .cli import _provenance_path, _write_json_atomic

    prov = dict(result.provenance)
    prov.update(
        input=str(args.image),
        output=str(written),
        filters={"threshold": args.threshold, "min_size": args.min_size, "nms_iou": args.nms_iou},
        n_written=len(table),
    )
    _write_json_atomic(_provenance_path(written), prov)
    if not args.quiet:
        counts = table["class"].value_counts().to_dict() if len(table) else {}
        what = ", ".join(f"{n} {c}" for c, n in counts.items()) or "no objects"
        print(f"wrote {written}: {what} (of {len(result.table)} before filtering)", file=sys.stderr)
    return 0
