"""``vlmkit eval --benchmark FILE``: a VLMEvalKit TSV through the evaluation harness, scored by
the benchmark tasks (option extraction by rules, per-category accuracy, VQA accuracy)."""

from __future__ import annotations

import json

import pytest

from _model_helpers import make_model
from test_eval_formats import HEADER, b64, png, write_tsv
from vlmkit.eval.benchmark_tasks import mark_benchmark
from vlmkit.eval.formats.vlmevalkit import read_vlmevalkit
from vlmkit.eval.runner import run_evaluation


@pytest.fixture
def mmbench_like(tmp_path):
    image = b64(png((40, 30)))
    rows = [
        ["1", image, "What colour?", "", "red", "blue", "green", "", "A", "colour", "perception", "dev"],
        ["2", "1", "What shape?", "", "circle", "square", "", "", "B", "shape", "perception", "dev"],
        ["3", "1", "How many?", "", "one", "two", "three", "four", "D", "count", "reasoning", "dev"],
        ["4", "1", "Which is left?", "a hint", "the red", "the blue", "", "", "A", "spatial", "reasoning", "dev"],
    ]
    return write_tsv(tmp_path / "mini_mmbench.tsv", HEADER, rows)


def test_benchmark_mcq_scores_by_rules_and_category(mmbench_like, tmp_path):
    samples = mark_benchmark(read_vlmevalkit(mmbench_like))
    # right by letter, right by "answer is", wrong letter, unextractable (counted as failed, wrong)
    answers = {"1": "A", "2": "The answer is B.", "3": "C", "4": "I am not sure."}

    def predictor(batch):
        return [answers[str(s.meta["index"])] for s in batch]

    res = run_evaluation(predictor, samples, tmp_path / "out", tasks=["benchmark_mcq"])
    task = res["tasks"]["benchmark_mcq"]
    assert task["n"] == 4 and task["metrics"]["accuracy"] == 0.5
    assert task["metrics"]["by_category"] == {"colour": 1.0, "count": 0.0, "shape": 1.0, "spatial": 0.0}
    assert task["metrics"]["by_l2_category"] == {"perception": 1.0, "reasoning": 0.0}
    assert task["extraction"]["failed"] == 1


def test_benchmark_vqa_uses_the_official_normalisation(tmp_path):
    image = b64(png((32, 32)))
    header = ["index", "image", "question", "answer", "category"]
    rows = [["1", image, "How many dogs?", "2", "count"], ["2", "1", "What is it?", "hot dog", "object"]]
    path = write_tsv(tmp_path / "mini_vqa.tsv", header, rows)
    samples = mark_benchmark(read_vlmevalkit(path))
    assert {s.meta["task"] for s in samples} == {"vqa"}
    res = run_evaluation(lambda b: ["Two.", "a hotdog"], samples, tmp_path / "out", tasks=["benchmark_vqa"])
    # "Two." -> "2" matches; "a hotdog" -> "hotdog" does not match "hot dog"
    assert res["tasks"]["benchmark_vqa"]["metrics"]["by_category"] == {"count": 1.0, "object": 0.0}


def test_vlmkit_eval_benchmark_with_a_checkpoint(mmbench_like, tmp_path):
    """The CLI: a real (tiny, random) checkpoint answers the TSV; every row is an item, the
    per-task record says how it was asked, and nothing is read from a world."""
    from vlmkit.cli import main
    from vlmkit.data.tokenizer import DEFAULT_CHAT_TEMPLATE
    from vlmkit.models.checkpoint_io import save_checkpoint

    model, tok = make_model()
    tok.chat_template = DEFAULT_CHAT_TEMPLATE
    ckpt = save_checkpoint(model, tok, tmp_path / "ckpt")
    assert main(["eval", str(ckpt), "--benchmark", str(mmbench_like), "--out", str(tmp_path / "e")]) == 0
    res = json.loads((tmp_path / "e" / "results.json").read_text())
    assert list(res["tasks"]) == ["benchmark_mcq"] and res["tasks"]["benchmark_mcq"]["n"] == 4
    assert res["data"]["path"] == str(mmbench_like) and res["data"]["size"] == mmbench_like.stat().st_size
    assert sum(res["tasks"]["benchmark_mcq"]["extraction"].values()) == 4  # every answer accounted for
    report = (tmp_path / "e" / "report.html").read_text()
    # a per-category table (MMBench's l2-category and category), and the TSV's inline images in
    # the gallery although samples.jsonl records no image path for them
    per_category = report.split("<h2>Per category</h2>")[1].split("<h2>")[0]
    for name in ("perception", "reasoning", "colour", "shape", "count", "spatial"):
        assert f"<td>{name}</td>" in per_category
    assert report.count('src="data:image/png;base64,') == 4 and "no image" not in report


