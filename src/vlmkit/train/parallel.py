"""Data parallelism for the trainer: torchrun's process group, and DDP or FSDP2 wrapping.

Model code knows nothing of this module; the trainer asks a ``Parallel`` for

* the module to call (``forward_module``): the model, ``DistributedDataParallel`` around it,
  or the model itself after ``fully_shard`` (FSDP2 changes the module in place);
* gradient sync only on the last micro-batch of a step (``gradient_sync``);
* sums across ranks (``all_reduce_sum``), for the global target count the loss is divided by
  and for logged metrics;
* full (unsharded, CPU) model and optimizer states for checkpoints, and loading them back at
  any world size.

Launch with ``torchrun --nproc-per-node N -m vlmkit train RECIPE`` (multi-node: torchrun's
rendezvous flags). Without torchrun's environment the run is a single process and ``Parallel``
is a no-op. CPU runs use the gloo backend, CUDA runs NCCL with one GPU per local rank.

FSDP2 (``torch.distributed.fsdp.fully_shard``): each LLM decoder layer is a unit, the vision
encoder is one unit, and the root unit holds the rest (embeddings, head, connector). On a GPU the
parameters are computed in bf16 and gradients reduced in fp32.

Checkpoints. The weights are gathered to rank 0 and written whole (``model.safetensors``: the
consolidated checkpoint that eval, chat and export read). The optimizer state, twice the
weights for AdamW, is written as it lies: DDP's full copy by rank 0, FSDP2's shards by every
rank through ``torch.distributed.checkpoint`` with its Hugging Face safetensors storage (no
pickle), which re-shards on load, so a run resumes at any world size.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from vlmkit.config import ConfigError

STRATEGIES = ("ddp", "fsdp")


@dataclass
class DistEnv:
    """Where this process stands in the job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device: torch.device) -> tuple[DistEnv, torch.device]:
    """Join torchrun's process group (once); returns the env and this rank's device."""
    if not launched_by_torchrun():
        return DistEnv(), device
    env = DistEnv(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return env, device


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def broadcast_object(env: DistEnv, obj):
    """Rank 0's ``obj`` on every rank (small JSON-like values only)."""
    if not env.distributed:
        return obj
    box = [obj if env.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class Parallel:
    """One run's wrapping strategy (``None``: a single process)."""

    def __init__(self, env: DistEnv, strategy: str | None, device: torch.device) -> None:
        if strategy is not None and strategy not in STRATEGIES:
            raise ConfigError(f"strategy: expected one of {STRATEGIES}, got {strategy!r}")
        self.env = env
        self.strategy = strategy if env.distributed else None
        self.device = device
        self.sharded = False

    # ------------------------------------------------------------------ wrapping

    def prepare(self, model: nn.Module) -> None:
        """Once per run, before any optimizer exists: FSDP2 shards the model in place."""
        if self.strategy is None:
            return
        # a rank whose batch has no image must still run the vision tower: its collectives
        # (FSDP all-gathers, DDP/FSDP gradient reductions) would otherwise wait forever
        model.run_vision_without_images = True
        if self.strategy == "ddp" and self.device.type == "cuda":
            # batch-norm statistics over the global batch (a CNN encoder); SyncBatchNorm needs a
            # GPU, so on CPU each rank normalises over its own rows (and losses differ from one
            # process's for such encoders; ViTs have no batch norm)
            nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if self.strategy == "fsdp":
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            from vlmkit.models.cross_attention import decoder_layers

            kwargs = {}
            if self.device.type == "cuda":
                kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            for layer in decoder_layers(model.llm):
                fully_shard(layer, **kwargs)
            fully_shard(model.vision, **kwargs)
            fully_shard(model, **kwargs)
            self.sharded = True

    def forward_module(self, model: nn.Module) -> nn.Module:
        """What a stage calls. DDP is rebuilt per stage: it registers only the parameters that
        require gradients when it is built, and stages train different parts."""
        if self.strategy != "ddp":
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        # find_unused_parameters: a ViT read at feature_layer -2 never uses its last block or
        # final norm, and DDP must not wait for their gradients
        return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False, find_unused_parameters=True)

    @contextlib.contextmanager
    def gradient_sync(self, module: nn.Module, sync: bool):
        """No gradient reduction on non-final micro-batches of a step."""
        if self.strategy == "ddp" and not sync:
            with module.no_sync():
                yield
        elif self.strategy == "fsdp":
            module.set_requires_gradient_sync(sync)
            yield
        else:
            yield

    @property
    def grad_scale(self) -> float:
        """DDP and FSDP average gradients over ranks; the trainer wants their sum (each rank's
        loss is already divided by the global target count)."""
        return float(self.env.world_size) if self.strategy is not None else 1.0

    # ------------------------------------------------------------------ collectives

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        if not self.env.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._collective_device())
        dist.all_reduce(t)
        return t.tolist()

    def gather_objects(self, obj) -> list:
        """Every rank's ``obj`` (small, in-memory values such as RNG states), in rank order."""
        if not self.env.distributed:
            return [obj]
        out = [None] * self.env.world_size
        dist.all_gather_object(out, obj)
        return out

    def _collective_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    # ------------------------------------------------------------------ state

    def model_state(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """An FSDP2-sharded model's full state, gathered on rank 0 (None elsewhere); every rank
        must call it. (Unsharded models are saved from the module itself.)"""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return full if self.env.is_main else None

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """Load a full, position-indexed optimizer state (every rank reads the same file)."""
        if not self.sharded:
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        names = _parameter_names(model)
        order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
        full = {
            "state": {order[int(i)]: value for i, value in state["state"].items()},
            "param_groups": [{**g, "params": [order[int(i)] for i in g["params"]]} for g in state["param_groups"]],
        }
        set_optimizer_state_dict(model, optimizer, full, options=StateDictOptions(full_state_dict=True))

    def save_sharded_optimizer(self, model: nn.Module, optimizer: torch.optim.Optimizer, directory) -> list[dict]:
        """Every rank writes its optimizer shards under ``directory`` (safetensors through
        ``torch.distributed.checkpoint``); returns the param groups (JSON-able, names not indices)."""
        from torch.distributed.checkpoint import HuggingFaceStorageWriter, save
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        sd = get_optimizer_state_dict(model, optimizer)
        writer = HuggingFaceStorageWriter(str(directory), save_distributed=self.env.distributed)
        save(_flatten_optimizer_state(sd["state"]), storage_writer=writer)
        return sd["param_groups"]

    def load_sharded_optimizer(self, model: nn.Module, optimizer: torch.optim.Optimizer, directory,
                               param_groups: list[dict]) -> None:  # fmt: skip
        """Load shards written by ``save_sharded_optimizer`` at any world size (or none)."""
        from torch.distributed.checkpoint import HuggingFaceStorageReader, load
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        sd = get_optimizer_state_dict(model, optimizer)  # this layout's (sharded) tensors, to fill
        flat = _flatten_optimizer_state(sd["state"])
        load(flat, storage_reader=HuggingFaceStorageReader(str(directory)))
        set_optimizer_state_dict(model, optimizer, {"state": _unflatten_optimizer_state(flat), "param_groups": param_groups})

    def grad_norm(self, params: list[torch.Tensor], clip: float) -> float:
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
        if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2: the norm over all shards
            norm = norm.full_tensor()
        return float(norm)


def _flatten_optimizer_state(state: dict) -> dict[str, torch.Tensor]:
    """``{param name: {"exp_avg": t, ...}}`` -> ``{"<param name>/exp_avg": t}`` (tensors only)."""
    flat = {}
    for name, values in state.items():
        for key, value in values.items():
            if not torch.is_tensor(value):
                raise TypeError(f"optimizer state {name}.{key} is not a tensor; it can't be sharded")
            flat[f"{name}/{key}"] = value
    return flat


def _unflatten_optimizer_state(flat: dict[str, torch.Tensor]) -> dict:
    state: dict[str, dict] = {}
    for joined, value in flat.items():
        name, key = joined.rsplit("/", 1)
        state.setdefault(name, {})[key] = value
    return state


def _parameter_names(model: nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in model.named_parameters()}


def check_stage(stage, env: DistEnv, strategy: str | None) -> None:
    """Errors that must come before the first step, naming the recipe key."""
    where = f"stages.{stage.name}"
    if env.distributed and stage.batch_size % env.world_size:
        raise ConfigError(
            f"{where}.batch_size: {stage.batch_size} rows per micro-batch can't be split over "
            f"{env.world_size} processes; use a multiple of the world size"
        )
    if env.distributed and strategy == "fsdp":
        if stage.lora is not None:
            raise ConfigError(f"{where}.lora: LoRA stages run with strategy ddp (FSDP2 shards before the adapters exist)")
        if stage.objective == "dpo" and not stage.dpo.reference_free:
            raise ConfigError(f"{where}.dpo: the frozen reference model is not sharded; use strategy ddp")


def run_strategy(stages, override: str | None) -> str:
    """The run's one strategy: ``--strategy``, else the stages' (which must agree)."""
    if override is not None:
        if override not in STRATEGIES:
            raise ConfigError(f"--strategy: expected one of {STRATEGIES}, got {override!r}")
        return override
    chosen = {s.strategy for s in stages}
    if len(chosen) > 1:
        named = ", ".join(f"{s.name}: {s.strategy}" for s in stages)
        raise ConfigError(f"stages.*.strategy: every stage of a run must use the same strategy ({named})")
    return chosen.pop()
