"""The ``napari-medseg denoise`` subcommand (added to :mod:`napari_medseg.cli` by ``add_parser``).

``napari-medseg denoise IMAGE -o OUT [--method auto|n2v2|n2v|gaussian|tv|nlmeans|bilateral|wavelet]
[--model M] [--time-budget SECONDS] [--axis A] [--background Y0:Y1,X0:X1] [--noise-model off]
[--no-tta] [--save-model DIR]``

OUT lies on IMAGE's grid with its geometry, dtype and value range; a provenance JSON
(OUT's name + ``.provenance.json``) is written beside it. IMAGE may be a folder of images: one
network is trained on all of them and OUT is a folder of ``<image>_denoised<ext>`` files.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

from napari_medseg.cli._common import (
    check_image_outputs,
    check_outputs,
    number,
    provenance_path,
)

__all__ = ["add_parser", "parse_box", "run_denoise"]


def add_parser(sub: Any) -> None:
    """Add the ``denoise`` subcommand to an ``argparse`` subparsers object."""
    from napari_medseg.core.denoise.denoising import DEFAULT_METHOD, DEFAULT_TIME_BUDGET, METHODS

    p = sub.add_parser(
        "denoise",
        help="denoise an image: self-supervised Noise2Void/N2V2 trained on it, classical "
        "filters, or both (auto)",
        description="Write OUT on IMAGE's own grid and geometry (same shape, dtype, value range "
        "and affine) plus OUT's provenance JSON beside it. Every method first estimates the "
        "image's noise model (variance = gain x signal + floor) and works in its "
        "variance-stabilised space. auto (default) averages an N2V2 network trained on the "
        "noisy image itself for --time-budget seconds with calibrated Gaussian and TV filters, "
        "or uses the filters alone when the noise is correlated between neighbouring pixels; "
        "n2v2/n2v are the networks alone; gaussian, tv, nlmeans, bilateral and wavelet are "
        "instant filters. IMAGE may be a folder: one network is trained on all its images and "
        "OUT is a folder.",
    )
    p.add_argument("image", help="image file, DICOM folder, or folder of images")
    p.add_argument("-o", "--output", required=True, help="output image file, or folder (batch)")
    p.add_argument(
        "--method",
        default=DEFAULT_METHOD,
        choices=list(METHODS),
        help=f"denoising method (default {DEFAULT_METHOD}, the best in benchmarks)",
    )
    p.add_argument(
        "-m", "--model", help="a saved denoiser (model folder or name) to apply instead of training"
    )
    p.add_argument(
        "--time-budget",
        type=number(float, 0),
        default=DEFAULT_TIME_BUDGET,
        help=f"seconds of training for n2v/n2v2 (default {DEFAULT_TIME_BUDGET:g}: a 512x512 "
        "image in about two minutes on 2 CPU cores; 0: no time limit, with --max-steps)",
    )
    p.add_argument(
        "--max-steps", type=number(int, 1), default=None, help="stop training after N steps"
    )
    p.add_argument(
        "--axis",
        type=number(int, 0),
        default=None,
        help="frame (time) axis of 4D data, in the file's axis order (NIfTI: 3); each frame is "
        "denoised and n2v trains one network on all frames",
    )
    p.add_argument(
        "--dims",
        type=int,
        choices=[2, 3],
        default=None,
        help="2D (slice by slice) or 3D network on volumes (default: 3D unless slices are thick)",
    )
    p.add_argument(
        "--background",
        metavar="BOX",
        default=None,
        help="a region without signal for the noise model, as voxel index ranges in the file's "
        "axis order, e.g. 0:40,0:60 (rows 0-39, columns 0-59); its mean and spread fix the "
        "camera offset and read noise",
    )
    p.add_argument(
        "--noise-model",
        choices=["auto", "off"],
        default="auto",
        help="off: networks train on raw intensities even when the noise grows with the signal",
    )
    p.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16", "fp16"],
        default="auto",
        help="network precision when predicting: auto = bf16 only where the device runs it "
        "natively and the values agree with fp32 (the provenance says what ran)",
    )
    p.add_argument(
        "--no-tta",
        action="store_true",
        help="predict once instead of averaging 8 rotations/flips (8x faster prediction)",
    )
    p.add_argument(
        "--save-model", metavar="DIR", help="save the trained denoiser as a model folder"
    )
    p.add_argument("--seed", type=number(int, 0), default=0)
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="compute device"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar or warnings")
    p.set_defaults(func=run_denoise)


def parse_box(text: str, spatial_shape: tuple) -> np.ndarray:
    """``"Y0:Y1,X0:X1[,Z0:Z1]"`` (voxel index ranges, file axis order) as a boolean mask.

    Parameters
    ----------
    text : str
        One ``start:stop`` range per spatial axis; an empty side means the image edge.
    spatial_shape : tuple of int

    Returns
    -------
    numpy.ndarray of bool
        ``spatial_shape``, True inside the box.
    """
    from napari_medseg.errors import MedsegError

    parts = [t.strip() for t in text.split(",")]
    if len(parts) != len(spatial_shape):
        raise MedsegError(
            f"--background {text!r} has {len(parts)} ranges; the image has "
            f"{len(spatial_shape)} spatial axes {tuple(spatial_shape)}: give one start:stop each"
        )
    idx = []
    for t, n in zip(parts, spatial_shape):
        try:
            a, b = t.split(":")
            lo = int(a) if a else 0
            hi = int(b) if b else n
        except ValueError:
            raise MedsegError(
                f"--background range {t!r} is not start:stop with whole numbers"
            ) from None
        if not 0 <= lo < hi <= n:
            raise MedsegError(f"--background range {t!r} is outside 0:{n} or empty")
        idx.append(slice(lo, hi))
    mask = np.zeros(tuple(spatial_shape), dtype=bool)
    mask[tuple(idx)] = True
    return mask


def _jobs(src: Path, out: Path) -> list[tuple[Path, Path]]:
    from napari_medseg._files import split_ext
    from napari_medseg.io.readers import SUPPORTED_EXTENSIONS

    if src.is_dir():
        files = sorted(
            f
            for f in src.iterdir()
            if f.is_file()
            and split_ext(f)[1] in SUPPORTED_EXTENSIONS
            and split_ext(f)[1] not in (".dcm", ".ima")
        )
        if files:
            return [(f, out / f"{split_ext(f)[0]}_denoised{_out_ext(f)}") for f in files]
    return [(src, out)]


def _out_ext(path: Path) -> str:
    from napari_medseg._files import split_ext

    ext = split_ext(path)[1]
    if ext in (".nii.gz", ".nii", ".nrrd", ".mha", ".tif", ".tiff", ".png"):
        return ext
    if ext in (".jpg", ".jpeg"):
        return ".png"  # lossless: never re-compress a denoised image with JPEG
    return ".nii.gz"


def run_denoise(args: argparse.Namespace) -> int:
    """Run the subcommand; returns the exit code (errors raise :class:`MedsegError`)."""
    from napari_medseg.core.denoise.denoising import denoise
    from napari_medseg.core.denoise.store import load_denoiser, save_denoiser
    from napari_medseg.errors import ImageWriteError, MedsegError
    from napari_medseg.io import read_image, write_image
    from napari_medseg.io.record import ImageRecord
    from napari_medseg.progress import TextProgress, run_sync

    src = Path(args.image).expanduser()
    out = Path(args.output).expanduser()
    jobs = _jobs(src, out)
    batch = len(jobs) > 1 or jobs[0][0] != src
    if args.time_budget == 0 and args.max_steps is None and not args.model:
        if args.method in ("n2v", "n2v2", "auto"):
            raise MedsegError("--time-budget 0 (no time limit) needs --max-steps")
    sm = Path(args.save_model).expanduser() if args.save_model else None
    if sm is not None and (args.model or args.method not in ("n2v", "n2v2", "auto")):
        raise MedsegError("--save-model needs a trained method: use --method auto, n2v2 or n2v")
    model_in = Path(args.model).expanduser() if args.model else None
    if not batch:
        check_image_outputs(out)
    empty_dir = sm is not None and sm.is_dir() and not any(sm.iterdir())
    check_outputs(
        [p for _, dest in jobs for p in (dest, provenance_path(dest))]
        + [None if empty_dir else sm],
        [src, *(f for f, _ in jobs), model_in if model_in and model_in.exists() else None],
        overwrite=args.overwrite,
        folders=[sm] if sm is not None else (),
        created=[out] if batch else (),
        models=[model_in],
    )
    if batch and out.exists() and not out.is_dir():
        raise ImageWriteError(f"{out} is a file; a folder of images is denoised into a folder.")
    records = []
    for path, _ in jobs:
        recs = read_image(path, series=0)  # only the series used is decoded
        choice = recs[0].metadata.get("series_choice")
        if choice and not args.quiet:
            print(
                f"napari-medseg: {path} holds {choice['n_series']} series; denoising the first "
                f"({recs[0].name})",
                file=sys.stderr,
            )
        records.append(recs[0])
    background = None
    if args.background:
        background = parse_box(args.background, records[0].spatial_shape)
        if batch:
            raise MedsegError("--background marks a region of one image; not for folders")
    if batch:
        out.mkdir(parents=True, exist_ok=True)
    model = load_denoiser(args.model) if args.model else None
    bar = TextProgress(quiet=args.quiet)
    for k, ((path, dest), record) in enumerate(zip(jobs, records)):
        # batch: train once on every image, then reuse the network for the others
        train_on = records[1:] if (k == 0 and batch and model is None) else ()
        result = run_sync(
            denoise(
                record,
                args.method,
                model=model,
                time_budget=args.time_budget,
                max_steps=args.max_steps,
                axis=args.axis,
                device=args.device,
                seed=args.seed,
                dims=args.dims,
                train_on=train_on,
                background=background,
                noise_model=args.noise_model,
                tta=False if args.no_tta else None,
                precision=args.precision,
            ),
            bar,
        )
        if sm is not None and result.model is None:
            why = result.provenance.get("auto", {}).get("reason", "no network was trained")
            raise MedsegError(
                f"nothing to save with --save-model: {why}; auto used the classical filters "
                "(nothing was written). Use --method n2v2 to train a network anyway"
            )
        if not args.quiet and "noise_model_summary" in result.provenance:
            print(f"noise model: {result.provenance['noise_model_summary']}", file=sys.stderr)
        if result.model is not None and model is None:
            model = result.model
            if args.save_model:
                folder = save_denoiser(Path(args.save_model).expanduser(), model)
                if not args.quiet:
                    print(f"saved denoiser to {folder}", file=sys.stderr)
        rec = ImageRecord(
            data=result.data,
            affine=record.affine,
            space=record.space,
            modality=record.modality,
            name=f"{record.name}_denoised",
            rgb=record.rgb,
            metadata=record.metadata,
        )
        written = write_image(dest, rec, is_label=False, overwrite=True)
        prov = dict(result.provenance)
        prov.update(input=str(path), output=str(written))
        if record.metadata.get("read_notes"):  # series choice, missing slices, even --quiet
            prov["read_notes"] = list(record.metadata["read_notes"])
        if args.save_model:
            prov["model_saved_to"] = str(Path(args.save_model).expanduser())
        if args.model:
            prov["model"] = str(args.model)
        from napari_medseg.cli._common import write_json_atomic

        prov_path = provenance_path(written)
        write_json_atomic(prov_path, prov)
        if not args.quiet:
            print(f"wrote {written} ({result.method}) and {prov_path.name}", file=sys.stderr)
    return 0
