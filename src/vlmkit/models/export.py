"""Export a vlmkit checkpoint to other formats: ``hf-llava`` (transformers / vLLM LLaVA).

``export_checkpoint(checkpoint, out_dir, format="hf-llava")`` writes a directory that
``transformers.LlavaForConditionalGeneration.from_pretrained`` and ``AutoProcessor.from_pretrained``
load with no missing or unexpected weights, giving the same logits as the vlmkit model:

* ``model.safetensors`` in the original LLaVA-HF layout, which transformers 5 maps on load and
  which vLLM reads: ``vision_tower.<HF vision model keys>`` (``vision_tower.vision_model.*`` for
  CLIP / SigLIP), ``multi_modal_projector.linear_{1,2}.{weight,bias}``,
  ``language_model.model.*`` and ``language_model.lm_head.weight`` (written even when the
  embeddings are tied);
* ``config.json``: a ``LlavaConfig`` (vision and text configs, ``image_token_index``,
  ``vision_feature_layer``, ``vision_feature_select_strategy``, ``image_seq_length``...);
* the processor: ``processor_config.json`` (a ``LlavaProcessor``), ``preprocessor_config.json``
  (a CLIP / SigLIP image processor set up as vlmkit's ``ImageProcessor``), the tokenizer files
  and ``chat_template.jinja``; ``generation_config.json`` stops at the chat template's
  end-of-turn token and eos, as ``vlmkit chat`` does.

Only what LLaVA's architecture computes exactly is exported; anything else raises
`ExportError` naming every reason and the formats the checkpoint can be used in. See
docs/export.md.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from vlmkit.config import ModelConfig
from vlmkit.models.checkpoint_io import WEIGHTS_FILE, read_checkpoint_config
from vlmkit.utils.io import atomic_directory, atomic_write_text

FORMATS = ("hf-llava",)
VLMKIT_FORMAT = (
    "the vlmkit checkpoint format (load with vlmkit.load(path))"
)

# vision model_type -> (LLaVA vision_feature_select_strategy, CLS tokens vlmkit drops, image processor)
LLAVA_VISION = {
    "clip_vision_model": ("default", 1, "CLIPImageProcessor"),
    "siglip_vision_model": ("full", 0, "SiglipImageProcessor"),
    "dinov2": ("default", 1, "CLIPImageProcessor"),
}
_CNN = "a CNN vision encoder ({}) gives a feature map, not the ViT patch tokens LLaVA's vision tower reads"
_NOT_LLAVA_VISION = {
    "resnet": _CNN.format("ResNet; the tiny-cnn preset is one"),
    "convnext": _CNN.format("ConvNeXt"),
    "convnextv2": _CNN.format("ConvNeXt V2"),
    "siglip2_vision_model": (
        "SigLIP2 (NaFlex) takes patchified pixels with a patch mask and spatial shapes, "
        "which LLaVA's vision tower does not pass"
    ),
    "dinov2_with_registers": (
        "DINOv2 with registers: vlmkit drops the CLS and register tokens, "
        "LLaVA's 'default' strategy drops only the first token"
    ),
    "vit": (
        "LLaVA builds an HF ViT tower with a pooling layer that vlmkit's ViT encoder does not have "
        "(its weights would be missing)"
    ),
}
_MLP_RE = re.compile(r"^mlp(\d+)x_gelu$")

# vlmkit's ChatML template (data.tokenizer.DEFAULT_CHAT_TEMPLATE) rendering message contents that
# are either a string (vlmkit, identical output) or a list of {"type": "image"|"text"} parts (HF
# processors): an image part becomes "<image>", parts are joined with nothing between them, as
# vlmkit's data.template.turn_content joins a turn's parts.
LLAVA_CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- '<image>' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>' + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)


class ExportError(ValueError):
    """A checkpoint that can't be exported to the requested format.

    ``reasons`` lists every obstacle found; ``formats`` the formats the checkpoint can be used in.
    """

    def __init__(self, checkpoint, fmt: str, reasons: list[str], formats: list[str]) -> None:
        self.checkpoint = str(checkpoint)
        self.format = fmt
        self.reasons = list(reasons)
        self.formats = list(formats)
        listed = "\n".join(f"  - {r}" for r in self.reasons)
        super().__init__(
            f"cannot export {self.checkpoint} as {fmt}:\n{listed}\n"
            f"formats that apply to this checkpoint: {'; '.join(self.formats)}"
        )


# ---------------------------------------------------------------------- what can be exported


def _connector_depth(connector_type: str) -> int | None:
    """Linear layers of a ``linear`` / ``mlpNx_gelu`` connector; None for any other type."""
    if connector_type == "linear":
        return 1
    m = _MLP_RE.match(connector_type)
    return int(m.group(1)) if m else None


def hf_llava_obstacles(meta: dict) -> list[str]:
    """Why a checkpoint (its ``config.json`` as read by ``read_checkpoint_config``) can't be a
    LLaVA model; empty when it can."""
    cfg = ModelConfig.model_validate(meta["model"])
    family = meta["vision"]["family"]
    reasons: list[str] = []
    if family in _NOT_LLAVA_VISION:
        reasons.append(_NOT_LLAVA_VISION[family])
    elif family not in LLAVA_VISION and not cfg.vision.fused:
        reasons.append(
            f"vision model_type {family!r} is not one LLaVA's vision tower is exported for (CLIP, SigLIP, DINOv2)"
        )
    if cfg.vision.fused:
        reasons.append(
            f"the vision features fuse {1 + len(cfg.vision.fused)} encoders (model.vision.fused); "
            "LLaVA has one vision tower"
        )
    if cfg.vision.preprocess == "letterbox":
        reasons.append(
            "letterbox preprocessing (scale the long side, then pad with the mean colour) has no HF image "
            "processor equivalent: LlavaImageProcessor's do_pad pads to a square before resizing, "
            "which gives other pixels"
        )
    if meta.get("lora"):
        reasons.append(
            "it holds unmerged LoRA adapters (a checkpoint taken inside a LoRA stage); the stage's end "
            "merges them, so export a stage-end or final checkpoint"
        )
    if cfg.tiling is not None:
        reasons.append(
            f"tiling ({cfg.tiling.mode}) splits an image into several tiles; "
            "LLaVA takes one image-sized input per image"
        )
    con = cfg.connector
    depth = _connector_depth(con.type)
    if depth not in (1, 2):
        reasons.append(
            f"connector {con.type!r}: LLaVA's projector is linear_1 -> activation -> linear_2, which holds "
            "'linear', 'mlp1x_gelu' and 'mlp2x_gelu' only"
        )
    if con.pixel_shuffle > 1:
        reasons.append(
            f"pixel_shuffle {con.pixel_shuffle}: LLaVA feeds every patch token to the projector, no space-to-depth"
        )
    if con.pool_tokens is not None:
        reasons.append(f"pool_tokens {con.pool_tokens}: LLaVA does not pool the patch tokens")
    if con.output_norm:
        reasons.append("output_norm: LLaVA's projector has no normalisation after linear_2")
    if con.fusion != "splice":
        reasons.append(
            f"fusion {con.fusion!r}: LLaVA splices image embeddings over <image> tokens; "
            "it has no cross-attention blocks"
        )
    return reasons


def applicable_formats(checkpoint) -> list[str]:
    """The formats a vlmkit checkpoint can be used in: always vlmkit's own, plus exports that apply."""
    meta = read_checkpoint_config(checkpoint)
    formats = [VLMKIT_FORMAT]
    if not hf_llava_obstacles(meta):
        formats.insert(0, "hf-llava (vlmkit export CKPT --format hf-llava OUT)")
    return formats


