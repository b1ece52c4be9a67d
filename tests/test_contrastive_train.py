"""``vlmkit train`` on a recipe of kind contrastive: the VLM's loop, checkpoints, resume and
bad-input handling for a CLIP / SigLIP dual encoder; its evaluation, the clip-score service, and
its image tower inside a VLM."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from vlmkit.config import ConfigError, ContrastiveRecipe, Recipe, recipe_from_dict
from vlmkit.train.run import train

TEXT = {"name": "tiny-text", "max_length": 48, "tokenizer_vocab_size": 300,
        "overrides": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}}  # fmt: skip


def dual_recipe(steps: int = 6, loss: str = "clip", **stage) -> dict:
    return {
        "kind": "contrastive",
        "name": "dual-test",
        "model": {"vision": {"name": "tiny-cnn", "image_size": 64}, "text": TEXT, "embed_dim": 16, "loss": loss},
        "data": {"captions": {"path": "train.json", "tasks": ["caption"]}},
        "stages": [{"name": "contrastive", "kind": "contrastive", "objective": "contrastive",
                    "data": {"captions": 1.0}, "trainable": ["vision", "text", "*_proj.*", "logit_*"],
                    "lr": 3e-3, "batch_size": 8, "steps": steps, "warmup_steps": 1, "log_every": 1, **stage}],
        "train": {"tensorboard": False},
    }  # fmt: skip


def losses(run) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def dual_run(tiny_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("dual")
    final = train(recipe_from_dict(dual_recipe()), data_dir=tiny_world, out_dir=out)
    return out, final


def test_the_recipe_kind_picks_the_schema():
    assert isinstance(recipe_from_dict(dual_recipe()), ContrastiveRecipe)
    vlm = {"name": "v", "data": {"c": {"path": "train.json"}},
           "stages": [{"name": "s", "data": {"c": 1.0}, "trainable": ["llm"], "lr": 1e-3, "steps": 1}]}  # fmt: skip
    assert isinstance(recipe_from_dict(vlm), Recipe)
    with pytest.raises(ConfigError, match=r"stages\.0.*contrastive recipe's stages are contrastive"):
        recipe_from_dict(dual_recipe(), ["stages.0.objective=next_token", "stages.0.kind=null"])
    bad_vlm = json.loads(json.dumps(vlm))
    bad_vlm["stages"][0]["objective"] = "contrastive"
    with pytest.raises(ConfigError, match=r"kind: contrastive"):
        recipe_from_dict(bad_vlm)
    with pytest.raises(ConfigError, match=r"model\.loss"):
        recipe_from_dict(dual_recipe(loss="triplet"))


def test_training_logs_checkpoints_and_exports_the_image_tower(dual_run):
    from vlmkit.config import VisionConfig
    from vlmkit.models.contrastive import load_dual_encoder
    from vlmkit.models.vision import build_vision_encoder

    out, final = dual_run
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert all(r["n_targets"] == 8 and 0.0 <= r["i2t_acc"] <= 1.0 and r["logit_scale"] <= 100.0 for r in rows)
    assert (out / "checkpoints" / "step-000006" / "training_state").is_dir()
    model, tok = load_dual_encoder(final)
    assert tok is not None and (final / "recipe.yaml").exists()
    # the exported tower is the dual encoder's image encoder, loadable as a VLM's encoder
    tower = build_vision_encoder(VisionConfig(name=str(final / "image_tower"), image_size=64))
    px = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(tower(px), model.vision(px))


def test_resume_equals_an_uninterrupted_run(tiny_world, tmp_path, dual_run):
    out, _ = dual_run
    recipe = recipe_from_dict(dual_recipe())
    assert train(recipe, data_dir=tiny_world, out_dir=tmp_path, save_every=3, stop_after_steps=4) is None
    train(recipe, data_dir=tiny_world, out_dir=tmp_path, resume=True)
    assert losses(tmp_path) == pytest.approx(losses(out), abs=1e-6)


def test_a_corrupt_image_is_skipped_named_and_counted(tiny_world, tmp_path, capsys):
    world = tmp_path / "world"
    shutil.copytree(tiny_world, world)
    rows = json.loads((world / "train.json").read_text())
    caption_image = next(r["image"] for r in rows if r.get("meta", {}).get("task") == "caption")
    (world / caption_image).write_bytes(b"not a png")
    recipe = recipe_from_dict(dual_recipe(steps=4), ["train.max_bad_fraction=0.5"])
    assert train(recipe, data_dir=world, out_dir=tmp_path / "run") is not None
    printed = capsys.readouterr().out
    assert "bad samples:" in printed and "none bad" not in printed


def test_eval_of_a_dual_encoder_reports_zero_shot_and_retrieval(dual_run, tiny_world, tmp_path):
    from vlmkit.cli import main

    _, final = dual_run
    assert main(["eval", str(final), "--data", str(tiny_world), "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    # the single-object held-out scenes, counted from test.json independently
    scenes = {r["image"]: r["meta"]["scene"] for r in json.loads((tiny_world / "test.json").read_text())
              if r.get("image") and r.get("meta", {}).get("scene")}  # fmt: skip
    zs = res["tasks"]["shapes_zeroshot"]["metrics"]
    assert zs["n"] == sum(len(s["objects"]) == 1 for s in scenes.values())
    assert zs["top1"] == pytest.approx((zs["by_attribute"]["shape"]["top1"] + zs["by_attribute"]["color"]["top1"]) / 2)
    assert zs["by_attribute"]["color"]["n_classes"] == 6 and "a red {}." in zs["by_attribute"]["shape"]["templates"]
    rt = res["tasks"]["shapes_retrieval"]["metrics"]
    assert rt["n_images"] == len(scenes) and rt["n_texts"] == 2 * len(scenes)


def test_clip_score_service_and_command(dual_run, tiny_world, tmp_path):
    import vlmkit
    from vlmkit.cli import main

    _, final = dual_run
    rows = [r for r in json.loads((tiny_world / "test.json").read_text()) if r.get("meta", {}).get("task") == "caption"][:3]
    rows.append({"id": "no-image", "conversations": [{"from": "human", "value": "Describe."},
                                                      {"from": "gpt", "value": "a red circle."}]})  # fmt: skip
    data = tiny_world / "clip_rows.json"
    data.write_text(json.dumps(rows))
    out = tmp_path / "scores.jsonl"
    assert main(["clip-score", str(final), "--data", str(data), "--out", str(out), "--max-bad-fraction", "0.5"]) == 0
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in scored] == [r["id"] for r in rows]
    assert "error" in scored[-1] and all("clip_score" in r for r in scored[:3])
    # the same number through the Python API: the cosine of the pair's embeddings
    model = vlmkit.load_dual_encoder(final)
    caption = rows[0]["conversations"][-1]["value"]
    img = vlmkit.embed_images(model, [rows[0]["image"]], root=tiny_world)
    txt = vlmkit.embed_texts(model, [caption])
    assert scored[0]["clip_score"] == pytest.approx(float((img * txt).sum()), abs=1e-5)
    assert float(vlmkit.clip_score(model, [rows[0]["image"]], [caption], root=tiny_world)[0]) == pytest.approx(
        scored[0]["clip_score"], abs=1e-5)
    assert torch.allclose(img.norm(dim=1), torch.ones(1), atol=1e-5)


def test_a_vlm_recipe_can_pretrain_its_encoder_contrastively(tiny_world, tmp_path):
    """model.vision.pretrain.method: contrastive trains a dual encoder first (in OUT/encoder) and
    the VLM starts from its image tower; a stage that doesn't train the encoder keeps it."""
    from conftest import tiny_recipe_dict
    from vlmkit.models.checkpoint_io import load_checkpoint
    from vlmkit.models.contrastive import load_dual_encoder

    tree = tiny_recipe_dict(steps=1)
    tree["model"]["vision"]["pretrain"] = {"method": "contrastive", "steps": 2, "batch_size": 4}
    tree["stages"] = tree["stages"][:1]  # lm_warmup: the encoder is not trained
    final = train(recipe_from_dict(tree), data_dir=tiny_world, out_dir=tmp_path)
    dual, _ = load_dual_encoder(tmp_path / "encoder" / "final")
    vlm, _ = load_checkpoint(final)
    assert vlm.config.vision.name == str(tmp_path / "encoder" / "final" / "image_tower")
    for (name, a), (_, b) in zip(dual.vision.state_dict().items(), vlm.vision.state_dict().items()):
        assert torch.equal(a, b), name


