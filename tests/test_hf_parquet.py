"""Hugging Face benchmark parquet (lmms-eval layouts): reading each layout, and scoring it with the
tasks of `eval.hf_tasks` (and `benchmark_vqa`) over oracle and wrong predictions. Every expected
number is worked out by hand in the comments."""

from __future__ import annotations

import io
import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vlmkit.data.bad_samples import BadSampleError, BadSampleLog
from vlmkit.data.formats.llava import DatasetFormatError
from vlmkit.eval.benchmark_tasks import BENCHMARK_TASKS
from vlmkit.eval.formats.hf_parquet import (
    detect_layout,
    grounding_prompt,
    iter_hf_parquet,
    layout_of,
    normalized_box,
    read_hf_parquet,
)
from vlmkit.eval.hf_tasks import HF_TASKS, task_for_layout, vqa_breakdown
from vlmkit.eval.metrics.relaxed import parse_number, relaxed_accuracy, relaxed_correct
from vlmkit.eval.tasks import target_of

INSTR = "Answer the question using a single word or phrase."
IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
STRINGS = pa.list_(pa.string())


def png(size=(40, 30), color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def img(data: bytes | None, path: str | None = None) -> dict:
    return {"bytes": data, "path": path}


def write(path, columns: dict, schema: pa.Schema):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns, schema=schema), path, row_group_size=2)
    return path


def score(task, samples, predictions: dict) -> tuple[dict, list[dict]]:
    """Run a TaskDef as the runner does; records go through JSON (as a resumed run reads them)."""
    ctx = task.prepare(samples)
    rows = []
    for s in samples:
        ex = task.extractor(s, predictions[s.id], ctx)
        sc = task.scorer(s, ex)
        rows.append({"id": s.id, "question_type": "x", "prediction": predictions[s.id], "extracted": ex.answer,
                     "method": ex.method, "target": target_of(s), "score": float(sc["score"]),
                     "extra": sc.get("extra", {})})  # fmt: skip
    rows = json.loads(json.dumps(rows))
    return task.aggregator(rows), rows


# ------------------------------------------------------------------ fixtures, one per layout

VQAV2_SCHEMA = pa.schema([
    ("question_type", pa.string()), ("multiple_choice_answer", pa.string()),
    ("answers", pa.list_(pa.struct([("answer", pa.string()), ("answer_confidence", pa.string()),
                                    ("answer_id", pa.int64())]))),
    ("image_id", pa.int64()), ("answer_type", pa.string()), ("question_id", pa.int64()),
    ("question", pa.string()), ("image", IMAGE),
])  # fmt: skip


def vqa_answers(*words):
    return [{"answer": w, "answer_confidence": "yes", "answer_id": i + 1} for i, w in enumerate(words)]


@pytest.fixture
def vqav2(tmp_path):
    shared, other = png(), png((20, 20), (0, 0, 200))
    rows = [  # question_type, mc answer, answers, image_id, answer_type, question_id, question, image
        ("how many", "2", vqa_answers(*["2"] * 10), 1, "number", 101, "How many cats?", shared),
        ("is the", "yes", vqa_answers(*["yes"] * 7, *["no"] * 3), 1, "yes/no", 102, "Is the cat black?", shared),
        ("what color is the", "dark red", vqa_answers(*["red"] * 2, *["dark red"] * 8), 2, "other", 103,
         "What color is the car?", other),
        ("what is", "tree", vqa_answers(*["tree"] * 10), 2, "other", 104, "   ", other),  # bad: blank question
        ("what color is the", "blue", vqa_answers(*["blue"] * 10), 2, "other", 105, "What color is the sky?", other),
    ]  # fmt: skip
    cols = {name: [r[k] for r in rows] for k, name in enumerate(VQAV2_SCHEMA.names)}
    cols["image"] = [img(r[7]) for r in rows]
    return write(tmp_path / "VQAv2" / "data" / "validation-00000-of-00001.parquet", cols, VQAV2_SCHEMA), shared


