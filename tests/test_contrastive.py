"""CLIP / SigLIP dual encoders: the losses against hand-computed numbers, the temperature, the
towers (tiny-cnn, tiny-vit, tiny-text, an HF text encoder loaded by path), save / load,
exporting the image tower to a VLM, zero-shot classification and retrieval recall."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image

from vlmkit.config import VisionConfig
from vlmkit.eval.metrics.retrieval import retrieval_ranks, retrieval_recall
from vlmkit.eval.zeroshot import class_embeddings, format_prompt, topk_accuracy, zero_shot_classify
from vlmkit.models.contrastive import (
    MAX_LOGIT_SCALE,
    DualEncoderConfig,
    DualEncoderError,
    TextTowerConfig,
    build_dual_encoder,
    build_text_tokenizer,
    export_image_tower,
    load_dual_encoder,
    pool_text,
    save_dual_encoder,
    tokenize_texts,
)
from vlmkit.models.vision import build_vision_encoder
from vlmkit.train.contrastive_losses import clip_loss, dual_encoder_loss, in_batch_accuracy, siglip_loss


pytestmark = pytest.mark.usefixtures("one_thread")

# ---------------------------------------------------------------------- hand-computed losses

# similarity[i][j] = image i . text j
S = [[0.9, 0.1, -0.2],
     [0.3, 0.8, 0.0],
     [-0.1, 0.4, 0.7]]  # fmt: skip


def _pair_from_similarity(sim):
    """img = identity, txt = sim^T, so img @ txt.T == sim exactly."""
    s = torch.tensor(sim, dtype=torch.float64)
    return torch.eye(s.shape[0], dtype=torch.float64), s.T.contiguous()


def test_clip_loss_matches_a_hand_computed_3x3_case():
    t = 2.0
    n = 3
    rows = [-math.log(math.exp(t * S[i][i]) / sum(math.exp(t * S[i][j]) for j in range(n))) for i in range(n)]
    cols = [-math.log(math.exp(t * S[j][j]) / sum(math.exp(t * S[i][j]) for i in range(n))) for j in range(n)]
    expected = 0.5 * (sum(rows) / n + sum(cols) / n)
    img, txt = _pair_from_similarity(S)
    assert torch.allclose(img @ txt.T, torch.tensor(S, dtype=torch.float64))
    got = clip_loss(img, txt, torch.tensor(t, dtype=torch.float64))
    assert got.item() == pytest.approx(expected, rel=1e-12)
    # "sum" returns the per-row terms' sum: n times the mean
    assert clip_loss(img, txt, t, reduction="sum").item() == pytest.approx(n * expected, rel=1e-12)


def test_clip_loss_is_symmetric_in_images_and_texts():
    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(5, 8, dtype=torch.float64), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(5, 8, dtype=torch.float64), dim=-1)
    a = clip_loss(img, txt, 7.0)
    b = clip_loss(txt, img, 7.0)
    assert a.item() == pytest.approx(b.item(), rel=1e-12)


def test_siglip_loss_matches_a_hand_computed_3x3_case():
    t, b = 5.0, -2.0
    n = 3

    def log_sigmoid(x):
        return -math.log(1.0 + math.exp(-x))

    total = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            total += log_sigmoid(z * (t * S[i][j] + b))
    expected = -total / n  # summed over all 9 pairs, divided by the batch size (not by 9)
    img, txt = _pair_from_similarity(S)
    got = siglip_loss(img, txt, torch.tensor(t, dtype=torch.float64), torch.tensor(b, dtype=torch.float64))
    assert got.item() == pytest.approx(expected, rel=1e-12)
    assert siglip_loss(img, txt, t, b, reduction="sum").item() == pytest.approx(n * expected, rel=1e-12)


def test_losses_reject_mismatched_shapes_and_reductions():
    with pytest.raises(ValueError, match="same shape"):
        clip_loss(torch.zeros(3, 4), torch.zeros(2, 4), 1.0)
    with pytest.raises(ValueError, match="reduction"):
        clip_loss(torch.zeros(3, 4), torch.zeros(3, 4), 1.0, reduction="avg")


def test_in_batch_accuracy():
    img, txt = _pair_from_similarity(S)
    assert in_batch_accuracy(img, txt) == {"i2t_acc": 1.0, "t2i_acc": 1.0}
    swapped = [S[1], S[0], S[2]]  # image 0 now best matches text 1 and vice versa
    img, txt = _pair_from_similarity(swapped)
    acc = in_batch_accuracy(img, txt)
    assert acc["i2t_acc"] == pytest.approx(1 / 3)


# ---------------------------------------------------------------------- models

TEXTS = [
    "a red circle.", "a blue square and a green triangle.", "an orange hexagon.", "a purple diamond.",
    "a yellow cross and a red square.", "a green circle.",
]  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer():
    return build_text_tokenizer(TextTowerConfig(tokenizer_vocab_size=300), TEXTS * 5)


def _cfg(vision="tiny-cnn", loss="clip", pooling="eos", size=32, **kw):
    return DualEncoderConfig(vision=VisionConfig(name=vision, image_size=size), loss=loss,
                             text=TextTowerConfig(pooling=pooling, max_length=32), embed_dim=16, **kw)  # fmt: skip


def _pixels(n, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


def test_init_values_of_both_losses(tokenizer):
    clip = build_dual_encoder(_cfg(loss="clip"), tokenizer)
    assert clip.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert clip.logit_bias is None
    siglip = build_dual_encoder(_cfg(loss="siglip"), tokenizer)
    assert siglip.logit_scale.item() == pytest.approx(math.log(10.0))
    assert siglip.scale().item() == pytest.approx(10.0)
    assert siglip.logit_bias.item() == pytest.approx(-10.0)
    custom = build_dual_encoder(_cfg(loss="siglip", init_logit_scale=0.0, init_logit_bias=-3.0), tokenizer)
    assert (custom.logit_scale.item(), custom.logit_bias.item()) == (0.0, -3.0)
    with pytest.raises(ValueError, match="only the siglip loss"):
        _cfg(loss="clip", init_logit_bias=-10.0)
    with pytest.raises(ValueError, match="is a log"):
        _cfg(init_logit_scale=1 / 0.07)  # a scale given where the log is expected


def test_temperature_is_clamped_to_100(tokenizer):
    model = build_dual_encoder(_cfg(), tokenizer)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1000.0))
    assert model.scale().item() == pytest.approx(MAX_LOGIT_SCALE)
    batch = {"pixel_values": _pixels(3), **tokenize_texts(tokenizer, TEXTS[:3], 32)}
    out = model(**batch)
    assert out["logit_scale"].item() == pytest.approx(MAX_LOGIT_SCALE)
    # above the cap the clamp passes no gradient to the parameter ...
    dual_encoder_loss(out, "clip").backward()
    assert model.logit_scale.grad.item() == 0.0
    # ... so the trainer puts the stored value back under the cap after its optimizer step
    model.clamp_logit_scale_()
    assert model.logit_scale.item() == pytest.approx(math.log(MAX_LOGIT_SCALE))
    # below the cap the gradient flows
    model.zero_grad()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(20.0))
    dual_encoder_loss(model(**batch), "clip").backward()
    assert model.logit_scale.grad.item() != 0.0


@pytest.mark.parametrize("vision", ["tiny-cnn", "tiny-vit"])
@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_towers_give_unit_embeddings_and_a_finite_loss(tokenizer, vision, loss):
    torch.manual_seed(0)
    model = build_dual_encoder(_cfg(vision, loss), tokenizer)
    batch = {"pixel_values": _pixels(4), **tokenize_texts(tokenizer, TEXTS[:4], 32)}
    out = model(**batch)
    for key in ("image_embeds", "text_embeds"):
        assert out[key].shape == (4, 16)
        torch.testing.assert_close(out[key].norm(dim=-1), torch.ones(4))
    value = dual_encoder_loss(out, loss)
    assert torch.isfinite(value)
    value.backward()
    assert model.image_proj.weight.grad is not None and model.text_proj.weight.grad is not None
    first = next(model.vision.model.parameters())  # the stem: the gradient reaches the whole tower
    assert first.grad is not None and first.grad.abs().sum() > 0


@pytest.mark.parametrize("pooling", ["mean", "eos", "cls"])
def test_length_buckets_give_the_same_embeddings_and_gradients(tokenizer, pooling):
    """Texts of very different lengths encoded in 3 length groups, each cut to its own longest
    text, against one batch padded to the longest of all."""
    torch.manual_seed(0)
    model = build_dual_encoder(_cfg(pooling=pooling), tokenizer)
    texts = [TEXTS[1] * 3, "a red circle.", TEXTS[4], "a green circle.", TEXTS[1] * 2, TEXTS[3], TEXTS[0] * 2]
    batch = tokenize_texts(tokenizer, texts, 32)
    grads = []
    for buckets in (1, 3):
        model.zero_grad()
        emb = model.encode_text(batch["input_ids"], batch["attention_mask"], buckets=buckets)
        (emb * torch.arange(emb.numel()).view_as(emb)).sum().backward()  # weighs each row differently
        grads.append(model.text_proj.weight.grad.clone())
        if buckets == 1:
            whole = emb.detach()
    torch.testing.assert_close(emb.detach(), whole, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-3, atol=1e-5)  # float noise of other sums


def test_tokenize_appends_eos_and_keeps_it_when_truncating(tokenizer):
    batch = tokenize_texts(tokenizer, ["a red circle.", TEXTS[1] * 4], max_length=10)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape[1] == 10
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    short = int(mask[0].sum())
    assert ids[0, short - 1] == eos and (ids[0, short:] == pad).all()
    assert mask[1].all() and ids[1, -1] == eos


def test_pooling():
    hidden = torch.arange(2 * 3 * 1, dtype=torch.float32).view(2, 3, 1)  # row 0: 0,1,2; row 1: 3,4,5
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert pool_text(hidden, mask, "cls").flatten().tolist() == [0.0, 3.0]
    assert pool_text(hidden, mask, "mean").flatten().tolist() == [0.5, 4.0]
    assert pool_text(hidden, mask, "eos").flatten().tolist() == [1.0, 5.0]


def test_a_cnn_dual_encoder_learns_colours_quickly(tokenizer):
    """Solid-colour images and their colour names: a few dozen CLIP steps separate them."""
    torch.manual_seed(0)
    colours = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 90, 230), "yellow": (240, 210, 30)}
    names = list(colours)
    cfg = DualEncoderConfig(vision=VisionConfig(name="tiny-cnn", image_size=32), embed_dim=16,
                            text=TextTowerConfig(pooling="mean", max_length=16,
                                                 overrides={"hidden_size": 32, "num_hidden_layers": 1,
                                                            "intermediate_size": 64, "num_attention_heads": 2}))  # fmt: skip
    model = build_dual_encoder(cfg, tokenizer)
    processor = model.image_processor()
    rng = torch.Generator().manual_seed(1)

    def image(name):
        base = torch.tensor(colours[name], dtype=torch.float32).view(1, 1, 3)
        noisy = (base + 20 * torch.randn(32, 32, 3, generator=rng)).clamp(0, 255).to(torch.uint8)
        return Image.fromarray(noisy.numpy(), "RGB")

    pool = {n: [processor(image(n)) for _ in range(6)] for n in names}  # processed once
    texts = tokenize_texts(tokenizer, [f"a {n} square." for n in names], 16)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(30):
        pixels = torch.stack([pool[n][step % 6] for n in names])
        loss = dual_encoder_loss(model(pixels, **texts), "clip")
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.clamp_logit_scale_()
    pairs = [(image(n), n) for n in names for _ in range(3)]  # unseen noise
    result = zero_shot_classify(model, tokenizer, pairs, names, templates=("a {} square.",))
    assert result["top1"] >= 0.9, result


# ---------------------------------------------------------------------- save / load / export


@pytest.mark.parametrize("vision,loss", [("tiny-cnn", "siglip"), ("tiny-vit", "clip")])
def test_save_load_round_trip_gives_identical_embeddings(tokenizer, tmp_path, vision, loss):
    torch.manual_seed(0)
    model = build_dual_encoder(_cfg(vision, loss), tokenizer)
    with torch.no_grad():
        model.logit_scale.fill_(1.5)
    model.eval()
    path = save_dual_encoder(model, tokenizer, tmp_path / "clip")
    assert sorted(p.name for p in path.iterdir() if p.name in ("config.json", "model.safetensors")) == [
        "config.json", "model.safetensors"]  # fmt: skip
    assert json.loads((path / "config.json").read_text())["format"] == "vlmkit-dual-encoder"
    assert not list(tmp_path.glob(".*tmp"))  # written atomically: no temporary left behind
    loaded, tok = load_dual_encoder(path)
    assert loaded.config == model.config
    px = _pixels(3)
    batch = tokenize_texts(tok, TEXTS[:3], 32)
    torch.testing.assert_close(batch["input_ids"], tokenize_texts(tokenizer, TEXTS[:3], 32)["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(px), model.encode_image(px), rtol=0, atol=0)
        torch.testing.assert_close(loaded.encode_text(**batch), model.encode_text(**batch), rtol=0, atol=0)
    assert loaded.scale().item() == pytest.approx(math.exp(1.5))
    if loss == "siglip":
        assert loaded.logit_bias.item() == pytest.approx(-10.0)


def test_load_refuses_other_directories(tmp_path):
    with pytest.raises(DualEncoderError, match="no config.json"):
        load_dual_encoder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(DualEncoderError, match="format is None"):
        load_dual_encoder(tmp_path)


@pytest.mark.parametrize("vision", ["tiny-cnn", "tiny-vit"])
def test_exported_image_tower_loads_into_a_vlm_encoder(tokenizer, tmp_path, vision):
    torch.manual_seed(0)
    model = build_dual_encoder(_cfg(vision, size=64), tokenizer)
    with torch.no_grad():  # make sure trained-looking weights travel (not a fresh init)
        for p in model.vision.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.eval()
    out = export_image_tower(model, tmp_path / "encoder")
    stats = json.loads((out / "preprocessor_config.json").read_text())
    assert stats["image_mean"] == [0.5, 0.5, 0.5] and stats["size"] == {"height": 64, "width": 64}
    enc = build_vision_encoder(VisionConfig(name=str(out), image_size=64))  # the VLM's loading path
    enc.eval()
    assert enc.family == model.vision.family and enc.num_tokens == model.vision.num_tokens
    assert enc.feature_layer == model.vision.feature_layer
    px = _pixels(2, 64)
    with torch.no_grad():
        torch.testing.assert_close(enc(px), model.vision(px), rtol=0, atol=0)


# ---------------------------------------------------------------------- an HF text encoder by path


def _save_tiny_bert(path):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = sorted({w.strip(".") for t in TEXTS for w in t.split()} | {"photo", "of", "an", "object", "image"})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", *words]
    path.mkdir(parents=True)
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab_file=str(path / "vocab.txt"))
    torch.manual_seed(3)
    bert = BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=64))  # fmt: skip
    bert.save_pretrained(path)
    tok.save_pretrained(path)
    return bert


def test_hf_text_encoder_by_path(tmp_path):
    bert = _save_tiny_bert(tmp_path / "bert")
    cfg = DualEncoderConfig(vision=VisionConfig(name="tiny-cnn", image_size=32),
                            text=TextTowerConfig(name=str(tmp_path / "bert"), pooling="cls"), embed_dim=16)  # fmt: skip
    tok = build_text_tokenizer(cfg.text)
    model = build_dual_encoder(cfg, tok)
    model.eval()
    bert.eval()
    # the pretrained weights were loaded, not a fresh init
    torch.testing.assert_close(model.text.embeddings.word_embeddings.weight, bert.embeddings.word_embeddings.weight)
    batch = tokenize_texts(tok, TEXTS[:2], 16)
    assert batch["input_ids"][0, 0] == tok.cls_token_id  # BERT adds its own [CLS] .. [SEP]
    assert batch["input_ids"][0, int(batch["attention_mask"][0].sum()) - 1] == tok.sep_token_id
    with torch.no_grad():
        hidden = bert(**batch).last_hidden_state[:, 0]
        expected = torch.nn.functional.normalize(model.text_proj(hidden), dim=-1)
        torch.testing.assert_close(model.encode_text(**batch), expected)
    # and the saved dual encoder rebuilds the BERT tower from its config alone
    path = save_dual_encoder(model, tok, tmp_path / "dual")
    loaded, loaded_tok = load_dual_encoder(path)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_text(**batch), model.encode_text(**batch), rtol=0, atol=0)
    assert loaded_tok.cls_token_id == tok.cls_token_id


# ---------------------------------------------------------------------- retrieval


def test_retrieval_recall_with_several_captions_per_image():
    # 3 images, 5 captions: captions 0, 1 are image 0's; 2 is image 1's; 3, 4 are image 2's
    sim = [[0.9, 0.2, 0.8, 0.1, 0.0],
           [0.5, 0.4, 0.3, 0.6, 0.1],
           [0.1, 0.7, 0.2, 0.3, 0.6]]  # fmt: skip
    owner = [0, 0, 1, 2, 2]
    # image -> text, rank of the best own caption among the wrong ones:
    #   image 0: caption 0 (0.9) is first -> 0; image 1: caption 2 (0.3) has 0.5, 0.4, 0.6 above -> 3;
    #   image 2: caption 4 (0.6) has 0.7 above -> 1
    # text -> image, rank of the own image: t0 0.9 first -> 0; t1 0.2 under 0.4, 0.7 -> 2;
    #   t2 0.3 under 0.8 -> 1; t3 0.3 under 0.6 -> 1; t4 0.6 first -> 0
    i2t, t2i = retrieval_ranks(sim, owner)
    assert i2t.tolist() == [0, 3, 1]
    assert t2i.tolist() == [0, 2, 1, 1, 0]
    r = retrieval_recall(sim, owner, ks=(1, 2, 5))
    assert r["i2t_r@1"] == pytest.approx(1 / 3)
    assert r["i2t_r@2"] == pytest.approx(2 / 3)
    assert r["i2t_r@5"] == 1.0
    assert r["t2i_r@1"] == pytest.approx(2 / 5)
    assert r["t2i_r@2"] == pytest.approx(4 / 5)
    assert r["t2i_r@5"] == 1.0
    assert r["mean_recall"] == pytest.approx((1 / 3 + 2 / 3 + 1 + 2 / 5 + 4 / 5 + 1) / 6)
    assert (r["n_images"], r["n_texts"]) == (3, 5)
    assert set(retrieval_recall(sim, owner)) >= {"i2t_r@1", "i2t_r@5", "i2t_r@10", "t2i_r@10"}


def test_retrieval_ties_count_against_the_query():
    flat = torch.zeros(3, 3)
    r = retrieval_recall(flat, [0, 1, 2], ks=(1, 3))
    assert r["i2t_r@1"] == 0.0 and r["t2i_r@1"] == 0.0
    assert r["i2t_r@3"] == 1.0  # 2 wrong candidates tie: rank 2 < 3


def test_retrieval_rejects_images_without_captions():
    with pytest.raises(ValueError, match="no caption"):
        retrieval_recall(torch.zeros(2, 2), [0, 0])


# ---------------------------------------------------------------------- zero-shot

CLASSES = ["red circle", "blue square", "green triangle", "orange hexagon"]


class OneHotEncoder(torch.nn.Module):
    """A fake dual encoder: an image ``[3, S, S]`` filled with the value c embeds as one-hot(c);
    a text embeds as one-hot of the class named in it, plus a template-specific direction when
    ``template_offset`` (to test the prompt averaging)."""

    def __init__(self, tokenizer, template_offset=False):
        super().__init__()
        self.tokenizer, self.template_offset = tokenizer, template_offset

    def encode_image(self, pixel_values):
        c = pixel_values[:, 0, 0, 0].round().long()
        return torch.nn.functional.one_hot(c, len(CLASSES) + 1).float()

    def encode_text(self, input_ids, attention_mask):
        out = []
        for text in self.tokenizer.batch_decode(input_ids, skip_special_tokens=True):
            v = torch.zeros(len(CLASSES) + 1)
            v[next(i for i, c in enumerate(CLASSES) if c in text)] = 1.0
            if self.template_offset and "photo" in text:
                v = torch.zeros(len(CLASSES) + 1)
                v[-1] = 1.0
            out.append(v)
        return torch.stack(out)


@pytest.fixture(scope="module")
def prompt_tokenizer():
    from vlmkit.eval.zeroshot import DEFAULT_TEMPLATES

    prompts = [format_prompt(t, c) for c in CLASSES for t in DEFAULT_TEMPLATES]
    return build_text_tokenizer(TextTowerConfig(tokenizer_vocab_size=200), prompts * 3)


def test_prompt_templates_take_the_right_article():
    assert format_prompt("a photo of {article} {}.", "orange hexagon") == "a photo of an orange hexagon."
    assert format_prompt("{article} {} object.", "red circle") == "a red circle object."


def test_class_embedding_is_the_normalised_mean_of_normalised_prompts(prompt_tokenizer):
    fake = OneHotEncoder(prompt_tokenizer, template_offset=True)
    emb = class_embeddings(fake, prompt_tokenizer, CLASSES[:2], templates=("{article} {}.", "a photo of {article} {}."))
    # template 0 -> one-hot(class), template 1 -> one-hot(last): mean (0.5, 0.5), normalised 1/sqrt(2) each
    h = 1 / math.sqrt(2)
    torch.testing.assert_close(emb, torch.tensor([[h, 0, 0, 0, h], [0, h, 0, 0, h]]))


def test_zero_shot_on_a_toy_set_with_a_known_answer(prompt_tokenizer):
    fake = OneHotEncoder(prompt_tokenizer)

    def image(c):
        return torch.full((3, 4, 4), float(c))

    # the images "look like" classes 0, 1, 2, 3, 0; their labels are 0, 1, 2, 0 and "blue square" (1)
    pairs = [(image(0), 0), (image(1), 1), (image(2), "green triangle"), (image(3), 0), (image(0), "blue square")]
    result = zero_shot_classify(fake, prompt_tokenizer, pairs, CLASSES, batch_size=2)
    assert result["top1"] == pytest.approx(3 / 5)
    assert result["top5"] == 1.0  # capped at the 4 classes
    assert result["predictions"] == [0, 1, 2, 3, 0]
    assert (result["n"], result["n_classes"]) == (5, 4)


def test_topk_accuracy():
    logits = torch.tensor([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05], [0.2, 0.3, 0.5]])
    labels = [2, 0, 0]  # ranks: row 0 second, row 1 first, row 2 third
    acc = topk_accuracy(logits, labels, ks=(1, 2, 5))
    assert acc == {"top1": pytest.approx(1 / 3), "top2": pytest.approx(2 / 3), "top5": 1.0}


def test_zero_shot_runs_a_real_dual_encoder_on_pil_images(tokenizer):
    from vlmkit.data.worlds.shapes import make_scene, render_scene
    import random

    model = build_dual_encoder(_cfg("tiny-cnn", "siglip", size=64), tokenizer)
    rng = random.Random(0)
    pairs = []
    for _ in range(4):
        scene = make_scene(rng, 64)
        pairs.append((render_scene(scene), scene["objects"][0]["shape"]))
    shapes = sorted({s for _, s in pairs} | {"circle", "square"})
    result = zero_shot_classify(model, tokenizer, pairs, shapes, batch_size=3)
    assert 0.0 <= result["top1"] <= result["top5"] <= 1.0 and result["n"] == 4
    assert model.training  # restored after the evaluation
