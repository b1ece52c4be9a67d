"""Where the trainer's metric rows go besides ``metrics.jsonl``: TensorBoard, on by default.

A sink is a callable taking the row the trainer appends to ``metrics.jsonl`` (``stage``, ``step``,
``loss``, ``lr``, ``grad_norm``, ``tokens_per_s``, objective metrics...) plus ``close()``.
"""

from __future__ import annotations

from numbers import Real
from pathlib import Path


class TensorBoardSink:
    """Every numeric field of a row as a scalar ``train/<field>`` at the row's global step, plus
    the per-group learning rates as ``lr/<group>``; events under ``<run>/tensorboard/``
    (``tensorboard --logdir runs/x/tensorboard``). A resumed run passes ``purge_step`` (the first
    step after its checkpoint), so the events a killed run logged past it are dropped, as
    ``metrics.jsonl`` drops its rows."""

    def __init__(self, log_dir: str | Path, purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def __call__(self, row: dict) -> None:
        step = int(row["step"])
        for key, value in row.items():
            if key in ("step", "stage_step") or isinstance(value, bool):
                continue
            if isinstance(value, Real):
                self.writer.add_scalar(f"train/{key}", float(value), step)
        for group, lr in (row.get("lrs") or {}).items():
            self.writer.add_scalar(f"lr/{group}", float(lr), step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """The same rows to Weights & Biases (``train.wandb: {project: NAME}``), only when asked for
    and only if ``wandb`` is installed: vlmkit never requires it."""

    def __init__(self, project: str, run_name: str, config: dict, run_dir: str | Path) -> None:
        try:
            import wandb
        except ImportError:
            from vlmkit.config import ConfigError

            raise ConfigError("train.wandb is set but the wandb package is not installed (pip install wandb)") from None
        self.wandb = wandb
        self.run = wandb.init(project=project, name=run_name, config=config, dir=str(run_dir))

    def __call__(self, row: dict) -> None:
        values = {f"train/{k}": float(v) for k, v in row.items()
                  if isinstance(v, Real) and not isinstance(v, bool) and k not in ("step", "stage_step")}  # fmt: skip
        values.update({f"lr/{g}": float(lr) for g, lr in (row.get("lrs") or {}).items()})
        self.run.log(values, step=int(row["step"]))

    def close(self) -> None:
        self.run.finish()