TEXTVQA_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("question_id", pa.int32()), ("question", pa.string()),
    ("question_tokens", STRINGS), ("image", IMAGE), ("image_width", pa.int32()), ("image_height", pa.int32()),
    ("flickr_original_url", pa.string()), ("flickr_300k_url", pa.string()), ("answers", STRINGS),
    ("image_classes", STRINGS), ("set_name", pa.string()), ("ocr_tokens", STRINGS),
])  # fmt: skip


def textvqa_columns(rows):
    image = png()
    n = len(rows)
    return {"image_id": ["abc"] * n, "question_id": [r[0] for r in rows], "question": [r[1] for r in rows],
            "question_tokens": [r[1].split() for r in rows], "image": [img(image)] * n,
            "image_width": [40] * n, "image_height": [30] * n, "flickr_original_url": ["u"] * n,
            "flickr_300k_url": ["u"] * n, "answers": [r[2] for r in rows], "image_classes": [["Car"]] * n,
            "set_name": ["val"] * n, "ocr_tokens": [["nokia"]] * n}  # fmt: skip


@pytest.fixture
def textvqa_dir(tmp_path):
    root = tmp_path / "textvqa"
    first = [(1, "what brand is this?", ["nokia"] * 6 + ["nokia phone"] * 4),
             (2, "what is written?", ["stop"] * 2 + ["halt"] * 8)]  # fmt: skip
    second = [(3, "what number?", ["7", None, "7"]),  # bad: a null answer
              (4, "what team?", ["cubs"] * 10)]  # fmt: skip
    write(root / "data" / "validation-00000-of-00002.parquet", textvqa_columns(first), TEXTVQA_SCHEMA)
    write(root / "data" / "validation-00001-of-00002.parquet", textvqa_columns(second), TEXTVQA_SCHEMA)
    write(root / "data" / "test-00000-of-00001.parquet", textvqa_columns([(9, "what?", ["x"] * 10)]), TEXTVQA_SCHEMA)
    return root


DOCVQA_SCHEMA = pa.schema([
    ("questionId", pa.string()), ("question", pa.string()), ("question_types", STRINGS), ("image", IMAGE),
    ("docId", pa.int64()), ("ucsf_document_id", pa.string()), ("ucsf_document_page_no", pa.string()),
    ("answers", STRINGS), ("data_split", pa.string()),
])  # fmt: skip


@pytest.fixture
def docvqa(tmp_path):
    page = png((60, 80), (250, 250, 250))
    rows = [
        ("d1", "What is the date?", ["handwritten", "form"], ["1/8/93"]),
        ("d2", "Which company?", ["layout"], ["ITC Limited", "ITC limited"]),
        ("d3", "What is the ratio?", ["table/list"], ["0.28"]),
        ("d4", "Who signed?", ["form"], None),  # bad: no answers (as a test split)
    ]
    cols = {"questionId": [r[0] for r in rows], "question": [r[1] for r in rows],
            "question_types": [r[2] for r in rows], "image": [img(page)] * 4, "docId": [7, 7, 8, 9],
            "ucsf_document_id": ["x"] * 4, "ucsf_document_page_no": ["1"] * 4, "answers": [r[3] for r in rows],
            "data_split": ["val"] * 4}  # fmt: skip
    return write(tmp_path / "DocVQA" / "DocVQA" / "validation-00000-of-00001.parquet", cols, DOCVQA_SCHEMA)


CHARTQA_SCHEMA = pa.schema([("type", pa.string()), ("question", pa.string()), ("answer", pa.string()),
                            ("image", IMAGE)])  # fmt: skip


@pytest.fixture
def chartqa(tmp_path):
    chart = png((50, 50), (10, 10, 10))
    rows = [("human_test", "How many in 2019?", "12"), ("human_test", "Is it rising?", "Yes"),
            ("augmented_test", "What is the minimum?", "0"), ("augmented_test", "What is the maximum?", None),
            ("augmented_test", "What share?", "45"), ("augmented_test", "What is the total?", "1000")]  # fmt: skip
    cols = {"type": [r[0] for r in rows], "question": [r[1] for r in rows], "answer": [r[2] for r in rows],
            "image": [img(chart)] * len(rows)}  # fmt: skip
    return write(tmp_path / "chartqa" / "test-00000-of-00001.parquet", cols, CHARTQA_SCHEMA)


