"""ANLS — Average Normalized Levenshtein Similarity (Biten et al., 2019; ST-VQA, DocVQA, InfoVQA).

Per question with prediction ``a`` and ground truths ``g_1 .. g_k``, both sides lower-cased and
stripped of leading/trailing whitespace::

    NL(a, g) = lev(a, g) / max(len(a), len(g))
    s(a, g)  = 1 - NL(a, g)   if NL(a, g) < tau   else 0        (tau = 0.5)
    score    = max_j s(a, g_j)

and ANLS is the mean of ``score`` over the questions. At exactly ``NL == tau`` the score is 0, as
in the paper's definition (``NL < tau``). See ``docs/metrics-vqa.md``.
"""

from __future__ import annotations

from typing import Sequence

__all__ = ["ANLS_THRESHOLD", "anls", "anls_score", "levenshtein"]

ANLS_THRESHOLD = 0.5


def levenshtein(a: str, b: str) -> int:
    """Edit distance between ``a`` and ``b`` (unit-cost insert, delete, substitute)."""
    if len(a) < len(b):
        a, b = b, a
    if not b:
        return len(a)
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        cur = [i] + [0] * len(b)
        for j, cb in enumerate(b, start=1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb))
        prev = cur
    return prev[-1]


def anls_score(prediction: str | None, answers: Sequence[str], threshold: float = ANLS_THRESHOLD) -> float:
    """ANLS of one question: max over ``answers`` of ``1 - NL`` if ``NL < threshold`` else 0.

    A ``None`` prediction (nothing extracted) scores 0. When prediction and answer are both empty
    after stripping, NL is taken as 0 (identical strings), so the score is 1. An empty ``answers``
    raises ValueError.
    """
    if isinstance(answers, str):
        raise TypeError("answers must be a sequence of strings, not a single string")
    if len(answers) == 0:
        raise ValueError("anls_score needs at least one ground-truth answer")
    if prediction is None:
        return 0.0
    pred = str(prediction).lower().strip()
    best = 0.0
    for gt in answers:
        g = str(gt).lower().strip()
        denom = max(len(pred), len(g))
        nl = levenshtein(pred, g) / denom if denom else 0.0
        score = 1.0 - nl if nl < threshold else 0.0
        best = max(best, score)
    return best


def anls(
    predictions: Sequence[str | None],
    answers: Sequence[Sequence[str]],
    threshold: float = ANLS_THRESHOLD,
) -> float:
    """Mean `anls_score` over questions, in [0, 1]; ``answers[i]`` are the ground truths of
    ``predictions[i]``. 0.0 for no questions. Lengths must match (ValueError otherwise)."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions but {len(answers)} answer lists")
    if not predictions:
        return 0.0
    return sum(anls_score(p, a, threshold) for p, a in zip(predictions, answers)) / len(predictions)
