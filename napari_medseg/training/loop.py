"""The training loop the trainers share: time budget, poly learning rate, epochs, best checkpoint.

:class:`Schedule` is the stop rule and learning rate of every trainer: training runs until a
time budget (seconds, wall clock) or an iteration cap is spent, and the AdamW learning rate
decays as ``lr * (1 - f) ** 0.9`` where ``f`` is the larger of the spent fractions of the time
budget and of the iteration cap (capped at 0.999). :meth:`Schedule.step` is one optimiser step
(learning rate set, gradients clipped to norm 12).

:class:`EpochLoop` adds the epochs of :func:`napari_medseg.training.segment.train` and
:func:`napari_medseg.training.detect.train_detection`: an epoch is
``iterations_per_epoch`` iterations or ``max(time_budget / 8, 1)`` seconds, whichever ends
first; it ends with a validation (a task's generator returning a :class:`Validation`) and the
network state of the best validation so far is kept and loaded at the end. The epoch rule leaves
time for the validation that ends an epoch (the last validation's duration). Progress ``info``
is ``{"epoch", "iteration", "loss", <score_key>, "phase"}`` with ``phase`` one of ``"train"``,
``"validation"``, ``"epoch"`` and ``"save"``.

Only the numerics live here; what is sampled, the loss, the validation scores and the card's
metrics are the task's.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_medseg.errors import MedsegError
from napari_medseg.progress import Progress

#: Gradient norm clip of every trainer.
GRAD_CLIP = 12.0

__all__ = ["GRAD_CLIP", "EpochLoop", "Schedule", "Validation", "resolve_budget", "training_block"]


def resolve_budget(
    time_budget: float | None, limit: int | None, who: str, limit_name: str = "max_epochs"
) -> float:
    """The time budget in seconds (``inf`` for None); a run needs a finite budget or ``limit``.

    Raises
    ------
    ValueError
        ``"<who>() needs a finite time_budget or <limit_name>"`` when neither bounds the run.
    """
    budget = math.inf if time_budget is None else float(time_budget)
    if not math.isfinite(budget) and not limit:
        raise ValueError(f"{who}() needs a finite time_budget or {limit_name}")
    return budget


class Schedule:
    """Time budget, iteration cap and poly learning rate of a training run.

    The clock starts when the object is made.

    Parameters
    ----------
    lr : float
        Initial learning rate.
    time_budget : float
        Seconds of training (``math.inf``: none).
    max_iterations : int, optional
        Iteration cap; it also drives the learning-rate decay.

    Attributes
    ----------
    iteration : int
        Optimiser steps done (:meth:`step`).
    """

    def __init__(self, lr: float, time_budget: float, max_iterations: int | None = None) -> None:
        self.lr = lr
        self.time_budget = float(time_budget)
        self.max_iterations = max_iterations
        self.iteration = 0
        self.start = time.monotonic()

    def elapsed(self) -> float:
        """Seconds since the start."""
        return time.monotonic() - self.start

    def fraction(self) -> float:
        """Spent share of the run: the larger of time and iterations, at most 0.999."""
        tb = self.time_budget
        f = self.elapsed() / tb if tb and math.isfinite(tb) else 0.0
        if self.max_iterations:
            f = max(f, self.iteration / max(self.max_iterations, 1))
        return min(f, 0.999)

    def poly_lr(self) -> float:
        """``lr * (1 - fraction()) ** 0.9``."""
        return self.lr * (1 - self.fraction()) ** 0.9

    def step(self, net: Any, opt: Any, compute_loss: Callable[[], Any]) -> float:
        """One optimiser step: set the poly learning rate, back-propagate, clip, step.

        Parameters
        ----------
        net : torch.nn.Module
        opt : torch.optim.Optimizer
        compute_loss : callable
            Returns the loss tensor (the forward pass runs after the gradients are zeroed).

        Returns
        -------
        float
            The loss.
        """
        import torch

        for g in opt.param_groups:
            g["lr"] = self.poly_lr()
        opt.zero_grad(set_to_none=True)
        loss = compute_loss()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), GRAD_CLIP)
        opt.step()
        self.iteration += 1
        return float(loss.detach())


@dataclass
class Validation:
    """What a task's validation returns to :meth:`EpochLoop.run`.

    Attributes
    ----------
    record : dict
        Entries added to the epoch's history record (e.g. ``val_dice``, ``val_dice_mean``).
    score : float
        The headline score: Progress ``info[score_key]`` and the epoch message.
    rank : object, optional
        Compared with ``>`` to choose the best checkpoint (default: ``score``); the first
        validation is always the best so far, a tie keeps the earlier one.
    details : object, optional
        Kept with the best checkpoint (:attr:`EpochLoop.best`) for the card's metrics.
    """

    record: dict
    score: float
    rank: Any = None
    details: Any = None


class EpochLoop(Schedule):
    """Epochs with validation and best-checkpoint keeping (module docstring).

    Parameters
    ----------
    lr, time_budget : see :class:`Schedule`
    max_epochs : int, optional
        Stop after this many epochs (the iteration cap of the learning rate is
        ``max_epochs * iterations_per_epoch``).
    iterations_per_epoch : int
    score_key : str
        Progress ``info`` key of the last validation score (``"val_dice"``, ``"val_f1"``).
    score_label : str
        How the epoch message names it (``"val Dice"``).

    Attributes
    ----------
    epoch : int
        Epochs done (during :meth:`run`: the current one).
    history : list of dict
        One record per epoch: ``epoch``, ``iterations``, ``loss`` (mean), ``lr``, the
        validation's ``record`` entries and ``time`` (seconds since the start).
    best : Validation or None
        The best validation; ``best_epoch`` its epoch (0 without validation).
    train_time : float
        Seconds of training, set when :meth:`run` ends.
    """

    def __init__(
        self,
        lr: float,
        time_budget: float,
        max_epochs: int | None,
        iterations_per_epoch: int,
        score_key: str = "val_dice",
        score_label: str = "val Dice",
    ) -> None:
        super().__init__(lr, time_budget, max_epochs * iterations_per_epoch if max_epochs else None)
        self.max_epochs = max_epochs
        self.iterations_per_epoch = iterations_per_epoch
        self.score_key = score_key
        self.score_label = score_label
        self.epoch_cap = max(self.time_budget / 8.0, 1.0)
        self.epoch = 0
        self.last_score: float | None = None
        self.history: list[dict] = []
        self.best: Validation | None = None
        self.best_epoch = 0
        self.best_state: dict | None = None
        self.val_time = 0.0
        self.train_time = 0.0
        self._best_rank: Any = None

    def progress(self, msg: str, loss: float | None, phase: str) -> Progress:
        """A Progress with the loop's ``info``; ``done/total`` in seconds of the budget, or in
        iterations when only ``max_epochs`` bounds the run."""
        info = {
            "epoch": self.epoch,
            "iteration": self.iteration,
            "loss": loss,
            self.score_key: self.last_score,
            "phase": phase,
        }
        if self.max_epochs and not math.isfinite(self.time_budget):
            return Progress(self.iteration, self.max_iterations or 0, msg, info)
        tb = self.time_budget
        return Progress(int(min(self.elapsed(), tb)), int(tb), msg, info)

    def run(
        self,
        net: Any,
        opt: Any,
        sample: Callable[[], Any],
        loss: Callable[[Any], Any],
        validate: Callable[[], Generator[Progress, None, Validation]] | None = None,
    ) -> Generator[Progress, None, Any]:
        """Train until the budget or ``max_epochs`` is spent; yields per iteration and epoch.

        Parameters
        ----------
        net : torch.nn.Module
        opt : torch.optim.Optimizer
        sample : callable
            Draws (and augments) one batch; called before the learning rate is set.
        loss : callable
            ``loss(batch)`` -> loss tensor (forward pass).
        validate : callable, optional
            Progress generator returning a :class:`Validation` (no validation when None).

        Returns
        -------
        torch.nn.Module
            ``net`` with the best validation's weights (the last ones without validation), on
            the CPU, in eval mode.

        Raises
        ------
        MedsegError
            When the budget ended before the first iteration.
        """
        stop = False
        while not stop:
            self.epoch += 1
            net.train()
            losses: list[float] = []
            ep_start = time.monotonic()
            for _ in range(self.iterations_per_epoch):
                # leave time for the validation that ends the epoch
                if (losses and self.elapsed() + self.val_time >= self.time_budget) or (
                    self.elapsed() >= self.time_budget
                ):
                    stop = True
                    break
                batch = sample()
                losses.append(self.step(net, opt, functools.partial(loss, batch)))
                yield self.progress(
                    f"epoch {self.epoch} iteration {self.iteration} loss {losses[-1]:.3f}",
                    losses[-1],
                    "train",
                )
                if time.monotonic() - ep_start > self.epoch_cap:
                    break
            if not losses:
                self.epoch -= 1
                break
            if (self.max_epochs and self.epoch >= self.max_epochs) or (
                self.elapsed() >= self.time_budget
            ):
                stop = True
            rec: dict[str, Any] = {
                "epoch": self.epoch,
                "iterations": self.iteration,
                "loss": round(float(np.mean(losses)), 4),
                "lr": round(self.poly_lr(), 6),
            }
            if validate is not None:
                v_start = time.monotonic()
                val = yield from validate()
                self.val_time = time.monotonic() - v_start
                self.last_score = val.score
                rec.update(val.record)
                rank = val.score if val.rank is None else val.rank
                if self.best is None or rank > self._best_rank:
                    self.best, self._best_rank, self.best_epoch = val, rank, self.epoch
                    self.best_state = {
                        k: t.detach().cpu().clone() for k, t in net.state_dict().items()
                    }
            rec["time"] = round(self.elapsed(), 1)
            self.history.append(rec)
            score = self.last_score
            yield self.progress(
                f"epoch {self.epoch} done: loss {rec['loss']:.3f}"
                + (f", {self.score_label} {score:.3f}" if score is not None else ""),
                rec["loss"],
                "epoch",
            )
        if self.iteration == 0:
            raise MedsegError("the time budget ended before the first training iteration.")
        self.train_time = self.elapsed()
        if self.best_state is not None:
            net.load_state_dict(self.best_state)
        return net.cpu().eval()


def training_block(
    loop: EpochLoop,
    dataset_dir: str | Path,
    ds: Any,
    split: dict,
    *,
    head: dict,
    patch_size: list[int],
    batch_size: int,
    loss: str,
    sampling: dict,
    augmentations: dict,
    seed: int,
    device: Any,
    init: str | Path | None,
) -> dict:
    """The card's ``training`` block of an :class:`EpochLoop` run.

    Parameters
    ----------
    loop : EpochLoop
        The finished loop (learning rate, epochs, iterations, time, history, best epoch).
    dataset_dir, ds : the dataset folder and its :class:`~.dataset.TrainingDataset`
    split : dict
        The ``info`` of :func:`.patches.split_items`.
    head : dict
        Recipe entries written first (e.g. ``{"task": ...}``).
    patch_size, batch_size, loss : recipe entries (patch in model axis order; loss as text)
    sampling : dict
        Recipe entries on patch sampling (e.g. ``foreground_oversampling``), written after
        ``time_budget_s``.
    augmentations, seed, device, init : written as given (``init`` as ``fine_tuned_from``).
    """
    return {
        "dataset": {
            "path": str(Path(dataset_dir).resolve()),
            "name": ds.name,
            "description": ds.description,
        },
        "n_train_cases": len(split["train_cases"]),
        "n_val_cases": len(split["val_cases"]),
        "train_cases": split["train_cases"],
        "val_cases": split["val_cases"],
        "validation_split": split,
        "recipe": {
            **head,
            "patch_size": patch_size,
            "batch_size": batch_size,
            "optimizer": "AdamW",
            "lr": loop.lr,
            "lr_schedule": "poly 0.9 over the time budget",
            "loss": loss,
            "epochs": loop.epoch,
            "iterations": loop.iteration,
            "iterations_per_epoch": loop.iterations_per_epoch,
            "time_s": round(loop.train_time, 1),
            "time_budget_s": loop.time_budget,
            **sampling,
            "augmentations": augmentations,
            "seed": seed,
            "device": str(device),
            "best_epoch": loop.best_epoch,
        },
        "history": loop.history,
        "fine_tuned_from": str(init) if init is not None else None,
    }
