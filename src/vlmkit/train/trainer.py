"""The training loop: one ``StageTrainer`` per stage, ``train_stages`` runs them in order.

The loop knows the model only through its stage's objective (``train.objectives``: batches,
what the loss counts, the loss) and ``model.parts()`` (for trainable entries);
samples reach it through an ``encode(sample, root) -> (Encoded, [pixels])`` callable and a
``collate`` function. Everything that touches files beyond checkpoints and metrics lives in
``train.run``.

One optimizer step = ``grad_accum`` micro-batches of ``batch_size`` rows. All micro-batches of
the step are drawn and collated first, so what the loss counts over the whole step (target
tokens, or preference pairs for DPO) is known before any forward pass; each micro-batch's summed
loss is divided by that total. The gradient is therefore exactly that of the mean loss over the
step, whatever the split into micro-batches.

Data-parallel runs (``train.parallel``): every rank draws the same mixture positions for the
step and encodes only its share of each micro-batch (``batch_size / world_size`` rows); the
total the loss is divided by is summed over ranks, so the step equals one process's on the
same global batch. A bad sample is then dropped from its rank's share, not replaced (the ranks'
mixtures must stay in step).
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from vlmkit.config import StageConfig
from vlmkit.data.bad_samples import BadSampleError, BadSampleLog, TooManyBadSamples
from vlmkit.data.mixture import MixtureSampler
from vlmkit.train.checkpoints import SHARDED_OPTIMIZER_DIR, STATE_DIR, CheckpointManager
from vlmkit.models.lora import add_lora, has_lora, merge_lora
from vlmkit.models.varlen_attention import packed_attention, packed_attention_hint
from vlmkit.train.objectives import make_objective
from vlmkit.train.parallel import DistEnv, Parallel, barrier, broadcast_object, check_stage
from vlmkit.train.stages import build_optimizer
from vlmkit.train.state import capture_rng, load_training_state, read_progress
from vlmkit.utils.io import append_jsonl

log = logging.getLogger("vlmkit.train")

EncodeFn = Callable[[Any, Path], tuple[Any, list[torch.Tensor]]]


class StopRun(Exception):
    """Raised after ``stop_after_steps`` global steps: the run ends as if killed (tests)."""


class NonFiniteLoss(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient norm."""


def stage_total_steps(stage: StageConfig, mixture_size: int, max_steps: int | None = None) -> int:
    """``stage.steps``, or ``epochs`` passes over the mixture; capped by ``max_steps``."""
    if stage.steps is not None:
        total = stage.steps
    else:
        total = max(1, math.ceil(stage.epochs * mixture_size / (stage.batch_size * stage.grad_accum)))
    return min(total, max_steps) if max_steps else total


def stage_seed(seed: int, stage_index: int) -> int:
    return (seed * 1_000_003 + stage_index) % 2**63


@dataclass
class RunContext:
    """What every stage of a run shares: where to write, counters, and run-wide options."""

    run_dir: Path
    bad_log: BadSampleLog
    collate_fn: Callable
    pad_id: int
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    checkpoints: CheckpointManager | None = None
    save_every: int | None = None
    max_steps: int | None = None
    stop_after_steps: int | None = None
    progress_bar: bool = True
    max_nonfinite_in_a_row: int = 3
    sinks: list = field(default_factory=list)  # more destinations of the metric rows (TensorBoard)
    parallel: Parallel = field(default_factory=lambda: Parallel(DistEnv(), None, torch.device("cpu")))
    nonfinite_in_a_row: int = 0
    nonfinite_skipped: int = 0
    global_step: int = 0
    tokens_seen: int = 0
    elapsed_before: float = 0.0
    started: float = field(default_factory=time.perf_counter)

    @property
    def env(self) -> DistEnv:
        return self.parallel.env

    @property
    def metrics_path(self) -> Path:
        return Path(self.run_dir) / "metrics.jsonl"

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    def bad_state(self) -> dict:
        return {"seen": self.bad_log.seen, "bad": [list(b) for b in self.bad_log.bad]}

    def restore(self, progress: dict) -> None:
        self.global_step = progress["global_step"]
        self.tokens_seen = progress["tokens_seen"]
        self.elapsed_before = progress.get("elapsed_s", 0.0)
        self.started = time.perf_counter()
        nonfinite = progress.get("nonfinite", {})
        self.nonfinite_in_a_row = nonfinite.get("in_a_row", 0)
        self.nonfinite_skipped = nonfinite.get("skipped", 0)
        self.bad_log.seen = progress["bad_samples"]["seen"]
        self.bad_log.bad = [tuple(b) for b in progress["bad_samples"]["bad"]]


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    lr: float
    lrs: dict[str, float]
    n_targets: int  # what the objective counts: target tokens (next_token) or pairs (dpo)
    n_tokens: int
    data_s: float = 0.0  # seconds spent drawing, encoding and collating the step's rows
    stats: dict[str, float] = field(default_factory=dict)  # objective metrics, means over n_targets