# ------------------------------------------------------------------ hard negatives (NegCLIP)


def test_clip_and_siglip_losses_with_hard_negatives_by_hand():
    import math

    from vlmkit.train.contrastive_losses import clip_loss, siglip_loss

    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    neg = torch.tensor([[0.8, 0.6], [1.0, 0.0]])
    t = 2.0
    # image 0: texts 0.6, 0.0; negatives 0.8 (own), 1.0 (row 1's); image 1: texts 0.8, 1.0; negatives 0.6, 0.0
    i2t = [-t * 0.6 + math.log(sum(math.exp(t * v) for v in (0.6, 0.0, 0.8, 1.0))),
           -t * 1.0 + math.log(sum(math.exp(t * v) for v in (0.8, 1.0, 0.6, 0.0)))]  # fmt: skip
    # text -> image is unchanged: text 0 against images (0.6, 0.8), text 1 against (0.0, 1.0)
    t2i = [-t * 0.6 + math.log(math.exp(t * 0.6) + math.exp(t * 0.8)),
           -t * 1.0 + math.log(math.exp(t * 0.0) + math.exp(t * 1.0))]  # fmt: skip
    expected = sum(0.5 * (a + b) for a, b in zip(i2t, t2i)) / 2
    assert float(clip_loss(img, txt, t, negatives=neg)) == pytest.approx(expected, rel=1e-6)
    # a row without a negative: its column is left out of every image's softmax
    masked = [-t * 0.6 + math.log(sum(math.exp(t * v) for v in (0.6, 0.0, 0.8))),
              -t * 1.0 + math.log(sum(math.exp(t * v) for v in (0.8, 1.0, 0.6)))]  # fmt: skip
    got = clip_loss(img, txt, t, negatives=neg, negative_mask=torch.tensor([True, False]))
    assert float(got) == pytest.approx(sum(0.5 * (a + b) for a, b in zip(masked, t2i)) / 2, rel=1e-6)
    # SigLIP: every image against every hard negative is one more negative pair
    b = -1.0
    plain = float(siglip_loss(img, txt, t, b))
    extra = sum(-math.log(1 / (1 + math.exp(t * s + b))) for s in (0.8, 1.0, 0.6, 0.0)) / 2
    assert float(siglip_loss(img, txt, t, b, negatives=neg)) == pytest.approx(plain + extra, rel=1e-6)