COCO_SCHEMA = pa.schema([
    ("question_id", pa.string()), ("image", IMAGE), ("question", pa.string()), ("answer", STRINGS),
    ("id", pa.int64()), ("license", pa.int8()), ("file_name", pa.string()), ("coco_url", pa.string()),
    ("height", pa.int32()), ("width", pa.int32()), ("date_captured", pa.string()),
])  # fmt: skip


@pytest.fixture
def coco(tmp_path):
    refs = [
        ["a dog runs on the grass", "a brown dog running outside"],
        ["a man rides a red bike", "a person cycling down the street"],
        [],  # bad: no reference captions
        ["two cats sleep on a sofa", "cats napping on a couch"],
    ]
    n = len(refs)
    names = [f"COCO_val2014_{i:012d}.jpg" for i in range(n)]
    cols = {"question_id": names, "image": [img(png((30 + i, 30))) for i in range(n)],
            "question": ["Please carefully observe the image and come up with a caption for the image."] * n,
            "answer": refs, "id": list(range(n)), "license": [1] * n, "file_name": names, "coco_url": ["u"] * n,
            "height": [30] * n, "width": [30] * n, "date_captured": ["2013"] * n}  # fmt: skip
    return write(tmp_path / "COCO-Caption" / "data" / "val-00000-of-00001.parquet", cols, COCO_SCHEMA)


REFCOCO_SCHEMA = pa.schema([
    ("question_id", pa.string()), ("image", IMAGE), ("question", pa.string()), ("answer", STRINGS),
    ("segmentation", pa.list_(pa.float32())), ("bbox", pa.list_(pa.float32())), ("iscrowd", pa.int8()),
    ("file_name", pa.string()),
])  # fmt: skip


@pytest.fixture
def refcoco(tmp_path):
    photo = png((200, 100), (90, 120, 60))  # 200 x 100 pixels; no width/height columns in RefCOCO
    rows = [
        ("r0", ["man in red", "the left guy."], [20, 10, 100, 50]),
        ("r1", ["bottom strip"], [0, 50, 200, 50]),
        ("r2", ["nothing"], [10, 10, 0, 5]),  # bad: zero width
    ]
    n = len(rows)
    cols = {"question_id": [r[0] for r in rows], "image": [img(photo)] * n,
            "question": ["Please carefully observe the area circled in the image and come up with a caption."] * n,
            "answer": [r[1] for r in rows], "segmentation": [[0.0] * 6] * n, "bbox": [r[2] for r in rows],
            "iscrowd": [0] * n, "file_name": ["COCO_train2014_000000000001.jpg"] * n}  # fmt: skip
    return write(tmp_path / "RefCOCO" / "data" / "val-00000-of-00001.parquet", cols, REFCOCO_SCHEMA)


# ------------------------------------------------------------------ detection and files


def test_layouts_are_detected_from_the_columns(vqav2, textvqa_dir, docvqa, chartqa, coco, refcoco):
    assert layout_of(vqav2[0]) == "vqav2"
    assert layout_of(textvqa_dir, split="validation") == "textvqa"
    assert layout_of(docvqa) == "docvqa"
    assert layout_of(chartqa) == "chartqa"
    assert layout_of(coco) == "coco_caption"
    assert layout_of(refcoco) == "refcoco"
    assert [task_for_layout(x) for x in ("vqav2", "textvqa", "docvqa", "chartqa", "coco_caption", "refcoco")] == [
        "benchmark_vqa", "benchmark_vqa", "benchmark_anls", "benchmark_relaxed", "benchmark_caption",
        "benchmark_grounding"]  # fmt: skip
    assert set(HF_TASKS) == {"benchmark_anls", "benchmark_relaxed", "benchmark_caption", "benchmark_grounding"}


def test_unknown_columns_are_a_clear_error(tmp_path):
    schema = pa.schema([("image", IMAGE), ("prompt", pa.string()), ("label", pa.int64())])
    path = write(tmp_path / "odd.parquet", {"image": [img(png())], "prompt": ["hi"], "label": [1]}, schema)
    with pytest.raises(DatasetFormatError, match=r"odd\.parquet.*\['image', 'prompt', 'label'\]"):
        read_hf_parquet(path)
    with pytest.raises(DatasetFormatError, match="can't tell"):
        detect_layout(schema)
    # a layout named by hand must find its columns
    with pytest.raises(DatasetFormatError, match=r"'chartqa' needs the column\(s\) \['question', 'answer'\]"):
        read_hf_parquet(path, layout="chartqa")
    with pytest.raises(ValueError, match="unknown layout"):
        read_hf_parquet(path, layout="gqa")