class StageTrainer:
    """Trains ``model`` for one stage: optimizer, schedule, data mixture, loop, checkpoints."""

    def __init__(
        self, model: nn.Module, stage: StageConfig, stage_index: int, sources: dict, encode: EncodeFn, ctx: RunContext
    ):
        self.model, self.stage, self.stage_index = model, stage, stage_index
        self.sources, self.encode, self.ctx = sources, encode, ctx
        check_stage(stage, ctx.env, ctx.parallel.strategy)
        sizes = {name: len(sources[name].samples) for name in stage.data}
        self.mixture = MixtureSampler(sizes, stage.data, seed=stage_seed(ctx.seed, stage_index))
        self.total_steps = stage_total_steps(stage, len(self.mixture), ctx.max_steps)
        if stage.lora is not None and not has_lora(model):  # (a mid-stage checkpoint has them already)
            add_lora(model, stage.lora)
        self.optimizer, self.scheduler, self.selected = build_optimizer(model, stage, self.total_steps)
        self.objective = make_objective(stage, model, ctx.run_dir, write_reference=ctx.env.is_main)
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.module = ctx.parallel.forward_module(model)  # what forward passes call (DDP wraps it)
        self.stage_step = 0

    # ---------------------------------------------------------------- data

    def encode_slot(self, name: str, index: int):
        """(Encoded, pixels) of one mixture position, or None (logged, counted) when it is bad."""
        src = self.sources[name]
        sample = src.samples[index]
        try:
            item = self.encode(sample, src.root)
        except BadSampleError as err:
            self.ctx.bad_log.record(f"{src.path} (source {name}, row {index})", sample.id, err)
            return None
        self.ctx.bad_log.ok()
        return item

    def next_item(self):
        """The next good (Encoded, pixels) of the mixture; bad ones are logged and skipped."""
        for _ in range(len(self.mixture) + 1):
            item = self.encode_slot(*self.mixture.next())
            if item is not None:
                return item
        raise TooManyBadSamples(f"stage {self.stage.name}: no good sample in {len(self.mixture) + 1} draws")

    def _grouped(self, items: list) -> list:
        by_length, by_modality = self.stage.group_by_length, self.stage.group_by_modality
        if by_length or by_modality:  # stable: ties keep the draw order
            items = sorted(items, key=lambda item: (self.objective.has_images(item) if by_modality else False,
                                                    self.objective.length(item) if by_length else 0))  # fmt: skip
        return items

    def next_micro_batches(self) -> list[dict]:
        n, accum = self.stage.batch_size, self.stage.grad_accum
        if self.ctx.env.distributed:
            shares = self._rank_shares(n, accum)
        else:
            step_items = self._grouped([self.next_item() for _ in range(n * accum)])
            shares = [step_items[k * n : (k + 1) * n] for k in range(accum)]
        return [self.objective.collate(items, self.ctx.collate_fn, self.ctx.pad_id) for items in shares]

    def _rank_shares(self, n: int, accum: int) -> list[list]:
        """This rank's rows of each micro-batch: every rank draws the step's ``n * accum``
        positions (so the mixtures stay in step) and encodes rows ``[rank * n/W, (rank+1) * n/W)``
        of each micro-batch. Bad rows are dropped; a share left empty gets a placeholder row
        with no targets, so that the rank still joins the step's collectives."""
        env = self.ctx.env
        per_rank = n // env.world_size
        slots = [self.mixture.next() for _ in range(n * accum)]
        shares = []
        for k in range(accum):
            mine = slots[k * n + env.rank * per_rank : k * n + (env.rank + 1) * per_rank]
            items = [item for item in (self.encode_slot(*slot) for slot in mine) if item is not None]
            shares.append(self._grouped(items) or [self.objective.placeholder(self.ctx.pad_id)])
        return shares

    # ---------------------------------------------------------------- one step

    def _autocast(self):
        if self.ctx.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.ctx.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def forward_backward(self, batches: list[dict]) -> tuple[float, int, int, dict[str, float]]:
        """Accumulate gradients of the step's mean loss (per target token, or per pair);
        returns (loss, count, tokens, objective stats as means)."""
        parallel = self.ctx.parallel
        total = int(parallel.all_reduce_sum([sum(self.objective.count(b) for b in batches)])[0])
        denom = max(total, 1)
        scale = parallel.grad_scale / denom  # DDP/FSDP average over ranks: undo it, then the global mean
        loss_sum, tokens = torch.zeros((), dtype=torch.float64), 0
        stats: dict[str, float] = {}
        for k, batch in enumerate(batches):
            batch = self._to_device(batch)
            with parallel.gradient_sync(self.module, sync=k == len(batches) - 1):
                with self._autocast():
                    part, _, part_stats = self.objective.loss_sum(self.module, batch)
                (part.float() * scale).backward()
            loss_sum += part.detach().double().cpu()
            tokens += int(batch["attention_mask"].sum())
            for name, v in part_stats.items():
                stats[name] = stats.get(name, 0.0) + v
        names = sorted(stats)
        summed = parallel.all_reduce_sum([float(loss_sum), tokens, *(stats[n] for n in names)])
        return summed[0] / denom, total, int(summed[1]), {n: v / denom for n, v in zip(names, summed[2:])}

    def train_step(self) -> StepResult:
        self.model.train()
        t0 = time.perf_counter()
        batches = self.next_micro_batches()
        data_s = time.perf_counter() - t0
        loss, n_targets, n_tokens, stats = self.forward_backward(batches)
        clip = self.stage.grad_clip if self.stage.grad_clip is not None else float("inf")
        grad_norm = self.ctx.parallel.grad_norm(self.params, clip)
        lrs = {g["name"]: g["lr"] for g in self.optimizer.param_groups}
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.ctx.nonfinite_in_a_row = 0
            self.optimizer.step()
            after_step = getattr(self.objective, "after_step", None)
            if after_step is not None:  # e.g. clamp a contrastive model's temperature
                after_step(self.model)
        else:
            self._skip_nonfinite(loss, grad_norm, batches)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.stage_step += 1
        self.ctx.global_step += 1
        self.ctx.tokens_seen += n_tokens
        return StepResult(loss, grad_norm, max(lrs.values()), lrs, n_targets, n_tokens, data_s, stats)

    def _skip_nonfinite(self, loss: float, grad_norm: float, batches: list[dict]) -> None:
        """No update for this step (the schedule and the data still move on); too many such
        steps in a row stop the run, naming the step and its samples."""
        ctx = self.ctx
        ctx.nonfinite_in_a_row += 1
        ctx.nonfinite_skipped += 1
        step = ctx.global_step + 1
        ids = [sid for b in batches for sid in b.get("sample_ids", [])]
        what = f"stage {self.stage.name} step {step}: loss {loss}, gradient norm {grad_norm}"
        if ctx.nonfinite_in_a_row >= ctx.max_nonfinite_in_a_row:
            raise NonFiniteLoss(
                f"{what}: {ctx.nonfinite_in_a_row} non-finite steps in a row (train.max_nonfinite_in_a_row); "
                f"the last step's samples: {ids}"
            )
        tqdm.write(f"skipped {what} (non-finite; {ctx.nonfinite_skipped} skipped so far); samples: {ids}")

    # ---------------------------------------------------------------- state

    def progress(self) -> dict:
        return {
            "stage_index": self.stage_index,
            "stage_name": self.stage.name,
            "stage_step": self.stage_step,
            "stage_total": self.total_steps,
            "stage_end": self.stage_step >= self.total_steps,
            "global_step": self.ctx.global_step,
            "tokens_seen": self.ctx.tokens_seen,
            "elapsed_s": self.ctx.elapsed(),
            "bad_samples": self.ctx.bad_state(),
            "nonfinite": {"in_a_row": self.ctx.nonfinite_in_a_row, "skipped": self.ctx.nonfinite_skipped},
        }

    def load_state(self, state_dir: Path) -> None:
        """Continue from a checkpoint taken inside this stage (model weights already loaded)."""
        parallel = self.ctx.parallel
        sharded = state_dir / SHARDED_OPTIMIZER_DIR
        if sharded.is_dir():  # FSDP2 shards: re-sharded for this world size
            info = load_training_state(state_dir, None, None, self.scheduler, rank=self.ctx.env.rank)
            groups = json.loads((state_dir / "optimizer.json").read_text(encoding="utf-8"))["param_groups"]
            parallel.load_sharded_optimizer(self.model, self.optimizer, sharded, groups)
        else:
            info = load_training_state(state_dir, None, lambda sd: parallel.load_optimizer_state(self.model, self.optimizer, sd),
                                       self.scheduler, rank=self.ctx.env.rank)  # fmt: skip
        self.mixture.load_state_dict(info["mixture"])
        self.stage_step = info["progress"]["stage_step"]

    def save(self) -> Path | None:
        """A checkpoint. Data-parallel: every rank takes part (full states are gathered, every
        rank's RNG state is kept); rank 0 writes."""
        ctx = self.ctx
        if ctx.checkpoints is None:
            return None
        parallel = ctx.parallel
        rngs = parallel.gather_objects(capture_rng())
        shards = groups = model_state = None
        optimizer = self.optimizer  # unsharded: identical on every rank, rank 0 writes it whole
        if parallel.sharded:  # every rank writes its optimizer shards; rank 0 moves them in
            if ctx.env.is_main:
                shards = ctx.checkpoints.shard_dir(ctx.global_step)
            shards = Path(broadcast_object(ctx.env, str(shards) if shards else None))
            groups = parallel.save_sharded_optimizer(self.model, self.optimizer, shards)
            model_state = parallel.model_state(self.model)
            optimizer = None
        path = None
        if ctx.env.is_main:
            path = ctx.checkpoints.save(self.model, optimizer, self.scheduler, self.progress(),
                                        self.mixture.state_dict(), rng_of_ranks=rngs, model_state=model_state,
                                        sharded_optimizer=shards, sharded_param_groups=groups)  # fmt: skip
            tqdm.write(f"checkpoint {path} (stage {self.stage.name}, step {ctx.global_step})")
        barrier(ctx.env)
        return path

    # ---------------------------------------------------------------- loop

    def _log(self, result: StepResult, window: dict) -> None:
        now = time.perf_counter()
        row = {
            "stage": self.stage.name,
            "step": self.ctx.global_step,
            "stage_step": self.stage_step,
            "loss": result.loss,
            "lr": result.lr,
            "lrs": result.lrs,
            "grad_norm": result.grad_norm,
            "n_targets": result.n_targets,
            "tokens_per_s": window["tokens"] / max(now - window["t0"], 1e-9),
            # share of the window's wall time spent preparing data (in-process, not overlapped)
            "data_fraction": window["data_s"] / max(now - window["t0"], 1e-9),
            "tokens_seen": self.ctx.tokens_seen,
            "elapsed_s": round(self.ctx.elapsed(), 3),
            "bad_samples": len(self.ctx.bad_log.bad),
            "skipped_nonfinite": self.ctx.nonfinite_skipped,
            **result.stats,
        }
        if self.ctx.env.is_main:
            append_jsonl(self.ctx.metrics_path, row)
            for sink in self.ctx.sinks:
                sink(row)
        window.update(tokens=0, data_s=0.0, t0=now)

    def _should_log(self) -> bool:
        s = self.stage_step
        return s == 1 or s % self.stage.log_every == 0 or s >= self.total_steps

    def _should_save(self) -> bool:
        every = self.ctx.save_every
        return self.stage_step >= self.total_steps or bool(every and self.ctx.global_step % every == 0)

    def run(self) -> None:
        bar = tqdm(
            total=self.total_steps, initial=self.stage_step, desc=f"stage {self.stage.name}",
            unit="step", dynamic_ncols=True, disable=not (self.ctx.progress_bar and self.ctx.env.is_main),
        )
        window = {"tokens": 0, "data_s": 0.0, "t0": time.perf_counter()}
        with bar:
            while self.stage_step < self.total_steps:
                result = self.train_step()
                window["tokens"] += result.n_tokens
                window["data_s"] += result.data_s
                tok_s = window["tokens"] / max(time.perf_counter() - window["t0"], 1e-9)
                bar.update(1)
                bar.set_postfix(loss=f"{result.loss:.4f}", tok_s=f"{tok_s:.0f}", refresh=False)
                if self._should_log():
                    self._log(result, window)
                if self.stage_step >= self.total_steps and self.stage.lora is not None:
                    merge_lora(self.model)  # the stage ends with plain weights
                if self._should_save():
                    self.save()
                stop = self.ctx.stop_after_steps
                if stop is not None and self.ctx.global_step >= stop:
                    raise StopRun(f"stopped after {self.ctx.global_step} steps")


