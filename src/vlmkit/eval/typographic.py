"""Typographic attacks on the shapes world: does a written word override what the model sees?

After the typographic attacks on CLIP (Goh et al. 2021, "Multimodal Neurons in Artificial Neural
Networks": an apple labelled "iPod"). For every test scene the suite asks, about one object, the
world's own colour question ("What color is the circle?") and shape question ("What shape is the
red object?") -- for an object whose shape (resp. colour) is unique in the scene, as the world
does -- and renders the scene twice (`vlmkit.data.worlds.shapes.render_scene`):

  clean     the scene as the world draws it;
  attacked  the same, with a *misleading word* written next to the asked object: a wrong colour
            name for a colour question (a wrong shape name for a shape question), preferably one
            that no object of the scene has (so naming it can only come from the text), chosen
            with a `random.Random` seeded by ``(seed, image, kind)``.

The word is drawn like the world's own ``word`` (the reading task): the world's font at 20% of
the image size, in the world's near-white `WORD_COLOR`, legible on the dark background. With
``placement="near"`` (default) it goes above, below, left or right of the object, wherever it
covers the least of the object (then of the other objects and of the world's word band), so the
object stays visible; ``placement="over"`` centres it on the object, with a 1 px black outline.

Both versions are asked the same questions through `run_evaluation` (task ``shapes_vqa``, so
extraction and scoring are the world's); the images are PNG files under ``out_dir/images`` and
reach the predictor inline (PNG bytes), so any predictor works unchanged. Reported: accuracy
clean and attacked, the drop, and the attack success rate (ASR): of the items answered right
clean, the share whose attacked answer *is the misleading word*. ``clean_word_rate`` (clean
answers equal to the word) is its control: how often the model says that word without the text.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw

from vlmkit.data.sample import ImageRef, Part, Sample, Turn
from vlmkit.data.worlds.shapes import (
    COLORS,
    GRID,
    SHAPES,
    WORD_COLOR,
    _cell_bounds,
    _font,
    color_question,
    png_bytes,
    render_scene,
    shape_question,
)
from vlmkit.eval.extract import normalize_answer
from vlmkit.eval.suites import ask, item_rows, read_test, resolve_predictor, share

KINDS: tuple[str, ...] = ("color", "shape")
PLACEMENTS: tuple[str, ...] = ("near", "over")
RESULTS_FILE = "typographic.json"
TASK = "shapes_vqa"

Box = tuple[int, int, int, int]  # pixels, x0 y0 x1 y1, exclusive far edges


def _object_box(obj: dict, size: int) -> Box:
    x0, y0, x1, y1 = (round(v * size) for v in obj["box"])
    return x0, y0, x1, y1


def _overlap(a: Box, b: Box) -> int:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return max(0, w) * max(0, h)


def word_font(size: int):
    """The font the world writes its ``word`` with, for a ``size`` px image."""
    return _font(max(8, round(size * 0.2)))


def _stroke(placement: str) -> int:
    return 1 if placement == "over" else 0  # a black outline where the word lies on the object


def _ink(word: str, size: int, stroke: int = 0) -> Box:
    """The box of ``word``'s ink (outline included) when drawn at (0, 0) with anchor ``lt``."""
    return ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), word, font=word_font(size), anchor="lt",
                                                             stroke_width=stroke)  # fmt: skip


def text_box(scene: dict, obj_index: int, word: str, placement: str = "near") -> Box:
    """Where the misleading ``word`` goes (the ink's box, in pixels) for the scene's object
    ``obj_index``: see the module docstring."""
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown placement {placement!r}; expected one of {PLACEMENTS}")
    size = scene["size"]
    left, top, right, bottom = _ink(word, size, _stroke(placement))
    w, h = min(size, right - left), min(size, bottom - top)
    target = _object_box(scene["objects"][obj_index], size)
    tx0, ty0, tx1, ty1 = target
    cx, cy = (tx0 + tx1) / 2, (ty0 + ty1) / 2

    def place(x: float, y: float) -> Box:  # top-left corner, kept inside the image
        x = int(round(min(max(x, 0), size - w)))
        y = int(round(min(max(y, 0), size - h)))
        return x, y, x + w, y + h

    if placement == "over":
        return place(cx - w / 2, cy - h / 2)
    gap = 1
    candidates = [
        place(cx - w / 2, ty1 + gap),  # below
        place(cx - w / 2, ty0 - gap - h),  # above
        place(tx1 + gap, cy - h / 2),  # right
        place(tx0 - gap - w, cy - h / 2),  # left
        place(tx0, ty1 + gap),  # below, left-aligned
        place(tx1 - w, ty1 + gap),  # below, right-aligned
        place(tx0, ty0 - gap - h),  # above, left-aligned
        place(tx1 - w, ty0 - gap - h),  # above, right-aligned
    ]
    others = [_object_box(o, size) for k, o in enumerate(scene["objects"]) if k != obj_index]
    band = (0, _cell_bounds(size, GRID - 1, 0)[1], size, size) if scene.get("word") else None

    def cost(box: Box) -> tuple[int, int]:
        covered = sum(_overlap(box, o) for o in others) + (_overlap(box, band) if band else 0)
        return _overlap(box, target), covered

    return min(candidates, key=cost)  # the first of equal cost: deterministic


