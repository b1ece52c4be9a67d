"""ChartQA's relaxed accuracy (Masry et al. 2022, "ChartQA", end of section 5.1, after Methani et
al. 2020, PlotQA): a numeric answer counts as right within 5% of the gold number, any other
answer needs an exact match.

The rule, as the reference ``relaxed_correctness`` (Pix2Struct's, reused by lmms-eval's ChartQA
task and VLMEvalKit) applies it, with both strings stripped of surrounding whitespace::

    p, t = number(prediction), number(target)
    correct = |p - t| / |t| <= 0.05      if p is a number and t is a number other than 0
              prediction.lower() == target.lower()   otherwise

so a target of 0 needs the exact string (``"0.0"`` is wrong against ``"0"``), a text target
needs the same text up to case, and a number against a text target is compared as text.

`parse_number` reads: an optional sign, digits with optional thousands separators (``1,000``,
``12,345.6``), an optional decimal part (``.5`` and ``12.`` too), and an optional trailing ``%``
which divides by 100 (``"45%"`` -> 0.45, as the reference does: ``"45%"`` is *wrong* against a
target of ``"45"`` and right against ``"0.45"``).

Differences from the reference, all at the margins:

* thousands separators are removed before reading a number (the reference's ``float("1,000")``
  fails, so it compared ``"1,000"`` with ``"1000"`` as text and scored it wrong);
* ``nan``, ``inf``, exponents (``1e3``) and underscores are not numbers here (Python's ``float``
  accepts them), so they are compared as text;
* the 5% bound is inclusive up to 1e-12 of float rounding (``12.6`` against ``12`` is right).
"""

from __future__ import annotations

import re
from typing import Sequence

__all__ = ["MAX_RELATIVE_CHANGE", "parse_number", "relaxed_accuracy", "relaxed_correct"]

MAX_RELATIVE_CHANGE = 0.05
_EPS = 1e-12
_NUMBER = re.compile(r"[+-]?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|\.\d+)")


def parse_number(text: str | None) -> float | None:
    """The number ``text`` is (see the module docstring), or None. ``"1,234.5"`` -> 1234.5,
    ``"45%"`` -> 0.45, ``"-3"`` -> -3.0, ``"3 apples"`` -> None."""
    if text is None:
        return None
    s = text.strip()
    percent = s.endswith("%")
    if percent:
        s = s[:-1].rstrip()
    if not _NUMBER.fullmatch(s):
        return None
    value = float(s.replace(",", ""))
    return value / 100.0 if percent else value


def relaxed_correct(prediction: str | None, target: str, max_relative_change: float = MAX_RELATIVE_CHANGE) -> bool:
    """Whether ``prediction`` is right against ``target`` under relaxed accuracy (module docstring).
    A ``None`` prediction (nothing extracted) is wrong."""
    if prediction is None:
        return False
    pred, gold = str(prediction).strip(), str(target).strip()
    p, t = parse_number(pred), parse_number(gold)
    if p is not None and t:  # t is a number other than 0
        return abs(p - t) / abs(t) <= max_relative_change + _EPS
    return pred.lower() == gold.lower()


def relaxed_accuracy(
    predictions: Sequence[str | None], targets: Sequence[str], max_relative_change: float = MAX_RELATIVE_CHANGE
) -> float:
    """The share of `relaxed_correct` predictions, in [0, 1]; 0.0 for none. Lengths must match."""
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions but {len(targets)} targets")
    if not predictions:
        return 0.0
    right = sum(relaxed_correct(p, t, max_relative_change) for p, t in zip(predictions, targets))
    return right / len(predictions)