def test_a_snapshot_directory_is_read_per_split(textvqa_dir):
    with pytest.raises(DatasetFormatError, match=r"\['test', 'validation'\]"):
        read_hf_parquet(textvqa_dir)
    with pytest.raises(DatasetFormatError, match="no parquet files of split 'train'"):
        read_hf_parquet(textvqa_dir, split="train")
    log = BadSampleLog()
    samples = read_hf_parquet(textvqa_dir, split="validation", bad_log=log)
    assert [s.id for s in samples] == ["1", "2", "4"]  # shard order, then row order
    assert log.seen == 4 and len(log.bad) == 1
    where, sid, reason = log.bad[0]
    assert where.endswith("validation-00001-of-00002.parquet:row 0") and sid == "3"
    assert reason.startswith("bad_answer") and "answers[1]" in reason
    assert [s.id for s in read_hf_parquet(textvqa_dir, split="test")] == ["9"]


def test_bad_rows_raise_without_a_log_naming_file_and_row(docvqa):
    with pytest.raises(BadSampleError, match=r"validation-00000-of-00001\.parquet:row 3 \(id d4\)") as err:
        read_hf_parquet(docvqa)
    assert err.value.reason == "bad_answer"


def test_rows_are_read_in_batches_and_limit_stops_early(vqav2):
    path, _ = vqav2
    items = list(iter_hf_parquet(path, batch_rows=2))  # 5 rows in 3 batches
    assert [(sid, where.rsplit(":", 1)[1]) for sid, where, _ in items] == [
        ("101", "row 0"), ("102", "row 1"), ("103", "row 2"), ("104", "row 3"), ("105", "row 4")]
    assert isinstance(items[3][2], BadSampleError) and items[3][2].reason == "malformed_row"
    assert [s.id for s in read_hf_parquet(path, limit=2)] == ["101", "102"]
    log = BadSampleLog()
    assert [s.id for s in read_hf_parquet(path, limit=3, bad_log=log)] == ["101", "102", "103"]
    assert log.seen == 3  # the bad row 3 was not reached


def test_missing_image_bytes_and_duplicate_ids_are_bad_rows(tmp_path):
    rows = {"type": ["human_test"] * 3, "question": ["a?", "b?", "c?"], "answer": ["1", "2", "3"],
            "image": [img(png()), img(None, "chart.png"), img(b"")]}  # fmt: skip
    path = write(tmp_path / "c.parquet", rows, CHARTQA_SCHEMA)
    log = BadSampleLog()
    assert [s.id for s in read_hf_parquet(path, bad_log=log)] == ["0"]
    assert [(w.rsplit(":", 1)[1], r.split(":")[0]) for w, _, r in log.bad] == [
        ("row 1", "missing_image"), ("row 2", "missing_image")]
    assert "chart.png" in log.bad[0][2]

    cols = {name: [] for name in VQAV2_SCHEMA.names}
    for qid in (5, 6, 5):
        for name, v in zip(VQAV2_SCHEMA.names, ("what", "a", vqa_answers("a", "a"), 1, "other", qid, "q?",
                                                 img(png()))):  # fmt: skip
            cols[name].append(v)
    log = BadSampleLog()
    samples = read_hf_parquet(write(tmp_path / "v.parquet", cols, VQAV2_SCHEMA), bad_log=log)
    assert [s.id for s in samples] == ["5", "6"]
    assert log.bad[0][2].startswith("duplicate_id") and log.bad[0][0].endswith("v.parquet:row 2")


# ------------------------------------------------------------------ VQAv2 / TextVQA


