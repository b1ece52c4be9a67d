"""Tasks for the Hugging Face parquet benchmarks (`eval.formats.hf_parquet`), one per metric kind.

A sample is taken when ``meta["benchmark"]`` is set and ``meta["task"]`` is the task's kind, so
the task of a sample is ``"benchmark_" + meta["task"]`` (`task_for_layout` gives it per layout):

  benchmark_vqa        (vqav2, textvqa) the existing task of `eval.benchmark_tasks`: the whole
                       answer, official VQA accuracy over ``meta["answers"]`` (leave-one-out).
                       ``by_category`` is per VQAv2 ``answer_type``; the record's ``extra`` also
                       keeps ``l2_category`` = VQAv2's ``question_type`` (see `vqa_breakdown`).
  benchmark_anls       (docvqa) the whole answer, ANLS (`metrics.anls`, threshold 0.5) against
                       every answer. Metrics: ``anls`` (mean), ``n``, ``by_category`` and
                       ``n_by_category`` per DocVQA question type (a question of several types
                       counts in each; ``none`` when it has none).
  benchmark_relaxed    (chartqa) the whole answer, ChartQA relaxed accuracy (`metrics.relaxed`).
                       Metrics: ``accuracy``, ``by_category`` / ``n_by_category`` per ``type``
                       (``human_test``, ``augmented_test``).
  benchmark_caption    (coco_caption) the whole answer against the reference captions: BLEU-1..4,
                       ROUGE-L, CIDEr-D over the whole set (`metrics.captioning.caption_scores`,
                       tokenizer ``auto``), plus ``n_empty`` (empty predictions, scored as ``""``).
                       An item's ``score`` is its own ROUGE-L F (beta 1.2, pycocoevalcap's
                       ``Rouge.calc_score``) on `python_tokenize`d text: a per-item number for the
                       report and blind comparisons; the set metrics are the ones to quote.
  benchmark_grounding  (refcoco) the first box in the answer (`extract`, kind ``box``); IoU with
                       the target box (`metrics.grounding`). Metrics: ``acc_iou50``, ``mean_iou``,
                       ``n``, ``n_unparsed``; an item's score is 1 when IoU >= 0.5, its IoU is in
                       ``extra["iou"]``.

Aggregators read only the item records the runner writes (``extracted``, ``target``, ``score``,
``extra``), so a resumed run gets the same metrics: what they need beyond that (categories,
reference captions, IoU) the scorers put in ``extra``.
"""

from __future__ import annotations

from collections import defaultdict

from vlmkit.data.sample import Sample
from vlmkit.eval.extract import Extraction, extract
from vlmkit.eval.metrics.anls import ANLS_THRESHOLD, anls_score
from vlmkit.eval.metrics.exact import accuracy_by_type
from vlmkit.eval.metrics.relaxed import relaxed_correct
from vlmkit.eval.tasks import ItemRecord, TaskDef, target_of
from vlmkit.eval.tasks import _agg_grounding, _score_grounding  # RefCOCO scores like the world's grounding

LAYOUT_TASKS = {"vqav2": "benchmark_vqa", "textvqa": "benchmark_vqa", "docvqa": "benchmark_anls",
                "chartqa": "benchmark_relaxed", "coco_caption": "benchmark_caption",
                "refcoco": "benchmark_grounding"}  # fmt: skip


def task_for_layout(layout: str) -> str:
    """The task that scores a layout of `eval.formats.hf_parquet` (``"vqav2"`` -> ``"benchmark_vqa"``)."""
    if layout not in LAYOUT_TASKS:
        raise KeyError(f"unknown layout {layout!r}; known: {sorted(LAYOUT_TASKS)}")
    return LAYOUT_TASKS[layout]


def _kind_is(kind: str):
    return lambda s: bool(s.meta.get("benchmark")) and s.meta.get("task") == kind


def _extract_whole(sample: Sample, prediction: str, ctx: dict) -> Extraction:
    text = prediction.strip()
    return Extraction(text if text else None, "whole_answer" if text else "failed")


def _category(sample: Sample) -> str:
    return str(sample.meta.get("category") or "none")


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _by_categories(rows: list[ItemRecord]) -> tuple[dict, dict]:
    """Mean score and count per category; ``extra["categories"]`` (a list) or ``extra["category"]``."""
    groups: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        extra = r.get("extra") or {}
        cats = extra.get("categories")
        if cats is None:
            cats = [extra.get("category", "none")]
        for c in cats or ["none"]:
            groups[str(c)].append(float(r["score"]))
    keys = sorted(groups)
    return {k: _mean(groups[k]) for k in keys}, {k: len(groups[k]) for k in keys}


