"""High-resolution images as several encoder-sized tiles: pure geometry and token counts.

Two methods (docs/tiling.md has the formulas and worked examples):

* ``anyres``: LLaVA-NeXT (Liu et al. 2024, "LLaVA-NeXT: Improved reasoning, OCR, and world
  knowledge"). Pick the best canvas from a list of pinpoints, fit the image into it keeping the
  aspect ratio (centred, padded), cut the canvas into tiles, and put a global thumbnail first.
  The model drops the feature rows or columns that only see padding (`unpad_features`) and ends
  each feature row with a learned newline embedding.
* ``split``: Idefics3 / SmolVLM (Laurençon et al. 2024, "Building and better understanding
  vision-language models"). Cap the longest side, round both sides up to whole tiles, cut into
  tiles, and put a global thumbnail last. Each tile is announced by a ``<row_i_col_j>`` marker
  token and the thumbnail by ``<global-img>``.

Conventions: ``original_size`` and PIL sizes are ``(width, height)``; pinpoints and the canvases
`select_best_resolution` returns are ``(height, width)``, as HF's ``image_grid_pinpoints``.
Everything here is a pure function of its arguments: token counts come from the size alone
(`anyres_layout`, `split_layout`), and the pixel functions return the same layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import torch
from PIL import Image

Size = tuple[int, int]
ThumbnailFn = Callable[[Image.Image], Image.Image]

GLOBAL_IMAGE_TOKEN = "<global-img>"
MODES = ("single", "anyres", "split")


@dataclass(frozen=True)
class TileLayout:
    """How one image was cut: a ``rows x cols`` grid of ``tile x tile`` crops, plus a thumbnail.

    ``original_size`` is the image's ``(width, height)`` before any resizing (anyres needs it to
    strip the padding from the feature map). ``n_tiles`` is the number of encoder inputs.
    """

    mode: Literal["single", "anyres", "split"]
    rows: int
    cols: int
    original_size: Size  # (w, h)
    tile: int  # tile side in pixels (the encoder's image_size)
    thumbnail: bool

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown tiling mode {self.mode!r}; expected one of {MODES}")
        if self.rows < 1 or self.cols < 1 or self.tile < 1:
            raise ValueError(f"rows, cols and tile must be positive, got {self.rows}, {self.cols}, {self.tile}")

    @property
    def n_tiles(self) -> int:
        return self.rows * self.cols + (1 if self.thumbnail else 0)

    @classmethod
    def single(cls, original_size: Size, tile: int) -> "TileLayout":
        """The untiled case: the whole image is one encoder input."""
        return cls("single", 1, 1, _size(original_size), tile, False)


def _size(size: Sequence[int]) -> Size:
    w, h = (int(v) for v in size)
    if w <= 0 or h <= 0:
        raise ValueError(f"image size must be positive, got {w}x{h}")
    return (w, h)


def _check_thumbnail(thumb: Image.Image, tile: int) -> Image.Image:
    if thumb.size != (tile, tile):
        raise ValueError(f"thumbnail_fn must return a {tile}x{tile} image, got {thumb.size[0]}x{thumb.size[1]}")
    return thumb


def _cut(canvas: Image.Image, rows: int, cols: int, tile: int) -> list[Image.Image]:
    """Row-major ``tile x tile`` crops of a ``(cols*tile) x (rows*tile)`` canvas."""
    return [canvas.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile)) for r in range(rows) for c in range(cols)]


# ------------------------------------------------------------------ anyres (LLaVA-NeXT)


def default_pinpoints(tile: int) -> list[Size]:
    """``[height, width]`` canvases for grids of 1x1, 1x2, 2x1, 2x2, 1x3 and 3x1 tiles (rows x cols).

    LLaVA-NeXT's own list (tile 336) is the same without 1x1.
    """
    grids = [(1, 1), (1, 2), (2, 1), (2, 2), (1, 3), (3, 1)]
    return [(r * tile, c * tile) for r, c in grids]


def select_best_resolution(image_size: Size, pinpoints: Sequence[Sequence[int]]) -> Size:
    """The ``(height, width)`` canvas from ``pinpoints`` (``[h, w]`` each) for an image of ``(w, h)``.

    For each canvas: ``scale = min(cw / w, ch / h)``; the image as it would be shown there has
    ``int(w * scale) * int(h * scale)`` pixels, capped at ``w * h`` (upscaling adds no detail):
    the *effective* resolution. ``wasted = cw * ch - effective``. The best canvas has the largest
    effective resolution, then the least waste; on a full tie the earlier pinpoint wins.
    (LLaVA-NeXT's rule; HF's ``select_best_resolution`` takes the size as (h, w), we take (w, h).)
    """
    w, h = _size(image_size)
    if not pinpoints:
        raise ValueError("pinpoints is empty")
    best: Size | None = None
    best_key = (-1, 0)  # (effective, -wasted): larger is better
    for ch, cw in pinpoints:
        scale = min(cw / w, ch / h)
        effective = min(int(w * scale) * int(h * scale), w * h)
        key = (effective, -(cw * ch - effective))
        if key > best_key:
            best, best_key = (int(ch), int(cw)), key
    assert best is not None
    return best


def _check_pinpoints(pinpoints: Sequence[Sequence[int]] | None, tile: int) -> list[Size]:
    pins = default_pinpoints(tile) if pinpoints is None else [(int(p[0]), int(p[1])) for p in pinpoints]
    bad = [p for p in pins if p[0] <= 0 or p[1] <= 0 or p[0] % tile or p[1] % tile]
    if bad:
        raise ValueError(f"pinpoints {bad} are not positive multiples of the tile size {tile}")
    return pins


def anyres_layout(original_size: Size, tile: int, pinpoints: Sequence[Sequence[int]] | None = None) -> TileLayout:
    """The anyres layout of an image of ``original_size`` ``(w, h)``, from its size alone.

    ``pinpoints=None`` uses `default_pinpoints`. rows = canvas height / tile, cols = canvas
    width / tile; the thumbnail is always there.
    """
    size = _size(original_size)
    ch, cw = select_best_resolution(size, _check_pinpoints(pinpoints, tile))
    return TileLayout("anyres", ch // tile, cw // tile, size, tile, True)


def _fit_inside(image_size: Size, canvas_hw: Size) -> Size:
    """``(w, h)`` of the image resized to fit the canvas, aspect kept (LLaVA-NeXT's rounding).

    The side with the smaller scale fills the canvas; the other is ``ceil(side * scale)``,
    capped at the canvas.
    """
    w, h = image_size
    ch, cw = canvas_hw
    scale_w, scale_h = cw / w, ch / h
    if scale_w < scale_h:
        return cw, min(math.ceil(h * scale_w), ch)
    return min(math.ceil(w * scale_h), cw), ch


def anyres_tiles(
    image: Image.Image,
    tile: int,
    pinpoints: Sequence[Sequence[int]] | None,
    thumbnail_fn: ThumbnailFn,
    fill: tuple[int, int, int] = (0, 0, 0),
    resample: int = Image.Resampling.BICUBIC,
) -> tuple[list[Image.Image], TileLayout]:
    """``[thumbnail, tile_00, tile_01, ...]`` (row-major) and the layout, LLaVA-NeXT's anyres.

    The image is resized to fit the chosen canvas (`_fit_inside`), pasted centred on a canvas of
    colour ``fill`` (an odd margin puts the extra pixel at the bottom / right), and cut into
    ``rows x cols`` tiles. ``thumbnail_fn(image)`` makes the global view; it must return a
    ``tile x tile`` image (e.g. ``ImageProcessor.geometry``).
    """
    if image.mode != "RGB":
        image = image.convert("RGB")
    layout = anyres_layout(image.size, tile, pinpoints)
    ch, cw = layout.rows * tile, layout.cols * tile
    nw, nh = _fit_inside(image.size, (ch, cw))
    resized = image if image.size == (nw, nh) else image.resize((nw, nh), resample)
    canvas = Image.new("RGB", (cw, ch), tuple(fill))  # [ch, cw] pixels
    canvas.paste(resized, ((cw - nw) // 2, (ch - nh) // 2))
    thumb = _check_thumbnail(thumbnail_fn(image), tile)
    return [thumb] + _cut(canvas, layout.rows, layout.cols, tile), layout


def _unpad_slices(original_size: Size, height: int, width: int) -> tuple[slice, slice]:
    """The (rows, cols) of a ``height x width`` grid feature map that show the image, not padding.

    As LLaVA-NeXT's ``unpad_image``: compare aspect ratios; if the image is wider than the map,
    ``new_h = int(round(h * width / w, 7))`` and ``(height - new_h) // 2`` rows go from each end
    (else the same with columns). Rounding the margin down keeps one extra row / column when
    ``height - new_h`` is odd: the kept size is ``height - 2 * margin``, not always ``new_h``.
    """
    w, h = _size(original_size)
    if w / h > width / height:
        new_h = int(round(h * (width / w), 7))
        pad = (height - new_h) // 2
        return slice(pad, height - pad), slice(0, width)
    new_w = int(round(w * (height / h), 7))
    pad = (width - new_w) // 2
    return slice(0, height), slice(pad, width - pad)


def unpadded_feature_size(original_size: Size, rows: int, cols: int, side: int) -> Size:
    """``(h, w)`` in feature cells of the grid's ``(rows*side) x (cols*side)`` map once unpadded.

    ``side`` is the number of tokens along a tile's side after the connector (e.g. 24 for a
    336-pixel CLIP-L/14 tile). See `_unpad_slices` for the rule.
    """
    rs, cs = _unpad_slices(original_size, rows * side, cols * side)
    return rs.stop - rs.start, cs.stop - cs.start


def unpad_features(features: torch.Tensor, original_size: Size) -> torch.Tensor:
    """``[H, W, D]`` grid features (the tiles' maps put side by side) -> ``[h, w, D]``, the centre
    part that shows the image; ``(h, w) == unpadded_feature_size(...)``."""
    if features.dim() != 3:
        raise ValueError(f"features must be [H, W, D], got shape {tuple(features.shape)}")
    rs, cs = _unpad_slices(original_size, features.shape[0], features.shape[1])
    return features[rs, cs]


def anyres_num_tokens(layout: TileLayout, side: int, newline: bool = True) -> int:
    """Image tokens of an anyres layout: ``side*side + h * (w + 1 if newline else w)``.

    ``side*side`` is the thumbnail (a tile's full map); ``(h, w) = unpadded_feature_size(
    layout.original_size, layout.rows, layout.cols, side)`` is the unpadded grid map, and with
    ``newline`` each of its ``h`` rows ends with one newline embedding.
    """
    if layout.mode != "anyres":
        raise ValueError(f"anyres_num_tokens needs an anyres layout, got mode {layout.mode!r}")
    h, w = unpadded_feature_size(layout.original_size, layout.rows, layout.cols, side)
    thumb = side * side if layout.thumbnail else 0
    return thumb + h * (w + 1 if newline else w)


# ------------------------------------------------------------------ split (Idefics3 / SmolVLM)


def _capped_size(original_size: Size, max_side: int) -> Size:
    """``(w, h)`` scaled down (never up) so the longest side is at most ``max_side``."""
    w, h = original_size
    longest = max(w, h)
    if longest <= max_side:
        return w, h
    return max(1, round(w * max_side / longest)), max(1, round(h * max_side / longest))


def split_layout(original_size: Size, tile: int, max_side: int | None = None) -> TileLayout:
    """The split layout of an image of ``original_size`` ``(w, h)``, from its size alone.

    Scale down so the longest side is at most ``max_side`` (``None``: ``4 * tile``; sides
    rounded to the nearest pixel), then round each side up to whole tiles:
    ``rows = ceil(h' / tile)``, ``cols = ceil(w' / tile)``, and the image is stretched to
    ``(cols*tile) x (rows*tile)``. An image that fits in one tile (``w', h' <= tile``) is not
    split: one input, the global image (``rows = cols = 1``, ``thumbnail=False``), as Idefics3
    does for images it does not split. Otherwise the global thumbnail is added.
    """
    size = _size(original_size)
    max_side = 4 * tile if max_side is None else max_side
    if max_side <= 0:
        raise ValueError(f"max_side must be positive, got {max_side}")
    w, h = _capped_size(size, max_side)
    if w <= tile and h <= tile:
        return TileLayout("split", 1, 1, size, tile, False)
    return TileLayout("split", math.ceil(h / tile), math.ceil(w / tile), size, tile, True)


def split_tiles(
    image: Image.Image,
    tile: int,
    max_side: int | None,
    thumbnail_fn: ThumbnailFn,
    resample: int = Image.Resampling.BICUBIC,
) -> tuple[list[Image.Image], TileLayout]:
    """``[tile_00, tile_01, ..., thumbnail]`` (row-major, global image last) and the layout.

    The image is resized to ``(cols*tile) x (rows*tile)`` and cut; ``thumbnail_fn(image)`` (a
    ``tile x tile`` image) is the global view. An unsplit image is just ``[thumbnail_fn(image)]``.
    """
    if image.mode != "RGB":
        image = image.convert("RGB")
    layout = split_layout(image.size, tile, max_side)
    thumb = _check_thumbnail(thumbnail_fn(image), tile)
    if not layout.thumbnail:
        return [thumb], layout
    size = (layout.cols * tile, layout.rows * tile)  # (W, H) pixels
    grid = image if image.size == size else image.resize(size, resample)
    return _cut(grid, layout.rows, layout.cols, tile) + [thumb], layout


def split_segments(layout: TileLayout, tokens_per_tile: int) -> list[tuple[str, int]]:
    """The prompt of a split image as ``(marker token, n image tokens)`` pairs, in order.

    ``[("<row_1_col_1>", n), ("<row_1_col_2>", n), ..., ("<global-img>", n)]``; an unsplit image
    is ``[("<global-img>", n)]``. Unlike Idefics3 there is no ``<fake_token_around_image>`` and no
    newline between rows: each marker is followed directly by its tile's image tokens.
    """
    if layout.mode != "split":
        raise ValueError(f"split_segments needs a split layout, got mode {layout.mode!r}")
    segs: list[tuple[str, int]] = []
    if layout.thumbnail:
        segs = [(f"<row_{r + 1}_col_{c + 1}>", tokens_per_tile) for r in range(layout.rows) for c in range(layout.cols)]
    return segs + [(GLOBAL_IMAGE_TOKEN, tokens_per_tile)]


def split_marker_tokens(max_rows: int, max_cols: int) -> list[str]:
    """Every marker `split_segments` can emit for grids up to ``max_rows x max_cols``, row-major,
    then ``<global-img>``. With ``max_side``, ``max_rows = max_cols = ceil(max_side / tile)``."""
    return [f"<row_{r}_col_{c}>" for r in range(1, max_rows + 1) for c in range(1, max_cols + 1)] + [GLOBAL_IMAGE_TOKEN]


def split_num_tokens(layout: TileLayout, tokens_per_tile: int) -> int:
    """Tokens of a split image, markers included: ``len(segments) * (1 + tokens_per_tile)``,
    i.e. ``(rows*cols + 1) * (1 + tokens_per_tile)``, or ``1 + tokens_per_tile`` unsplit."""
    return len(split_segments(layout, tokens_per_tile)) * (1 + tokens_per_tile)


# ------------------------------------------------------------------ any mode


def num_image_tokens(layout: TileLayout, tokens_per_tile: int, newline: bool = True) -> int:
    """Tokens an image of this layout costs in the prompt.

    ``single``: ``tokens_per_tile``; ``anyres``: `anyres_num_tokens` with
    ``side = sqrt(tokens_per_tile)`` (must be a perfect square); ``split``: `split_num_tokens`
    (markers included; ``newline`` does not apply).
    """
    if layout.mode == "single":
        return tokens_per_tile
    if layout.mode == "anyres":
        side = math.isqrt(tokens_per_tile)
        if side * side != tokens_per_tile:
            raise ValueError(f"anyres needs a square feature map per tile; {tokens_per_tile} tokens is not a square")
        return anyres_num_tokens(layout, side, newline)
    return split_num_tokens(layout, tokens_per_tile)
