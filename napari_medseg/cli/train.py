"""The ``napari-medseg train`` subcommand: a segmentation model or a box detector from a dataset."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from napari_medseg.cli._common import add_common, check_outputs, number, user_path


def add_parser(sub: Any) -> None:
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
    p.add_argument(
        "--time-budget",
        type=number(float, 0, lo_open=True),
        default=600.0,
        help="seconds (default 600)",
    )
    p.add_argument("--max-epochs", type=number(int, 1), default=None)
    p.add_argument(
        "--width", type=number(int, 1), default=16, help="channels of the first U-Net level"
    )
    p.add_argument("--seed", type=number(int, 0), default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing model folder")
    add_common(p)
    p.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    from napari_medseg.errors import MedsegError
    from napari_medseg.progress import TextProgress, run_sync
    from napari_medseg.training.options import TrainOptions
    from napari_medseg.training.segment import train

    detection = getattr(args, "task", "segmentation") == "detection"
    if detection:
        from napari_medseg.training.detect import train_detection as train
    out = user_path(args.output)
    init = args.init
    if init and not user_path(init).exists():
        from napari_medseg.models.registry import resolve_model

        init = str(resolve_model(init))
    if out.exists() and not out.is_dir():
        raise MedsegError(f"{out} is a file; give a folder for the model.")
    empty_dir = out.is_dir() and not any(out.iterdir())
    check_outputs(
        [None if empty_dir else out],
        [user_path(args.dataset), user_path(init) if init else None],
        overwrite=args.overwrite,
        folders=[out],
        models=[user_path(init) if init else None],
    )
    options = TrainOptions(
        dims=args.dims,
        init=init,
        time_budget=args.time_budget,
        max_epochs=args.max_epochs,
        device=args.device,
        seed=args.seed,
        width=args.width,
    )
    bar = TextProgress(quiet=args.quiet)
    result = run_sync(train(user_path(args.dataset), out, options), bar)
    if not args.quiet:
        best = result.best_val_f1 if detection else result.best_val_dice
        what = "box F1 at IoU 0.5" if detection else "Dice"
        score = f"{best:.3f}" if best is not None else "n/a (no validation data)"
        print(f"wrote model {result.out_dir} (best held-out {what} {score})", file=sys.stderr)
    return 0
