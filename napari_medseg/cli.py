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


def _add_common(p: argparse.ArgumentParser, device: bool = True) -> None:
    if device:
        p.add_argument(
            "--device",
            default="auto",
            choices=["auto", "cpu", "cuda", "mps"],
            help="compute device",
        )
    p.add_argument("--quiet", action="store_true", help="no progress bar or warnings")


def _register_models(sub: Any) -> None:
    p = sub.add_parser("models", help="list built-in and installed models with their cards")
    p.add_argument("--json", action="store_true", help="print the cards as a JSON list")
    p.set_defaults(func=_models)


def _score_line(metrics: dict) -> str:
    """The card's headline held-out score: Dice, box F1, or Dice after 3 clicks."""
    dice = metrics.get("val_dice_mean")
    if isinstance(dice, float):
        return f"  held-out Dice {dice:.3f}"
    f1 = metrics.get("val_f1_iou50")
    if isinstance(f1, float):
        return f"  held-out box F1 {f1:.3f}"
    clicks = metrics.get("held_out_clicks")
    if isinstance(clicks, dict) and clicks:
        parts = [
            f"{name} {v['dice'][3]:.2f}"
            for name, v in clicks.items()
            if isinstance(v, dict) and len(v.get("dice", [])) > 3
        ]
        return "  held-out Dice after 3 clicks: " + ", ".join(parts) if parts else ""
    return ""


def _models(args: argparse.Namespace) -> int:
    from .models.registry import list_models

    cards = list_models()
    if args.json:
        print(json.dumps(cards, indent=2, default=str))
        return 0
    if not cards:
        print("no models installed")
        return 0
    for c in cards:
        classes = ", ".join(x["name"] for x in c.get("classes", [])[1:])
        score = _score_line(c.get("metrics") or {})
        where = "built-in" if c.get("builtin") else c.get("source", "")
        print(
            f"{c['name']:<22} {c.get('task', '?'):<13} {c.get('dims')}D "
            f"{c.get('modality', '?'):<11} [{classes}]{score}  ({where})"
        )
    return 0


