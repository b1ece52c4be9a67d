"""``vlmkit train`` for recipes of ``kind: contrastive``: a CLIP / SigLIP dual encoder
(`models.contrastive`) trained on image-caption pairs by the same loop as a VLM.

Everything but the model is shared with `train.run`: the run directory and its refusal to
overwrite, the world, the data sources and mixtures, bad-sample counting, the stage loop
(`train.trainer`, objective `train.objectives.ContrastiveObjective`), checkpoints with full
training state, ``--resume``, metrics.jsonl / TensorBoard, torchrun DDP. Run directory::

    recipe.yaml  metrics.jsonl  loss.png  tokenizer/  world/ (if generated)
    checkpoints/step-XXXXXX/  (dual encoder + training_state/)
    final/                    (dual encoder, recipe.yaml)
    final/image_tower/        (the image encoder alone, as a Hugging Face vision model: what a
                               VLM recipe loads with ``model.vision.name: <run>/final/image_tower``)

A pair is a sample's first image and its answer (the last assistant turn): a caption when the
source is filtered to caption rows (``tasks: [caption]``). A sample without either is a bad
sample, named and counted like any other.
"""

from __future__ import annotations

import logging
from pathlib import Path

from vlmkit.config import ConfigError, ContrastiveRecipe, recipe_to_yaml
from vlmkit.data.bad_samples import BadSampleError
from vlmkit.data.images import ImageProcessor, load_image
from vlmkit.data.sample import Sample
from vlmkit.train.parallel import barrier
from vlmkit.train.run import plot_losses, run_context, seed_everything, start_run, truncate_metrics
from vlmkit.train.trainer import StopRun, train_stages
from vlmkit.utils.io import atomic_directory, atomic_write_text

log = logging.getLogger("vlmkit.train")

IMAGE_TOWER_DIR = "image_tower"


class CaptionTokens(list):
    """A caption's token ids, carrying its sample's id (for the trainer's error messages) and
    the ids of its hard-negative captions (none, or up to ``negatives_per_caption``)."""

    def __init__(self, ids: list[int], sample_id: str | None, negatives: list[list[int]] | None = None):
        super().__init__(ids)
        self.sample_id = sample_id
        self.negatives = negatives or []


def hard_negative_captions(sample: Sample, caption: str, attributes: list[str], k: int = 1) -> list[str]:
    """Up to ``k`` distinct captions of the sample's scene, each with one attribute of one
    object changed, written in the same style as ``caption`` (the world's short or detailed
    caption); none when the sample has no scene graph or its caption is neither. Drawn from a
    generator seeded by the sample's id, so a resumed run sees the same negatives. Fewer than
    ``k`` when the scene has fewer distinct changes (a one-object scene has 5 other shapes)."""
    import random

    from vlmkit.data.worlds.shapes import caption_detailed, caption_short
    from vlmkit.train.fusion_objectives import perturb_scene

    scene = sample.meta.get("scene")
    if not scene or not scene.get("objects"):
        return []
    style = next((f for f in (caption_short, caption_detailed) if f(scene) == caption), None)
    if style is None:
        return []
    rng = random.Random(f"hard-negative:{sample.id}")
    found: list[str] = []
    for _ in range(4 * k):  # a few tries per slot: two draws can make the same change
        changed, _ = perturb_scene(scene, rng.choice(attributes), rng)
        text = style(changed)
        if text != caption and text not in found:
            found.append(text)
        if len(found) == k:
            break
    return found


def pair_of(sample: Sample) -> tuple:
    """``(image reference, caption)`` of a sample: its first image and its last answer."""
    caption = sample.target_text()
    if not sample.images:
        raise BadSampleError("no_image", "a contrastive pair needs an image")
    if not caption or not caption.strip():
        raise BadSampleError("no_caption", "a contrastive pair needs an answer (the caption)")
    return sample.images[0], caption.strip()


def make_pair_encoder(tokenizer, processor: ImageProcessor, max_length: int, options=None):
    """``encode(sample, root) -> (CaptionTokens, [pixels [3, S, S]])`` for the trainer;
    ``options`` (a stage's ``ContrastiveStageConfig``) may ask for hard negatives."""
    from vlmkit.models.contrastive import tokenize_texts

    def ids_of(text: str) -> list[int]:
        return tokenize_texts(tokenizer, [text], max_length)["input_ids"][0].tolist()

    def encode(sample: Sample, root: Path):
        ref, caption = pair_of(sample)
        image = load_image(ref, root)  # BadSampleError for a missing or corrupt image
        negatives = []
        if options is not None and options.hard_negatives:
            texts = hard_negative_captions(sample, caption, options.attributes, options.negatives_per_caption)
            negatives = [ids_of(text) for text in texts]
        return CaptionTokens(ids_of(caption), sample.id, negatives), [processor(image)]

    return encode


