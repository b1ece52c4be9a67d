"""Supervised encoder pre-training on the world's labels: targets, the saved HF directory, reuse,
and its place in a training run."""

import json

import pytest
import torch

from vlmkit.config import ConfigError, VisionConfig, recipe_from_dict
from vlmkit.models.checkpoint_io import load_checkpoint
from vlmkit.models.vision import build_vision_encoder
from vlmkit.train.encoder_pretrain import pretrain_encoder, token_targets, world_labels
from vlmkit.train.run import train
from conftest import tiny_recipe_dict


def test_targets_put_each_object_in_the_token_of_its_box_centre():
    labels = world_labels()
    scene = {
        "word": "cake",
        "objects": [
            # centre (0.625, 0.375): column 2, row 1 of a 4x4 grid -> token 6
            {"shape": "triangle", "color": "red", "size": "large", "box": [0.55, 0.30, 0.70, 0.45]},
            # centre (0.1, 0.9): column 0, row 3 -> token 12
            {"shape": "cross", "color": "blue", "size": "small", "box": [0.05, 0.85, 0.15, 0.95]},
        ],
    }
    t = token_targets(scene, 4, labels)
    assert labels.shapes[t["shape"][6]] == "triangle" and labels.colors[t["color"][6]] == "red"
    assert labels.sizes[t["size"][6]] == "large"
    assert labels.shapes[t["shape"][12]] == "cross" and labels.sizes[t["size"][12]] == "small"
    others = [k for k in range(16) if k not in (6, 12)]
    assert all(t["shape"][k] == 0 and t["color"][k] == 0 and t["size"][k] == 0 for k in others)
    assert labels.words[t["word"]] == "cake"
    # on a 2x2 grid both objects land in the quadrant of their centre: token 1 and token 2
    t2 = token_targets(scene, 2, labels)
    assert labels.shapes[t2["shape"][1]] == "triangle" and labels.shapes[t2["shape"][2]] == "cross"
    assert labels.words[token_targets({"word": None, "objects": []}, 4, labels)["word"]] == "none"


def test_pretrained_encoder_is_a_loadable_hf_directory_and_is_reused(tiny_world, tmp_path):
    out = tmp_path / "enc"
    acc = pretrain_encoder(tiny_world, out, VisionConfig(), steps=40, batch_size=8)
    assert set(acc) == {"shape", "color", "size", "word"} and all(0 <= v <= 1 for v in acc.values())
    # colour is a per-token linear read-out of a convnet: learned even in 40 steps of 24 images
    assert acc["color"] > 0.5
    loaded = build_vision_encoder(VisionConfig(name=str(out)))
    fresh = build_vision_encoder(VisionConfig())
    assert loaded.image_mean == fresh.image_mean == (0.5, 0.5, 0.5) and loaded.num_tokens == fresh.num_tokens
    x = torch.randn(2, 3, 64, 64)
    assert not torch.allclose(loaded(x), fresh(x))  # trained weights, not a fresh init

    weights = out / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert pretrain_encoder(tiny_world, out, VisionConfig(), steps=40, batch_size=8) == acc
    assert weights.stat().st_mtime_ns == before  # same settings: reused, not retrained
    pretrain_encoder(tiny_world, out, VisionConfig(), steps=41, batch_size=8)
    assert weights.stat().st_mtime_ns != before
    assert json.loads((out / "pretraining.json").read_text())["settings"]["steps"] == 41


def test_a_run_starts_from_the_pretrained_encoder(tiny_world, tmp_path):
    tree = tiny_recipe_dict(steps=1)
    tree["model"]["vision"]["pretrain"] = {"steps": 20, "batch_size": 8}
    tree["stages"] = [tree["stages"][0]]  # LLM only: the encoder keeps its pre-trained weights
    final = train(recipe_from_dict(tree), data_dir=tiny_world, out_dir=tmp_path / "run")
    model, _ = load_checkpoint(final)
    encoder = build_vision_encoder(VisionConfig(name=str(tmp_path / "run" / "encoder")))
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(model.vision(x), encoder(x))
    assert model.config.vision.pretrain is None and model.config.vision.name.endswith("encoder")


def test_pretraining_a_hub_encoder_is_refused(tiny_world, tmp_path):
    tree = tiny_recipe_dict(steps=1)
    tree["model"]["vision"] = {"name": str(tmp_path / "some-hf-dir"), "pretrain": {"steps": 5}}
    with pytest.raises(ConfigError, match="model.vision.pretrain"):
        train(recipe_from_dict(tree), data_dir=tiny_world, out_dir=tmp_path / "run")
