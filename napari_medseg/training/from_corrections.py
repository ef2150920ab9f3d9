"""Fine-tune the current model on the cases a clinician corrected (a progress generator).

:func:`finetune_from_corrections` exports the corrected cases of a worklist
(:class:`napari_medseg.core.correct.worklist.Worklist`) as an nnU-Net dataset, fine-tunes the model
with
:func:`napari_medseg.training.segment.train` (``init=`` the current model, so the architecture,
spacing, normalisation and classes are kept) and writes a *new* model folder, by default in the
user models directory next to the earlier versions (which stay, so the user can switch back in the
Segment dock). The new card records its parent (``name@version``), the cases used and the scores.

With three or more corrected cases whole cases are held out for validation, and both the parent
model and the fine-tuned one are run on them with the full inference pipeline
(:func:`napari_medseg.core.segment.segment.segment`): Dice on the source grid, before and after, in
``card.metrics["before_after"]``. With fewer cases :func:`train` holds out a block of slices of
every case and only its validation Dice is reported.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Generator, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from napari_medseg.core.engine.metrics import dice
from napari_medseg.progress import Progress
from napari_medseg.training.options import TrainOptions
from napari_medseg.training.segment import TrainResult

__all__ = ["finetune_from_corrections"]


def _dice(pred: np.ndarray, truth: np.ndarray, classes: Iterable[int]) -> dict[str, float]:
    """Dice per class (1.0 where a class is in neither image)."""
    return {str(c): dice(pred, truth, [c], empty=1.0) for c in classes}


def finetune_from_corrections(
    worklist: Any,
    init: str | Path,
    out_dir: str | Path | None = None,
    options: TrainOptions | None = None,
    *,
    statuses: Iterable[str] = ("corrected", "approved"),
    evaluate: bool = True,
    hold_out: bool = True,
    **settings: Any,
) -> Generator[Progress, None, TrainResult]:
    """Fine-tune ``init`` on a worklist's corrected cases; yields progress, returns the result.

    Parameters
    ----------
    worklist : Worklist or path-like
        The project folder (its newest corrected version of each case is the label).
    init : str or path-like
        The model to start from: a registry name or a model folder.
    out_dir : path-like, optional
        New model folder (default: ``<user models dir>/<name>-ft<timestamp>``).
    options : TrainOptions, optional
        Settings of the fine-tuning run (:func:`napari_medseg.training.segment.train`):
        ``time_budget`` (seconds, default 600), ``device``, ``max_epochs``, ``seed``,
        ``batch_size``, ``patch_size``... Its ``init`` and ``name`` are set here (``init`` and
        the output folder's name).
    statuses : iterable of str
        Which cases count as corrected.
    evaluate : bool
        Run the before/after comparison on held-out cases (three or more cases).
    hold_out : bool
        True: hold out validation data (whole cases from three cases on) to pick the best
        epoch and to measure before/after honestly. False: train on every corrected case
        (``val_fraction=0``, last epoch kept, no before/after): with few cases that is the
        better model (docs/learning_curve.md: cord slices, 4 cases, Dice 0.836 on every case
        against 0.682 with one case held out), but its gain is then unmeasured.
    **settings
        :class:`~napari_medseg.training.options.TrainOptions` fields as keywords (e.g.
        ``time_budget=120, device="cpu"``); they replace those of ``options``.
    """
    from napari_medseg.core.correct.worklist import Worklist
    from napari_medseg.models.card import ModelCard
    from napari_medseg.models.registry import resolve_model, user_models_dir
    from napari_medseg.training.segment import train

    wl = worklist if isinstance(worklist, Worklist) else Worklist(worklist)
    init_path = resolve_model(init)
    if not (init_path / "model.json").is_file():
        from napari_medseg.errors import MedsegError

        raise MedsegError(
            f"{init_path.name} cannot be fine-tuned here: only model folders (model.json + "
            "weights) can; MONAI bundles and TorchScript files cannot."
        )
    parent = ModelCard.load(init_path)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = (
        Path(out_dir)
        if out_dir is not None
        else user_models_dir(create=True) / (f"{parent.name}-ft{stamp}")
    )
    yield Progress(0, 0, "collecting the corrected cases")
    ds_dir = wl.folder / "training" / f"dataset-{stamp}"
    wl.export_dataset(ds_dir, statuses, class_names=parent.class_names)
    cases = [c.name for c in wl.cases() if c.status in set(statuses) and c.corrected]
    opts = dataclasses.replace(
        TrainOptions.merged(options, settings), init=init_path, name=out.name
    )
    if not hold_out:
        opts.val_fraction = 0.0
    result = yield from train(ds_dir, out, opts)
    card = result.card
    card.training["corrections"] = {
        "worklist": str(wl.folder.resolve()),
        "cases": cases,
        "labels": {c.name: c.corrected[-1].name for c in wl.cases() if c.name in cases},
        "parent_folder": str(init_path),
    }
    val_cases = list(card.training.get("val_cases") or [])
    card.training["corrections"]["held_out"] = bool(hold_out)
    if evaluate and hold_out and val_cases and len(cases) >= 3:
        card.metrics["before_after"] = yield from _before_after(
            wl, val_cases, init_path, out, opts.device
        )
    card.save(out)
    return result


def _before_after(
    wl: Any, val_cases: list[str], parent_path: Path, new_path: Path, device: str
) -> Generator[Progress, None, dict]:
    """Dice of the parent and the fine-tuned model on held-out corrected cases (source grid)."""
    from napari_medseg.core.segment.segment import segment
    from napari_medseg.io import read_image
    from napari_medseg.models.registry import load_model

    dev = "cpu" if device == "auto" else device
    models = {
        "before": load_model(parent_path, device=dev),
        "after": load_model(new_path, device=dev),
    }
    classes = [c for c in models["before"].card.class_names if c != 0]
    per_case: dict[str, dict] = {}
    for i, name in enumerate(val_cases):
        case = wl.case(name)
        (img,) = read_image(case.image)
        (lab,) = read_image(case.corrected[-1])
        truth = np.asarray(lab.data)
        per_case[name] = {}
        for which, model in models.items():
            yield Progress(i, len(val_cases), f"scoring {which} fine-tuning on {name}")
            res = yield from segment(img, model, device=dev)
            per_case[name][which] = _dice(np.asarray(res.labels), truth, classes)
    mean = {
        which: float(np.mean([v for d in per_case.values() for v in d[which].values()]))
        for which in ("before", "after")
    }
    return {"cases": per_case, "mean_dice": mean, "computed_on": "source grid, held-out cases"}