def _tokenizer(recipe: ContrastiveRecipe, sources: dict, data_dir: Path, out_dir: Path):
    """The text tower's tokenizer: the tiny BPE trained once on the captions (and the world's
    vocabulary) and kept in ``out_dir/tokenizer``, or the named HF tokenizer."""
    from vlmkit.data.tokenizer import load_tokenizer
    from vlmkit.models.contrastive import TEXT_PRESETS, build_text_tokenizer

    text = recipe.model.text
    if text.name not in TEXT_PRESETS:
        return build_text_tokenizer(text)
    tok_dir = out_dir / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        texts = [s.target_text() or "" for src in sources.values() for s in src.samples]
        if (data_dir / "world.json").exists():
            from vlmkit.data.worlds.shapes import world_texts

            texts += list(world_texts(data_dir))
        with atomic_directory(tok_dir) as tmp:
            build_text_tokenizer(text, texts=texts, out_dir=tmp)
    return load_tokenizer(tok_dir)[0]


def _model(recipe: ContrastiveRecipe, sources: dict, data_dir: Path, out_dir: Path, ckpt: Path | None, quiet: bool):
    from vlmkit.models.contrastive import build_dual_encoder, load_dual_encoder

    if ckpt is not None:
        if not quiet:
            print(f"resuming from {ckpt}")
            truncate_metrics(out_dir / "metrics.jsonl", int(ckpt.name.split("-")[1]))
        return load_dual_encoder(ckpt)
    tokenizer = _tokenizer(recipe, sources, data_dir, out_dir)
    seed_everything(recipe.seed)  # the same init whether or not the tokenizer was cached
    return build_dual_encoder(recipe.model, tokenizer), tokenizer


def train_contrastive(
    recipe: ContrastiveRecipe,
    data_dir: str | Path | None = None,
    out_dir: str | Path | None = None,
    max_steps: int | None = None,
    save_every: int | None = None,
    resume: bool = False,
    stop_after_steps: int | None = None,
    strategy: str | None = None,
) -> Path | None:
    """Train every stage of a contrastive recipe; returns ``out_dir/final`` (``None`` after
    ``stop_after_steps``). Under torchrun every rank calls this; rank 0 writes."""
    from vlmkit.models.contrastive import export_image_tower, save_dual_encoder

    if strategy == "fsdp":
        raise ConfigError("--strategy fsdp: contrastive recipes run under DDP (the towers are small)")
    out, env, device, parallel, data, bad_log, sources, ckpt = start_run(recipe, data_dir, out_dir, resume, strategy)
    if resume and ckpt is None and env.is_main:
        print(f"no complete checkpoint under {out / 'checkpoints'}: starting from scratch")
        truncate_metrics(out / "metrics.jsonl", 0)
    if env.is_main:  # rank 0 first: it trains the tokenizer; the others then read it
        model, tokenizer = _model(recipe, sources, data, out, ckpt, quiet=False)
    barrier(env)
    if not env.is_main:
        model, tokenizer = _model(recipe, sources, data, out, ckpt, quiet=True)
    barrier(env)
    model.to(device)
    parallel.prepare(model)
    def encode_for(stage):
        return make_pair_encoder(tokenizer, model.image_processor(), recipe.model.text.max_length, stage.contrastive)

    def save_model(m, d, state_dict=None):
        save_dual_encoder(m, tokenizer, d)
        atomic_write_text(Path(d) / "recipe.yaml", recipe_to_yaml(recipe))

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ctx = run_context(recipe, out, bad_log, save_model, parallel, ckpt, collate_fn=None, pad_id=pad_id,
                      save_every=save_every, max_steps=max_steps, stop_after_steps=stop_after_steps)  # fmt: skip
    try:
        train_stages(model, recipe.stages, sources, encode_for, ctx, resume_from=ckpt)
    except StopRun as stop:
        log.warning("%s (stop_after_steps)", stop)
        return None
    finally:
        for sink in ctx.sinks:
            sink.close()
    final = out / "final"
    if env.is_main:
        with atomic_directory(final) as tmp:
            save_model(model, tmp)
            export_image_tower(model, tmp / IMAGE_TOWER_DIR)
        plot_losses(out / "metrics.jsonl", out / "loss.png")
    print(f"bad samples{f' (rank {env.rank})' if env.distributed else ''}: {bad_log.summary()}")
    barrier(env)
    return final
