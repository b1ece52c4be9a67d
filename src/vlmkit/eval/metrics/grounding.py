"""Referring-expression grounding: IoU between the predicted and the target box.

For each item, IoU = area(P ∩ T) / area(P ∪ T) with boxes in normalised [0, 1] coordinates
(`Box.iou`); a prediction with no parseable box, or a degenerate box (zero area), has IoU 0.

  acc_iou50 = #(IoU >= 0.5) / n       (the usual "Acc@0.5" of RefCOCO-style evaluation; the
                                       comparison allows 1e-9 of float rounding)
  mean_iou  = sum(IoU) / n            (failed parses contribute 0)
"""

from __future__ import annotations

from typing import Sequence

from vlmkit.data.sample import Box

IOU_THRESHOLD = 0.5
_EPS = 1e-9


def box_iou(pred: Box | None, target: Box | None) -> float:
    """IoU of two boxes; 0.0 when either is missing."""
    if pred is None or target is None:
        return 0.0
    return float(pred.iou(target))


def grounding_metrics(ious: Sequence[float], n_unparsed: int = 0, threshold: float = IOU_THRESHOLD) -> dict:
    """``{"n", "acc_iou50", "mean_iou", "n_unparsed"}`` from per-item IoUs (failed parse = 0.0)."""
    n = len(ious)
    return {
        "n": n,
        "acc_iou50": sum(1 for v in ious if v >= threshold - _EPS) / n if n else 0.0,
        "mean_iou": float(sum(ious)) / n if n else 0.0,
        "n_unparsed": int(n_unparsed),
    }