def vqa_breakdown(rows: list[ItemRecord]) -> dict:
    """VQA accuracy per answer type and per question type from ``benchmark_vqa`` records of VQAv2
    (their ``extra["category"]`` and ``extra["l2_category"]``): ``{"by_answer_type",
    "n_by_answer_type", "by_question_type", "n_by_question_type"}``."""
    at = accuracy_by_type(((r.get("extra") or {}).get("category", "none"), r["score"]) for r in rows)
    qt = accuracy_by_type(((r.get("extra") or {}).get("l2_category", "none"), r["score"]) for r in rows)
    return {"by_answer_type": at["by_type"], "n_by_answer_type": at["n_by_type"],
            "by_question_type": qt["by_type"], "n_by_question_type": qt["n_by_type"]}  # fmt: skip


# ------------------------------------------------------------------ ANLS (DocVQA)


def _score_anls(sample: Sample, ex: Extraction) -> dict:
    answers = [str(a) for a in sample.meta["answers"]]
    cats = sample.meta.get("category")
    cats = [str(c) for c in cats] if isinstance(cats, list) else ([str(cats)] if cats else [])
    return {"score": anls_score(ex.answer, answers, ANLS_THRESHOLD), "extra": {"categories": cats or ["none"]}}


def _agg_anls(rows: list[ItemRecord]) -> dict:
    by, n_by = _by_categories(rows)
    return {"anls": _mean([float(r["score"]) for r in rows]), "n": len(rows), "by_category": by, "n_by_category": n_by}


# ------------------------------------------------------------------ relaxed accuracy (ChartQA)


def _score_relaxed(sample: Sample, ex: Extraction) -> dict:
    target = target_of(sample) or ""
    return {"score": float(relaxed_correct(ex.answer, target)), "extra": {"category": _category(sample)}}


def _agg_relaxed(rows: list[ItemRecord]) -> dict:
    by, n_by = _by_categories(rows)
    return {"accuracy": _mean([float(r["score"]) for r in rows]), "n": len(rows), "by_category": by,
            "n_by_category": n_by}  # fmt: skip


# ------------------------------------------------------------------ captions (COCO)


def _score_caption(sample: Sample, ex: Extraction) -> dict:
    from pycocoevalcap.rouge.rouge import Rouge

    from vlmkit.eval.metrics.captioning import python_tokenize

    refs = [str(r) for r in sample.meta["answers"]]
    score = Rouge().calc_score([python_tokenize(ex.answer or "")], [python_tokenize(r) for r in refs])
    return {"score": float(score), "extra": {"references": refs}}


def _agg_caption(rows: list[ItemRecord]) -> dict:
    from vlmkit.eval.metrics.captioning import caption_scores

    if not rows:
        return {"bleu_1": 0.0, "bleu_2": 0.0, "bleu_3": 0.0, "bleu_4": 0.0, "rouge_l": 0.0, "cider_d": 0.0,
                "n": 0, "n_empty": 0}  # fmt: skip
    predictions = {r["id"]: r["extracted"] or "" for r in rows}
    references = {r["id"]: list(r["extra"]["references"]) for r in rows}
    out = caption_scores(predictions, references, tokenizer="auto")
    out["n_empty"] = sum(1 for r in rows if not r["extracted"])
    out["mean_item_rouge_l"] = _mean([float(r["score"]) for r in rows])
    return out


# ------------------------------------------------------------------ grounding (RefCOCO)


def _extract_box(sample: Sample, prediction: str, ctx: dict) -> Extraction:
    return extract(prediction, "grounding", kind="box")


HF_TASKS: dict[str, TaskDef] = {
    t.name: t
    for t in (
        TaskDef("benchmark_anls", "document VQA: ANLS against every answer (DocVQA)", _kind_is("anls"),
                _extract_whole, _score_anls, _agg_anls, primary="anls"),
        TaskDef("benchmark_relaxed", "chart QA: relaxed accuracy, numbers within 5% (ChartQA)", _kind_is("relaxed"),
                _extract_whole, _score_relaxed, _agg_relaxed),
        TaskDef("benchmark_caption", "captions: BLEU, ROUGE-L, CIDEr-D over the set (COCO)", _kind_is("caption"),
                _extract_whole, _score_caption, _agg_caption, primary="cider_d"),
        TaskDef("benchmark_grounding", "referring expression -> box: Acc@IoU0.5, mean IoU (RefCOCO)",
                _kind_is("grounding"), _extract_box, _score_grounding, _agg_grounding, primary="acc_iou50"),
    )
}  # fmt: skip
