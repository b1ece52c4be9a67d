"""Safe image loading and deterministic preprocessing.

`load_image` never touches the network, never reads outside the dataset root, checks the pixel
count from the header before decoding (so a decompression bomb is never decoded), and really
decodes the pixels (``.load()``) so a truncated file fails here, named, rather than in a worker.

`ImageProcessor` turns a PIL image into a normalised ``FloatTensor[3, size, size]``.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from vlmkit.data.bad_samples import BadSampleError
from vlmkit.data.sample import ImageRef

DEFAULT_MAX_PIXELS = 64_000_000  # 64 megapixels
PREPROCESS_MODES = ("resize", "letterbox", "resize-crop")


def resolve_image_path(ref_path: str, root: str | Path | None) -> Path:
    """The resolved file a path refers to; `BadSampleError` ``path_escapes_root`` if outside ``root``.

    Relative paths are joined to ``root``; symlinks are followed before the check, so a link that
    points out of the root is refused too. Without a root, relative paths are taken from the
    working directory and nothing is refused.
    """
    p = Path(ref_path)
    if root is None:
        return p.resolve()
    root_r = Path(root).resolve()
    full = p if p.is_absolute() else Path(root) / p
    resolved = full.resolve()
    if resolved != root_r and root_r not in resolved.parents:
        raise BadSampleError("path_escapes_root", f"{ref_path} resolves outside the dataset root {root_r}")
    return resolved


def load_image(ref: ImageRef, root: str | Path | None, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode the image ``ref`` points to as an RGB PIL image, or raise `BadSampleError`.

    Reasons: ``url_not_supported``, ``path_escapes_root``, ``missing_image``, ``image_too_large``,
    ``undecodable_image``. Images with transparency are composited onto white; EXIF orientation
    is applied; of an animation, the first frame is used.
    """
    if ref.url is not None:
        raise BadSampleError(
            "url_not_supported",
            f"{ref.url}: vlmkit does not download images at run time (no network access); "
            "download the image and refer to it by a path relative to the dataset root",
        )
    if ref.data is not None:
        return _decode(io.BytesIO(ref.data), ref.describe(), max_pixels)
    assert ref.path is not None
    path = resolve_image_path(ref.path, root)
    if not path.is_file():
        raise BadSampleError("missing_image", f"{ref.path} not found (looked at {path})")
    with open(path, "rb") as f:
        return _decode(f, ref.path, max_pixels)


def _decode(fp, name: str, max_pixels: int) -> Image.Image:
    with warnings.catch_warnings():
        # our own limit (checked from the header below) is the one that counts
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(fp)
        except Image.DecompressionBombError as err:
            raise BadSampleError("image_too_large", f"{name}: {err}") from None
        except Exception as err:  # UnidentifiedImageError, OSError, SyntaxError...
            raise BadSampleError("undecodable_image", f"{name}: {type(err).__name__}: {err}") from None
        w, h = im.size
        if w <= 0 or h <= 0:
            raise BadSampleError("undecodable_image", f"{name}: empty image ({w}x{h})")
        if w * h > max_pixels:
            raise BadSampleError(
                "image_too_large", f"{name}: {w}x{h} = {w * h} pixels is over the limit of {max_pixels}"
            )
        try:
            im.load()
            return _to_rgb(ImageOps.exif_transpose(im))
        except Image.DecompressionBombError as err:
            raise BadSampleError("image_too_large", f"{name}: {err}") from None
        except Exception as err:  # truncated or corrupt data
            raise BadSampleError("undecodable_image", f"{name}: {type(err).__name__}: {err}") from None


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im.copy()
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float64)
        top = arr.max() if arr.size and arr.max() > 255 else 255.0
        im = Image.fromarray(np.clip(arr / top * 255.0, 0, 255).astype(np.uint8), "L")
    return im.convert("RGB")


class ImageProcessor:
    """PIL image -> normalised ``FloatTensor[3, size, size]``; pure and deterministic.

    Modes: ``resize`` (stretch to size x size), ``letterbox`` (scale the long side to ``size``,
    pad the rest with the mean colour, image centred; an odd padding puts the extra pixel at the
    bottom/right), ``resize-crop`` (scale the short side to ``size``, then centre-crop).
    Pixel values are divided by 255, then ``(x - mean) / std`` per channel.
    """

    def __init__(
        self,
        size: int,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
        mode: str = "resize",
        resample: int = Image.Resampling.BICUBIC,
    ):
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        if mode not in PREPROCESS_MODES:
            raise ValueError(f"unknown preprocess mode {mode!r}; expected one of {PREPROCESS_MODES}")
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ValueError("mean and std need 3 values each, std > 0")
        self.size = size
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.mode = mode
        self.resample = resample

    def geometry(self, img: Image.Image) -> Image.Image:
        """The RGB ``size x size`` image before normalisation."""
        if img.mode != "RGB":
            img = img.convert("RGB")
        s = self.size
        w, h = img.size
        if self.mode == "resize":
            return self._resize(img, (s, s))
        if self.mode == "letterbox":
            scale = s / max(w, h)
            nw, nh = max(1, min(s, round(w * scale))), max(1, min(s, round(h * scale)))
            img = self._resize(img, (nw, nh))
            fill = tuple(int(round(m * 255)) for m in self.mean)
            canvas = Image.new("RGB", (s, s), fill)
            canvas.paste(img, ((s - nw) // 2, (s - nh) // 2))
            return canvas
        # resize-crop
        scale = s / min(w, h)
        nw, nh = max(s, round(w * scale)), max(s, round(h * scale))
        img = self._resize(img, (nw, nh))
        left, top = (nw - s) // 2, (nh - s) // 2
        return img.crop((left, top, left + s, top + s))

    def _resize(self, img: Image.Image, size: tuple[int, int]) -> Image.Image:
        return img if img.size == size else img.resize(size, self.resample)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        arr = np.asarray(self.geometry(img), dtype=np.float32) / 255.0  # [H, W, 3]
        x = torch.from_numpy(arr.copy()).permute(2, 0, 1)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        return ((x - mean) / std).contiguous()

    def batch(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """``[N, 3, size, size]`` (``[0, 3, size, size]`` for no images)."""
        if not images:
            return torch.zeros(0, 3, self.size, self.size)
        return torch.stack([self(im) for im in images])
