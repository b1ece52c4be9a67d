"""Skipping bad input: every bad row is named, counted, and past a threshold the run stops."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

log = logging.getLogger("vlmkit.data")


class BadSampleError(Exception):
    """A single row or image that can't be used. ``reason`` is a short machine-friendly tag."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class TooManyBadSamples(RuntimeError):
    pass


@dataclass
class BadSampleLog:
    """Counts bad samples; raises `TooManyBadSamples` once their fraction passes ``max_fraction``.

    The fraction is only enforced after ``min_seen`` rows so that one bad row among the
    first few doesn't stop a run.
    """

    max_fraction: float = 0.01
    min_seen: int = 100
    seen: int = 0
    bad: list[tuple[str, str, str]] = field(default_factory=list)  # (where, sample id, reason)

    def ok(self) -> None:
        self.seen += 1

    def record(self, where: str, sample_id: str, error: BadSampleError | str) -> None:
        self.seen += 1
        reason = str(error)
        self.bad.append((where, sample_id, reason))
        log.warning("skipping bad sample %s (%s): %s", sample_id, where, reason)
        self.check()

    def check(self) -> None:
        if self.seen >= self.min_seen and self.fraction > self.max_fraction:
            raise TooManyBadSamples(
                f"{len(self.bad)} of {self.seen} samples were bad ({self.fraction:.1%} > "
                f"{self.max_fraction:.1%} allowed). First: {self.bad[0][1]} in {self.bad[0][0]}: "
                f"{self.bad[0][2]}. Run `vlmkit data check` on the dataset."
            )

    @property
    def fraction(self) -> float:
        return len(self.bad) / self.seen if self.seen else 0.0

    def summary(self) -> str:
        if not self.bad:
            return f"{self.seen} samples, none bad"
        reasons = Counter(r.split(":")[0] for _, _, r in self.bad)
        parts = ", ".join(f"{k}: {v}" for k, v in reasons.most_common())
        return f"{len(self.bad)} of {self.seen} samples skipped ({parts})"


def keep_good(items, bad_log: "BadSampleLog | None") -> list:
    """The good items of ``(id, where, item_or_error)`` triples, as the format readers yield them:
    each ``BadSampleError`` is recorded in ``bad_log`` (or raised, naming where, without one)."""
    out = []
    for sid, where, item in items:
        if isinstance(item, BadSampleError):
            if bad_log is None:
                raise BadSampleError(item.reason, f"{where} (id {sid}): {item.detail}")
            bad_log.record(where, sid, item)
        else:
            if bad_log is not None:
                bad_log.ok()
            out.append(item)
    return out
