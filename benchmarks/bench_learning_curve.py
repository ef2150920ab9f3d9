"""Learning curve of "Train on corrections": Dice after 0, 1, 2 and 4 corrected cases.

Run: ``python benchmarks/bench_learning_curve.py [--budget 45] [--repeats 3]
[--corrections gt|clicks] [--clicks 5] [--json OUT]``
(needs ../shared/data or ``$MEDSEG_DATA``; writes its datasets and models under ``--work``, a
temporary folder by default, never into the repository). The whole run takes about
``(9 x repeats) x budget`` seconds plus about a minute (21 min with the defaults on 2 shared CPU
cores). Results and discussion: ``docs/learning_curve.md``.

Cases (2D, real data, MANUAL ground truth):

* **nuclei**: the 512x512 DSB 2018 fluorescence image cut into 16 tiles of 128x128 by
  ``scripts/make_builtin_datasets.py`` (``dsb_r<row>_c<col>`` = ``image[row:row+128,
  col:col+128]``, label = instance mask > 0). Evaluation set: the 3 tiles the built-in
  ``fluo_nuclei_2d`` held out (its card's ``training.val_cases``), so that the fine-tuned
  curve is scored on tiles that model never trained on; training pool: the other 13 tiles.
* **cord**: axial slices of the cervical spine MRI (``t2``, stored PSR, and ``t1w``, RAS, one
  subject, MANUAL cord masks). Each volume is reoriented to RAS with the project reader's affine
  (:func:`napari_medseg.training.fingerprint.ras_transform`) and cut along S; a slice is a
  ``(R, A)`` image. Both contrasts show the same subject, so the split is in scanner mm: the S
  range the two volumes share is cut in the middle; per contrast 6 evaluation slices are spread
  below the cut and 4 pool slices above it, no pool slice within 6 mm of an evaluation slice of
  either contrast (12 evaluation slices, a pool of 8).

"Corrected" = the ground truth (what a perfect correction gives, ``--corrections gt``, the
default), or with ``--corrections clicks`` what a user saves after ``--clicks N`` (default 5)
clicks of click refinement, DeepEdit style (:func:`click_correction`): the CURRENT model's
prediction of the case (:func:`napari_medseg.core.segment.segment.segment`), then N rounds of
:func:`napari_medseg.core.correct.refine.simulate_click` (next click on the largest error) and
:func:`napari_medseg.core.correct.refine.refine_with_clicks` (2D random walker, the dock's default)
with
all clicks so far. The first corrected case starts from the curve's starting model (the
untrained network or the fine-tune init), later cases from the model of the previous curve
point (as in a session where the model improves); a saved correction is kept for the later
points. The JSON then also holds each correction's Dice against the ground truth (start and
after each click) and, per point, ``correction_dice`` / ``start_dice`` pooled over its
corrected cases. The corrected cases are a nested random order of the pool (the 1-case set is
inside the 2-case set, inside the 4-case set, as a user correcting one case after another), one
order per repeat (seed).

Curve points, each trained with :func:`napari_medseg.training.segment.train` (the same call
"Train on corrections" makes, with its defaults: 20% validation hold-out and best checkpoint by
validation Dice) for a fixed wall-clock ``--budget``:

* ``scratch``: a self-configured 2D U-Net (width 16) from random initialisation; the 0-case point
  is that untrained network.
* ``finetune`` (nuclei only): ``init=fluo_nuclei_2d``; the 0-case point is the built-in model as
  shipped. Caveat: the pool tiles are the tiles it was trained on, so fine-tuning there adds no
  new data to the model, it only re-weights it. For the cord there is no 2D built-in model
  (``mr_spinalcord_3d`` is 3D and ``train(init=...)`` refuses a 2D dataset for a 3D model; it
  was also trained on these very volumes), so the cord curve is from scratch only.

Scores: foreground Dice pooled over the evaluation cases (sum of overlaps / sum of sizes), each
case segmented by the full inference pipeline (:func:`napari_medseg.core.segment.segment.segment`
on the source grid). Baseline in the same run: :func:`napari_medseg.core.detect.detection.
detect_classical` (Gaussian, Otsu, fill holes, watershed) foreground, bright objects (nuclei and
cord), plus dark objects for the cord (in T2 the cord is darker than the CSF around it).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEDSEG_DATA", REPO.parent / "shared" / "data"))
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

CORD_CONTRASTS = ("t2", "t1w")
N_CORRECTED = (1, 2, 4)
NUCLEI_MODEL = "fluo_nuclei_2d"


@dataclass
class Slice2D:
    """One 2D cord case cut from a volume.

    Attributes
    ----------
    name : str
        ``sc_<contrast>_s<k>``, ``k`` = slice index along S of the RAS-reoriented volume.
    image : numpy.ndarray
        ``(R, A)`` float32 MR intensities (rows run left to right, columns posterior to
        anterior).
    label : numpy.ndarray
        ``(R, A)`` uint8, 1 = spinal cord.
    contrast : str
    k : int
    world_s_mm : float
        S coordinate (scanner RAS mm) of the slice.
    """

    name: str
    image: np.ndarray
    label: np.ndarray
    contrast: str
    k: int
    world_s_mm: float
    meta: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- cases


def _make_builtin_datasets():
    """``scripts/make_builtin_datasets.py`` as a module (it builds the nuclei tiles)."""
    path = REPO / "scripts" / "make_builtin_datasets.py"
    spec = importlib.util.spec_from_file_location("make_builtin_datasets", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def nuclei_dataset(data: Path, work: Path) -> Path:
    """The 16 DSB tiles of 128x128 as an nnU-Net dataset (``Dataset003_NucleiDSB``) in ``work``."""
    return _make_builtin_datasets().make_nuclei(Path(data), Path(work))


def nuclei_split(case_names: list[str]) -> tuple[list[str], list[str]]:
    """Evaluation tiles (those ``fluo_nuclei_2d`` held out) and the training pool (the rest).

    Raises
    ------
    ValueError
        When a held-out tile of the model card is not among ``case_names``.
    """
    from napari_medseg.models.card import ModelCard
    from napari_medseg.models.registry import resolve_model

    card = ModelCard.load(resolve_model(NUCLEI_MODEL))
    held = list(card.training["val_cases"])
    missing = [n for n in held if n not in case_names]
    if missing:
        raise ValueError(f"tiles {missing} held out by {NUCLEI_MODEL} are not in the dataset")
    return sorted(held), sorted(n for n in case_names if n not in held)


def _ras_volume(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A volume read by the project reader, reoriented to RAS axes; returns (data, affine)."""
    from napari_medseg.io.readers import read_image
    from napari_medseg.training.fingerprint import ras_transform

    rec = read_image(path)[0]
    aff = np.asarray(rec.affine, dtype=float)
    perm, flip = ras_transform(aff)
    data = np.asarray(rec.data).transpose(perm)
    new = np.eye(4)
    new[:3, 3] = aff[:3, 3]
    for r in range(3):
        col = aff[:3, perm[r]]
        if flip[r]:
            n = data.shape[r]
            data = np.flip(data, r)
            new[:3, 3] = new[:3, 3] + col * (n - 1)
            col = -col
        new[:3, r] = col
    return np.ascontiguousarray(data), new