def _register_segment(sub: Any) -> None:
    p = sub.add_parser(
        "segment",
        help="segment an image (or a folder of images) with a model",
        description="Write OUT on IMAGE's own voxel grid and geometry (same shape and affine), "
        "and OUT's provenance as JSON beside it (OUT stem + .provenance.json). IMAGE may be a "
        "folder of images: OUT is then a folder and each output is named <image>_seg.nii.gz "
        "(<image>_seg.tif for 2D PNG/JPEG/TIFF images); --scheduler runs such a batch on dask.",
    )
    p.add_argument("image", help="image file, DICOM folder, or folder of images (batch)")
    p.add_argument(
        "-m",
        "--model",
        required=True,
        help="model name, model folder, TorchScript file or MONAI bundle folder",
    )
    p.add_argument(
        "-o",
        "--output",
        required=True,
        help="output labels file (.nii.gz, .nrrd, .mha; .png/.tif for 2D) or folder in batch mode",
    )
    p.add_argument(
        "--overlap",
        type=float,
        default=None,
        help="sliding-window overlap 0..0.9 (default: the model card's)",
    )
    p.add_argument("--batch-size", type=int, default=4, help="windows per batch")
    p.add_argument("--tta", action="store_true", help="flip test-time augmentation")
    p.add_argument(
        "--probabilities",
        metavar="FILE",
        help="also write class probabilities (float32, one volume per class, 4D NIfTI)",
    )
    p.add_argument(
        "--trust-bundle",
        action="store_true",
        help="allow a MONAI bundle's config to run its Python expressions",
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    _add_common(p)
    from ._cli_slide import add_options as _add_slide_options

    _add_slide_options(p)
    p.set_defaults(func=_segment)


def _output_path(path: Path, overwrite: bool) -> Path:
    from .io.errors import ImageWriteError

    if path.exists() and not overwrite:
        raise ImageWriteError(f"{path} exists; pass --overwrite to replace it.")
    return path


def _segment(args: argparse.Namespace) -> int:
    from .core.batch import segment_file
    from .core.progress import TextProgress, run_sync
    from .io.errors import MedsegError
    from .io.readers import SUPPORTED_EXTENSIONS
    from .io.volume import split_ext
    from .models.registry import load_model

    src = _path(args.image)
    out = _path(args.output)
    from ._cli_slide import is_slide_job, run_segment_slide

    if is_slide_job(src, out):
        return run_segment_slide(args)
    batch = src.is_dir() and any(
        split_ext(f)[1] in SUPPORTED_EXTENSIONS and split_ext(f)[1] not in (".dcm", ".ima")
        for f in src.iterdir()
    )
    if batch:
        out.mkdir(parents=True, exist_ok=True)
        inputs = sorted(
            f for f in src.iterdir() if f.is_file() and split_ext(f)[1] in SUPPORTED_EXTENSIONS
        )
        raster = (".png", ".jpg", ".jpeg", ".tif", ".tiff")  # 2D images: labels as TIFF
        jobs = [
            (f, out / f"{split_ext(f)[0]}_seg{'.tif' if split_ext(f)[1] in raster else '.nii.gz'}")
            for f in inputs
        ]
    else:
        jobs = [(src, out)]
    for _, dest in jobs:
        _output_path(dest, args.overwrite)
    from .core.batch import segment_batch
    from .core.engine import resolve_device

    opts = dict(
        device=args.device,
        overlap=args.overlap,
        batch_size=args.batch_size,
        tta=args.tta,
        trust_bundle=args.trust_bundle,
    )
    if args.scheduler and len(jobs) > 1:
        if args.probabilities:
            raise MedsegError("--probabilities writes one file: it needs a single input image")
        load_model(args.model, device="cpu", trust_bundle=args.trust_bundle)  # fail early
        provs = run_sync(
            segment_batch(jobs, args.model, scheduler=args.scheduler, **opts),
            TextProgress(quiet=args.quiet),
        )
    else:
        model = load_model(
            args.model, device=str(resolve_device(args.device)), trust_bundle=args.trust_bundle
        )
        provs = []
        for image_path, dest in jobs:
            prov = run_sync(
                segment_file(
                    image_path,
                    dest,
                    model,
                    probabilities=_path(args.probabilities) if args.probabilities else None,
                    **opts,
                ),
                TextProgress(quiet=args.quiet),
            )
            provs.append(prov)
    for prov in provs:
        if not args.quiet:
            if prov.get("series_note"):
                print(f"napari-medseg: {prov['input']}: {prov['series_note']}", file=sys.stderr)
            voxels = prov.get("class_voxels") or {}
            counts = (
                ", ".join(f"{k}={v}" for k, v in voxels.items()) + " voxels"
                if voxels
                else "no foreground found"
            )
            print(
                f"wrote {prov['output']} ({counts}) and {Path(prov['provenance_file']).name}",
                file=sys.stderr,
            )
    return 0


def _provenance_path(out: Path) -> Path:
    from .io.volume import split_ext

    stem, _ = split_ext(out)
    return out.with_name(f"{stem}.provenance.json")


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    tmp.replace(path)


def _register_train(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help="train a segmentation model or a box detector from an nnU-Net-style dataset",
        description="DATASET holds imagesTr/CASE_0000.ext and labelsTr/CASE.ext (nnU-Net v2 "
        "layout; .nii.gz/.nrrd/.mha volumes or .png/.tif 2D images) and optionally dataset.json. "
        "The model self-configures from the dataset (spacing, patch size, normalisation), trains "
        "with Dice+CE until the time budget, keeps the best held-out Dice, and writes a model "
        "folder with its card. --task detection trains a centre-heatmap box detector instead: "
        "labelsTr holds instance masks (each object its own integer) or boxes as CASE.csv / "
        "CASE.json (columns y_min,y_max,x_min,x_max[,z_*],class as napari-medseg detect writes "
        "them); it keeps the best held-out box F1 at IoU 0.5.",
    )
    p.add_argument("dataset", help="dataset folder")
    p.add_argument("-o", "--output", required=True, help="model folder to write")
    p.add_argument(
        "--task",
        choices=["segmentation", "detection"],
        default="segmentation",
        help="segmentation (default) or detection (boxes)",
    )
    p.add_argument(
        "--dims",
        type=int,
        choices=[2, 3],
        default=None,
        help="2D or 3D network (default: from the images)",
    )
    p.add_argument("--init", help="model (name or folder) to fine-tune from")
    p.add_argument("--time-budget", type=float, default=600.0, help="seconds (default 600)")
    p.add_argument("--max-epochs", type=int, default=None)
    p.add_argument("--width", type=int, default=16, help="channels of the first U-Net level")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing model folder")
    _add_common(p)
    p.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    from .core.progress import TextProgress, run_sync
    from .io.errors import MedsegError
    from .training.train import train

    detection = getattr(args, "task", "segmentation") == "detection"
    if detection:
        from .training.train_detection import train_detection as train
    out = _path(args.output)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise MedsegError(f"{out} exists and is not empty; pass --overwrite to replace it.")
    init = args.init
    if init and not _path(init).exists():
        from .models.registry import resolve_model

        init = str(resolve_model(init))
    bar = TextProgress(quiet=args.quiet)
    result = run_sync(
        train(
            _path(args.dataset),
            out,
            dims=args.dims,
            init=init,
            time_budget=args.time_budget,
            max_epochs=args.max_epochs,
            device=args.device,
            seed=args.seed,
            width=args.width,
        ),
        bar,
    )
    if not args.quiet:
        best = result.best_val_f1 if detection else result.best_val_dice
        what = "box F1 at IoU 0.5" if detection else "Dice"
        score = f"{best:.3f}" if best is not None else "n/a (no validation data)"
        print(f"wrote model {result.out_dir} (best held-out {what} {score})", file=sys.stderr)
    return 0


def _register_view(sub: Any) -> None:
    p = sub.add_parser("view", help="open napari with the plugin's Segment dock and images")
    p.add_argument("images", nargs="*", help="images to open (default: the sample CT)")
    p.add_argument(
        "--sample",
        default=None,
        choices=["ct", "mri", "pathology", "nuclei"],
        help="open a sample image",
    )
    p.add_argument("--screenshot", metavar="PNG", help="save a screenshot of the window and quit")
    p.set_defaults(func=_view)


def _view(args: argparse.Namespace) -> int:
    from .widgets.launch import launch

    return launch(args.images, sample=args.sample, screenshot=args.screenshot)


def _register_demo(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="headless demo: segment the sample images with the built-in "
        "models and write masks with provenance",
    )
    p.add_argument("-o", "--output", default="medseg_demo", help="output folder")
    _add_common(p)
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from .io.napari_io import sample_path

    out = _path(args.output)
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
            "--overwrite",
            "--device",
            args.device,
        ] + (["--quiet"] if args.quiet else [])
        ns = build_parser().parse_args(argv)
        ns.func(ns)
        print(f"{model}: {out / name}")
    return 0


from ._cli_denoise import register as _register_denoise  # noqa: E402
from ._cli_detect import register as _register_detect  # noqa: E402
from ._cli_register import register as _register_register  # noqa: E402

_EXTRA_COMMANDS: list = [
    _register_models,
    _register_segment,
    _register_train,
    _register_view,
    _register_demo,
    _register_register,
    _register_denoise,
    _register_detect,
]


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


def _path(p: str) -> Path:
    return Path(p).expanduser()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