# ---------------------------------------------------------------------- weights


def _projector_weights(model, depth: int) -> tuple[dict[str, torch.Tensor], str]:
    """LLaVA's ``linear_1 -> act -> linear_2`` from vlmkit's projector, and the activation name.

    One linear layer becomes ``linear_1``, the identity activation ``"linear"`` and ``linear_2`` =
    identity matrix with zero bias, which computes the same map exactly.
    """
    proj = model.connector.projector
    if depth == 1:
        first = proj.proj if hasattr(proj, "proj") else proj.layers[0]
        d = first.weight.shape[0]
        eye = torch.eye(d, dtype=first.weight.dtype)
        return {
            "linear_1.weight": first.weight,
            "linear_1.bias": first.bias,
            "linear_2.weight": eye,
            "linear_2.bias": torch.zeros(d, dtype=first.weight.dtype),
        }, "linear"
    layers = proj.layers  # Linear, GELU, Linear
    if not (isinstance(layers[1], torch.nn.GELU) and layers[1].approximate == "none"):
        raise ValueError(f"expected an exact GELU between the projector's layers, found {layers[1]}")
    return {
        "linear_1.weight": layers[0].weight,
        "linear_1.bias": layers[0].bias,
        "linear_2.weight": layers[2].weight,
        "linear_2.bias": layers[2].bias,
    }, "gelu"


