"""The real model through the real training loop: resume is bitwise, bad input is skipped and counted."""

import json
import shutil
from pathlib import Path

import pytest

from vlmkit.config import ConfigError, recipe_from_dict
from vlmkit.models.checkpoint_io import CheckpointError
from vlmkit.data.bad_samples import TooManyBadSamples
from vlmkit.models.checkpoint_io import load_checkpoint
from vlmkit.train.run import build_model, seed_everything, train
from vlmkit.utils.io import read_jsonl
from conftest import tiny_recipe_dict


def losses(run_dir):
    return {r["step"]: r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl")}


def test_run_directory_contract(tiny_run):
    out, final = tiny_run
    rows = read_jsonl(out / "metrics.jsonl")
    assert {"stage", "step", "loss"} <= set(rows[0])
    assert [r["stage"] for r in rows][0] == "lm_warmup" and rows[-1]["stage"] == "instruct"
    assert (out / "loss.png").stat().st_size > 0
    for name in ("config.json", "model.safetensors", "tokenizer.json", "recipe.yaml"):
        assert (final / name).exists(), name
    assert any((out / "checkpoints").iterdir())


def test_stages_freeze_what_they_do_not_train(tiny_world, tmp_path):
    """After an align-only run the LLM weights equal the initial ones; the connector's don't."""
    tree = tiny_recipe_dict(steps=2)
    tree["stages"] = [tree["stages"][1]]
    final = train(recipe_from_dict(tree), data_dir=tiny_world, out_dir=tmp_path / "a")
    trained, tokenizer = load_checkpoint(final)
    recipe = recipe_from_dict(tree)
    seed_everything(recipe.seed)  # as train() does before building the model
    initial, _ = build_model(recipe, tokenizer)
    a, b = trained.state_dict(), initial.state_dict()
    assert all((a[k] == b[k]).all() for k in a if k.startswith("llm."))
    assert any(not (a[k] == b[k]).all() for k in a if k.startswith("connector."))


def test_resume_after_kill_equals_uninterrupted(tiny_world, tmp_path):
    recipe = recipe_from_dict(tiny_recipe_dict(steps=3))
    full = tmp_path / "full"
    train(recipe, data_dir=tiny_world, out_dir=full)
    killed = tmp_path / "killed"
    # killed after step 5 (mid stage 2), with the last checkpoint at step 4
    assert train(recipe, data_dir=tiny_world, out_dir=killed, save_every=2, stop_after_steps=5) is None
    # a half-written checkpoint left by the kill must never be picked
    (killed / "checkpoints" / ".step-000006.xyz.tmp").mkdir()
    train(recipe, data_dir=tiny_world, out_dir=killed, save_every=2, resume=True)
    a, b = losses(full), losses(killed)
    assert sorted(a) == sorted(b) == list(range(1, 10))
    assert all(a[k] == b[k] for k in a), (a, b)  # bitwise


def test_refuses_to_overwrite_a_run(tiny_run, tiny_world):
    out, _ = tiny_run
    from vlmkit.config import ConfigError

    with pytest.raises(ConfigError, match="--resume"):
        train(recipe_from_dict(tiny_recipe_dict()), data_dir=tiny_world, out_dir=out)


def _world_copy(tiny_world, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_world, data)
    return data


def test_bad_rows_are_skipped_named_and_counted(tiny_world, tmp_path, capsys, caplog):
    data = _world_copy(tiny_world, tmp_path)
    rows = json.loads((data / "train.json").read_text())
    captions = [r for r in rows if r.get("meta", {}).get("task") == "caption"]
    captions[0]["image"] = "images/does-not-exist.png"
    bad_id = captions[0]["id"]
    (data / "train.json").write_text(json.dumps(rows))
    tree = tiny_recipe_dict(steps=2)
    tree["stages"] = [tree["stages"][1]]
    tree["stages"][0]["batch_size"] = len(captions)  # every caption is drawn in the first step
    tree["train"] = {"max_bad_fraction": 0.5}
    train(recipe_from_dict(tree), data_dir=data, out_dir=tmp_path / "run")
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(bad_id in w and "missing_image" in w and "train.json" in w for w in warnings)
    summary = capsys.readouterr().out
    assert "missing_image: " in summary  # the end-of-run summary counts skipped samples by reason


def test_too_many_bad_samples_stop_the_run(tiny_world, tmp_path):
    data = _world_copy(tiny_world, tmp_path)
    for png in (data / "images").glob("train_*.png"):
        png.write_bytes(b"not a png")
    tree = tiny_recipe_dict(steps=2)
    tree["stages"] = [tree["stages"][1]]
    with pytest.raises(TooManyBadSamples, match="undecodable_image"):
        train(recipe_from_dict(tree), data_dir=data, out_dir=tmp_path / "run")


def test_tensorboard_events_hold_the_logged_losses(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = tiny_run
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    logged = {r["step"]: r["loss"] for r in read_jsonl(out / "metrics.jsonl")}
    scalars = {e.step: e.value for e in events.Scalars("train/loss")}
    assert scalars.keys() == logged.keys()
    assert all(abs(scalars[k] - logged[k]) < 1e-5 * max(1.0, abs(logged[k])) for k in logged)
    assert any(tag.startswith("lr/") for tag in events.Tags()["scalars"])


def test_wandb_is_optional_and_named_when_missing(tiny_world, tmp_path, monkeypatch):
    import sys
    import types

    from vlmkit.config import ConfigError

    tree = tiny_recipe_dict(steps=1)
    tree["stages"] = tree["stages"][:1]
    tree["train"] = {"wandb": {"project": "p"}, "tensorboard": False}
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    with pytest.raises(ConfigError, match="wandb package is not installed"):
        train(recipe_from_dict(tree), data_dir=tiny_world, out_dir=tmp_path / "missing")

    logged, finished = [], []
    fake = types.SimpleNamespace(init=lambda **kw: types.SimpleNamespace(
        log=lambda values, step: logged.append((step, values)), finish=lambda: finished.append(True)))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    train(recipe_from_dict(tree), data_dir=tiny_world, out_dir=tmp_path / "fake")
    assert logged and logged[0][0] == 1 and "train/loss" in logged[0][1] and finished == [True]
    assert not (tmp_path / "fake" / "tensorboard").exists()


def test_packed_stages_train_like_unpacked_ones(tiny_world, tmp_path):
    """Packing rearranges the same samples into fewer rows: every step's loss (mean over the
    step's target tokens) stays the same, up to float error, while fewer tokens are padding."""
    tree = tiny_recipe_dict(steps=2)
    plain = train(recipe_from_dict(tree), data_dir=tiny_world, out_dir=tmp_path / "plain")
    for stage in tree["stages"]:
        stage["packing"] = {"tokens": 512, "max_images": 3}
    packed = train(recipe_from_dict(tree), data_dir=tiny_world, out_dir=tmp_path / "packed")
    assert plain is not None and packed is not None
    a, b = losses(tmp_path / "plain"), losses(tmp_path / "packed")
    assert sorted(a) == sorted(b)
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4, abs=1e-5), step


def test_a_stage_that_trains_nothing_is_refused(tiny_world, tmp_path):
    tree = tiny_recipe_dict(steps=1)
    tree["stages"][1]["lr"] = {"vision": 0.0, "connector": 0.0}
    with pytest.raises(ConfigError, match=r"stages\.align: the stage trains nothing"):
        train(recipe_from_dict(tree), data_dir=tiny_world, out_dir=tmp_path / "r")


def test_a_missing_init_checkpoint_is_named(tiny_world, tmp_path):
    tree = tiny_recipe_dict(steps=1)
    tree["model"]["init_from"] = str(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="nowhere.*does not exist"):
        train(recipe_from_dict(tree), data_dir=tiny_world, out_dir=tmp_path / "r")


@pytest.mark.parametrize("where", ["model", "state"])
def test_sigkill_during_a_save_resumes_from_the_last_complete_checkpoint(where, tiny_world, tmp_path):
    """A real process killed by SIGKILL while writing step 4's checkpoint (a torn weights file,
    or a complete but unrenamed directory): ``--resume`` continues from step 3's (the first
    stage's end) and the losses
    equal an uninterrupted run's, bitwise."""
    import os
    import subprocess
    import sys

    import yaml

    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(yaml.safe_dump(tiny_recipe_dict(steps=3)))
    helper = Path(__file__).parent / "_die_during_save.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def vlmkit(out, *extra, die=None):
        prefix = [str(helper), where, "4"] if die else ["-m", "vlmkit"]
        cmd = [sys.executable, *prefix, "train", str(recipe_file), "--data", str(tiny_world),
               "--out", str(tmp_path / out), "--save-every", "2", *extra]  # fmt: skip
        return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)

    assert vlmkit("full").returncode == 0
    killed = vlmkit("killed", die=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    names = sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir())
    assert "step-000004" not in names and any(n.startswith(".step-000004") for n in names), names
    resumed = vlmkit("killed", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout and "step-000003" in resumed.stdout
    a, b = losses(tmp_path / "full"), losses(tmp_path / "killed")
    assert sorted(a) == sorted(b) == list(range(1, 10))
    assert all(a[k] == b[k] for k in a), (a, b)


def test_a_highres_stage_continues_at_the_new_resolution(tiny_world, tmp_path):
    """From the highres stage on, images are encoded at 128 px (4x the ViT's tokens, position
    embeddings interpolated); the final checkpoint reloads at that size, and a run killed inside
    the highres stage resumes to the same losses."""
    import torch

    tree = tiny_recipe_dict(steps=2)
    tree["model"]["vision"] = {"name": "tiny-vit", "image_size": 64, "overrides": {"patch_size": 16}}
    tree["stages"][2].update(kind="highres", image_size=128)
    recipe = recipe_from_dict(tree)
    final = train(recipe, data_dir=tiny_world, out_dir=tmp_path / "full", save_every=1)
    model, _ = load_checkpoint(final)
    assert model.config.vision.image_size == 128 and model.tokens_per_image == 64
    before, _ = load_checkpoint(tmp_path / "full" / "checkpoints" / "step-000004")  # end of stage 2
    assert before.config.vision.image_size == 64 and before.tokens_per_image == 16
    # the 128-px model really reads 128-px pixels: its features depend on the whole image
    with torch.no_grad():
        feats = model.encode_images(torch.randn(1, 3, 128, 128))
    assert feats.shape[1] == 64
    train(recipe, data_dir=tiny_world, out_dir=tmp_path / "killed", save_every=1, stop_after_steps=5)
    train(recipe, data_dir=tiny_world, out_dir=tmp_path / "killed", save_every=1, resume=True)
    a, b = losses(tmp_path / "full"), losses(tmp_path / "killed")
    assert sorted(a) == sorted(b) and all(a[k] == b[k] for k in a), (a, b)


def test_torch_compile_trains_like_eager(tiny_world, tmp_path):
    """``train.compile`` compiles the decoder layers and the encoder (inductor, on this CPU):
    the losses match the eager run's, and the checkpoint has the same parameter names."""
    tree = tiny_recipe_dict(steps=2)
    tree["stages"] = tree["stages"][2:]  # one stage: every part trains
    eager = train(recipe_from_dict(tree), data_dir=tiny_world, out_dir=tmp_path / "eager")
    tree["train"] = {"compile": True}
    compiled = train(recipe_from_dict(tree), data_dir=tiny_world, out_dir=tmp_path / "compiled")
    a, b = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert sorted(a) == sorted(b)
    assert all(b[k] == pytest.approx(a[k], rel=1e-4) for k in a), (a, b)
    m_eager, _ = load_checkpoint(eager)
    m_compiled, _ = load_checkpoint(compiled)
    assert list(m_eager.state_dict()) == list(m_compiled.state_dict())


def test_the_stages_recipe_runs_every_stage_kind(tiny_world, tmp_path):
    """The built-in shapes-tiny-stages recipe: align, pretrain on documents (MM1 mixture),
    highres, instruct, dpo, in that order, two steps each; the final model is at 128 px."""
    from vlmkit.config import load_recipe

    recipe = load_recipe("shapes-tiny-stages", ["stages.pretrain.max_seq_len=512", "stages.pretrain.packing.tokens=1024"])
    assert recipe.stage("pretrain").data == {"captions": 5.0, "documents": 5.0, "text": 1.0}
    final = train(recipe, data_dir=tiny_world, out_dir=tmp_path / "r", max_steps=2)
    stages = []
    for row in read_jsonl(tmp_path / "r" / "metrics.jsonl"):
        if not stages or stages[-1] != row["stage"]:
            stages.append(row["stage"])
    assert stages == ["align", "pretrain", "highres", "instruct", "dpo"]
    model, _ = load_checkpoint(final)
    assert model.config.vision.image_size == 128
