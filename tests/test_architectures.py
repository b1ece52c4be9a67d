"""Every architecture vlmkit offers takes multi-image, single-image and image-free rows in one
batch, trains exactly its trainable parts, and leaves an image-free row as it is alone."""

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
from vlmkit.train.stages import select_trainable

ARCHITECTURES = {
    "linear": {"connector": {"type": "linear"}},
    "mlp2x_gelu": {"connector": {"type": "mlp2x_gelu"}},
    "mlp3x_gelu": {"connector": {"type": "mlp3x_gelu"}},
    "pixel_shuffle": {"connector": {"type": "mlp2x_gelu", "pixel_shuffle": 2}},
    "pool": {"connector": {"type": "mlp2x_gelu", "pool_tokens": 4}},
    "perceiver": {"connector": {"type": "perceiver", "num_queries": 6}},
    "qformer": {"connector": {"type": "qformer", "num_queries": 6}},
    "cross_attention_last": {"connector": {"fusion": "cross_attention", "cross_attention_every": 2}},
    "cross_attention_all": {"connector": {"fusion": "cross_attention", "cross_attention_media": "all"}},
    "anyres": {"tiling": {"mode": "anyres", "grid_pinpoints": [[64, 128], [128, 64]]}},
    "split": {"tiling": {"mode": "split", "max_side": 128}},
}


def build(arch: dict):
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    tok.chat_template = DEFAULT_CHAT_TEMPLATE
    cfg = ModelConfig.model_validate({
        "vision": {"name": "tiny-cnn", "image_size": 64},
        "llm": {"name": "tiny-llama", "overrides": {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128}},
        **arch,
    })  # fmt: skip
    return VisionLanguageModel.from_config(cfg, tok), tok


def sample(sid: str, n_images: int) -> Sample:
    parts = [Part(image=i) for i in range(n_images)] + [Part(text="w1 w2 w3")]
    return Sample(id=sid, turns=[Turn("user", parts), Turn.of_text("assistant", "w4 w5")],
                  images=[ImageRef(path=f"{sid}-{i}.png") for i in range(n_images)])  # fmt: skip


def pictures():
    g = torch.Generator().manual_seed(1)
    sizes = {"two-0.png": (100, 60), "two-1.png": (60, 100), "one-0.png": (64, 64)}
    return {k: Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()) for k, (w, h) in sizes.items()}


def batch_of(model, tok, samples, images):
    pipeline = ImagePipeline.for_model(model)
    processor = pipeline if model.config.tiling is not None else pipeline.processor
    enc = SampleEncoder(ChatTemplate(tok), processor, model.tokens_per_image, max_len=4096,
                        load=lambda ref, root: images[ref.path])  # fmt: skip
    items = [enc(s, ".") for s in samples]
    return collate([e for e, _ in items], [p for _, ps in items for p in ps], tok.pad_token_id)


def run(model, batch, labels=True):
    kw = {"image_layouts": batch["image_layouts"]} if batch.get("image_layouts") else {}
    return model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                 batch["labels"] if labels else None, sample_ids=batch["sample_ids"], **kw)  # fmt: skip


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_mixed_batch_trains_exactly_the_trainable_parts(name):
    model, tok = build(ARCHITECTURES[name])
    model.train()
    images = pictures()
    batch = batch_of(model, tok, [sample("two", 2), sample("none", 0), sample("one", 1)], images)
    select_trainable(model, ["connector"])
    out = run(model, batch)
    assert torch.isfinite(out.loss_sum) and out.n_targets > 0
    out.loss_sum.backward()
    bridge = {id(p) for p in model.parts()["connector"].parameters()}
    for n, p in model.named_parameters():
        if id(p) in bridge:
            assert p.grad is not None, f"{name}: {n} got no gradient"
        else:
            assert p.grad is None, f"{name}: frozen {n} got a gradient"
    assert any(p.grad.abs().sum() > 0 for p in model.parts()["connector"].parameters())

    model.eval()
    alone = batch_of(model, tok, [sample("none", 0)], images)
    with torch.no_grad():
        ref = run(model, alone, labels=False).logits[0]
        got = run(model, batch, labels=False).logits[1, : ref.shape[0]]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
