"""LoRA: adapters only where asked, adapter-only training, exact merge, plain checkpoints, resume."""

from __future__ import annotations

import pytest
import torch
import transformers
from _model_helpers import left_pad, tiny_tokenizer

from conftest import tiny_recipe_dict
from vlmkit.config import LoRAConfig, ModelConfig, recipe_from_dict
from vlmkit.data.tokenizer import DEFAULT_CHAT_TEMPLATE
from vlmkit.models.checkpoint_io import load_checkpoint, save_checkpoint
from vlmkit.models.lora import add_lora, has_lora, merge_lora
from vlmkit.models.vlm import VisionLanguageModel
from vlmkit.train.run import train
from vlmkit.train.stages import select_trainable
from vlmkit.utils.io import read_jsonl


def build(vision: str = "tiny-vit"):
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    tok.chat_template = DEFAULT_CHAT_TEMPLATE
    cfg = ModelConfig.model_validate({"vision": {"name": vision, "image_size": 32},
                                      "llm": {"name": "tiny-llama", "overrides": {"num_hidden_layers": 2}}})  # fmt: skip
    return VisionLanguageModel.from_config(cfg, tok).eval(), tok


def adapted_layers(model) -> set[str]:
    return {n.split(".lora_A")[0] for n, _ in model.named_parameters() if ".lora_A." in n}


def randomise_adapters(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_default_adapts_only_the_llm_linears_not_the_head():
    model, _ = build()
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.llm.modules()) - 1  # minus lm_head
    add_lora(model, LoRAConfig())
    layers = adapted_layers(model)
    assert len(layers) == n_linear and all(name.startswith("llm.") for name in layers)
    assert not any("lm_head" in name for name in layers)
    assert not any(".lora_" in n for n, _ in model.vision.named_parameters())
    assert not any(".lora_" in n for n, _ in model.connector.named_parameters())


def test_vision_adapters_and_module_globs_are_optional():
    model, _ = build()
    add_lora(model, LoRAConfig(parts=["llm", "vision"], modules=["q_proj", "v_proj"]))
    layers = adapted_layers(model)
    assert layers and all(name.endswith(("q_proj", "v_proj")) for name in layers)
    assert any(name.startswith("vision.") for name in layers) and any(name.startswith("llm.") for name in layers)
    with pytest.raises(ValueError, match="matches no linear layer"):
        add_lora(build()[0], LoRAConfig(modules=["no_such_proj"]))


def test_llm_entry_trains_only_the_adapters():
    model, _ = build()
    add_lora(model, LoRAConfig())
    selected = select_trainable(model, ["connector", "llm"], adapted={"llm"})
    assert selected["llm"] and all(".lora_" in n for n, _ in selected["llm"])
    assert all(not p.requires_grad for n, p in model.llm.named_parameters() if ".lora_" not in n)
    assert all(p.requires_grad for n, p in model.connector.named_parameters())


def test_merge_equals_the_adapter_model_and_exports(tmp_path):
    from vlmkit.models.export import export_checkpoint

    model, tok = build()
    add_lora(model, LoRAConfig(r=4, alpha=8))
    randomise_adapters(model)
    ids, mask = left_pad([[6, model.image_token_id, *([model.image_token_id] * 3), 7, 8]])
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with_adapters = model(ids, mask, pixels).logits
    assert merge_lora(model) > 0 and not has_lora(model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask, pixels).logits, with_adapters, rtol=1e-5, atol=1e-5)
    # the merged model is a plain checkpoint: it loads strictly and exports to LLaVA
    ckpt = save_checkpoint(model, tok, tmp_path / "ckpt")
    out = export_checkpoint(ckpt, tmp_path / "hf")
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(out).eval()
    with torch.no_grad():
        hf_logits = hf(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    torch.testing.assert_close(hf_logits, with_adapters, rtol=1e-4, atol=1e-4)


def lora_recipe(steps: int = 4) -> dict:
    tree = tiny_recipe_dict(steps=2)
    tree["model"]["vision"] = {"name": "tiny-vit", "image_size": 64}
    stage = tree["stages"][2]
    stage.update(name="lora", steps=steps, lora={"r": 4, "alpha": 8}, trainable=["connector", "llm"], lr=3e-3)
    tree["stages"] = [tree["stages"][1], stage]
    return tree


def test_a_lora_stage_ends_with_plain_weights_and_resumes_exactly(tiny_world, tmp_path):
    recipe = recipe_from_dict(lora_recipe())
    full = tmp_path / "full"
    final = train(recipe, data_dir=tiny_world, out_dir=full)
    model, _ = load_checkpoint(final)
    assert not has_lora(model)
    before, _ = load_checkpoint(sorted((full / "checkpoints").iterdir())[0])  # end of the first stage
    changed = [n for n, p in model.llm.state_dict().items() if not torch.equal(p, before.llm.state_dict()[n])]
    assert changed and all("layers" in n for n in changed)  # merged adapters moved the adapted layers only

    killed = tmp_path / "killed"
    assert train(recipe, data_dir=tiny_world, out_dir=killed, save_every=1, stop_after_steps=4) is None
    mid = sorted((killed / "checkpoints").iterdir())[-1]
    assert "lora" in (mid / "config.json").read_text()  # a checkpoint inside the LoRA stage keeps its adapters
    train(recipe, data_dir=tiny_world, out_dir=killed, save_every=1, resume=True)
    a = {r["step"]: r["loss"] for r in read_jsonl(full / "metrics.jsonl")}
    b = {r["step"]: r["loss"] for r in read_jsonl(killed / "metrics.jsonl")}
    assert a == b
