"""The shapes world: seeded synthetic scenes and the tasks derived from them.

Every answer is computed from a JSON-able scene graph, so every metric can be checked against
ground truth. See docs/formats.md for the task list with one example row per question type.

Scene: a ``size`` px canvas with a dark neutral background; 1-6 filled objects, one per cell of a
``GRID x GRID`` grid (16 px cells at 64 px), each jittered inside its cell, so objects never
overlap. With probability `WORD_PROB` a short word is drawn in the bottom row band and objects
use only the other rows.

Randomness: every scene (and every scene's rows) has its own `random.Random` seeded from
``(VERSION, seed, split, index)``; train and test use different streams, and scene ``i`` does not
depend on how many scenes are generated.

Co-occurrence: shapes are drawn from a non-uniform prior (`SHAPE_PRIOR`); each object after the
first is, with probability `PARTNER_PROB`, the fixed partner (`PARTNERS`) of an earlier object.
POPE negatives use statistics of the *training* scenes (stored in the manifest under ``stats``):
``popular`` asks about the most frequent absent shape, ``adversarial`` about the absent shape that
co-occurs most with the present ones (coloured with a colour present in the scene).

Interleaved documents (``documents.jsonl``, `make_documents`) tie 2-4 training pictures together
in text, for the interleaved pre-training stage; they never use a test scene.
"""

from __future__ import annotations

import io
import json
import random
import shutil
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

from PIL import Image, ImageDraw, ImageFont

from vlmkit.data.formats.interleaved import dumps_documents, sample_to_document
from vlmkit.data.formats.llava import dumps_rows, preference_to_row, sample_to_row
from vlmkit.data.sample import Box, ImageRef, Part, PreferencePair, Sample, Turn
from vlmkit.utils.io import atomic_write_json, atomic_write_text

VERSION = 4  # 2: "an orange ..." instead of "a orange ..."; 3: binding drills in the train split;
# 4: documents.jsonl (interleaved documents of train scenes)
# Scenes and their random streams are those of version 2: only the training data changed in
# versions 3 and 4, so held-out figures stay comparable with earlier measurements.
SCENE_STREAM = 2
GRID = 4
MAX_OBJECTS = 6

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "hexagon", "cross")
PLURALS = {s: ("crosses" if s == "cross" else s + "s") for s in SHAPES}
SHAPE_PRIOR = {"circle": 0.24, "square": 0.20, "triangle": 0.17, "diamond": 0.14, "hexagon": 0.13, "cross": 0.12}
PARTNERS = {
    "circle": "hexagon", "hexagon": "circle",
    "square": "triangle", "triangle": "square",
    "diamond": "cross", "cross": "diamond",
}  # fmt: skip
PARTNER_PROB = 0.5
SIDES = {"circle": 0, "square": 4, "triangle": 3, "diamond": 4, "hexagon": 6, "cross": 12}

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 230),
    "yellow": (240, 210, 30),
    "purple": (150, 60, 200),
    "orange": (245, 135, 20),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (16, 16, 16),
    "charcoal": (36, 36, 40),
    "dark gray": (56, 56, 56),
    "slate": (40, 48, 64),
}
SIZES = {"small": 0.5, "large": 0.85}  # side as a fraction of the cell
WORDS: tuple[str, ...] = ("cat", "dog", "sun", "box", "fish", "tree", "moon", "bird", "cake", "ship", "door", "lamp")
WORD_PROB = 0.3
WORD_COLOR = (245, 245, 245)
RELATIONS = ("left", "right", "above", "below")

QUESTION_TYPES: dict[str, tuple[str, ...]] = {
    "caption": ("caption_short", "caption_detailed"),
    "vqa": ("color", "shape", "count_total", "count_color", "count_shape", "spatial", "reading"),
    "pope": ("exists",),
    "mcq": ("mcq_color", "mcq_shape", "mcq_count"),
    "grounding": ("ground_ref", "ground_box"),
    "dialogue": ("dialogue",),
    "vqa_drill": ("vqa_drill",),  # training only: the colour and shape questions of one image
    "compare": ("compare_count",),
    "text": ("text_knowledge", "text_arith", "text_scene"),
    "preference": ("color", "shape", "count_total", "count_color", "count_shape"),
}
IMAGE_DEPENDENT_TYPES: tuple[str, ...] = QUESTION_TYPES["vqa"]
POPE_SPLITS = ("random", "popular", "adversarial")

# prompts (one phrasing per type keeps the language regular for a tiny LM)
CAPTION_PROMPTS = {"caption_short": "Describe the image briefly.", "caption_detailed": "Describe the image in detail."}
MCQ_SUFFIX = "Answer with the letter."
COMPARE_SUFFIX = "Answer first or second."
IMAGE_TOKEN = "<image>"


# ================================================================== scenes


def _cell_bounds(size: int, r: int, c: int) -> tuple[int, int, int, int]:
    return (round(c * size / GRID), round(r * size / GRID), round((c + 1) * size / GRID), round((r + 1) * size / GRID))


def _pick_shape(rng: random.Random, present: list[str]) -> str:
    if present and rng.random() < PARTNER_PROB:
        return PARTNERS[rng.choice(present)]
    return rng.choices(SHAPES, weights=[SHAPE_PRIOR[s] for s in SHAPES])[0]


