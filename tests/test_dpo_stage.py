"""A DPO stage through the real trainer: rewards separate, the reference survives a resume."""

from __future__ import annotations

import pytest

from conftest import tiny_recipe_dict
from vlmkit.config import ConfigError, recipe_from_dict
from vlmkit.train.run import train
from vlmkit.utils.io import read_jsonl


def dpo_recipe(steps: int = 8, **dpo) -> dict:
    tree = tiny_recipe_dict(steps=2)
    tree["data"]["prefs"] = {"path": "preference_train.json", "format": "llava-preference"}
    tree["stages"] = [tree["stages"][2], {
        "name": "dpo", "objective": "dpo", "dpo": {"beta": 0.5, **dpo}, "data": {"prefs": 1.0},
        "trainable": ["connector", "llm"], "lr": 3e-3, "batch_size": 4, "grad_accum": 2,
        "steps": steps, "warmup_steps": 0, "schedule": "constant", "log_every": 1,
    }]  # fmt: skip
    return tree


def test_chosen_reward_rises_above_rejected(tiny_world, tmp_path):
    out = tmp_path / "run"
    train(recipe_from_dict(dpo_recipe()), data_dir=tiny_world, out_dir=out)
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if r["stage"] == "dpo"]
    assert rows[0]["n_targets"] == 8  # pairs per step
    first, last = rows[0], rows[-1]
    # at the first step the policy is the reference: every reward is 0, loss log 2
    assert first["reward_chosen"] == pytest.approx(0.0, abs=1e-5)
    assert first["loss"] == pytest.approx(0.6931, abs=1e-3)
    assert last["reward_chosen"] > last["reward_rejected"]
    assert last["reward_accuracy"] > 0.5 and last["loss"] < first["loss"]
    assert (out / "reference-dpo.safetensors").exists()


def test_reference_free_variant_runs(tiny_world, tmp_path):
    out = tmp_path / "free"
    train(recipe_from_dict(dpo_recipe(steps=3, reference_free=True)), data_dir=tiny_world, out_dir=out)
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if r["stage"] == "dpo"]
    assert len(rows) == 3 and not (out / "reference-dpo.safetensors").exists()
    # without a reference the rewards are beta * log-probs: negative from the start
    assert rows[0]["reward_chosen"] < 0


def test_resume_mid_dpo_equals_uninterrupted(tiny_world, tmp_path):
    recipe = recipe_from_dict(dpo_recipe(steps=4))
    full = tmp_path / "full"
    train(recipe, data_dir=tiny_world, out_dir=full)
    killed = tmp_path / "killed"
    assert train(recipe, data_dir=tiny_world, out_dir=killed, save_every=2, stop_after_steps=5) is None
    train(recipe, data_dir=tiny_world, out_dir=killed, save_every=2, resume=True)
    a = {r["step"]: r["loss"] for r in read_jsonl(full / "metrics.jsonl")}
    b = {r["step"]: r["loss"] for r in read_jsonl(killed / "metrics.jsonl")}
    assert a == b  # bitwise, the DPO steps after the resume included


def test_dpo_stage_needs_preference_sources():
    tree = dpo_recipe()
    tree["stages"][1]["data"] = {"text": 1.0}
    with pytest.raises(ConfigError, match="llava-preference"):
        recipe_from_dict(tree)
