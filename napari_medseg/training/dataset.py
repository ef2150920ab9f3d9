"""Training datasets in the nnU-Net v2 layout (also the Medical Segmentation Decathlon layout).

::

    DATASET/
      dataset.json            optional: labels, channel_names, file_ending, description
      imagesTr/CASE_0000.ext  channel 0 of case CASE (CASE_0001.ext: channel 1, ...)
      labelsTr/CASE.ext       integer label map on the image's grid (0 = background)

``ext`` is ``.nii.gz``/``.nii`` (nibabel), ``.nrrd``/``.mha`` (SimpleITK, LPS geometry turned
into a voxel-to-RAS affine) or, for 2D datasets, ``.png``/``.tif``/``.tiff`` (an RGB PNG is
three channels). ``dataset.json`` ``labels`` may map names to ids (nnU-Net v2,
``{"background": 0, "spleen": 1}``) or ids to names (MSD / nnU-Net v1, ``{"0": "background"}``).

Images keep the file's own axis order: a :class:`Case` image is ``(C, *spatial)`` with the spatial
axes exactly as stored (``(i, j, k)`` for NIfTI, ``(row, col)`` for 2D images).
"""

from __future__ import annotations

import json
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from napari_medseg.errors import MedsegError
from napari_medseg.io.geometry import spacing_from_affine

VOLUME_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha")
IMAGE2D_ENDINGS = (".png", ".tif", ".tiff")
ENDINGS = VOLUME_ENDINGS + IMAGE2D_ENDINGS
#: Endings of box label files (detection datasets, :func:`list_cases` ``boxes=True``).
BOX_ENDINGS = (".csv", ".json")


class DatasetError(MedsegError, ValueError):
    """A training dataset folder is not usable (the message says which file or case)."""


@dataclass
class Case:
    """One training case.

    Attributes
    ----------
    name : str
        Case identifier (file name without the channel suffix and ending).
    image : numpy.ndarray
        ``(C, *spatial)`` float32, spatial axes in the file's own order.
    label : numpy.ndarray
        ``(*spatial)`` integer labels on the same grid.
    affine : numpy.ndarray
        ``(4, 4)`` voxel-to-RAS mm for volumes, ``(3, 3)`` voxel-to-pixel for 2D images.
    spacing : tuple of float
        Voxel size along each spatial file axis (mm for volumes, pixels for 2D images).
    space : str
        ``"RAS"`` (volumes) or ``"pixel"`` (2D images).
    rgb : bool
        True when the channels are the R, G, B of a colour image.
    """

    name: str
    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, ...]
    space: str = "RAS"
    rgb: bool = False

    @property
    def dims(self) -> int:
        """Number of spatial axes (2 or 3)."""
        return self.label.ndim


@dataclass
class TrainingDataset:
    """A loaded dataset: its cases plus what ``dataset.json`` says about them.

    Attributes
    ----------
    path : pathlib.Path
    name : str
        Folder name (e.g. ``Dataset001_SpleenCT``) or ``dataset.json`` ``name``.
    labels : dict of int to str
        Class id to name, background (0) included; ids are ``0..K-1``.
    channel_names : dict of int to str
        Channel index to modality name (``"CT"``, ``"T2"``, ``"R"``...).
    description : str
    cases : list of Case
    """

    path: Path
    name: str
    labels: dict[int, str]
    channel_names: dict[int, str]
    description: str = ""
    cases: list[Case] = field(default_factory=list)
    json: dict = field(default_factory=dict)

    @property
    def dims(self) -> int:
        return self.cases[0].dims if self.cases else 3

    @property
    def in_channels(self) -> int:
        return int(self.cases[0].image.shape[0]) if self.cases else len(self.channel_names)


# --------------------------------------------------------------------------- dataset.json


def read_dataset_json(folder: str | Path) -> dict:
    """Read ``dataset.json`` (empty dict when absent)."""
    path = Path(folder) / "dataset.json"
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path} is not valid JSON ({e}).") from e


def parse_labels(labels: dict | None) -> dict[int, str] | None:
    """Turn a ``dataset.json`` ``labels`` block into ``{id: name}``.

    Accepts nnU-Net v2 (name -> id) and MSD / nnU-Net v1 (id -> name). Region-based labels
    (an id list per name) are not supported. Ids must be ``0..K-1``.
    """
    if not labels:
        return None
    out: dict[int, str] = {}
    for k, v in labels.items():
        if isinstance(v, list | tuple):
            raise DatasetError(
                f"dataset.json label {k!r} is a region (a list of ids); only plain labels "
                "(one id per class) are supported."
            )
        if str(k).strip().lstrip("-").isdigit():
            out[int(k)] = str(v)
        else:
            try:
                out[int(v)] = str(k)
            except (TypeError, ValueError) as e:
                raise DatasetError(f"dataset.json label {k!r}: {v!r} is not an integer id.") from e
    ids = sorted(out)
    if ids != list(range(len(ids))):
        raise DatasetError(
            f"dataset.json labels must be numbered 0..K-1 without gaps (0 = background), got {ids}."
        )
    return out


