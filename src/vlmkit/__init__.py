"""vlmkit: build vision-language models the way the field does.

The Python API mirrors the CLI (imports are lazy, so `import vlmkit` stays cheap)::

    import vlmkit
    vlmkit.generate_world("data/shapes")                       # vlmkit data shapes
    recipe = vlmkit.load_recipe("shapes-tiny", ["stages.instruct.steps=500"])
    final = vlmkit.train_recipe(recipe, data_dir="data/shapes", out_dir="runs/x")   # vlmkit train
    results = vlmkit.evaluate(final, data_dir="data/shapes", out_dir="runs/x/eval", blind=True)
    predict, info = vlmkit.load_predictor(final)               # Samples -> answers (chat, eval)
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    "generate_world": "vlmkit.data.worlds.shapes",
    "read_llava": "vlmkit.data.formats.llava",
    "write_llava": "vlmkit.data.formats.llava",
    "check_dataset": "vlmkit.data.check",
    "Sample": "vlmkit.data.sample",
    "Turn": "vlmkit.data.sample",
    "Part": "vlmkit.data.sample",
    "ImageRef": "vlmkit.data.sample",
    "Box": "vlmkit.data.sample",
    "load_recipe": "vlmkit.config",
    "recipe_from_dict": "vlmkit.config",
    "train_recipe": ("vlmkit.train.run", "train"),  # `vlmkit.train` is the subpackage
    "evaluate": "vlmkit.eval.runner",
    "run_evaluation": "vlmkit.eval.runner",
    "load_checkpoint": "vlmkit.models.checkpoint_io",
    "load": ("vlmkit.models.checkpoint_io", "load_checkpoint"),  # (model, tokenizer) from a checkpoint dir
    "export_checkpoint": "vlmkit.models.export",
    "run_ablation": "vlmkit.ablate",
    "save_checkpoint": "vlmkit.models.checkpoint_io",
    "VisionLanguageModel": "vlmkit.models.vlm",
    "load_predictor": "vlmkit.infer.predictor",
    "run_demo": "vlmkit.demo",
    "load_dual_encoder": "vlmkit.models.contrastive",
    "embed_images": "vlmkit.infer.embeddings",
    "embed_texts": "vlmkit.infer.embeddings",
    "clip_score": "vlmkit.infer.embeddings",
    "evaluate_dual_encoder": "vlmkit.eval.contrastive_eval",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        module, attr = _API[name] if isinstance(_API[name], tuple) else (_API[name], name)
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'vlmkit' has no attribute {name!r}")
