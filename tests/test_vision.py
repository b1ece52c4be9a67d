import json

import pytest
import torch
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from vlmkit.config import VisionConfig
from vlmkit.models.vision import (
    IMAGENET_MEAN,
    OPENAI_CLIP_MEAN,
    build_vision_encoder,
    vision_from_hf_config,
)

VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2)


def _pixels(n=2, s=32):
    torch.manual_seed(1)
    return torch.randn(n, 3, s, s)


@pytest.mark.parametrize("name", ["tiny-cnn", "tiny-vit"])
def test_presets_give_16_tokens_of_128(name):
    torch.manual_seed(0)
    enc = build_vision_encoder(VisionConfig(name=name, image_size=64))
    out = enc(torch.randn(3, 3, 64, 64))
    assert out.shape == (3, 16, 128)
    assert (enc.num_tokens, enc.hidden_size) == (16, 128)
    assert enc.image_mean == (0.5, 0.5, 0.5) and enc.image_std == (0.5, 0.5, 0.5)


def test_preset_overrides_and_bad_override():
    enc = build_vision_encoder(VisionConfig(name="tiny-vit", overrides={"num_hidden_layers": 2}))
    assert enc.hf_config.num_hidden_layers == 2 and len(enc.model.encoder.layers) == 2
    with pytest.raises(ValueError, match="no field"):
        build_vision_encoder(VisionConfig(name="tiny-vit", overrides={"num_hiden_layers": 2}))


def test_tiny_cnn_flattens_grid_row_major():
    torch.manual_seed(0)
    enc = build_vision_encoder(VisionConfig(name="tiny-cnn")).eval()
    x = torch.randn(2, 3, 64, 64)
    fmap = enc.model(x).last_hidden_state  # [N, C, 4, 4]
    out = enc(x)
    assert torch.equal(out[:, 1 * 4 + 2], fmap[:, :, 1, 2])  # token (row 1, col 2)


def test_clip_drops_cls_and_selects_layer():
    torch.manual_seed(0)
    hf = CLIPVisionModel(CLIPVisionConfig(image_size=32, patch_size=8, **VIT)).eval()
    x = _pixels()
    ref = hf(x, output_hidden_states=True).hidden_states
    for layer, expected_idx in [(None, -2), (-1, -1), (1, 1)]:
        enc = vision_from_hf_config(hf.config, layer, 32)
        enc.model.load_state_dict(hf.state_dict())
        out = enc(x)
        assert out.shape == (2, 16, 32)
        assert torch.allclose(out, ref[expected_idx][:, 1:], atol=1e-6)
    # different layers really differ, so the comparison above is meaningful
    assert not torch.allclose(ref[-1][:, 1:], ref[-2][:, 1:])
    assert enc.image_mean == OPENAI_CLIP_MEAN


