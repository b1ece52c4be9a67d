import json

import pytest
import torch
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    Siglip2VisionConfig,
    Siglip2VisionModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from vlmkit.config import VisionConfig
from vlmkit.models.vision import (
    HALF,
    IMAGENET_MEAN,
    IMAGENET_STD,
    OPENAI_CLIP_MEAN,
    FusedVisionEncoder,
    build_vision_encoder,
    resize_token_grid,
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


# ---------------------------------------------------------------------- encoder families from local dirs
# (siglip and dinov2-with-registers with default layer and stats are covered above; here every
# family, with explicit layers and a preprocessor_config.json)

DIR_STATS = {"image_mean": [0.11, 0.22, 0.33], "image_std": [0.44, 0.55, 0.66]}


def _family_model(kind: str):
    """(HF model, tokens dropped from hidden_states, needs SigLIP2 patchified input)."""
    if kind == "clip_vision":
        return CLIPVisionModel(CLIPVisionConfig(image_size=32, patch_size=8, **VIT)), 1, False
    if kind == "siglip":
        return SiglipVisionModel(SiglipVisionConfig(image_size=32, patch_size=8, **VIT)), 0, False
    if kind == "siglip2":
        return Siglip2VisionModel(Siglip2VisionConfig(patch_size=8, num_patches=64, **VIT)), 0, True
    if kind == "dinov2":
        return Dinov2Model(Dinov2Config(image_size=32, patch_size=8, **VIT)), 1, False
    if kind == "dinov2_registers":
        cfg = Dinov2WithRegistersConfig(image_size=32, patch_size=8, num_register_tokens=3, **VIT)
        return Dinov2WithRegistersModel(cfg), 1 + 3, False
    raise ValueError(kind)


def _hf_hidden_states(hf, x, naflex: bool):
    if not naflex:
        return hf(x, output_hidden_states=True).hidden_states
    from transformers.models.siglip2.image_processing_pil_siglip2 import convert_image_to_patches

    patches = torch.stack([torch.from_numpy(convert_image_to_patches(img.numpy(), 8)) for img in x])
    n = x.shape[0]
    return hf(
        pixel_values=patches,
        pixel_attention_mask=torch.ones(n, 16, dtype=torch.long),
        spatial_shapes=torch.tensor([[4, 4]] * n),
        output_hidden_states=True,
    ).hidden_states


@pytest.mark.parametrize("kind", ["clip_vision", "siglip", "siglip2", "dinov2", "dinov2_registers"])
def test_encoder_family_from_dir_tokens_layers_and_stats(tmp_path, kind):
    torch.manual_seed(0)
    hf, dropped, naflex = _family_model(kind)
    hf.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(DIR_STATS))
    hf.eval()
    x = _pixels()
    ref = _hf_hidden_states(hf, x, naflex)
    assert ref[0].shape[1] == 16 + dropped  # what the HF model emits: patches plus the dropped tokens

    enc = build_vision_encoder(VisionConfig(name=str(tmp_path), image_size=32, feature_layer=1))
    assert enc.image_mean == tuple(DIR_STATS["image_mean"]) and enc.image_std == tuple(DIR_STATS["image_std"])
    assert (enc.num_tokens, enc.hidden_size) == (16, 32)
    assert torch.allclose(enc(x), ref[1][:, dropped:], atol=1e-5)

    layers = [-1, 1, -2]
    enc = build_vision_encoder(VisionConfig(name=str(tmp_path), image_size=32, feature_layer=layers))
    out = enc(x)
    assert out.shape == (2, 16, 32 * 3) and enc.hidden_size == 96 and enc.feature_layer == layers
    for k, layer in enumerate(layers):
        assert torch.allclose(out[..., 32 * k : 32 * (k + 1)], ref[layer][:, dropped:], atol=1e-5), layer
    assert not torch.allclose(out[..., :32], out[..., 64:])  # the layers really differ


def _block_list(model):
    return next(m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == VIT["num_hidden_layers"])