def cord_slices(
    data: Path, n_eval: int = 6, n_pool: int = 4, gap_mm: float = 6.0
) -> tuple[list[Slice2D], list[Slice2D]]:
    """Axial cord slices: ``(evaluation, pool)``, per contrast ``n_eval`` low and ``n_pool`` high.

    Both contrasts show the same subject, so the split is made in scanner coordinates: the
    S range the volumes share is cut in the middle; evaluation slices (of every contrast) lie
    at least ``gap_mm / 2`` below the cut, pool slices at least ``gap_mm / 2`` above it. No pool
    slice of any contrast is then within ``gap_mm`` of an evaluation slice.
    """
    vols = {}
    for contrast in CORD_CONTRASTS:
        img, aff = _ras_volume(Path(data) / f"mri/spinal_cord/{contrast}.nii.gz")
        lab, laff = _ras_volume(Path(data) / f"mri/spinal_cord/{contrast}_seg-manual.nii.gz")
        if not np.allclose(aff, laff, atol=1e-3) or img.shape != lab.shape:
            raise ValueError(f"{contrast}: image and cord mask are not on the same grid")
        has = np.flatnonzero((lab > 0).any(axis=(0, 1)))[1:-1]  # not the edge slices
        s_mm = aff[2, 2] * has + aff[2, 3]  # RAS axes: S depends on k only
        vols[contrast] = (img, lab, aff, has, s_mm)
    lo = max(float(v[4].min()) for v in vols.values())
    hi = min(float(v[4].max()) for v in vols.values())
    cut = 0.5 * (lo + hi)
    ev, pool = [], []
    for contrast, (img, lab, aff, has, s_mm) in vols.items():
        for sel, n, out in (
            (s_mm <= cut - gap_mm / 2, n_eval, ev),
            (s_mm >= cut + gap_mm / 2, n_pool, pool),
        ):
            ks = has[sel]
            pick = ks[np.unique(np.round(np.linspace(0, len(ks) - 1, n)).astype(int))]
            for k in pick:
                out.append(
                    Slice2D(
                        name=f"sc_{contrast}_s{int(k):03d}",
                        image=img[:, :, k].astype(np.float32),
                        label=(lab[:, :, k] > 0).astype(np.uint8),
                        contrast=contrast,
                        k=int(k),
                        world_s_mm=float((aff @ np.array([0, 0, k, 1.0]))[2]),
                    )
                )
    return ev, pool


