"""The ``napari-medseg register`` subcommand (added to :mod:`napari_medseg.cli` by ``add_parser``).

``napari-medseg register FIXED MOVING -o WARPED [--mode rigid|affine|deformable]
[--labels L --labels-out LOUT] [--points P --points-out POUT] [--save-transform T]``

WARPED (and LOUT) lie on FIXED's grid with FIXED's geometry. Points are a CSV with columns
``x,y,z`` in FIXED's world coordinates (RAS mm, as ``napari-medseg info`` reports); POUT gets
where each point lands in MOVING's world coordinates (RAS mm), so fixed landmarks can be
compared with their moving partners. Every file written gets a provenance JSON beside it (its
name + ``.provenance.json``): the registration's options, similarity and transform, the input and
output paths, and which output it belongs to.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from napari_medseg.cli._common import (
    check_image_outputs,
    check_outputs,
    number,
    provenance_path,
    write_json_atomic,
)


def add_parser(sub: Any) -> None:
    """Add the ``register`` subcommand to an argparse subparsers object."""
    p = sub.add_parser(
        "register",
        help="align MOVING to FIXED (rigid, affine or deformable) and warp it onto FIXED's grid",
        description="Register MOVING to FIXED in world (RAS mm) space by instance optimisation "
        "(rigid -> affine -> deformable, multi-resolution; LNCC within a modality, mutual "
        "information across modalities). WARPED, and the labels written to --labels-out, lie on "
        "FIXED's grid with its geometry. --points is a CSV with columns x,y,z in FIXED's world "
        "coordinates (RAS mm); --points-out writes where they land in MOVING's world (RAS mm). "
        "--save-transform T writes T.json, T.tfm (ITK affine, LPS) and, for deformable, "
        "T_displacement.nii.gz (ITK displacement field, LPS mm, affine included). Every file "
        "written gets its provenance JSON beside it (its name + .provenance.json); see "
        "docs/registration.md.",
    )
    p.add_argument("fixed", help="fixed (reference) image")
    p.add_argument("moving", help="moving image, warped onto the fixed grid")
    p.add_argument("-o", "--output", required=True, help="warped moving image (FIXED's grid)")
    p.add_argument(
        "--mode", choices=["rigid", "affine", "deformable"], default="deformable", help="transform"
    )
    p.add_argument(
        "--similarity",
        choices=["auto", "lncc", "mi", "mse"],
        default="auto",
        help="auto: MI across modalities, MSE for two masks, else local NCC",
    )
    p.add_argument(
        "--regularization",
        type=number(float, 0),
        default=0.3,
        help="deformation smoothness weight (default 0.3)",
    )
    p.add_argument("--regularizer", choices=["diffusion", "bending"], default="diffusion")
    p.add_argument(
        "--iterations",
        type=number(int, 1),
        default=100,
        help="iterations at the coarsest level (default 100)",
    )
    p.add_argument("--levels", type=number(int, 1), default=3, help="pyramid levels (default 3)")
    p.add_argument(
        "--init",
        choices=["identity", "com", "geometry"],
        default="identity",
        help="start from the world positions, matched centres of mass, or matched field-of-view "
        "centres (use com when the images do not overlap in world space)",
    )
    p.add_argument("--fixed-mask", help="mask on FIXED's grid: only its voxels count")
    p.add_argument("--moving-mask", help="mask on MOVING's grid: only its voxels count")
    p.add_argument("--labels", help="labels in MOVING's world, warped with nearest interpolation")
    p.add_argument("--labels-out", help="where to write the warped labels (FIXED's grid)")
    p.add_argument("--points", help="CSV with columns x,y,z in FIXED's world (RAS mm)")
    p.add_argument("--points-out", help="CSV of the points in MOVING's world (RAS mm)")
    p.add_argument("--save-transform", metavar="T", help="stem of the transform files to write")
    p.add_argument("--jacobian", metavar="FILE", help="write the Jacobian determinant map")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="compute device"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar or warnings")
    p.set_defaults(func=_register)


def _first(path: str, what: str) -> Any:
    from napari_medseg.io import read_image

    (record,) = read_image(Path(path).expanduser(), series=0)  # only that series decoded
    choice = record.metadata.get("series_choice")
    if choice:
        print(
            f"napari-medseg: {path} holds {choice['n_series']} series; using the first as {what}",
            file=sys.stderr,
        )
    return record


def _check_labels(labels: Any, path: str) -> None:
    """Refuse a label map that is not one (non-integer values) before anything is written."""
    import numpy as np

    from napari_medseg.errors import MedsegError

    data = np.asarray(labels.data)
    if data.dtype == bool or np.issubdtype(data.dtype, np.integer):
        return
    if not np.issubdtype(data.dtype, np.number) or not np.all(np.isfinite(data)):
        raise MedsegError(f"--labels {path} holds values that are not label numbers (NaN or text).")
    if not np.all(data == np.round(data)):
        raise MedsegError(
            f"--labels {path} holds non-integer values (a probability or intensity image?); "
            "give a label map"
        )


def _transform_files(path: Path, fixed: Any, mode: str) -> list[Path]:
    """The files ``save_transform`` writes for stem ``path`` (see its docstring)."""
    stem = path.with_suffix("") if path.suffix.lower() in (".json", ".tfm") else path
    itk = fixed.space == "RAS" and fixed.spatial_ndim == 3
    files = [stem.with_name(stem.name + ".json")]
    if itk:
        files.append(stem.with_name(stem.name + ".tfm"))
    if mode == "deformable":
        ext = ".nii.gz" if itk else ".npy"
        files.append(stem.with_name(f"{stem.name}_displacement{ext}"))
    return files


def _with_sidecars(paths: list[Path]) -> list[Path]:
    """``paths`` followed by the provenance sidecar of each (what the command writes)."""
    return paths + [provenance_path(p) for p in paths]


def _write_provenance(
    result: Any, args: argparse.Namespace, records: dict[str, Any], written: list[tuple[str, Path]]
) -> list[Path]:
    """Write ``<output>.provenance.json`` beside every output; return the sidecars' paths.

    Parameters
    ----------
    result : RegistrationResult
        Its ``provenance`` (options, similarity, device, timings, notes) and ``transform``
        (matrix, fixed grid) go into every sidecar.
    args : argparse.Namespace
        The command's arguments: the input paths recorded.
    records : dict of str to ImageRecord
        The images read (``fixed``, ``moving``, ``labels``); their read notes are recorded.
    written : list of (str, Path)
        Each output written with its kind (``warped``, ``labels``, ``points``, ``jacobian``,
        ``transform``), in order.

    Returns
    -------
    list of Path
        The sidecars written, in the order of ``written``.
    """
    given = {
        "fixed": args.fixed,
        "moving": args.moving,
        "labels": args.labels,
        "fixed_mask": args.fixed_mask,
        "moving_mask": args.moving_mask,
        "points": args.points,
    }
    outputs: dict[str, Any] = {}
    for kind, path in written:
        if kind == "transform":
            outputs.setdefault(kind, []).append(str(path))
        else:
            outputs[kind] = str(path)
    base = dict(result.provenance)
    base.update(
        transform=result.transform.to_dict(),
        inputs={k: str(Path(v).expanduser()) for k, v in given.items() if v},
        outputs=outputs,
    )
    notes = {
        k: list(r.metadata["read_notes"])
        for k, r in records.items()
        if r is not None and r.metadata.get("read_notes")
    }
    if notes:  # series choice, missing slices: recorded whatever --quiet says
        base["read_notes"] = notes
    sidecars = []
    for kind, path in written:
        sidecar = provenance_path(path)
        write_json_atomic(sidecar, dict(base, output=str(path), output_kind=kind))
        sidecars.append(sidecar)
    return sidecars


def _register(args: argparse.Namespace) -> int:
    import numpy as np

    from napari_medseg.core.register.optimise import RegistrationOptions, register
    from napari_medseg.core.register.transform_io import (
        read_points_csv,
        save_transform,
        write_points_csv,
    )
    from napari_medseg.errors import MedsegError
    from napari_medseg.io import write_image
    from napari_medseg.io.record import ImageRecord
    from napari_medseg.progress import TextProgress, run_sync

    if bool(args.labels) != bool(args.labels_out):
        raise MedsegError("--labels and --labels-out go together; give both or neither.")
    if bool(args.points) != bool(args.points_out):
        raise MedsegError("--points and --points-out go together; give both or neither.")
    inputs = [args.fixed, args.moving, args.labels, args.fixed_mask, args.moving_mask, args.points]
    outputs = [args.output, args.labels_out, args.points_out, args.jacobian]
    check_image_outputs(
        *(Path(o).expanduser() for o in (args.output, args.labels_out, args.jacobian) if o)
    )
    out_paths = [Path(o).expanduser() for o in outputs if o]
    check_outputs(_with_sidecars(out_paths), inputs, overwrite=args.overwrite)
    fixed = _first(args.fixed, "the fixed image")
    moving = _first(args.moving, "the moving image")
    labels = _first(args.labels, "the labels") if args.labels else None
    fmask = np.asarray(_first(args.fixed_mask, "the fixed mask").data) if args.fixed_mask else None
    mmask = (
        np.asarray(_first(args.moving_mask, "the moving mask").data) if args.moving_mask else None
    )
    points = read_points_csv(args.points, fixed.spatial_ndim) if args.points else None
    if labels is not None:
        _check_labels(labels, args.labels)
    if args.save_transform:  # every file save_transform writes, known once FIXED is read
        check_outputs(
            _with_sidecars(
                out_paths
                + _transform_files(Path(args.save_transform).expanduser(), fixed, args.mode)
            ),
            inputs,
            overwrite=args.overwrite,
        )
    opts = RegistrationOptions(
        mode=args.mode,
        similarity=args.similarity,
        regularization=args.regularization,
        regularizer=args.regularizer,
        iterations=args.iterations,
        levels=args.levels,
        init=args.init,
        device=args.device,
    )
    bar = TextProgress(quiet=args.quiet)
    try:
        result = run_sync(
            register(
                fixed,
                moving,
                opts,
                moving_labels=labels,
                points=points,
                fixed_mask=fmask,
                moving_mask=mmask,
                outputs=bool(args.jacobian) or not args.quiet,
            ),
            bar,
        )
    except BaseException:
        bar.close()  # end the progress line so the error stands on a line of its own
        raise
    if args.quiet:  # labels lost outside the field of view: said even when warnings are hidden
        for note in result.provenance.get("notes", []):
            print(f"napari-medseg: warning: {note}", file=sys.stderr)

    def on_fixed(data: Any, modality: str, name: str) -> ImageRecord:
        return ImageRecord(
            data=data,
            affine=fixed.affine,
            space=fixed.space,
            modality=modality,
            name=name,
            metadata=fixed.metadata,
        )

    written = [
        (
            "warped",
            write_image(
                Path(args.output).expanduser(),
                on_fixed(result.warped, moving.modality, f"{moving.name}_warped"),
                is_label=False,
            ),
        )
    ]
    if labels is not None:
        written.append(
            (
                "labels",
                write_image(
                    Path(args.labels_out).expanduser(),
                    on_fixed(result.warped_labels, "label", f"{labels.name}_warped"),
                    is_label=True,
                ),
            )
        )
    if points is not None:
        written.append(
            ("points", write_points_csv(Path(args.points_out).expanduser(), result.points))
        )
    if args.jacobian:
        jac = result.jacobian
        if jac is None:
            det = float(np.linalg.det(result.transform.matrix[:-1, :-1]))
            jac = np.full(fixed.spatial_shape, det, dtype=np.float32)
        written.append(
            (
                "jacobian",
                write_image(
                    Path(args.jacobian).expanduser(),
                    on_fixed(jac, "unknown", "jacobian"),
                    is_label=False,
                ),
            )
        )
    if args.save_transform:
        written += [
            ("transform", p)
            for p in save_transform(result.transform, Path(args.save_transform).expanduser())
        ]
    _write_provenance(result, args, {"fixed": fixed, "moving": moving, "labels": labels}, written)
    if not args.quiet:
        fold = (
            f", folding {100 * result.folding_fraction:.3f}% of voxels"
            if result.jacobian is not None
            else ""
        )
        print(
            f"{result.similarity} similarity {result.similarity_before:.4f} -> "
            f"{result.similarity_after:.4f}{fold}, {result.seconds:.1f} s; wrote "
            + ", ".join(str(w) for _, w in written)
            + " (each with its .provenance.json)",
            file=sys.stderr,
        )
    return 0
