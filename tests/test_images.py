"""Safe image loading (every bad-input reason) and hand-computed preprocessing cases."""

from __future__ import annotations

import io
import os
import struct
import zlib

import pytest
import torch
from PIL import Image

from vlmkit.data.bad_samples import BadSampleError
from vlmkit.data.images import DEFAULT_MAX_PIXELS, ImageProcessor, load_image
from vlmkit.data.sample import ImageRef


def png(w=4, h=3, color=(200, 10, 10), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (w, h), color).save(buf, format="PNG")
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with a tiny (wrong) data chunk: a bomb stand-in."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


@pytest.fixture()
def root(tmp_path):
    r = tmp_path / "data"
    (r / "images").mkdir(parents=True)
    (r / "images" / "ok.png").write_bytes(png())
    return r


def reason_of(ref, root, **kw) -> str:
    with pytest.raises(BadSampleError) as err:
        load_image(ref, root, **kw)
    return err.value.reason


def test_loads_rgb(root):
    im = load_image(ImageRef(path="images/ok.png"), root)
    assert im.mode == "RGB" and im.size == (4, 3) and im.getpixel((0, 0)) == (200, 10, 10)
    im2 = load_image(ImageRef(data=png(2, 2, 7, mode="L")), None)
    assert im2.mode == "RGB" and im2.getpixel((1, 1)) == (7, 7, 7)


def test_transparent_pixels_become_white():
    im = load_image(ImageRef(data=png(2, 2, (255, 0, 0, 0), mode="RGBA")), None)
    assert im.mode == "RGB" and im.getpixel((0, 0)) == (255, 255, 255)


def test_missing_image(root):
    assert reason_of(ImageRef(path="images/nope.png"), root) == "missing_image"
    assert reason_of(ImageRef(path="images"), root) == "missing_image"  # a directory