# --------------------------------------------------------------------------- listing


def _ending(name: str) -> str | None:
    low = name.lower()
    for e in ENDINGS:
        if low.endswith(e):
            return e
    return None


def list_cases(folder: str | Path, boxes: bool = False) -> list[tuple[str, list[Path], Path]]:
    """Find the cases of a dataset folder.

    Parameters
    ----------
    folder : path-like
    boxes : bool
        Also accept box labels ``labelsTr/CASE.csv`` and ``labelsTr/CASE.json`` (detection
        datasets, :mod:`.train_detection`); a box file wins over a mask of the same case.
        When the folder holds box labels, ``dataset.json`` ``file_ending`` (which may name the
        labels' ending) does not filter the images.

    Returns
    -------
    list of (name, image_paths, label_path)
        ``image_paths`` ordered by channel (``_0000``, ``_0001``...), sorted by case name.

    Raises
    ------
    DatasetError
        No ``imagesTr``/``labelsTr``, no cases, a missing label or a missing channel.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(
            f"{folder} is not a folder; a dataset is a folder with imagesTr/ and labelsTr/."
        )
    img_dir, lab_dir = folder / "imagesTr", folder / "labelsTr"
    for d in (img_dir, lab_dir):
        if not d.is_dir():
            raise DatasetError(f"dataset {folder.name} has no {d.name}/ folder (nnU-Net layout).")
    box_labels = {}
    if boxes:
        box_labels = {
            p.stem: p
            for p in sorted(lab_dir.iterdir())
            if p.suffix.lower() in BOX_ENDINGS and not p.name.startswith(".")
        }
    meta = read_dataset_json(folder)
    want_ending = None if box_labels else meta.get("file_ending")
    channels: dict[str, dict[int, Path]] = {}
    for p in sorted(img_dir.iterdir()):
        if p.name.startswith("."):
            continue
        ending = _ending(p.name)
        if ending is None or (want_ending and ending != want_ending.lower()):
            continue
        stem = p.name[: -len(ending)]
        if len(stem) < 6 or stem[-5] != "_" or not stem[-4:].isdigit():
            # MSD layout: no channel suffix means a single channel
            case, ch = stem, 0
        else:
            case, ch = stem[:-5], int(stem[-4:])
        channels.setdefault(case, {})[ch] = p
    if not channels:
        raise DatasetError(
            f"dataset {folder.name} has no images in imagesTr/ (expected CASE_0000"
            f"{want_ending or '.nii.gz'})."
        )
    labels = {}
    for p in sorted(lab_dir.iterdir()):
        ending = _ending(p.name)
        if ending is not None and not p.name.startswith("."):
            labels[p.name[: -len(ending)]] = p
    labels.update(box_labels)
    out = []
    n_ch = None
    for case in sorted(channels):
        chans = channels[case]
        idx = sorted(chans)
        if idx != list(range(len(idx))):
            raise DatasetError(
                f"case {case} has channels {idx} in imagesTr/; "
                f"expected _0000 to _{len(idx) - 1:04d}."
            )
        if n_ch is None:
            n_ch = len(idx)
        elif len(idx) != n_ch:
            raise DatasetError(
                f"case {case} has {len(idx)} channel file(s) but the first case has {n_ch}."
            )
        if case not in labels:
            if boxes:
                raise DatasetError(
                    f"case {case} has no label in labelsTr/ (an instance mask, {case}.csv or "
                    f"{case}.json)."
                )
            raise DatasetError(
                f"case {case} has no label file in labelsTr/ (expected {case}<ending>)."
            )
        out.append((case, [chans[i] for i in idx], labels[case]))
    return out


# --------------------------------------------------------------------------- reading


def _read(path: Path) -> tuple[np.ndarray, np.ndarray, str, bool]:
    """Read one file with the project's reader: ``(data, affine, space, rgb)``.

    Uses :func:`napari_medseg.io.readers.read_image` (NIfTI with nibabel, NRRD/MetaImage with
    SimpleITK and LPS->RAS geometry, PNG/TIFF 2D images); data stay in the file's axis order.
    """
    from napari_medseg.io.readers import read_image

    rec = read_image(path)[0]
    data = np.asarray(rec.data)
    rgb = bool(rec.rgb)
    if rgb and data.shape[-1] == 4:
        data = data[..., :3]
    return data, np.asarray(rec.affine, dtype=float), rec.space, rgb


def read_channels(name: str, paths: list[Path]) -> tuple[np.ndarray, np.ndarray, str, bool]:
    """Read the image channels of a case (one file per channel, or channels in a file).

    Parameters
    ----------
    name : str
        The case (for messages).
    paths : list of Path
        Image files in channel order; a file with a last channel axis (RGB, 4D NIfTI, a
        ``(rows, cols, C)`` image) gives several channels.

    Returns
    -------
    image : (C, *spatial) float32
        Spatial axes in the file's own order; NaN/inf replaced (NaN by the minimum, inf by 0).
    affine : (4, 4) voxel-to-RAS mm, or (3, 3) voxel-to-pixel for 2D images
    space : ``"RAS"`` or ``"pixel"``
    rgb : bool
        True when the channels are the R, G, B of a colour image.

    Raises
    ------
    DatasetError
        An unsupported shape, or channels of different shapes.
    """
    chans = []
    affine = None
    space = "RAS"
    rgb = False
    spatial = None
    for p in paths:
        data, aff, space, is_rgb = _read(p)
        if is_rgb:
            rgb = True
            parts = [data[..., c] for c in range(data.shape[-1])]
        elif data.ndim == (2 if space == "pixel" else 3):
            parts = [data]
        elif space == "RAS" and data.ndim == 4:
            parts = [data[..., c] for c in range(data.shape[-1])]
        elif space == "pixel" and data.ndim == 3:
            parts = [data[..., c] for c in range(data.shape[-1])]
        else:
            raise DatasetError(
                f"case {name}: image {p.name} has an unsupported shape {data.shape}."
            )
        for a in parts:
            if spatial is None:
                spatial, affine = a.shape, aff
            elif a.shape != spatial:
                raise DatasetError(
                    f"case {name}: channel file {p.name} has shape {a.shape}, the other channels "
                    f"have {spatial}."
                )
            chans.append(np.asarray(a, dtype=np.float32))
    image = np.stack(chans, 0)
    if not np.all(np.isfinite(image)):
        image = np.nan_to_num(image, nan=float(np.nanmin(image)), posinf=0.0, neginf=0.0)
    return image, np.asarray(affine, dtype=float), space, rgb


def affine_spacing(affine: np.ndarray) -> tuple[float, ...]:
    """Voxel size along each spatial axis: the column norms of the affine's linear part
    (:func:`napari_medseg.io.geometry.spacing_from_affine`)."""
    return spacing_from_affine(affine)


def check_same_grid(name: str, label_name: str, lab_affine: np.ndarray, affine: np.ndarray) -> None:
    """Refuse a label whose voxel-to-world affine is not its image's.

    Same shape is not same place: a 3 mm label on a 2 mm image of the same shape covers another
    part of the body, and training on it teaches the network misaligned anatomy (nnU-Net checks
    spacing, origin and direction too). Tolerances: 0.1% of the voxel size, 0.01 mm of origin,
    1e-4 in the direction cosines.

    Raises
    ------
    DatasetError
        One sentence with both voxel sizes and the origin shift.
    """
    a, b = np.asarray(affine, dtype=float), np.asarray(lab_affine, dtype=float)
    if a.shape != b.shape:
        raise DatasetError(
            f"case {name}: label {label_name} is {b.shape[0] - 1}D but its image is "
            f"{a.shape[0] - 1}D."
        )
    sa, sb = np.array(affine_spacing(a)), np.array(affine_spacing(b))
    same_spacing = np.allclose(sa, sb, rtol=1e-3, atol=1e-6)
    same_origin = np.allclose(a[:-1, -1], b[:-1, -1], atol=1e-2)
    same_dirs = same_spacing and np.allclose(a[:-1, :-1] / sa, b[:-1, :-1] / sb, atol=1e-4)
    if same_spacing and same_origin and same_dirs:
        return

    def mm(v: np.ndarray) -> str:
        return " x ".join(f"{x:.3g}" for x in v) + " mm"

    what = []
    if not same_spacing:
        what.append(f"voxel size {mm(sb)} vs the image's {mm(sa)}")
    if not same_origin:
        shift = float(np.linalg.norm(a[:-1, -1] - b[:-1, -1]))
        what.append(f"origin {shift:.2f} mm away")
    if same_spacing and not same_dirs:
        what.append("other axis directions")
    raise DatasetError(
        f"case {name}: label {label_name} is not on its image's grid ({'; '.join(what)}); "
        "training on it would teach misaligned anatomy: resample the label onto the image "
        "(same affine) first."
    )


def load_case(name: str, image_paths: list[Path], label_path: Path) -> Case:
    """Read one case (all its channels and its label) and check that they fit.

    Raises
    ------
    DatasetError
        When channels or label disagree in shape, or the label's affine is not the image's.
    """
    image, affine, space, rgb = read_channels(name, image_paths)
    spatial = image.shape[1:]
    lab, lab_affine, _, lab_rgb = _read(label_path)
    check_same_grid(name, label_path.name, lab_affine, affine)
    if lab_rgb or (lab.ndim == len(spatial) + 1 and lab.shape[-1] in (3, 4)):
        lab = lab[..., 0]
    if lab.ndim == len(spatial) + 1 and lab.shape[-1] == 1:
        lab = lab[..., 0]
    if tuple(lab.shape) != tuple(spatial):
        raise DatasetError(
            f"case {name}: label {label_path.name} has shape {tuple(lab.shape)} but the image has "
            f"{tuple(spatial)}."
        )
    if np.issubdtype(lab.dtype, np.floating):
        if not np.all(np.isfinite(lab)) or np.any(lab != np.round(lab)):
            raise DatasetError(f"case {name}: label {label_path.name} holds non-integer values.")
    lab = np.asarray(lab).astype(np.int16 if lab.max() < 32767 else np.int32)
    if lab.min() < 0:
        raise DatasetError(f"case {name}: label {label_path.name} holds negative values.")
    return Case(name, image, lab, affine, affine_spacing(affine), space, rgb)


def load_dataset(folder: str | Path) -> TrainingDataset:
    """Load every case of an nnU-Net-layout dataset.

    Parameters
    ----------
    folder : path-like
        The dataset folder (``imagesTr/``, ``labelsTr/``, optional ``dataset.json``).

    Returns
    -------
    TrainingDataset
        With ``labels`` from ``dataset.json`` or, when absent, ``class_1..class_K`` from the
        values found in the label files.

    Raises
    ------
    DatasetError
        Missing folders, no cases, a case without label, image/label shape mismatch, label
        values not listed in ``dataset.json``, mixed 2D and 3D cases or channel counts.
    """
    gen = iter_load_dataset(folder)
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value


def iter_load_dataset(folder: str | Path) -> Generator[tuple[int, int, str], None, TrainingDataset]:
    """:func:`load_dataset` as a generator: yields ``(index, n_cases, case_name)`` per case."""
    folder = Path(folder)
    meta = read_dataset_json(folder)
    entries = list_cases(folder)
    cases = []
    for i, e in enumerate(entries):
        yield i, len(entries), e[0]
        cases.append(load_case(*e))
    check_cases_agree(folder, cases)
    labels = parse_labels(meta.get("labels"))
    found = sorted({int(v) for c in cases for v in np.unique(c.label)})
    if labels is None:
        k = max(found) if found else 0
        labels = {i: ("background" if i == 0 else f"class_{i}") for i in range(max(k, 1) + 1)}
    else:
        extra = [v for v in found if v not in labels]
        if extra:
            bad = [c.name for c in cases if np.isin(c.label, extra).any()]
            raise DatasetError(
                f"label values {extra} (case {bad[0]}) are not listed in dataset.json labels "
                f"{sorted(labels)}."
            )
    return make_dataset(folder, meta, labels, cases)


def check_cases_agree(folder: Path, cases: list[Case]) -> None:
    """Raise when the cases mix 2D and 3D or have different channel counts."""
    if len({c.dims for c in cases}) > 1:
        raise DatasetError(f"dataset {folder.name} mixes 2D and 3D cases.")
    nch = {c.image.shape[0] for c in cases}
    if len(nch) > 1:
        raise DatasetError(
            f"dataset {folder.name}: cases have different channel counts {sorted(nch)}."
        )


def make_dataset(
    folder: Path, meta: dict, labels: dict[int, str], cases: list[Case]
) -> TrainingDataset:
    """A :class:`TrainingDataset` of loaded cases (at least one), with its ``dataset.json``.

    Channel names come from ``channel_names`` (nnU-Net v2) or ``modality`` (MSD), else
    ``R, G, B`` for colour images, else ``"unknown"``.
    """
    raw_ch = meta.get("channel_names") or meta.get("modality") or {}
    n = cases[0].image.shape[0]
    if cases[0].rgb and not raw_ch:
        channel_names = {0: "R", 1: "G", 2: "B"}
    else:
        channel_names = {int(k): str(v) for k, v in raw_ch.items()}
        for i in range(n):
            channel_names.setdefault(i, "unknown")
    return TrainingDataset(
        path=folder,
        name=str(meta.get("name") or folder.name),
        labels=labels,
        channel_names=channel_names,
        description=str(meta.get("description", "")),
        cases=cases,
        json=meta,
    )
