"""High-resolution tiling inside the VLM: token counts, feature assembly, markers, checkpoints.

Expected positions are derived from the layouts' hand-checkable formulas (tests/test_tiling.py
checks those against hand-computed cases), and expected features from encoding each tile alone.
"""

from __future__ import annotations

import pytest
import torch
from _model_helpers import tiny_tokenizer
from PIL import Image

from vlmkit.config import ModelConfig
from vlmkit.data.collate import collate
from vlmkit.data.dataset import SampleEncoder
from vlmkit.data.image_pipeline import ImagePipeline
from vlmkit.data.sample import ImageRef, Part, Sample, Turn
from vlmkit.data.template import ChatTemplate
from vlmkit.data.tokenizer import DEFAULT_CHAT_TEMPLATE
from vlmkit.models.vlm import VisionLanguageModel


def build(tiling: dict | None, seed: int = 0):
    torch.manual_seed(seed)
    tok = tiny_tokenizer()
    tok.chat_template = DEFAULT_CHAT_TEMPLATE
    cfg = ModelConfig.model_validate({
        "vision": {"name": "tiny-cnn", "image_size": 32},  # 2x2 tokens per tile
        "llm": {"name": "tiny-llama", "overrides": {"num_hidden_layers": 1}},
        "tiling": tiling,
    })  # fmt: skip
    model = VisionLanguageModel.from_config(cfg, tok).eval()
    return model, tok


def picture(w: int, h: int, seed: int = 0) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(arr, "RGB")


def sample(n_images: int, sid: str = "s") -> Sample:
    parts = [Part(image=i) for i in range(n_images)] + [Part(text="w1 w2")]
    return Sample(
        id=sid,
        turns=[Turn("user", parts), Turn.of_text("assistant", "w3")],
        images=[ImageRef(path=f"img{i}.png") for i in range(n_images)],
    )


def encode(model, tok, samples, images):
    """Training path: SampleEncoder with the model's pipeline, images from ``images`` by path."""
    pipeline = ImagePipeline.for_model(model)
    enc = SampleEncoder(ChatTemplate(tok), pipeline, model.tokens_per_image, max_len=4096,
                        load=lambda ref, root: images[ref.path])  # fmt: skip
    items = [enc(s, ".") for s in samples]
    return collate([e for e, _ in items], [p for _, ps in items for p in ps], tok.pad_token_id)


def test_anyres_tokens_and_features():
    model, tok = build({"mode": "anyres", "grid_pinpoints": [[32, 64], [64, 32], [64, 64]]})
    img = picture(80, 40)  # wide: the 32x64 (h, w) canvas, 1 row x 2 cols
    pipe = ImagePipeline.for_model(model)
    inp = pipe(img)
    lay = inp.layout
    assert (lay.rows, lay.cols, inp.pixels.shape[0]) == (1, 2, 3)  # thumbnail + 2 tiles
    # feature map: 1*2 rows x 2*2 cols of cells; 80x40 fills the 64x32 canvas exactly (2:1), so
    # nothing is unpadded; with newlines: 2 rows of (4 + 1) -> 10, plus the 2x2 thumbnail -> 14
    assert model.image_token_count(lay) == 4 + 2 * (4 + 1)

    batch = encode(model, tok, [sample(1)], {"img0.png": img})
    with torch.no_grad():
        emb = model.embed(batch["input_ids"], batch["pixel_values"], image_layouts=batch["image_layouts"])
        tiles = model.encode_images(inp.pixels)  # [3, 4, D]: thumbnail, tile (0,0), tile (0,1)
    pos = (batch["input_ids"][0] == model.image_token_id).nonzero().flatten()
    got = emb[0, pos]  # [14, D]
    torch.testing.assert_close(got[:4], tiles[0])
    # row r of the feature map: tile0 cells (r, 0..1), tile1 cells (r, 0..1), newline
    for r in range(2):
        row = got[4 + r * 5 : 4 + (r + 1) * 5]
        torch.testing.assert_close(row[:2], tiles[1][2 * r : 2 * r + 2])
        torch.testing.assert_close(row[2:4], tiles[2][2 * r : 2 * r + 2])
        torch.testing.assert_close(row[4], model.newline.embedding)


