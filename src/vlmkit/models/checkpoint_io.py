"""Save and load a whole VisionLanguageModel: config.json, model.safetensors, tokenizer files,
recipe.yaml. Loading rebuilds every part from the saved HF config dicts (nothing is downloaded)
and reads weights with safetensors only -- never a pickle.
"""

from __future__ import annotations

import json
from pathlib import Path

import safetensors.torch
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, AutoTokenizer

from vlmkit.config import ModelConfig, Recipe, recipe_to_yaml
from vlmkit.models.connectors import build_connector
from vlmkit.models.varlen_attention import hf_attn_implementation
from vlmkit.models.vision import vision_from_state, vision_state
from vlmkit.models.vlm import VisionLanguageModel
from vlmkit.utils.io import atomic_directory, atomic_write_json, atomic_write_text

FORMAT = "vlmkit-vlm"
VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
RECIPE_FILE = "recipe.yaml"


class CheckpointError(ValueError):
    """A directory that is not a loadable vlmkit checkpoint."""


def save_checkpoint(
    model: VisionLanguageModel, tokenizer, out_dir, recipe: Recipe | None = None, state_dict: dict | None = None
) -> Path:
    """Write the checkpoint to ``out_dir`` atomically (a crash leaves the old one or none).

    ``state_dict``: the full weights to write instead of ``model``'s own (an FSDP-sharded model
    gathers them first); tied parameters are written once, under their first name.
    """
    out_dir = Path(out_dir)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "model": model.config.model_dump(mode="json"),
        "llm_hf_config": model.llm.config.to_dict(),
        "image_token_id": model.image_token_id,
        "tokens_per_image": model.tokens_per_image,
        # "vision_hf_config" and "vision": what the vision config alone can't rebuild (models/vision.py)
        **vision_state(model.vision),
    }
    if getattr(model, "lora_state", None):  # a checkpoint in the middle of a LoRA stage
        meta["lora"] = model.lora_state
    with atomic_directory(out_dir) as tmp:
        tokenizer.save_pretrained(str(tmp))
        # after the tokenizer: its save must not leave a config.json of its own
        atomic_write_json(tmp / CONFIG_FILE, meta)
        if state_dict is None:
            safetensors.torch.save_model(model, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        else:
            tensors = {k: v.contiguous() for k, v in state_dict.items() if k not in _tied_duplicates(model)}
            safetensors.torch.save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        if recipe is not None:
            atomic_write_text(tmp / RECIPE_FILE, recipe_to_yaml(recipe))
    return out_dir


def _tied_duplicates(model) -> set[str]:
    """Names of parameters that are the same tensor as an earlier-named one (tied weights)."""
    first: dict[int, str] = {}
    duplicates = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            duplicates.add(name)
        else:
            first[id(p)] = name
    return duplicates


def read_checkpoint_config(path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a directory")
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise CheckpointError(f"{path} is not a vlmkit checkpoint: it has no {CONFIG_FILE}")
    try:
        meta = json.loads(cfg_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{cfg_file} is not valid JSON: {err}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        hint = " (it looks like a Hugging Face model directory)" if isinstance(meta, dict) and "model_type" in meta else ""
        raise CheckpointError(f"{path} is not a vlmkit checkpoint: format is {found!r}, expected {FORMAT!r}{hint}")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {meta.get('version')!r} is not supported (expected {VERSION})")
    if not (path / WEIGHTS_FILE).is_file():
        raise CheckpointError(f"{path} has no {WEIGHTS_FILE}")
    return meta


def load_checkpoint(path, device="cpu") -> tuple[VisionLanguageModel, object]:
    """Rebuild the model from the saved configs, load the weights strictly, and the tokenizer.

    The model comes back in eval mode on ``device``.
    """
    path = Path(path)
    meta = read_checkpoint_config(path)
    model_cfg = ModelConfig.model_validate(meta["model"])
    vision = vision_from_state(meta)
    llm_dict = dict(meta["llm_hf_config"])
    llm_config = CONFIG_MAPPING[llm_dict["model_type"]].from_dict(llm_dict)
    llm = AutoModelForCausalLM.from_config(llm_config, attn_implementation=hf_attn_implementation(model_cfg.llm))
    connector = build_connector(
        model_cfg.connector,
        vision.hidden_size,
        llm.config.get_text_config().hidden_size,
        target_rms=1.0,  # the gain is overwritten by the saved weights
    )
    model = VisionLanguageModel(model_cfg, vision, connector, llm, meta["image_token_id"])
    if meta.get("lora"):  # saved with LoRA adapters: rebuild them before loading the weights
        from vlmkit.config import LoRAConfig
        from vlmkit.models.lora import add_lora

        add_lora(model, LoRAConfig.model_validate(meta["lora"]))
    if model.tokens_per_image != meta["tokens_per_image"]:
        raise CheckpointError(
            f"{path}: rebuilt model has {model.tokens_per_image} tokens per image, saved {meta['tokens_per_image']}"
        )
    safetensors.torch.load_model(model, str(path / WEIGHTS_FILE), strict=True, device=str(device))
    model.to(device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    return model, tokenizer