@pytest.mark.parametrize("kind", ["clip_vision", "siglip", "siglip2", "dinov2", "dinov2_registers"])
def test_blocks_after_the_deepest_feature_layer_do_not_run(tmp_path, kind):
    """LLaVA's second-to-last layer needs every block but the last: the last is not run (nor
    gets a gradient), and the model's block list and state dict are as they were."""
    torch.manual_seed(0)
    hf, _, _ = _family_model(kind)
    hf.save_pretrained(tmp_path)
    enc = build_vision_encoder(VisionConfig(name=str(tmp_path), image_size=32, feature_layer=-2))
    blocks = _block_list(enc.model)
    keys = list(enc.state_dict())
    ran = []
    for i, block in enumerate(blocks):
        block.register_forward_hook(lambda module, args, out, i=i: ran.append(i))
    enc(_pixels()).sum().backward()
    assert ran == [0, 1]
    assert all(p.grad is not None for p in blocks[1].parameters())
    assert all(p.grad is None for p in blocks[2].parameters())
    assert _block_list(enc.model) is blocks and list(enc.state_dict()) == keys
    assert enc.blocks_run == 2
    unused = sum(p.numel() for p in blocks[2].parameters())
    assert enc.parameters_run() == sum(p.numel() for p in enc.parameters()) - unused > 0

    ran.clear()
    enc = build_vision_encoder(VisionConfig(name=str(tmp_path), image_size=32, feature_layer=[1, -1]))
    for i, block in enumerate(_block_list(enc.model)):
        block.register_forward_hook(lambda module, args, out, i=i: ran.append(i))
    enc(_pixels())
    assert ran == [0, 1, 2]  # the last layer is read: every block runs
    assert enc.blocks_run == 3 and enc.parameters_run() == sum(p.numel() for p in enc.parameters())


def test_a_compiled_encoder_that_skips_blocks_compiles_once():
    """A compiled tower (``train.compile``) is not recompiled at each call although its block
    list is swapped for a shorter one at each call."""
    import torch._dynamo

    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    enc = build_vision_encoder(VisionConfig(name="tiny-vit", image_size=64))  # feature layer -2
    enc.model.compile(backend=counting_backend, dynamic=True)
    for n in (2, 3, 2, 5):
        enc(torch.randn(n, 3, 64, 64))
    assert 1 <= len(graphs) <= 2  # 2: dynamo may first specialise, then go dynamic
    torch._dynamo.reset()


# ---------------------------------------------------------------------- feature-layer lists


def test_vit_feature_layer_list_concatenates_channels():
    torch.manual_seed(0)
    enc = build_vision_encoder(VisionConfig(name="tiny-vit", image_size=64, feature_layer=[-2, -5])).eval()
    assert enc.hidden_size == 2 * 128 and enc.num_tokens == 16 and enc.feature_layers == (-2, -5)
    x = torch.randn(2, 3, 64, 64)
    ref = enc.model(x, output_hidden_states=True).hidden_states
    assert len(ref) == 5
    assert torch.allclose(enc(x), torch.cat([ref[-2], ref[-5]], -1)[:, 1:], atol=1e-6)


@pytest.mark.parametrize("layer", [5, -6, [-2, -6], [0, 5]])
def test_feature_layer_out_of_range_names_the_key(layer):
    with pytest.raises(ValueError, match=r"vision\.feature_layer -?\d+ is out of range.*5 hidden states"):
        build_vision_encoder(VisionConfig(name="tiny-vit", feature_layer=layer))


def test_empty_feature_layer_list_is_a_config_error():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="empty list"):
        VisionConfig(feature_layer=[])


def test_cnn_feature_layer_list_needs_one_resolution():
    torch.manual_seed(0)
    # tiny-cnn at 64 px: hidden_states 0 (embedder) and 1 (stage 1) are 16x16 x 32; 2 is 8x8, 3 is 4x4
    enc = build_vision_encoder(VisionConfig(name="tiny-cnn", feature_layer=[0, 1])).eval()
    assert (enc.num_tokens, enc.hidden_size) == (256, 64)
    x = torch.randn(2, 3, 64, 64)
    ref = enc.model(x, output_hidden_states=True).hidden_states
    expect = torch.cat([ref[0], ref[1]], 1).flatten(2).transpose(1, 2)
    assert torch.allclose(enc(x), expect, atol=1e-6)
    with pytest.raises(ValueError, match=r"vision\.feature_layer \[-1, -2\].*different resolutions.*-1: 4x4, -2: 8x8"):
        build_vision_encoder(VisionConfig(name="tiny-cnn", feature_layer=[-1, -2]))
    with pytest.raises(ValueError, match=r"vision\.feature_layer 4 is out of range"):
        build_vision_encoder(VisionConfig(name="tiny-cnn", feature_layer=4))


# ---------------------------------------------------------------------- fused encoders