def test_corrupt_and_truncated_images(root):
    (root / "junk.png").write_bytes(b"definitely not an image")
    assert reason_of(ImageRef(path="junk.png"), root) == "undecodable_image"
    noisy = Image.frombytes("RGB", (64, 64), os.urandom(64 * 64 * 3))
    buf = io.BytesIO()
    noisy.save(buf, format="PNG")
    data = buf.getvalue()
    (root / "trunc.png").write_bytes(data[: len(data) // 2])  # the header is intact, the pixels are not
    assert reason_of(ImageRef(path="trunc.png"), root) == "undecodable_image"
    assert reason_of(ImageRef(data=data[:-200]), None) == "undecodable_image"


def test_too_large_is_refused_from_the_header(root):
    # 10000 x 10000 = 1e8 pixels: over our default limit, under PIL's own bomb error threshold
    (root / "bomb.png").write_bytes(png_header_only(10_000, 10_000))
    assert 10_000 * 10_000 > DEFAULT_MAX_PIXELS
    # had it been decoded, the bogus data would make it undecodable_image instead
    assert reason_of(ImageRef(path="bomb.png"), root) == "image_too_large"
    # far past PIL's threshold: PIL's own DecompressionBombError is turned into the same reason
    (root / "huge.png").write_bytes(png_header_only(60_000, 60_000))
    assert reason_of(ImageRef(path="huge.png"), root, max_pixels=10**12) == "image_too_large"
    # a small real image against a small limit
    assert reason_of(ImageRef(path="images/ok.png"), root, max_pixels=11) == "image_too_large"
    assert load_image(ImageRef(path="images/ok.png"), root, max_pixels=12).size == (4, 3)


def test_paths_escaping_the_root(root, tmp_path):
    (tmp_path / "outside.png").write_bytes(png())
    assert reason_of(ImageRef(path="../outside.png"), root) == "path_escapes_root"
    assert reason_of(ImageRef(path="images/../../outside.png"), root) == "path_escapes_root"
    assert reason_of(ImageRef(path=str(tmp_path / "outside.png")), root) == "path_escapes_root"
    os.symlink(tmp_path / "outside.png", root / "images" / "link.png")
    assert reason_of(ImageRef(path="images/link.png"), root) == "path_escapes_root"
    # inside the root is fine, absolute or relative, via a symlink or not
    os.symlink(root / "images" / "ok.png", root / "inner_link.png")
    assert load_image(ImageRef(path="inner_link.png"), root).size == (4, 3)
    assert load_image(ImageRef(path=str(root / "images" / "ok.png")), root).size == (4, 3)
    assert load_image(ImageRef(path="images/./ok.png"), root).size == (4, 3)


def test_urls_are_refused_with_a_reason():
    with pytest.raises(BadSampleError) as err:
        load_image(ImageRef(url="https://example.com/cat.jpg"), None)
    assert err.value.reason == "url_not_supported" and "network" in str(err.value)


# ------------------------------------------------------------------ preprocessing

RED, BLUE = (255, 0, 0), (0, 0, 255)


def two_by_one():
    im = Image.new("RGB", (2, 1))
    im.putpixel((0, 0), RED)
    im.putpixel((1, 0), BLUE)
    return im


def test_resize_identity_and_normalisation():
    proc = ImageProcessor(2, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0), mode="resize")
    im = Image.new("RGB", (2, 2), (255, 51, 0))
    x = proc(im)
    assert x.shape == (3, 2, 2) and x.dtype == torch.float32
    # (1 - 0.5)/0.5 = 1; (0.2 - 0.25)/0.25 = -0.2; (0 - 0)/1 = 0
    assert torch.allclose(x[:, 0, 0], torch.tensor([1.0, -0.2, 0.0]), atol=1e-6)
    assert torch.allclose(x, x[:, :1, :1].expand(3, 2, 2))


def test_letterbox_two_by_one():
    proc = ImageProcessor(2, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), mode="letterbox")
    g = proc.geometry(two_by_one())
    assert [g.getpixel((x, y)) for y in range(2) for x in range(2)] == [RED, BLUE, (128, 128, 128), (128, 128, 128)]
    x = proc(two_by_one())
    assert torch.allclose(x[:, 0, 0], torch.tensor([1.0, -1.0, -1.0]))
    assert torch.allclose(x[:, 0, 1], torch.tensor([-1.0, -1.0, 1.0]))
    assert torch.allclose(x[:, 1, :], torch.full((3, 2), (128 / 255 - 0.5) / 0.5), atol=1e-6)


def test_letterbox_tall_image_is_centred_and_scaled():
    proc = ImageProcessor(4, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), mode="letterbox")
    g = proc.geometry(Image.new("RGB", (2, 8), (0, 255, 0)))  # scaled to 1 x 4, pad 1 left, 2 right
    cols = [[g.getpixel((x, y)) for y in range(4)] for x in range(4)]
    assert cols[1] == [(0, 255, 0)] * 4
    assert cols[0] == cols[2] == cols[3] == [(0, 0, 0)] * 4


def test_resize_crop_takes_the_centre():
    im = Image.new("RGB", (4, 2))
    colors = [(10, 0, 0), (20, 0, 0), (30, 0, 0), (40, 0, 0)]
    for x, c in enumerate(colors):
        for y in range(2):
            im.putpixel((x, y), c)
    g = ImageProcessor(2, mode="resize-crop").geometry(im)
    assert [g.getpixel((x, 0)) for x in range(2)] == [(20, 0, 0), (30, 0, 0)]
    # a larger uniform-by-column image: scaled by 1/2 on the short side, then centre-cropped
    big = Image.new("RGB", (12, 4), (9, 9, 9))
    assert ImageProcessor(2, mode="resize-crop").geometry(big).size == (2, 2)


def test_processor_is_deterministic_and_validates():
    im = Image.frombytes("RGB", (7, 5), bytes(range(105)))
    for mode in ("resize", "letterbox", "resize-crop"):
        p = ImageProcessor(6, mode=mode)
        assert p(im).shape == (3, 6, 6)
        assert torch.equal(p(im), p(im))
    assert ImageProcessor(3).batch([im, im]).shape == (2, 3, 3, 3)
    with pytest.raises(ValueError):
        ImageProcessor(4, mode="stretch")
