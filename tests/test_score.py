"""`vlmkit score`: saved predictions against a benchmark's own reference file, no model."""

from __future__ import annotations

import argparse
import hashlib
import json

import pytest

from vlmkit.eval.metrics.captioning import caption_scores
from vlmkit.eval.score import ScoreError, add_score_parser, read_predictions, score_predictions


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def _preds(path, mapping):
    return _jsonl(path, [{"id": k, "prediction": v} for k, v in mapping.items()])


POPE_ROWS = [
    {"question_id": 1, "image": "a.jpg", "text": "Is there a dog in the image?", "label": "yes"},
    {"question_id": 2, "image": "a.jpg", "text": "Is there a cat in the image?", "label": "no"},
    {"question_id": 3, "image": "b.jpg", "text": "Is there a car in the image?", "label": "yes"},
    {"question_id": 4, "image": "b.jpg", "text": "Is there a bus in the image?", "label": "no"},
]


@pytest.fixture
def pope_file(tmp_path):
    return _jsonl(tmp_path / "coco_pope_adversarial.json", POPE_ROWS)


# ------------------------------------------------------------------ POPE


def test_pope_hand_computed(tmp_path, pope_file):
    # q1 yes->"Yes, there is." TP; q2 no->"yes" FP; q3 yes->"No." FN; q4 no->"no" TN
    preds = _preds(tmp_path / "p.jsonl", {1: "Yes, there is a dog.", 2: "yes", "3": "No.", 4: "no"})
    r = score_predictions("pope", preds, pope_file)
    assert r["task"] == "pope" and r["n"] == 4 and r["n_missing"] == 0 and r["n_bad_prediction_lines"] == 0
    assert r["split"] == "adversarial"
    m = r["metrics"]["adversarial"]
    assert m == r["metrics"]["all"]
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (1, 1, 1, 1)
    assert m["accuracy"] == pytest.approx(2 / 4)
    assert m["precision"] == pytest.approx(1 / 2)
    assert m["recall"] == pytest.approx(1 / 2)
    assert m["f1"] == pytest.approx(0.5)
    assert m["yes_ratio"] == pytest.approx(2 / 4)
    assert r["extraction"] == {"exact": 3, "rule:yesno": 1}
    assert r["tasks"]["pope"]["n"] == 4 and r["tasks"]["pope"]["metrics"] == r["metrics"]


def test_pope_missing_scored_wrong_and_bad_lines_counted(tmp_path, pope_file):
    # q1 TP, q2 TN, q3 missing (a yes-item: a miss), q4 "maybe" (unparsed); one malformed line
    preds = _jsonl(tmp_path / "p.jsonl", [
        {"id": 1, "prediction": "yes"},
        "{not json",
        {"id": 2, "prediction": "no"},
        {"id": 4, "prediction": "maybe"},
    ])
    r = score_predictions("pope", preds, pope_file)
    assert r["n_missing"] == 1 and r["missing_ids"] == ["3"]
    assert r["n_bad_prediction_lines"] == 1 and r["bad_prediction_lines"][0]["line"] == 2
    m = r["metrics"]["all"]
    assert m["accuracy"] == pytest.approx(2 / 4)
    assert m["precision"] == pytest.approx(1.0)
    assert m["recall"] == pytest.approx(1 / 2)
    assert m["yes_ratio"] == pytest.approx(1 / 4)
    assert m["n_unparsed"] == 2
    assert r["extraction"] == {"exact": 2, "failed": 1, "missing": 1}


def test_pope_file_name_without_split(tmp_path):
    ref = _jsonl(tmp_path / "questions.jsonl", POPE_ROWS)
    preds = _preds(tmp_path / "p.jsonl", {1: "yes", 2: "no", 3: "yes", 4: "no"})
    r = score_predictions("pope", preds, ref)
    assert list(r["metrics"]) == ["all"] and r["split"] is None
    assert r["metrics"]["all"]["accuracy"] == 1.0
    r = score_predictions("pope", preds, ref, split="popular")
    assert set(r["metrics"]) == {"popular", "all"}


def test_unknown_prediction_ids_are_an_error(tmp_path, pope_file):
    preds = _preds(tmp_path / "p.jsonl", {1: "yes", 77: "no", 88: "no"})
    with pytest.raises(ScoreError, match=r"2 prediction id\(s\).*'77'"):
        score_predictions("pope", preds, pope_file)


# ------------------------------------------------------------------ predictions file


def test_duplicate_ids_are_an_error(tmp_path):
    preds = _jsonl(tmp_path / "p.jsonl", [{"id": 1, "prediction": "a"}, {"id": "1", "prediction": "b"}])
    with pytest.raises(ScoreError, match=r"line 2: duplicate id '1' \(first on line 1\)"):
        read_predictions(preds)


