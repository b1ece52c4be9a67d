"""The shapes world: determinism, caching, scene invariants, rendering, and every answer re-derived
from the scene graph by code written here (not the generator's)."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from vlmkit.data.formats.llava import read_llava, read_preferences
from vlmkit.data.sample import Box
from vlmkit.data.worlds import shapes
from vlmkit.data.worlds.shapes import COLORS, SHAPES, generate_world, world_texts

N_TRAIN, N_TEST = 24, 10


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    generate_world(out, n_train=N_TRAIN, n_test=N_TEST, seed=0, size=64)
    return out


def rows_of(world: Path, split: str) -> list[dict]:
    return json.loads((world / f"{split}.json").read_text())


def all_rows(world: Path) -> list[dict]:
    return rows_of(world, "train") + rows_of(world, "test")


def scenes_by_image(world: Path) -> dict[str, dict]:
    out = {}
    for r in all_rows(world):
        if "image" in r:
            out[r["image"]] = r["meta"]["scene"]
    return out


def user_text(row: dict, k: int = 0) -> str:
    return [c["value"] for c in row["conversations"] if c["from"] == "human"][k].replace("<image>\n", "")


def plural_to_shape(word: str) -> str:
    for s in SHAPES:
        if word in (s + "s", s + "es"):
            return s
    raise AssertionError(f"unknown plural {word}")


def center(o):
    b = o["box"]
    return (b[0] + b[2]) / 2, (b[1] + b[3]) / 2


def derive_vqa_answer(question: str, scene: dict) -> str:
    """Answer a VQA question from the scene graph, independently of the generator."""
    objs = scene["objects"]
    if m := re.fullmatch(r"What color is the (\w+)\?", question):
        match = [o for o in objs if o["shape"] == m[1]]
        assert len(match) == 1, "color question about a shape that is not unique"
        return match[0]["color"]
    if m := re.fullmatch(r"What shape is the (\w+) object\?", question):
        match = [o for o in objs if o["color"] == m[1]]
        assert len(match) == 1, "shape question about a colour that is not unique"
        return match[0]["shape"]
    if question == "How many objects are there?":
        return str(len(objs))
    if m := re.fullmatch(r"How many (\w+) objects are there\?", question):
        assert m[1] in COLORS
        return str(sum(o["color"] == m[1] for o in objs))
    if m := re.fullmatch(r"How many (\w+) are there\?", question):
        s = plural_to_shape(m[1])
        return str(sum(o["shape"] == s for o in objs))
    if m := re.fullmatch(r"Where is the (\w+) (\w+) relative to the (\w+) (\w+)\?", question):
        a = [o for o in objs if (o["color"], o["shape"]) == (m[1], m[2])]
        b = [o for o in objs if (o["color"], o["shape"]) == (m[3], m[4])]
        assert len(a) == 1 and len(b) == 1, "spatial referents must be unique"
        (ax, ay), (bx, by) = center(a[0]), center(b[0])
        dx, dy = ax - bx, ay - by
        if abs(dx) > abs(dy):
            assert abs(dx) >= 1.9 * abs(dy), "relation is ambiguous"
            return "left" if dx < 0 else "right"
        assert abs(dy) >= 1.9 * abs(dx), "relation is ambiguous"
        return "above" if dy < 0 else "below"
    if question == "What word is written in the image?":
        assert scene["word"]
        return scene["word"]
    raise AssertionError(f"unrecognised question {question!r}")


# ------------------------------------------------------------------ determinism and caching


def test_same_arguments_give_byte_identical_files(world, tmp_path):
    other = tmp_path / "again"
    generate_world(other, n_train=N_TRAIN, n_test=N_TEST, seed=0, size=64)
    files = sorted(p.relative_to(world) for p in world.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(other) for p in other.rglob("*") if p.is_file())
    assert any(str(f).endswith(".png") for f in files)
    for f in files:
        assert (world / f).read_bytes() == (other / f).read_bytes(), f


def test_different_seed_gives_different_scenes(world, tmp_path):
    other = tmp_path / "seed1"
    generate_world(other, n_train=N_TRAIN, n_test=N_TEST, seed=1, size=64)
    a, b = scenes_by_image(world), scenes_by_image(other)
    same = sum(a[k] == b[k] for k in a)
    assert same <= 1
    assert (world / "images/train_000000.png").read_bytes() != (other / "images/train_000000.png").read_bytes()


def test_test_split_uses_a_different_stream(world):
    scenes = scenes_by_image(world)
    train = [json.dumps(scenes[f"images/train_{i:06d}.png"]) for i in range(N_TRAIN)]
    test = [json.dumps(scenes[f"images/test_{i:06d}.png"]) for i in range(N_TEST)]
    assert train[:N_TEST] != test
    assert not set(test) & set(train)


def test_cache_reuses_and_parameters_invalidate(world, tmp_path, monkeypatch):
    out = tmp_path / "cached"
    m1 = generate_world(out, n_train=4, n_test=2, seed=3)

    def boom(scene):
        raise AssertionError("regenerated although cached")

    monkeypatch.setattr(shapes, "render_scene", boom)
    assert generate_world(out, n_train=4, n_test=2, seed=3) == m1
    with pytest.raises(AssertionError, match="regenerated"):
        generate_world(out, n_train=5, n_test=2, seed=3)
    monkeypatch.undo()
    m2 = generate_world(out, n_train=5, n_test=2, seed=3)
    assert m2["params"]["n_train"] == 5
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"test_{i:06d}.png" for i in range(2)] + [
        f"train_{i:06d}.png" for i in range(5)
    ]


def test_manifest_counts_match_files(world):
    m = json.loads((world / "world.json").read_text())
    assert m["version"] == shapes.VERSION
    assert m["params"] == {"n_train": N_TRAIN, "n_test": N_TEST, "seed": 0, "size": 64, "grid": 4}
    for split in ("train", "test"):
        rows = rows_of(world, split)
        assert m["counts"][split] == len(rows)
        assert m["splits"][split]["tasks"] == dict(Counter(r["meta"]["task"] for r in rows))
    assert m["counts"]["preference_train"] == len(json.loads((world / "preference_train.json").read_text()))
    assert m["counts"]["images"] == N_TRAIN + N_TEST == len(list((world / "images").glob("*.png")))


# ------------------------------------------------------------------ scenes and pixels


def test_scene_invariants(world):
    for image, sc in scenes_by_image(world).items():
        objs = sc["objects"]
        assert 1 <= len(objs) <= 6
        assert sc["background"] in shapes.BACKGROUNDS
        assert shapes.BACKGROUNDS[sc["background"]] not in COLORS.values()
        cells = [tuple(o["cell"]) for o in objs]
        assert len(set(cells)) == len(cells)
        assert cells == sorted(cells), "objects are listed in reading order"
        for o in objs:
            assert o["shape"] in SHAPES and o["color"] in COLORS and o["size"] in ("small", "large")
            x0, y0, x1, y1 = o["box"]
            assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
            r, c = o["cell"]
            assert c / 4 <= x0 and x1 <= (c + 1) / 4 and r / 4 <= y0 and y1 <= (r + 1) / 4
            if sc["word"]:
                assert r < 3, "the bottom band is kept for the word"
        for i, a in enumerate(objs):
            for b in objs[i + 1 :]:
                assert Box(*a["box"]).iou(Box(*b["box"])) == 0
                ix = min(a["box"][2], b["box"][2]) - max(a["box"][0], b["box"][0])
                iy = min(a["box"][3], b["box"][3]) - max(a["box"][1], b["box"][1])
                assert ix <= 0 or iy <= 0
        small = [o for o in objs if o["size"] == "small"]
        large = [o for o in objs if o["size"] == "large"]
        if small and large:
            assert max(o["box"][2] - o["box"][0] for o in small) < min(o["box"][2] - o["box"][0] for o in large)
    assert any(sc["word"] for sc in scenes_by_image(world).values())


def test_rendered_pixels_match_scene_graph(world):
    for image, sc in scenes_by_image(world).items():
        im = Image.open(world / image)
        assert im.size == (64, 64) and im.mode == "RGB"
        px = im.load()
        bg = tuple(shapes.BACKGROUNDS[sc["background"]])
        assert px[0, 0] == bg or any(o["cell"] == [0, 0] for o in sc["objects"])
        for o in sc["objects"]:
            x0, y0, x1, y1 = (round(v * 64) for v in o["box"])
            assert px[(x0 + x1) // 2, (y0 + y1) // 2] == tuple(COLORS[o["color"]]), (image, o)
            # the object's pixels inside its cell span exactly its box
            r, c = o["cell"]
            xs, ys = [], []
            for y in range(r * 16, r * 16 + 16):
                for x in range(c * 16, c * 16 + 16):
                    if px[x, y] == tuple(COLORS[o["color"]]):
                        xs.append(x)
                        ys.append(y)
            assert (min(xs), min(ys), max(xs) + 1, max(ys) + 1) == (x0, y0, x1, y1)
        if sc["word"]:
            band = [px[x, y] for y in range(48, 64) for x in range(64)]
            assert sum(p[0] > 200 and p[1] > 200 and p[2] > 200 for p in band) > 20, "word pixels are drawn"
        else:
            empty_cells = {(r, c) for r in range(4) for c in range(4)} - {tuple(o["cell"]) for o in sc["objects"]}
            for r, c in empty_cells:
                assert all(px[x, y] == bg for y in range(r * 16, r * 16 + 16) for x in range(c * 16, c * 16 + 16))


# ------------------------------------------------------------------ rows


def test_rows_are_readable_and_well_formed(world):
    for split in ("train", "test"):
        samples = read_llava(world / f"{split}.json")
        assert len(samples) == len(rows_of(world, split))
        ids = [s.id for s in samples]
        assert len(set(ids)) == len(ids)
        for s in samples:
            s.validate()
            assert {"task", "question_type", "answer", "scene"} <= set(s.meta)
            assert s.meta["question_type"] in shapes.QUESTION_TYPES[s.meta["task"]]
            assert s.target_text() == s.meta["answer"]
            if s.meta["task"] != "mcq":
                assert s.meta["answer"] == s.meta["answer"].lower()
            for ref in s.images:
                assert (world / ref.path).is_file()
            if s.meta["task"] == "text":
                assert not s.images
            elif s.meta["task"] == "compare":
                assert len(s.images) == 2
            else:
                assert len(s.images) == 1


def test_vqa_answers_rederived_from_scene(world):
    seen = Counter()
    for r in all_rows(world):
        meta = r["meta"]
        if meta["task"] == "vqa":
            assert meta["question_type"] in shapes.IMAGE_DEPENDENT_TYPES
            assert derive_vqa_answer(user_text(r), meta["scene"]) == meta["answer"]
            seen[meta["question_type"]] += 1
        elif meta["task"] == "dialogue":
            users = [c["value"].replace("<image>\n", "") for c in r["conversations"] if c["from"] == "human"]
            answers = [c["value"] for c in r["conversations"] if c["from"] == "gpt"]
            assert 2 <= len(users) == len(answers) <= 3
            assert [c["from"] for c in r["conversations"]] == ["human", "gpt"] * len(users)
            assert r["conversations"][0]["value"].startswith("<image>\n")
            for q, a in zip(users, answers):
                assert derive_vqa_answer(q, meta["scene"]) == a
    assert set(seen) == set(shapes.IMAGE_DEPENDENT_TYPES), seen


def test_binding_drills(world):
    """One drill per training scene (none in the test split): every colour question about a
    unique shape and every shape question about a unique colour, each answered from the scene."""
    per_image = Counter()
    for split in ("train", "test"):
        for r in rows_of(world, split):
            meta = r["meta"]
            if meta["task"] != "vqa_drill":
                continue
            assert split == "train"
            per_image[r["image"]] += 1
            scene = meta["scene"]
            users = [c["value"].replace("<image>\n", "") for c in r["conversations"] if c["from"] == "human"]
            answers = [c["value"] for c in r["conversations"] if c["from"] == "gpt"]
            assert len(users) == len(answers) == len(meta["question_types"]) and set(meta["question_types"]) <= {"color", "shape"}
            assert r["conversations"][0]["value"].startswith("<image>\n")
            assert sum(c["value"].count("<image>") for c in r["conversations"]) == 1
            shapes_ = Counter(o["shape"] for o in scene["objects"])
            colors_ = Counter(o["color"] for o in scene["objects"])
            expected = {f"What color is the {s}?" for s, n in shapes_.items() if n == 1}
            expected |= {f"What shape is the {c} object?" for c, n in colors_.items() if n == 1}
            assert set(users) == expected if len(expected) <= 8 else (len(users) == 8 and set(users) < expected)
            for q, a in zip(users, answers):
                assert derive_vqa_answer(q, scene) == a, (q, a)
    def has_unique(sc, key):
        return 1 in Counter(o[key] for o in sc["objects"]).values()

    allowing = [sc for img, sc in scenes_by_image(world).items() if img.startswith("images/train_")
                and (has_unique(sc, "shape") or has_unique(sc, "color"))]
    assert set(per_image.values()) == {1} and len(per_image) == len(allowing) > N_TRAIN // 2


def test_scenes_do_not_depend_on_the_version(world, tmp_path, monkeypatch):
    """VERSION invalidates caches; the scenes stay those of SCENE_STREAM so figures stay comparable."""
    monkeypatch.setattr(shapes, "VERSION", shapes.VERSION + 100)
    other = tmp_path / "bumped"
    generate_world(other, n_train=N_TRAIN, n_test=N_TEST, seed=0, size=64)
    assert scenes_by_image(other) == scenes_by_image(world)
    assert json.loads((other / "world.json").read_text())["version"] == shapes.VERSION


def test_test_split_spreads_vqa_types_evenly(world):
    rows = [r for r in rows_of(world, "test") if r["meta"]["task"] == "vqa"]
    per_scene = Counter(r["image"] for r in rows)
    assert set(per_scene.values()) <= {1, 2, 3, 4} and max(per_scene.values()) == 4
    counts = Counter(r["meta"]["question_type"] for r in rows if r["meta"]["question_type"] != "reading")
    assert max(counts.values()) - min(counts.values()) <= 2, counts


def test_pope_negatives_absent_and_splits_as_defined(world):
    train_scenes = [r["meta"]["scene"] for r in rows_of(world, "train") if r["meta"]["task"] == "caption"]
    assert len(train_scenes) == N_TRAIN
    freq = Counter(s for sc in train_scenes for s in {o["shape"] for o in sc["objects"]})
    cooc = Counter()
    for sc in train_scenes:
        present = {o["shape"] for o in sc["objects"]}
        cooc.update((a, b) for a in present for b in present if a != b)
    stats = json.loads((world / "world.json").read_text())["stats"]
    assert stats["shape_frequency"] == {s: freq[s] for s in SHAPES}

    n_checked = Counter()
    for r in all_rows(world):
        meta = r["meta"]
        if meta["task"] != "pope":
            continue
        m = re.fullmatch(r"Is there an? (\w+) (\w+) in the image\?", user_text(r))
        assert m and meta["answer"] in ("yes", "no") and meta["pope_split"] in ("random", "popular", "adversarial")
        objs = meta["scene"]["objects"]
        present = any((o["color"], o["shape"]) == (m[1], m[2]) for o in objs)
        assert present == (meta["answer"] == "yes")
        if meta["answer"] == "no":
            shapes_here = {o["shape"] for o in objs}
            absent = [s for s in SHAPES if s not in shapes_here]
            if not absent:
                continue
            assert m[2] in absent
            split = meta["pope_split"]
            if split == "popular":
                assert freq[m[2]] == max(freq[s] for s in absent)
            elif split == "adversarial":
                score = {s: sum(cooc[(p, s)] for p in shapes_here) for s in absent}
                assert score[m[2]] == max(score.values())
                assert m[1] in {o["color"] for o in objs}
            n_checked[split] += 1
    assert all(n_checked[s] > 0 for s in ("random", "popular", "adversarial"))

    test_pope = [r["meta"] for r in rows_of(world, "test") if r["meta"]["task"] == "pope"]
    assert Counter(m["answer"] for m in test_pope) == {"yes": 3 * N_TEST, "no": 3 * N_TEST}
    assert Counter((m["pope_split"], m["answer"]) for m in test_pope) == {
        (s, a): N_TEST for s in ("random", "popular", "adversarial") for a in ("yes", "no")
    }


def test_grounding_and_mcq(world):
    n = Counter()
    for r in all_rows(world):
        meta, q = r["meta"], user_text(r)
        objs = meta["scene"]["objects"] if meta["scene"] else []
        if meta["question_type"] == "ground_ref":
            m = re.fullmatch(r"Give the box of the (\w+) (\w+)\.", q)
            match = [o for o in objs if (o["color"], o["shape"]) == (m[1], m[2])]
            assert len(match) == 1, "referent must be unique"
            assert meta["box"] == match[0]["box"]
            parsed = Box.parse(meta["answer"])
            assert all(abs(a - b) <= 6e-4 for a, b in zip(parsed.as_list(), match[0]["box"]))
            n["ref"] += 1
        elif meta["question_type"] == "ground_box":
            box = Box.parse(q)
            match = [o for o in objs if all(abs(a - b) <= 6e-4 for a, b in zip(box.as_list(), o["box"]))]
            assert len(match) == 1
            o = match[0]
            assert meta["answer"] == f"a {o['size']} {o['color']} {o['shape']}"
            n["box"] += 1
        elif meta["task"] == "mcq":
            lines = q.split("\n")
            assert len(lines) == 6 and lines[-1] == "Answer with the letter."
            options = [re.fullmatch(r"([ABCD])\. (\w+)", ln)[2] for ln in lines[1:5]]
            assert len(set(options)) == 4
            correct = derive_vqa_answer(lines[0], meta["scene"])
            assert meta["answer"] in "ABCD" and len(meta["answer"]) == 1
            assert options["ABCD".index(meta["answer"])] == correct
            n["mcq"] += 1
    assert n["ref"] >= N_TEST and n["box"] >= N_TEST and n["mcq"] >= N_TEST


def test_captions_compare_text_and_preferences(world):
    n = Counter()
    for r in all_rows(world):
        meta = r["meta"]
        if meta["task"] == "caption":
            sc = meta["scene"]
            names = re.findall(r"\ban? (?:(?:small|large) )?(\w+) (\w+)", meta["answer"])
            assert names == [(o["color"], o["shape"]) for o in sc["objects"]]
            if meta["question_type"] == "caption_detailed":
                positions = re.findall(r" at (top|bottom) (left|right)", meta["answer"])
                for (v, h), o in zip(positions, sc["objects"]):
                    assert (v == "top") == (o["cell"][0] < 2) and (h == "left") == (o["cell"][1] < 2)
                assert (sc["word"] or "") in meta["answer"]
            n["caption"] += 1
        elif meta["task"] == "compare":
            q = r["conversations"][0]["value"]
            assert q.startswith("Image 1: <image>\nImage 2: <image>\n")
            shape = plural_to_shape(re.search(r"Which image has more (\w+)\?", q)[1])
            c1, c2 = (sum(o["shape"] == shape for o in sc["objects"]) for sc in meta["scenes"])
            assert c1 != c2 and meta["answer"] == ("first" if c1 > c2 else "second")
            n["compare"] += 1
        elif meta["question_type"] == "text_arith":
            m = re.fullmatch(r"What is (\d) (plus|minus) (\d)\?", user_text(r))
            a, b = int(m[1]), int(m[3])
            assert meta["answer"] == str(a + b if m[2] == "plus" else a - b)
            n["arith"] += 1
        elif meta["question_type"] == "text_scene":
            text = user_text(r)
            desc, question = text.split("\n")
            assert desc.startswith("Scene: ")
            for o in meta["scene"]["objects"]:
                assert f"{o['size']} {o['color']} {o['shape']}" in desc
            assert derive_vqa_answer(question, meta["scene"]) == meta["answer"]
            n["scene"] += 1
        elif meta["question_type"] == "text_knowledge":
            sides = {"circle": 0, "square": 4, "triangle": 3, "diamond": 4, "hexagon": 6, "cross": 12}
            q = user_text(r)
            if m := re.fullmatch(r"How many (sides|corners) does a (\w+) have\?", q):
                assert meta["answer"] == str(sides[m[2]])
            else:
                m = re.fullmatch(r"Which shape has (\d+) sides\?", q)
                assert [s for s, k in sides.items() if k == int(m[1])] == [meta["answer"]]
            n["knowledge"] += 1
    assert n["caption"] == N_TRAIN + N_TEST and n["compare"] >= 2 and n["scene"] > 0

    train = rows_of(world, "train")
    n_text = sum(r["meta"]["task"] == "text" for r in train)
    assert 0.10 <= n_text / len(train) <= 0.20

    prefs = read_preferences(world / "preference_train.json")
    assert prefs
    for p in prefs:
        q = p.prompt[0].text.lstrip("\n")
        assert derive_vqa_answer(q, p.meta["scene"]) == p.chosen
        assert p.rejected != p.chosen and p.rejected
        assert len(p.images) == 1


def test_world_texts_cover_train_text_and_templates(world):
    texts = list(world_texts(world))
    joined = "\n".join(texts)
    assert "<image>" not in joined
    for r in rows_of(world, "train")[:50]:
        assert r["meta"]["answer"] in joined
    for word in list(SHAPES) + list(COLORS) + list(shapes.WORDS) + ["crosses", "relative", "letter"]:
        assert word in joined


def test_cli_generates_a_small_world(tmp_path):
    from vlmkit.cli import main

    assert main(["data", "shapes", "--out", str(tmp_path / "w"), "--train", "5", "--test", "3"]) == 0
    m = json.loads((tmp_path / "w" / "world.json").read_text())
    assert m["params"]["n_train"] == 5 and m["counts"]["images"] == 8
