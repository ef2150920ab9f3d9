"""The ``napari-medseg segment`` subcommand: one image, a folder of images, or a slide."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from napari_medseg.cli._common import (
    add_common,
    check_image_outputs,
    check_outputs,
    number,
    provenance_path,
    user_path,
)


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "segment",
        help="segment an image (or a folder of images) with a model",
        description="Write OUT on IMAGE's own voxel grid and geometry (same shape and affine), "
        "and OUT's provenance as JSON beside it (OUT's name + .provenance.json). IMAGE may be a "
        "folder of images: OUT is then a folder and each output is named <image>_seg.nii.gz "
        "(<image>_seg.tif for 2D PNG/JPEG/TIFF images); --scheduler runs such a batch on dask.",
    )
    p.add_argument("image", help="image file, DICOM folder, or folder of images (batch)")
    p.add_argument(
        "more_images",
        nargs="*",
        metavar="IMAGE",
        help="further channels of the same case, one file each, on IMAGE's grid (multi-channel "
        "models, e.g. nnU-Net's CASE_0000.nii.gz CASE_0001.nii.gz)",
    )
    p.add_argument(
        "-m",
        "--model",
        required=True,
        help="model name, model folder, TorchScript file, MONAI bundle folder or nnU-Net v2 "
        "trained-model folder",
    )
    p.add_argument(
        "-o",
        "--output",
        required=True,
        help="output labels file (.nii.gz, .nii, .nrrd, .mha; .png/.tif for 2D), a folder in "
        "batch mode, or for a slide .zarr (OME-Zarr multiscale labels) or .ome.tif (pyramidal "
        "OME-TIFF)",
    )
    p.add_argument(
        "--overlap",
        type=number(float, 0, 0.9),
        default=None,
        help="sliding-window overlap 0..0.9 (default: the model card's)",
    )
    p.add_argument("--batch-size", type=number(int, 1), default=4, help="windows per batch")
    p.add_argument("--tta", action="store_true", help="flip test-time augmentation")
    p.add_argument(
        "--no-mirror",
        action="store_true",
        help="nnU-Net models: skip the mirroring test-time augmentation nnU-Net applies by default",
    )
    p.add_argument(
        "--folds",
        nargs="+",
        default=None,
        metavar="FOLD",
        help="nnU-Net models: the folds to ensemble, e.g. --folds 0 1 (default: all present)",
    )
    p.add_argument(
        "--probabilities",
        metavar="FILE",
        help="also write class probabilities (float32, one volume per class, 4D NIfTI)",
    )
    p.add_argument(
        "--clicks",
        metavar="CLICKS",
        help="click models (MONAI's NuClick bundle): one click per nucleus to outline, as a "
        ".csv with columns row,col (pixels, row first) or a .json list of [x, y] pairs as the "
        "bundle's centroid files hold them (x = column, y = row); the nuclei go to "
        "OUT_instances (id = click order) and OUT_objects.csv",
    )
    p.add_argument(
        "--trust-bundle",
        action="store_true",
        help="allow a MONAI bundle's config to run its Python expressions",
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="network precision: auto = bf16 where the device runs it natively (GPUs, CPUs with "
        "avx512_bf16/AMX), fp32 elsewhere, and fp32 when bf16 would change the labels",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the network (slow first call; pays on long runs or a warm cache)",
    )
    p.add_argument(
        "--verbose",
        action="store_true",
        help="print the time of each stage and the precision, memory format and threads used",
    )
    add_common(p)
    from napari_medseg.cli.slides import add_options as _add_slide_options

    _add_slide_options(p)
    p.set_defaults(func=_segment)


def _segment(args: argparse.Namespace) -> int:
    from napari_medseg._files import split_ext
    from napari_medseg.core.segment.batch import segment_file
    from napari_medseg.errors import MedsegError
    from napari_medseg.io.readers import SUPPORTED_EXTENSIONS
    from napari_medseg.models.registry import load_model
    from napari_medseg.progress import TextProgress, run_sync

    src = user_path(args.image)
    out = user_path(args.output)
    from napari_medseg.cli.slides import is_slide_job, run_segment_slide

    if is_slide_job(src, out):
        if args.clicks:
            raise MedsegError("--clicks is for one 2D image, not a whole slide")
        return run_segment_slide(args)
    batch = src.is_dir() and any(
        split_ext(f)[1] in SUPPORTED_EXTENSIONS and split_ext(f)[1] not in (".dcm", ".ima")
        for f in src.iterdir()
    )
    if batch:
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
    channels = [user_path(f) for f in (args.more_images or [])]
    if channels:
        if batch:
            raise MedsegError("several channel files need one case, not a folder of images")
        jobs = [([src, *channels], out)]  # type: ignore[list-item]
    prob = user_path(args.probabilities) if args.probabilities else None
    if prob is not None and len(jobs) > 1:
        raise MedsegError("--probabilities writes one file: it needs a single input image")
    from napari_medseg.core.segment.nuclick import check_clicks

    clicks = None
    if args.clicks:
        if batch:
            raise MedsegError("--clicks belong to one image: give a single IMAGE, not a folder")
        from napari_medseg.core.segment.nuclick import read_clicks

        clicks = read_clicks(user_path(args.clicks))
    if not batch:
        check_image_outputs(out, prob)
    model_path = user_path(args.model)
    check_outputs(
        [p for _, dest in jobs for p in (dest, provenance_path(dest))] + [prob],
        [
            src,
            *channels,
            user_path(args.clicks) if args.clicks else None,
            *(f for f, _ in jobs if not channels),
            model_path if model_path.exists() else None,
        ],
        overwrite=args.overwrite,
        created=[out] if batch else (),
        models=[model_path],
    )
    if batch:
        if out.exists() and not out.is_dir():
            raise MedsegError(f"{out} is a file; batch mode writes into a folder.")
        out.mkdir(parents=True, exist_ok=True)
    from napari_medseg.core.engine.windows import resolve_device
    from napari_medseg.core.segment.batch import segment_batch

    opts = dict(
        device=args.device,
        overlap=args.overlap,
        batch_size=args.batch_size,
        tta=True if args.tta else (False if args.no_mirror else None),  # None: model's default
        trust_bundle=args.trust_bundle,
        precision=args.precision,
        compile=args.compile,
    )
    if args.scheduler and len(jobs) > 1:
        if args.folds:
            raise MedsegError("--folds needs a single process: leave out --scheduler")
        early = load_model(args.model, device="cpu", trust_bundle=args.trust_bundle)
        check_clicks(early.card, clicks, "--clicks")  # before any image is read
        _check_companions(jobs, early.card, args.overwrite)  # fail early
        provs = run_sync(
            segment_batch(jobs, args.model, scheduler=args.scheduler, **opts),
            TextProgress(quiet=args.quiet),
        )
    else:
        t_load = time.perf_counter()
        model = load_model(
            args.model,
            device=str(resolve_device(args.device)),
            trust_bundle=args.trust_bundle,
            folds=args.folds,
        )
        if args.verbose:
            print(f"model loaded in {time.perf_counter() - t_load:.2f} s", file=sys.stderr)
        check_clicks(model.card, clicks, "--clicks")  # before any image is read
        _check_companions(jobs, model.card, args.overwrite)
        provs = []
        for image_path, dest in jobs:
            prov = run_sync(
                segment_file(
                    image_path,
                    dest,
                    model,
                    probabilities=prob,
                    clicks=clicks,
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
            if prov.get("instances"):
                print(
                    f"wrote {prov['instances']} ({prov.get('nuclei', 0)} objects, one id each) "
                    f"and {Path(prov['objects']).name}",
                    file=sys.stderr,
                )
        if args.verbose:
            print(verbose_summary(prov), file=sys.stderr)
    return 0


def _check_companions(jobs: list, card: Any, overwrite: bool) -> None:
    """The files a model writes beside each output (HoVerNet: instances, objects), checked
    before any work as the outputs were."""
    from napari_medseg.core.segment.batch import companion_paths

    extra = [p for _, dest in jobs for p in companion_paths(dest, card)]
    if extra:
        check_outputs(extra, [f for f, _ in jobs if not isinstance(f, list)], overwrite=overwrite)


def verbose_summary(prov: dict) -> str:
    """Two lines for ``--verbose``: seconds per stage, and how the network ran."""
    t = prov.get("timings_s") or {}
    stages = ", ".join(f"{k} {v:.2f} s" for k, v in t.items())
    fp = prov.get("fast_path") or {}
    how = (
        f"network: {fp.get('precision', '?')} ({fp.get('precision_requested', '?')} requested), "
        f"{fp.get('memory_format', '?')}, {fp.get('batchnorm_folded', 0)} BatchNorm folded, "
        f"threads {fp.get('threads')}, compiled {fp.get('compiled')}, on {prov.get('device')}; "
        f"fidelity: {fp.get('fidelity', '?')}; CPU: {fp.get('cpu', '?')}"
    )
    return f"stages: {stages}\n{how}"
