"""Data-parallel training with real processes: ``torchrun --nproc-per-node 2 -m vlmkit train``
on CPU (gloo). Two ranks must train exactly like one process on the same global batch, with DDP
and with FSDP2, even when one rank's micro-batch has no image; a killed two-rank run resumes
to the same losses."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import yaml

from conftest import tiny_recipe_dict
from vlmkit.config import ConfigError, StageConfig, recipe_from_dict
from vlmkit.data.mixture import MixtureSampler
from vlmkit.train.parallel import DistEnv, check_stage, run_strategy
from vlmkit.train.run import train
from vlmkit.train.trainer import stage_seed
from vlmkit.utils.io import read_jsonl


def distributed_recipe() -> dict:
    """The tiny recipe with a ViT (batch norm would make per-rank statistics differ) and a last
    stage whose micro-batches hold one row per rank, half of them text-only."""
    tree = tiny_recipe_dict(steps=3)
    tree["model"]["vision"] = {"name": "tiny-vit", "image_size": 64, "overrides": {"patch_size": 16}}
    mixed = dict(tree["stages"][2])
    mixed.update(name="mixed", data={"captions": 0.5, "text": 0.5}, batch_size=2, grad_accum=2)
    tree["stages"].append(mixed)
    return tree


def run_torchrun(tmp_path, tree, out, *args, nproc=2):
    recipe_file = tmp_path / f"{out}.yaml"
    recipe_file.write_text(yaml.safe_dump(tree))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "vlmkit", "train", str(recipe_file), "--out", str(tmp_path / out), *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    return tmp_path / out


def losses(run_dir):
    return {r["step"]: r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl")}


def assert_close_losses(a: dict, b: dict, rel: float):
    assert sorted(a) == sorted(b)
    worst = max(abs(a[k] - b[k]) / abs(a[k]) for k in a)
    assert worst <= rel, (worst, a, b)


@pytest.fixture(scope="module")
def single_process_run(tiny_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    train(recipe_from_dict(distributed_recipe()), data_dir=tiny_world, out_dir=out)
    return out


def test_some_micro_batch_gives_one_rank_text_only(tiny_world):
    """The premise of the tests below: in the ``mixed`` stage one rank gets an image row while
    the other gets a text-only row (same draws as the trainer: every rank draws the whole step)."""
    from vlmkit.data.dataset import load_sources
    from vlmkit.data.bad_samples import BadSampleLog

    recipe = recipe_from_dict(distributed_recipe())
    sources = load_sources(recipe.data, tiny_world, BadSampleLog(), names=["captions", "text"])
    stage = recipe.stages[3]
    sizes = {n: len(sources[n].samples) for n in stage.data}
    sampler = MixtureSampler(sizes, stage.data, seed=stage_seed(recipe.seed, 3))
    draws = [sampler.next()[0] for _ in range(stage.steps * stage.grad_accum * stage.batch_size)]
    pairs = list(zip(draws[0::2], draws[1::2]))  # (rank 0's row, rank 1's row) per micro-batch
    assert any(set(p) == {"captions", "text"} for p in pairs), pairs


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_train_like_one_process(strategy, tiny_world, tmp_path, single_process_run):
    out = run_torchrun(tmp_path, distributed_recipe(), strategy, "--data", str(tiny_world), "--strategy", strategy)
    assert_close_losses(losses(single_process_run), losses(out), rel=1e-5)
    assert (out / "final" / "model.safetensors").exists()
    from vlmkit.models.checkpoint_io import load_checkpoint

    import torch

    ref, _ = load_checkpoint(single_process_run / "final")
    got, _ = load_checkpoint(out / "final")  # FSDP: gathered from the shards
    # atol: Adam divides by the gradient's own magnitude, so where a gradient is near zero the
    # ranks' different summation order can move a weight by a fraction of the learning rate
    # (3e-3 per step; 2e-4 seen after 12 steps); a wrong gradient would move it by steps of lr
    for (name, a), (_, b) in zip(ref.state_dict().items(), got.state_dict().items()):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=5e-4, msg=name)


def test_two_rank_fsdp_run_resumes_to_the_same_losses(tiny_world, tmp_path):
    tree = distributed_recipe()
    data = ["--data", str(tiny_world), "--strategy", "fsdp", "--save-every", "2"]
    full = run_torchrun(tmp_path, tree, "full", *data)
    # killed after step 7 (inside stage 3, whose micro-batches accumulate), last checkpoint at 6
    run_torchrun(tmp_path, tree, "killed", *data, "--stop-after-steps", "7")
    assert max(losses(tmp_path / "killed")) == 7
    # the optimizer state lies in one safetensors shard per rank (torch.distributed.checkpoint)
    shards = sorted((tmp_path / "killed" / "checkpoints" / "step-000006" / "training_state" / "optimizer").iterdir())
    assert len([p for p in shards if p.suffix == ".safetensors"]) == 2, shards
    shutil.copytree(tmp_path / "killed", tmp_path / "killed-one")
    resumed = run_torchrun(tmp_path, tree, "killed", *data, "--resume")
    assert_close_losses(losses(full), losses(resumed), rel=1e-6)
    # the same shards re-sharded for a single process: that run continues as the two did
    train(recipe_from_dict(tree), data_dir=tiny_world, out_dir=tmp_path / "killed-one", resume=True, save_every=2)
    assert_close_losses(losses(full), losses(tmp_path / "killed-one"), rel=1e-5)


def test_world_size_must_divide_the_batch():
    stage = StageConfig.model_validate(dict(name="sft", data={"x": 1.0}, trainable=["llm"], lr=1e-3, steps=1,
                                            batch_size=6))  # fmt: skip
    check_stage(stage, DistEnv(rank=0, world_size=3), "ddp")
    with pytest.raises(ConfigError, match=r"stages\.sft\.batch_size: 6 rows .* 4 processes"):
        check_stage(stage, DistEnv(rank=0, world_size=4), "ddp")


def test_strategy_is_one_per_run():
    base = dict(data={"x": 1.0}, trainable=["llm"], lr=1e-3, steps=1)
    stages = [StageConfig.model_validate({**base, "name": "a"}),
              StageConfig.model_validate({**base, "name": "b", "strategy": "fsdp"})]  # fmt: skip
    with pytest.raises(ConfigError, match="same strategy"):
        run_strategy(stages, None)
    assert run_strategy(stages, "fsdp") == "fsdp"  # --strategy overrides every stage