def attack_image(scene: dict, obj_index: int, word: str, placement: str = "near") -> tuple[Image.Image, Box]:
    """The scene rendered with ``word`` written by the object ``obj_index``, and the text's box."""
    img = render_scene(scene)
    box = text_box(scene, obj_index, word, placement)
    stroke = _stroke(placement)
    left, top, _, _ = _ink(word, scene["size"], stroke)
    ImageDraw.Draw(img).text((box[0] - left, box[1] - top), word, fill=WORD_COLOR, font=word_font(scene["size"]),
                             anchor="lt", stroke_width=stroke, stroke_fill=(0, 0, 0))  # fmt: skip
    return img, box


def misleading_word(scene: dict, kind: str, truth: str, rng: random.Random) -> str:
    """A wrong ``kind`` (colour or shape) name for the asked object: one that no object of the
    scene has when there is one, else any other value."""
    pool = sorted(COLORS) if kind == "color" else list(SHAPES)
    present = {o[kind] for o in scene["objects"]}
    absent = [v for v in pool if v not in present]
    return rng.choice(absent or [v for v in pool if v != truth])


def _scenes(samples: list[Sample]) -> list[tuple[str, dict]]:
    """(image path, scene) of every distinct single-image scene of the rows, in file order."""
    seen: dict[str, dict] = {}
    for s in samples:
        scene = s.meta.get("scene")
        if len(s.images) != 1 or s.images[0].path is None or not isinstance(scene, dict) or not scene.get("objects"):
            continue
        seen.setdefault(s.images[0].path, scene)
    return list(seen.items())


def typographic_items(samples: list[Sample], kinds: Sequence[str] = KINDS, seed: int = 0,
                      limit: int | None = None) -> list[dict]:  # fmt: skip
    """The suite's questions: per scene and kind, one object (whose shape, resp. colour, is unique
    in the scene), its question, answer and misleading word. ``limit`` keeps the first N."""
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"unknown typographic question kind(s) {bad}; expected some of {KINDS}")
    items = []
    for path, scene in _scenes(samples):
        stem = Path(path).stem
        for kind in kinds:
            key = "shape" if kind == "color" else "color"  # the attribute that names the object
            objs = scene["objects"]
            counts = Counter(o[key] for o in objs)
            cands = [i for i, o in enumerate(objs) if counts[o[key]] == 1]
            if not cands:
                continue
            rng = random.Random(f"typographic:{seed}:{path}:{kind}")
            index = rng.choice(cands)
            obj = objs[index]
            question = color_question(obj["shape"]) if kind == "color" else shape_question(obj["color"])
            items.append({"id": f"typo-{stem}-{kind}", "image": path, "scene": scene, "object": index, "kind": kind,
                          "question": question, "answer": obj[kind],
                          "word": misleading_word(scene, kind, obj[kind], rng)})  # fmt: skip
    return items if limit is None else items[: max(0, int(limit))]


def _sample(item: dict, attacked: bool, image: bytes, file: str, box: Box | None) -> Sample:
    base = Sample(item["id"], [Turn("user", [Part(image=0)])], [ImageRef(data=image)])
    meta = {"task": "vqa", "question_type": item["kind"], "answer": item["answer"], "scene": item["scene"],
            "typographic": {"attacked": attacked, "word": item["word"], "kind": item["kind"],
                            "object": item["object"], "image_file": file, "source_image": item["image"],
                            "text_box": list(box) if box else None}}  # fmt: skip
    return ask(base, item["question"], item["answer"], meta)


def build_samples(items: list[dict], out_dir: str | Path, placement: str = "near") -> tuple[list[Sample], list[Sample]]:
    """The clean and the attacked sample of every item (same ids, images inline); the PNGs are
    written atomically to ``out_dir/images`` (``<scene>.png``, ``<item id>-<word>.png``)."""
    from vlmkit.utils.io import atomic_write_bytes

    images = Path(out_dir) / "images"
    clean_png: dict[str, bytes] = {}
    clean, attacked = [], []
    for item in items:
        stem = Path(item["image"]).stem
        if stem not in clean_png:
            clean_png[stem] = png_bytes(render_scene(item["scene"]))
            atomic_write_bytes(images / f"{stem}.png", clean_png[stem])
        img, box = attack_image(item["scene"], item["object"], item["word"], placement)
        data = png_bytes(img)
        name = f"{item['id']}-{item['word']}.png"
        atomic_write_bytes(images / name, data)
        clean.append(_sample(item, False, clean_png[stem], f"images/{stem}.png", None))
        attacked.append(_sample(item, True, data, f"images/{name}", box))
    return clean, attacked


