"""Binding experiments on the shapes world: which recipe choices let a tiny VLM answer
attribute-binding questions ("what color is the circle?") and not just count?

Each variant is shapes-tiny with one change. It is trained on the same world and evaluated on
the same held-out VQA and POPE items, with and without images. One JSON line per variant goes to
``OUT/results.jsonl``. Usage::

    python bench/binding_sweep.py --data runs/demo/world --out runs/sweep [--variants a,b] [--limit 700]

The figures and what they show are in docs/binding.md. Variants are changes to the shipped
recipe as it is now; the variants of that page's earlier sections changed the recipe of its
time (commit 7c36aef) and are described there.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import shutil
import time
from pathlib import Path

import torch
import yaml

from vlmkit.config import recipe_from_dict
from vlmkit.eval.runner import evaluate
from vlmkit.train.run import train
from vlmkit.utils.io import append_jsonl

RECIPE = Path(__file__).resolve().parents[1] / "src/vlmkit/recipes/shapes-tiny.yaml"


def base(tree: dict) -> dict:
    return tree


def stage(tree: dict, name: str) -> dict:
    return next(s for s in tree["stages"] if s["name"] == name)


TEXT_WARMUP = {
    "name": "lm_warmup", "data": {"text": 1.0}, "trainable": ["llm"], "lr": {"llm": 3.0e-3},
    "batch_size": 32, "steps": 400, "warmup_steps": 30, "max_seq_len": 192,
}  # fmt: skip


def text_warmup_first(tree: dict) -> dict:
    """A 400-step text-only LM warm-up (the LLM alone) before the binding drills."""
    tree["stages"].insert(0, copy.deepcopy(TEXT_WARMUP))
    return tree


def no_bind(tree: dict) -> dict:
    """No binding-drill stage; its steps go to instruction tuning (drills stay in that mixture)."""
    steps = stage(tree, "bind")["steps"]
    tree["stages"] = [s for s in tree["stages"] if s["name"] != "bind"]
    stage(tree, "instruct")["steps"] += steps
    return tree


def bind_with_counting(tree: dict) -> dict:
    """The binding stage mixes drills with single VQA questions (counting among them) 1:1."""
    stage(tree, "bind")["data"] = {"drills": 0.5, "vqa": 0.5}
    return tree


def encoder_in_instruct(tree: dict) -> dict:
    """Instruction tuning trains the encoder too."""
    s = stage(tree, "instruct")
    s["trainable"] = ["vision", "connector", "llm"]
    s["lr"] = {"vision": 2e-3, **s["lr"]}
    return tree


def without_align(tree: dict) -> dict:
    """No caption pre-training; its steps go to instruction tuning."""
    steps = stage(tree, "align")["steps"]
    tree["stages"] = [s for s in tree["stages"] if s["name"] != "align"]
    stage(tree, "instruct")["steps"] += steps
    return tree


def output_norm(tree: dict) -> dict:
    """Connector outputs RMS-normalised to the scale of the LLM's token embeddings."""
    tree["model"]["connector"]["output_norm"] = True
    return tree


def eight_heads(tree: dict) -> dict:
    tree["model"]["llm"].setdefault("overrides", {})["num_attention_heads"] = 8
    tree["model"]["llm"]["overrides"]["num_key_value_heads"] = 8
    return tree


def higher_lr(tree: dict) -> dict:
    s = stage(tree, "instruct")
    s["lr"] = {k: 4e-3 for k in s["lr"]}
    return tree


def wide(tree: dict) -> dict:
    """A wider LM: hidden 256, 4 heads of 64, MLP 768 (about 4M parameters in all)."""
    tree["model"]["llm"].setdefault("overrides", {}).update(hidden_size=256, intermediate_size=768)
    return tree


VARIANTS = {f.__name__: f for f in (base, text_warmup_first, no_bind, bind_with_counting, encoder_in_instruct,
                                    without_align, output_norm, eight_heads, higher_lr, wide)}


def build_variant(name: str, tree: dict) -> dict:
    """``a+b`` applies variant a, then b."""
    for part in name.split("+"):
        tree = VARIANTS[part](tree)
    return tree


def run_variant(name: str, data: Path, out: Path, limit: int, instruct_steps: int | None) -> dict:
    tree = build_variant(name, copy.deepcopy(yaml.safe_load(RECIPE.read_text())))
    if instruct_steps:
        stage(tree, "instruct")["steps"] = instruct_steps
    tree["name"] = f"sweep-{name}"
    run_dir = out / name
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.time()
    final = train(recipe_from_dict(tree, source=name), data_dir=data, out_dir=run_dir)
    train_s = time.time() - t0
    res = evaluate(final, data_dir=data, out_dir=run_dir / "eval", blind=True, limit=limit,
                   batch_size=64, tasks=["shapes_vqa", "shapes_pope"])
    vqa, blind = res["tasks"]["shapes_vqa"]["metrics"], res["blind"]["shapes_vqa"]["metrics"]
    return {
        "variant": name,
        "doc": " + ".join((VARIANTS[p].__doc__ or p).strip() for p in name.split("+")),
        "train_s": round(train_s, 1),
        "vqa": vqa["accuracy"],
        "vqa_blind": blind["accuracy"],
        "by_type": vqa["by_type"],
        "pope_f1": {k: v["f1"] for k, v in res["tasks"]["shapes_pope"]["metrics"].items() if isinstance(v, dict)},
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, default=Path("runs/sweep"))
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--limit", type=int, default=700)
    p.add_argument("--instruct-steps", type=int, default=None)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.variants.split(","):
        row = run_variant(name, args.data, args.out, args.limit, args.instruct_steps)
        append_jsonl(args.out / "results.jsonl", row)
        print(json.dumps(row))


if __name__ == "__main__":
    main()
