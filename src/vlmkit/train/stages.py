"""What a stage trains and how fast: trainable selection, parameter groups, the LR schedule.

* ``select_trainable`` turns a stage's ``trainable`` entries (part names from ``model.parts()``
  or ``fnmatch`` globs over full parameter names) into groups of parameters and freezes the rest.
* ``param_groups`` gives each entry its own learning rate and weight decay, applied only to
  parameters with ``ndim >= 2`` (weight matrices, embeddings, conv kernels). Biases, norm
  scales and any other 1-D or scalar parameter never decay.
* ``lr_at`` is the LR multiplier: linear warmup, then cosine down to ``min_lr_ratio`` (or constant).
* ``build_optimizer`` puts them together: ``torch.optim.AdamW`` (fused on CPU and CUDA) + ``LambdaLR``.
"""

from __future__ import annotations

import math
from fnmatch import fnmatchcase

import torch
from torch import nn

from vlmkit.config import ConfigError, StageConfig

Selected = dict[str, list[tuple[str, nn.Parameter]]]


def _parts(model: nn.Module) -> dict[str, nn.Module]:
    parts = getattr(model, "parts", None)
    return dict(parts()) if callable(parts) else {}


def _matches(entry: str, named: list[tuple[str, nn.Parameter]], parts: dict[str, nn.Module], adapted: set[str]):
    if entry in parts:
        ids = {id(p) for n, p in parts[entry].named_parameters() if entry not in adapted or "lora_" in n}
        return [(n, p) for n, p in named if id(p) in ids]
    return [(n, p) for n, p in named if fnmatchcase(n, entry)]


def select_trainable(model: nn.Module, entries: list[str], adapted: set[str] = frozenset()) -> Selected:
    """Map each entry to its parameters and set ``requires_grad`` on exactly those.

    A parameter matched by several entries belongs to the first. An entry that matches no
    parameter at all is a ``ConfigError`` naming it (a typo must not silently freeze a part).
    An entry naming a part in ``adapted`` (LoRA) selects that part's adapter weights only.
    """
    if not entries:
        raise ConfigError("trainable: at least one entry is needed")
    named = list(model.named_parameters())
    parts = _parts(model)
    taken: set[int] = set()
    selected: Selected = {}
    for entry in entries:
        matches = _matches(entry, named, parts, set(adapted))
        if not matches:
            known = sorted(parts) or [n for n, _ in named[:5]]
            raise ConfigError(
                f"trainable entry {entry!r} matches no parameter (parts: {sorted(parts)}; "
                f"globs match full names such as {known[:3]})"
            )
        selected[entry] = [(n, p) for n, p in matches if id(p) not in taken]
        taken.update(id(p) for _, p in matches)
    for _, p in named:
        p.requires_grad_(id(p) in taken)
    return selected


def _rate(lr: dict[str, float] | float, entry: str) -> float:
    if isinstance(lr, dict):
        if entry not in lr:
            raise ConfigError(f"lr has no rate for trainable entry {entry!r}")
        return float(lr[entry])
    return float(lr)


def param_groups(selected: Selected, lr: dict[str, float] | float, weight_decay: dict[str, float] | float) -> list[dict]:
    """One or two optimizer groups per entry: ``ndim >= 2`` parameters decay, the rest don't.

    Each group carries a ``name`` (``"<entry>"`` or ``"<entry>/no_decay"``) for logging.
    Entries left without parameters (all claimed by earlier entries) give no group.
    """
    groups = []
    for entry, params in selected.items():
        rate = _rate(lr, entry)
        decay = [p for _, p in params if p.ndim >= 2]
        no_decay = [p for _, p in params if p.ndim < 2]
        if decay:
            decay_rate = weight_decay.get(entry, 0.0) if isinstance(weight_decay, dict) else weight_decay
            groups.append({"name": entry, "params": decay, "lr": rate, "weight_decay": float(decay_rate)})
        if no_decay:
            groups.append({"name": f"{entry}/no_decay", "params": no_decay, "lr": rate, "weight_decay": 0.0})
    return groups


def lr_at(step: int, total_steps: int, warmup_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """The LR multiplier for optimizer step ``step`` (0-based) of ``total_steps``.

    Warmup is linear from ``1/warmup`` to 1 over the first ``warmup_steps`` steps; then
    ``constant`` stays at 1 and ``cosine`` follows half a cosine from 1 down to ``min_lr_ratio``
    at the last step.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise ConfigError(f"unknown schedule {schedule!r} (expected cosine or constant)")
    span = max(1, total_steps - warmup_steps - 1)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


FUSED_ADAMW_DEVICES = ("cpu", "cuda")  # where PyTorch has a fused AdamW kernel that we test


def fused_adamw_supported(groups: list[dict]) -> bool:
    """Whether every parameter can take PyTorch's fused AdamW (one kernel for all tensors).

    PyTorch only defaults to it on no device; its for-loop default costs 13 ms a step on the
    2-core CPU for 4.4M parameters against 4 ms fused (bench/train_throughput.py's model), and
    the fused kernel keeps the same state (resume and exports are unchanged). DTensor shards
    (FSDP2) take it too.
    """
    params = [p for g in groups for p in g["params"]]
    return bool(params) and all(p.device.type in FUSED_ADAMW_DEVICES and p.is_floating_point() for p in params)


def build_optimizer(
    model: nn.Module, stage: StageConfig, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR, Selected]:
    """Freeze all but the stage's trainable parameters; AdamW over them with the stage schedule."""
    adapted = set(stage.lora.parts) if stage.lora is not None else set()
    selected = select_trainable(model, stage.trainable, adapted)
    groups = param_groups(selected, stage.lr, stage.weight_decay)
    if all(g["lr"] == 0 for g in groups):
        raise ConfigError(
            f"stages.{stage.name}: the stage trains nothing: every learning rate of {stage.trainable} is 0 "
            "(remove the stage, or give a part a positive lr)"
        )
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.95), eps=1e-8, fused=fused_adamw_supported(groups))

    def multiplier(step: int) -> float:
        return lr_at(step, total_steps, stage.warmup_steps, stage.schedule, stage.min_lr_ratio)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
    return optimizer, scheduler, selected
