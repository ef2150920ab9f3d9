"""The ``napari-medseg detect`` subcommand (added to :mod:`napari_medseg.cli` by ``add_parser``).

``napari-medseg detect IMAGE -m MODEL -o OUT.csv|OUT.geojson [--threshold T] [--min-size S]
[--nms-iou I] [--min-distance D] [--dark-objects] [--device auto|cpu|cuda|mps] [--overwrite]
[--quiet]`` plus, for slides, ``[--tile N] [--margin M] [--all-tiles] [--level L]
[--border-iou I] [--scheduler local|tcp://host:port]``.

MODEL is a model :func:`napari_medseg.core.detect.detection.detect` runs (a segmentation model whose
foreground is split into objects by a distance watershed, or a detection model), or
``classical`` (Gaussian + Otsu + watershed, no network; ``--dark-objects`` for dark nuclei on a
bright background, e.g. haematoxylin in H&E). The CSV has one row per object (columns in
:mod:`napari_medseg.core.detect.detection`); GeoJSON follows QuPath's convention (2D only). A
provenance JSON (OUT's name + ``.provenance.json``) is written beside OUT.

When IMAGE is a whole slide (:func:`napari_medseg.io.raster.is_slide`) it is searched tile by tile
(:func:`napari_medseg.core.slides.detect.detect_slide`): tissue tiles only, each with a margin,
each object kept by the tile holding its centre, coordinates in level-0 (full-resolution)
pixels; ``--threshold``, ``--min-size`` (level-0 pixels) and ``--nms-iou`` apply per tile.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from napari_medseg.cli._common import check_outputs, number, provenance_path

__all__ = ["add_parser", "run_detect"]


def add_parser(sub: Any) -> None:
    """Add the ``detect`` subcommand to an ``argparse`` subparsers object."""
    p = sub.add_parser(
        "detect",
        help="detect objects (nuclei, cells, lesions) and write them as CSV or GeoJSON",
        description="Find objects and write one row (CSV) or feature (GeoJSON, QuPath "
        "convention, 2D only) per object: score, class, centre in array indices of IMAGE's "
        "axis order (y, x; z, y, x in 3D) and in world units (pixels in 2D, RAS mm in 3D), "
        "box, area or volume. -m takes a box detector (a centre-heatmap model such as the "
        "built-in fluo_nuclei_det_2d: its regressed boxes), a segmentation model (its "
        "foreground split into objects with a distance watershed), or 'classical' (Otsu + "
        "watershed; --stain hematoxylin for H&E). A slide (pyramidal TIFF/SVS) is tiled over "
        "its tissue (--tile, --margin, --level, --scheduler).",
    )
    p.add_argument("image", help="image file or DICOM folder")
    p.add_argument("-m", "--model", required=True, help="model name, folder, or 'classical'")
    p.add_argument("-o", "--output", required=True, help="output .csv or .geojson")
    p.add_argument(
        "--threshold",
        type=number(float, 0, 1),
        default=0.5,
        help="keep objects with score >= T (0.5)",
    )
    p.add_argument(
        "--min-size",
        type=number(float, 0),
        default=0.0,
        help="keep objects with area >= S pixels (2D) or volume >= S mm^3 (3D)",
    )
    p.add_argument(
        "--nms-iou",
        type=number(float, 0, 1, lo_open=True),
        default=0.5,
        help="drop boxes overlapping a better one above I (default 0.5, as the Detect dock; "
        "1 turns it off)",
    )
    p.add_argument(
        "--min-distance",
        type=number(float, 0, lo_open=True),
        default=None,
        help="smallest distance between two object centres (px in 2D, mm in 3D; default 4 voxels)",
    )
    p.add_argument(
        "--dark-objects",
        action="store_true",
        help="classical: objects darker than the background (grey bright-field images)",
    )
    p.add_argument(
        "--stain",
        choices=["hematoxylin"],
        default=None,
        help="classical on RGB bright-field (H&E, IHC): nuclei from the haematoxylin channel "
        "of a colour deconvolution, thresholded over the tissue (glass excluded)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="compute device"
    )
    p.add_argument("--quiet", action="store_true", help="no progress or summary on stderr")
    g = p.add_argument_group("whole slides (IMAGE is a pyramidal or large tiled TIFF)")
    g.add_argument("--tile", type=number(int, 16), default=1024, help="tile side in pixels (1024)")
    g.add_argument(
        "--margin",
        type=number(int, 0),
        default=64,
        help="context around each tile, > object size (64)",
    )
    g.add_argument("--all-tiles", action="store_true", help="also search background (glass)")
    g.add_argument(
        "--level",
        type=number(int, 0),
        default=None,
        help="pyramid level to search (default: from the model's spacing and the slide's mpp)",
    )
    g.add_argument(
        "--border-iou",
        type=number(float, 0, 1, lo_open=True),
        default=0.5,
        help="drop an object found again by a neighbouring tile above this box IoU (0.5)",
    )
    g.add_argument(
        "--scheduler",
        default=None,
        help="run on dask.distributed: 'local' (LocalCluster, 2 workers) or tcp://host:port",
    )
    p.set_defaults(func=run_detect)


def run_detect(args: argparse.Namespace) -> int:
    """Run the subcommand; returns the exit code (errors raise :class:`MedsegError`)."""
    from napari_medseg.core.detect.classical import detect_classical
    from napari_medseg.core.detect.detection import detect
    from napari_medseg.core.detect.result import filter_detections
    from napari_medseg.errors import ImageWriteError
    from napari_medseg.io import read_image
    from napari_medseg.io.detections import write_detections
    from napari_medseg.progress import TextProgress, run_sync

    out = Path(args.output).expanduser()
    if out.suffix.lower() not in (".csv", ".geojson", ".json"):
        raise ImageWriteError(f"cannot write detections to {out.name}: use .csv or .geojson")
    _check_threshold(args.threshold)
    src = Path(args.image).expanduser()
    model_path = Path(args.model).expanduser()
    check_outputs(
        [out, provenance_path(out)],
        [src, model_path if args.model != "classical" and model_path.exists() else None],
        overwrite=args.overwrite,
        models=[model_path if args.model != "classical" else None],
    )
    from napari_medseg.io.raster import is_slide

    if src.is_file() and is_slide(src):
        return _run_detect_slide(args, src, out)
    (record,) = read_image(src, series=0)  # only the series used is decoded
    choice = record.metadata.get("series_choice")
    if choice and not args.quiet:
        print(
            f"napari-medseg: {args.image} holds {choice['n_series']} series; using the first "
            f"({record.name})",
            file=sys.stderr,
        )
    if record.spatial_ndim == 3 and out.suffix.lower() != ".csv":
        raise ImageWriteError("GeoJSON (QuPath) export is for 2D images; use a .csv for 3D")
    bar = TextProgress(quiet=args.quiet)
    if args.model == "classical":
        gen = detect_classical(
            record,
            min_distance=args.min_distance,
            dark_objects=args.dark_objects,
            stain=args.stain,
        )
    else:
        model = _load_detection_model(args.model)
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
    from napari_medseg.cli._common import write_json_atomic

    prov = dict(result.provenance)
    prov.update(
        input=str(args.image),
        output=str(written),
        filters={"threshold": args.threshold, "min_size": args.min_size, "nms_iou": args.nms_iou},
        n_written=len(table),
    )
    if record.metadata.get("read_notes"):  # series choice, missing slices: whatever --quiet says
        prov["read_notes"] = list(record.metadata["read_notes"])
    write_json_atomic(provenance_path(written), prov)
    if not args.quiet:
        counts = table["class"].value_counts().to_dict() if len(table) else {}
        what = ", ".join(f"{n} {c}" for c, n in counts.items()) or "no objects"
        print(f"wrote {written}: {what} (of {len(result.table)} before filtering)", file=sys.stderr)
    return 0


def _check_threshold(t: float) -> None:
    from napari_medseg.errors import MedsegError

    if not 0.0 <= t <= 1.0:
        raise MedsegError(f"--threshold must be between 0 and 1, not {t}")


def _load_detection_model(ref: str) -> Any:
    """A model ``detect()`` can run: segmentation (watershed instances) or detection."""
    from napari_medseg.errors import MedsegError
    from napari_medseg.models.registry import load_model

    model = load_model(ref, device="cpu")
    if model.card.task not in ("segmentation", "detection"):
        raise MedsegError(
            f"model {model.card.name!r} is a model for {model.card.task}; detect needs a "
            "segmentation or detection model"
        )
    return model


def _run_detect_slide(args: argparse.Namespace, src: Path, out: Path) -> int:
    """``detect`` on a whole slide: :func:`napari_medseg.core.slides.detect.detect_slide`."""
    import functools

    from napari_medseg.cli._common import write_json_atomic
    from napari_medseg.core.detect.classical import detect_classical
    from napari_medseg.core.slides.detect import detect_slide
    from napari_medseg.core.slides.export import write_slide_detections
    from napari_medseg.io.raster import read_slide
    from napari_medseg.progress import TextProgress, run_sync

    opts: dict[str, Any] = dict(
        level=args.level,
        tile=args.tile,
        margin=args.margin,
        threshold=args.threshold,
        min_size=args.min_size,
        nms_iou=args.nms_iou,
        border_iou=args.border_iou,
        min_distance=args.min_distance,
        tissue_only=not args.all_tiles,
        outlines=out.suffix.lower() != ".csv",
    )
    bar = TextProgress(quiet=args.quiet)
    classical = args.model == "classical"
    if args.scheduler:
        ref = args.model
        if classical:
            ref = "classical-he" if args.stain else "classical-dark" if args.dark_objects else ref
        if not classical:
            _load_detection_model(ref)  # fail here, in one sentence, not on the workers
        device = args.device if args.device != "auto" else "cpu"
        gen = detect_slide(src, ref, scheduler=args.scheduler, device=device, **opts)
    else:
        if classical:
            detector: Any = functools.partial(
                detect_classical, dark_objects=args.dark_objects, stain=args.stain
            )
        else:
            detector = _load_detection_model(args.model)
        gen = detect_slide(read_slide(src), detector, device=args.device, **opts)
    result = run_sync(gen, bar)
    written = write_slide_detections(out, result, overwrite=True)
    prov = dict(result.provenance)
    prov.update(
        input=str(args.image),
        output=str(written),
        filters={"threshold": args.threshold, "min_size": args.min_size, "nms_iou": args.nms_iou},
        n_written=len(result.table),
    )
    write_json_atomic(provenance_path(written), prov)
    if not args.quiet:
        t = result.table
        counts = t["class"].value_counts().to_dict() if len(t) else {}
        what = ", ".join(f"{n} {c}" for c, n in counts.items()) or "no objects"
        print(
            f"wrote {written}: {what} in level-0 pixels ({result.tiles_done} tiles of level "
            f"{result.level}, {len(result.skipped)} unreadable)",
            file=sys.stderr,
        )
    return 0
