"""`vlmkit export --format hf-llava`: the export loads in transformers' LLaVA with every weight in
place and computes what the vlmkit model computes (logits, greedy generation, preprocessing)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import safetensors.torch
import torch
import transformers
from _model_helpers import make_model, tiny_model_config, tiny_tokenizer
from PIL import Image

from vlmkit.config import ModelConfig
from vlmkit.data.images import ImageProcessor
from vlmkit.data.sample import Part, Turn
from vlmkit.data.template import ChatTemplate
from vlmkit.data.tokenizer import DEFAULT_CHAT_TEMPLATE
from vlmkit.models.checkpoint_io import load_checkpoint, save_checkpoint
from vlmkit.models.export import VLMKIT_FORMAT, ExportError, applicable_formats, export_checkpoint
from vlmkit.models.vlm import VisionLanguageModel

# the tower's own statistics (preprocessor_config.json next to it), so the export must carry them
MEAN = [0.40, 0.45, 0.50]
STD = [0.20, 0.25, 0.30]
TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=8)


def _tower(root, family: str, image_size: int = 32):
    if family == "clip":
        model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(image_size=image_size, **TOWER))
    elif family == "siglip":
        model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(image_size=image_size, **TOWER))
    elif family == "dinov2":
        model = transformers.Dinov2Model(transformers.Dinov2Config(image_size=image_size, **TOWER))
    else:
        raise ValueError(family)
    path = root / f"{family}-{image_size}"
    model.save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps({"image_mean": MEAN, "image_std": STD}))
    return path


def _tokenizer():
    tok = tiny_tokenizer()
    tok.chat_template = DEFAULT_CHAT_TEMPLATE
    return tok


CASES = {
    # name: (tower family, tower config image size, vlmkit image size, connector, preprocess, feature layer)
    "clip-mlp2x": ("clip", 32, 32, "mlp2x_gelu", "resize", None),
    "siglip-mlp2x": ("siglip", 32, 32, "mlp2x_gelu", "resize", None),
    # two feature layers, concatenated channel-wise (LLaVA's list-valued vision_feature_layer)
    "clip-linear": ("clip", 32, 32, "linear", "resize", [-2, -1]),
    # the tower's positions are interpolated from 4x4 to 6x6 (baked into the export); crop mode
    "siglip-48px-crop": ("siglip", 32, 48, "mlp2x_gelu", "resize-crop", -1),
    "dinov2-mlp1x": ("dinov2", 32, 32, "mlp1x_gelu", "resize", -1),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def exported(request, tmp_path_factory):
    family, tower_size, size, connector, preprocess, layer = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    tower = _tower(root, family, tower_size)
    cfg = ModelConfig.model_validate(
        {
            "vision": {"name": str(tower), "image_size": size, "preprocess": preprocess, "feature_layer": layer},
            "connector": {"type": connector},
            "llm": {"name": "tiny-llama", "overrides": {"num_hidden_layers": 2}},
        }
    )
    tok = _tokenizer()
    torch.manual_seed(1)
    built = VisionLanguageModel.from_config(cfg, tok)
    ckpt = save_checkpoint(built, tok, root / "ckpt")
    out = export_checkpoint(ckpt, root / "hf")
    model, tok = load_checkpoint(ckpt)  # what the export was made from
    hf, info = transformers.LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    hf.eval()
    return dict(name=request.param, family=family, size=size, preprocess=preprocess, ckpt=ckpt, out=out,
                model=model, tok=tok, hf=hf, info=info)


def _image(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def test_loads_with_no_missing_or_unexpected_weights(exported):
    info = exported["info"]
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert not info["mismatched_keys"] and not info["error_msgs"]
    # the original LLaVA-HF layout (which older vLLM reads), not transformers 5's own
    keys = set(safetensors.torch.load_file(str(exported["out"] / "model.safetensors")))
    assert {k.split(".")[0] for k in keys} == {"vision_tower", "multi_modal_projector", "language_model"}
    assert "language_model.lm_head.weight" in keys and "language_model.model.embed_tokens.weight" in keys
    assert {k for k in keys if k.startswith("multi_modal_projector.")} == {
        f"multi_modal_projector.linear_{i}.{p}" for i in (1, 2) for p in ("weight", "bias")
    }
    if exported["family"] in ("clip", "siglip"):
        assert all(k.startswith("vision_tower.vision_model.") for k in keys if k.startswith("vision_tower."))
    # only safetensors and JSON (and the chat template as text); no temporary directory left over
    names = {p.name for p in exported["out"].iterdir()}
    assert {"config.json", "model.safetensors", "processor_config.json", "preprocessor_config.json",
            "tokenizer.json", "generation_config.json"} <= names
    assert all(n.endswith((".json", ".safetensors", ".jinja")) for n in names), names
    assert not [p for p in exported["out"].parent.iterdir() if p.name.startswith(".hf.")]


def test_config_fields(exported):
    cfg = json.loads((exported["out"] / "config.json").read_text())
    model = exported["model"]
    assert cfg["model_type"] == "llava" and cfg["architectures"] == ["LlavaForConditionalGeneration"]
    assert cfg["text_config"]["architectures"] == ["LlamaForCausalLM"]
    assert cfg["image_token_index"] == exported["tok"].convert_tokens_to_ids("<image>") == model.image_token_id
    assert cfg["image_seq_length"] == model.tokens_per_image == (exported["size"] // 8) ** 2
    assert cfg["vision_feature_layer"] == model.vision.feature_layer
    assert cfg["vision_feature_select_strategy"] == ("full" if exported["family"] == "siglip" else "default")
    linear = exported["name"].endswith("linear") or exported["name"].endswith("mlp1x")
    assert cfg["projector_hidden_act"] == ("linear" if linear else "gelu")
    assert cfg["multimodal_projector_bias"] is True
    assert cfg["vision_config"]["image_size"] == exported["size"]


def _batch(model, seed: int = 0):
    k, img = model.tokens_per_image, model.image_token_id
    ids = torch.tensor([[2] + [img] * k + [5, 9, 14, 3], [2, 7] + [img] * k + [11, 12, 3]])
    pixel_values = torch.randn(2, 3, model.vision.image_size, model.vision.image_size,
                               generator=torch.Generator().manual_seed(seed))
    return ids, torch.ones_like(ids), pixel_values


def test_logits_match_vlmkit(exported):
    model, hf = exported["model"], exported["hf"]
    ids, mask, pv = _batch(model)
    with torch.no_grad():
        ours = model(ids, mask, pv).logits
        theirs = hf(input_ids=ids, attention_mask=mask, pixel_values=pv).logits
        blank = hf(input_ids=ids, attention_mask=mask, pixel_values=torch.zeros_like(pv)).logits
    assert theirs.shape == ours.shape
    assert (theirs - ours).abs().max().item() < 1e-4
    # the image really goes through the exported tower and projector
    assert (blank - ours).abs().max().item() > 1e-3


def test_greedy_generation_matches_vlmkit(exported):
    model, hf = exported["model"], exported["hf"]
    ids, mask, pv = _batch(model, seed=1)
    ids, mask, pv = ids[:1], mask[:1], pv[:1]
    ours = model.generate(ids, mask, pv, max_new_tokens=8)
    hf.generation_config.eos_token_id = None  # run all 8 steps, as vlmkit does with no stop tokens
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=pv, max_new_tokens=8, do_sample=False)
    assert out[0, ids.shape[1]:].tolist() == ours[0]
    assert len(ours[0]) == 8


def test_generation_config_stops_like_vlmkit_chat(exported):
    gen = json.loads((exported["out"] / "generation_config.json").read_text())
    stops = ChatTemplate(exported["tok"]).stop_token_ids
    assert gen["eos_token_id"] == stops and stops[0] == exported["tok"].convert_tokens_to_ids("<|im_end|>")
    assert gen["pad_token_id"] == exported["tok"].pad_token_id


def test_processor_reproduces_vlmkit_preprocessing_and_prompt(exported):
    out, model, tok = exported["out"], exported["model"], exported["tok"]
    proc = transformers.AutoProcessor.from_pretrained(out)
    assert isinstance(proc, transformers.LlavaProcessor)
    expected_ip = "SiglipImageProcessor" if exported["name"] == "siglip-mlp2x" else "CLIPImageProcessor"
    assert type(proc.image_processor).__name__.removesuffix("Pil") == expected_ip
    ours = ImageProcessor(exported["size"], MEAN, STD, exported["preprocess"])
    assert model.vision.image_mean == pytest.approx(MEAN) and model.vision.image_std == pytest.approx(STD)
    s = exported["size"]
    if exported["preprocess"] == "resize":
        sizes = [(50, 37), (80, 40), (29, 64), (s, s)]
    else:
        # resize-crop: sizes where vlmkit's round() and HF's int() agree on the resized long side;
        # otherwise HF's is one pixel shorter (docs/export.md)
        sizes = [(80, 40), (40, 70), (100, 64), (61, s), (s, s)]
        assert all((s * max(w, h) / min(w, h)) % 1 < 0.5 for w, h in sizes)
    for seed, (w, h) in enumerate(sizes):
        im = _image(w, h, seed)
        theirs = proc(images=im, text="<image>", return_tensors="pt")
        assert theirs["pixel_values"].shape == (1, 3, exported["size"], exported["size"])
        assert (theirs["pixel_values"][0] - ours(im)).abs().max().item() < 1e-5, (w, h)
        assert theirs["input_ids"][0].tolist().count(model.image_token_id) == model.tokens_per_image

    # the same prompt ids as vlmkit's ChatTemplate, from HF-style content lists
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "w3 w4"}]}]
    text = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    im = _image(40, 30, 7)
    theirs = proc(images=im, text=text, return_tensors="pt")
    turns = [Turn("user", [Part(image=0), Part(text="w3 w4")])]
    ids = ChatTemplate(tok).encode_prompt(turns, model.tokens_per_image)
    assert theirs["input_ids"][0].tolist() == ids

    # and, end to end, the same answer
    stops = ChatTemplate(tok).stop_token_ids
    ours_ids = model.generate(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long),
                              ours(im).unsqueeze(0), max_new_tokens=6, stop_token_ids=stops)[0]
    with torch.no_grad():
        gen = exported["hf"].generate(**theirs, max_new_tokens=6, do_sample=False, eos_token_id=stops)
    new = gen[0, len(ids):].tolist()
    if new and new[-1] in stops:
        new = new[:-1]
    assert new == ours_ids


# ---------------------------------------------------------------------- what is refused


@pytest.fixture(scope="module")
def clip_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("clipck")
    tower = _tower(root, "clip")
    cfg = ModelConfig.model_validate(
        {"vision": {"name": str(tower), "image_size": 32}, "llm": {"name": "tiny-llama", "overrides": {"num_hidden_layers": 2}}}
    )
    model, tok = make_model(cfg=cfg, tokenizer=_tokenizer())
    return save_checkpoint(model, tok, root / "ckpt")


def test_tiny_cnn_and_pixel_shuffle_are_refused_with_every_reason(tmp_path):
    cfg = tiny_model_config()  # the tiny-cnn preset
    cfg.connector.pixel_shuffle = 2
    model, tok = make_model(cfg=cfg)
    ckpt = save_checkpoint(model, tok, tmp_path / "ckpt")
    with pytest.raises(ExportError) as err:
        export_checkpoint(ckpt, tmp_path / "hf")
    msg = str(err.value)
    assert "CNN" in msg and "tiny-cnn" in msg and "pixel_shuffle 2" in msg
    assert "formats that apply to this checkpoint: " + VLMKIT_FORMAT in msg
    assert len(err.value.reasons) == 2 and err.value.formats == [VLMKIT_FORMAT]
    assert not (tmp_path / "hf").exists()
    assert applicable_formats(ckpt) == [VLMKIT_FORMAT]


def test_pixel_shuffle_on_a_vit_is_refused(tmp_path):
    cfg = ModelConfig.model_validate(
        {"vision": {"name": "tiny-vit", "image_size": 64}, "connector": {"pixel_shuffle": 2},
         "llm": {"name": "tiny-llama", "overrides": {"num_hidden_layers": 2}}}
    )
    model, tok = make_model(cfg=cfg, tokenizer=_tokenizer())
    ckpt = save_checkpoint(model, tok, tmp_path / "ckpt")
    with pytest.raises(ExportError, match=r"pixel_shuffle 2: LLaVA feeds every patch token") as err:
        export_checkpoint(ckpt, tmp_path / "hf")
    assert err.value.reasons == [r for r in err.value.reasons if "pixel_shuffle" in r]  # the ViT itself is fine


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda m: m["vision"].update(preprocess="letterbox"), "letterbox"),
        (lambda m: m.update(tiling={"mode": "anyres"}), "tiling (anyres)"),
        (lambda m: m["vision"].update(fused=[{"name": "tiny-vit"}]), "fuse 2 encoders"),
        (lambda m: m["connector"].update(pool_tokens=4), "pool_tokens 4"),
        (lambda m: m["connector"].update(output_norm=True), "output_norm"),
        (lambda m: m["connector"].update(type="perceiver"), "connector 'perceiver'"),
        (lambda m: m["connector"].update(type="mlp3x_gelu"), "connector 'mlp3x_gelu'"),
        (lambda m: m["connector"].update(fusion="cross_attention"), "fusion 'cross_attention'"),
    ],
)
def test_config_features_llava_lacks_are_refused(clip_ckpt, tmp_path, edit, needle):
    # these are refused from config.json alone, before any weight is read
    ckpt = tmp_path / "ckpt"
    shutil.copytree(clip_ckpt, ckpt)
    meta = json.loads((ckpt / "config.json").read_text())
    edit(meta["model"])
    (ckpt / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ExportError, match=r"(?s)" + needle.replace("(", r"\(").replace(")", r"\)")
                       + r".*formats that apply to this checkpoint: the vlmkit checkpoint format"):
        export_checkpoint(ckpt, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_exportable_checkpoint_lists_both_formats(clip_ckpt):
    formats = applicable_formats(clip_ckpt)
    assert formats[0].startswith("hf-llava") and formats[1] == VLMKIT_FORMAT


def test_existing_output_is_not_replaced_without_overwrite(clip_ckpt, tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_checkpoint(clip_ckpt, out)
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="must not be"):
        export_checkpoint(clip_ckpt, clip_ckpt / "hf")
    export_checkpoint(clip_ckpt, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_a_failed_write_leaves_nothing(clip_ckpt, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        export_checkpoint(clip_ckpt, tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------- CLI


def test_cli_export(clip_ckpt, tmp_path, capsys):
    from vlmkit.cli import main

    assert main(["export", str(clip_ckpt), "--format", "hf-llava", str(tmp_path / "hf")]) == 0
    assert "clip_vision_model + llama" in capsys.readouterr().out
    _, info = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    # an existing export needs --overwrite
    assert main(["export", str(clip_ckpt), "--format", "hf-llava", str(tmp_path / "hf")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export", str(clip_ckpt), "--format", "hf-llava", "--overwrite", str(tmp_path / "hf")]) == 0

    cnn_model, tok = make_model()
    cnn = save_checkpoint(cnn_model, tok, tmp_path / "cnn")
    assert main(["export", str(cnn), "--format", "hf-llava", str(tmp_path / "hf2")]) == 2
    err = capsys.readouterr().err
    assert "CNN" in err and VLMKIT_FORMAT in err
    with pytest.raises(SystemExit):
        main(["export", str(cnn), "--format", "gguf", str(tmp_path / "hf3")])


def test_an_exported_checkpoint_answers_the_same_through_the_hf_predictor(clip_ckpt, tmp_path):
    """``vlmkit eval --hf-model``: a Hugging Face LLaVA directory as a predictor. On the export
    of a vlmkit checkpoint it gives exactly the vlmkit predictor's greedy answers, in a batch
    that mixes one-image and text-only prompts."""
    from vlmkit.data.sample import ImageRef, Sample
    from vlmkit.infer.hf_llava import load_hf_llava_predictor
    from vlmkit.infer.predictor import load_predictor

    out = export_checkpoint(clip_ckpt, tmp_path / "hf")
    for k, (w, h) in enumerate([(40, 30), (32, 32), (25, 50)]):
        _image(w, h, k).save(tmp_path / f"im{k}.png")
    samples = [
        Sample(f"s{k}", [Turn("user", [Part(image=0), Part(text=f"w{k + 3} w{k + 7}")])], [ImageRef(path=f"im{k}.png")])
        for k in range(3)
    ] + [Sample("t", [Turn("user", [Part(text="w5 w6 w7")])])]
    ours, _ = load_predictor(clip_ckpt, image_root=tmp_path, max_new_tokens=6, device="cpu")
    theirs, info = load_hf_llava_predictor(out, image_root=tmp_path, max_new_tokens=6, device="cpu")
    expected = ours(samples)
    assert any(expected)  # the random model says something, so the comparison means something
    assert theirs(samples) == expected
    assert info["hf_model"] == str(out) and info["parameters"] > 0


def test_vlmkit_eval_hf_model_on_the_world(clip_ckpt, tmp_path, tiny_world):
    """The CLI path: ``vlmkit eval --hf-model EXPORT`` scores the same as the checkpoint itself."""
    from vlmkit.cli import main

    out = export_checkpoint(clip_ckpt, tmp_path / "hf")
    common = ["--data", str(tiny_world), "--limit", "4", "--batch-size", "4"]
    assert main(["eval", str(clip_ckpt), "--out", str(tmp_path / "ours"), *common]) == 0
    assert main(["eval", "--hf-model", str(out), "--out", str(tmp_path / "theirs"), *common]) == 0
    ours = json.loads((tmp_path / "ours" / "results.json").read_text())
    theirs = json.loads((tmp_path / "theirs" / "results.json").read_text())
    assert theirs["model"]["hf_model"] == str(out)
    assert {t: r["metrics"] for t, r in theirs["tasks"].items()} == {t: r["metrics"] for t, r in ours["tasks"].items()}
