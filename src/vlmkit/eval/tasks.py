"""Task definitions for the shapes world, and the registry `TASKS` the runner uses.

A `TaskDef` says which rows belong to the task (``accepts``), how to turn a generation into a
short answer (``extractor``), how to score one item (``scorer``) and how to turn the scored
items into the task's metrics (``aggregator``). Aggregators read only the item records that are
written to ``samples.jsonl`` (the fields of `ItemRecord`), so a resumed run, whose earlier items
come back from that file, gets the same metrics as an uninterrupted one.

Tasks (rows of ``test.json`` are chosen by ``meta["task"]``):
  shapes_vqa        task=vqa; every question type (colour, shape, counts, spatial, reading) needs
                    the image. Metrics: ``accuracy`` (exact match over all items), ``by_type``
                    {question_type: accuracy}, ``n_by_type``.
  shapes_pope       task=pope; yes/no object existence. Metrics per ``pope_split`` (``random``,
                    ``popular``, ``adversarial``; rows without one go under ``unknown``), each
                    ``{n, accuracy, precision, recall, f1, yes_ratio, n_unparsed, tp, fp, tn, fn}``,
                    and the same over all splits under ``all`` (see `metrics.yesno`).
  shapes_grounding  task=grounding with question_type=ground_ref; the answer is a box.
                    Metrics: ``acc_iou50``, ``mean_iou``, ``n``, ``n_unparsed`` (`metrics.grounding`).
                    An item's score is 1 when IoU >= 0.5; its IoU is kept in the record's ``extra``.
  shapes_mcq        task=mcq; answer is a letter A-D. Metrics: ``accuracy``, ``by_letter``
                    {target letter: accuracy}, ``pred_letter_ratio`` {letter: share of predictions,
                    ``none`` for failed extractions}, ``by_type``, ``n_by_type``.
  shapes_chair      task=caption with a scene graph; hallucination in free descriptions, against the scene graph
                    (`metrics.chair`, Rohrbach et al. 2018): ``chair_i`` (hallucinated object
                    mentions / mentions), ``chair_s`` (captions with one / captions), the same
                    for colour-shape pairs (``attribute_chair_*``), ``mentions_per_caption``
                    (a model that names nothing hallucinates nothing: read them together).

The target of an item is ``meta["answer"]``, or the text of the last assistant turn when there
is no ``answer`` in the meta.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

from vlmkit.data.sample import Box, Sample
from vlmkit.eval.extract import Extraction, answer_kind, extract, normalize_options, parse_options
from vlmkit.eval.metrics.exact import accuracy_by_type, exact_match
from vlmkit.eval.metrics.grounding import IOU_THRESHOLD, box_iou, grounding_metrics
from vlmkit.eval.metrics.yesno import yesno_metrics

# An item record, as written to samples.jsonl: id, task, question_type, prompt, prediction,
# extracted, method, target, score, blind, extra (plus bookkeeping fields of the runner).
ItemRecord = dict[str, Any]

Extractor = Callable[[Sample, str, dict], Extraction]  # (sample, prediction, task context)
Scorer = Callable[[Sample, Extraction], dict]  # -> {"score": float in [0, 1], "extra": {...}}
Aggregator = Callable[[list[ItemRecord]], dict]  # item records -> metrics


@dataclass(frozen=True)
class TaskDef:
    """One evaluation task. ``prepare`` builds a context from *all* the task's samples (before
    any ``limit``), e.g. the answer vocabulary of each open question type, so that an item's
    extraction does not depend on which other items were run."""

    name: str
    description: str
    accepts: Callable[[Sample], bool]
    extractor: Extractor
    scorer: Scorer
    aggregator: Aggregator
    prepare: Callable[[list[Sample]], dict] = field(default=lambda samples: {})
    primary: str = "accuracy"  # the headline metric (a key of the aggregator's output)


def target_of(sample: Sample) -> str | None:
    """The ground-truth answer: ``meta["answer"]``, else the last assistant turn's text."""
    ans = sample.meta.get("answer")
    if ans is None:
        ans = sample.target_text()
    return None if ans is None else str(ans)


def question_type_of(sample: Sample) -> str:
    return str(sample.meta.get("question_type") or sample.meta.get("task") or "unknown")


def prompt_text(sample: Sample) -> str:
    """The text of the last user turn of the prompt (what the model was asked), stripped."""
    for t in reversed(sample.prompt_turns()):
        if t.role == "user":
            return t.text.strip()
    return ""


def _task_is(name: str, question_type: str | None = None) -> Callable[[Sample], bool]:
    def accepts(sample: Sample) -> bool:
        if sample.meta.get("task") != name:
            return False
        return question_type is None or sample.meta.get("question_type") == question_type

    return accepts


# ------------------------------------------------------------------ exact-match (VQA)