def test_bad_lines_named_and_limited(tmp_path, caplog):
    preds = _jsonl(tmp_path / "p.jsonl", [
        {"id": 1, "prediction": "a"},
        "[1, 2]",
        {"id": 2},
        "",
        {"id": 3, "prediction": None},
        {"id": 4, "prediction": "d"},
        {"id": 5, "prediction": "e"},
    ])
    got, bad = read_predictions(preds)
    assert got == {"1": "a", "4": "d", "5": "e"}
    assert [n for n, _ in bad] == [2, 3, 5]
    assert "line 3" in caplog.text and "no prediction" in caplog.text
    with pytest.raises(ScoreError, match="3 of 6 lines are bad"):
        read_predictions(preds, max_bad_fraction=0.4)
    allbad = _jsonl(tmp_path / "bad.jsonl", ["oops", "{}"])
    with pytest.raises(ScoreError, match="all 2 lines are bad"):
        read_predictions(allbad)
    empty = _jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(ScoreError, match="empty"):
        read_predictions(empty)


# ------------------------------------------------------------------ VQAv2 / TextVQA


def _vqa_answers(words):
    return [{"answer": w, "answer_confidence": "yes", "answer_id": i + 1} for i, w in enumerate(words)]


def test_vqav2_hand_computed(tmp_path):
    ann = {"annotations": [
        {"question_id": 101, "image_id": 1, "answer_type": "other", "question_type": "what color",
         "answers": _vqa_answers(["red"] * 3 + ["blue"] * 7)},
        {"question_id": 102, "image_id": 1, "answer_type": "number", "question_type": "how many",
         "answers": _vqa_answers(["2"] * 10)},
        {"question_id": 103, "image_id": 2, "answer_type": "yes/no", "question_type": "is there",
         "answers": _vqa_answers(["yes"] * 10)},
    ]}
    ref = tmp_path / "v2_mscoco_val2014_annotations.json"
    ref.write_text(json.dumps(ann))
    # 101: 3 of 10 match: 3 subsets see 2 (2/3), 7 see 3 (1) -> (3*2/3 + 7)/10 = 0.9
    # 102: "two" vs ten identical "2": no normalisation -> 0; 103 missing -> 0
    preds = _preds(tmp_path / "p.jsonl", {101: "Red", 102: "two"})
    r = score_predictions("vqav2", preds, ref)
    assert r["n"] == 3 and r["n_missing"] == 1
    m = r["metrics"]
    assert "per_question" not in m
    assert m["by_answer_type"]["other"] == pytest.approx(0.9)
    assert m["by_answer_type"]["number"] == 0.0 and m["by_answer_type"]["yes/no"] == 0.0
    assert m["accuracy"] == pytest.approx(0.9 / 3)
    assert m["by_question_type"]["what color"] == pytest.approx(0.9)


def test_textvqa(tmp_path):
    data = {"dataset_name": "textvqa", "dataset_split": "val", "data": [
        {"question_id": 5, "image_id": "abc", "question": "what brand?", "answers": ["nokia"] * 10},
        {"question_id": 6, "image_id": "abd", "question": "what number?", "answers": ["12"] * 2 + ["7"] * 8},
    ]}
    ref = tmp_path / "TextVQA_0.5.1_val.json"
    ref.write_text(json.dumps(data))
    preds = _preds(tmp_path / "p.jsonl", {5: "nokia", 6: "12"})
    r = score_predictions("textvqa", preds, ref)
    # 5: 10 matches -> 1; 6: 2 matches: 2 subsets see 1 (1/3), 8 see 2 (2/3) -> (2/3 + 16/3)/10 = 0.6
    assert r["metrics"]["accuracy"] == pytest.approx((1 + 0.6) / 2)
    assert r["metrics"]["by_answer_type"] == {}


# ------------------------------------------------------------------ COCO captions


COCO = {
    "images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}, {"id": 3, "file_name": "c.jpg"}],
    "annotations": [
        {"id": 10, "image_id": 1, "caption": "A dog runs on the grass."},
        {"id": 11, "image_id": 1, "caption": "A brown dog running in a field."},
        {"id": 12, "image_id": 2, "caption": "A cat sleeps on a sofa."},
        {"id": 13, "image_id": 2, "caption": "A cat lying on a couch."},
        {"id": 14, "image_id": 3, "caption": "Two people ride bikes down a street."},
    ],
}