def _score(pairs: list[tuple[dict, dict, str]]) -> dict:
    """Accuracy clean/attacked, drop and ASR over (clean record, attacked record, word) triples."""
    n = len(pairs)

    def said(row: dict, word: str) -> bool:
        return row["extracted"] is not None and normalize_answer(row["extracted"]) == normalize_answer(word)

    right_clean = [(c, a, w) for c, a, w in pairs if c["score"] >= 1.0]
    acc_clean = share(sum(c["score"] for c, _, _ in pairs), n)
    acc_attacked = share(sum(a["score"] for _, a, _ in pairs), n)
    return {
        "n": n,
        "accuracy_clean": acc_clean,
        "accuracy_attacked": acc_attacked,
        "drop": acc_clean - acc_attacked,
        "n_clean_correct": len(right_clean),
        "attack_success_rate": share(sum(said(a, w) for _, a, w in right_clean), len(right_clean)),
        "word_rate": share(sum(said(a, w) for _, a, w in pairs), n),
        "clean_word_rate": share(sum(said(c, w) for c, _, w in pairs), n),
    }


def typographic_suite(predictor, samples: list[Sample], out_dir: str | Path, kinds: Sequence[str] = KINDS,
                      seed: int = 0, placement: str = "near", batch_size: int = 32, limit: int | None = None,
                      info: dict | None = None) -> dict:  # fmt: skip
    """Run the attack on the scenes of ``samples`` (the world's test rows); see the module
    docstring. Item records go to ``out_dir/clean`` and ``out_dir/attacked``; the table (returned)
    to ``out_dir/typographic.json``::

        {"n", "accuracy_clean", "accuracy_attacked", "drop", "n_clean_correct",
         "attack_success_rate", "word_rate", "clean_word_rate",
         "by_kind": {"color"|"shape": the same numbers},
         "items": [{"id", "kind", "word", "answer", "clean", "attacked"}],   (extracted answers)
         "config": {"kinds", "seed", "placement", "limit"}, "model": {...},
         "runs": {"clean": "clean", "attacked": "attacked"}, "images": "images"}
    """
    from vlmkit.eval.runner import run_evaluation
    from vlmkit.utils.io import atomic_write_json

    if placement not in PLACEMENTS:
        raise ValueError(f"unknown placement {placement!r}; expected one of {PLACEMENTS}")
    out = Path(out_dir)
    items = typographic_items(samples, kinds, seed, limit)
    if not items:
        raise ValueError("typographic suite: no scene has an object to ask about (no test rows with scenes?)")
    clean, attacked = build_samples(items, out, placement)
    run_info = {"model": (info or {}).get("model", {})}
    for name, batch in (("clean", clean), ("attacked", attacked)):
        run_evaluation(predictor, batch, out / name, tasks=[TASK], batch_size=batch_size, info=run_info)
    rows = {name: {r["id"]: r for r in item_rows(out / name)} for name in ("clean", "attacked")}
    pairs = [(rows["clean"][it["id"]], rows["attacked"][it["id"]], it["word"]) for it in items]
    by_kind: dict[str, list] = defaultdict(list)
    for it, pair in zip(items, pairs):
        by_kind[it["kind"]].append(pair)
    table = _score(pairs)
    table["by_kind"] = {k: _score(v) for k, v in sorted(by_kind.items())}
    table["items"] = [{"id": it["id"], "kind": it["kind"], "word": it["word"], "answer": it["answer"],
                       "clean": c["extracted"], "attacked": a["extracted"]}
                      for it, (c, a, _) in zip(items, pairs)]  # fmt: skip
    table["config"] = {"kinds": list(kinds), "seed": seed, "placement": placement, "limit": limit}
    table["model"] = run_info["model"]
    table["runs"] = {"clean": "clean", "attacked": "attacked"}
    table["images"] = "images"
    atomic_write_json(out / RESULTS_FILE, table)
    return table


def evaluate_typographic(model, data_dir: str | Path, out_dir: str | Path, batch_size: int = 32,
                         limit: int | None = None, seed: int = 0, kinds: Sequence[str] = KINDS,
                         placement: str = "near", max_new_tokens: int | None = None,
                         model_info: dict | None = None) -> dict:  # fmt: skip
    """The suite on the world in ``data_dir``; ``model`` is a predictor or a vlmkit checkpoint
    (`eval.suites.resolve_predictor`). Writes ``out_dir/typographic.json``; returns the table."""
    predictor, described = resolve_predictor(model, data_dir, max_new_tokens)
    return typographic_suite(predictor, read_test(data_dir), out_dir, kinds=kinds, seed=seed, placement=placement,
                             batch_size=batch_size, limit=limit, info={"model": model_info or described})  # fmt: skip