def test_vqav2_samples(vqav2):
    path, shared = vqav2
    log = BadSampleLog()
    samples = read_hf_parquet(path, bad_log=log)
    assert [s.id for s in samples] == ["101", "102", "103", "105"]
    assert log.bad[0][0].endswith(":row 3") and log.bad[0][2] == "malformed_row: empty question"
    s = samples[1]
    assert s.turns[0].parts[0].image == 0 and s.turns[0].text == f"\nIs the cat black?\n{INSTR}"
    assert s.images[0].data == shared and samples[0].images[0].data is s.images[0].data  # one shared copy
    assert s.meta["answers"] == ["yes"] * 7 + ["no"] * 3 and s.meta["answer"] == "yes"
    assert s.meta["benchmark"] is True and s.meta["task"] == "vqa" and s.meta["layout"] == "vqav2"
    assert s.meta["category"] == "yes/no" and s.meta["l2-category"] == "is the"
    assert s.meta["prompt_template"] == "{question}\n" + INSTR and s.meta["question_id"] == 102


def test_vqav2_scored_by_benchmark_vqa(vqav2):
    samples = read_hf_parquet(vqav2[0], bad_log=BadSampleLog())
    task = BENCHMARK_TASKS["benchmark_vqa"]
    assert all(task.accepts(s) for s in samples)
    oracle = {s.id: s.meta["answer"] for s in samples}
    metrics, _ = score(task, samples, oracle)
    assert metrics["accuracy"] == 1.0

    # 101 "two": all ten answers are "2", so no normalisation: no match -> 0.
    # 102 "no": m = 3 of 10 -> (3 * min(1, 2/3) + 7 * min(1, 3/3)) / 10 = (2 + 7) / 10 = 0.9
    # 103 "red": m = 2 -> (2 * min(1, 1/3) + 8 * min(1, 2/3)) / 10 = (2/3 + 16/3) / 10 = 0.6
    # 105 "Blue.": all ten are "blue", so compared as written -> 0.
    metrics, rows = score(task, samples, {"101": "two", "102": "no", "103": "red", "105": "Blue."})
    assert [r["score"] for r in rows] == pytest.approx([0.0, 0.9, 0.6, 0.0])
    assert metrics["accuracy"] == pytest.approx(1.5 / 4)
    assert metrics["by_category"] == pytest.approx({"number": 0.0, "other": 0.3, "yes/no": 0.9})
    b = vqa_breakdown(rows)
    assert b["by_answer_type"] == pytest.approx({"number": 0.0, "other": 0.3, "yes/no": 0.9})
    assert b["by_question_type"] == pytest.approx({"how many": 0.0, "is the": 0.9, "what color is the": 0.3})
    assert b["n_by_question_type"] == {"how many": 1, "is the": 1, "what color is the": 2}


def test_textvqa_samples_and_scores(textvqa_dir):
    samples = read_hf_parquet(textvqa_dir, split="validation", bad_log=BadSampleLog())
    s = samples[1]
    assert s.meta["layout"] == "textvqa" and s.meta["task"] == "vqa" and s.meta["category"] is None
    assert s.meta["answer"] == "halt"  # the most frequent answer (8 of 10)
    assert s.turns[0].text == f"\nwhat is written?\n{INSTR}"
    # 1 "Nokia": answers differ, so normalised -> "nokia", m = 6 -> min(1, 5/3) = min(1, 6/3) = 1 -> 1.0
    # 2 "stop": m = 2 of 10 -> (2 * 1/3 + 8 * 2/3) / 10 = 0.6
    # 4 "the cubs": all ten are "cubs", compared as written -> 0.0
    metrics, rows = score(BENCHMARK_TASKS["benchmark_vqa"], samples, {"1": "Nokia", "2": "stop", "4": "the cubs"})
    assert [r["score"] for r in rows] == pytest.approx([1.0, 0.6, 0.0])
    assert metrics["accuracy"] == pytest.approx(1.6 / 3) and metrics["by_category"] == pytest.approx({"none": 1.6 / 3})


# ------------------------------------------------------------------ DocVQA: ANLS


