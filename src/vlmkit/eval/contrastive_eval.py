"""Evaluating a dual encoder on the shapes world (``vlmkit eval DUAL_ENCODER --data WORLD``).

Two tasks, written to ``results.json`` in the shape of the VLM evaluation:

``shapes_zeroshot``  zero-shot classification (Radford et al. 2021) of the held-out scenes with
                     exactly one object: its shape and its colour, each class the normalised
                     mean of its prompts' embeddings (prompts below). Metrics: ``top1`` /
                     ``top5`` = the mean over the two attributes, ``by_attribute`` {shape,
                     color: {top1, top5, n_classes, templates, plain_top1, plain_templates}}.
``shapes_retrieval`` image <-> text recall@1/5/10 over all held-out images, each with two
                     captions (its short and its detailed description, written by the world from
                     the scene graph): the COCO / Flickr protocol (`eval.metrics.retrieval`).
"""

from __future__ import annotations

import time
from pathlib import Path

from vlmkit.data.bad_samples import BadSampleError, BadSampleLog
from vlmkit.utils.io import atomic_write_json

# Plain prompts ("a circle.", "a red object."), and prompts that name the other attribute in
# every value, so that a class embedding is the mean over it ("a red circle.", "a blue circle.",
# ...: CLIP's prompt ensembling, here marginalising the attribute not asked about). The world's
# captions always say both ("a red circle"), so the plain prompts read text never seen in
# training; both are reported, the ensembled one is the headline.
PLAIN_TEMPLATES = {"shape": ("{article} {}.",), "color": ("{article} {} object.",)}


def ensemble_templates(attribute: str) -> tuple[str, ...]:
    from vlmkit.data.worlds.shapes import COLORS, SHAPES
    from vlmkit.eval.zeroshot import article

    if attribute == "shape":  # the colour named, with its own article: "an orange {}."
        return tuple(f"{article(c)} {c} {{}}." for c in sorted(COLORS))
    return tuple(f"{{article}} {{}} {s}." for s in SHAPES)  # "{article} {} circle." -> "a red circle."


def held_out_scenes(data_dir: Path, bad_log: BadSampleLog) -> list[tuple]:
    """``(image reference, scene graph)`` of every held-out image, once each, in file order."""
    from vlmkit.data.formats.llava import read_llava

    seen: dict[str, tuple] = {}
    for sample in read_llava(data_dir / "test.json", root=data_dir, bad_log=bad_log):
        scene = sample.meta.get("scene")
        if scene and sample.images and sample.images[0].describe() not in seen:
            seen[sample.images[0].describe()] = (sample.images[0], scene)
    return list(seen.values())


def _load(items: list[tuple], data_dir: Path, bad_log: BadSampleLog) -> list[tuple]:
    from vlmkit.data.images import load_image

    out = []
    for ref, scene in items:
        try:
            out.append((load_image(ref, data_dir), scene))
            bad_log.ok()
        except BadSampleError as err:
            bad_log.record(str(data_dir / "test.json"), ref.describe(), err)
    return out


def zero_shot_attributes(model, tokenizer, images: list[tuple], batch_size: int = 64) -> dict:
    """Zero-shot shape and colour of single-object scenes: ``{"top1", "top5", "by_attribute", "n"}``."""
    from vlmkit.data.worlds.shapes import COLORS, SHAPES
    from vlmkit.eval.zeroshot import zero_shot_classify

    single = [(img, scene["objects"][0]) for img, scene in images if len(scene["objects"]) == 1]
    if not single:
        raise ValueError("zero-shot: no held-out scene with exactly one object")
    by_attribute = {}
    for attribute, classes in (("shape", list(SHAPES)), ("color", sorted(COLORS))):
        pairs = [(img, obj[attribute]) for img, obj in single]
        templates = ensemble_templates(attribute)
        got = zero_shot_classify(model, tokenizer, pairs, classes, templates=templates, batch_size=batch_size)
        plain = zero_shot_classify(model, tokenizer, pairs, classes, templates=PLAIN_TEMPLATES[attribute],
                                   batch_size=batch_size)  # fmt: skip
        by_attribute[attribute] = {"top1": got["top1"], "top5": got["top5"], "n_classes": len(classes),
                                   "templates": list(templates), "plain_top1": plain["top1"],
                                   "plain_templates": list(PLAIN_TEMPLATES[attribute])}  # fmt: skip
    mean = {k: sum(v[k] for v in by_attribute.values()) / len(by_attribute) for k in ("top1", "top5")}
    return {**mean, "by_attribute": by_attribute, "n": len(single)}


def retrieval(model, tokenizer, images: list[tuple], batch_size: int = 64) -> dict:
    from vlmkit.data.worlds.shapes import caption_detailed, caption_short
    from vlmkit.eval.zeroshot import retrieval_eval

    captions = [[caption_short(scene), caption_detailed(scene)] for _, scene in images]
    metrics = retrieval_eval(model, tokenizer, [img for img, _ in images], captions, batch_size=batch_size)
    return {**metrics, "n_images": len(images), "captions_per_image": 2}


def evaluate_dual_encoder(checkpoint: str | Path, data_dir: str | Path, out_dir: str | Path,
                          batch_size: int = 64, limit: int | None = None) -> dict:  # fmt: skip
    """Both tasks on ``data_dir``'s held-out split; writes and returns ``out_dir/results.json``."""
    from vlmkit.eval.runner import file_sha256
    from vlmkit.models.contrastive import load_dual_encoder

    t0 = time.perf_counter()
    data_dir, out = Path(data_dir), Path(out_dir)
    model, tokenizer = load_dual_encoder(checkpoint)
    bad_log = BadSampleLog()
    scenes = held_out_scenes(data_dir, bad_log)
    images = _load(scenes[:limit] if limit else scenes, data_dir, bad_log)
    tasks = {}
    for name, run in (("shapes_zeroshot", zero_shot_attributes), ("shapes_retrieval", retrieval)):
        start = time.perf_counter()
        metrics = run(model, tokenizer, images, batch_size)
        tasks[name] = {"n": metrics.get("n", len(images)), "metrics": metrics,
                       "elapsed_s": round(time.perf_counter() - start, 3)}  # fmt: skip
    test = data_dir / "test.json"
    results = {
        "tasks": tasks,
        "blind": {},
        "model": {"checkpoint": str(checkpoint), "kind": "dual_encoder", "loss": model.config.loss,
                  "vision": model.config.vision.name, "text": model.config.text.name},  # fmt: skip
        "data": {"path": str(test), "size": test.stat().st_size, "sha256": file_sha256(test),
                 "n_images": len(images), "bad_rows": len(bad_log.bad), "bad_summary": bad_log.summary()},  # fmt: skip
        "timing": {"wall_s": round(time.perf_counter() - t0, 3)},
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", results)
    return results


def summary_lines(results: dict) -> list[str]:
    zs = results["tasks"]["shapes_zeroshot"]["metrics"]
    rt = results["tasks"]["shapes_retrieval"]["metrics"]
    by = zs["by_attribute"]
    return [f"shapes_zeroshot  top1 {zs['top1']:.3f} (shape {by['shape']['top1']:.3f}, color {by['color']['top1']:.3f})"
            f"  n={zs['n']}",
            "shapes_retrieval " + "  ".join(f"{k} {v:.3f}" for k, v in rt.items() if isinstance(v, float))]  # fmt: skip
