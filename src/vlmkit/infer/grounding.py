"""Boxes in text and on images: parse a model's box answer, draw boxes for reports and chat."""

from __future__ import annotations

from typing import Sequence

from PIL import Image, ImageDraw

from vlmkit.data.sample import Box, parse_boxes

__all__ = ["Box", "draw_boxes", "parse_box", "parse_boxes", "to_pixels"]


def parse_box(text: str | None) -> Box | None:
    """The first ``[x0, y0, x1, y1]`` box in ``text`` (tolerant parser of `vlmkit.data.sample`), or None."""
    if not text:
        return None
    return Box.parse(text)


def to_pixels(box: Box, width: int, height: int) -> tuple[float, float, float, float]:
    """Normalised [0, 1] coordinates -> pixel coordinates of a ``width`` x ``height`` image,
    clamped to the image."""

    def cx(v: float) -> float:
        return min(max(v, 0.0), 1.0) * width

    def cy(v: float) -> float:
        return min(max(v, 0.0), 1.0) * height

    return cx(box.x0), cy(box.y0), cx(box.x1), cy(box.y1)


def draw_boxes(
    image: Image.Image,
    boxes: Sequence[tuple[Box, str | tuple[int, int, int], str | None]],
    width: int | None = None,
) -> Image.Image:
    """A copy of ``image`` (as RGB) with each ``(box, colour, label)`` outlined; boxes are normalised.

    ``width`` is the line width in pixels (default: about 1/64 of the shorter side, at least 1).
    A label, if given, is written at the box's top-left corner on a filled tag of its colour.
    """
    img = image.convert("RGB").copy()
    w, h = img.size
    lw = width if width is not None else max(1, min(w, h) // 64)
    draw = ImageDraw.Draw(img)
    for box, colour, label in boxes:
        x0, y0, x1, y1 = to_pixels(box, w, h)
        x0, x1 = sorted((x0, x1))
        y0, y1 = sorted((y0, y1))
        draw.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=colour, width=lw)
        if label:
            tx, ty = x0 + lw, y0 + lw
            bbox = draw.textbbox((tx, ty), label)
            draw.rectangle(bbox, fill=colour)
            draw.text((tx, ty), label, fill="white")
    return img
