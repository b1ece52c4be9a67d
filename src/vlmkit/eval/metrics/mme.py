"""MME scores (Fu et al. 2023, "MME: A Comprehensive Evaluation Benchmark for Multimodal Large
Language Models").

Every image of a subtask comes with two yes/no questions (normally one with answer yes and one
with answer no). Predictions are reduced to yes/no with `vlmkit.eval.extract.extract`
(``kind="yesno"``: the answer itself, else the first word ``yes`` or ``no`` in it); an answer
with neither word is wrong. Per subtask:

    acc      = #(questions answered correctly) / #questions
    acc_plus = #(images with both questions answered correctly) / #images
    score    = (acc + acc_plus) * 100          -- at most 200

    perception = sum of the scores of the 10 perception subtasks  (at most 2000)
    cognition  = sum of the scores of the 4 cognition subtasks    (at most 800)

with the official subtask names

    perception: existence, count, position, color, posters, celebrity, scene, landmark,
                artwork, OCR
    cognition:  commonsense_reasoning, numerical_calculation, text_translation, code_reasoning

A total sums only the subtasks present in the records; the missing ones are listed in
``perception_missing`` / ``cognition_missing`` so that a partial total is not read as a full
one. The reference script extracts differently for long answers (it looks for yes/no in the
first 4 characters only); for answers that start with yes or no, or are exactly yes/no, the
two agree.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Mapping, Sequence

from vlmkit.eval.extract import extract

PERCEPTION_SUBTASKS = (
    "existence", "count", "position", "color", "posters",
    "celebrity", "scene", "landmark", "artwork", "OCR",
)
COGNITION_SUBTASKS = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
SUBTASKS = PERCEPTION_SUBTASKS + COGNITION_SUBTASKS


def _fields(rec: Mapping | Sequence) -> tuple[str, str, str | None, str]:
    if isinstance(rec, Mapping):
        return rec["subtask"], rec["image_id"], rec.get("prediction"), rec["label"]
    subtask, image_id, prediction, label = rec
    return subtask, image_id, prediction, label


def mme_scores(records: Iterable[Mapping | Sequence], *, questions_per_image: int | None = 2) -> dict:
    """MME scores (definitions in the module docstring).

    ``records`` are ``(subtask, image_id, prediction, label)`` tuples or mappings with those
    keys; ``prediction`` is the raw answer (None counts as unparseable), ``label`` is yes/no.
    Unknown subtask names and labels other than yes/no raise ValueError, as does an image with
    a number of questions other than ``questions_per_image`` (None to allow any: acc_plus then
    needs all of an image's questions right).

    Returns ``{"subtasks": {name: {"acc", "acc_plus", "score", "n_questions", "n_images",
    "n_unparsed"}}, "perception", "cognition", "total", "perception_missing",
    "cognition_missing"}``.
    """
    # subtask -> image_id -> list of per-question correctness
    images: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    unparsed: dict[str, int] = defaultdict(int)
    for rec in records:
        subtask, image_id, prediction, label = _fields(rec)
        if subtask not in SUBTASKS:
            raise ValueError(f"unknown MME subtask {subtask!r}; expected one of {SUBTASKS}")
        lab = str(label).strip().lower()
        if lab not in ("yes", "no"):
            raise ValueError(f"yes/no label expected, got {label!r}")
        pred = extract(prediction or "", None, kind="yesno").answer
        unparsed[subtask] += pred is None
        images[subtask][str(image_id)].append(pred == lab)
    subtasks: dict[str, dict] = {}
    for name in SUBTASKS:
        if name not in images:
            continue
        per_image = images[name]
        if questions_per_image is not None:
            bad = {i: len(q) for i, q in per_image.items() if len(q) != questions_per_image}
            if bad:
                raise ValueError(f"{name}: images without {questions_per_image} questions: {bad}")
        n_q = sum(len(q) for q in per_image.values())
        acc = sum(sum(q) for q in per_image.values()) / n_q
        acc_plus = sum(all(q) for q in per_image.values()) / len(per_image)
        subtasks[name] = {
            "acc": acc,
            "acc_plus": acc_plus,
            "score": (acc + acc_plus) * 100,
            "n_questions": n_q,
            "n_images": len(per_image),
            "n_unparsed": unparsed[name],
        }
    perception = sum(subtasks[s]["score"] for s in PERCEPTION_SUBTASKS if s in subtasks)
    cognition = sum(subtasks[s]["score"] for s in COGNITION_SUBTASKS if s in subtasks)
    return {
        "subtasks": subtasks,
        "perception": perception,
        "cognition": cognition,
        "total": perception + cognition,
        "perception_missing": [s for s in PERCEPTION_SUBTASKS if s not in subtasks],
        "cognition_missing": [s for s in COGNITION_SUBTASKS if s not in subtasks],
    }