def test_coco_caption_matches_caption_scores(tmp_path):
    ref = tmp_path / "captions_val2014.json"
    ref.write_text(json.dumps(COCO))
    caps = {1: "a dog running on grass", 2: "a cat on a sofa", 3: "people riding bicycles"}
    preds = _preds(tmp_path / "p.jsonl", caps)
    r = score_predictions("coco_caption", preds, ref, tokenizer="python")
    refs = {1: [COCO["annotations"][0]["caption"], COCO["annotations"][1]["caption"]],
            2: [COCO["annotations"][2]["caption"], COCO["annotations"][3]["caption"]],
            3: [COCO["annotations"][4]["caption"]]}
    assert r["metrics"] == caption_scores(caps, refs, tokenizer="python")
    assert r["n"] == 3 and r["metrics"]["tokenizer"] == "python"
    # a missing image is scored as the empty caption, over the same image set
    preds2 = _preds(tmp_path / "p2.jsonl", {1: caps[1], 2: caps[2]})
    r2 = score_predictions("coco_caption", preds2, ref, tokenizer="python")
    assert r2["n_missing"] == 1
    assert r2["metrics"] == caption_scores({1: caps[1], 2: caps[2], 3: ""}, refs, tokenizer="python")


def test_coco_caption_id_mismatch(tmp_path):
    ref = tmp_path / "captions_val2014.json"
    ref.write_text(json.dumps(COCO))
    preds = _preds(tmp_path / "p.jsonl", {1: "a dog", 42: "a whale"})
    with pytest.raises(ScoreError, match=r"1 prediction id\(s\).*'42'"):
        score_predictions("coco_caption", preds, ref, tokenizer="python")


def test_bad_reference_file(tmp_path):
    ref = tmp_path / "refs.json"
    ref.write_text(json.dumps({"questions": []}))
    preds = _preds(tmp_path / "p.jsonl", {1: "x"})
    with pytest.raises(ScoreError, match="'annotations' list"):
        score_predictions("vqav2", preds, ref)
    with pytest.raises(ScoreError, match="unknown task"):
        score_predictions("gqa", preds, ref)


# ------------------------------------------------------------------ command line


def _parser():
    p = argparse.ArgumentParser(prog="vlmkit")
    sub = p.add_subparsers(dest="command", required=True)
    add_score_parser(sub)
    return p


def test_cli_prints_json_and_writes_results(tmp_path, pope_file, capsys):
    preds = _preds(tmp_path / "p.jsonl", {1: "yes", 2: "yes", 3: "yes", 4: "no"})
    out = tmp_path / "out"
    args = _parser().parse_args(["score", "pope", str(preds), "--references", str(pope_file), "--out", str(out)])
    assert args.func(args) == 0
    printed = json.loads(capsys.readouterr().out)
    written = json.loads((out / "results.json").read_text())
    assert printed == written
    assert printed["task"] == "pope" and printed["n"] == 4 and printed["n_missing"] == 0
    m = printed["metrics"]["adversarial"]
    # TP 2, FP 1, TN 1, FN 0
    assert m["accuracy"] == pytest.approx(3 / 4) and m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == 1.0 and m["yes_ratio"] == pytest.approx(3 / 4)
    assert printed["references"]["sha256"] == hashlib.sha256(pope_file.read_bytes()).hexdigest()
    assert printed["references"]["size"] == pope_file.stat().st_size
    assert printed["predictions"]["sha256"] == hashlib.sha256(preds.read_bytes()).hexdigest()
    assert not [p for p in out.iterdir() if p.name != "results.json"]  # no temporary left behind


def test_cli_error_exit_code(tmp_path, pope_file, capsys):
    preds = _preds(tmp_path / "p.jsonl", {99: "yes"})
    args = _parser().parse_args(["score", "pope", str(preds), "--references", str(pope_file)])
    assert args.func(args) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "error:" in captured.err and "'99'" in captured.err


def test_vlmkit_score_through_the_real_cli(tmp_path, capsys):
    """The registered subcommand: two POPE questions, one right; JSON on stdout and in --out."""
    from vlmkit.cli import main

    refs = tmp_path / "coco_pope_random.json"
    refs.write_text("".join(json.dumps({"question_id": i, "image": f"{i}.jpg", "text": "Is there a cat?",
                                        "label": label}) + "\n" for i, label in [(1, "yes"), (2, "no")]))  # fmt: skip
    preds = tmp_path / "p.jsonl"
    preds.write_text(json.dumps({"id": 1, "prediction": "Yes."}) + "\n" + json.dumps({"id": 2, "prediction": "yes"}) + "\n")
    assert main(["score", "pope", str(preds), "--references", str(refs), "--out", str(tmp_path / "o")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((tmp_path / "o" / "results.json").read_text())
    assert printed["metrics"]["all"]["accuracy"] == 0.5 and printed["metrics"]["all"]["yes_ratio"] == 1.0