def test_vlmkit_eval_on_a_pope_question_file(tmp_path):
    """A POPE question file (COCO-style names) with its image folder: per-split POPE metrics."""
    from PIL import Image

    from vlmkit.cli import main
    from vlmkit.data.tokenizer import DEFAULT_CHAT_TEMPLATE
    from vlmkit.models.checkpoint_io import save_checkpoint

    images = tmp_path / "val2014"
    images.mkdir()
    lines = []
    for k, label in enumerate(["yes", "no", "yes", "no"]):
        Image.new("RGB", (48, 40), (40 * k, 90, 200)).save(images / f"COCO_{k}.jpg")
        lines.append(json.dumps({"question_id": k + 1, "image": f"COCO_{k}.jpg",
                                 "text": "Is there a dog in the image?", "label": label}))  # fmt: skip
    questions = tmp_path / "coco_pope_adversarial.json"
    questions.write_text("\n".join(lines) + "\n")
    model, tok = make_model()
    tok.chat_template = DEFAULT_CHAT_TEMPLATE
    ckpt = save_checkpoint(model, tok, tmp_path / "ckpt")
    assert main(["eval", str(ckpt), "--benchmark", str(questions), "--data", str(images), "--out", str(tmp_path / "e")]) == 0
    res = json.loads((tmp_path / "e" / "results.json").read_text())
    metrics = res["tasks"]["pope"]["metrics"]
    assert metrics["adversarial"]["n"] == 4 and metrics["all"]["n"] == 4
    # the labels are balanced, and yes_ratio counts the model's answers (not the labels)
    yes = metrics["all"]["tp"] + metrics["all"]["fp"]
    assert metrics["all"]["yes_ratio"] == yes / 4


def test_circular_eval_counts_a_question_only_if_every_rotation_is_right(mmbench_like, tmp_path):
    from vlmkit.eval.benchmark_tasks import circular_expand

    samples = circular_expand(mark_benchmark(read_vlmevalkit(mmbench_like)))
    assert len(samples) == 3 + 2 + 4 + 2  # one question per rotation of its options
    rotated = [s for s in samples if s.meta["circular"]["question_id"] == "3"]
    # question 3: options one/two/three/four, answer D ("four"); rotation 1 shifts the texts by one
    assert rotated[1].meta["options"] == {"A": "two", "B": "three", "C": "four", "D": "one"}
    assert rotated[1].meta["answer"] == "C" and "C. four" in rotated[1].turns[-1].text

    def predictor(batch):
        out = []
        for s in batch:
            qid, rot = s.meta["circular"]["question_id"], s.meta["circular"]["rotation"]
            right = s.meta["answer"]
            # question 1 always right; question 3 wrong ("B", the answer is A there) in its last
            # rotation; the others always "A"
            if qid == "1" or (qid == "3" and rot < 3):
                out.append(right)
            elif qid == "3":
                out.append("B")
            else:
                out.append("A")
        return out

    res = run_evaluation(predictor, samples, tmp_path / "out", tasks=["benchmark_mcq_circular"])
    m = res["tasks"]["benchmark_mcq_circular"]["metrics"]
    # circular: only q1 (q2: "A" is right in rotation 1 only; q3 fails rotation 3; q4: "A" right once)
    assert m["n_questions"] == 4 and m["circular_accuracy"] == 0.25
    # single pass (rotation 0): q1 right, q2 wrong (answer B), q3 right, q4 right (answer A)
    assert m["single_pass_accuracy"] == 0.75


def test_an_mme_file_gets_acc_plus_and_the_perception_total(tmp_path):
    """MME-style yes/no rows (two questions per image, category = subtask): acc counts
    questions, acc+ counts images with both right; score = (acc + acc+) x 100."""
    red, blue = b64(png((30, 30), (200, 0, 0))), b64(png((30, 30), (0, 0, 200)))
    header = ["index", "image", "question", "answer", "category", "image_path"]
    rows = [["1", red, "Is there a red square?", "Yes", "existence", "e/1.png"],
            ["2", "1", "Is there a blue square?", "No", "existence", "e/1.png"],
            ["3", blue, "Is there a blue square?", "Yes", "existence", "e/2.png"],
            ["4", "3", "Is there a red square?", "No", "existence", "e/2.png"]]  # fmt: skip
    samples = mark_benchmark(read_vlmevalkit(write_tsv(tmp_path / "MME.tsv", header, rows)))
    answers = {1: "Yes", 2: "No", 3: "Yes", 4: "Yes"}  # image 1 both right, image 2 one right
    res = run_evaluation(lambda b: [answers[s.meta["index"]] for s in b], samples, tmp_path / "o",
                         tasks=["benchmark_yesno"])  # fmt: skip
    mme = res["tasks"]["benchmark_yesno"]["metrics"]["mme"]
    existence = mme["subtasks"]["existence"]
    assert existence["acc"] == 0.75 and existence["acc_plus"] == 0.5
    assert existence["score"] == pytest.approx(125.0) and mme["perception"] == pytest.approx(125.0)
