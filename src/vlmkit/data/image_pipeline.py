"""One image -> the pixel tiles the encoder sees and the tokens its placeholder becomes.

Training, evaluation and serving all prepare images through ``ImagePipeline``, so a prompt has
the same number of image tokens wherever it is rendered:

* without ``model.tiling`` an image is one encoder-sized tile (``ImageProcessor`` geometry:
  resize, letterbox or resize-crop);
* with ``tiling.mode: anyres`` (LLaVA-NeXT) it is a global thumbnail plus a grid of tiles;
* with ``tiling.mode: split`` (Idefics3) it is a grid of tiles plus a global thumbnail, and its
  placeholder expands to a marker token before each tile's image tokens.

The layout travels with the pixels to the model, which reassembles the tiles' features
(``VisionLanguageModel.embed``); the model also says how many tokens each layout costs
(``VisionLanguageModel.image_segments``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from PIL import Image

from vlmkit.data import tiling
from vlmkit.data.images import ImageProcessor

if TYPE_CHECKING:
    from vlmkit.config import TilingConfig


@dataclass(frozen=True)
class ImageInput:
    """One prepared image: ``pixels [K, 3, S, S]`` (its K tiles, in the order the model reads
    them) and the ``layout`` that says how the tiles' features are put back together."""

    pixels: torch.Tensor
    layout: tiling.TileLayout


class ImagePipeline:
    """``pipeline(pil_image) -> ImageInput``; ``pipeline.segments(layout)`` -> the template's
    expansion of that image's placeholder (``ChatTemplate`` accepts it as a tokens-per-image entry)."""

    def __init__(self, processor: ImageProcessor, tiling_cfg: "TilingConfig | None", segments_of):
        self.processor = processor
        self.tiling = tiling_cfg
        self.segments = segments_of  # TileLayout -> int | [(marker, count), ...]
        if tiling_cfg is not None and tiling_cfg.mode == "anyres":
            self.pinpoints = [tuple(p) for p in (tiling_cfg.grid_pinpoints or tiling.default_pinpoints(processor.size))]
            bad = [p for p in self.pinpoints if p[0] % processor.size or p[1] % processor.size]
            if bad:
                raise ValueError(
                    f"model.tiling.grid_pinpoints: {bad} are not multiples of the encoder's image_size {processor.size}"
                )
        if tiling_cfg is not None and tiling_cfg.mode == "split":
            self.max_side = tiling_cfg.max_side or 4 * processor.size

    @classmethod
    def for_model(cls, model) -> "ImagePipeline":
        """The pipeline a `VisionLanguageModel` was built for (its encoder's size, stats and mode)."""
        cfg = model.config
        processor = ImageProcessor(cfg.vision.image_size, model.vision.image_mean, model.vision.image_std,
                                   cfg.vision.preprocess)  # fmt: skip
        return cls(processor, cfg.tiling, model.image_segments)

    def layout(self, image: Image.Image) -> tiling.TileLayout:
        """The layout alone (no pixels): enough to count the image's tokens."""
        size, tile = image.size, self.processor.size
        if self.tiling is None:
            return tiling.TileLayout.single(size, tile)
        if self.tiling.mode == "anyres":
            return tiling.anyres_layout(size, tile, self.pinpoints)
        return tiling.split_layout(size, tile, self.max_side)

    def __call__(self, image: Image.Image) -> ImageInput:
        p = self.processor
        if image.mode != "RGB":  # load_image already gives RGB; the Python API may not
            image = image.convert("RGB")
        if self.tiling is None:
            return ImageInput(p(image).unsqueeze(0), tiling.TileLayout.single(image.size, p.size))
        if self.tiling.mode == "anyres":
            fill = tuple(int(round(m * 255)) for m in p.mean)
            tiles, layout = tiling.anyres_tiles(image, p.size, self.pinpoints, p.geometry, fill=fill)
        else:
            tiles, layout = tiling.split_tiles(image, p.size, self.max_side, p.geometry)
        return ImageInput(torch.stack([p(t) for t in tiles]), layout)

    def marker_tokens(self) -> list[str]:
        """The marker tokens this pipeline's prompts use (``split`` mode); the tokenizer needs them."""
        if self.tiling is None or self.tiling.mode != "split":
            return []
        n = -(-self.max_side // self.processor.size)
        return tiling.split_marker_tokens(n, n)
