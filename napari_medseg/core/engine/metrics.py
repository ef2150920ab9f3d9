"""Label overlap shared by every task: Dice of two masks or label images on one grid.

Used by registration (label overlap after warping), click refinement, fine-tuning from
corrections and the benchmarks. Training pools its own per-class counts over volumes
(:func:`napari_medseg.training.segment.dice_per_class`).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

__all__ = ["dice"]


def dice(
    a: np.ndarray,
    b: np.ndarray,
    labels: Iterable[int] | None = None,
    *,
    empty: float = float("nan"),
) -> float:
    """Mean Dice coefficient ``2 |A & B| / (|A| + |B|)`` over labels.

    Parameters
    ----------
    a, b : array
        Masks (bool) or label images of the same shape, any axis order (the same in both).
    labels : iterable of int, optional
        The label values to score; by default every non-zero value of ``a`` (``True`` for a
        boolean mask). A label present in neither image is skipped.
    empty : float
        The result when no label is present in either image (``nan`` by default; ``1.0``
        scores two empty masks as a perfect match).

    Returns
    -------
    float
        The mean over the scored labels, in [0, 1].
    """
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"Dice needs two arrays of one shape, got {a.shape} and {b.shape}")
    labels = [int(v) for v in np.unique(a) if v != 0] if labels is None else labels
    scores = []
    for lab in labels:
        x, y = a == lab, b == lab
        s = int(np.count_nonzero(x)) + int(np.count_nonzero(y))
        if s:
            scores.append(2.0 * int(np.count_nonzero(x & y)) / s)
    return float(np.mean(scores)) if scores else float(empty)