def train_stages(
    model: nn.Module,
    stages: list[StageConfig],
    sources: dict,
    make_encode: Callable[[StageConfig], EncodeFn],
    ctx: RunContext,
    resume_from: Path | None = None,
) -> None:
    """Run ``stages`` in order; with ``resume_from`` (a checkpoint directory whose weights are
    already in ``model``) continue exactly where that checkpoint was taken."""
    start, state_dir, mid_stage = 0, None, False
    if resume_from is not None:
        state_dir = Path(resume_from) / STATE_DIR
        progress = read_progress(state_dir)["progress"]
        ctx.restore(progress)
        mid_stage = not progress["stage_end"]
        start = progress["stage_index"] + (0 if mid_stage else 1)
    for i in range(start, len(stages)):
        if stages[i].image_size is not None:  # high-resolution continuation: from this stage on
            model.set_image_size(stages[i].image_size)
        trainer = StageTrainer(model, stages[i], i, sources, make_encode(stages[i]), ctx)
        if state_dir is not None and i == start:
            if mid_stage:
                trainer.load_state(state_dir)
            else:  # a stage-end checkpoint: only the RNG carries over to the next stage
                load_training_state(state_dir, None, None, None, rank=ctx.env.rank)
        log.info("stage %d/%d %s: %d steps", i + 1, len(stages), stages[i].name, trainer.total_steps)
        if stages[i].packing is not None and getattr(model, "config", None) is not None:
            llm = model.config.llm
            log.info("packed rows: %s", packed_attention(llm.attn_implementation, ctx.device, model.llm.config))
            hint = packed_attention_hint(llm.attn_implementation, ctx.device, stages[i].packing.tokens,
                                         model.llm.config)  # fmt: skip
            if hint:
                log.info("packed rows: %s", hint)
        trainer.run()
        del trainer  # a DDP wrapper's gradient hooks must go before the next stage wraps again
        gc.collect()
    if state_dir is not None and start >= len(stages):
        load_training_state(state_dir, None, None, None, rank=ctx.env.rank)
