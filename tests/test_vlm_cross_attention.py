"""Cross-attention fusion (Flamingo) inside the VLM: zero-gated start, marker tokens, multi-image
and text-only rows, cached decoding, checkpoints, trainable parts and partial initialisation."""

from __future__ import annotations

import pytest
import torch
from _model_helpers import left_pad, tiny_tokenizer

from vlmkit.config import ModelConfig, StageConfig
from vlmkit.models.vlm import VisionLanguageModel


def build(fusion: str = "cross_attention", seed: int = 0, **connector):
    torch.manual_seed(seed)
    tok = tiny_tokenizer()
    cfg = ModelConfig.model_validate({
        "vision": {"name": "tiny-cnn", "image_size": 32},
        "connector": {"type": "mlp2x_gelu", "fusion": fusion, **connector},
        "llm": {"name": "tiny-llama", "overrides": {"num_hidden_layers": 2}},
    })  # fmt: skip
    return VisionLanguageModel.from_config(cfg, tok).eval(), tok


def open_gates(model, value: float = 1.0):
    with torch.no_grad():
        for block in model.cross_attention.blocks:
            block.alpha_attn.fill_(value)
            block.alpha_ffn.fill_(value)


def images(n, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_one_marker_per_image_and_zero_gates_ignore_images():
    model, _ = build()
    assert model.tokens_per_image == 1 and model.image_segments() == 1
    img = model.image_token_id
    ids, mask = left_pad([[6, img, 7, 8]])
    with torch.no_grad():
        a = model(ids, mask, images(1, 0)).logits
        b = model(ids, mask, images(1, 1)).logits
        plain = model.llm(input_ids=ids, attention_mask=mask).logits  # no media set: the plain LM
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, plain, rtol=1e-6, atol=1e-6)


def test_open_gates_read_only_the_images_before_a_token():
    model, _ = build()
    open_gates(model)
    img = model.image_token_id
    ids, mask = left_pad([[6, 7, img, 8, 9]])
    with torch.no_grad():
        a = model(ids, mask, images(1, 0)).logits
        b = model(ids, mask, images(1, 1)).logits
    torch.testing.assert_close(a[0, :2], b[0, :2], rtol=0, atol=0)  # before the marker: no image
    assert (a[0, 2:] - b[0, 2:]).abs().max() > 1e-4  # from the marker on: the image matters


def test_multi_image_and_text_rows_match_single_rows_and_generation_is_consistent():
    model, _ = build()
    open_gates(model, 0.7)
    img = model.image_token_id
    rows = [[6, img, 7, img, 8], [9, 10, 11], [img, 12]]
    pixels = images(3, 5)
    per_row_pixels = [pixels[0:2], None, pixels[2:3]]
    ids, mask = left_pad(rows)
    with torch.no_grad():
        batched = model(ids, mask, pixels).logits
        for r, (row, px) in enumerate(zip(rows, per_row_pixels)):
            one_ids, one_mask = left_pad([row])
            alone = model(one_ids, one_mask, px).logits[0]
            torch.testing.assert_close(batched[r, -len(row):], alone, rtol=1e-5, atol=1e-5)
    cached = model.generate(ids, mask, pixels, max_new_tokens=6)
    uncached = model.generate(ids, mask, pixels, max_new_tokens=6, use_cache=False)
    assert cached == uncached
    singles = [model.generate(*left_pad([row]), px, max_new_tokens=6)[0] for row, px in zip(rows, per_row_pixels)]
    assert cached == singles


def test_checkpoint_roundtrip(tmp_path):
    from vlmkit.models.checkpoint_io import load_checkpoint, save_checkpoint

    model, tok = build()
    open_gates(model, 0.3)
    save_checkpoint(model, tok, tmp_path / "ckpt")
    loaded, _ = load_checkpoint(tmp_path / "ckpt")
    img = model.image_token_id
    ids, mask = left_pad([[6, img, 7]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, mask, images(1)).logits, model(ids, mask, images(1)).logits)
    assert loaded.cross_attention.blocks[0].alpha_attn.item() == pytest.approx(0.3)


def test_connector_part_holds_the_blocks_and_gets_gradients():
    from vlmkit.train.stages import select_trainable

    model, _ = build()
    model.train()
    stage = StageConfig(name="s", data={"x": 1.0}, trainable=["connector"], lr=1e-3, steps=1)
    selected = select_trainable(model, stage.trainable)
    names = {n for n, _ in selected["connector"]}
    assert any(".xattn." in n for n in names) and any(n.startswith("connector.") for n in names)
    assert not any(p.requires_grad for n, p in model.llm.named_parameters() if ".xattn." not in n)
    img = model.image_token_id
    ids, mask = left_pad([[6, img, 7, 8]])
    labels = ids.clone()
    out = model(ids, mask, images(1), labels)
    out.loss_sum.backward()
    gate = model.cross_attention.blocks[0].alpha_attn
    assert gate.grad is not None and gate.grad.abs() > 0  # at alpha=0 only the gates learn first
    assert all(p.grad is None for p in model.vision.parameters())


def test_init_parts_copies_llm_into_wrapped_layers(tmp_path):
    from vlmkit.models.checkpoint_io import save_checkpoint
    from vlmkit.train.run import copy_parts

    plain, tok = build(fusion="splice", seed=1)
    save_checkpoint(plain, tok, tmp_path / "plain")
    target, _ = build(seed=2)
    copy_parts(plain, target, ["vision", "llm"], str(tmp_path / "plain"))
    ids, mask = left_pad([[6, target.image_token_id, 7]])
    with torch.no_grad():  # gates still 0: the target is the source LM with a marker token
        want = plain.llm(input_ids=ids, attention_mask=mask).logits
        got = target(ids, mask, images(1)).logits
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(target.vision(images(1)), plain.vision(images(1)))
