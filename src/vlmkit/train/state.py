"""The full training state on disk, without pickle.

``training_state/`` (inside a checkpoint directory, next to its ``model.safetensors``):

* ``optimizer.safetensors``: every tensor of ``optimizer.state_dict()["state"]``, keyed
  ``"<param index>.<name>"`` (e.g. ``"3.exp_avg"``, ``"3.step"``).
* ``optimizer.json``: ``param_groups`` (hyper-parameters, param indices) and the non-tensor
  per-parameter values.
* ``optimizer/`` instead of ``optimizer.safetensors`` when the optimizer is sharded (FSDP2):
  every rank's shards as ``torch.distributed.checkpoint`` safetensors (``train.parallel``), and
  ``optimizer.json`` holds ``{"sharded": true, "param_groups"}`` with parameter names.
* ``rng.safetensors``: the torch CPU generator state (and ``cuda.<i>`` for each CUDA device);
  in a data-parallel run every rank's, keyed ``rank<r>.torch_cpu`` etc. for ranks r > 0.
* ``state.json``: scheduler ``state_dict``, mixture position, python ``random`` and numpy
  global RNG states (``rng``; ``rng_ranks`` for ranks > 0), and ``progress`` (stage index,
  steps, tokens seen, bad-sample counts...).
* ``model.safetensors``: only when ``save_training_state`` is given a model (setups without a
  model checkpoint next to it, e.g. tests). Normal checkpoints keep the weights one level up.

Floats go through JSON exactly (Python writes the shortest repr that reads back the same).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

FORMAT = 1


# ------------------------------------------------------------------ optimizer


def _optimizer_to_files(optimizer: torch.optim.Optimizer | dict) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    values: dict[str, dict[str, Any]] = {}
    for idx, pstate in sd["state"].items():
        for key, val in pstate.items():
            if torch.is_tensor(val):
                tensors[f"{idx}.{key}"] = val.detach().cpu().contiguous()
            else:
                values.setdefault(str(idx), {})[key] = val
    meta = {"format": FORMAT, "param_groups": sd["param_groups"], "values": values}
    return tensors, meta


def _optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, val in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = val
    for idx, vals in meta["values"].items():
        state.setdefault(int(idx), {}).update(vals)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


# ------------------------------------------------------------------ RNG


def _rng_tensors() -> dict[str, torch.Tensor]:
    out = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda.{i}"] = s
    return out


def _rng_json() -> dict:
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }


def _restore_rng(tensors: dict[str, torch.Tensor], js: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k.split(".")[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    version, internal, gauss = js["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = js["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def capture_rng() -> dict:
    """This process's RNG states: ``{"tensors": {...}, "json": {...}}`` (see ``save_training_state``)."""
    return {"tensors": _rng_tensors(), "json": _rng_json()}


def _rank_prefix(rank: int) -> str:
    return "" if rank == 0 else f"rank{rank}."


# ------------------------------------------------------------------ save / load


def _dump_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")


def save_training_state(
    directory: str | Path,
    optimizer: torch.optim.Optimizer | dict,
    scheduler: Any,
    progress: dict,
    mixture: dict | None = None,
    model: torch.nn.Module | None = None,
    rng_of_ranks: list[dict] | None = None,
    sharded_param_groups: list[dict] | None = None,
) -> Path:
    """Write the state into ``directory`` (the caller makes the enclosing write atomic).

    ``optimizer`` is an optimizer or its (full) ``state_dict()``. ``progress`` must be JSON-able;
    the trainer stores stage index, stage step, global step, tokens seen, bad-sample counts and
    elapsed time in it. ``rng_of_ranks``: every rank's ``capture_rng()`` (default: this one's).
    ``optimizer=None`` with ``sharded_param_groups``: the ranks wrote ``optimizer/`` themselves.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    if optimizer is None:
        _dump_json(d / "optimizer.json", {"format": FORMAT, "sharded": True, "param_groups": sharded_param_groups})
    else:
        tensors, meta = _optimizer_to_files(optimizer)
        save_file(tensors, str(d / "optimizer.safetensors"))
        _dump_json(d / "optimizer.json", meta)
    ranks = rng_of_ranks or [capture_rng()]
    rng_tensors = {_rank_prefix(r) + k: v for r, rng in enumerate(ranks) for k, v in rng["tensors"].items()}
    save_file(rng_tensors, str(d / "rng.safetensors"))
    state = {
        "format": FORMAT,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "mixture": mixture,
        "rng": ranks[0]["json"],
        "rng_ranks": [rng["json"] for rng in ranks[1:]],
        "progress": progress,
    }
    _dump_json(d / "state.json", state)
    if model is not None:
        save_model(model, str(d / "model.safetensors"))
    return d


def read_progress(directory: str | Path) -> dict:
    """``progress`` and ``mixture`` of a saved state, without touching any object."""
    state = json.loads((Path(directory) / "state.json").read_text(encoding="utf-8"))
    return {"progress": state["progress"], "mixture": state["mixture"]}


def load_training_state(
    directory: str | Path,
    model: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer | Callable[[dict], None] | None,
    scheduler: Any,
    restore_rng: bool = True,
    rank: int = 0,
) -> dict:
    """Load what was saved into the given objects; returns ``{"progress", "mixture"}``.

    ``model`` is loaded only if ``directory/model.safetensors`` exists (pass None when the
    weights came from the checkpoint already). ``optimizer`` may be a function taking the
    saved state dict (sharded optimizers). RNG states are restored last: ``rank``'s own when
    the run saved one for it (same world size), else rank 0's.
    """
    d = Path(directory)
    state = json.loads((d / "state.json").read_text(encoding="utf-8"))
    if state.get("format") != FORMAT:
        raise ValueError(f"{d}: unknown training state format {state.get('format')}")
    if model is not None and (d / "model.safetensors").exists():
        load_model(model, str(d / "model.safetensors"))
    if optimizer is not None:
        meta = json.loads((d / "optimizer.json").read_text(encoding="utf-8"))
        saved = _optimizer_from_files(load_file(str(d / "optimizer.safetensors")), meta)
        optimizer(saved) if callable(optimizer) else optimizer.load_state_dict(saved)
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        tensors = load_file(str(d / "rng.safetensors"))
        others = state.get("rng_ranks", [])
        if 0 < rank <= len(others):
            prefix = _rank_prefix(rank)
            _restore_rng({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, others[rank - 1])
        else:
            _restore_rng({k: v for k, v in tensors.items() if not k.startswith("rank")}, state["rng"])
    return {"progress": state["progress"], "mixture": state["mixture"]}
