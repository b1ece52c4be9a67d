"""`vlmkit ablate`: shared parts trained once, variants on top of them, a resumable table."""

from __future__ import annotations

import pytest

from vlmkit.ablate import load_ablation, run_ablation, variant_recipe
from vlmkit.config import ConfigError
from vlmkit.models.checkpoint_io import load_checkpoint
from vlmkit.utils.io import read_jsonl

TINY = [
    "base_set=[model.vision.pretrain.steps=3, model.vision.pretrain.batch_size=4]",
    "shared_stage.steps=2", "shared_stage.batch_size=4",
    "stages.bind.steps=2", "stages.bind.batch_size=4",
    "stages.instruct.steps=2", "stages.instruct.batch_size=4",
    "eval.limit=3", "eval.max_new_tokens=8",
]  # fmt: skip


def test_quick_preset_runs_shares_parts_and_resumes(tiny_world, tmp_path, capsys):
    out = tmp_path / "ab"
    rows = run_ablation("connectors-quick", out, data_dir=tiny_world, overrides=TINY, only=["mlp", "cross-attention"])
    assert [r["variant"] for r in rows] == ["mlp", "cross-attention"]
    mlp, xattn = rows
    assert mlp["visual_tokens"] == 16 and xattn["visual_tokens"] == 16  # the 4x4 grid at 64 px
    assert xattn["connector_params"] > mlp["connector_params"]  # the gated blocks count as the bridge
    for r in rows:
        assert 0.0 <= r["vqa"] <= 1.0 and r["train_samples_per_s"] > 0
    table = (out / "table.md").read_text()
    assert "| mlp |" in table and "| cross-attention |" in table
    assert (out / "table.png").stat().st_size > 0

    # both variants start from the shared encoder, which their stages keep frozen
    shared, _ = load_checkpoint(out / "shared" / "final")
    for name in ("mlp", "cross-attention"):
        variant, _ = load_checkpoint(out / "variants" / name / "final")
        for (n, a), (_, b) in zip(variant.vision.state_dict().items(), shared.vision.state_dict().items()):
            assert (a == b).all(), n
    ab = load_ablation("connectors-quick", TINY)
    recipe = variant_recipe(ab, ab.variants[0], out / "shared")
    assert recipe.model.init_parts == ["vision", "llm"] and recipe.model.init_from == str(out / "shared" / "final")

    # a finished variant is not trained again
    stamp = (out / "variants" / "mlp" / "final" / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    again = run_ablation("connectors-quick", out, data_dir=tiny_world, overrides=TINY, only=["mlp"])
    assert "mlp: done earlier" in capsys.readouterr().out
    assert (out / "variants" / "mlp" / "final" / "model.safetensors").stat().st_mtime_ns == stamp
    assert [r["variant"] for r in again] == ["mlp", "cross-attention"]
    assert len(read_jsonl(out / "results.jsonl")) == 2


def test_unknown_variant_and_bad_file_are_named(tmp_path):
    with pytest.raises(ConfigError, match="stages"):
        load_ablation("connectors-quick", ["stages=5"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nshared_stage: {name: s, data: {a: 1}, trainable: [llm], lr: 1, steps: 1}\n"
                   "stages: []\nvariants: [{name: v, sets: []}]\n")
    with pytest.raises(ConfigError, match="variants.0.sets"):
        load_ablation(bad)
