"""``train(recipe, ...)``: a whole run, from data and tokenizer to the ``final/`` checkpoint.

This module wires the parts together (world, sources, tokenizer, model, encoder, checkpoints)
and hands the loop to ``train.trainer.train_stages``. Run directory::

    recipe.yaml  metrics.jsonl  loss.png  tokenizer/  world/ (if generated)
    checkpoints/step-XXXXXX/  (model checkpoint + training_state/)
    final/                    (model checkpoint with recipe.yaml)
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from vlmkit.config import ConfigError, Recipe, recipe_to_yaml
from vlmkit.data.bad_samples import BadSampleLog
from vlmkit.train.checkpoints import CheckpointManager, latest_checkpoint
from vlmkit.train.parallel import Parallel, barrier, init_distributed, run_strategy
from vlmkit.train.trainer import RunContext, StopRun, train_stages
from vlmkit.utils.io import atomic_directory, atomic_write_text, read_jsonl

log = logging.getLogger("vlmkit.train")

RUN_MARKERS = ("recipe.yaml", "metrics.jsonl", "checkpoints", "final")
KEEP_LAST = 2


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def check_run_dir(out_dir: Path, resume: bool) -> None:
    """Refuse to overwrite an earlier run unless resuming it."""
    found = [m for m in RUN_MARKERS if (out_dir / m).exists()]
    if found and not resume:
        raise ConfigError(
            f"{out_dir} already holds a run ({', '.join(found)}); pass --resume to continue it "
            "or choose another --out"
        )


def used_sources(recipe: Recipe) -> list[str]:
    return [name for name in recipe.data if any(name in s.data for s in recipe.stages)]


def ensure_world(recipe: Recipe, world_dir: Path) -> Path:
    from vlmkit.data.worlds.shapes import generate_world

    w = recipe.world
    generate_world(world_dir, n_train=w.train, n_test=w.test, seed=w.seed, size=w.size)
    return world_dir


def _turns(item) -> list:
    """The turns of a Sample, or of both answers of a PreferencePair."""
    if hasattr(item, "turns"):
        return item.turns
    chosen, rejected = item.as_samples()
    return [*chosen.turns, rejected.turns[-1]]


def build_tokenizer(recipe: Recipe, sources: dict, data_dir: Path, out_dir: Path):
    """The tiny BPE trained on the data's text (saved under ``out_dir/tokenizer``, reused), or
    the named tokenizer."""
    from vlmkit.data.tokenizer import load_tokenizer, train_tiny_tokenizer

    if recipe.model.tokenizer != "tiny":
        return load_tokenizer(recipe.model.tokenizer)[0]
    tok_dir = out_dir / "tokenizer"
    if (tok_dir / "tokenizer.json").exists():
        return load_tokenizer(tok_dir)[0]
    texts = [t.text for src in sources.values() for s in src.samples for t in _turns(s)]
    if (data_dir / "world.json").exists():
        from vlmkit.data.worlds.shapes import world_texts

        texts += list(world_texts(data_dir))
    with atomic_directory(tok_dir) as tmp:
        train_tiny_tokenizer(texts, recipe.model.tokenizer_vocab_size, tmp)
    return load_tokenizer(tok_dir)[0]


def build_model(recipe: Recipe, tokenizer):
    """A fresh model for ``tokenizer``, or the checkpoint ``model.init_from`` (with its tokenizer).

    With ``model.init_parts`` the model is built from the recipe for the checkpoint's tokenizer
    and only the listed parts' weights come from the checkpoint (see ``copy_parts``).
    """
    from vlmkit.models.checkpoint_io import load_checkpoint
    from vlmkit.models.vlm import VisionLanguageModel

    if recipe.model.init_from:
        source, tokenizer = load_checkpoint(recipe.model.init_from)
        if recipe.model.init_parts is None:
            return source, tokenizer
        model = VisionLanguageModel.from_config(recipe.model, tokenizer)
        copy_parts(source, model, recipe.model.init_parts, recipe.model.init_from)
        return model, tokenizer
    return VisionLanguageModel.from_config(recipe.model, tokenizer), tokenizer


def copy_parts(source, target, parts: list[str], where: str) -> None:
    """Copy the weights of ``parts`` from ``source`` to ``target``.

    Every parameter of the part in ``target`` must exist with the same shape in ``source``,
    except the cross-attention blocks the target's fusion inserts into its LLM (they keep their
    fresh, zero-gated values). Decoder layers that the target wraps for cross-attention
    (``layers.{i}.layer.*``) take the source's plain ``layers.{i}.*`` weights.
    """
    import re

    def plain_name(key: str) -> str:  # layers.{i}.layer.X (wrapped for cross-attention) -> layers.{i}.X
        return re.sub(r"(layers\.\d+)\.layer\.", r"\1.", key)

    for part in parts:
        src_state = source.parts()[part].state_dict()
        dst = target.parts()[part]
        dst_state = dst.state_dict()
        new_state, missing, mismatched = {}, [], []
        for key, value in dst_state.items():
            if ".xattn." in key and part == "llm":
                new_state[key] = value
                continue
            src_key = key if key in src_state else plain_name(key)
            if src_key not in src_state:
                missing.append(key)
            elif src_state[src_key].shape != value.shape:
                mismatched.append(key)
            else:
                new_state[key] = src_state[src_key]
        used = {plain_name(k) for k in dst_state} | set(dst_state)
        unexpected = [k for k in src_state if k not in used and ".xattn." not in k]
        if missing or mismatched or unexpected:
            raise ConfigError(
                f"model.init_parts: part {part!r} of {where} does not fit the recipe's model: "
                f"missing {missing[:3]}, shape mismatch {mismatched[:3]}, unexpected {unexpected[:3]}"
            )
        dst.load_state_dict(new_state)


def prepare_model(recipe: Recipe, sources: dict, data_dir: Path, out_dir: Path, ckpt: Path | None, resume: bool,
                  quiet: bool = False):  # fmt: skip
    """(model, tokenizer): from the checkpoint we resume, else built fresh (see build_model).
    ``quiet``: a data-parallel rank after the first, which only reads what rank 0 wrote."""
    from vlmkit.models.checkpoint_io import load_checkpoint

    if ckpt is not None:
        if not quiet:
            print(f"resuming from {ckpt}")
            truncate_metrics(out_dir / "metrics.jsonl", int(ckpt.name.split("-")[1]))
        return load_checkpoint(ckpt)
    if resume and not quiet:
        print(f"no complete checkpoint under {out_dir / 'checkpoints'}: starting from scratch")
        truncate_metrics(out_dir / "metrics.jsonl", 0)
    tokenizer = build_tokenizer(recipe, sources, data_dir, out_dir) if not recipe.model.init_from else None
    if recipe.model.vision.pretrain is not None and not recipe.model.init_from:
        recipe = with_pretrained_encoder(recipe, data_dir, out_dir / "encoder")
    seed_everything(recipe.seed)  # the same init whether or not the world/tokenizer/encoder were cached
    return build_model(recipe, tokenizer)


def with_pretrained_encoder(recipe: Recipe, data_dir: Path, encoder_dir: Path) -> Recipe:
    """Pre-train the preset encoder (``model.vision.pretrain``), or reuse the one already in
    ``encoder_dir``; the returned recipe loads it like any pretrained encoder."""
    from vlmkit.models.vision import PRESETS
    from vlmkit.train.encoder_pretrain import pretrain_encoder

    vision = recipe.model.vision
    if vision.pretrain.method == "contrastive":
        return with_contrastive_encoder(recipe, data_dir, encoder_dir)
    if vision.name not in PRESETS:
        raise ConfigError(
            f"model.vision.pretrain: only the presets {list(PRESETS)} are pre-trained here; "
            f"{vision.name!r} is loaded with its own pre-trained weights"
        )
    if not (data_dir / "world.json").is_file():
        raise ConfigError(f"model.vision.pretrain: needs the shapes world's scene labels; {data_dir} has no world.json")
    p = vision.pretrain
    accuracy = pretrain_encoder(data_dir, encoder_dir, vision, steps=p.steps, batch_size=p.batch_size, lr=p.lr,
                                seed=recipe.seed)  # fmt: skip
    print(f"encoder pre-trained ({p.steps} steps): held-out accuracy " + ", ".join(f"{k} {v:.3f}" for k, v in accuracy.items()))
    pretrained = vision.model_copy(update={"name": str(encoder_dir), "pretrain": None})
    return recipe.model_copy(update={"model": recipe.model.model_copy(update={"vision": pretrained})})


def contrastive_encoder_recipe(recipe: Recipe):
    """The dual-encoder recipe that pre-trains ``recipe``'s image encoder contrastively on the
    world's captions (``model.vision.pretrain.method: contrastive``)."""
    from vlmkit.config import (
        ContrastiveRecipe,
        ContrastiveStageConfig,
        DataSource,
        DualEncoderConfig,
        StageConfig,
        TrainConfig,
    )

    vision = recipe.model.vision
    p = vision.pretrain
    stage = StageConfig(name="contrastive", kind="contrastive", objective="contrastive", data={"captions": 1.0},
                        trainable=["vision", "text", "*_proj.*", "logit_*"], lr=p.lr, batch_size=p.batch_size,
                        steps=p.steps, warmup_steps=min(50, p.steps // 10), log_every=25,
                        contrastive=ContrastiveStageConfig(hard_negatives=p.hard_negatives,
                                                           negatives_per_caption=p.negatives_per_caption))  # fmt: skip
    return ContrastiveRecipe(
        kind="contrastive", name=f"{recipe.name}-encoder", seed=recipe.seed,
        model=DualEncoderConfig(vision=vision.model_copy(update={"pretrain": None}), loss=p.loss),
        data={"captions": DataSource(path="train.json", tasks=["caption"])}, stages=[stage],
        train=TrainConfig(tensorboard=False, device=recipe.train.device), world=recipe.world,
    )  # fmt: skip


def with_contrastive_encoder(recipe: Recipe, data_dir: Path, encoder_dir: Path) -> Recipe:
    """Train the CLIP/SigLIP dual encoder of ``contrastive_encoder_recipe`` in ``encoder_dir``
    (resumed if interrupted, reused if finished); the VLM loads its exported image tower."""
    from vlmkit.eval.contrastive_eval import evaluate_dual_encoder
    from vlmkit.train.contrastive_run import IMAGE_TOWER_DIR, train_contrastive

    if not (data_dir / "world.json").is_file():
        raise ConfigError(f"model.vision.pretrain: contrastive pre-training reads the shapes world's captions; "
                          f"{data_dir} has no world.json")  # fmt: skip
    final = encoder_dir / "final"
    if not (final / IMAGE_TOWER_DIR).is_dir():
        resume = (encoder_dir / "checkpoints").is_dir()
        train_contrastive(contrastive_encoder_recipe(recipe), data_dir, encoder_dir, resume=resume)
        results = evaluate_dual_encoder(final, data_dir, encoder_dir / "eval")
        zs = results["tasks"]["shapes_zeroshot"]["metrics"]
        print("encoder pre-trained contrastively: zero-shot top-1 on held-out single objects "
              + ", ".join(f"{k} {v['top1']:.3f}" for k, v in zs["by_attribute"].items()))
    pretrained = recipe.model.vision.model_copy(update={"name": str(final / IMAGE_TOWER_DIR), "pretrain": None})
    return recipe.model_copy(update={"model": recipe.model.model_copy(update={"vision": pretrained})})


def enable_activation_checkpointing(model) -> list[str]:
    """transformers' gradient checkpointing on every part that has it (the LLM's decoder layers,
    HF vision transformers); returns the parts it was enabled on."""
    enabled = []
    modules = {"llm": model.llm}
    for i, enc in enumerate(getattr(model.vision, "encoders", [model.vision])):
        modules[f"vision.{i}"] = enc.model
    for name, module in modules.items():
        if getattr(module, "supports_gradient_checkpointing", False):
            kwargs = {"use_reentrant": False}
            if hasattr(module, "activation_checkpointing_enable"):  # transformers >= 5.2x
                module.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                module.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            enabled.append(name)
    if "llm" not in enabled:
        raise ConfigError("train.activation_checkpointing: the LLM does not support gradient checkpointing")
    log.info("activation checkpointing on: %s", ", ".join(enabled))
    return enabled


def compile_blocks(model) -> int:
    """``torch.compile`` each LLM decoder layer and each vision encoder in place (parameter names
    and checkpoints are unchanged); returns how many modules were compiled. Per block rather than
    the whole model: the image splicing and packing masks are data-dependent Python, and every
    decoder layer shares one compiled graph.

    ``dynamic=True``: every size is symbolic from the first compilation. Packed rows (and
    length-grouped batches) have a new shape at every step; with PyTorch's default a size is
    made symbolic only after it has changed once, so each size that happened to repeat over the
    first steps costs another compilation later, in the middle of training (seen on an H100 as
    1-2 s steps among 0.3 s ones, docs/benchmarks.md)."""
    from vlmkit.models.cross_attention import decoder_layers

    modules = list(decoder_layers(model.llm))
    modules += [enc.model for enc in getattr(model.vision, "encoders", [model.vision])]
    for module in modules:
        module.compile(dynamic=True)
    log.info("torch.compile: %d modules", len(modules))
    return len(modules)


def make_encoder(recipe: Recipe, model, tokenizer):
    """``stage -> encode`` sharing one image cache across stages."""
    from vlmkit.data.dataset import SampleEncoder
    from vlmkit.data.image_pipeline import ImagePipeline
    from vlmkit.data.template import ChatTemplate

    template = ChatTemplate(tokenizer)
    encoders: dict[int, SampleEncoder] = {}  # by image size: a highres stage changes it

    def encoder_now() -> SampleEncoder:
        size = model.config.vision.image_size
        if size not in encoders:
            # untiled models keep the plain processor: one [3, S, S] tensor per image
            pipeline = ImagePipeline.for_model(model)
            processor = pipeline if recipe.model.tiling is not None else pipeline.processor
            encoders[size] = SampleEncoder(template, processor, model.tokens_per_image,
                                           max_len=recipe.stages[0].max_seq_len)  # fmt: skip
        return encoders[size]

    def encode_for(stage):
        limited = encoder_now().with_max_len(stage.max_seq_len)
        return limited.encode_pair if stage.objective == "dpo" else limited.encode

    return template, encode_for


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop metric rows a killed run logged after the checkpoint we resume from."""
    if path.exists():
        rows = [r for r in read_jsonl(path) if r.get("step", 0) <= last_step]
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def plot_losses(metrics_path: Path, out_png: Path) -> Path | None:
    """loss vs global step, a dashed line and a label where each stage begins."""
    rows = read_jsonl(metrics_path) if metrics_path.exists() else []
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1)
    previous = None
    for r in rows:
        if r["stage"] != previous:
            start = r["step"] - r.get("stage_step", 1)
            ax.axvline(start, color="grey", ls="--", lw=0.8)
            ax.text(start, 1.0, f" {r['stage']}", transform=ax.get_xaxis_transform(), va="top", fontsize=8)
            previous = r["stage"]
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean over target tokens)")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def run_context(recipe, out: Path, bad_log: BadSampleLog, save_model, parallel: Parallel, ckpt: Path | None, *,
                collate_fn, pad_id: int, save_every: int | None, max_steps: int | None,
                stop_after_steps: int | None) -> RunContext:  # fmt: skip
    """The stage loop's context for a run of any recipe kind, with its metric sinks (TensorBoard,
    Weights & Biases) on the main rank."""
    env = parallel.env
    ctx = RunContext(
        run_dir=out,
        bad_log=bad_log,
        collate_fn=collate_fn,
        pad_id=pad_id,
        seed=recipe.seed,
        device=parallel.device,
        checkpoints=CheckpointManager(out / "checkpoints", save_model, keep_last=KEEP_LAST),
        save_every=save_every if save_every is not None else recipe.train.save_every,
        max_steps=max_steps,
        stop_after_steps=stop_after_steps,
        max_nonfinite_in_a_row=recipe.train.max_nonfinite_in_a_row,
        parallel=parallel,
    )
    if recipe.train.tensorboard and env.is_main:
        from vlmkit.train.metric_sinks import TensorBoardSink

        purge = int(ckpt.name.split("-")[1]) + 1 if ckpt is not None else None
        ctx.sinks.append(TensorBoardSink(out / "tensorboard", purge_step=purge))
    if recipe.train.wandb is not None and env.is_main:
        from vlmkit.train.metric_sinks import WandbSink

        ctx.sinks.append(WandbSink(recipe.train.wandb.project, recipe.name, recipe.model_dump(mode="json"), out))
    return ctx


class RunStart(NamedTuple):
    """What every recipe kind sets up before its model (``start_run``)."""

    out: Path  # the run directory
    env: Any  # parallel.DistEnv
    device: torch.device
    parallel: Parallel
    data: Path  # the dataset root
    bad_log: BadSampleLog
    sources: dict
    ckpt: Path | None  # the checkpoint to resume from


def start_run(recipe, data_dir: str | Path | None, out_dir: str | Path | None, resume: bool,
              strategy: str | None) -> RunStart:  # fmt: skip
    """Process group, run directory (refusing to overwrite a run unless resuming), world,
    ``recipe.yaml``, data sources and the checkpoint to resume from, for a VLM or a
    contrastive recipe alike. Under torchrun rank 0 writes and the others wait."""
    from vlmkit.data.dataset import load_sources

    out = Path(out_dir) if out_dir is not None else Path("runs") / recipe.name
    env, device = init_distributed(resolve_device(recipe.train.device))
    parallel = Parallel(env, run_strategy(recipe.stages, strategy), device)
    check_run_dir(out, resume)
    barrier(env)  # every rank has looked before rank 0 writes
    seed_everything(recipe.seed)
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if data_dir is None:
            ensure_world(recipe, out / "world")
        atomic_write_text(out / "recipe.yaml", recipe_to_yaml(recipe))
    barrier(env)
    data = Path(data_dir) if data_dir is not None else out / "world"
    bad_log = BadSampleLog(max_fraction=recipe.train.max_bad_fraction)
    sources = load_sources(recipe.data, data, bad_log, names=used_sources(recipe))
    ckpt = latest_checkpoint(out / "checkpoints") if resume else None
    return RunStart(out, env, device, parallel, data, bad_log, sources, ckpt)


def train(
    recipe: Recipe,
    data_dir: str | Path | None = None,
    out_dir: str | Path | None = None,
    max_steps: int | None = None,
    save_every: int | None = None,
    resume: bool = False,
    stop_after_steps: int | None = None,
    strategy: str | None = None,
) -> Path | None:
    """Train every stage of ``recipe``; returns ``out_dir/final``.

    With ``stop_after_steps`` (tests) the run stops after that many global steps as if killed
    (no final checkpoint, no plot) and ``None`` is returned. Under torchrun every rank calls
    this; rank 0 writes the run directory (the others wait where it writes shared files), and
    ``strategy`` (``ddp``/``fsdp``, default: the stages') picks the data-parallel wrapping.
    """
    from vlmkit.config import ContrastiveRecipe
    from vlmkit.data.collate import collate
    from vlmkit.models.checkpoint_io import save_checkpoint

    if isinstance(recipe, ContrastiveRecipe):  # a dual encoder: the same loop, another model
        from vlmkit.train.contrastive_run import train_contrastive

        return train_contrastive(recipe, data_dir, out_dir, max_steps, save_every, resume, stop_after_steps, strategy)
    out, env, device, parallel, data, bad_log, sources, ckpt = start_run(recipe, data_dir, out_dir, resume, strategy)
    # rank 0 first: it trains the tokenizer or pre-trains the encoder; the others then read them
    if env.is_main:
        model, tokenizer = prepare_model(recipe, sources, data, out, ckpt, resume)
    barrier(env)
    if not env.is_main:
        model, tokenizer = prepare_model(recipe, sources, data, out, ckpt, resume, quiet=True)
    barrier(env)
    model.to(device)
    if recipe.train.activation_checkpointing:
        enable_activation_checkpointing(model)
    if recipe.train.compile:  # after activation checkpointing, before sharding (torchtitan's order)
        compile_blocks(model)
    template, make_encode = make_encoder(recipe, model, tokenizer)
    parallel.prepare(model)

    def save_model(m, d, state_dict=None):
        save_checkpoint(m, tokenizer, d, recipe=recipe, state_dict=state_dict)

    ctx = run_context(recipe, out, bad_log, save_model, parallel, ckpt, collate_fn=collate,
                      pad_id=template.pad_token_id, save_every=save_every, max_steps=max_steps,
                      stop_after_steps=stop_after_steps)  # fmt: skip
    try:
        train_stages(model, recipe.stages, sources, make_encode, ctx, resume_from=ckpt)
    except StopRun as stop:
        log.warning("%s (stop_after_steps)", stop)
        return None
    finally:
        for sink in ctx.sinks:
            sink.close()
    final = out / "final"
    full_state = parallel.model_state(model) if parallel.sharded else None  # every rank gathers
    if env.is_main:
        with atomic_directory(final) as tmp:
            save_model(model, tmp, state_dict=full_state)
        plot_losses(out / "metrics.jsonl", out / "loss.png")
    print(f"bad samples{f' (rank {env.rank})' if env.distributed else ''}: {bad_log.summary()}")
    barrier(env)
    return final