def test_a_hard_negative_caption_changes_one_attribute_in_the_same_style(tiny_world):
    from vlmkit.data.formats.llava import read_llava
    from vlmkit.data.worlds.shapes import COLORS, SHAPES
    from vlmkit.train.contrastive_run import hard_negative_captions, pair_of

    samples = [s for s in read_llava(tiny_world / "train.json", root=tiny_world) if s.meta.get("task") == "caption"]
    for sample in samples:
        _, caption = pair_of(sample)
        negatives = hard_negative_captions(sample, caption, ["shape", "color"], k=3)
        assert len(negatives) == 3 and len(set(negatives)) == 3 and caption not in negatives
        assert negatives == hard_negative_captions(sample, caption, ["shape", "color"], k=3)  # the same every draw
        assert hard_negative_captions(sample, caption, ["shape", "color"], k=1) == negatives[:1]
        for negative in negatives:
            words, changed = caption.split(), negative.split()
            assert len(words) == len(changed)  # the same style: only a word differs (a/an may follow it)
            diff = [(a, b) for a, b in zip(words, changed) if a != b and a not in ("a", "an")]
            assert len(diff) == 1 and {w.strip(",.") for w in diff[0]} <= set(SHAPES) | set(COLORS)


def test_k_hard_negatives_per_caption_fill_k_masked_slots_per_row():
    """Rows with fewer negatives than the widest row get padded slots that the loss skips."""
    from vlmkit.train.contrastive_run import CaptionTokens
    from vlmkit.train.objectives import ContrastiveObjective

    px = [torch.zeros(3, 8, 8)]
    items = [(CaptionTokens([5, 6], "a", [[7], [8, 9]]), px), (CaptionTokens([5], "b", [[10]]), px),
             (CaptionTokens([6], "c", []), px)]  # fmt: skip
    batch = ContrastiveObjective("clip").collate(items, None, pad_id=0)
    assert batch["negative_input_ids"].tolist() == [[7, 0], [8, 9], [10, 0], [0, 0], [0, 0], [0, 0]]
    assert batch["negative_mask"].tolist() == [True, True, True, False, False, False]


def test_training_with_hard_negatives_feeds_them_to_the_loss(tiny_world, tmp_path):
    from vlmkit.models.contrastive import load_dual_encoder
    from vlmkit.train.contrastive_run import make_pair_encoder
    from vlmkit.train.objectives import ContrastiveObjective
    from vlmkit.config import ContrastiveStageConfig
    from vlmkit.data.formats.llava import read_llava

    recipe = recipe_from_dict(dual_recipe(steps=2), ["stages.0.contrastive.hard_negatives=true"])
    final = train(recipe, data_dir=tiny_world, out_dir=tmp_path)
    model, tok = load_dual_encoder(final)
    samples = [s for s in read_llava(tiny_world / "train.json", root=tiny_world) if s.meta.get("task") == "caption"][:3]
    objective = ContrastiveObjective("clip")
    losses = []
    for k in (1, 2):
        options = ContrastiveStageConfig(hard_negatives=True, negatives_per_caption=k)
        encode = make_pair_encoder(tok, model.image_processor(), 48, options)
        batch = objective.collate([encode(s, tiny_world) for s in samples], None, tok.pad_token_id)
        assert batch["negative_input_ids"].shape[0] == 3 * k and bool(batch["negative_mask"].all())
        with torch.no_grad():
            with_negatives, n, _ = objective.loss_sum(model, batch)
            plain = {key: v for key, v in batch.items() if not key.startswith("negative")}
            without, _, _ = objective.loss_sum(model, plain)
        assert n == 3 and float(with_negatives) > float(without)  # more negatives: a larger softmax denominator
        losses.append(float(with_negatives))
    assert losses[1] > losses[0]
