"""The recipe schema (pydantic), YAML loading and ``--set key=value`` overrides.

Each config class maps one-to-one onto the component it builds:
``VisionConfig`` -> models.vision, ``ConnectorConfig`` -> models.connectors,
``LLMConfig`` -> the causal LM, ``StageConfig`` -> one run of train.trainer.
Unknown keys are errors (``extra="forbid"``), reported with their key path.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A recipe that can't be used; the message names the key path and what was expected."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ------------------------------------------------------------------ model


class EncoderPretrainConfig(StrictModel):
    """Pre-training of a preset encoder on the shapes world before the VLM stages; the
    pre-trained encoder replaces the preset. ``supervised``: on the scene labels
    (``train.encoder_pretrain``). ``contrastive``: as the image tower of a CLIP / SigLIP dual
    encoder on the world's captions (``train.run.contrastive_encoder_recipe``), the way the
    field's encoders were made."""

    method: Literal["supervised", "contrastive"] = "supervised"
    loss: Literal["clip", "siglip"] = "clip"  # contrastive only
    hard_negatives: bool = True  # contrastive only: NegCLIP's one-attribute-changed captions
    negatives_per_caption: int = Field(1, ge=1, le=8)  # contrastive only: that many per image
    steps: int = Field(400, gt=0)
    batch_size: int = Field(32, gt=0)
    lr: float = Field(2e-3, gt=0)


class FusedEncoderConfig(StrictModel):
    """A further encoder run on the same image and fused channel-wise with the main one
    (Prismatic VLMs' DINOv2 + SigLIP). It sees the same pixels, re-normalised with its own
    statistics; its feature grid is interpolated to the main encoder's grid."""

    name: str  # a preset or a hub name / local path
    feature_layer: int | list[int] | None = None
    overrides: dict[str, Any] = Field(default_factory=dict)