def test_docvqa_anls(docvqa):
    log = BadSampleLog()
    samples = read_hf_parquet(docvqa, bad_log=log)
    assert [s.id for s in samples] == ["d1", "d2", "d3"] and len(log.bad) == 1
    assert samples[1].meta["answers"] == ["ITC Limited", "ITC limited"] and samples[1].meta["task"] == "anls"
    assert samples[0].meta["category"] == ["handwritten", "form"]
    assert samples[0].turns[0].text == f"\nWhat is the date?\n{INSTR}"
    task = HF_TASKS["benchmark_anls"]
    assert all(task.accepts(s) for s in samples)
    assert not BENCHMARK_TASKS["benchmark_vqa"].accepts(samples[0])

    metrics, _ = score(task, samples, {"d1": "1/8/93", "d2": "ITC Limited", "d3": "0.28"})
    assert metrics["anls"] == 1.0 and metrics["n"] == 3

    # d1 exact -> 1. d2 "ITC Ltd" vs "itc limited" (lower-cased): "td" -> "imited" is 4 insertions,
    #   NL = 4/11 < 0.5 -> 1 - 4/11 = 7/11. d3 "0.82" vs "0.28": 2 substitutions, NL = 2/4 = 0.5,
    #   not < 0.5 -> 0. ANLS = (1 + 7/11 + 0) / 3 = 6/11.
    metrics, rows = score(task, samples, {"d1": "1/8/93", "d2": "ITC Ltd", "d3": "0.82"})
    assert [r["score"] for r in rows] == pytest.approx([1.0, 7 / 11, 0.0])
    assert metrics["anls"] == pytest.approx(6 / 11)
    # a question of two types counts in both
    assert metrics["by_category"] == pytest.approx({"form": 1.0, "handwritten": 1.0, "layout": 7 / 11,
                                                    "table/list": 0.0})  # fmt: skip
    assert metrics["n_by_category"] == {"form": 1, "handwritten": 1, "layout": 1, "table/list": 1}


# ------------------------------------------------------------------ ChartQA: relaxed accuracy


@pytest.mark.parametrize(
    "prediction, target, right",
    [
        ("12.5", "12", True),  # |12.5 - 12| / 12 = 4.2% <= 5%
        ("13", "12", False),  # 8.3%
        ("12.6", "12", True),  # exactly 5%: inclusive
        ("11.3", "12", False),  # 5.8% below
        ("-5.2", "-5", True),  # 4%
        ("0", "0", True),  # a target of 0: exact string
        ("0.0", "0", False),  # ... so not the same number written differently
        ("yes", "Yes", True),  # text: case-insensitive exact match
        ("Yes.", "Yes", False),  # ... and nothing else is forgiven
        (" Brazil ", "brazil", True),  # surrounding spaces are stripped
        ("1,030", "1000", True),  # thousands separator removed: 3%
        ("45%", "0.45", True),  # a trailing % divides by 100
        ("45%", "45", False),  # ... so 0.45 is far from 45
        ("forty", "40", False),
        ("12", "twelve", False),  # a number against text: compared as text
        (None, "12", False),
    ],
)
def test_relaxed_correct_hand_cases(prediction, target, right):
    assert relaxed_correct(prediction, target) is right


def test_parse_number():
    assert parse_number("1,234.5") == 1234.5 and parse_number("45%") == pytest.approx(0.45)
    assert parse_number(".5") == 0.5 and parse_number("-3") == -3.0 and parse_number("12.") == 12.0
    for text in ("nan", "inf", "1e3", "1_000", "12,34", "3 apples", "", None):
        assert parse_number(text) is None, text
    assert relaxed_accuracy(["12.5", "13"], ["12", "12"]) == 0.5 and relaxed_accuracy([], []) == 0.0
    with pytest.raises(ValueError):
        relaxed_accuracy(["1"], [])


