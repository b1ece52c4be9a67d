"""Readers for benchmark files: VLMEvalKit TSV and POPE question files."""

from __future__ import annotations

import base64
import csv
import io
import json
import random

import pytest
from PIL import Image

from vlmkit.data.bad_samples import BadSampleError, BadSampleLog
from vlmkit.data.images import load_image
from vlmkit.eval.formats import (
    PROMPT_TEMPLATES,
    build_prompt,
    iter_pope,
    iter_vlmevalkit,
    pope_split_of,
    read_pope,
    read_vlmevalkit,
)

MCQ_INSTRUCTION = "Answer with the option's letter from the given choices directly."


def png(size: tuple[int, int], color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def size_of(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as im:
        return im.size


def write_tsv(path, header, rows):
    # as pandas' to_csv(sep="\t") writes it: minimal quoting with '"'
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)
    return path


HEADER = ["index", "image", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "split"]


@pytest.fixture
def mcq_tsv(tmp_path):
    img0, img1, img2, img3 = png((40, 30)), png((17, 23), (0, 90, 0)), png((8, 9)), png((64, 5))
    rows = [
        # plain row with a hint; D absent
        ["0", b64(img0), "What colour is the square?", "Look closely.", "red", "green", "blue", "", "A", "colour", "perception", "dev"],
        # reuses row 0's image by index; no hint; C absent between B and D (gap), 'nan' hint
        ["1", "0", "Which shape?", "nan", "circle", "square", "", "triangle", "b", "shape", "perception", "dev"],
        # multi-image row, JSON list; question with a quoted multi-line text
        ["2", json.dumps([b64(img1), b64(img2)]), 'Which image is "larger"?\nPick one.', "", "first", "second", "", "", "A", "compare", "reasoning", "dev"],
        # multi-image row, Python-literal list
        ["3", repr([b64(img3), b64(img1)]), "Same?", "", "yes", "no", "", "", "B", "compare", "reasoning", "test"],
        # malformed base64 (a '*' is outside the alphabet)
        ["4", b64(img0)[:-8] + "***=" + b64(img0)[-4:], "Broken?", "", "x", "y", "", "", "A", "c", "l2", "dev"],
        # reference to an index no row has
        ["5", "99", "Where is my image?", "", "x", "y", "", "", "A", "c", "l2", "dev"],
        # a forward reference (to row 7) is fine
        ["6", "7", "Forward?", "", "p", "q", "", "", "B", "c", "l2", "dev"],
        ["7", b64(img2), "Target of a forward reference", "", "p", "q", "", "", "A", "c", "l2", "dev"],
    ]
    path = write_tsv(tmp_path / "MMBench_DEV_EN.tsv", HEADER, rows)
    return path, {"img0": img0, "img1": img1, "img2": img2, "img3": img3}


def test_mcq_rows_become_samples(mcq_tsv):
    path, imgs = mcq_tsv
    log = BadSampleLog()
    samples = read_vlmevalkit(path, bad_log=log)
    by_id = {s.id: s for s in samples}
    assert sorted(by_id) == ["0", "1", "2", "3", "6", "7"]
    s0 = by_id["0"]
    assert s0.meta["task"] == "mcq"
    assert s0.meta["options"] == {"A": "red", "B": "green", "C": "blue"}
    assert s0.meta["answer"] == "A"
    assert s0.meta["index"] == 0
    assert (s0.meta["category"], s0.meta["l2-category"], s0.meta["split"]) == ("colour", "perception", "dev")
    assert s0.meta["prompt_template"] == PROMPT_TEMPLATES["mcq"]
    [turn] = s0.turns
    assert turn.role == "user" and turn.image_indices == [0]
    assert turn.parts[0].is_image
    assert turn.text == (
        "\nHint: Look closely.\nWhat colour is the square?\nA. red\nB. green\nC. blue\n" + MCQ_INSTRUCTION
    )
    assert s0.images[0].data == imgs["img0"]
    assert size_of(s0.images[0].data) == (40, 30)
    # the image decodes through vlmkit's own loader too
    assert load_image(s0.images[0], None).size == (40, 30)


def test_absent_option_gap_and_nan_hint(mcq_tsv):
    path, _ = mcq_tsv
    s1 = {s.id: s for s in read_vlmevalkit(path, bad_log=BadSampleLog())}["1"]
    # all present letters are kept, the gap at C included; 'nan' hint is no hint
    assert s1.meta["options"] == {"A": "circle", "B": "square", "D": "triangle"}
    assert s1.meta["hint"] is None
    assert s1.meta["answer"] == "B"  # lower-case letter normalised
    assert s1.turns[0].text == "\nWhich shape?\nA. circle\nB. square\nD. triangle\n" + MCQ_INSTRUCTION


def test_reused_and_forward_referenced_images(mcq_tsv):
    path, imgs = mcq_tsv
    by_id = {s.id: s for s in read_vlmevalkit(path, bad_log=BadSampleLog())}
    assert by_id["1"].images[0].data == by_id["0"].images[0].data == imgs["img0"]
    assert by_id["1"].images[0].data is by_id["0"].images[0].data  # decoded once, shared
    assert by_id["6"].images[0].data == by_id["7"].images[0].data == imgs["img2"]


def test_multi_image_rows(mcq_tsv):
    path, imgs = mcq_tsv
    by_id = {s.id: s for s in read_vlmevalkit(path, bad_log=BadSampleLog())}
    s2, s3 = by_id["2"], by_id["3"]
    assert [size_of(r.data) for r in s2.images] == [(17, 23), (8, 9)]
    assert [size_of(r.data) for r in s3.images] == [(64, 5), (17, 23)]
    assert s2.turns[0].image_indices == [0, 1]
    assert [p.is_image for p in s2.turns[0].parts] == [True, True, False]
    assert 'Which image is "larger"?\nPick one.\nA. first\nB. second\n' in s2.turns[0].text
    assert s3.meta["split"] == "test"


def test_bad_rows_named_and_counted(mcq_tsv):
    path, _ = mcq_tsv
    log = BadSampleLog()
    read_vlmevalkit(path, bad_log=log)
    assert log.seen == 8 and len(log.bad) == 2
    where = {sid: (w, reason) for w, sid, reason in log.bad}
    assert set(where) == {"4", "5"}
    # the header is line 1, row k is on line k + 2 except that row 2's question spans two lines
    assert where["4"][0] == f"{path}:line 7"
    assert where["4"][1].startswith("bad_base64")
    assert where["5"][0] == f"{path}:line 8"
    assert where["5"][1].startswith("missing_image_ref") and "'99'" in where["5"][1]
    assert "bad_base64: 1" in log.summary() and "missing_image_ref: 1" in log.summary()


def test_without_log_a_bad_row_raises_naming_file_and_line(mcq_tsv):
    path, _ = mcq_tsv
    with pytest.raises(BadSampleError) as err:
        read_vlmevalkit(path)
    assert err.value.reason == "bad_base64"
    assert f"{path}:line 7" in str(err.value)


def test_reference_errors(tmp_path):
    img = b64(png((5, 5)))
    rows = [
        ["a", "a", "self?", "yes"],  # refers to itself
        ["b", "c", "chain?", "yes"],  # b -> c -> d: a chain resolves
        ["c", "d", "chain?", "no"],
        ["d", img, "root", "yes"],
        ["e", "f", "to a broken row?", "no"],
        ["f", "!!!!" + img[4:], "broken", "no"],
        ["g", "", "empty image", "no"],
        ["h", img, "duplicate index", "no"],
        ["h", img, "duplicate index", "no"],
        ["i", img, "too few fields"],
    ]
    path = write_tsv(tmp_path / "refs.tsv", ["index", "image", "question", "answer"], rows)
    got = {}
    for sid, where, item in iter_vlmevalkit(path):
        got.setdefault(sid, []).append(item)
    ok = {k for k, v in got.items() if any(not isinstance(x, BadSampleError) for x in v)}
    assert ok == {"b", "c", "d", "h"}
    assert [type(x).__name__ for x in got["h"]] == ["Sample", "BadSampleError"]
    reasons = {k: [x.reason for x in v if isinstance(x, BadSampleError)] for k, v in got.items()}
    assert reasons["a"] == ["bad_image_ref"]
    assert reasons["e"] == ["bad_image_ref"]
    assert reasons["f"] == ["bad_base64"]
    assert reasons["g"] == ["missing_image"]
    assert reasons["h"] == ["duplicate_index"]
    assert reasons["line 11"] == ["malformed_row"]
    assert got["b"][0].images[0].data == got["d"][0].images[0].data


def test_kind_detection_yesno_and_vqa(tmp_path):
    img = b64(png((6, 4)))
    header = ["index", "image", "question", "answer", "category"]
    yn = write_tsv(tmp_path / "MME.tsv", header, [["1", img, "Is it red?", "Yes", "color"], ["2", "1", "Is it blue?", "no", "color"]])
    vqa = write_tsv(tmp_path / "vqa.tsv", header, [["1", img, "What colour?", "red", "c"], ["2", "1", "Is it blue?", "no", "c"]])
    ys = read_vlmevalkit(yn)
    assert [s.meta["task"] for s in ys] == ["yesno", "yesno"]
    assert [s.meta["answer"] for s in ys] == ["yes", "no"]
    assert ys[0].meta["options"] == {}
    assert ys[0].turns[0].text == "\nIs it red?\nAnswer the question with yes or no."
    assert ys[0].meta["split"] is None  # no split column
    vs = read_vlmevalkit(vqa)
    assert [s.meta["task"] for s in vs] == ["vqa", "vqa"]
    assert vs[0].meta["answer"] == "red"
    assert vs[0].turns[0].text == "\nWhat colour?\nAnswer the question using a single word or phrase."
    # an explicit kind wins over detection; a yes/no file read as vqa keeps answers as written
    assert [s.meta["task"] for s in read_vlmevalkit(yn, kind="vqa")] == ["vqa", "vqa"]
    assert read_vlmevalkit(yn, kind="vqa")[0].meta["answer"] == "Yes"
    # ... and a vqa file forced to yesno has a bad row
    log = BadSampleLog()
    assert [s.id for s in read_vlmevalkit(vqa, kind="yesno", bad_log=log)] == ["2"]
    assert log.bad[0][2].startswith("bad_answer")
    # forced mcq without options: every row is bad
    log = BadSampleLog()
    assert read_vlmevalkit(yn, kind="mcq", bad_log=log) == []
    assert [r.split(":")[0] for _, _, r in log.bad] == ["no_options", "no_options"]
    with pytest.raises(ValueError):
        read_vlmevalkit(yn, kind="choice")


def test_mcq_detection_with_one_option_row_and_bad_answer(tmp_path):
    img = b64(png((6, 4)))
    header = ["index", "image", "question", "A", "B", "answer"]
    path = write_tsv(tmp_path / "m.tsv", header, [
        ["1", img, "Q1", "x", "y", "A"],
        ["2", "1", "Q2", "", "", "yes"],  # detected as mcq from row 1, so no options is bad
        ["3", "1", "Q3", "x", "y", "C"],  # answer not among the options
        ["4", "1", "Q4", "x", "y", ""],   # no answer (a test split) is fine
    ])
    log = BadSampleLog()
    samples = read_vlmevalkit(path, bad_log=log)
    assert [s.id for s in samples] == ["1", "4"]
    assert samples[1].meta["answer"] is None
    assert [(sid, r.split(":")[0]) for _, sid, r in log.bad] == [("2", "no_options"), ("3", "bad_answer")]


def test_large_fields_and_missing_columns(tmp_path):
    # random pixels do not compress, so the field is far above csv's default 128 KiB limit
    im = Image.frombytes("RGB", (300, 300), random.Random(0).randbytes(300 * 300 * 3))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    big = buf.getvalue()
    assert len(b64(big)) > 131072
    path = write_tsv(tmp_path / "big.tsv", ["index", "image", "question", "answer"], [["1", b64(big), "Q", "a"]])
    [s] = read_vlmevalkit(path)
    assert size_of(s.images[0].data) == (300, 300)
    bad = write_tsv(tmp_path / "nocol.tsv", ["index", "question"], [["1", "Q"]])
    with pytest.raises(ValueError, match="'image'"):
        read_vlmevalkit(bad)


def test_build_prompt():
    assert build_prompt("mcq", "Q?", "H", {"A": "a", "C": "c"}) == "Hint: H\nQ?\nA. a\nC. c\n" + MCQ_INSTRUCTION
    assert build_prompt("vqa", "Q?") == "Q?\nAnswer the question using a single word or phrase."
    with pytest.raises(ValueError):
        build_prompt("open", "Q?")


# ------------------------------------------------------------------ POPE


def pope_file(tmp_path, name="coco_pope_random.json", extra_lines=()):
    lines = [
        json.dumps({"question_id": 1, "image": "COCO_val2014_000000000001.jpg", "text": "Is there a dog in the image?", "label": "yes"}),
        json.dumps({"question_id": 2, "image": "COCO_val2014_000000000002.jpg", "text": "Is there a cat in the image?", "label": "no"}),
        '{"question_id": 3, "image": "x.jpg", "text": "broken',  # malformed JSON
        json.dumps({"question_id": 4, "image": "y.jpg", "text": "Is there a car?", "label": "maybe"}),
        json.dumps({"question_id": 5, "image": "z.jpg", "label": "yes"}),  # no text
        "",
        json.dumps({"question_id": 6, "image": "does_not_exist.jpg", "text": "Is there a bus?", "label": "No"}),
        *extra_lines,
    ]
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


def test_pope_reads_samples_and_names_bad_lines(tmp_path):
    path = pope_file(tmp_path)
    imgdir = tmp_path / "val2014"
    imgdir.mkdir()
    Image.new("RGB", (12, 10)).save(imgdir / "COCO_val2014_000000000001.jpg")
    log = BadSampleLog()
    samples = read_pope(path, image_root=imgdir, bad_log=log)
    assert [s.id for s in samples] == ["1", "2", "6"]
    s = samples[0]
    assert s.meta == {"question_id": 1, "answer": "yes", "pope_split": "random", "task": "pope"}
    assert samples[2].meta["answer"] == "no"  # label lower-cased
    assert s.images[0].path == "COCO_val2014_000000000001.jpg"
    assert s.turns[0].image_indices == [0]
    assert s.turns[0].text == "\nIs there a dog in the image?\nAnswer the question with yes or no."
    assert load_image(s.images[0], imgdir).size == (12, 10)
    # the missing image is not checked at read time, but the loader reports it
    with pytest.raises(BadSampleError) as err:
        load_image(samples[2].images[0], imgdir)
    assert err.value.reason == "missing_image"
    assert log.seen == 6
    assert [(w, sid, r.split(":")[0]) for w, sid, r in log.bad] == [
        (f"{path}:line 3", "line 3", "malformed_row"),
        (f"{path}:line 4", "4", "bad_answer"),
        (f"{path}:line 5", "5", "malformed_row"),
    ]


def test_pope_split_from_name_or_argument(tmp_path):
    assert pope_split_of("data/coco_pope_adversarial.json") == "adversarial"
    assert pope_split_of("aokvqa_pope_seem_popular.json") == "popular"
    assert pope_split_of("questions.jsonl", split="random") == "random"
    assert pope_split_of("coco_pope_random.json", split="popular") == "popular"  # argument wins
    with pytest.raises(ValueError):
        pope_split_of("questions.jsonl")
    with pytest.raises(ValueError):
        pope_split_of("coco_pope_random.json", split="hard")
    p = pope_file(tmp_path, name="pope_q.jsonl")
    with pytest.raises(ValueError):
        read_pope(p, bad_log=BadSampleLog())
    samples = read_pope(p, split="adversarial", bad_log=BadSampleLog())
    assert {s.meta["pope_split"] for s in samples} == {"adversarial"}


def test_pope_duplicate_ids_and_strict_reading(tmp_path):
    dup = json.dumps({"question_id": 1, "image": "a.jpg", "text": "Again?", "label": "yes"})
    path = pope_file(tmp_path, name="coco_pope_popular.json", extra_lines=[dup])
    items = list(iter_pope(path))
    assert [type(x).__name__ for _, _, x in items] == ["Sample", "Sample", "BadSampleError", "BadSampleError",
                                                       "BadSampleError", "Sample", "BadSampleError"]
    assert items[-1][2].reason == "duplicate_id" and items[-1][1] == f"{path}:line 8"
    with pytest.raises(BadSampleError, match="line 3"):
        read_pope(path)


def test_pope_json_list_file(tmp_path):
    rows = [{"question_id": "q1", "image": "a.jpg", "text": "Is there a cup?", "label": "no"}]
    p = tmp_path / "coco_pope_random.json"
    p.write_text(json.dumps(rows), encoding="utf-8")
    [s] = read_pope(p)
    assert s.id == "q1" and s.meta["answer"] == "no" and s.images[0].path == "a.jpg"