def write_2d_dataset(
    cases: list[Slice2D], folder: Path, name: str, channel: str, fg_name: str, description: str
) -> Path:
    """Write 2D cases as an nnU-Net dataset (float32 TIFF images, uint8 TIFF labels)."""
    import tifffile

    folder = Path(folder)
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    for c in cases:
        tifffile.imwrite(str(folder / f"imagesTr/{c.name}_0000.tif"), c.image)
        tifffile.imwrite(str(folder / f"labelsTr/{c.name}.tif"), c.label)
    meta = {
        "name": name,
        "description": description,
        "channel_names": {"0": channel},
        "labels": {"background": 0, fg_name: 1},
        "numTraining": len(cases),
        "file_ending": ".tif",
    }
    (folder / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    return folder


def case_files(dataset: Path, name: str) -> tuple[Path, Path]:
    """``(image, label)`` files of one case of a single-channel dataset."""
    from napari_medseg.training.dataset import list_cases

    for case, images, label in list_cases(dataset):
        if case == name:
            return images[0], label
    raise KeyError(name)


def subset_dataset(src: Path, names: list[str], dst: Path) -> Path:
    """A dataset folder holding only ``names`` of ``src`` (symbolic links, same dataset.json)."""
    from napari_medseg.training.dataset import list_cases

    dst = Path(dst)
    if dst.exists():
        shutil.rmtree(dst)
    (dst / "imagesTr").mkdir(parents=True)
    (dst / "labelsTr").mkdir(parents=True)
    found = {c: (imgs, lab) for c, imgs, lab in list_cases(src)}
    for n in names:
        imgs, lab = found[n]
        for p in imgs:
            (dst / "imagesTr" / p.name).symlink_to(p.resolve())
        (dst / "labelsTr" / lab.name).symlink_to(lab.resolve())
    meta = json.loads((Path(src) / "dataset.json").read_text())
    meta["numTraining"] = len(names)
    (dst / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    return dst


def corrected_order(pool: list[str], seed: int) -> list[str]:
    """The order in which the simulated user corrects the pool cases (one per seed)."""
    rng = np.random.default_rng(1000 + seed)
    return [pool[i] for i in rng.permutation(len(pool))]


# --------------------------------------------------------------------------- scoring


def _dice_counts(pred: np.ndarray, truth: np.ndarray) -> tuple[int, int]:
    a, b = np.asarray(pred) > 0, np.asarray(truth) > 0
    return int(2 * (a & b).sum()), int(a.sum() + b.sum())


def _summarise(counts: dict[str, tuple[int, int]]) -> dict:
    num = sum(c[0] for c in counts.values())
    den = sum(c[1] for c in counts.values())
    per_case = {k: round(n / d, 4) if d else 1.0 for k, (n, d) in counts.items()}
    return {
        "dice": round(num / den, 4) if den else 1.0,
        "dice_case_mean": round(float(np.mean(list(per_case.values()))), 4),
        "per_case": per_case,
    }


def evaluate_model(model_dir: Path, dataset: Path, names: list[str]) -> dict:
    """Pooled foreground Dice of a model folder on ``names`` (full :func:`segment` pipeline)."""
    from napari_medseg.core.segment.segment import segment
    from napari_medseg.io.readers import read_image
    from napari_medseg.models.loaders.folder import load_model_folder
    from napari_medseg.progress import run_sync

    model = load_model_folder(model_dir)
    counts = {}
    for n in names:
        ip, lp = case_files(dataset, n)
        rec = read_image(ip)[0]
        truth = np.asarray(read_image(lp)[0].data)
        res = run_sync(segment(rec, model, device="cpu"))
        counts[n] = _dice_counts(res.labels, truth)
    return _summarise(counts)


def click_correction(
    image: np.ndarray,
    truth: np.ndarray,
    start: np.ndarray,
    n_clicks: int = 5,
    spacing: tuple[float, ...] | None = None,
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, dict]:
    """The mask a user saves after ``n_clicks`` clicks of click refinement (2D random walker).

    Each round places the next click on the largest error of the current mask
    (:func:`napari_medseg.training.clicks.click_for`, which is
    :func:`napari_medseg.core.correct.refine.simulate_click` without ``rng``) and calls
    :func:`napari_medseg.core.correct.refine.refine_with_clicks` (the dock's defaults: random
    walker,
    ``mode="2d"``) with all clicks so far, as
    :func:`~napari_medseg.core.correct.refine.simulate_session`
    does, but keeping the mask.

    Parameters
    ----------
    image : (rows, cols) array
        Intensities.
    truth, start : (rows, cols) arrays
        Ground truth and the starting mask (the model's prediction); nonzero = structure.
    n_clicks : int
        Clicks the user makes (fewer when no error is left).
    spacing : (row, col) mm, optional
        Pixel size (default 1).
    rng : numpy.random.Generator, optional
        With it, half the clicks land on a random point deep inside the error instead of its
        deepest point (a less exact user); without it the clicks are deterministic.

    Returns
    -------
    mask : (rows, cols) uint8
        1 = structure after the clicks.
    info : dict
        ``dice`` (start, then after each click), ``clicks`` (row, col, positive) and
        ``seconds`` of refinement.
    """
    from napari_medseg.core.correct.refine import refine_with_clicks
    from napari_medseg.training.clicks import click_for

    truth = np.asarray(truth) > 0
    cur = (np.asarray(start) > 0).astype(np.uint8)
    pos: list[np.ndarray] = []
    neg: list[np.ndarray] = []
    clicks: list[list] = []
    dice = [_dice(cur, truth)]
    t0 = time.perf_counter()
    for _ in range(n_clicks):
        c = click_for(truth, cur == 1, rng)
        if c is None:
            break
        (pos if c[1] else neg).append(np.asarray(c[0], float))
        clicks.append([int(c[0][0]), int(c[0][1]), bool(c[1])])
        cur = refine_with_clicks(image, cur, 1, pos, neg, spacing).apply(cur)
        dice.append(_dice(cur, truth))
    info = {"dice": dice, "clicks": clicks, "seconds": round(time.perf_counter() - t0, 2)}
    return (cur == 1).astype(np.uint8), info


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    n, d = _dice_counts(a, b)
    return round(n / d, 4) if d else 1.0


def correct_case(model_dir: Path, dataset: Path, name: str, n_clicks: int) -> tuple:
    """Click-correct one case starting from a model's prediction; returns ``(mask, info)``."""
    from napari_medseg.core.segment.segment import segment
    from napari_medseg.io.readers import read_image
    from napari_medseg.models.loaders.folder import load_model_folder
    from napari_medseg.progress import run_sync

    ip, lp = case_files(dataset, name)
    rec = read_image(ip)[0]
    truth = np.asarray(read_image(lp)[0].data)
    pred = run_sync(segment(rec, load_model_folder(model_dir), device="cpu")).labels
    spacing = rec.spacing  # voxel size along the file axes (mm), from the affine
    mask, info = click_correction(np.asarray(rec.data), truth, pred, n_clicks, spacing)
    info.update(
        name=name,
        start_model=str(model_dir),
        start_counts=_dice_counts(pred, truth),
        counts=_dice_counts(mask, truth),
    )
    return mask, info


def corrected_dataset(src: Path, corrections: dict[str, np.ndarray], dst: Path) -> Path:
    """A dataset of the corrected cases: images linked from ``src``, labels = ``corrections``."""
    import tifffile

    dst = subset_dataset(src, list(corrections), dst)
    for name, mask in corrections.items():
        _, lab = case_files(src, name)
        if lab.suffix not in (".tif", ".tiff"):
            raise ValueError(f"{lab.name}: corrected labels are written as TIFF only")
        out = dst / "labelsTr" / lab.name
        out.unlink()  # the link to the ground truth
        tifffile.imwrite(str(out), np.asarray(mask, np.uint8))
    return dst


def evaluate_classical(dataset: Path, names: list[str], dark: bool = False) -> dict:
    """Pooled foreground Dice of :func:`detect_classical` (Otsu + watershed) on ``names``."""
    from napari_medseg.core.detect.classical import detect_classical
    from napari_medseg.io.readers import read_image
    from napari_medseg.progress import run_sync

    counts = {}
    t0 = time.perf_counter()
    for n in names:
        ip, lp = case_files(dataset, n)
        rec = read_image(ip)[0]
        truth = np.asarray(read_image(lp)[0].data)
        res = run_sync(detect_classical(rec, dark_objects=dark))
        counts[n] = _dice_counts(res.instances, truth)
    out = _summarise(counts)
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


def untrained_model(pool_dataset: Path, out: Path, seed: int, width: int = 16) -> Path:
    """The network ``train()`` would start from (planned on the pool), random init, saved."""
    import torch

    from napari_medseg.models.networks import build_network, save_model
    from napari_medseg.training.dataset import load_dataset
    from napari_medseg.training.fingerprint import compute_fingerprint, plan

    ds = load_dataset(pool_dataset)
    card = plan(ds, compute_fingerprint(ds, seed=seed), name=Path(out).name, width=width)
    torch.manual_seed(seed)
    save_model(out, card, build_network(card).eval())
    return Path(out)


def train_point(
    dataset: Path,
    out: Path,
    init: Path | None,
    budget: float,
    seed: int,
    val_fraction: float = 0.2,
) -> dict:
    """One ``train()`` call; returns the model folder and what the run cost."""
    from napari_medseg.progress import run_sync
    from napari_medseg.training.segment import train

    t0 = time.perf_counter()
    res = run_sync(
        train(
            dataset,
            out,
            init=init,
            time_budget=budget,
            seed=seed,
            device="cpu",
            val_fraction=val_fraction,
        )
    )
    rec = res.card.training["recipe"]
    return {
        "model_dir": str(res.out_dir),
        "wall_s": round(time.perf_counter() - t0, 1),
        "train_s": rec["time_s"],
        "iterations": rec["iterations"],
        "epochs": rec["epochs"],
        "best_epoch": rec["best_epoch"],
        "val_dice": res.best_val_dice,
        "held_out": res.card.training["validation_split"]["held_out"],
        "n_train_cases": res.card.training["n_train_cases"],
        "patch_size": rec["patch_size"],
        "batch_size": rec["batch_size"],
    }


# --------------------------------------------------------------------------- main


def _curve(
    label: str,
    dataset: Path,
    eval_names: list[str],
    pool: list[str],
    init: Path | None,
    seeds: list[int],
    budget: float,
    work: Path,
    val_fraction: float = 0.2,
    corrections: str = "gt",
    n_clicks: int = 5,
) -> dict:
    runs: dict[int, list[dict]] = {0: [], **{k: [] for k in N_CORRECTED}}
    for seed in seeds:
        if init is None:
            m0 = untrained_model(
                subset_dataset(dataset, pool, work / f"{label}_pool"),
                work / f"{label}_s{seed}_k0",
                seed,
            )
        else:
            m0 = init
        if init is None or seed == seeds[0]:
            r0 = evaluate_model(m0, dataset, eval_names)
            r0.update(seed=seed, corrected=[], train_s=0.0)
            print(f"  {label} seed {seed}  0 cases: Dice {r0['dice']:.3f}", flush=True)
        else:  # the shipped model is deterministic: same score for every seed
            r0 = dict(runs[0][0], seed=seed)
        runs[0].append(r0)
        order = corrected_order(pool, seed)
        fixed: dict[str, np.ndarray] = {}  # click-corrected labels, kept once saved
        fixed_info: dict[str, dict] = {}
        current, prev_k = Path(m0), 0  # the model the user corrects with
        for k in N_CORRECTED:
            chosen = order[:k]
            data_dir = work / f"{label}_s{seed}_k{k}_data"
            if corrections == "clicks":
                for n in chosen:
                    if n not in fixed:  # a new case: corrected from the current model
                        fixed[n], fixed_info[n] = correct_case(current, dataset, n, n_clicks)
                        fixed_info[n]["model_point"] = prev_k
                        print(
                            f"    {n}: Dice vs truth {fixed_info[n]['dice'][0]:.3f} (model "
                            f"after {prev_k} cases) -> {fixed_info[n]['dice'][-1]:.3f} after "
                            f"{len(fixed_info[n]['clicks'])} clicks",
                            flush=True,
                        )
                ds = corrected_dataset(dataset, {n: fixed[n] for n in chosen}, data_dir)
            else:
                ds = subset_dataset(dataset, chosen, data_dir)
            t = train_point(ds, work / f"{label}_s{seed}_k{k}", init, budget, seed, val_fraction)
            r = evaluate_model(Path(t["model_dir"]), dataset, eval_names)
            r.update(t, seed=seed, corrected=chosen)
            if corrections == "clicks":
                r["corrections"] = [fixed_info[n] for n in chosen]
                # pooled over the corrected cases: the saved labels and the predictions the
                # user started from, both against the ground truth
                for key, c in (("correction_dice", "counts"), ("start_dice", "start_counts")):
                    r[key] = _summarise({n: fixed_info[n][c] for n in chosen})["dice"]
            runs[k].append(r)
            extra = (
                f", corrections Dice {r['correction_dice']:.3f}" if corrections == "clicks" else ""
            )
            print(
                f"  {label} seed {seed} {k} cases {chosen}: Dice {r['dice']:.3f} "
                f"({t['iterations']} it, {t['train_s']:.0f} s train, {t['wall_s']:.0f} s wall"
                f"{extra})",
                flush=True,
            )
            current, prev_k = Path(t["model_dir"]), k
    summary = {}
    for k, rs in runs.items():
        d = [r["dice"] for r in rs]
        summary[str(k)] = {
            "dice_mean": round(float(np.mean(d)), 4),
            "dice_min": round(float(np.min(d)), 4),
            "dice_max": round(float(np.max(d)), 4),
            "train_s_mean": round(float(np.mean([r.get("train_s", 0.0) for r in rs])), 1),
            "iterations_mean": round(float(np.mean([r.get("iterations", 0) for r in rs])), 1),
        }
        if k and corrections == "clicks":
            for key in ("correction_dice", "start_dice"):
                v = [r[key] for r in rs]
                summary[str(k)][f"{key}_mean"] = round(float(np.mean(v)), 4)
                summary[str(k)][f"{key}_min"] = round(float(np.min(v)), 4)
    return {"summary": summary, "runs": {str(k): v for k, v in runs.items()}}


def _machine() -> dict:
    import torch

    return {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "load_avg_start": list(os.getloadavg()),
    }


def print_table(report: dict) -> None:
    """The learning-curve table: Dice mean [min-max] per number of corrected cases."""
    w = 34
    print()
    print(f"{'curve':{w}s} " + " ".join(f"{f'{k} cases':>21s}" for k in (0, *N_CORRECTED)))
    for key, cur in report["curves"].items():
        cells = []
        for k in (0, *N_CORRECTED):
            s = cur["summary"][str(k)]
            cells.append(f"{s['dice_mean']:.3f} [{s['dice_min']:.3f}-{s['dice_max']:.3f}]")
        print(f"{key:{w}s} " + " ".join(f"{c:>21s}" for c in cells))
        secs = []
        for k in N_CORRECTED:
            s = cur["summary"][str(k)]
            secs.append(f"{s['train_s_mean']:.0f} s, {s['iterations_mean']:.0f} it")
        print(
            f"{'  training time, iterations':{w}s} {'':>21s} " + " ".join(f"{c:>21s}" for c in secs)
        )
        if "correction_dice_mean" in cur["summary"][str(N_CORRECTED[0])]:
            cd = []
            for k in N_CORRECTED:
                s = cur["summary"][str(k)]
                cd.append(f"{s['start_dice_mean']:.3f} -> {s['correction_dice_mean']:.3f}")
            print(
                f"{'  corrected cases: start -> saved':{w}s} {'':>21s} "
                + " ".join(f"{c:>21s}" for c in cd)
            )
    for key, b in report["baselines"].items():
        print(f"{'baseline ' + key:{w}s} {b['dice']:>21.3f}   (same evaluation cases)")


def main(argv: list[str] | None = None) -> int:
    import torch

    torch.set_num_threads(1)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=45.0, help="seconds of training per point")
    ap.add_argument("--repeats", type=int, default=3, help="random orders of corrected cases")
    ap.add_argument("--only", choices=["nuclei", "cord"], default=None)
    ap.add_argument(
        "--val-fraction",
        type=float,
        default=0.2,
        help="train()'s validation hold-out (0.2 = what Train on corrections uses; 0 = train "
        "on every corrected case and keep the last epoch)",
    )
    ap.add_argument(
        "--corrections",
        choices=["gt", "clicks"],
        default="gt",
        help="what a corrected case's label is: the ground truth (a perfect correction), or "
        "the current model's prediction after --clicks simulated clicks of click refinement",
    )
    ap.add_argument(
        "--clicks", type=int, default=5, help="clicks per case with --corrections clicks"
    )
    ap.add_argument("--no-finetune", action="store_true", help="skip the fluo_nuclei_2d curve")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--json", default=None, help="write the full report to this JSON file")
    args = ap.parse_args(argv)
    if not (DATA / "microscopy/dsb2018_nuclei/image.tif").exists():
        print(f"needs the real data under {DATA} (set MEDSEG_DATA)", file=sys.stderr)
        return 1
    from napari_medseg.models.registry import resolve_model

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="medseg_lc_"))
    work.mkdir(parents=True, exist_ok=True)
    seeds = list(range(args.repeats))
    mode = {"corrections": args.corrections, "n_clicks": args.clicks}
    t_start = time.perf_counter()
    report: dict = {
        "machine": _machine(),
        "budget_s": args.budget,
        "val_fraction": args.val_fraction,
        "seeds": seeds,
        "corrections": (
            "ground truth (a perfect correction); no click simulation"
            if args.corrections == "gt"
            else f"clicks: the current model's prediction after {args.clicks} simulated clicks "
            "(simulate_click on the largest error, refine_with_clicks: 2D random walker, the "
            "dock's defaults); the 1st case from the starting model, the later ones from the "
            "model of the previous curve point"
        ),
        "n_clicks": args.clicks if args.corrections == "clicks" else None,
        "curves": {},
        "baselines": {},
        "cases": {},
    }
    if args.only in (None, "nuclei"):
        nds = nuclei_dataset(DATA, work)
        from napari_medseg.training.dataset import list_cases

        names = [c for c, _, _ in list_cases(nds)]
        ev, pool = nuclei_split(names)
        report["cases"]["nuclei"] = {"eval": ev, "pool": pool}
        print(f"nuclei: {len(ev)} evaluation tiles {ev}, pool of {len(pool)}", flush=True)
        report["baselines"]["nuclei (Otsu + watershed)"] = evaluate_classical(nds, ev)
        report["curves"]["nuclei scratch"] = _curve(
            "nuclei_scratch",
            nds,
            ev,
            pool,
            None,
            seeds,
            args.budget,
            work,
            args.val_fraction,
            **mode,
        )
        if not args.no_finetune:
            report["curves"][f"nuclei finetune {NUCLEI_MODEL}"] = _curve(
                "nuclei_ft",
                nds,
                ev,
                pool,
                resolve_model(NUCLEI_MODEL),
                seeds,
                args.budget,
                work,
                args.val_fraction,
                **mode,
            )
    if args.only in (None, "cord"):
        ev_c, pool_c = cord_slices(DATA)
        cds = write_2d_dataset(
            ev_c + pool_c,
            work / "Dataset900_CordSlices",
            "Dataset900_CordSlices",
            "MR",
            "spinal_cord",
            "Axial slices (RAS) of the sct_testing_data t2 and t1w cervical MRI, MANUAL cord "
            "masks (MIT).",
        )
        ev, pool = [c.name for c in ev_c], [c.name for c in pool_c]
        report["cases"]["cord"] = {
            "eval": ev,
            "pool": pool,
            "eval_world_s_mm": [round(c.world_s_mm, 1) for c in ev_c],
            "pool_world_s_mm": [round(c.world_s_mm, 1) for c in pool_c],
        }
        print(f"cord: {len(ev)} evaluation slices, pool of {len(pool)}", flush=True)
        report["baselines"]["cord (Otsu, bright)"] = evaluate_classical(cds, ev)
        report["baselines"]["cord (Otsu, dark)"] = evaluate_classical(cds, ev, dark=True)
        report["curves"]["cord scratch"] = _curve(
            "cord_scratch",
            cds,
            ev,
            pool,
            None,
            seeds,
            args.budget,
            work,
            args.val_fraction,
            **mode,
        )
    report["total_s"] = round(time.perf_counter() - t_start, 1)
    report["machine"]["load_avg_end"] = list(os.getloadavg())
    print_table(report)
    print(f"\ntotal {report['total_s']:.0f} s; work folder {work}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"report in {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