def _baked_position_embeddings(vision) -> dict[str, torch.Tensor]:
    """CLIP / SigLIP at an image size other than their config's: vlmkit interpolates the position
    embeddings at every forward (``interpolate_pos_encoding``); LLaVA does not ask for it, so the
    interpolated table is written instead (and the exported vision config gets the new size).
    Returns ``{vision state-dict key: new table}``; empty when no interpolation happens."""
    hf = vision.hf_config
    if vision.family not in ("clip_vision_model", "siglip_vision_model") or int(hf.image_size) == vision.image_size:
        return {}
    tower = getattr(vision.model, "vision_model", vision.model)  # transformers 4 nests it, 5 does not
    emb = tower.embeddings
    n_cls = 1 if vision.family == "clip_vision_model" else 0
    n_new = (vision.image_size // int(hf.patch_size)) ** 2 + n_cls
    weight = emb.position_embedding.weight
    dim = weight.shape[1]
    with torch.no_grad():
        probe = torch.zeros(1, n_new, dim, dtype=weight.dtype)
        table = emb.interpolate_pos_encoding(probe, vision.image_size, vision.image_size)[0]
    if table.shape != (n_new, dim):  # pragma: no cover - guards against a change in transformers
        raise ValueError(f"interpolated position embeddings have shape {tuple(table.shape)}, expected {(n_new, dim)}")
    key = next(name for name, p in vision.model.named_parameters() if p is weight)
    return {key: table.contiguous()}


def llava_state_dict(model) -> tuple[dict[str, torch.Tensor], str]:
    """The vlmkit model's weights under LLaVA-HF's names, and the projector's activation name.

    Every vlmkit weight must land somewhere: a key this mapping does not know raises, so nothing
    is silently dropped. Shared tensors (tied embeddings) are copied so safetensors can store them.
    """
    depth = _connector_depth(model.config.connector.type)
    baked = _baked_position_embeddings(model.vision)
    proj, act = _projector_weights(model, depth)
    # CLIP / SigLIP: the original layout nests the tower under ``vision_model.`` (transformers 4's
    # module tree, which vLLM reads); transformers 5's tower is flat and strips the prefix on load
    nest = "vision_model." if model.vision.family in ("clip_vision_model", "siglip_vision_model") else ""
    out: dict[str, torch.Tensor] = {}
    connector_keys: list[str] = []
    unmapped: list[str] = []
    for key, value in model.state_dict().items():
        if key.startswith("vision.model."):
            key = key[len("vision.model.") :]
            if key.endswith("embeddings.position_ids") and baked:  # a persistent buffer in some versions
                value = torch.arange(next(iter(baked.values())).shape[0]).unsqueeze(0)
            name = key if not nest or key.startswith(nest) else nest + key
            out[f"vision_tower.{name}"] = baked.get(key, value)
        elif key.startswith("connector.projector."):
            connector_keys.append(key)
        elif key.startswith("llm.model.") or key == "llm.lm_head.weight":
            out[f"language_model.{key[len('llm.'):]}"] = value
        else:
            unmapped.append(key)
    if len(connector_keys) != 2 * depth:  # a weight of vlmkit's projector that LLaVA's would not hold
        unmapped.extend(connector_keys)
    if unmapped:
        raise ValueError(
            "these weights have no place in LLaVA's layout (the LLM must be a *ForCausalLM with its decoder "
            f"under 'model.' and an 'lm_head'): {sorted(unmapped)}"
        )
    for key, value in proj.items():
        out[f"multi_modal_projector.{key}"] = value
    if "language_model.lm_head.weight" not in out:  # tied and not listed: write it explicitly
        out["language_model.lm_head.weight"] = model.llm.get_output_embeddings().weight
    # safetensors stores no shared or non-contiguous tensors: copy what repeats
    seen: set[tuple[int, int]] = set()
    for key, value in out.items():
        value = value.detach().cpu()
        ident = (value.untyped_storage().data_ptr(), value.storage_offset())
        if ident in seen or not value.is_contiguous():
            value = value.contiguous().clone()
        seen.add((value.untyped_storage().data_ptr(), value.storage_offset()))
        out[key] = value
    return out, act


# ---------------------------------------------------------------------- config and processor


def llava_config(model, tokenizer, projector_act: str):
    """The ``LlavaConfig`` of the exported model."""
    from transformers import LlavaConfig

    vision = model.vision
    strategy, _, _ = LLAVA_VISION[vision.family]
    vision_cfg = vision.hf_config.__class__.from_dict(vision.hf_config.to_dict())
    if hasattr(vision_cfg, "image_size"):  # the size vlmkit runs at (position embeddings baked to it)
        vision_cfg.image_size = vision.image_size
    text_cfg = model.llm.config.__class__.from_dict(model.llm.config.to_dict())
    text_cfg.architectures = [type(model.llm).__name__]
    for sub in (vision_cfg, text_cfg):
        sub._name_or_path = ""  # not the paths of the machine that trained the model
    # several layers: vlmkit and LLaVA both concatenate them channel-wise in list order
    fl = vision.feature_layer
    layer = [int(i) for i in fl] if isinstance(fl, (list, tuple)) else int(fl)
    dtype = next(model.parameters()).dtype
    cfg = LlavaConfig(
        vision_config=vision_cfg,
        text_config=text_cfg,
        image_token_index=int(model.image_token_id),
        image_seq_length=int(model.tokens_per_image),
        projector_hidden_act=projector_act,
        vision_feature_select_strategy=strategy,
        vision_feature_layer=layer,
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(text_cfg, "tie_word_embeddings", False)),
    )
    cfg.architectures = ["LlavaForConditionalGeneration"]
    cfg.dtype = str(dtype).removeprefix("torch.")
    return cfg