def _vocab_context(samples: list[Sample]) -> dict:
    """For each open question type, the set of its targets: the answer vocabulary for rule:vocab."""
    vocab: dict[str, set[str]] = defaultdict(set)
    for s in samples:
        qt = question_type_of(s)
        t = target_of(s)
        if t is not None and answer_kind(qt) == "open":
            vocab[qt].add(t)
    return {"vocabulary": {k: sorted(v) for k, v in vocab.items()}}


def _extract_by_type(sample: Sample, prediction: str, ctx: dict) -> Extraction:
    qt = question_type_of(sample)
    return extract(prediction, qt, vocabulary=ctx.get("vocabulary", {}).get(qt))


def _score_exact(sample: Sample, ex: Extraction) -> dict:
    return {"score": float(exact_match(ex.answer, target_of(sample))), "extra": {}}


def _agg_vqa(rows: list[ItemRecord]) -> dict:
    return accuracy_by_type((r["question_type"], r["score"]) for r in rows)


# ------------------------------------------------------------------ POPE

POPE_SPLITS = ("random", "popular", "adversarial")


def _extract_yesno(sample: Sample, prediction: str, ctx: dict) -> Extraction:
    return extract(prediction, question_type_of(sample), kind="yesno")


def _score_pope(sample: Sample, ex: Extraction) -> dict:
    return {
        "score": float(exact_match(ex.answer, target_of(sample))),
        "extra": {"split": str(sample.meta.get("pope_split") or "unknown")},
    }


def _agg_pope(rows: list[ItemRecord]) -> dict:
    by_split: dict[str, list[ItemRecord]] = defaultdict(list)
    for r in rows:
        by_split[(r.get("extra") or {}).get("split", "unknown")].append(r)
    order = [s for s in POPE_SPLITS if s in by_split] + sorted(set(by_split) - set(POPE_SPLITS))
    out = {}
    for split in order:
        rs = by_split[split]
        out[split] = yesno_metrics([r["extracted"] for r in rs], [r["target"] for r in rs])
    out["all"] = yesno_metrics([r["extracted"] for r in rows], [r["target"] for r in rows])
    return out


# ------------------------------------------------------------------ grounding


def _extract_box(sample: Sample, prediction: str, ctx: dict) -> Extraction:
    return extract(prediction, question_type_of(sample), kind="box")


def target_box(sample: Sample) -> Box | None:
    """The first box in the target text (what the model is trained to write, 3 decimals), else
    ``meta["box"]``. Using the text keeps a perfect answer at IoU 1 despite the rounding."""
    t = target_of(sample)
    box = Box.parse(t) if t else None
    if box is None:
        b = sample.meta.get("box")
        if b is not None and len(b) == 4:
            box = Box(*(float(v) for v in b))
    return box


def _score_grounding(sample: Sample, ex: Extraction) -> dict:
    pred = Box.parse(ex.answer) if ex.answer else None
    iou = box_iou(pred, target_box(sample))
    return {"score": float(iou >= IOU_THRESHOLD - 1e-9), "extra": {"iou": iou}}


def _agg_grounding(rows: list[ItemRecord]) -> dict:
    ious = [float((r.get("extra") or {}).get("iou", 0.0)) for r in rows]
    return grounding_metrics(ious, n_unparsed=sum(1 for r in rows if r["extracted"] is None))


# ------------------------------------------------------------------ MCQ


def options_of(sample: Sample) -> dict[str, str]:
    """The options of an MCQ item: ``meta["options"]`` (list or letter -> text), else the
    ``A. ...`` lines of the question."""
    opts = normalize_options(sample.meta.get("options"))
    return opts if opts else parse_options(prompt_text(sample))


def _extract_letter(sample: Sample, prediction: str, ctx: dict) -> Extraction:
    return extract(prediction, question_type_of(sample), options=options_of(sample), kind="letter")


def _score_mcq(sample: Sample, ex: Extraction) -> dict:
    target = (target_of(sample) or "").strip().upper()
    ok = ex.answer is not None and ex.answer.upper() == target
    return {"score": float(ok), "extra": {}}


def _agg_mcq(rows: list[ItemRecord]) -> dict:
    out = accuracy_by_type((r["question_type"], r["score"]) for r in rows)
    by_letter = accuracy_by_type(((r["target"] or "").strip().upper(), r["score"]) for r in rows)
    preds = Counter(r["extracted"].upper() if r["extracted"] else "none" for r in rows)
    n = len(rows)
    return {
        "accuracy": out["accuracy"],
        "by_letter": by_letter["by_type"],
        "pred_letter_ratio": {k: v / n for k, v in sorted(preds.items())} if n else {},
        "by_type": out["by_type"],
        "n_by_type": out["n_by_type"],
    }


