"""Tiling geometry and token counts (data.tiling), against cases worked out by hand.

Sizes are (w, h) for images, (h, w) for pinpoints / canvases, as in the module.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from vlmkit.data import tiling
from vlmkit.data.images import ImageProcessor
from vlmkit.data.tiling import TileLayout

NEAREST = Image.Resampling.NEAREST
LLAVA_PINS = [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]  # LLaVA-v1.6, [h, w]
RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def quadrants(w: int, h: int) -> Image.Image:
    """TL red, TR green, BL blue, BR white (w and h even)."""
    a = np.zeros((h, w, 3), np.uint8)
    a[: h // 2, : w // 2] = RED
    a[: h // 2, w // 2 :] = GREEN
    a[h // 2 :, : w // 2] = BLUE
    a[h // 2 :, w // 2 :] = WHITE
    return Image.fromarray(a)


def halves(w: int, h: int) -> Image.Image:
    """Left half red, right half blue."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2] = RED
    a[:, w // 2 :] = BLUE
    return Image.fromarray(a)


def arr(im: Image.Image) -> np.ndarray:
    return np.asarray(im)


def sentinel_fn(tile: int):
    """A thumbnail_fn whose output can be recognised by identity."""
    made = []

    def fn(image):
        made.append(Image.new("RGB", (tile, tile), (1, 2, 3)))
        return made[-1]

    return fn, made


# ------------------------------------------------------------------ layout


def test_tile_layout_single_and_frozen():
    lay = TileLayout.single((640, 480), 224)
    assert (lay.mode, lay.rows, lay.cols, lay.thumbnail, lay.n_tiles) == ("single", 1, 1, False, 1)
    assert lay.original_size == (640, 480) and lay.tile == 224
    with pytest.raises(dataclasses.FrozenInstanceError):
        lay.rows = 2  # type: ignore[misc]
    assert TileLayout("anyres", 2, 3, (10, 10), 5, True).n_tiles == 7  # 2*3 + thumbnail
    with pytest.raises(ValueError):
        TileLayout("mosaic", 1, 1, (10, 10), 5, False)  # type: ignore[arg-type]


# ------------------------------------------------------------------ anyres: canvas choice


def test_default_pinpoints_are_h_w_grids():
    # 1x1, 1x2, 2x1, 2x2, 1x3, 3x1 (rows x cols) -> [rows*336, cols*336]
    assert tiling.default_pinpoints(336) == [(336, 336), (336, 672), (672, 336), (672, 672), (336, 1008), (1008, 336)]


def test_select_best_resolution_wide_image():
    # image w=1000, h=500; per candidate [h, w]: scale = min(cw/1000, ch/500)
    #   [336, 672]:  min(0.672, 0.672) = 0.672 -> 672x336 = 225792, waste 225792 - 225792 = 0
    #   [672, 336]:  min(0.336, 1.344) = 0.336 -> 336x168 =  56448
    #   [672, 672]:  min(0.672, 1.344) = 0.672 -> 225792, waste 451584 - 225792 = 225792
    #   [1008, 336]: min(0.336, 2.016) = 0.336 ->  56448
    #   [336, 1008]: min(1.008, 0.672) = 0.672 -> 225792, waste 338688 - 225792 = 112896
    # three tie on 225792; least waste -> [336, 672] (1 row, 2 cols)
    assert tiling.select_best_resolution((1000, 500), LLAVA_PINS) == (336, 672)
    # the tie is broken by waste, not by order: put the wasteful ties first
    assert tiling.select_best_resolution((1000, 500), [(672, 672), (336, 1008), (336, 672)]) == (336, 672)


def test_select_best_resolution_tall_image_uses_h_w_order():
    # w=500, h=1000: [672, 336] has scale min(336/500, 672/1000) = 0.672 -> 336x672 = 225792, waste 0;
    # [672, 672] and [1008, 336] reach 225792 with waste; [336, 672] only 0.336 -> 168x336
    assert tiling.select_best_resolution((500, 1000), LLAVA_PINS) == (672, 336)


def test_select_best_resolution_wider_than_2_to_1():
    # w=1000, h=400
    #   [336, 672]:  min(0.672, 0.84) = 0.672 -> 672x268 = 180096
    #   [336, 1008]: min(1.008, 0.84) = 0.84  -> 840x336 = 282240  (< 1000*400, not capped)
    #   [672, 672]:  0.672 -> 180096; the two 1-column canvases: 0.336 -> 336x134
    assert tiling.select_best_resolution((1000, 400), LLAVA_PINS) == (336, 1008)


def test_select_best_resolution_caps_at_original_pixels():
    # w=300, h=200 (60000 px): every default canvas would upscale it; e.g. [336, 336]:
    # scale min(1.12, 1.68) = 1.12 -> 336x224 = 75264 -> capped at 60000, and all others cap too.
    # Same effective resolution everywhere, so the least waste wins: [336, 336].
    # (Without the cap [672, 672] would win: scale 2.24 -> 672x448.)
    assert tiling.select_best_resolution((300, 200), tiling.default_pinpoints(336)) == (336, 336)


def test_anyres_layout():
    lay = tiling.anyres_layout((1000, 500), 336, LLAVA_PINS)
    assert (lay.mode, lay.rows, lay.cols, lay.thumbnail, lay.n_tiles) == ("anyres", 1, 2, True, 3)
    assert lay.original_size == (1000, 500) and lay.tile == 336
    # default pinpoints add [336, 336]: scale min(0.336, 0.672) -> 336x168, no better than 1x2
    assert tiling.anyres_layout((1000, 500), 336, None) == lay
    tall = tiling.anyres_layout((400, 1000), 336, LLAVA_PINS)  # mirror of 1000x400 -> [1008, 336]
    assert (tall.rows, tall.cols, tall.n_tiles) == (3, 1, 4)


def test_pinpoints_must_be_multiples_of_the_tile():
    with pytest.raises(ValueError):
        tiling.anyres_layout((100, 100), 336, [(336, 600)])


# ------------------------------------------------------------------ anyres: unpadding and tokens


def test_unpadded_feature_size_hand_cases():
    side = 24  # 336 px / patch 14
    # 1000x500 on 1x2: map 24 x 48, aspect 2.0 == 2.0 -> width branch: new_w = 1000*24/500 = 48, no padding
    assert tiling.unpadded_feature_size((1000, 500), 1, 2, side) == (24, 48)
    # 1000x400 on 1x3: map 24 x 72, aspect 2.5 < 3.0 -> columns cut: new_w = 1000*24/400 = 60,
    # margin (72-60)//2 = 6 each side -> 60
    assert tiling.unpadded_feature_size((1000, 400), 1, 3, side) == (24, 60)
    # 400x1000 on 3x1: map 72 x 24, aspect 0.4 > 0.333 -> rows cut: new_h = 1000*24/400 = 60 -> (60, 24)
    assert tiling.unpadded_feature_size((400, 1000), 3, 1, side) == (60, 24)
    # odd margin: 1000x405 on 1x3: new_w = int(1000*24/405 = 59.26) = 59; margin (72-59)//2 = 6;
    # kept 72 - 12 = 60 columns, not 59 (LLaVA-NeXT's unpad_image keeps the extra one)
    assert tiling.unpadded_feature_size((1000, 405), 1, 3, side) == (24, 60)
    # same for rows: 405x1000 on 3x1 -> new_h = 59, margin 6 -> 60 rows
    assert tiling.unpadded_feature_size((405, 1000), 3, 1, side) == (60, 24)


def test_unpad_features_crops_the_centre():
    feats = torch.arange(24 * 72 * 2, dtype=torch.float32).view(24, 72, 2)  # [H, W, D]
    out = tiling.unpad_features(feats, (1000, 405))  # margin 6 columns each side (see above)
    assert out.shape == (24, 60, 2)
    assert torch.equal(out, feats[:, 6:66])
    tall = torch.randn(72, 24, 3)
    out = tiling.unpad_features(tall, (400, 1000))  # margin 6 rows each side
    assert torch.equal(out, tall[6:66])
    same = torch.randn(24, 48, 1)
    assert torch.equal(tiling.unpad_features(same, (1000, 500)), same)  # no padding


def test_anyres_num_tokens():
    lay = tiling.anyres_layout((1000, 500), 336, LLAVA_PINS)  # 1x2, unpadded 24 x 48
    # thumbnail 24*24 = 576, grid 24 rows * (48 + 1 newline) = 1176 -> 1752; without newline 576 + 1152
    assert tiling.anyres_num_tokens(lay, 24) == 1752
    assert tiling.anyres_num_tokens(lay, 24, newline=False) == 1728
    wide = tiling.anyres_layout((1000, 400), 336, LLAVA_PINS)  # 1x3, unpadded 24 x 60
    assert tiling.anyres_num_tokens(wide, 24) == 576 + 24 * 61  # 2040
    tall = tiling.anyres_layout((400, 1000), 336, LLAVA_PINS)  # 3x1, unpadded 60 x 24
    assert tiling.anyres_num_tokens(tall, 24) == 576 + 60 * 25  # 2076
    assert tiling.num_image_tokens(lay, 576) == 1752
    assert tiling.num_image_tokens(lay, 576, newline=False) == 1728
    with pytest.raises(ValueError):
        tiling.num_image_tokens(lay, 575)  # not a square map
    with pytest.raises(ValueError):
        tiling.anyres_num_tokens(tiling.split_layout((1200, 800), 364, 1456), 24)


def test_num_image_tokens_single():
    assert tiling.num_image_tokens(TileLayout.single((1000, 500), 336), 576) == 576


# ------------------------------------------------------------------ anyres: pixels


def test_anyres_tiles_are_the_canvas_crops_thumbnail_first():
    # 200x100 with tile 100: [100, 200] fits exactly (waste 0) -> 1x2, no resize, no padding
    img = quadrants(200, 100)
    fn, made = sentinel_fn(100)
    tiles, lay = tiling.anyres_tiles(img, 100, None, fn, resample=NEAREST)
    assert (lay.rows, lay.cols, lay.n_tiles) == (1, 2, 3) and len(tiles) == 3
    assert tiles[0] is made[0]  # thumbnail first
    a = arr(img)
    assert all(t.size == (100, 100) for t in tiles)
    np.testing.assert_array_equal(arr(tiles[1]), a[:, :100])  # left: red over blue
    np.testing.assert_array_equal(arr(tiles[2]), a[:, 100:])  # right: green over white
    assert tuple(arr(tiles[1])[10, 10]) == RED and tuple(arr(tiles[1])[90, 10]) == BLUE
    assert tiling.anyres_layout(img.size, 100, None) == lay


def test_anyres_tiles_row_major_order():
    # 200x200 with tile 100 -> [200, 200] (2x2, exact fit): tiles TL, TR, BL, BR after the thumbnail
    img = quadrants(200, 200)
    fn, _ = sentinel_fn(100)
    tiles, lay = tiling.anyres_tiles(img, 100, None, fn, resample=NEAREST)
    assert (lay.rows, lay.cols) == (2, 2)
    assert [tuple(arr(t)[50, 50]) for t in tiles[1:]] == [RED, GREEN, BLUE, WHITE]


def test_anyres_tiles_pad_centred_with_fill():
    # 200x50, tile 100: [100, 200] has scale 1 -> 200x50 = 10000 (all of it), waste 10000; the bigger
    # canvases waste more, the 1-column ones halve it -> 1x2. Fit: scale_w 1 < scale_h 2 -> 200x50,
    # pasted at y = (100-50)//2 = 25: rows 0-24 and 75-99 are fill
    img = quadrants(200, 50)
    fill = (7, 8, 9)
    tiles, lay = tiling.anyres_tiles(img, 100, None, sentinel_fn(100)[0], fill=fill, resample=NEAREST)
    assert (lay.rows, lay.cols) == (1, 2)
    left = arr(tiles[1])
    assert (left[:25] == fill).all() and (left[75:] == fill).all()
    np.testing.assert_array_equal(left[25:75], arr(img)[:, :100])


def test_anyres_tiles_upscale_and_ceil_rounding():
    # 50x25, tile 100: every default canvas caps at 50*25 = 1250 px, least waste -> [100, 100] (1x1).
    # Fit: scale_w 2 < scale_h 4 -> 100 x ceil(25*2) = 100x50, pasted at y = 25.
    img = halves(50, 25)
    tiles, lay = tiling.anyres_tiles(img, 100, None, sentinel_fn(100)[0], resample=NEAREST)
    assert (lay.rows, lay.cols, len(tiles)) == (1, 1, 2)
    t = arr(tiles[1])
    assert (t[25:75, :50] == RED).all() and (t[25:75, 50:] == BLUE).all()
    assert (t[:25] == 0).all() and (t[75:] == 0).all()  # default fill black

    # 300x101 on the only canvas [100, 200]: scale_w 2/3 < scale_h 100/101 -> width 200,
    # height ceil(101 * 2/3 = 67.33) = 68 (int or round would give 67); top = (100-68)//2 = 16,
    # so rows 16..83 are image and row 84 is padding
    red = Image.new("RGB", (300, 101), RED)
    tiles, lay = tiling.anyres_tiles(red, 100, [(100, 200)], sentinel_fn(100)[0], resample=NEAREST)
    canvas = np.concatenate([arr(t) for t in tiles[1:]], axis=1)  # [100, 200, 3]
    assert (canvas[16:84] == RED).all()
    assert (canvas[:16] == 0).all() and (canvas[84:] == 0).all()


def test_anyres_tiles_with_image_processor_thumbnail():
    img = quadrants(120, 60)
    proc = ImageProcessor(32, mode="letterbox")
    tiles, lay = tiling.anyres_tiles(img, 32, None, proc.geometry)
    assert len(tiles) == lay.n_tiles and all(t.size == (32, 32) for t in tiles)


def test_thumbnail_fn_must_return_a_tile():
    with pytest.raises(ValueError):
        tiling.anyres_tiles(quadrants(200, 100), 100, None, lambda im: im)
    with pytest.raises(ValueError):
        tiling.split_tiles(quadrants(64, 64), 32, 128, lambda im: im)


# ------------------------------------------------------------------ split (Idefics3)


def test_split_layout_hand_cases():
    # 1200x800, tile 364, max_side 1456: longest 1200 <= 1456, no resize;
    # cols = ceil(1200/364) = 4 (1092 < 1200 <= 1456), rows = ceil(800/364) = 3 (728 < 800 <= 1092)
    lay = tiling.split_layout((1200, 800), 364, 1456)
    assert (lay.mode, lay.rows, lay.cols, lay.thumbnail, lay.n_tiles) == ("split", 3, 4, True, 13)
    # 2000x1000 -> scaled by 1456/2000 to 1456x728 = exactly 4 x 2 tiles (no extra row from ceil)
    lay = tiling.split_layout((2000, 1000), 364, 1456)
    assert (lay.rows, lay.cols, lay.n_tiles) == (2, 4, 9)
    # 500x3000 -> 1456 high, 500*1456/3000 = 242.7 -> 243 wide -> 4 rows, 1 col
    lay = tiling.split_layout((500, 3000), 364, 1456)
    assert (lay.rows, lay.cols, lay.thumbnail) == (4, 1, True)
    # max_side None -> 4 tiles: 3000x3000 -> 1456x1456 -> 4x4
    lay = tiling.split_layout((3000, 3000), 364)
    assert (lay.rows, lay.cols) == (4, 4)


def test_split_layout_small_image_is_not_split():
    for size in [(300, 200), (364, 364), (1, 364)]:
        lay = tiling.split_layout(size, 364, 1456)
        assert (lay.rows, lay.cols, lay.thumbnail, lay.n_tiles) == (1, 1, False, 1), size
    # one pixel over a tile: 2 columns plus the global image; small images are not upscaled
    lay = tiling.split_layout((365, 100), 364, 1456)
    assert (lay.rows, lay.cols, lay.thumbnail, lay.n_tiles) == (1, 2, True, 3)


def test_split_segments_order_and_counts():
    lay = tiling.split_layout((1200, 800), 364, 1456)  # 3 x 4
    segs = tiling.split_segments(lay, 64)
    expected = [
        "<row_1_col_1>", "<row_1_col_2>", "<row_1_col_3>", "<row_1_col_4>",
        "<row_2_col_1>", "<row_2_col_2>", "<row_2_col_3>", "<row_2_col_4>",
        "<row_3_col_1>", "<row_3_col_2>", "<row_3_col_3>", "<row_3_col_4>",
        "<global-img>",
    ]  # fmt: skip
    assert segs == [(m, 64) for m in expected]
    assert tiling.split_num_tokens(lay, 64) == 13 * 65  # 845: each marker is one token
    assert tiling.num_image_tokens(lay, 64) == 845
    small = tiling.split_layout((300, 200), 364, 1456)
    assert tiling.split_segments(small, 64) == [("<global-img>", 64)]
    assert tiling.split_num_tokens(small, 64) == 65
    with pytest.raises(ValueError):
        tiling.split_segments(tiling.anyres_layout((1000, 500), 336, LLAVA_PINS), 64)


def test_split_marker_tokens():
    assert tiling.split_marker_tokens(2, 3) == [
        "<row_1_col_1>", "<row_1_col_2>", "<row_1_col_3>",
        "<row_2_col_1>", "<row_2_col_2>", "<row_2_col_3>",
        "<global-img>",
    ]  # fmt: skip
    markers = set(tiling.split_marker_tokens(4, 4))
    for size in [(1200, 800), (2000, 1000), (500, 3000), (3000, 3000), (300, 200)]:
        lay = tiling.split_layout(size, 364, 1456)
        assert {m for m, _ in tiling.split_segments(lay, 1)} <= markers


def test_split_tiles_row_major_global_last():
    # 64x64 with tile 32, max_side 128: 2 x 2, no resize -> TL, TR, BL, BR, then the global image
    img = quadrants(64, 64)
    fn, made = sentinel_fn(32)
    tiles, lay = tiling.split_tiles(img, 32, 128, fn, resample=NEAREST)
    assert (lay.rows, lay.cols, lay.n_tiles) == (2, 2, 5) and len(tiles) == 5
    assert tiles[-1] is made[0]
    a = arr(img)
    for t, (y, x) in zip(tiles[:4], [(0, 0), (0, 32), (32, 0), (32, 32)]):
        np.testing.assert_array_equal(arr(t), a[y : y + 32, x : x + 32])


def test_split_tiles_resizes_to_whole_tiles():
    # 40x20, tile 32: cols = ceil(40/32) = 2, rows = 1 -> stretched to 64x32. NEAREST maps output
    # x to source floor((x + 0.5) * 40/64): x = 31 -> 19 (red half), x = 32 -> 20 (blue half)
    img = halves(40, 20)
    tiles, lay = tiling.split_tiles(img, 32, 128, sentinel_fn(32)[0], resample=NEAREST)
    assert (lay.rows, lay.cols, len(tiles)) == (1, 2, 3)
    assert (arr(tiles[0]) == RED).all() and (arr(tiles[1]) == BLUE).all()


def test_split_tiles_small_image_is_only_the_global_image():
    fn, made = sentinel_fn(32)
    tiles, lay = tiling.split_tiles(quadrants(20, 10), 32, 128, fn)
    assert tiles == [made[0]] and lay.n_tiles == 1 and not lay.thumbnail
