"""Exact-match accuracy, overall and per question type."""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Sequence

from vlmkit.eval.extract import normalize_answer


def exact_match(answer: str | None, target: str | None) -> bool:
    """True when the extracted ``answer`` equals ``target`` after `normalize_answer` on both.

    A missing answer (extraction ``failed``) or a missing target is never a match.
    """
    if answer is None or target is None:
        return False
    return normalize_answer(answer) == normalize_answer(target)


def mean(values: Sequence[float]) -> float:
    """The arithmetic mean; 0.0 for an empty sequence."""
    return float(sum(values)) / len(values) if values else 0.0


def accuracy_by_type(items: Iterable[tuple[str, float]]) -> dict:
    """Accuracy from ``(question_type, score)`` pairs, score in [0, 1] (1 = correct).

    Returns ``{"accuracy": mean score over all items, "by_type": {type: mean score of that type},
    "n_by_type": {type: count}}``; types are sorted by name. Every item weighs the same in
    ``accuracy`` (it is a micro average, not the mean of the per-type accuracies).
    """
    groups: dict[str, list[float]] = defaultdict(list)
    scores: list[float] = []
    for qt, score in items:
        groups[str(qt)].append(float(score))
        scores.append(float(score))
    return {
        "accuracy": mean(scores),
        "by_type": {k: mean(v) for k, v in sorted(groups.items())},
        "n_by_type": {k: len(v) for k, v in sorted(groups.items())},
    }
