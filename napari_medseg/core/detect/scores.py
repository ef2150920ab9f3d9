"""How good detections are: box F1 (IoU or centre distance, one-to-one matching) and average
precision, over a set of images. Boxes are rows ``mins..., maxs...`` in array indices.
"""

from __future__ import annotations

import numpy as np

from napari_medseg.core.detect.boxes import box_centres
from napari_medseg.core.detect.result import box_iou

__all__ = ["average_precision", "detection_scores", "match_count", "precision_recall_f1"]


def match_count(pred: np.ndarray, gt: np.ndarray, ok: np.ndarray, cost: np.ndarray) -> int:
    """True positives of a one-to-one assignment (Hungarian, lowest ``cost``) of predictions
    to truths where ``ok[i, j]`` allows pair ``(i, j)``."""
    from scipy.optimize import linear_sum_assignment

    if len(pred) == 0 or len(gt) == 0:
        return 0
    r, c = linear_sum_assignment(np.where(ok, cost, 1e6))
    return int(ok[r, c].sum())


def precision_recall_f1(tp: int, n_pred: int, n_gt: int) -> dict:
    """``{"precision", "recall", "f1"}`` (4 decimals) from counts."""
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_gt if n_gt else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return {"precision": round(p, 4), "recall": round(r, 4), "f1": round(f, 4)}


def average_precision(
    dets: list[tuple[float, int, np.ndarray]], gts: list[np.ndarray], iou: float = 0.5
) -> float:
    """VOC/COCO-style AP (all-point interpolation, one class) of boxes at an IoU threshold.

    ``dets``: ``(score, image index, box)``; ``gts``: the true boxes of each image. Greedy
    matching in decreasing score order.
    """
    n_gt = sum(len(g) for g in gts)
    if n_gt == 0 or not dets:
        return 0.0
    used = [np.zeros(len(g), dtype=bool) for g in gts]
    tp = []
    for _, k, box in sorted(dets, key=lambda v: -v[0]):
        g = gts[k]
        if len(g) == 0:
            tp.append(0)
            continue
        ious = box_iou(np.asarray(box, float)[None], g)[0]
        ious[used[k]] = -1
        j = int(np.argmax(ious))
        if ious[j] >= iou:
            used[k][j] = True
            tp.append(1)
        else:
            tp.append(0)
    tpa = np.asarray(tp, dtype=float)
    ctp = np.cumsum(tpa)
    prec = ctp / np.arange(1, len(tpa) + 1)
    rec = ctp / n_gt
    mrec = np.concatenate([[0.0], rec, [1.0]])
    mpre = np.concatenate([[0.0], prec, [0.0]])
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    ii = np.nonzero(mrec[1:] != mrec[:-1])[0]
    return float(((mrec[ii + 1] - mrec[ii]) * mpre[ii + 1]).sum())


def detection_scores(
    preds: list[tuple[np.ndarray, np.ndarray]],
    gts: list[np.ndarray],
    *,
    threshold: float = 0.5,
    iou: float = 0.5,
    distance: float = 6.0,
) -> dict:
    """Precision, recall, F1 (boxes at IoU and centres within a distance) and AP over images.

    Parameters
    ----------
    preds : list of (boxes (N, 2d), scores (N,))
        Predicted boxes per image (array indices, mins then exclusive maxs).
    gts : list of (M, 2d) arrays
        True boxes per image.
    threshold : float
        Score threshold for P/R/F1 (AP uses all scores).
    iou, distance : float
        Box match: one-to-one (Hungarian) with IoU >= ``iou``; centre match: one-to-one with
        centre distance <= ``distance`` voxels (box centres for both sides).

    Returns
    -------
    dict
        ``n_true``, ``n_pred``, ``boxes_iou50`` and ``points_6px`` (``precision``, ``recall``,
        ``f1``; keys named after the defaults), ``ap50``.
    """
    n_pred = n_gt = tp_b = tp_p = 0
    dets = []
    for k, ((pb, ps), gb) in enumerate(zip(preds, gts)):
        gb = np.asarray(gb, float)
        width = gb.shape[1] if gb.ndim == 2 and gb.shape[1] else np.asarray(pb).shape[-1]
        gb = gb.reshape(-1, width)
        pb = np.asarray(pb, float).reshape(-1, width)
        for s, b in zip(ps, pb):
            dets.append((float(s), k, b))
        keep = np.asarray(ps, float) >= threshold
        pb = pb[keep]
        n_pred += len(pb)
        n_gt += len(gb)
        if len(pb) and len(gb):
            ious = box_iou(pb, gb)
            tp_b += match_count(pb, gb, ious >= iou, -ious)
            pc, _ = box_centres(pb)
            gc, _ = box_centres(gb)
            dist = np.linalg.norm(pc[:, None] - gc[None], axis=-1)
            tp_p += match_count(pb, gb, dist <= distance, dist)
    return {
        "n_true": n_gt,
        "n_pred": n_pred,
        "boxes_iou50": precision_recall_f1(tp_b, n_pred, n_gt),
        "points_6px": precision_recall_f1(tp_p, n_pred, n_gt),
        "ap50": round(average_precision(dets, gts, iou), 4),
    }