def image_processor_kwargs(vision, preprocess: str) -> dict[str, Any]:
    """Settings that make a CLIP / SigLIP image processor compute vlmkit's ``ImageProcessor``."""
    s = int(vision.image_size)
    kw: dict[str, Any] = dict(
        do_convert_rgb=True,
        do_resize=True,
        resample=3,  # PIL bicubic, as vlmkit's ImageProcessor
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(vision.image_mean),
        image_std=list(vision.image_std),
        crop_size={"height": s, "width": s},
    )
    if preprocess == "resize":
        kw.update(size={"height": s, "width": s}, do_center_crop=False)
    elif preprocess == "resize-crop":
        kw.update(size={"shortest_edge": s}, do_center_crop=True)
    else:  # pragma: no cover - refused by hf_llava_obstacles
        raise ValueError(f"preprocess {preprocess!r} can't be exported")
    return kw


def llava_processor(model, tokenizer):
    """A ``LlavaProcessor``: the tokenizer (with a chat template that also takes HF-style content
    lists) and an image processor reproducing vlmkit's preprocessing."""
    import transformers
    from transformers import LlavaProcessor

    from vlmkit.data.tokenizer import DEFAULT_CHAT_TEMPLATE

    vision = model.vision
    strategy, n_cls, ip_name = LLAVA_VISION[vision.family]
    preprocess = model.config.vision.preprocess
    if ip_name == "SiglipImageProcessor" and preprocess != "resize":
        ip_name = "CLIPImageProcessor"  # SigLIP's processor has no centre crop
    ip_cls = getattr(transformers, f"{ip_name}Pil", None) or getattr(transformers, ip_name)
    image_processor = ip_cls(**image_processor_kwargs(vision, preprocess))
    template = tokenizer.chat_template
    if template == DEFAULT_CHAT_TEMPLATE:
        template = LLAVA_CHATML_TEMPLATE
        tokenizer.chat_template = template
    patch = int(vision.hf_config.patch_size)
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy=strategy,
        chat_template=template,
        image_token="<image>",
        num_additional_image_tokens=n_cls,
    )
    expected = (vision.image_size // patch) ** 2
    if expected != model.tokens_per_image:  # pragma: no cover - guarded by hf_llava_obstacles
        raise ValueError(
            f"the processor would expand <image> to {expected} tokens, the model takes {model.tokens_per_image}"
        )
    return processor


def generation_config_dict(model, tokenizer) -> dict[str, Any]:
    """Greedy by default; stops where ``vlmkit chat`` stops (end of turn, then eos)."""
    from transformers import GenerationConfig

    stops: list[int] = []
    try:
        from vlmkit.data.template import ChatTemplate

        stops = ChatTemplate(tokenizer).stop_token_ids
    except ValueError:
        if tokenizer.eos_token_id is not None:
            stops = [int(tokenizer.eos_token_id)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops[0] if stops else None)
    gen = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=stops if len(stops) != 1 else stops[0],
        pad_token_id=pad,
        do_sample=False,
    )
    return gen.to_diff_dict()


