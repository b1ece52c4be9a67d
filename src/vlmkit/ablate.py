"""`vlmkit ablate FILE`: train tiny variants that differ in one architecture choice, on shared
pre-trained parts and the same budget, and tabulate what each reaches.

The question is the one "What matters when building vision-language models?" (Laurençon et
al. 2024) asks: do the connector family, the number of visual tokens or the resolution matter
most? Every variant starts from the same pre-trained encoder and the same pre-trained LM, so
only the part under test is new:

1. ``shared``: the base recipe's encoder pre-training (``model.vision.pretrain``) and a
   text-only LM stage (``shared_stage``, on image-free copies of the data) run once, into
   ``OUT/shared``.
2. each variant: the base recipe with ``init_from`` the shared checkpoint (``init_parts``:
   vision and LLM), the ablation's ``stages``, then the variant's ``set`` overrides; trained into
   ``OUT/variants/NAME`` and evaluated on the held-out split.
3. ``OUT/results.jsonl`` (one row per variant; a finished variant is not run again),
   ``OUT/table.md`` and ``OUT/table.png``.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import yaml
from pydantic import Field

from vlmkit.config import ConfigError, DataSource, StageConfig, StrictModel, load_recipe, recipe_from_dict
from vlmkit.utils.io import append_jsonl, atomic_write_text, read_jsonl

COUNT_TYPES = ("count_total", "count_color", "count_shape")


class Variant(StrictModel):
    name: str
    set: list[str] = Field(default_factory=list)  # --set style overrides of the variant's recipe


class AblationEval(StrictModel):
    limit: int | None = Field(300, gt=0)  # items per task
    tasks: list[str] = Field(default_factory=lambda: ["shapes_vqa", "shapes_grounding"])
    batch_size: int = Field(64, gt=0)
    max_new_tokens: int = Field(40, gt=0)


class AblationConfig(StrictModel):
    """An ablation file: a base recipe, the shared LM stage, the stages every variant trains, the variants."""

    name: str
    base: str = "shapes-tiny"  # a recipe name or path
    base_set: list[str] = Field(default_factory=list)  # --set style overrides of the base recipe
    data: dict[str, DataSource] = Field(default_factory=dict)  # sources added to the base recipe's
    shared_stage: StageConfig
    stages: list[StageConfig]
    variants: list[Variant]
    eval: AblationEval = Field(default_factory=AblationEval)


def load_ablation(path: str | Path, overrides: list[str] = ()) -> AblationConfig:
    """An ablation file (a path, or the name of one in ``recipes/ablations``), with ``--set`` overrides."""
    from vlmkit.config import validate_tree

    path = Path(path)
    if not path.exists():
        builtin = Path(__file__).parent / "recipes" / "ablations" / f"{path.stem if path.suffix else path.name}.yaml"
        if not builtin.exists():
            raise ConfigError(f"ablation {path} not found")
        path = builtin
    tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    return validate_tree(AblationConfig, tree, list(overrides), str(path), what="ablation file")


def _stage_dicts(stages: list[StageConfig]) -> list[dict]:
    return [s.model_dump(mode="json") for s in stages]


def _base(ab: AblationConfig) -> dict:
    return load_recipe(ab.base, ab.base_set).model_dump(mode="json")


def shared_recipe(ab: AblationConfig):
    """The base recipe cut to the shared stage (encoder pre-training included)."""
    base = _base(ab)
    base["data"].update({k: v.model_dump(mode="json") for k, v in ab.data.items()})
    base["name"] = f"{ab.name}-shared"
    base["stages"] = _stage_dicts([ab.shared_stage])
    return recipe_from_dict(base, source=f"{ab.name}: shared")


def variant_recipe(ab: AblationConfig, variant: Variant, shared_dir: Path):
    """The base recipe on the shared parts, with the ablation's stages and the variant's overrides."""
    base = _base(ab)
    base["data"].update({k: v.model_dump(mode="json") for k, v in ab.data.items()})
    base["name"] = f"{ab.name}-{variant.name}"
    model = base["model"]
    model["vision"] = {**model["vision"], "name": str(shared_dir / "encoder"), "pretrain": None}
    model["init_from"] = str(shared_dir / "final")
    model["init_parts"] = ["vision", "llm"]
    base["stages"] = _stage_dicts(ab.stages)
    return recipe_from_dict(base, variant.set, source=f"{ab.name}: variant {variant.name}")


def _figures(results: dict) -> dict:
    tasks = results["tasks"]
    out: dict = {}
    if "shapes_vqa" in tasks:
        m = tasks["shapes_vqa"]["metrics"]
        out["vqa"] = m["accuracy"]
        by, n = m.get("by_type", {}), m.get("n_by_type", {})
        counted = [t for t in COUNT_TYPES if t in by]
        if counted:
            out["counting"] = sum(by[t] * n[t] for t in counted) / sum(n[t] for t in counted)
    if "shapes_grounding" in tasks:
        out["grounding"] = tasks["shapes_grounding"]["metrics"].get("acc_iou50")
    return out


def run_variant(ab: AblationConfig, variant: Variant, data_dir: Path, out: Path, shared_dir: Path) -> dict:
    from vlmkit.eval.runner import evaluate
    from vlmkit.models.checkpoint_io import load_checkpoint
    from vlmkit.train.run import train

    recipe = variant_recipe(ab, variant, shared_dir)
    run_dir = out / "variants" / variant.name
    if run_dir.exists():  # an unfinished earlier attempt: start it again
        import shutil

        shutil.rmtree(run_dir)
    t0 = time.perf_counter()
    final = train(recipe, data_dir=data_dir, out_dir=run_dir)
    train_s = time.perf_counter() - t0
    samples = sum(s.steps * s.batch_size * s.grad_accum for s in recipe.stages)
    results = evaluate(final, data_dir=data_dir, out_dir=run_dir / "eval", limit=ab.eval.limit,
                       tasks=ab.eval.tasks, batch_size=ab.eval.batch_size,
                       max_new_tokens=ab.eval.max_new_tokens)  # fmt: skip
    model, _ = load_checkpoint(final)
    c = recipe.model.connector
    return {
        "variant": variant.name,
        "connector": c.type + (f"+pixel_shuffle{c.pixel_shuffle}" if c.pixel_shuffle > 1 else "")
        + (" (cross-attention)" if c.fusion == "cross_attention" else ""),
        "image_size": recipe.model.vision.image_size,
        "visual_tokens": model.image_token_count() if c.fusion == "splice" else model.tokens_per_tile,
        "connector_params": sum(p.numel() for p in model.parts()["connector"].parameters()),
        "params": sum(p.numel() for p in model.parameters()),
        "train_samples_per_s": round(samples / train_s, 1),
        "train_s": round(train_s, 1),
        **{k: (round(v, 4) if v is not None else None) for k, v in _figures(results).items()},
        "overrides": variant.set,
    }


def markdown_table(rows: list[dict]) -> str:
    head = ["variant", "connector", "image px", "visual tokens", "connector params", "params",
            "train samples/s", "VQA", "counting", "grounding"]  # fmt: skip
    keys = ["variant", "connector", "image_size", "visual_tokens", "connector_params", "params",
            "train_samples_per_s", "vqa", "counting", "grounding"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = []
        for k in keys:
            v = r.get(k)
            cells.append(f"{v:.3f}" if isinstance(v, float) and k in ("vqa", "counting", "grounding") else
                         ("-" if v is None else f"{v:,}" if isinstance(v, int) else str(v)))  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_table(rows: list[dict], out_png: Path) -> None:
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["variant"] for r in rows]
    metrics = [m for m in ("vqa", "counting", "grounding") if any(r.get(m) is not None for r in rows)]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(rows)), 3.8))
    width = 0.8 / max(1, len(metrics))
    for j, m in enumerate(metrics):
        xs = [i + (j - (len(metrics) - 1) / 2) * width for i in range(len(rows))]
        ax.bar(xs, [r.get(m) or 0.0 for r in rows], width, label=m)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([f"{n}\n{r['visual_tokens']} tok" for n, r in zip(names, rows)], fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("held-out accuracy")
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = out_png.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, out_png)
    plt.close(fig)


def run_ablation(
    path: str | Path,
    out_dir: str | Path,
    data_dir: str | Path | None = None,
    overrides: list[str] = (),
    only: list[str] | None = None,
) -> list[dict]:
    """Run (or finish) the ablation ``path``; returns the table rows in the file's variant order."""
    from vlmkit.data.worlds.shapes import generate_world
    from vlmkit.train.run import train

    ab = load_ablation(path, list(overrides))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "ablation.yaml", yaml.safe_dump(ab.model_dump(mode="json"), sort_keys=False))
    base = load_recipe(ab.base, ab.base_set)
    data = Path(data_dir) if data_dir else out / "world"
    if data_dir is None:
        w = base.world
        generate_world(data, n_train=w.train, n_test=w.test, seed=w.seed, size=w.size)

    shared_dir = out / "shared"
    if not (shared_dir / "final").is_dir():
        print(f"[shared] encoder pre-training + {ab.shared_stage.name} -> {shared_dir}")
        train(shared_recipe(ab), data_dir=data, out_dir=shared_dir, resume=True)

    results_path = out / "results.jsonl"
    done = {r["variant"]: r for r in read_jsonl(results_path)} if results_path.exists() else {}
    wanted = [v for v in ab.variants if only is None or v.name in only]
    unknown = set(only or []) - {v.name for v in ab.variants}
    if unknown:
        raise ConfigError(f"--only: no variants named {sorted(unknown)} (known: {[v.name for v in ab.variants]})")
    for i, variant in enumerate(wanted, 1):
        if variant.name in done:
            print(f"[{i}/{len(wanted)}] {variant.name}: done earlier")
            continue
        print(f"[{i}/{len(wanted)}] {variant.name}: {' '.join(variant.set) or '(base)'}")
        row = run_variant(ab, variant, data, out, shared_dir)
        append_jsonl(results_path, row)
        done[variant.name] = row
        print(json.dumps(row))
    rows = [done[v.name] for v in ab.variants if v.name in done]
    atomic_write_text(out / "table.md", markdown_table(rows))
    plot_table(rows, out / "table.png")
    return copy.deepcopy(rows)
