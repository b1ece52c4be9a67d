"""Metrics: each module defines the exact computation in its docstrings (see docs/evaluation.md)."""

from vlmkit.eval.metrics.exact import accuracy_by_type, exact_match, mean
from vlmkit.eval.metrics.grounding import box_iou, grounding_metrics
from vlmkit.eval.metrics.yesno import yesno_metrics

__all__ = ["accuracy_by_type", "box_iou", "exact_match", "grounding_metrics", "mean", "yesno_metrics"]