# ------------------------------------------------------------------ captions: CHAIR


def _extract_caption(sample: Sample, prediction: str, ctx: dict) -> Extraction:
    text = prediction.strip()
    return Extraction(text if text else None, "whole_answer" if text else "failed")


def _score_caption(sample: Sample, ex: Extraction) -> dict:
    """Per caption, the object and colour-shape mentions and how many the scene lacks; the
    score is 1 for a caption with no hallucinated object (so accuracy = 1 - CHAIRs)."""
    from vlmkit.eval.metrics.chair import chair_scores, scene_truth, shapes_attribute_chair, shapes_vocabulary

    caption, scene = ex.answer or "", sample.meta["scene"]
    objects = chair_scores({0: caption}, {0: scene_truth(scene)}, shapes_vocabulary())
    attributes = shapes_attribute_chair({0: caption}, {0: scene})
    extra = {"mentions": objects["n_mentions"], "hallucinated": objects["n_hallucinated"],
             "attribute_mentions": attributes["n_mentions"], "attribute_hallucinated": attributes["n_hallucinated"],
             "hallucinated_objects": objects["details"][0]["hallucinated"]}  # fmt: skip
    return {"score": float(objects["n_hallucinated"] == 0), "extra": extra}


def _agg_caption(rows: list[ItemRecord]) -> dict:
    def ratio(num: float, den: float) -> float:
        return num / den if den else 0.0

    mentions = sum(r["extra"]["mentions"] for r in rows)
    attr = sum(r["extra"]["attribute_mentions"] for r in rows)
    return {
        "chair_i": ratio(sum(r["extra"]["hallucinated"] for r in rows), mentions),
        "chair_s": ratio(sum(1 for r in rows if r["extra"]["hallucinated"]), len(rows)),
        "attribute_chair_i": ratio(sum(r["extra"]["attribute_hallucinated"] for r in rows), attr),
        "attribute_chair_s": ratio(sum(1 for r in rows if r["extra"]["attribute_hallucinated"]), len(rows)),
        "mentions_per_caption": ratio(mentions, len(rows)),
        "n": len(rows),
    }


# ------------------------------------------------------------------ registry

TASKS: dict[str, TaskDef] = {
    t.name: t
    for t in (
        TaskDef(
            "shapes_vqa",
            "short-answer questions about the scene (colour, shape, counts, spatial, reading)",
            _task_is("vqa"),
            _extract_by_type,
            _score_exact,
            _agg_vqa,
            prepare=_vocab_context,
        ),
        TaskDef(
            "shapes_pope",
            "POPE-style yes/no object existence, per negative-sampling split",
            _task_is("pope"),
            _extract_yesno,
            _score_pope,
            _agg_pope,
            primary="all.accuracy",
        ),
        TaskDef(
            "shapes_grounding",
            "referring expression -> box; Acc@IoU>=0.5 and mean IoU",
            _task_is("grounding", "ground_ref"),
            _extract_box,
            _score_grounding,
            _agg_grounding,
            primary="acc_iou50",
        ),
        TaskDef(
            "shapes_mcq",
            "multiple choice, answer a letter A-D",
            _task_is("mcq"),
            _extract_letter,
            _score_mcq,
            _agg_mcq,
        ),
        TaskDef(
            "shapes_chair",
            "captions checked against the scene graph: CHAIR for objects and colour-shape pairs",
            lambda s: s.meta.get("task") == "caption" and bool(s.meta.get("scene")),  # the truth is the scene
            _extract_caption,
            _score_caption,
            _agg_caption,
            primary="chair_i",
        ),
    )
}


def primary_value(name: str, metrics: dict) -> float:
    """A task's headline metric (its ``primary`` key path, e.g. ``all.accuracy``) from its metrics."""
    value = metrics
    for key in get_task(name).primary.split("."):
        value = value[key]
    return float(value)


def get_task(name: str) -> TaskDef:
    """A shapes task, a benchmark-file task (`eval.benchmark_tasks`, `eval.hf_tasks`), or the
    task of a named benchmark (`eval.named_benchmarks`: ``vqav2``, ``mmbench``, ...)."""
    from vlmkit.eval.benchmark_tasks import BENCHMARK_TASKS
    from vlmkit.eval.hf_tasks import HF_TASKS
    from vlmkit.eval.named_benchmarks import BENCHMARKS, named_task

    found = TASKS.get(name) or BENCHMARK_TASKS.get(name) or HF_TASKS.get(name)
    if found is None and name in BENCHMARKS:
        found = named_task(name)
    if found is None:
        known = sorted(TASKS) + sorted(BENCHMARK_TASKS) + sorted(HF_TASKS) + sorted(BENCHMARKS)
        raise KeyError(f"unknown task {name!r}; known: {known}")
    return found
