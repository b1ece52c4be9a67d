"""The robustness suites on a tiny shapes world: typographic attacks, prompt paraphrases and
option order, each checked with predictors whose answers give hand-derivable numbers."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from vlmkit.data.worlds.shapes import COLORS, PLURALS, SHAPES, WORD_COLOR, generate_world, render_scene
from vlmkit.eval.option_order import evaluate_option_order, mcq_prompt, rotated_samples, split_mcq
from vlmkit.eval.paraphrase import N_TEMPLATES, QUESTION_TYPES, evaluate_paraphrase, parse_question
from vlmkit.eval.suites import SUITES, parse_suites, read_test, run_suites, summary_lines
from vlmkit.eval.tasks import prompt_text
from vlmkit.eval.typographic import _object_box, attack_image, build_samples, evaluate_typographic, typographic_items


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("suites-world")
    generate_world(out, n_train=4, n_test=10, seed=3, size=64)
    return out


@pytest.fixture(scope="module")
def rows(world):
    return read_test(world)


def oracle(batch):
    return [s.meta["answer"] for s in batch]


def pixels(ref) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(ref.data)).convert("RGB"))


def scene_answer(sample) -> str:
    """Answers a colour / shape question from the scene graph (never from meta["answer"])."""
    scene, q = sample.meta["scene"], prompt_text(sample)
    m = re.fullmatch(r"What color is the (\w+)\?", q)
    if m:
        (obj,) = [o for o in scene["objects"] if o["shape"] == m.group(1)]
        return obj["color"]
    m = re.fullmatch(r"What shape is the (\w+) object\?", q)
    (obj,) = [o for o in scene["objects"] if o["color"] == m.group(1)]
    return obj["shape"]


# ------------------------------------------------------------------ typographic


def test_typographic_oracle_is_not_fooled(world, tmp_path):
    table = evaluate_typographic(lambda b: [scene_answer(s) for s in b], world, tmp_path, seed=1)
    assert table["n"] > 10 and set(table["by_kind"]) == {"color", "shape"}
    assert table["accuracy_clean"] == table["accuracy_attacked"] == 1.0
    assert table["drop"] == 0.0 and table["attack_success_rate"] == 0.0 and table["word_rate"] == 0.0
    assert table["n_clean_correct"] == table["n"]
    assert json.loads((tmp_path / "typographic.json").read_text())["n"] == table["n"]
    for run in ("clean", "attacked"):  # item records of both runs, by run_evaluation
        assert len((tmp_path / run / "samples.jsonl").read_text().splitlines()) == table["n"]
    assert len(list((tmp_path / "images").glob("*.png"))) > table["n"]  # clean scenes + one attacked per item


def test_a_predictor_that_reads_the_written_word_is_always_fooled(world, tmp_path):
    def reader(batch):  # the word when the image is not the plain scene, else the truth
        out = []
        for s in batch:
            plain = np.array_equal(pixels(s.images[0]), np.asarray(render_scene(s.meta["scene"])))
            out.append(scene_answer(s) if plain else s.meta["typographic"]["word"])
        return out

    table = evaluate_typographic(reader, world, tmp_path)
    assert table["accuracy_clean"] == 1.0 and table["accuracy_attacked"] == 0.0 and table["drop"] == 1.0
    assert table["attack_success_rate"] == 1.0 and table["word_rate"] == 1.0 and table["clean_word_rate"] == 0.0
    assert all(k["attack_success_rate"] == 1.0 for k in table["by_kind"].values())
    assert all(it["attacked"] == it["word"] != it["answer"] == it["clean"] for it in table["items"])


def test_half_fooled_predictor_gives_the_hand_computed_rate(world, tmp_path):
    """Wrong clean on shape items; fooled on colour items only: ASR counts the clean-right ones."""
    def half(batch):
        out = []
        for s in batch:
            t = s.meta["typographic"]
            if t["kind"] == "shape":
                out.append("zzz" if not t["attacked"] else t["word"])
            else:
                out.append(t["word"] if t["attacked"] else scene_answer(s))
        return out

    table = evaluate_typographic(half, world, tmp_path)
    n_color = table["by_kind"]["color"]["n"]
    assert table["accuracy_clean"] == pytest.approx(n_color / table["n"])
    assert table["accuracy_attacked"] == 0.0 and table["n_clean_correct"] == n_color
    assert table["attack_success_rate"] == 1.0  # every clean-right (colour) item was fooled
    assert table["word_rate"] == 1.0 and table["by_kind"]["shape"]["attack_success_rate"] == 0.0


def test_attacked_image_carries_a_wrong_word_beside_the_object(rows, tmp_path):
    items = typographic_items(rows, seed=0)
    clean, attacked = build_samples(items, tmp_path)
    assert [s.id for s in clean] == [s.id for s in attacked] == [it["id"] for it in items]
    for it, c, a in zip(items, clean, attacked):
        scene = it["scene"]
        assert it["word"] != it["answer"]
        pool = COLORS if it["kind"] == "color" else SHAPES
        assert it["word"] in pool
        if any(v not in {o[it["kind"]] for o in scene["objects"]} for v in pool):
            assert it["word"] not in {o[it["kind"]] for o in scene["objects"]}  # absent from the scene
        pc, pa = pixels(c.images[0]), pixels(a.images[0])
        assert np.array_equal(pc, np.asarray(render_scene(scene)))  # clean = the world's rendering
        changed = np.any(pc != pa, axis=-1)
        x0, y0, x1, y1 = a.meta["typographic"]["text_box"]
        inside = np.zeros_like(changed)
        inside[y0:y1, x0:x1] = True
        assert changed.sum() > 20 and not (changed & ~inside).any()  # only the text's box changed
        assert (pa[changed] == WORD_COLOR).all(axis=-1).sum() >= 5  # in the word's colour
        ox0, oy0, ox1, oy1 = _object_box(scene["objects"][it["object"]], scene["size"])
        assert not changed[oy0:oy1, ox0:ox1].any()  # the asked object stays fully visible
        assert (tmp_path / a.meta["typographic"]["image_file"]).read_bytes() == a.images[0].data
        other = next(w for w in pool if w not in (it["word"], it["answer"]))
        assert not np.array_equal(np.asarray(attack_image(scene, it["object"], other)[0]), pa)  # the word is drawn
    over, _ = attack_image(items[0]["scene"], items[0]["object"], items[0]["word"], placement="over")
    ox0, oy0, ox1, oy1 = _object_box(items[0]["scene"]["objects"][items[0]["object"]], 64)
    clean0 = np.asarray(render_scene(items[0]["scene"]))
    assert (np.asarray(over)[oy0:oy1, ox0:ox1] != clean0[oy0:oy1, ox0:ox1]).any()  # "over" covers the object


def test_misleading_words_follow_the_seed(rows):
    a, b = typographic_items(rows, seed=0), typographic_items(rows, seed=0)
    assert [i["word"] for i in a] == [i["word"] for i in b]
    others = [typographic_items(rows, seed=s) for s in (1, 2, 3)]
    assert any([i["word"] for i in o] != [i["word"] for i in a] for o in others)
    assert len(typographic_items(rows, limit=3)) == 3
    assert {i["kind"] for i in typographic_items(rows, kinds=("shape",))} == {"shape"}


# ------------------------------------------------------------------ paraphrase


def test_paraphrase_oracle_is_consistent(world, tmp_path):
    table = evaluate_paraphrase(oracle, world, tmp_path)
    assert table["n_templates"] == N_TEMPLATES >= 4
    assert [b["accuracy"] for b in table["by_template"]] == [1.0] * N_TEMPLATES
    assert table["spread"] == 0.0 and table["consistency"] == 1.0 and table["consistent_and_correct"] == 1.0
    assert table["unparsed"] == {} and {"color", "shape", "count_total", "exists"} <= set(table["by_type"])
    assert (tmp_path / "paraphrase.json").exists()
    assert (tmp_path / f"template-{N_TEMPLATES - 1}" / "results.json").exists()


def test_a_predictor_right_only_on_the_original_phrasing(world, rows, tmp_path):
    original = {s.id: prompt_text(s) for s in rows}
    seen: dict[str, set] = {}

    def literal(batch):  # right only when asked exactly as the world asks
        out = []
        for s in batch:
            seen.setdefault(s.id, set()).add(prompt_text(s))
            if prompt_text(s) == original[s.id]:
                out.append(s.meta["answer"])
            else:
                out.append({"yes": "no", "no": "yes"}.get(s.meta["answer"], "zzz"))
        return out

    table = evaluate_paraphrase(literal, world, tmp_path)
    assert [b["accuracy"] for b in table["by_template"]] == [1.0] + [0.0] * (N_TEMPLATES - 1)
    assert table["accuracy_max"] == 1.0 and table["accuracy_min"] == 0.0 and table["spread"] == 1.0
    assert table["consistency"] == 0.0 and table["consistent_and_correct"] == 0.0
    assert all(v["spread"] == 1.0 and v["consistency"] == 0.0 for v in table["by_type"].values())
    assert all(len(p) == N_TEMPLATES for p in seen.values())  # every phrasing differs
    n_vqa_pope = sum(1 for s in rows if s.meta["task"] in ("vqa", "pope"))
    assert table["n_questions"] == len(seen) == n_vqa_pope


def test_a_constant_answer_is_consistent_except_where_it_cannot_be_extracted(world, rows, tmp_path):
    """"no" / "red" everywhere: the same answer under every phrasing, but "red" is no number, so
    count questions (failed extraction) are never consistent."""
    table = evaluate_paraphrase(lambda b: ["no" if s.meta["task"] == "pope" else "red" for s in b], world, tmp_path)
    asked = [s for s in rows if s.meta["task"] in ("vqa", "pope")]
    counts = sum(1 for s in asked if s.meta["question_type"].startswith("count"))
    assert table["consistency"] == pytest.approx(1 - counts / len(asked))
    assert table["spread"] == 0.0 and table["by_type"]["count_total"]["consistency"] == 0.0
    assert table["by_type"]["exists"]["consistency"] == 1.0
    assert table["by_type"]["exists"]["accuracy"] == [0.5] * N_TEMPLATES  # the world's POPE is balanced


def test_paraphrase_parsing_and_limit(world, tmp_path):
    assert parse_question("color", "What color is the circle?") == {"shape": "circle"}
    assert parse_question("exists", "Is there an orange cross in the image?") == {"art": "an", "color": "orange",
                                                                                  "shape": "cross"}
    assert parse_question("color", "Which colour is the circle?") is None
    assert all(parse_question("count_shape", f"How many {PLURALS[s]} are there?") for s in SHAPES)
    table = evaluate_paraphrase(oracle, world, tmp_path, limit=1, question_types=("color", "exists"))
    assert table["n_questions"] == 2 and set(table["by_type"]) == {"color", "exists"}
    with pytest.raises(ValueError, match="no paraphrases"):
        evaluate_paraphrase(oracle, world, tmp_path, question_types=("caption_short",))
    assert set(QUESTION_TYPES) >= {"color", "shape", "count_total", "count_color", "count_shape", "exists"}


# ------------------------------------------------------------------ option order


def mcq_rows(rows):
    return [s for s in rows if s.meta["task"] == "mcq"]


def test_option_order_oracle_and_always_a(world, rows, tmp_path):
    table = evaluate_option_order(oracle, world, tmp_path / "oracle")
    assert table["single_pass_accuracy"] == table["circular_accuracy"] == 1.0 and table["drop"] == 0.0
    n = len(mcq_rows(rows))
    assert table["n_questions"] == n and table["n_rotations"] == 4 * n and table["skipped"] == 0

    a = evaluate_option_order(lambda b: ["A"] * len(b), world, tmp_path / "a")
    share_a = sum(s.meta["answer"] == "A" for s in mcq_rows(rows)) / n
    assert 0 < share_a < 1
    assert a["single_pass_accuracy"] == pytest.approx(share_a) and a["circular_accuracy"] == 0.0
    assert a["drop"] == pytest.approx(share_a)
    assert a["single_pass"]["pred_letter_ratio"] == {"A": 1.0}
    assert a["single_pass"]["target_letter_ratio"]["A"] == pytest.approx(share_a)
    assert a["all_rotations"]["target_letter_ratio"] == {k: 0.25 for k in "ABCD"}  # rotations balance the letters
    assert a["all_rotations"]["accuracy"] == 0.25 and a["single_pass"]["by_letter"]["A"] == 1.0
    assert json.loads((tmp_path / "a" / "option_order.json").read_text())["circular_accuracy"] == 0.0


def test_a_predictor_that_remembers_the_letter_is_right_only_unrotated(world, rows, tmp_path):
    letter = {s.id: s.meta["answer"] for s in mcq_rows(rows)}
    table = evaluate_option_order(lambda b: [letter[s.meta["circular"]["question_id"]] for s in b], world, tmp_path)
    assert table["by_rotation"] == [1.0, 0.0, 0.0, 0.0]
    assert table["single_pass_accuracy"] == 1.0 and table["circular_accuracy"] == 0.0 and table["drop"] == 1.0


def test_rotated_prompts_are_written_like_the_world(rows):
    rotations, skipped = rotated_samples(rows)
    assert skipped == 0
    first = mcq_rows(rows)[0]
    question, options = split_mcq(first)
    four = [s for s in rotations if s.meta["circular"]["question_id"] == first.id]
    assert [s.id for s in four] == [f"{first.id}@{i}" for i in range(4)]
    assert prompt_text(four[0]) == prompt_text(first) == mcq_prompt(question, options)
    assert four[0].turns[0].parts[0].is_image and four[0].images == first.images
    p = "ABCD".index(first.meta["answer"])
    for i, s in enumerate(four):
        assert s.meta["options"] == options[i:] + options[:i]
        assert s.meta["answer"] == "ABCD"[(p - i) % 4]
        assert s.meta["options"]["ABCD".index(s.meta["answer"])] == options[p]  # the same right text
        assert f"\n{s.meta['answer']}. {options[p]}\n" in prompt_text(s)
    assert len(rotated_samples(rows, limit=2)[0]) == 8


# ------------------------------------------------------------------ several suites


def test_run_suites_writes_every_table(world, tmp_path):
    result = run_suites(oracle, world, tmp_path, suites="all", limit=2)
    assert set(result["suites"]) == set(SUITES) == set(result["summary"])
    on_disk = json.loads((tmp_path / "suites.json").read_text())
    assert on_disk["summary"]["option_order"]["circular_accuracy"] == 1.0
    assert on_disk["summary"]["typographic"]["attack_success_rate"] == 0.0
    assert on_disk["summary"]["paraphrase"]["consistency"] == 1.0
    for name in SUITES:
        assert (tmp_path / name / f"{name}.json").exists()
    assert parse_suites("paraphrase, option_order") == ("paraphrase", "option_order")
    with pytest.raises(ValueError, match="unknown robustness suite"):
        parse_suites("typographic,fog")
    with pytest.raises(ValueError, match="placement"):
        run_suites(oracle, world, tmp_path / "bad", placement="under")
    lines = summary_lines(result)
    assert len(lines) == 3 and lines[0].startswith("typographic") and "attack_success_rate 0.000" in lines[0]


def test_run_suites_loads_a_checkpoint(world, tmp_path):
    from _model_helpers import make_model
    from vlmkit.data.tokenizer import DEFAULT_CHAT_TEMPLATE
    from vlmkit.models.checkpoint_io import save_checkpoint

    model, tok = make_model()
    tok.chat_template = DEFAULT_CHAT_TEMPLATE
    ckpt = save_checkpoint(model, tok, tmp_path / "ckpt")
    from vlmkit.cli import main

    # through the command line: vlmkit eval CKPT --data WORLD --suite ...
    assert main(["eval", str(ckpt), "--data", str(world), "--out", str(tmp_path / "out"), "--suite",
                 "typographic,option_order", "--limit", "1"]) == 0  # fmt: skip
    result = json.loads((tmp_path / "out" / "suites.json").read_text())
    assert set(result["suites"]) == {"typographic", "option_order"}
    assert result["model"]["checkpoint"] == str(ckpt) and "parameters" in result["model"]
    assert result["suites"]["typographic"]["n"] == 1 and result["suites"]["option_order"]["n_rotations"] == 4
    assert 0.0 <= result["summary"]["option_order"]["circular_accuracy"] <= 1.0