# ---------------------------------------------------------------------- export


def _check_out_dir(checkpoint: Path, out_dir: Path, overwrite: bool) -> None:
    if out_dir.resolve() == checkpoint.resolve() or checkpoint.resolve() in out_dir.resolve().parents:
        raise ValueError(f"the export directory {out_dir} must not be (inside) the checkpoint {checkpoint}")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; pass overwrite=True (--overwrite) to replace it")


def export_checkpoint(checkpoint, out_dir, format: str = "hf-llava", overwrite: bool = False) -> Path:
    """Export the vlmkit checkpoint directory ``checkpoint`` to ``out_dir`` in ``format``.

    The directory is written atomically (a temporary sibling, then renamed); weights as
    safetensors, configs as JSON. Raises `ExportError` (every reason, and the formats that apply)
    for a checkpoint the format can't represent exactly, before any weight is read.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose from {list(FORMATS)}")
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    meta = read_checkpoint_config(checkpoint)
    reasons = hf_llava_obstacles(meta)
    if reasons:
        raise ExportError(checkpoint, format, reasons, [VLMKIT_FORMAT])
    _check_out_dir(checkpoint, out_dir, overwrite)

    from vlmkit.models.checkpoint_io import load_checkpoint

    model, tokenizer = load_checkpoint(checkpoint, device="cpu")
    try:
        weights, act = llava_state_dict(model)
    except ValueError as err:
        raise ExportError(checkpoint, format, [str(err)], [VLMKIT_FORMAT]) from None
    config = llava_config(model, tokenizer, act)
    processor = llava_processor(model, tokenizer)
    generation = generation_config_dict(model, tokenizer)

    with atomic_directory(out_dir) as tmp:
        safetensors.torch.save_file(weights, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        processor.save_pretrained(str(tmp))  # tokenizer files, chat_template.jinja, processor_config.json
        processor.image_processor.save_pretrained(str(tmp))  # preprocessor_config.json, for older readers
        # after the processor: nothing it writes may stand in for the model's config.json
        atomic_write_text(tmp / "config.json", config.to_json_string(use_diff=False))
        atomic_write_text(tmp / "generation_config.json", json.dumps(generation, indent=2) + "\n")
    return out_dir


def describe(out_dir) -> str:
    """One line about an export, for the CLI."""
    cfg = json.loads((Path(out_dir) / "config.json").read_text(encoding="utf-8"))
    return (
        f"{cfg['vision_config']['model_type']} + {cfg['text_config']['model_type']}, "
        f"{cfg['image_seq_length']} tokens per image, <image> id {cfg['image_token_index']}, "
        f"vision_feature_layer {cfg['vision_feature_layer']} ({cfg['vision_feature_select_strategy']})"
    )