FUSED_SIZE = 56  # SigLIP patch 8 -> 7x7; DINOv2 patch 14 -> 4x4
DINO_STATS = {"image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD)}


@pytest.fixture(scope="module")
def fused_dirs(tmp_path_factory):
    """A SigLIP (patch 8, 32 channels) and a DINOv2 (patch 14, 24 channels) saved as HF dirs."""
    root = tmp_path_factory.mktemp("fused")
    torch.manual_seed(0)
    SiglipVisionModel(SiglipVisionConfig(image_size=FUSED_SIZE, patch_size=8, **VIT)).save_pretrained(root / "siglip")
    dino = dict(VIT, hidden_size=24)
    Dinov2Model(Dinov2Config(image_size=FUSED_SIZE, patch_size=14, **dino)).save_pretrained(root / "dinov2")
    (root / "dinov2" / "preprocessor_config.json").write_text(json.dumps(DINO_STATS))
    return {"siglip": root / "siglip", "dinov2": root / "dinov2"}


def _fused_cfg(dirs, main: str, other: str, **fused_kw) -> VisionConfig:
    return VisionConfig(
        name=str(dirs[main]), image_size=FUSED_SIZE, fused=[{"name": str(dirs[other]), **fused_kw}]
    )


def _raw_and_normalised(mean, std, n=2, seed=5):
    g = torch.Generator().manual_seed(seed)
    raw = torch.rand(n, 3, FUSED_SIZE, FUSED_SIZE, generator=g)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    return raw, (raw - m) / s


@pytest.mark.parametrize("main,other,grid", [("siglip", "dinov2", 7), ("dinov2", "siglip", 4)])
def test_fused_output_follows_the_main_encoder(fused_dirs, main, other, grid):
    enc = build_vision_encoder(_fused_cfg(fused_dirs, main, other))
    assert isinstance(enc, FusedVisionEncoder) and enc.family == "fused"
    family = {"siglip": "siglip_vision_model", "dinov2": "dinov2"}
    assert enc.families == [family[main], family[other]]
    assert enc.num_tokens == grid * grid and enc.grid == grid and enc.image_size == FUSED_SIZE
    assert enc.hidden_size == 32 + 24
    stats = (0.5,) * 3 if main == "siglip" else IMAGENET_MEAN
    assert enc.image_mean == stats  # pixels come normalised with the main encoder's statistics
    assert enc.hf_config is enc.main.hf_config
    out = enc.eval()(torch.randn(3, 3, FUSED_SIZE, FUSED_SIZE))
    assert out.shape == (3, grid * grid, 56)


def test_fused_renormalises_pixels_and_resizes_the_grid(fused_dirs):
    enc = build_vision_encoder(_fused_cfg(fused_dirs, "siglip", "dinov2")).eval()
    siglip = build_vision_encoder(VisionConfig(name=str(fused_dirs["siglip"]), image_size=FUSED_SIZE)).eval()
    dino = build_vision_encoder(VisionConfig(name=str(fused_dirs["dinov2"]), image_size=FUSED_SIZE)).eval()
    assert dino.image_mean == IMAGENET_MEAN and dino.num_tokens == 16
    raw, pv = _raw_and_normalised(HALF, HALF)  # the data pipeline normalises with the main stats
    with torch.no_grad():
        out = enc(pv)
        main = siglip(pv)
        own = dino((raw - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        wrong = dino(pv)  # what DINOv2 would see without re-normalisation

    def resized(f):  # [N, 16, C] -> [N, 49, C], bilinear on the 4x4 grid, written out independently
        grid = f.reshape(f.shape[0], 4, 4, f.shape[-1]).permute(0, 3, 1, 2)
        up = torch.nn.functional.interpolate(grid, size=(7, 7), mode="bilinear", align_corners=False)
        return up.permute(0, 2, 3, 1).reshape(f.shape[0], 49, f.shape[-1])

    assert torch.allclose(out[..., :32], main, atol=1e-6)
    assert torch.allclose(out[..., 32:], resized(own), atol=1e-5)
    assert not torch.allclose(out[..., 32:], resized(wrong), atol=1e-3)


def test_fused_same_stats_and_same_grid_pass_through(fused_dirs):
    # tiny-vit (patch 16, 4x4 at 64 px, stats 0.5) fused onto tiny-cnn (4x4, stats 0.5): nothing to convert
    torch.manual_seed(0)
    enc = build_vision_encoder(VisionConfig(name="tiny-cnn", fused=[{"name": "tiny-vit"}])).eval()
    x = torch.randn(2, 3, 64, 64)
    assert enc.renormalise(x, enc.fused[0]) is x
    with torch.no_grad():
        out = enc(x)
        assert torch.equal(out[..., 128:], enc.fused[0](x))
    assert out.shape == (2, 16, 256)


def test_resize_token_grid_is_row_major():
    rows, cols = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    feats = torch.stack([rows.flatten(), cols.flatten()], -1).unsqueeze(0)  # [1, 16, 2]: token r*4+c = (r, c)
    assert resize_token_grid(feats, 4) is feats
    out = resize_token_grid(feats, 7).reshape(7, 7, 2)
    assert torch.allclose(out[..., 0], out[:, :1, 0].expand(7, 7))  # channel 0 varies down the rows only
    assert torch.allclose(out[..., 1], out[:1, :, 1].expand(7, 7))  # channel 1 along the columns only
    assert (out[1:, 0, 0] >= out[:-1, 0, 0]).all() and out[-1, 0, 0] > out[0, 0, 0]
    assert torch.allclose(out[..., 0], out[..., 1].T)


@pytest.mark.parametrize("frozen_part", ["main", "fused", "both"])
def test_fused_grads_reach_the_trainable_parts_only(fused_dirs, frozen_part):
    enc = build_vision_encoder(_fused_cfg(fused_dirs, "siglip", "dinov2"))
    if frozen_part in ("main", "both"):
        enc.main.requires_grad_(False)
    if frozen_part in ("fused", "both"):
        enc.fused.requires_grad_(False)
    _, pv = _raw_and_normalised(HALF, HALF)
    out = enc(pv)
    assert enc.frozen == (frozen_part == "both")
    if frozen_part == "both":
        assert not out.requires_grad
        return
    out.square().mean().backward()

    def got(module):
        return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())

    trainable, frozen = (enc.fused, enc.main) if frozen_part == "main" else (enc.main, enc.fused)
    assert got(trainable)
    assert all(p.grad is None for p in frozen.parameters())


def test_fused_errors_name_the_fused_key(fused_dirs):
    with pytest.raises(ValueError, match=r"vision\.fused\.0\.feature_layer 9 is out of range"):
        build_vision_encoder(_fused_cfg(fused_dirs, "siglip", "dinov2", feature_layer=[-1, 9]))
    with pytest.raises(ValueError, match=r"vision\.fused\.0: image_size 56 is not a multiple of the patch size 16"):
        build_vision_encoder(
            VisionConfig(name=str(fused_dirs["siglip"]), image_size=FUSED_SIZE, fused=[{"name": "tiny-vit"}])
        )
    with pytest.raises(ValueError, match=r"vision\.fused\.0\.overrides"):
        build_vision_encoder(_fused_cfg(fused_dirs, "siglip", "dinov2", overrides={"no_such_field": 1}))


def test_fused_vlm_checkpoint_roundtrip(fused_dirs, tmp_path):
    import shutil

    from _model_helpers import left_pad, make_model, prompt_ids, tiny_model_config

    from vlmkit.models.checkpoint_io import load_checkpoint, save_checkpoint
    from vlmkit.train.stages import select_trainable

    # copies that disappear before loading: the checkpoint alone must rebuild every encoder
    src = tmp_path / "src"
    for name, path in fused_dirs.items():
        shutil.copytree(path, src / name)
    cfg = tiny_model_config()
    cfg.vision = VisionConfig(
        name=str(src / "siglip"),
        image_size=FUSED_SIZE,
        fused=[{"name": str(src / "dinov2"), "feature_layer": [-1, -2]}],
    )
    model, tok = make_model(seed=2, cfg=cfg)
    assert isinstance(model.vision, FusedVisionEncoder)
    assert model.vision.hidden_size == 32 + 2 * 24 and model.tokens_per_image == 49
    names = [n for n, _ in model.named_parameters() if n.startswith("vision.")]
    assert names and all(n.startswith(("vision.main.model.", "vision.fused.0.model.")) for n in names)
    assert any(n.startswith("vision.fused.0.") for n in names)

    path = save_checkpoint(model, tok, tmp_path / "ck")
    shutil.rmtree(src)
    meta = json.loads((path / "config.json").read_text())
    assert meta["vision_hf_config"]["model_type"] == "siglip_vision_model"
    v = meta["vision"]
    assert v["family"] == "fused" and v["image_size"] == FUSED_SIZE and v["image_mean"] == [0.5] * 3
    assert [e["family"] for e in v["encoders"]] == ["siglip_vision_model", "dinov2"]
    assert [e["hf_config"]["model_type"] for e in v["encoders"]] == ["siglip_vision_model", "dinov2"]
    assert v["encoders"][1]["feature_layer"] == [-1, -2] and v["encoders"][1]["image_mean"] == list(IMAGENET_MEAN)

    loaded, _ = load_checkpoint(path)
    assert isinstance(loaded.vision, FusedVisionEncoder) and loaded.tokens_per_image == 49
    assert loaded.vision.fused[0].feature_layer == [-1, -2] and loaded.vision.fused[0].image_mean == IMAGENET_MEAN
    rows = [prompt_ids(model, [1, 2], 1), prompt_ids(model, [3], 2)]
    ids, mask = left_pad(rows)
    pv = torch.randn(3, 3, FUSED_SIZE, FUSED_SIZE)
    with torch.no_grad():
        assert torch.equal(model(ids, mask, pv).logits, loaded(ids, mask, pv).logits)

    # the stage code's part name and globs over the documented names
    selected = select_trainable(loaded, ["vision.fused.*"])
    assert selected["vision.fused.*"] and all(n.startswith("vision.fused.0.") for n, _ in selected["vision.fused.*"])
    assert not any(p.requires_grad for p in loaded.vision.main.parameters())
    selected = select_trainable(loaded, ["vision"])
    assert len(selected["vision"]) == len(list(loaded.vision.parameters()))