def make_scene(rng: random.Random, size: int = 64) -> dict:
    """A random scene graph (JSON-able). Objects are listed in reading order (row, then column)."""
    word = rng.choice(WORDS) if rng.random() < WORD_PROB else None
    rows = GRID - 1 if word else GRID
    n = rng.randint(1, MAX_OBJECTS)
    cells = sorted(rng.sample([(r, c) for r in range(rows) for c in range(GRID)], n))
    background = rng.choice(sorted(BACKGROUNDS))
    objects = []
    shapes: list[str] = []
    for r, c in cells:
        shape = _pick_shape(rng, shapes)
        shapes.append(shape)
        color = rng.choice(sorted(COLORS))
        size_name = rng.choice(sorted(SIZES))
        x0c, y0c, x1c, y1c = _cell_bounds(size, r, c)
        side = max(3, round(SIZES[size_name] * min(x1c - x0c, y1c - y0c)))
        x0 = x0c + rng.randint(0, x1c - x0c - side)
        y0 = y0c + rng.randint(0, y1c - y0c - side)
        objects.append(
            {
                "shape": shape,
                "color": color,
                "size": size_name,
                "cell": [r, c],
                "box": [x0 / size, y0 / size, (x0 + side) / size, (y0 + side) / size],
            }
        )
    return {"size": size, "grid": GRID, "background": background, "word": word, "objects": objects}


# ================================================================== rendering


def _font(px: int):
    try:
        return ImageFont.load_default(size=px)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _draw_object(draw: ImageDraw.ImageDraw, obj: dict, size: int) -> None:
    x0, y0, x1, y1 = (round(v * size) for v in obj["box"])
    s = x1 - x0
    xe, ye = x0 + s - 1, y0 + s - 1  # inclusive far edges
    xm, ym = x0 + (s - 1) / 2, y0 + (s - 1) / 2
    fill = COLORS[obj["color"]]
    shape = obj["shape"]
    if shape == "circle":
        draw.ellipse([x0, y0, xe, ye], fill=fill)
    elif shape == "square":
        draw.rectangle([x0, y0, xe, ye], fill=fill)
    elif shape == "triangle":
        draw.polygon([(xm, y0), (xe, ye), (x0, ye)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(xm, y0), (xe, ym), (xm, ye), (x0, ym)], fill=fill)
    elif shape == "hexagon":
        q = (s - 1) / 4
        draw.polygon([(x0 + q, y0), (xe - q, y0), (xe, ym), (xe - q, ye), (x0 + q, ye), (x0, ym)], fill=fill)
    elif shape == "cross":
        t = max(1, round(s / 3))
        a = (s - t) // 2
        draw.rectangle([x0, y0 + a, xe, y0 + a + t - 1], fill=fill)
        draw.rectangle([x0 + a, y0, x0 + a + t - 1, ye], fill=fill)
    else:  # pragma: no cover
        raise ValueError(f"unknown shape {shape!r}")


def render_scene(scene: dict) -> Image.Image:
    """Draw a scene graph (no anti-aliasing on shapes, so pixel colours are exact)."""
    size = scene["size"]
    img = Image.new("RGB", (size, size), BACKGROUNDS[scene["background"]])
    draw = ImageDraw.Draw(img)
    for obj in scene["objects"]:
        _draw_object(draw, obj, size)
    if scene.get("word"):
        band_top = _cell_bounds(size, GRID - 1, 0)[1]
        cx, cy = size / 2, (band_top + size) / 2
        draw.text((cx, cy), scene["word"], fill=WORD_COLOR, font=_font(max(8, round(size * 0.2))), anchor="mm")
    return img


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# ================================================================== language


def article(word: str) -> str:
    """The indefinite article for ``word`` ("an orange", "a red")."""
    return "an" if word[:1] in "aeiou" else "a"


def obj_name(o: dict) -> str:
    return f"{o['color']} {o['shape']}"


def position_phrase(o: dict) -> str:
    """The quadrant of the object's cell: ``top left`` ... ``bottom right``."""
    r, c = o["cell"]
    return f"{'top' if r < GRID / 2 else 'bottom'} {'left' if c < GRID / 2 else 'right'}"


