"""LoRA adapters (Hu et al. 2021) through ``peft``, part by part.

peft's ``target_modules="all-linear"`` on a whole VLM silently adapts the vision tower and the
connector too. vlmkit injects adapters into each part it is told to (``lora.parts``: the LLM by
default, the vision encoder optionally), choosing that part's linear layers itself (the LM head
excluded), so nothing outside the named parts ever gets an adapter.

* ``add_lora(model, cfg)``: inject adapters; the adapted parts' base weights are frozen and a
  trainable entry naming an adapted part (``llm``) selects its adapter weights only.
* ``merge_lora(model)``: fold every adapter into its base weight and remove the adapter layers
  (a stage ends with plain weights, so later stages, checkpoints and exports never see peft).
* A checkpoint taken in the middle of a LoRA stage keeps its adapters; its ``config.json``
  records the LoRA settings (``lora_state``) so ``load_checkpoint`` rebuilds them before loading.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

from torch import nn

from vlmkit.config import LoRAConfig

ADAPTER_MARK = "lora_"


def _linear_names(part: nn.Module, exclude: set[int], patterns: list[str] | None) -> list[str]:
    names = []
    for name, module in part.named_modules():
        if not isinstance(module, nn.Linear) or id(module) in exclude:
            continue
        if patterns is None or any(fnmatchcase(name.rsplit(".", 1)[-1], p) or fnmatchcase(name, p) for p in patterns):
            names.append(name)
    return names


def lora_targets(model: nn.Module, cfg: LoRAConfig) -> dict[str, list[str]]:
    """Per adapted part, the names (within the part) of the linear layers that get adapters."""
    parts = model.parts()
    out = {}
    for part_name in cfg.parts:
        part = parts[part_name]
        exclude: set[int] = set()
        if part_name == "llm":
            head = part.get_output_embeddings()
            if head is not None:
                exclude.add(id(head))
        names = _linear_names(part, exclude, None if cfg.modules == "all-linear" else list(cfg.modules))
        if not names:
            raise ValueError(f"lora.modules {cfg.modules!r} matches no linear layer of part {part_name!r}")
        out[part_name] = names
    return out


def has_lora(model: nn.Module) -> bool:
    return any(ADAPTER_MARK in n for n, _ in model.named_parameters())


def add_lora(model: nn.Module, cfg: LoRAConfig) -> dict[str, list[str]]:
    """Inject adapters into ``cfg.parts`` of ``model``; returns the adapted layers per part."""
    from peft import LoraConfig, inject_adapter_in_model

    if has_lora(model):
        raise ValueError("the model already has LoRA adapters (merge them first)")
    targets = lora_targets(model, cfg)
    parts = model.parts()
    for part_name, names in targets.items():
        # exact names: a regex that fullmatches only these modules
        pattern = "^(" + "|".join(n.replace(".", r"\.") for n in names) + ")$"
        peft_cfg = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=pattern,
                              bias="none")  # fmt: skip
        inject_adapter_in_model(peft_cfg, parts[part_name])
    model.__dict__["lora_state"] = cfg.model_dump(mode="json")
    return targets


def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its base layer and put the plain layer back; returns how many."""
    from peft.tuners.lora import LoraLayer

    merged = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, LoraLayer):
                child.merge(safe_merge=True)
                setattr(parent, child_name, child.get_base_layer())
                merged += 1
    model.__dict__.pop("lora_state", None)
    return merged


def adapter_parameter(name: str) -> bool:
    return ADAPTER_MARK in name
