"""Yes/no hallucination metrics in the style of POPE (Li et al. 2023, "Evaluating Object
Hallucination in Large Vision-Language Models").

"yes" is the positive class. For ``n`` items with extracted predictions ``p`` (``"yes"``,
``"no"`` or ``None`` when extraction failed) and labels ``t`` (``"yes"``/``"no"``):

  TP = #(p = yes, t = yes)    FP = #(p = yes, t = no)
  TN = #(p = no,  t = no)     FN = #(p = no,  t = yes)
  U  = #(p = None)            (unparseable; reported as ``n_unparsed``)

  accuracy  = (TP + TN) / n                      -- U is in the denominator: unparseable = wrong
  precision = TP / (TP + FP)                     -- 0.0 when the model never says yes
  recall    = TP / #(t = yes)                    -- an unparseable answer to a yes-item is a miss
  f1        = 2 * precision * recall / (precision + recall)   (0.0 when both are 0)
  yes_ratio = #(p = yes) / n                     -- of the *predictions*, not of the labels

How unparseable answers are handled differs from the reference POPE script, which maps every
answer to yes or no (roughly: an answer containing "no"/"not" is "no", anything else "yes").
Here an answer with neither word is not guessed: it counts as wrong in ``accuracy``, as a
false negative when the label is yes (lowering ``recall``), never as a positive prediction
(so it does not change ``precision``), and it is not a "yes" in ``yes_ratio``; their number is
reported separately as ``n_unparsed``. With no unparseable answers both conventions agree.
A balanced POPE split has a label yes-ratio of 0.5; a yes_ratio far from 0.5 shows a bias
(a model that always answers yes has yes_ratio 1.0, recall 1.0 and precision 0.5).
"""

from __future__ import annotations

from typing import Sequence


def _yn(x: str | None) -> str | None:
    if x is None:
        return None
    x = x.strip().lower()
    return x if x in ("yes", "no") else None


def yesno_metrics(predictions: Sequence[str | None], targets: Sequence[str]) -> dict:
    """POPE metrics (definitions in the module docstring).

    Returns ``{"n", "accuracy", "precision", "recall", "f1", "yes_ratio", "n_unparsed",
    "tp", "fp", "tn", "fn"}``. A prediction other than yes/no counts as unparseable; a target
    other than yes/no raises ValueError.
    """
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets")
    tp = fp = tn = fn = unparsed = 0
    for p_raw, t_raw in zip(predictions, targets):
        p, t = _yn(p_raw), _yn(t_raw)
        if t is None:
            raise ValueError(f"yes/no target expected, got {t_raw!r}")
        if p is None:
            unparsed += 1
        elif p == "yes":
            tp += t == "yes"
            fp += t == "no"
        else:
            tn += t == "no"
            fn += t == "yes"
    n = len(targets)
    positives = sum(1 for t in targets if _yn(t) == "yes")
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / positives if positives else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "n": n,
        "accuracy": (tp + tn) / n if n else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": (tp + fp) / n if n else 0.0,
        "n_unparsed": unparsed,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }
