"""Metrics: each module defines the exact computation in its docstrings (see docs/evaluation.md)."""

from vlmkit.eval.metrics.anls import anls, anls_score, levenshtein
from vlmkit.eval.metrics.captioning import caption_scores
from vlmkit.eval.metrics.chair import chair_scores, coco_vocabulary, scene_truth, shapes_attribute_chair, shapes_vocabulary
from vlmkit.eval.metrics.exact import accuracy_by_type, exact_match, mean
from vlmkit.eval.metrics.grounding import box_iou, grounding_metrics
from vlmkit.eval.metrics.mcq import circular_scores, circular_variants, extract_option
from vlmkit.eval.metrics.mme import COGNITION_SUBTASKS, PERCEPTION_SUBTASKS, mme_scores
from vlmkit.eval.metrics.vqa import normalize_vqa_answer, vqa_accuracy, vqa_scores
from vlmkit.eval.metrics.yesno import yesno_metrics

__all__ = [
    "COGNITION_SUBTASKS",
    "PERCEPTION_SUBTASKS",
    "accuracy_by_type",
    "anls",
    "anls_score",
    "box_iou",
    "caption_scores",
    "chair_scores",
    "circular_scores",
    "circular_variants",
    "coco_vocabulary",
    "exact_match",
    "extract_option",
    "grounding_metrics",
    "levenshtein",
    "mean",
    "mme_scores",
    "normalize_vqa_answer",
    "scene_truth",
    "shapes_attribute_chair",
    "shapes_vocabulary",
    "vqa_accuracy",
    "vqa_scores",
    "yesno_metrics",
]
