"""Batch segmentation of many image files, in this process or on a dask.distributed cluster.

One job = one input image (NIfTI, NRRD, MHA, DICOM folder, 2D raster) and one output labels
file. :func:`segment_file` does one job: read, segment on the image's own grid, write the
labels with the image's geometry, write the provenance JSON beside them
(``<output name>.provenance.json``, e.g. ``a_seg.nii.gz.provenance.json``), and return that
provenance. :func:`segment_batch` runs a
list of jobs, in this process (one model, loaded once) or as dask tasks (every worker loads the
model once and keeps it), with progress and Cancel (closing the generator cancels the pending
tasks). The output of a job does not depend on where it ran: the test compares a LocalCluster
with two workers against the single-process run voxel for voxel.

Every worker must see the input and output paths and the model (a built-in name, or a folder
on shared storage).
"""

from __future__ import annotations

import json
import time
from collections.abc import Generator, Sequence
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING, Any

from napari_medseg.core.engine.cluster import as_finished, dask_client, worker_count
from napari_medseg.progress import Progress, run_sync

if TYPE_CHECKING:  # pragma: no cover
    from napari_medseg.models.networks import LoadedModel

__all__ = ["companion_paths", "segment_batch", "segment_file"]

#: Models kept by a dask worker (or this process) between jobs: {(ref, device, trust): model}.
_MODEL_CACHE: dict[tuple, Any] = {}


def companion_paths(dest: str | Path, card: Any) -> list[Path]:
    """Files written beside ``dest`` by a model that separates objects (HoVerNet's nuclei,
    NuClick's clicked nuclei).

    ``<name>_instances<ext>`` (one id per object, same format and geometry as ``dest``) and
    ``<name>_objects.csv`` (one row per object); nothing for other models.
    """
    from napari_medseg._files import split_ext

    extra = getattr(card, "extra", None) or {}
    if not (extra.get("hovernet") or extra.get("nuclick")):
        return []
    dest = Path(dest)
    stem, ext = split_ext(dest)
    return [dest.with_name(f"{stem}_instances{ext}"), dest.with_name(f"{stem}_objects.csv")]


def _model(ref: Any, device: str, trust_bundle: bool) -> LoadedModel:
    if not isinstance(ref, (str, Path)):
        return ref  # already loaded
    key = (str(ref), device, bool(trust_bundle))
    if key not in _MODEL_CACHE:
        from napari_medseg.models.registry import load_model

        _MODEL_CACHE.clear()  # one model per process at a time
        _MODEL_CACHE[key] = load_model(str(ref), device=device, trust_bundle=trust_bundle)
    return _MODEL_CACHE[key]


def segment_file(
    image_path: str | Path | Sequence[str | Path],
    dest: str | Path,
    model: Any,
    *,
    device: str = "auto",
    overlap: float | None = None,
    batch_size: int = 4,
    tta: bool | None = None,
    trust_bundle: bool = False,
    probabilities: str | Path | None = None,
    precision: str = "auto",
    compile: bool = False,
    clicks: Any = None,
) -> Generator[Progress, None, dict]:
    """Segment one image file into ``dest``; yields progress, returns the provenance dict.

    Parameters
    ----------
    image_path : path-like or sequence of path-like
        Any image :func:`napari_medseg.io.read_image` opens; with several series (a DICOM
        folder), the first is segmented and the provenance says so (``series_note``). A list
        is one case with one file per channel (stacked by
        :func:`napari_medseg.core.segment.channels.stack_channels`).
    dest : path-like
        Labels file (.nii.gz, .nii, .nrrd, .mha; .png/.tif for 2D), written atomically on the
        image's own voxel grid (file axis order, same affine) with the provenance JSON beside.
    model : str, Path or LoadedModel
        Model name/folder (loaded once per process and cached) or a loaded model.
    device, overlap, batch_size, tta
        As :func:`napari_medseg.core.segment.segment.segment`.
    trust_bundle : bool
        Allow a MONAI bundle's Python expressions (see :mod:`napari_medseg.models.loaders.bundle`).
    probabilities : path-like, optional
        Also write the class probabilities there (float32, classes on the last axis).
    precision, compile
        Network precision and ``torch.compile``, as
        :func:`napari_medseg.core.segment.segment.segment`.
    clicks : array-like, optional
        ``(N, 2)`` clicks ``(row, col)`` in pixels, for a click model (NuClick); see
        :func:`napari_medseg.core.segment.segment.segment`.

    Returns
    -------
    dict
        The provenance (model, parameters, fast path, input path and sha256, output path,
        ``class_voxels``) as written beside ``dest``; ``timings_s`` holds the seconds of each
        stage: read, preprocess, prepare_network, network, resample_back, postprocess, write,
        and ``total`` (segment's own span) and ``file_total`` (read to write).
    """
    import numpy as np

    from napari_medseg._files import provenance_path, write_text
    from napari_medseg.core.correct.mask_store import sha256_of
    from napari_medseg.core.segment.segment import segment
    from napari_medseg.io import read_image, write_image
    from napari_medseg.io.record import ImageRecord

    paths = [Path(p) for p in image_path] if isinstance(image_path, (list, tuple)) else []
    image_path, dest = (paths[0] if paths else Path(image_path)), Path(dest)
    loaded = _model(model, "cpu", trust_bundle)
    t_read = time.perf_counter()
    (record,) = read_image(image_path, series=0)  # one series decoded, the choice recorded
    if len(paths) > 1:
        from napari_medseg.core.segment.channels import stack_channels

        record = stack_channels([record, *(read_image(p, series=0)[0] for p in paths[1:])])
    read_s = time.perf_counter() - t_read
    result = yield from segment(
        record,
        loaded,
        device=device,
        overlap=overlap,
        batch_size=batch_size,
        tta=tta,
        return_probabilities=probabilities is not None,
        precision=precision,
        compile=compile,
        clicks=clicks,
    )
    labels = ImageRecord(
        data=result.labels,
        affine=record.affine,
        space=record.space,
        modality="label",
        name=f"{record.name}_seg",
        metadata=record.metadata,
    )
    t_write = time.perf_counter()
    written = write_image(dest, labels, is_label=True, overwrite=True)
    write_s = time.perf_counter() - t_write
    prov = dict(result.provenance)
    prov["timings_s"] = {
        "read": round(read_s, 3),
        **prov.get("timings_s", {}),
        "write": round(write_s, 3),
        "file_total": round(time.perf_counter() - t_read, 3),
    }
    prov.update(input=str(image_path), input_sha256=sha256_of(image_path), output=str(written))
    if len(paths) > 1:
        prov["channel_files"] = [str(p) for p in paths]
    choice = record.metadata.get("series_choice")
    if choice:
        prov["series_note"] = f"{choice['n_series']} series in the input; segmented {record.name}"
    counts = np.bincount(np.asarray(result.labels).ravel())
    prov["class_voxels"] = {
        str(result.class_names.get(i, i)): int(n) for i, n in enumerate(counts) if i and n
    }
    if result.instances is not None:
        inst_path, table_path = companion_paths(dest, loaded.card)
        inst = ImageRecord(
            data=result.instances,
            affine=record.affine,
            space=record.space,
            modality="label",
            name=f"{record.name}_instances",
            metadata=record.metadata,
        )
        prov["instances"] = str(write_image(inst_path, inst, is_label=True, overwrite=True))
        prov["objects"] = str(write_objects(table_path, result.objects or []))
    if probabilities is not None:
        prob = ImageRecord(
            data=np.moveaxis(result.probabilities, 0, -1),
            affine=record.affine,
            space=record.space,
            modality="probability",
            metadata=record.metadata,
        )
        prov["probabilities"] = str(
            write_image(Path(probabilities), prob, is_label=False, overwrite=True)
        )
    prov_path = provenance_path(written)
    write_text(prov_path, json.dumps(prov, indent=2, default=str) + "\n")
    prov["provenance_file"] = str(prov_path)
    return prov