class VisionConfig(StrictModel):
    """The image encoder: a preset built from a config (random weights), or any HF vision model.

    ``name`` is a preset (``tiny-cnn``, ``tiny-vit``) or a hub name / local path.
    ``feature_layer`` is an index into the model's hidden states, or a list of indices whose
    features are concatenated channel-wise; None takes the family's default.
    """

    name: str = "tiny-cnn"
    image_size: int = Field(64, gt=0)
    feature_layer: int | list[int] | None = None  # None: the family's default (-2 for ViTs, -1 for CNNs)
    preprocess: Literal["resize", "letterbox", "resize-crop"] = "resize"
    overrides: dict[str, Any] = Field(default_factory=dict)  # HF config fields for presets
    pretrain: EncoderPretrainConfig | None = None  # presets only: pre-train on the world first
    fused: list[FusedEncoderConfig] = Field(default_factory=list)  # further encoders, fused channel-wise

    @field_validator("feature_layer")
    @classmethod
    def _layers(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("feature_layer: an empty list selects no layer")
        return v


class ConnectorConfig(StrictModel):
    """Maps vision features to the LLM. ``type`` is a key of models.connectors.CONNECTORS
    (``linear``, ``mlpNx_gelu``, ``perceiver``, ``qformer``).

    Order of operations: pool (``pool_tokens``) -> pixel shuffle -> projector -> output norm.
    ``fusion`` says how the LLM reads the result: ``splice`` puts the image embeddings in place
    of ``<image>`` tokens (LLaVA); ``cross_attention`` keeps one ``<image>`` marker token per
    image and lets gated cross-attention blocks (Flamingo) read the embeddings.
    """

    type: str = "mlp2x_gelu"
    pixel_shuffle: int = Field(1, ge=1)  # factor s: s*s fewer tokens, each s*s times wider
    pool_tokens: int | None = Field(None, gt=0)  # average-pool the square grid to this many tokens
    num_queries: int = Field(64, gt=0)  # perceiver latents / Q-Former queries (tokens per image)
    num_layers: int = Field(2, gt=0)  # perceiver / Q-Former blocks
    num_heads: int = Field(4, gt=0)  # attention heads in perceiver / Q-Former / cross-attention
    output_norm: bool = False  # RMS-normalise connector outputs to the LLM's embedding scale
    fusion: Literal["splice", "cross_attention"] = "splice"
    cross_attention_every: int = Field(1, gt=0)  # a gated block before every k-th decoder layer
    # which images a text token may attend to: the last one before it (Flamingo) or all before it
    cross_attention_media: Literal["last", "all"] = "last"


class TilingConfig(StrictModel):
    """High-resolution input as several encoder-sized tiles (data.tiling).

    * ``anyres`` (LLaVA-NeXT): pick the best canvas from ``grid_pinpoints`` ([height, width] in
      pixels, multiples of the encoder's ``image_size``), cut it into tiles, add a global
      thumbnail; the model strips the padding from the feature map and ends each row of
      features with a learned newline embedding.
    * ``split`` (Idefics3 / SmolVLM): resize so the longest side is at most ``max_side``
      (rounded up to whole tiles), cut into tiles, add a global thumbnail; every tile is
      preceded by a ``<row_i_col_j>`` marker token and the thumbnail by ``<global-img>``.
    """

    mode: Literal["anyres", "split"]
    grid_pinpoints: list[tuple[int, int]] | None = None  # anyres; None: 1x1 .. 2x2 tiles and 1x3/3x1
    max_side: int | None = Field(None, gt=0)  # split; None: 4 tiles on the longest side
    newline: bool = True  # anyres: learned newline embedding at the end of each feature row


class LLMConfig(StrictModel):
    """The causal LM: a preset (``tiny-llama``) or any ``AutoModelForCausalLM`` hub name / path."""

    name: str = "tiny-llama"
    overrides: dict[str, Any] = Field(default_factory=dict)
    # the attention kernel: "auto" (packed rows through PyTorch's varlen FlashAttention on a GPU,
    # SDPA with a block-diagonal mask elsewhere; SDPA for all else), "varlen" (packed rows always
    # through a varlen path, vlmkit's per-group SDPA on CPU), both models/varlen_attention.py;
    # or transformers' own: "sdpa" (PyTorch's fused kernels; packed rows densely, masked),
    # "eager" (plain matmuls), "flash_attention_2" (needs the flash-attn package)
    attn_implementation: Literal["auto", "varlen", "sdpa", "eager", "flash_attention_2"] = "auto"


class ModelConfig(StrictModel):
    vision: VisionConfig = Field(default_factory=VisionConfig)
    connector: ConnectorConfig = Field(default_factory=ConnectorConfig)
    llm: LLMConfig = Field(default_factory=LLMConfig)
    tiling: TilingConfig | None = None  # None: one encoder-sized image per image
    # "tiny": a byte-level BPE trained on the data's text; otherwise the LLM's own tokenizer
    tokenizer: str = "tiny"
    tokenizer_vocab_size: int = Field(1024, gt=64)
    init_from: str | None = None  # a vlmkit checkpoint directory to start from
    # with init_from: copy only these parts' weights (e.g. [vision, llm] to try a new
    # connector on shared pre-trained parts); None copies the whole checkpoint
    init_parts: list[Literal["vision", "connector", "llm"]] | None = None


# ------------------------------------------------------------------ dual encoders (models.contrastive)

MAX_LOGIT_SCALE = 100.0  # CLIP's cap on the learned temperature's inverse
CLIP_INIT_LOGIT_SCALE = math.log(1 / 0.07)  # Radford et al. 2021
SIGLIP_INIT_LOGIT_SCALE = math.log(10.0)  # Zhai et al. 2023
SIGLIP_INIT_LOGIT_BIAS = -10.0


class TextTowerConfig(StrictModel):
    """The text encoder: the ``tiny-text`` preset or any HF text encoder (hub name / path)."""

    name: str = "tiny-text"
    pooling: Literal["cls", "mean", "eos"] = "mean"
    max_length: int = Field(77, gt=1)  # tokens per text (EOS included); tiny-text's position table
    overrides: dict[str, Any] = Field(default_factory=dict)  # HF config fields (presets: any BertConfig field)
    tokenizer_vocab_size: int = Field(1024, gt=64)  # tiny-text: the byte-level BPE trained on the data's text


class DualEncoderConfig(StrictModel):
    """A CLIP / SigLIP dual encoder. ``init_logit_scale`` is the *log* of the initial scale
    (None: ``log(1/0.07)`` for clip, ``log(10)`` for siglip); ``init_logit_bias`` is SigLIP's
    (None: -10)."""

    vision: VisionConfig = Field(default_factory=VisionConfig)
    text: TextTowerConfig = Field(default_factory=TextTowerConfig)
    embed_dim: int = Field(128, gt=0)
    loss: Literal["clip", "siglip"] = "clip"
    init_logit_scale: float | None = None
    init_logit_bias: float | None = None

    @model_validator(mode="after")
    def _bias(self) -> "DualEncoderConfig":
        if self.loss == "clip" and self.init_logit_bias is not None:
            raise ValueError("init_logit_bias: only the siglip loss has a learned bias")
        if self.init_logit_scale is not None and self.init_logit_scale > math.log(MAX_LOGIT_SCALE):
            raise ValueError(
                f"init_logit_scale is a log: {self.init_logit_scale} means a scale of "
                f"{math.exp(self.init_logit_scale):.3g}, over the cap of {MAX_LOGIT_SCALE:g}"
            )
        return self

    @property
    def logit_scale_init(self) -> float:
        if self.init_logit_scale is not None:
            return float(self.init_logit_scale)
        return SIGLIP_INIT_LOGIT_SCALE if self.loss == "siglip" else CLIP_INIT_LOGIT_SCALE

    @property
    def logit_bias_init(self) -> float:
        return float(self.init_logit_bias) if self.init_logit_bias is not None else SIGLIP_INIT_LOGIT_BIAS



# ------------------------------------------------------------------ data


class DataSource(StrictModel):
    """A dataset file, optionally filtered to some tasks. Paths are relative to ``--data``."""

    path: str
    # llava: conversations (Samples); llava-preference: prompts with chosen/rejected answers (DPO);
    # interleaved: OBELICS-style documents (texts and images in reading order), loss on all text
    format: Literal["llava", "llava-preference", "interleaved"] = "llava"
    tasks: list[str] | None = None  # keep only samples whose meta.task is listed
    # text-only copies: images and their placeholders removed (LM warm-up, blind baselines)
    drop_images: bool = False


# ------------------------------------------------------------------ training


class LoRAConfig(StrictModel):
    """LoRA adapters (Hu et al. 2021, through peft) for one stage: the adapted parts' base
    weights stay frozen, a trainable entry naming such a part trains its adapters, and the
    adapters are merged into the weights when the stage ends (train/lora.py)."""

    r: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    parts: list[Literal["llm", "vision"]] = Field(default_factory=lambda: ["llm"])  # never the connector
    # "all-linear" (the part's linear layers, the LM head excluded) or layer-name globs: [q_proj, v_proj]
    modules: Literal["all-linear"] | list[str] = "all-linear"


class DPOConfig(StrictModel):
    """Direct Preference Optimization (Rafailov et al. 2023) against a frozen reference: the
    model as the stage begins (saved to ``<run>/reference-<stage>/``), or none."""

    beta: float = Field(0.1, gt=0)
    reference_free: bool = False  # compare the policy's own log-probabilities, no reference model


class ContrastiveStageConfig(StrictModel):
    """Options of a contrastive stage. ``hard_negatives`` (NegCLIP, Yuksekgonul et al. 2023):
    each image also meets its own caption with one attribute of one object changed (a shapes-
    world scene re-captioned with another ``attributes`` value), so colours or positions alone
    no longer tell the pairs apart; rows without a scene graph get none."""

    hard_negatives: bool = False
    # hard-negative captions per image, each a different change (more of them: more of the
    # softmax spent on the attribute; docs/contrastive.md)
    negatives_per_caption: int = Field(default=1, ge=1, le=8)
    # shape only by default: the world's colours are learned without help, shapes last (docs/contrastive.md)
    attributes: list[Literal["shape", "color", "size"]] = Field(default_factory=lambda: ["shape"])


# MM1 (McKinzie et al. 2024): captions : interleaved documents : text-only = 5 : 5 : 1
MM1_PRETRAIN_MIXTURE = {"captions": 5.0, "documents": 5.0, "text": 1.0}


class PackingConfig(StrictModel):
    """Sequence packing (``data.packing``): the micro-batch's samples share rows of at most
    ``tokens`` tokens and ``max_images`` images, each sample attending only to itself."""

    tokens: int = Field(..., gt=0)  # row budget; at least the stage's max_seq_len
    max_images: int | None = Field(None, gt=0)  # per row; None: no image budget


class StageConfig(StrictModel):
    """One training stage: what trains, on which data, for how long, at which rates."""

    name: str
    # next_token: cross-entropy on assistant turns; dpo: preference pairs (sources in llava-preference
    # format); contrastive: CLIP / SigLIP on image-caption pairs (recipes of kind contrastive)
    objective: Literal["next_token", "dpo", "contrastive"] = "next_token"
    dpo: DPOConfig = Field(default_factory=DPOConfig)
    contrastive: ContrastiveStageConfig = Field(default_factory=ContrastiveStageConfig)
    lora: LoRAConfig | None = None  # train the named parts through LoRA adapters
    # what the stage is for (logs, docs, defaults): align | pretrain | highres | instruct | dpo | contrastive
    kind: Literal["align", "pretrain", "highres", "instruct", "dpo", "contrastive"] | None = None
    # source name -> mixture weight; kind pretrain defaults to MM1's captions : documents : text = 5 : 5 : 1
    data: dict[str, float] = Field(default_factory=dict)
    # train (and save) the model at this image size from this stage on: high-resolution continuation
    image_size: int | None = Field(None, gt=0)
    trainable: list[str]  # part names ("vision", "connector", "llm") or parameter-name globs
    lr: dict[str, float] | float  # per trainable entry, or one rate for all
    # one value, or one per trainable entry (missing entries: 0); never applied to norms and biases
    weight_decay: dict[str, float] | float = 0.0
    batch_size: int = Field(16, gt=0)
    grad_accum: int = Field(1, gt=0)
    # sort the step's batch_size * grad_accum rows by length before cutting them into its
    # micro-batches, so short rows are not padded to the longest (HF Trainer's group_by_length,
    # within one step): the step's loss and gradient stay those of the same rows
    group_by_length: bool = False
    # sort the step's rows so image-free rows share micro-batches (which then skip the vision
    # tower); with group_by_length too, by modality first, then length. Same rows, same loss
    group_by_modality: bool = False
    steps: int | None = Field(None, gt=0)
    epochs: float | None = Field(None, gt=0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    grad_clip: float | None = Field(1.0, gt=0)
    max_seq_len: int = Field(256, gt=0)
    # next_token: compute the loss from the hidden states this many target positions at a time,
    # never holding the whole logits tensor; "auto": 1024 at a time for an LLM of 32k or more
    # vocabulary entries (where the logits are a step's largest activation), full logits below
    # (train.losses.resolve_loss_chunk); null: always the LM's own full logits
    loss_chunk_tokens: Annotated[int, Field(gt=0)] | Literal["auto"] | None = "auto"
    packing: PackingConfig | None = None  # next_token stages: pack the micro-batch's samples into rows
    # under torchrun: DistributedDataParallel, or FSDP2 (fully_shard); every stage of a run the same
    strategy: Literal["ddp", "fsdp"] = "ddp"
    log_every: int = Field(10, gt=0)

    @model_validator(mode="after")
    def _length(self) -> "StageConfig":
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("set exactly one of steps or epochs")
        if not self.data:
            if self.kind != "pretrain":
                raise ValueError("data: name the sources and their mixture weights (only kind pretrain has a default)")
            self.data = dict(MM1_PRETRAIN_MIXTURE)
        if self.kind == "dpo" and self.objective != "dpo":
            raise ValueError("kind dpo needs objective: dpo")
        if self.kind == "contrastive" and self.objective != "contrastive":
            raise ValueError("kind contrastive needs objective: contrastive")
        if self.packing is not None:
            if self.objective != "next_token":
                raise ValueError("packing: only next_token stages pack (a DPO pair's two answers share one prompt)")
            if self.packing.tokens < self.max_seq_len:
                raise ValueError(f"packing.tokens ({self.packing.tokens}) must be at least max_seq_len ({self.max_seq_len})")
            if self.group_by_length:
                raise ValueError("packing and group_by_length: packing already removes the padding; choose one")
        if isinstance(self.lr, dict):
            missing = [t for t in self.trainable if t not in self.lr]
            if missing:
                raise ValueError(f"lr has no rate for trainable entries {missing}")
        decays = self.weight_decay.values() if isinstance(self.weight_decay, dict) else [self.weight_decay]
        if any(d < 0 for d in decays):
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if isinstance(self.weight_decay, dict):
            unknown = [k for k in self.weight_decay if k not in self.trainable]
            if unknown:
                raise ValueError(f"weight_decay names entries {unknown} that are not in trainable {self.trainable}")
        return self


class WandbConfig(StrictModel):
    project: str


class TrainConfig(StrictModel):
    save_every: int | None = Field(None, gt=0)
    max_bad_fraction: float = Field(0.01, ge=0, le=1)
    # a step with a non-finite loss or gradient norm is skipped; this many in a row stop the run
    max_nonfinite_in_a_row: int = Field(3, gt=0)
    tensorboard: bool = True  # metric rows also as TensorBoard scalars under <run>/tensorboard
    # recompute each LLM decoder layer (and encoder layer, where the HF model supports it) in
    # the backward pass instead of keeping its activations: less memory for more compute (not benchmarked yet)
    activation_checkpointing: bool = False
    # torch.compile each LLM decoder layer and each vision encoder (per block, as torchtitan does):
    # the first steps pay for compilation (tens of seconds), later ones run fused kernels
    compile: bool = False
    wandb: WandbConfig | None = None  # also to Weights & Biases (needs the wandb package)
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"


class EvalConfig(StrictModel):
    batch_size: int = Field(32, gt=0)
    max_new_tokens: int = Field(40, gt=0)  # room for a box: ~30 tokens
    limit: int | None = Field(None, gt=0)
    tasks: list[str] = Field(
        default_factory=lambda: ["shapes_vqa", "shapes_pope", "shapes_grounding", "shapes_mcq"]
    )


class WorldConfig(StrictModel):
    """Options for generating the shapes world when a recipe is run without ``--data``."""

    train: int = Field(4000, gt=0)
    test: int = Field(500, gt=0)
    seed: int = 0
    size: int = Field(64, gt=0)


def _check_sources(stages: list[StageConfig], data: dict[str, DataSource]) -> None:
    for i, stage in enumerate(stages):
        for src in stage.data:
            if src not in data:
                raise ValueError(
                    f"stages.{i}.data names source {src!r}, which is not under data (known: {sorted(data)})"
                )
            wants = {"dpo": ("llava-preference",), "contrastive": ("llava",)}.get(stage.objective, ("llava", "interleaved"))
            if data[src].format not in wants:
                raise ValueError(
                    f"stages.{i}.data: source {src!r} is in format {data[src].format!r}, but a "
                    f"{stage.objective} stage reads {' or '.join(map(repr, wants))} sources"
                )


def _check_stage_names(v: list[StageConfig]) -> list[StageConfig]:
    if not v:
        raise ValueError("a recipe needs at least one stage")
    names = [s.name for s in v]
    if len(set(names)) != len(names):
        raise ValueError(f"stage names must be unique, got {names}")
    return v


class _StagedRecipe(StrictModel):
    """What every recipe has: a name, a seed, data sources and an ordered list of stages."""

    name: str
    seed: int = 0
    data: dict[str, DataSource]
    stages: list[StageConfig]
    train: TrainConfig = Field(default_factory=TrainConfig)
    world: WorldConfig = Field(default_factory=WorldConfig)

    @field_validator("stages")
    @classmethod
    def _nonempty(cls, v: list[StageConfig]) -> list[StageConfig]:
        return _check_stage_names(v)

    def stage(self, name: str) -> StageConfig:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)


class Recipe(_StagedRecipe):
    """A vision-language model trained in stages (``kind: vlm``, the default)."""

    kind: Literal["vlm"] = "vlm"
    model: ModelConfig = Field(default_factory=ModelConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _sources_exist(self) -> "Recipe":
        for i, stage in enumerate(self.stages):
            if stage.objective == "contrastive":
                raise ValueError(f"stages.{i}.objective: contrastive stages train a dual encoder (kind: contrastive)")
        _check_sources(self.stages, self.data)
        return self


class ContrastiveRecipe(_StagedRecipe):
    """A CLIP / SigLIP dual encoder (``models.contrastive``) trained on image-caption pairs
    (``kind: contrastive``): the same stages, checkpoints, resume, logging and bad-input
    handling as a VLM recipe; every stage's objective is ``contrastive``."""

    kind: Literal["contrastive"]
    model: DualEncoderConfig = Field(default_factory=DualEncoderConfig)

    @model_validator(mode="after")
    def _contrastive_stages(self) -> "ContrastiveRecipe":
        for i, stage in enumerate(self.stages):
            if stage.objective != "contrastive":
                raise ValueError(f"stages.{i}.objective: a contrastive recipe's stages are contrastive, "
                                 f"not {stage.objective!r}")  # fmt: skip
            if stage.strategy != "ddp" or stage.lora is not None or stage.packing is not None:
                raise ValueError(f"stages.{i}: contrastive stages run plain or under DDP (no fsdp, lora, packing)")
            if stage.image_size is not None:
                raise ValueError(f"stages.{i}.image_size: set model.vision.image_size for a dual encoder")
        _check_sources(self.stages, self.data)
        return self


# ------------------------------------------------------------------ loading and overrides


def _format_errors(err: ValidationError, source: str, what: str = "recipe") -> str:
    lines = [f"invalid {what} {source}:"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see docs/recipes.md)"
        lines.append(f"  {path}: {msg}")
    return "\n".join(lines)


def _set_path(tree: Any, path: str, value: Any) -> None:
    """Set ``tree[a][b]...`` for the dotted ``path``. List items go by index or by ``name``."""
    keys = path.split(".")
    node = tree
    for depth, key in enumerate(keys):
        last = depth == len(keys) - 1
        here = ".".join(keys[: depth + 1])
        if isinstance(node, list):
            idx = _list_index(node, key, here)
            if last:
                node[idx] = value
            else:
                node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[key] = value
            else:
                if key not in node or node[key] is None:
                    node[key] = {}
                node = node[key]
        else:
            raise ConfigError(f"--set {path}: {'.'.join(keys[:depth])} is a value, not a section")


def _list_index(items: list, key: str, here: str) -> int:
    if key.lstrip("-").isdigit():
        idx = int(key)
        if not -len(items) <= idx < len(items):
            raise ConfigError(f"--set {here}: index out of range (the list has {len(items)} items)")
        return idx
    for i, item in enumerate(items):
        if isinstance(item, dict) and item.get("name") == key:
            return i
    names = [it.get("name") for it in items if isinstance(it, dict)]
    raise ConfigError(f"--set {here}: no item named {key!r} (expected an index or one of {names})")


def parse_override(text: str) -> tuple[str, Any]:
    """``"stages.align.lr=1e-3"`` -> ``("stages.align.lr", 0.001)``; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {text!r}: empty key")
    value = yaml.safe_load(raw) if raw.strip() else ""
    return key, value


def validate_tree(cls: type[BaseModel], tree: dict, overrides: list[str] = (), source: str = "<dict>",
                  what: str = "recipe"):  # fmt: skip
    """``cls`` validated from ``tree`` after the ``--set`` overrides; errors name the key path."""
    import copy

    tree = copy.deepcopy(tree)
    for text in overrides:
        key, value = parse_override(text)
        _set_path(tree, key, value)
    try:
        return cls.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source, what)) from None


RECIPE_KINDS: dict[str, type[StrictModel]] = {"vlm": Recipe, "contrastive": ContrastiveRecipe}


def recipe_from_dict(tree: dict, overrides: list[str] = (), source: str = "<dict>") -> Recipe | ContrastiveRecipe:
    """The recipe class is picked by the top-level ``kind`` (``vlm`` when absent)."""
    kind = tree.get("kind", "vlm") if isinstance(tree, dict) else "vlm"
    for text in overrides:  # an override may set the kind itself
        key, value = parse_override(text)
        if key == "kind":
            kind = value
    if kind not in RECIPE_KINDS:
        raise ConfigError(f"invalid recipe {source}:\n  kind: expected one of {sorted(RECIPE_KINDS)}, got {kind!r}")
    return validate_tree(RECIPE_KINDS[kind], tree, overrides, source)


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe | ContrastiveRecipe:
    """Load a YAML recipe file and apply ``--set`` overrides, validating the result."""
    path = Path(path)
    if not path.exists():
        builtin = Path(__file__).parent / "recipes" / f"{path.stem if path.suffix else path.name}.yaml"
        if builtin.exists():
            path = builtin
        else:
            raise ConfigError(f"recipe {path} not found")
    with open(path, encoding="utf-8") as f:
        tree = yaml.safe_load(f)
    if not isinstance(tree, dict):
        raise ConfigError(f"invalid recipe {path}: expected a mapping at the top level")
    return recipe_from_dict(tree, overrides, source=str(path))


RECIPE_KEY_ORDER = ("kind", "name", "seed", "model", "world", "data", "stages", "train", "eval")


def recipe_to_yaml(recipe: Recipe | ContrastiveRecipe) -> str:
    tree = recipe.model_dump(mode="json")
    ordered = {k: tree[k] for k in RECIPE_KEY_ORDER if k in tree}
    ordered.update({k: v for k, v in tree.items() if k not in ordered})
    return yaml.safe_dump(ordered, sort_keys=False)