def test_siglip_keeps_every_patch():
    torch.manual_seed(0)
    hf = SiglipVisionModel(SiglipVisionConfig(image_size=32, patch_size=8, **VIT)).eval()
    enc = vision_from_hf_config(hf.config, None, 32)
    enc.model.load_state_dict(hf.state_dict())
    x = _pixels()
    out = enc(x)
    assert out.shape == (2, (32 // 8) ** 2, 32) and enc.num_tokens == 16
    assert torch.allclose(out, hf(x, output_hidden_states=True).hidden_states[-2], atol=1e-6)
    assert enc.image_mean == (0.5, 0.5, 0.5)


def test_dinov2_drops_cls_and_registers():
    torch.manual_seed(0)
    cfg = Dinov2WithRegistersConfig(image_size=32, patch_size=8, num_register_tokens=4, **VIT)
    hf = Dinov2WithRegistersModel(cfg).eval()
    enc = vision_from_hf_config(hf.config, -1, 32)
    enc.model.load_state_dict(hf.state_dict())
    x = _pixels()
    h = hf(x, output_hidden_states=True).hidden_states[-1]
    assert h.shape[1] == 1 + 4 + 16
    out = enc(x)
    assert out.shape == (2, 16, 32)
    assert torch.allclose(out, h[:, 5:], atol=1e-6)
    assert enc.image_mean == IMAGENET_MEAN


def test_load_full_clip_from_dir_uses_vision_tower_and_preprocessor_stats(tmp_path):
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
        vision_config=dict(image_size=32, patch_size=8, **VIT),
    )
    full = CLIPModel(cfg).eval()
    full.save_pretrained(tmp_path)
    stats = {"image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6]}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(stats))
    enc = build_vision_encoder(VisionConfig(name=str(tmp_path), image_size=32))
    assert enc.family == "clip_vision_model"
    assert not any(n.startswith("text") for n, _ in enc.named_parameters())
    assert enc.image_mean == (0.1, 0.2, 0.3) and enc.image_std == (0.4, 0.5, 0.6)
    x = _pixels()
    ref = full.vision_model(x, output_hidden_states=True).hidden_states[-2][:, 1:]
    assert torch.allclose(enc(x), ref, atol=1e-6)


@pytest.mark.parametrize("kind", ["siglip", "dinov2"])
def test_load_vision_model_from_dir(tmp_path, kind):
    torch.manual_seed(0)
    if kind == "siglip":
        hf = SiglipVisionModel(SiglipVisionConfig(image_size=32, patch_size=8, **VIT))
        n_tokens = 16
    else:
        hf = Dinov2WithRegistersModel(
            Dinov2WithRegistersConfig(image_size=32, patch_size=8, num_register_tokens=2, **VIT)
        )
        n_tokens = 16
    hf.save_pretrained(tmp_path)
    enc = build_vision_encoder(VisionConfig(name=str(tmp_path), image_size=32))
    # no preprocessor_config.json: family defaults
    assert enc.image_mean == ((0.5,) * 3 if kind == "siglip" else IMAGENET_MEAN)
    x = _pixels()
    ref = hf.eval()(x, output_hidden_states=True).hidden_states[-2]
    assert torch.allclose(enc(x), ref[:, ref.shape[1] - n_tokens :], atol=1e-6)


def test_unknown_family_is_rejected(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2).save_pretrained(
        tmp_path
    )
    with pytest.raises(ValueError, match="unsupported vision model_type 'llama'"):
        build_vision_encoder(VisionConfig(name=str(tmp_path)))


def test_frozen_encoder_builds_no_graph_and_keeps_bn_stats():
    enc = build_vision_encoder(VisionConfig(name="tiny-cnn"))
    enc.train()
    x = torch.randn(2, 3, 64, 64)
    assert enc(x).grad_fn is not None  # trainable: a graph
    enc.requires_grad_(False)
    bn = enc.model.embedder.embedder.normalization
    before = bn.running_mean.clone()
    out = enc(x)
    assert out.grad_fn is None and not out.requires_grad
    assert torch.equal(bn.running_mean, before)
    assert enc.model.training  # mode restored


def test_siglip2_patchifies_like_its_processor():
    from transformers import Siglip2VisionConfig, Siglip2VisionModel
    from transformers.models.siglip2.image_processing_pil_siglip2 import convert_image_to_patches

    torch.manual_seed(0)
    hf = Siglip2VisionModel(Siglip2VisionConfig(patch_size=8, num_patches=64, **VIT)).eval()
    enc = vision_from_hf_config(hf.config, None, 32)
    enc.model.load_state_dict(hf.state_dict())
    x = _pixels()
    patches = torch.stack([torch.from_numpy(convert_image_to_patches(img.numpy(), 8)) for img in x])
    ref = hf(
        pixel_values=patches,
        pixel_attention_mask=torch.ones(2, 16, dtype=torch.long),
        spatial_shapes=torch.tensor([[4, 4], [4, 4]]),
        output_hidden_states=True,
    ).hidden_states[-2]
    out = enc(x)
    assert out.shape == (2, 16, 32)
    assert torch.allclose(out, ref, atol=1e-6)