def test_chartqa_relaxed_accuracy_per_type(chartqa):
    log = BadSampleLog()
    samples = read_hf_parquet(chartqa, bad_log=log)
    assert [s.id for s in samples] == ["0", "1", "2", "4", "5"]  # the row number: ChartQA has no id column
    assert log.bad[0][0].endswith(":row 3") and log.bad[0][2].startswith("bad_answer")
    assert samples[0].meta["category"] == "human_test" and samples[0].meta["answer"] == "12"
    assert samples[0].turns[0].text == f"\nHow many in 2019?\n{INSTR}"
    task = HF_TASKS["benchmark_relaxed"]
    metrics, _ = score(task, samples, {s.id: s.meta["answer"] for s in samples})
    assert metrics["accuracy"] == 1.0

    # 0 "12.5" right (4.2%), 1 "yes" right, 2 "0.0" wrong (target 0), 4 "45%" wrong (0.45), 5 "1,030" right (3%)
    metrics, rows = score(task, samples, {"0": "12.5", "1": "yes", "2": "0.0", "4": "45%", "5": "1,030"})
    assert [r["score"] for r in rows] == [1.0, 1.0, 0.0, 0.0, 1.0]
    assert metrics["accuracy"] == pytest.approx(3 / 5)
    assert metrics["by_category"] == pytest.approx({"augmented_test": 1 / 3, "human_test": 1.0})
    assert metrics["n_by_category"] == {"augmented_test": 3, "human_test": 2}


# ------------------------------------------------------------------ COCO captions


def test_coco_caption_samples_and_scores(coco):
    log = BadSampleLog()
    samples = read_hf_parquet(coco, bad_log=log)
    assert [s.id for s in samples] == [f"COCO_val2014_{i:012d}.jpg" for i in (0, 1, 3)]
    assert log.bad[0][2] == "bad_answer: answer is empty"
    s = samples[0]
    assert s.turns[0].text == "\nProvide a one-sentence caption for the provided image."
    assert s.meta["answers"] == ["a dog runs on the grass", "a brown dog running outside"]
    assert s.meta["task"] == "caption" and s.meta["answer"] == "a dog runs on the grass"
    task = HF_TASKS["benchmark_caption"]

    # the first reference as the caption: every n-gram matches its reference of the same length,
    # so BLEU-1..4 = 1 (to pycocoevalcap's epsilons) and ROUGE-L = 1
    metrics, rows = score(task, samples, {x.id: x.meta["answer"] for x in samples})
    for key in ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l"):
        assert metrics[key] == pytest.approx(1.0, abs=1e-6), key
    assert [r["score"] for r in rows] == pytest.approx([1.0, 1.0, 1.0]) and metrics["n"] == 3
    good_cider = metrics["cider_d"]
    assert good_cider > 1.0

    # words no reference has, and one empty answer: nothing matches anywhere
    metrics, rows = score(task, samples, {samples[0].id: "zebra xylophone quartz", samples[1].id: "",
                                          samples[2].id: "umbrella volcano"})  # fmt: skip
    assert metrics["bleu_1"] == pytest.approx(0.0, abs=1e-6) and metrics["rouge_l"] == 0.0
    assert metrics["cider_d"] == 0.0 and metrics["n_empty"] == 1 and rows[1]["method"] == "failed"


def test_caption_hand_computed_on_one_image(tmp_path):
    cols = {"question_id": ["x.jpg"], "image": [img(png())], "question": ["q"], "answer": [["a dog sits"]],
            "id": [1], "license": [1], "file_name": ["x.jpg"], "coco_url": ["u"], "height": [30], "width": [40],
            "date_captured": ["d"]}  # fmt: skip
    samples = read_hf_parquet(write(tmp_path / "one.parquet", cols, COCO_SCHEMA))
    metrics, rows = score(HF_TASKS["benchmark_caption"], samples, {"x.jpg": "a dog runs"})
    # unigrams: a, dog match of 3 -> 2/3; bigrams: "a dog" matches of 2 -> 1/2; lengths equal (no penalty)
    assert metrics["bleu_1"] == pytest.approx(2 / 3, abs=1e-6)
    assert metrics["bleu_2"] == pytest.approx(math.sqrt(2 / 3 * 1 / 2), abs=1e-6)
    # LCS "a dog" = 2: P = R = 2/3, so F = (1 + b^2) P R / (R + b^2 P) = 2/3
    assert metrics["rouge_l"] == pytest.approx(2 / 3) and rows[0]["score"] == pytest.approx(2 / 3)
    assert metrics["cider_d"] == 0.0  # one image: every IDF is log(1) - log(1) = 0


# ------------------------------------------------------------------ RefCOCO: grounding