def test_anyres_strips_padding_rows():
    model, _ = build({"mode": "anyres", "grid_pinpoints": [[64, 64]]})
    # 64 wide x 32 tall on a 64x64 canvas: the image fills the middle half; of the 4x4 feature
    # cells the top and bottom rows are padding -> 2 rows x (4 + 1 newline) + 4 thumbnail = 14
    lay = ImagePipeline.for_model(model)(picture(64, 32)).layout
    assert (lay.rows, lay.cols) == (2, 2)
    assert model.image_token_count(lay) == 4 + 2 * 5


def test_split_markers_and_tile_order():
    model, tok = build({"mode": "split", "max_side": 64})
    img = picture(64, 32)  # fits 64 on the long side: 1 row x 2 cols of 32-px tiles + global image
    batch = encode(model, tok, [sample(1)], {"img0.png": img})
    ids = batch["input_ids"][0].tolist()
    markers = [tok.convert_tokens_to_ids(m) for m in ("<row_1_col_1>", "<row_1_col_2>", "<global-img>")]
    at = [ids.index(m) for m in markers]
    assert at[0] < at[1] < at[2]
    img_id = model.image_token_id
    for a in at:  # each marker is followed by exactly one tile's 4 image tokens
        assert ids[a + 1 : a + 5] == [img_id] * 4 and ids[a + 5] != img_id
    inp = ImagePipeline.for_model(model)(img)
    with torch.no_grad():
        emb = model.embed(batch["input_ids"], batch["pixel_values"], image_layouts=batch["image_layouts"])
        tiles = model.encode_images(inp.pixels)  # tile (1,1), tile (1,2), global
    for j, a in enumerate(at):
        torch.testing.assert_close(emb[0, a + 1 : a + 5], tiles[j])


def test_multi_image_and_text_only_rows_in_one_batch():
    model, tok = build({"mode": "anyres", "grid_pinpoints": [[32, 64], [64, 32]]})
    images = {"img0.png": picture(80, 40, 1), "img1.png": picture(40, 80, 2)}
    batch = encode(model, tok, [sample(2, "two"), sample(0, "none"), sample(1, "one")], images)
    assert len(batch["image_layouts"]) == 3
    out = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["labels"],
                image_layouts=batch["image_layouts"])  # fmt: skip
    assert torch.isfinite(out.loss_sum)
    out.loss_sum.backward()
    assert model.newline.embedding.grad is not None and model.newline.embedding.grad.abs().sum() > 0
    # the text-only row gives the same logits as alone (tiling never touches it)
    alone = encode(model, tok, [sample(0, "none")], images)
    with torch.no_grad():
        ref = model(alone["input_ids"], alone["attention_mask"]).logits[0]
        full = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                     image_layouts=batch["image_layouts"]).logits[1, : ref.shape[0]]  # fmt: skip
    torch.testing.assert_close(full, ref, atol=1e-5, rtol=1e-5)


def test_predictor_and_checkpoint_roundtrip(tmp_path):
    from vlmkit.infer.predictor import VLMPredictor
    from vlmkit.models.checkpoint_io import load_checkpoint, save_checkpoint

    model, tok = build({"mode": "split", "max_side": 64})
    for i, (w, h) in enumerate([(64, 32), (20, 20)]):
        picture(w, h, i).save(tmp_path / f"img{i}.png")
    s = Sample(id="p", turns=[Turn("user", [Part(image=0), Part(image=1), Part(text="w1")])],
               images=[ImageRef(path="img0.png"), ImageRef(path="img1.png")])  # fmt: skip
    answer = VLMPredictor(model, tok, image_root=tmp_path, max_new_tokens=4)([s])
    save_checkpoint(model, tok, tmp_path / "ckpt")
    loaded, tok2 = load_checkpoint(tmp_path / "ckpt")
    assert loaded.config.tiling.mode == "split"
    assert tok2.convert_tokens_to_ids("<row_1_col_2>") == tok.convert_tokens_to_ids("<row_1_col_2>")
    assert VLMPredictor(loaded, tok2, image_root=tmp_path, max_new_tokens=4)([s]) == answer


def test_broken_tile_runs_are_named():
    from vlmkit.models.vlm import ImageTokenMismatch

    model, tok = build({"mode": "split", "max_side": 64})
    img = picture(64, 32)
    batch = encode(model, tok, [sample(1, "good")], {"img0.png": img})
    ids = batch["input_ids"].clone()
    first = (ids[0] == model.image_token_id).nonzero().flatten()[0]
    ids[0, first] = 7  # one tile now has 3 image tokens
    with pytest.raises(ImageTokenMismatch, match="good"):
        model.embed(ids, batch["pixel_values"], sample_ids=["good"], image_layouts=batch["image_layouts"])
