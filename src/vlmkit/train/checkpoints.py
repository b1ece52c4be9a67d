"""Resumable checkpoints of a run: ``checkpoints/step-XXXXXX/`` written atomically, and pruned.

A checkpoint directory holds whatever ``save_model(model, dir)`` writes (for a VLM:
``save_checkpoint``: config.json, model.safetensors, tokenizer, recipe.yaml) plus
``training_state/`` (see ``train.state``). Directories only ever appear complete (temp dir,
then rename), so "the latest directory named step-N" is always a usable checkpoint; leftover
``.step-N.*.tmp`` directories from a crash are ignored.

Stage-end checkpoints are kept forever; of the periodic ones the last ``keep_last`` stay.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from torch import nn

from vlmkit.train.state import save_training_state
from vlmkit.utils.io import atomic_directory

log = logging.getLogger("vlmkit.train")

_NAME = re.compile(r"^step-(\d{6,})$")
STATE_DIR = "training_state"
SHARDED_OPTIMIZER_DIR = "optimizer"  # inside STATE_DIR, when the ranks wrote optimizer shards


def checkpoint_dirs(root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root``, by ascending global step."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and (p / STATE_DIR / "state.json").exists():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Path | None:
    dirs = checkpoint_dirs(root)
    return dirs[-1][1] if dirs else None


def _is_stage_end(path: Path) -> bool:
    state = json.loads((path / STATE_DIR / "state.json").read_text(encoding="utf-8"))
    return bool(state["progress"].get("stage_end"))


class CheckpointManager:
    """Writes ``root/step-{global:06d}/`` and prunes old periodic checkpoints."""

    def __init__(self, root: str | Path, save_model: Callable[[nn.Module, Path], None], keep_last: int = 2):
        self.root = Path(root)
        self.save_model = save_model
        self.keep_last = keep_last

    def save(self, model, optimizer, scheduler, progress: dict, mixture: dict | None,
             rng_of_ranks: list[dict] | None = None, model_state: dict | None = None,
             sharded_optimizer: Path | None = None, sharded_param_groups: list[dict] | None = None) -> Path:  # fmt: skip
        """``optimizer``: the optimizer or its full state dict, or None when every rank has
        written its shards into ``sharded_optimizer`` (a ``shard_dir``, moved into the checkpoint);
        ``model_state``: the full weights when the model itself is sharded (gathered on rank 0)."""
        path = self.root / f"step-{progress['global_step']:06d}"
        with atomic_directory(path) as tmp:
            if model_state is None:
                self.save_model(model, tmp)
            else:
                self.save_model(model, tmp, state_dict=model_state)
            state_dir = tmp / STATE_DIR
            if sharded_optimizer is not None:
                state_dir.mkdir(parents=True, exist_ok=True)
                os.replace(sharded_optimizer, state_dir / SHARDED_OPTIMIZER_DIR)
            save_training_state(state_dir, optimizer, scheduler, progress, mixture, rng_of_ranks=rng_of_ranks,
                                sharded_param_groups=sharded_param_groups)  # fmt: skip
        self.prune()
        return path

    def shard_dir(self, global_step: int) -> Path:
        """Where every rank writes its optimizer shards for step ``global_step`` before rank 0
        moves them into the checkpoint (never matched by ``checkpoint_dirs``); emptied first."""
        shards = self.root / f".step-{global_step:06d}.optimizer-shards.tmp"
        shutil.rmtree(shards, ignore_errors=True)
        shards.mkdir(parents=True)
        return shards

    def prune(self) -> None:
        periodic = [p for _, p in checkpoint_dirs(self.root) if not _is_stage_end(p)]
        excess = periodic[: max(0, len(periodic) - self.keep_last)]
        for p in excess:
            log.debug("removing old checkpoint %s", p)
            shutil.rmtree(p, ignore_errors=True)
