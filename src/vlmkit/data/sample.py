"""Canonical records that every format reader yields and every writer takes.

A `Sample` is a conversation (a list of `Turn`s, each a list of `Part`s) plus the
images its parts refer to by index, and free-form metadata (ground truth, scene
graph, task type, source). Boxes travel inside text as ``[x0, y0, x1, y1]`` with
coordinates normalised to [0, 1] (see `Box`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

Role = Literal["system", "user", "assistant"]
ROLES: tuple[str, ...] = ("system", "user", "assistant")


@dataclass(frozen=True)
class ImageRef:
    """Where an image comes from: a path (relative to the dataset root), raw bytes, or a URL."""

    path: str | None = None
    data: bytes | None = None
    url: str | None = None

    def __post_init__(self) -> None:
        given = [x is not None for x in (self.path, self.data, self.url)]
        if sum(given) != 1:
            raise ValueError("ImageRef needs exactly one of path, data or url")

    def describe(self) -> str:
        if self.path is not None:
            return self.path
        if self.url is not None:
            return self.url
        return f"<{len(self.data or b'')} bytes>"


@dataclass(frozen=True)
class Part:
    """One piece of a turn: either text or a reference to ``Sample.images[image]``."""

    text: str | None = None
    image: int | None = None

    def __post_init__(self) -> None:
        if (self.text is None) == (self.image is None):
            raise ValueError("Part needs exactly one of text or image")

    @property
    def is_image(self) -> bool:
        return self.image is not None


@dataclass
class Turn:
    role: Role
    parts: list[Part]

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"unknown role {self.role!r}; expected one of {ROLES}")

    @property
    def text(self) -> str:
        """The turn's text with images left out."""
        return "".join(p.text for p in self.parts if p.text is not None)

    @property
    def image_indices(self) -> list[int]:
        return [p.image for p in self.parts if p.image is not None]

    @classmethod
    def of_text(cls, role: Role, text: str) -> "Turn":
        return cls(role, [Part(text=text)])


@dataclass
class Sample:
    """A conversation over zero or more images.

    ``meta`` keys used across vlmkit (all optional):
      task           -- e.g. "vqa", "caption", "pope", "grounding", "mcq", "dialogue", "compare", "text"
      question_type  -- finer type used for per-type metrics, e.g. "color", "count_total"
      answer         -- ground truth of the last assistant turn
      scene          -- the scene graph (shapes world), a JSON-able dict
      pope_split     -- "random" | "popular" | "adversarial" for POPE negatives
      box            -- target box [x0, y0, x1, y1] for grounding
      source         -- name of the data source the sample came from
    """

    id: str
    turns: list[Turn]
    images: list[ImageRef] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def image_order(self) -> list[int]:
        """Image indices in the order their parts appear in the conversation."""
        return [i for t in self.turns for i in t.image_indices]

    def validate(self) -> None:
        """Raise ValueError if parts refer to images that don't exist (or images are unused)."""
        order = self.image_order()
        if sorted(order) != list(range(len(self.images))):
            raise ValueError(
                f"sample {self.id}: image parts {order} do not match its {len(self.images)} image(s)"
            )

    def without_images(self) -> "Sample":
        """The same conversation with every image removed (for blind baselines)."""
        turns = [Turn(t.role, [p for p in t.parts if not p.is_image]) for t in self.turns]
        for t in turns:
            if t.parts:
                # drop the whitespace a removed placeholder leaves at the start of a turn
                first = t.parts[0]
                if first.text is not None:
                    t.parts[0] = Part(text=first.text.lstrip())
        return Sample(self.id, turns, [], dict(self.meta))

    def prompt_turns(self) -> list[Turn]:
        """All turns before the last assistant turn: what a model is asked to continue."""
        last = max((i for i, t in enumerate(self.turns) if t.role == "assistant"), default=len(self.turns))
        return self.turns[:last]

    def target_text(self) -> str | None:
        """The text of the last assistant turn, if any."""
        for t in reversed(self.turns):
            if t.role == "assistant":
                return t.text
        return None


@dataclass
class PreferencePair:
    """A prompt with a preferred and a dispreferred answer (for DPO)."""

    id: str
    prompt: list[Turn]
    chosen: str
    rejected: str
    images: list[ImageRef] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def as_samples(self) -> tuple["Sample", "Sample"]:
        """The prompt answered with ``chosen`` and with ``rejected``: two Samples sharing the images."""
        return tuple(  # type: ignore[return-value]
            Sample(id=f"{self.id}:{which}", turns=[*self.prompt, Turn.of_text("assistant", text)],
                   images=list(self.images), meta=dict(self.meta))  # fmt: skip
            for which, text in (("chosen", self.chosen), ("rejected", self.rejected))
        )


# ---------------------------------------------------------------- boxes in text

_NUM = r"\s*(-?\d+(?:\.\d+)?)\s*"
_BOX_RE = re.compile(r"\[" + ",".join([_NUM] * 4) + r"\]")


@dataclass(frozen=True)
class Box:
    """An axis-aligned box with coordinates normalised to [0, 1]; x grows right, y grows down."""

    x0: float
    y0: float
    x1: float
    y1: float

    def to_text(self) -> str:
        """The canonical text form: ``[x0, y0, x1, y1]`` with 3 decimals."""
        return "[" + ", ".join(f"{v:.3f}" for v in (self.x0, self.y0, self.x1, self.y1)) + "]"

    @classmethod
    def parse(cls, text: str) -> "Box | None":
        """The first box in ``text``; tolerant of spaces and 2 or 3 decimals. None if there is none."""
        boxes = parse_boxes(text)
        return boxes[0] if boxes else None

    def area(self) -> float:
        return max(0.0, self.x1 - self.x0) * max(0.0, self.y1 - self.y0)

    def iou(self, other: "Box") -> float:
        ix0, iy0 = max(self.x0, other.x0), max(self.y0, other.y0)
        ix1, iy1 = min(self.x1, other.x1), min(self.y1, other.y1)
        inter = max(0.0, ix1 - ix0) * max(0.0, iy1 - iy0)
        union = self.area() + other.area() - inter
        return inter / union if union > 0 else 0.0

    def as_list(self) -> list[float]:
        return [self.x0, self.y0, self.x1, self.y1]


def parse_boxes(text: str) -> list[Box]:
    """Every ``[x0, y0, x1, y1]`` in ``text``, in order."""
    return [Box(*(float(g) for g in m.groups())) for m in _BOX_RE.finditer(text)]