def _join(items: list[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def caption_short(scene: dict) -> str:
    return _join([f"{article(obj_name(o))} {obj_name(o)}" for o in scene["objects"]]) + "."


def caption_detailed(scene: dict) -> str:
    text = ", ".join(f"a {o['size']} {obj_name(o)} at {position_phrase(o)}" for o in scene["objects"]) + "."
    if scene.get("word"):
        text += f" the word {scene['word']} is written at the bottom."
    return text


def describe_object(o: dict) -> str:
    return f"a {o['size']} {obj_name(o)}"


def _center(o: dict) -> tuple[float, float]:
    b = o["box"]
    return (b[0] + b[2]) / 2, (b[1] + b[3]) / 2


def spatial_relation(a: dict, b: dict) -> str | None:
    """Where ``a`` is relative to ``b``, when one axis clearly dominates; else None.

    Clear: the dominant centre difference is at least twice the other and at least 3/4 of a cell.
    """
    (ax, ay), (bx, by) = _center(a), _center(b)
    dx, dy = ax - bx, ay - by
    min_gap = 0.75 / GRID
    if abs(dx) >= 2 * abs(dy) and abs(dx) >= min_gap:
        return "left" if dx < 0 else "right"
    if abs(dy) >= 2 * abs(dx) and abs(dy) >= min_gap:
        return "above" if dy < 0 else "below"
    return None


def _unique_by(objects: list[dict], key: Callable[[dict], Any]) -> list[dict]:
    counts = Counter(key(o) for o in objects)
    return [o for o in objects if counts[key(o)] == 1]


def unique_referents(scene: dict) -> list[dict]:
    """Objects whose colour+shape is unique in the scene (so "the red circle" names one object)."""
    return _unique_by(scene["objects"], obj_name)


# A VQA question: (question, answer, extra meta)
QA = tuple[str, str, dict]


def color_question(shape: str) -> str:
    return f"What color is the {shape}?"


def shape_question(color: str) -> str:
    return f"What shape is the {color} object?"


def vqa_candidates(scene: dict, qtype: str, rng: random.Random) -> QA | None:
    """One question of ``qtype`` about the scene, or None if the type does not apply."""
    objs = scene["objects"]
    if qtype == "color":
        cands = _unique_by(objs, lambda o: o["shape"])
        if not cands:
            return None
        o = rng.choice(cands)
        return color_question(o["shape"]), o["color"], {}
    if qtype == "shape":
        cands = _unique_by(objs, lambda o: o["color"])
        if not cands:
            return None
        o = rng.choice(cands)
        return shape_question(o["color"]), o["shape"], {}
    if qtype == "count_total":
        return "How many objects are there?", str(len(objs)), {}
    if qtype == "count_color":
        present = sorted({o["color"] for o in objs})
        color = rng.choice(present) if rng.random() < 0.7 else rng.choice(sorted(COLORS))
        return f"How many {color} objects are there?", str(sum(o["color"] == color for o in objs)), {}
    if qtype == "count_shape":
        present = sorted({o["shape"] for o in objs})
        shape = rng.choice(present) if rng.random() < 0.7 else rng.choice(SHAPES)
        return f"How many {PLURALS[shape]} are there?", str(sum(o["shape"] == shape for o in objs)), {}
    if qtype == "spatial":
        uniq = unique_referents(scene)
        pairs = [(a, b, rel) for a in uniq for b in uniq if a is not b for rel in [spatial_relation(a, b)] if rel]
        if not pairs:
            return None
        a, b, rel = rng.choice(pairs)
        return f"Where is the {obj_name(a)} relative to the {obj_name(b)}?", rel, {}
    if qtype == "reading":
        if not scene.get("word"):
            return None
        return "What word is written in the image?", scene["word"], {}
    raise ValueError(f"unknown VQA question type {qtype!r}")


def applicable_vqa_types(scene: dict) -> list[str]:
    probe = random.Random(0)
    return [t for t in IMAGE_DEPENDENT_TYPES if vqa_candidates(scene, t, probe) is not None]


def pope_question(color: str, shape: str) -> str:
    return f"Is there {article(color)} {color} {shape} in the image?"


def pope_negative(scene: dict, split: str, stats: dict, rng: random.Random) -> tuple[str, str]:
    """An absent (colour, shape) for a POPE negative of the given split.

    random: a uniformly random absent shape, random colour. popular: the most frequent absent
    shape in the training scenes, random colour. adversarial: the absent shape that co-occurs most
    (in training scenes) with the shapes present, in a colour present in the scene. If every shape
    is present, a colour+shape combination that is absent is used, chosen the same way.
    """
    present_shapes = {o["shape"] for o in scene["objects"]}
    present_names = {obj_name(o) for o in scene["objects"]}
    present_colors = sorted({o["color"] for o in scene["objects"]})
    absent = [s for s in SHAPES if s not in present_shapes]
    freq = stats["shape_frequency"]
    cooc = stats["cooccurrence"]

    def cooc_score(s: str) -> int:
        return sum(cooc[p].get(s, 0) for p in present_shapes)

    if absent:
        if split == "random":
            return rng.choice(sorted(COLORS)), rng.choice(absent)
        if split == "popular":
            return rng.choice(sorted(COLORS)), max(absent, key=lambda s: (freq[s], -SHAPES.index(s)))
        if split == "adversarial":
            return rng.choice(present_colors), max(absent, key=lambda s: (cooc_score(s), -SHAPES.index(s)))
        raise ValueError(split)
    combos = [(c, s) for s in SHAPES for c in sorted(COLORS) if f"{c} {s}" not in present_names]
    if split == "popular":
        best = max(freq[s] for _, s in combos)
        combos = [(c, s) for c, s in combos if freq[s] == best]
    elif split == "adversarial":
        combos = [(c, s) for c, s in combos if c in present_colors] or combos
    return rng.choice(combos)


def mcq_question(scene: dict, qtype: str, rng: random.Random) -> tuple[str, str, list[str]] | None:
    """(question text with options, answer letter, options) or None."""
    objs = scene["objects"]
    if qtype == "mcq_color":
        qa = vqa_candidates(scene, "color", rng)
        pool = sorted(COLORS)
        present = sorted({o["color"] for o in objs})
    elif qtype == "mcq_shape":
        qa = vqa_candidates(scene, "shape", rng)
        pool = list(SHAPES)
        present = sorted({o["shape"] for o in objs})
    elif qtype == "mcq_count":
        qa = vqa_candidates(scene, "count_total", rng)
        pool = [str(i) for i in range(1, MAX_OBJECTS + 1)]
        present = []
    else:
        raise ValueError(qtype)
    if qa is None:
        return None
    question, answer, _ = qa
    # distractors: values present in the scene first (plausible), then the rest
    near = [v for v in present if v != answer]
    rng.shuffle(near)
    rest = [v for v in pool if v != answer and v not in near]
    rng.shuffle(rest)
    options = [answer] + (near + rest)[:3]
    rng.shuffle(options)
    letters = "ABCD"
    text = question + "\n" + "\n".join(f"{letters[i]}. {v}" for i, v in enumerate(options)) + "\n" + MCQ_SUFFIX
    return text, letters[options.index(answer)], options


# ================================================================== rows


def _user(text: str) -> Turn:
    """A user turn; ``<image>`` placeholders become image parts numbered from 0."""
    parts: list[Part] = []
    k = 0
    for i, piece in enumerate(text.split(IMAGE_TOKEN)):
        if i > 0:
            parts.append(Part(image=k))
            k += 1
        if piece:
            parts.append(Part(text=piece))
    return Turn("user", parts)


def _qa_sample(sid: str, image: str | None, question: str, answer: str, meta: dict) -> Sample:
    prompt = f"{IMAGE_TOKEN}\n{question}" if image else question
    return Sample(sid, [_user(prompt), Turn.of_text("assistant", answer)], [ImageRef(path=image)] if image else [], meta)


class _RowMaker:
    """Builds the rows of one split."""

    def __init__(self, split: str, stats: dict):
        self.split = split
        self.stats = stats
        self.rows: list[Sample] = []
        self.prefs: list[PreferencePair] = []
        self.vqa_counts: Counter = Counter()

    def add(self, sid: str, image: str | None, question: str, answer: str, scene: dict | None, task: str, qtype: str, **extra) -> None:
        meta = {"task": task, "question_type": qtype, "answer": answer, **extra, "scene": scene}
        self.rows.append(_qa_sample(sid, image, question, answer, meta))

    # ---- per-task helpers
    def caption(self, sid, image, scene, qtype):
        text = caption_short(scene) if qtype == "caption_short" else caption_detailed(scene)
        self.add(sid, image, CAPTION_PROMPTS[qtype], text, scene, "caption", qtype)

    def vqa(self, sid, image, scene, qtype, rng):
        q, a, extra = vqa_candidates(scene, qtype, rng)  # type: ignore[misc]
        self.add(sid, image, q, a, scene, "vqa", qtype, **extra)
        self.vqa_counts[qtype] += 1

    def pope(self, sid, image, scene, positive: bool, split: str, rng):
        if positive:
            o = rng.choice(scene["objects"])
            color, shape = o["color"], o["shape"]
        else:
            color, shape = pope_negative(scene, split, self.stats, rng)
        self.add(sid, image, pope_question(color, shape), "yes" if positive else "no", scene, "pope", "exists",
                 pope_split=split, object=f"{color} {shape}")  # fmt: skip

    def mcq(self, sid, image, scene, qtype, rng) -> bool:
        m = mcq_question(scene, qtype, rng)
        if m is None:
            return False
        text, letter, options = m
        self.add(sid, image, text, letter, scene, "mcq", qtype, options=options)
        return True

    def ground_ref(self, sid, image, scene, rng) -> bool:
        cands = unique_referents(scene)
        if not cands:
            return False
        o = rng.choice(cands)
        box = Box(*o["box"])
        self.add(sid, image, f"Give the box of the {obj_name(o)}.", box.to_text(), scene, "grounding", "ground_ref",
                 box=list(o["box"]))  # fmt: skip
        return True

    def ground_box(self, sid, image, scene, rng):
        o = rng.choice(scene["objects"])
        box = Box(*o["box"])
        self.add(sid, image, f"What is at {box.to_text()}?", describe_object(o), scene, "grounding", "ground_box",
                 box=list(o["box"]))  # fmt: skip

    def dialogue(self, sid, image, scene, rng):
        """Two or three questions of different types on one image."""
        types = applicable_vqa_types(scene)
        chosen = rng.sample(types, min(len(types), rng.randint(2, 3)))
        qas = []
        for t in chosen:
            q, a, _ = vqa_candidates(scene, t, rng)  # type: ignore[misc]
            qas.append((t, q, a))
        self._add_dialogue(sid, image, scene, qas)

    def drill(self, sid, image, scene, rng, max_questions: int = 8):
        """Every attribute-binding question the scene allows, shuffled, as one dialogue.

        "What color is the <shape>?" for each object whose shape is unique, "What shape is the
        <color> object?" for each object whose colour is unique (at most ``max_questions``).
        Training only. Every answer is a supervised target, so one sequence carries several
        lessons in looking an object up among the visual tokens by one attribute and reading
        off another: the signal that lets the tiny LM learn binding (docs/binding.md).
        """
        objs = scene["objects"]
        qas = [("color", color_question(o["shape"]), o["color"]) for o in _unique_by(objs, lambda o: o["shape"])]
        qas += [("shape", shape_question(o["color"]), o["shape"]) for o in _unique_by(objs, lambda o: o["color"])]
        rng.shuffle(qas)
        if qas:
            self._add_dialogue(sid, image, scene, qas[:max_questions], task="vqa_drill")

    def _add_dialogue(self, sid, image, scene, qas: list[tuple[str, str, str]], task: str = "dialogue"):
        turns: list[Turn] = []
        for k, (_, q, a) in enumerate(qas):
            turns += [_user(f"{IMAGE_TOKEN}\n{q}" if k == 0 else q), Turn.of_text("assistant", a)]
        answers = [a for _, _, a in qas]
        meta = {"task": task, "question_type": task, "answer": answers[-1], "answers": answers,
                "question_types": [t for t, _, _ in qas], "scene": scene}  # fmt: skip
        self.rows.append(Sample(sid, turns, [ImageRef(path=image)], meta))

    def compare(self, sid, img_a, scene_a, img_b, scene_b, rng) -> bool:
        def count(sc, s):
            return sum(o["shape"] == s for o in sc["objects"])

        shapes = [s for s in SHAPES if count(scene_a, s) != count(scene_b, s)]
        if not shapes:
            return False
        s = rng.choice(shapes)
        answer = "first" if count(scene_a, s) > count(scene_b, s) else "second"
        prompt = f"Image 1: {IMAGE_TOKEN}\nImage 2: {IMAGE_TOKEN}\nWhich image has more {PLURALS[s]}? {COMPARE_SUFFIX}"
        meta = {"task": "compare", "question_type": "compare_count", "answer": answer, "scene": None,
                "scenes": [scene_a, scene_b]}  # fmt: skip
        turns = [_user(prompt), Turn.of_text("assistant", answer)]
        self.rows.append(Sample(sid, turns, [ImageRef(path=img_a), ImageRef(path=img_b)], meta))
        return True

    def text(self, sid, rng, size):
        r = rng.random()
        if r < 0.2:
            shape = rng.choice(SHAPES)
            kind = rng.choice(["sides", "corners", "which"])
            if kind == "which":
                n, shape = rng.choice([(3, "triangle"), (6, "hexagon"), (12, "cross")])
                q, a = f"Which shape has {n} sides?", shape
            else:
                q, a = f"How many {kind} does a {shape} have?", str(SIDES[shape])
            self.add(sid, None, q, a, None, "text", "text_knowledge")
        elif r < 0.4:
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            if rng.random() < 0.5:
                q, ans = f"What is {a} plus {b}?", a + b
            else:
                a, b = max(a, b), min(a, b)
                q, ans = f"What is {a} minus {b}?", a - b
            self.add(sid, None, q, str(ans), None, "text", "text_arith")
        else:
            scene = make_scene(rng, size)
            qtype = rng.choice(applicable_vqa_types(scene))
            q, a, _ = vqa_candidates(scene, qtype, rng)  # type: ignore[misc]
            self.add(sid, None, f"Scene: {caption_detailed(scene)}\n{q}", a, scene, "text", "text_scene", asks=qtype)

    def preference(self, sid, image, scene, rng) -> None:
        qtype = rng.choice(["color", "shape", "count_total", "count_color", "count_shape"])
        qa = vqa_candidates(scene, qtype, rng)
        if qa is None:
            qtype, qa = "count_total", vqa_candidates(scene, "count_total", rng)
        q, a, _ = qa  # type: ignore[misc]
        if qtype in ("color", "shape"):
            key, pool = ("color", sorted(COLORS)) if qtype == "color" else ("shape", list(SHAPES))
            others = sorted({o[key] for o in scene["objects"]} - {a}) or [v for v in pool if v != a]
            rejected = rng.choice(others)
        else:
            n = int(a)
            rejected = str(n + 1 if n == 0 or rng.random() < 0.5 else n - 1)
        meta = {"task": "preference", "question_type": qtype, "answer": a, "scene": scene}
        self.prefs.append(PreferencePair(sid, [_user(f"{IMAGE_TOKEN}\n{q}")], a, rejected, [ImageRef(path=image)], meta))


def _scene_rng(seed: int, split: str, index: int, what: str) -> random.Random:
    return random.Random(f"shapes-v{SCENE_STREAM}:{seed}:{split}:{what}:{index}")


def _train_rows(mk: _RowMaker, index: int, image: str, scene: dict, rng: random.Random) -> None:
    sid = f"train-{index:06d}"
    mk.caption(f"{sid}-cap", image, scene, rng.choice(QUESTION_TYPES["caption"]))
    types = applicable_vqa_types(scene)
    for t in rng.sample(types, min(len(types), rng.randint(3, 4))):
        mk.vqa(f"{sid}-vqa-{t}", image, scene, t, rng)
    positive = rng.random() < 0.5
    mk.pope(f"{sid}-pope", image, scene, positive, rng.choice(POPE_SPLITS), rng)
    r = rng.random()
    if r < 0.4:
        mcq_type = rng.choice(QUESTION_TYPES["mcq"])
        if not mk.mcq(f"{sid}-mcq", image, scene, mcq_type, rng):
            mk.mcq(f"{sid}-mcq", image, scene, "mcq_count", rng)
    elif r < 0.8:
        if not mk.ground_ref(f"{sid}-gref", image, scene, rng):
            mk.ground_box(f"{sid}-gbox", image, scene, rng)
    else:
        mk.ground_box(f"{sid}-gbox", image, scene, rng)
    if rng.random() < 0.15:
        mk.dialogue(f"{sid}-dlg", image, scene, rng)
    if rng.random() < 0.5:
        mk.preference(f"{sid}-pref", image, scene, rng)
    mk.drill(f"{sid}-drill", image, scene, rng)


def _test_rows(mk: _RowMaker, index: int, image: str, scene: dict, rng: random.Random) -> None:
    sid = f"test-{index:06d}"
    # VQA: up to 4 types, the least-asked so far first, so types are spread evenly
    types = applicable_vqa_types(scene)
    order = sorted(types, key=lambda t: (mk.vqa_counts[t], rng.random()))
    for t in order[:4]:
        mk.vqa(f"{sid}-vqa-{t}", image, scene, t, rng)
    # POPE: one positive and one negative per split (balanced yes/no)
    for split in POPE_SPLITS:
        mk.pope(f"{sid}-pope-{split}-yes", image, scene, True, split, rng)
        mk.pope(f"{sid}-pope-{split}-no", image, scene, False, split, rng)
    if not mk.ground_ref(f"{sid}-gref", image, scene, rng):
        pass  # no unique referent (rare): no ground_ref for this scene
    mk.ground_box(f"{sid}-gbox", image, scene, rng)
    mk.caption(f"{sid}-cap", image, scene, QUESTION_TYPES["caption"][index % 2])
    mcq_types = QUESTION_TYPES["mcq"]
    if not mk.mcq(f"{sid}-mcq", image, scene, mcq_types[index % 3], rng):
        mk.mcq(f"{sid}-mcq", image, scene, "mcq_count", rng)
    if rng.random() < 0.1:
        mk.dialogue(f"{sid}-dlg", image, scene, rng)


# ================================================================== interleaved documents

DOCUMENT_INTROS = (
    "Here are {k} pictures of shapes.",
    "This page shows {k} pictures of shapes.",
    "{k} pictures of shapes on dark backgrounds.",
)
ORDINALS = ("first", "second", "third", "fourth")
RELATION_PHRASES = {"left": "left of", "right": "right of", "above": "above", "below": "below"}
DOCUMENT_IMAGES = (2, 4)  # images per document, inclusive
# Detailed captions and relation sentences are rarer than short captions, and the text has a
# budget (see make_document): every document of the default world then fits shapes-tiny's
# 192-token sequences (at most 191 tokens with 16 tokens per image and the 1024-token tiny BPE).
DOCUMENT_DETAILED_PROB = 0.25
DOCUMENT_RELATION_PROB = 0.3
DOCUMENT_TEXT_BUDGET = 480  # characters


def relation_sentence(scene: dict, rng: random.Random) -> str | None:
    """``"The red circle is left of the blue square."`` for a random clear pair of uniquely named
    objects (as the spatial VQA question), or None if the scene has none."""
    uniq = unique_referents(scene)
    pairs = [(a, b, rel) for a in uniq for b in uniq if a is not b for rel in [spatial_relation(a, b)] if rel]
    if not pairs:
        return None
    a, b, rel = rng.choice(pairs)
    return f"The {obj_name(a)} is {RELATION_PHRASES[rel]} the {obj_name(b)}."


def count_sentences(scenes: list[dict]) -> str:
    """The closing sentences: the first two pictures' object counts compared; with more pictures,
    the one with the most objects (if one has) and the total."""
    n = [len(sc["objects"]) for sc in scenes]
    if n[0] > n[1]:
        out = ["The first picture has more objects than the second."]
    elif n[0] < n[1]:
        out = ["The second picture has more objects than the first."]
    else:
        out = ["The first and second pictures have the same number of objects."]
    if len(n) > 2:
        top = [i for i, c in enumerate(n) if c == max(n)]
        if len(top) == 1:
            out.append(f"The {ORDINALS[top[0]]} picture has the most objects.")
        out.append(f"In all, there are {sum(n)} objects.")
    return " ".join(out)


def _short_document_length(scenes: list[dict]) -> int:
    """Characters of a document about ``scenes`` with short captions, no relations, the longest intro."""
    intro = max(len(i.format(k=len(scenes))) for i in DOCUMENT_INTROS) + 1
    pictures = sum(len(f"Picture {k + 1}:  It shows {caption_short(sc)}\n") for k, sc in enumerate(scenes))
    return intro + pictures + len(count_sentences(scenes))


def make_document(sid: str, images: list[str], scenes: list[dict], rng: random.Random) -> Sample:
    """An interleaved document (one assistant turn, ``meta["document"]``) about 2-4 pictures::

        Here are 3 pictures of shapes.
        Picture 1: <image> It shows a red circle and a green triangle. The red circle is left of ...
        Picture 2: <image> It shows a small blue hexagon at top left, ...
        Picture 3: <image> It shows ...
        The second picture has more objects than the first. ... In all, there are 7 objects.

    Each caption is the short one (`caption_short`), or with probability `DOCUMENT_DETAILED_PROB`
    the detailed one (`caption_detailed`), followed with probability `DOCUMENT_RELATION_PROB` by a
    spatial relation (`relation_sentence`) when the scene has one. The text is kept within
    `DOCUMENT_TEXT_BUDGET` characters where it can be: pictures after the second are dropped while
    even short captions would exceed it, and a detailed caption or relation is only used if it
    fits. ``meta["scenes"]`` holds the scenes, in picture order.
    """
    # pictures beyond the second are dropped while even short captions would not fit the budget
    while len(scenes) > DOCUMENT_IMAGES[0] and _short_document_length(scenes) > DOCUMENT_TEXT_BUDGET:
        images, scenes = images[:-1], scenes[:-1]
    intro = rng.choice(DOCUMENT_INTROS).format(k=len(images)) + "\n"
    closing = count_sentences(scenes)
    captions = [caption_short(sc) for sc in scenes]
    extras = ["" for _ in scenes]

    def paragraph(k: int) -> str:  # what follows picture k's image
        return f" It shows {captions[k]}{extras[k]}\n"

    def length() -> int:
        pictures = sum(len(f"Picture {k + 1}: ") + len(paragraph(k)) for k in range(len(scenes)))
        return len(intro) + pictures + len(closing)

    for k, scene in enumerate(scenes):
        detailed = caption_detailed(scene) if rng.random() < DOCUMENT_DETAILED_PROB else None
        rel = relation_sentence(scene, rng) if rng.random() < DOCUMENT_RELATION_PROB else None
        if detailed and length() - len(captions[k]) + len(detailed) <= DOCUMENT_TEXT_BUDGET:
            captions[k] = detailed
        if rel and length() + 1 + len(rel) <= DOCUMENT_TEXT_BUDGET:
            extras[k] = f" {rel}"
    parts: list[Part] = []
    text = intro
    for k in range(len(scenes)):
        parts += [Part(text=text + f"Picture {k + 1}: "), Part(image=k)]
        text = paragraph(k)
    parts.append(Part(text=text + closing))
    meta = {"task": "document", "document": True, "scenes": scenes}
    return Sample(sid, [Turn("assistant", parts)], [ImageRef(path=p) for p in images], meta)


def make_documents(seed: int, image_paths: list[str], scenes: list[dict]) -> list[Sample]:
    """``max(1, n // 4)`` documents over the given (training) images, none if there are fewer than
    two. Document ``j`` has its own random stream, picks 2-4 distinct images and describes them
    (`make_document`, which may drop pictures after the second to keep the text short)."""
    n = len(scenes)
    if n < DOCUMENT_IMAGES[0]:
        return []
    docs = []
    for j in range(max(1, n // 4)):
        rng = _scene_rng(seed, "train", j, "document")
        k = rng.randint(DOCUMENT_IMAGES[0], min(DOCUMENT_IMAGES[1], n))
        picks = rng.sample(range(n), k)
        docs.append(make_document(f"train-doc-{j:06d}", [image_paths[i] for i in picks], [scenes[i] for i in picks], rng))
    return docs


def _compute_stats(scenes: list[dict]) -> dict:
    freq = {s: 0 for s in SHAPES}
    cooc = {a: {b: 0 for b in SHAPES if b != a} for a in SHAPES}
    for sc in scenes:
        present = sorted({o["shape"] for o in sc["objects"]})
        for a in present:
            freq[a] += 1
            for b in present:
                if a != b:
                    cooc[a][b] += 1
    ranked = sorted(SHAPES, key=lambda s: (-freq[s], SHAPES.index(s)))
    return {"n_scenes": len(scenes), "shape_frequency": freq, "cooccurrence": cooc, "popular_order": ranked}


def _counts(rows: list[Sample]) -> dict:
    return {
        "rows": len(rows),
        "tasks": dict(sorted(Counter(r.meta["task"] for r in rows).items())),
        "question_types": dict(sorted(Counter(f"{r.meta['task']}/{r.meta['question_type']}" for r in rows).items())),
        "answers": {
            "pope": dict(sorted(Counter(r.meta["answer"] for r in rows if r.meta["task"] == "pope").items())),
        },
    }


def _params(n_train: int, n_test: int, seed: int, size: int) -> dict:
    return {"n_train": n_train, "n_test": n_test, "seed": seed, "size": size, "grid": GRID}


def _cached(out: Path, params: dict) -> dict | None:
    manifest_path = out / "world.json"
    if not manifest_path.exists():
        return None
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if manifest.get("version") != VERSION or manifest.get("params") != params:
        return None
    if not all((out / f).exists() for f in manifest.get("files", {}).values()):
        return None
    return manifest


def generate_world(out_dir: str | Path, n_train: int = 4000, n_test: int = 500, seed: int = 0, size: int = 64) -> dict:
    """Write the shapes world to ``out_dir`` and return its manifest (also ``out_dir/world.json``).

    Files: ``train.json``, ``test.json`` (LLaVA JSON), ``preference_train.json``,
    ``documents.jsonl`` (interleaved documents of train images, see `make_documents`),
    ``images/{split}_{index:06d}.png``, ``world.json``. Same arguments -> byte-identical files;
    if ``world.json`` already records the same parameters and `VERSION`, nothing is regenerated.
    """
    if n_train < 1 or n_test < 1:
        raise ValueError("n_train and n_test must be at least 1")
    if size < 32:
        raise ValueError(f"size must be at least 32 px (got {size})")
    out = Path(out_dir)
    params = _params(n_train, n_test, seed, size)
    cached = _cached(out, params)
    if cached is not None:
        return cached

    # an interrupted run must never leave a manifest that describes half-written data
    (out / "world.json").unlink(missing_ok=True)
    images_dir = out / "images"
    if images_dir.exists():
        shutil.rmtree(images_dir)
    images_dir.mkdir(parents=True)

    scenes = {
        split: [make_scene(_scene_rng(seed, split, i, "scene"), size) for i in range(n)]
        for split, n in (("train", n_train), ("test", n_test))
    }
    stats = _compute_stats(scenes["train"])
    files = {"train": "train.json", "test": "test.json", "preference_train": "preference_train.json",
             "documents": "documents.jsonl"}  # fmt: skip
    counts: dict[str, Any] = {}
    details: dict[str, Any] = {}
    n_images = 0
    for split, split_scenes in scenes.items():
        mk = _RowMaker(split, stats)
        make_rows = _train_rows if split == "train" else _test_rows
        image_paths = []
        for i, scene in enumerate(split_scenes):
            rel = f"images/{split}_{i:06d}.png"
            (out / rel).write_bytes(png_bytes(render_scene(scene)))
            n_images += 1
            image_paths.append(rel)
            make_rows(mk, i, rel, scene, _scene_rng(seed, split, i, "rows"))
        # compare rows (~5% of scenes), pairing scene i with another scene of the split
        extra_rng = _scene_rng(seed, split, 0, "extra")
        n_scenes = len(split_scenes)
        if n_scenes >= 2:
            for j in range(max(1, round(0.05 * n_scenes))):
                a, b = extra_rng.sample(range(n_scenes), 2)
                mk.compare(f"{split}-cmp-{j:06d}", image_paths[a], split_scenes[a], image_paths[b], split_scenes[b], extra_rng)
        # text-only rows: ~15% of the train rows; a few in test
        n_image_rows = len(mk.rows)
        n_text = round(n_image_rows * 0.15 / 0.85) if split == "train" else max(1, n_scenes // 2)
        for j in range(n_text):
            mk.text(f"{split}-text-{j:06d}", extra_rng, size)
        atomic_write_text(out / files[split], dumps_rows([sample_to_row(s) for s in mk.rows]))
        counts[split] = len(mk.rows)
        details[split] = {"scenes": n_scenes, **_counts(mk.rows)}
        if split == "train":
            atomic_write_text(out / files["preference_train"], dumps_rows([preference_to_row(p) for p in mk.prefs]))
            counts["preference_train"] = len(mk.prefs)
            # interleaved documents: training images only, so no test scene is ever seen in training
            docs = make_documents(seed, image_paths, split_scenes)
            atomic_write_text(out / files["documents"], dumps_documents([sample_to_document(d) for d in docs]))
            counts["documents"] = len(docs)
    counts["images"] = n_images
    manifest = {
        "generator": "vlmkit.data.worlds.shapes",
        "version": VERSION,
        "params": params,
        "files": files,
        "counts": counts,
        "splits": details,
        "stats": stats,
        "vocabulary": {"shapes": list(SHAPES), "colors": {k: list(v) for k, v in COLORS.items()},
                       "words": list(WORDS), "sizes": list(SIZES), "backgrounds": sorted(BACKGROUNDS)},  # fmt: skip
        "question_types": {k: list(v) for k, v in QUESTION_TYPES.items()},
    }
    atomic_write_json(out / "world.json", manifest)  # written last: it marks the world complete
    return manifest


# ================================================================== texts for the tokenizer


def template_texts() -> Iterator[str]:
    """Every question template filled with every colour/shape/word, plus the answer vocabulary."""
    for c in COLORS:
        yield f"How many {c} objects are there? What shape is the {c} object?"
    for s in SHAPES:
        yield f"What color is the {s}? How many {PLURALS[s]} are there? Which image has more {PLURALS[s]}? {COMPARE_SUFFIX}"
        yield f"How many sides does a {s} have? How many corners does a {s} have? Which shape has {SIDES[s]} sides?"
        for c in COLORS:
            for size_name in SIZES:
                yield f"Give the box of the {c} {s}. {pope_question(c, s)} a {size_name} {c} {s}"
    yield "How many objects are there? What word is written in the image? " + " ".join(WORDS)
    yield "Where is the red circle relative to the blue square? " + " ".join(RELATIONS) + " yes no first second"
    yield " ".join(CAPTION_PROMPTS.values()) + " top left top right bottom left bottom right the word is written at the bottom."
    yield f"What is at {Box(0.125, 0.25, 0.375, 0.5).to_text()}? A. B. C. D. {MCQ_SUFFIX} A B C D"
    yield "What is 3 plus 4? What is 9 minus 5? Scene: Image 1: Image 2: " + " ".join(str(i) for i in range(20))


def world_texts(out_dir: str | Path) -> Iterator[str]:
    """All text of the train split's conversations (prompts, answers, preference answers) and the
    template vocabulary: what the tiny BPE is trained on.

    ``<image>`` placeholders are removed (the tokenizer adds it as a special token). The
    documents (``documents.jsonl``) are left out on purpose: their sentences reuse the captions'
    words, the byte-level BPE encodes the rest, and leaving them out keeps the tokenizer -- and so
    the demo's published figures -- what they were before the world had documents.
    """
    out = Path(out_dir)
    yield from template_texts()
    for name in ("train.json", "preference_train.json"):
        p = out / name
        if not p.exists():
            continue
        for row in json.loads(p.read_text(encoding="utf-8")):
            for msg in row.get("conversations", []):
                yield msg["value"].replace(IMAGE_TOKEN, "")
            for key in ("chosen", "rejected"):
                if key in row:
                    yield row[key]