def write_objects(path: str | Path, rows: list[dict]) -> Path:
    """One row per object as CSV (atomic): id, ``row``/``col`` (pixels: HoVerNet's centroid,
    NuClick's click), area, type (the columns the rows have)."""
    import csv
    import io

    from napari_medseg._files import write_text

    cols = ["id", "row", "col", "area_px", "type", "type_name", "type_fraction"]
    if rows:
        cols = [c for c in cols if any(c in r for r in rows)]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
    return write_text(Path(path), buf.getvalue())


def _dask_job(image_path: str, dest: str, model_ref: str, opts: dict) -> dict:
    """Worker side of :func:`segment_batch`: one job, the model cached per worker."""
    import torch

    torch.set_num_threads(1)  # one thread per worker process: workers share the cores
    return run_sync(segment_file(image_path, dest, model_ref, **opts))


def segment_batch(
    jobs: Sequence[tuple[str | Path, str | Path]],
    model: Any,
    *,
    scheduler: Any = None,
    n_workers: int = 2,
    **opts: Any,
) -> Generator[Progress, None, list[dict]]:
    """Segment many images; in this process, or as dask tasks when ``scheduler`` is given.

    Parameters
    ----------
    jobs : sequence of (input path, output path)
        Outputs are replaced (the caller checks for existing files first).
    model : str, Path or LoadedModel
        A model name or folder (a loaded model only without ``scheduler``: workers load it
        from its reference).
    scheduler : None, "local", str or distributed.Client
        ``None``: this process, one job after the other; otherwise a dask scheduler as
        :mod:`napari_medseg.core.engine.cluster` takes it.
    n_workers : int
        Workers of a local cluster (``scheduler="local"``).
    **opts
        Passed to :func:`segment_file` (device, overlap, batch_size, tta, trust_bundle).

    Yields
    ------
    Progress
        ``done/total`` in jobs; ``info = {"job": input path, "provenance": dict}`` after each.

    Returns
    -------
    list of dict
        The provenance of every job, in the order of ``jobs``.
    """
    from napari_medseg.errors import MedsegError

    total = len(jobs)
    out: list[dict | None] = [None] * total
    t0 = time.perf_counter()
    if scheduler is None:
        for i, (src, dest) in enumerate(jobs):
            yield Progress(i, total, f"job {i + 1}/{total}: {Path(src).name}")
            out[i] = yield from segment_file(src, dest, model, **opts)
            yield Progress(i + 1, total, f"wrote {Path(dest).name}", {"job": str(src)})
        return [p for p in out if p is not None]
    if not isinstance(model, (str, Path)):
        raise MedsegError(
            "a dask batch needs the model's name or folder (each worker loads it), "
            "not a loaded model"
        )
    yield Progress(0, total, "starting the dask cluster")
    with dask_client(scheduler, n_workers) as client:
        yield Progress(0, total, f"{total} jobs on {worker_count(client)} dask workers")
        argsets = [(str(s), str(d), str(model), opts) for s, d in jobs]
        with closing(as_finished(client, _dask_job, argsets)) as finished:
            for done, (i, prov) in enumerate(finished, start=1):
                out[i] = prov
                yield Progress(
                    done,
                    total,
                    f"{done}/{total} done ({time.perf_counter() - t0:.0f} s): "
                    f"{Path(jobs[i][1]).name}",
                    {"job": str(jobs[i][0]), "provenance": prov},
                )
    return [p for p in out if p is not None]