def test_refcoco_samples_one_per_expression(refcoco):
    log = BadSampleLog()
    samples = read_hf_parquet(refcoco, bad_log=log)
    assert [s.id for s in samples] == ["r0#0", "r0#1", "r1#0"]
    assert log.bad[0][1] == "r2" and log.bad[0][2].startswith("bad_box")
    # [20, 10, 100, 50] on 200 x 100 -> [20/200, 10/100, 120/200, 60/100]
    assert samples[0].meta["box"] == pytest.approx([0.1, 0.1, 0.6, 0.6])
    assert samples[0].meta["answer"] == "[0.100, 0.100, 0.600, 0.600]" and samples[0].meta["image_size"] == [200, 100]
    assert samples[2].meta["box"] == pytest.approx([0.0, 0.5, 1.0, 1.0])
    # the shapes world's ground_ref question; article and final period of the expression dropped
    assert samples[0].turns[0].text == "\nGive the box of the man in red."
    assert samples[1].turns[0].text == "\nGive the box of the left guy."
    assert samples[1].meta["expression"] == "the left guy." and samples[1].meta["task"] == "grounding"
    assert "question_type" not in samples[0].meta  # so shapes_grounding (ground_ref) never takes it


def test_refcoco_acc_and_mean_iou(refcoco):
    samples = read_hf_parquet(refcoco, bad_log=BadSampleLog())
    task = HF_TASKS["benchmark_grounding"]
    metrics, _ = score(task, samples, {s.id: s.meta["answer"] for s in samples})
    assert metrics["acc_iou50"] == 1.0 and metrics["mean_iou"] == pytest.approx(1.0)

    # r0#1: [0.1, 0.1, 0.35, 0.6] is the left half of the target: 0.125 / 0.25 = IoU 0.5 -> counts.
    # r1#0: no box -> IoU 0, unparsed.  Acc = 2/3, mean IoU = (1 + 0.5 + 0) / 3 = 0.5
    preds = {"r0#0": "[0.1, 0.1, 0.6, 0.6]", "r0#1": "It is at [0.10,0.10,0.35,0.60].", "r1#0": "the bottom"}
    metrics, rows = score(task, samples, preds)
    assert [r["extra"]["iou"] for r in rows] == pytest.approx([1.0, 0.5, 0.0])
    assert [r["score"] for r in rows] == [1.0, 1.0, 0.0]
    assert metrics == pytest.approx({"n": 3, "acc_iou50": 2 / 3, "mean_iou": 0.5, "n_unparsed": 1})


def test_box_normalisation_and_size_columns(tmp_path):
    assert normalized_box([50, 25, 100, 50], 200, 100).as_list() == pytest.approx([0.25, 0.25, 0.75, 0.75])
    assert normalized_box([190, 90, 20, 20], 200, 100).as_list() == pytest.approx([0.95, 0.9, 1.0, 1.0])  # clipped
    for bad in ([1, 2, 3], [0, 0, -1, 5], [0, 0, float("nan"), 5], [300, 0, 10, 10], "0 0 1 1"):
        with pytest.raises(BadSampleError, match="bad_box"):
            normalized_box(bad, 200, 100)
    assert grounding_prompt("  A dog.  ") == "Give the box of the dog."
    # width/height columns, when a file has them, win over the image header (200 x 100 here)
    schema = REFCOCO_SCHEMA.append(pa.field("width", pa.int32())).append(pa.field("height", pa.int32()))
    cols = {"question_id": ["q"], "image": [img(png((200, 100)))], "question": ["x"], "answer": [["cat"]],
            "segmentation": [[0.0]], "bbox": [[100, 50, 100, 50]], "iscrowd": [0], "file_name": ["f"],
            "width": [400], "height": [200]}  # fmt: skip
    (s,) = read_hf_parquet(write(tmp_path / "sized.parquet", cols, schema))
    assert s.meta["box"] == pytest.approx([0.25, 0.25, 0.5, 0.5]) and s.meta["image_size"] == [400, 200]
    # bytes that are not an image: the size can't be read
    cols.update({"image": [img(b"not an image")], "width": [None], "height": [None]})
    log = BadSampleLog()
    assert read_hf_parquet(write(tmp_path / "broken.parquet", cols, schema), bad_log=log) == []
    assert log.bad[0][2].startswith("undecodable_image")
