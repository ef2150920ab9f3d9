"""The ``napari-medseg view`` and ``demo`` subcommands: napari with the plugin, or a demo."""

from __future__ import annotations

import argparse
from typing import Any

from napari_medseg.cli import segment
from napari_medseg.cli._common import add_common, user_path


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "view",
        help="open napari with the plugin's Segment dock and images (default: the sample CT)",
    )
    p.add_argument("images", nargs="*", help="images or DICOM folders to open")
    p.add_argument(
        "--sample",
        default=None,
        choices=["ct", "mri", "pathology", "nuclei"],
        help="open a sample image (File > Open Sample > napari-medseg)",
    )
    p.add_argument("-m", "--model", help="model to choose in the Segment dock")
    p.add_argument("--run", action="store_true", help="press Run once the window is up")
    p.add_argument(
        "--screenshot",
        metavar="PNG",
        help="save a screenshot of the window and quit (after the run, with --run)",
    )
    add_common(p)
    p.set_defaults(func=_view)


def _view(args: argparse.Namespace) -> int:
    from napari_medseg.widgets.launch import launch

    return launch(
        args.images,
        sample=args.sample,
        screenshot=args.screenshot,
        model=args.model,
        run=args.run,
        device=args.device,
    )


def _demo(args: argparse.Namespace) -> int:
    from napari_medseg.io.napari_io import sample_path

    out = user_path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [
        ("ct_abdomen_spleen.nii.gz", "ct_spleen_3d", "ct_spleen_seg.nii.gz"),
        ("mr_cervical_spine_t2.nii.gz", "mr_spinalcord_3d", "mr_spinalcord_seg.nii.gz"),
        ("fluo_nuclei.tif", "fluo_nuclei_2d", "fluo_nuclei_seg.tif"),
    ]
    for sample, model, name in jobs:
        argv = [
            "segment",
            str(sample_path(sample)),
            "-m",
            model,
            "-o",
            str(out / name),
            "--device",
            args.device,
        ]
        argv += ["--overwrite"] if args.overwrite else []
        argv += ["--quiet"] if args.quiet else []
        parser = argparse.ArgumentParser(prog="napari-medseg")
        segment.add_parser(parser.add_subparsers())
        ns = parser.parse_args(argv)
        ns.func(ns)
        print(f"{model}: {out / name}")
    return 0


def add_demo_parser(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="headless demo: segment the sample images with the built-in "
        "models and write masks with provenance",
    )
    p.add_argument("-o", "--output", default="medseg_demo", help="output folder")
    p.add_argument(
        "--overwrite", action="store_true", help="replace masks left by an earlier demo run"
    )
    add_common(p)
    p.set_defaults(func=_demo)
