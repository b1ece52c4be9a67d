"""Tasks for benchmark files read by `eval.formats` (``vlmkit eval --benchmark FILE``).

Samples from a benchmark file carry ``meta["benchmark"]`` (set by `mark_benchmark`), so these
tasks never take the shapes world's rows and the shapes tasks never take theirs. One task per
kind of a VLMEvalKit TSV (``meta["task"]``):

  benchmark_mcq    option letter by `metrics.mcq.extract_option` (a letter near the end, then
                   "answer is X", then a unique option text; never a random fallback).
                   Metrics: ``accuracy``, ``by_category``, ``by_l2_category`` (MMBench fields),
                   ``by_letter``. Single pass: CircularEval needs every rotation of a question
                   (`metrics.mcq.circular_scores` scores those).
  benchmark_yesno  yes/no; the POPE metrics over all items (`metrics.yesno`) and
                   ``by_category`` accuracy; when every category is an MME subtask, also
                   ``mme`` (`metrics.mme`: acc, acc+ per image, Perception and Cognition totals;
                   an image is its ``image_path``, else its bytes).
  benchmark_vqa    the whole answer, VQA accuracy (`metrics.vqa`: official normalisation;
                   leave-one-out over ``meta["answers"]`` when the file gives several, else a
                   match of the single answer after that normalisation), ``by_category``.
  benchmark_mcq_circular
                   MMBench's CircularEval (`circular_expand` makes a k-option question k
                   questions, its options rotated): a question counts only if every rotation
                   is answered right; single-pass accuracy (rotation 0) beside it, both per
                   category and l2-category (`metrics.mcq.circular_scores`).
  pope             POPE's own question files (`formats.pope`): the shapes POPE task's
                   extraction and metrics (accuracy, precision, recall, F1 and yes-ratio from
                   the predictions, per split).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import Counter

from vlmkit.data.sample import Sample
from vlmkit.eval.extract import Extraction, extract
from vlmkit.eval.metrics.exact import accuracy_by_type, exact_match
from vlmkit.eval.metrics.mcq import extract_option
from vlmkit.eval.metrics.vqa import normalize_vqa_answer, vqa_accuracy
from vlmkit.eval.metrics.yesno import yesno_metrics
from vlmkit.eval.tasks import TASKS, ItemRecord, TaskDef, options_of, target_of


def mark_benchmark(samples: list[Sample]) -> list[Sample]:
    return [dataclasses.replace(s, meta={**s.meta, "benchmark": True}) for s in samples]


def circular_expand(samples: list[Sample]) -> list[Sample]:
    """Each multiple-choice sample as its k rotations (``meta["circular"]``: question id and
    rotation; the prompt rebuilt with the rotated options and the answer letter remapped)."""
    from vlmkit.data.sample import Part, Turn
    from vlmkit.eval.formats.vlmevalkit import build_prompt
    from vlmkit.eval.metrics.mcq import circular_variants

    out = []
    for s in samples:
        if s.meta.get("task") != "mcq":
            out.append(s)
            continue
        image_parts = [p for p in s.turns[-1].parts if p.is_image]
        for rotation, (vid, options, letter_of) in enumerate(circular_variants(str(s.id), s.meta["options"])):
            prompt = build_prompt("mcq", s.meta["question"], s.meta.get("hint"), options)
            answer = letter_of[s.meta["answer"]] if s.meta.get("answer") else None
            meta = {**s.meta, "options": options, "answer": answer,
                    "circular": {"question_id": str(s.id), "rotation": rotation}}  # fmt: skip
            out.append(Sample(vid, [Turn("user", [*image_parts, Part(text="\n" + prompt)])], s.images, meta))
    return out


def _kind_is(kind: str):
    return lambda s: bool(s.meta.get("benchmark")) and s.meta.get("task") == kind


def _categories(sample: Sample) -> dict:
    return {"category": str(sample.meta.get("category") or "none"),
            "l2_category": str(sample.meta.get("l2-category") or "none")}  # fmt: skip


def _by(rows: list[ItemRecord], key: str) -> dict:
    return accuracy_by_type((r["extra"].get(key, "none"), r["score"]) for r in rows)["by_type"]


# ------------------------------------------------------------------ multiple choice


def _extract_option(sample: Sample, prediction: str, ctx: dict) -> Extraction:
    # ctx["judge"]: an `eval.option_judge.OptionJudge`, only when one is configured
    letter, method = extract_option(prediction, options_of(sample), judge=ctx.get("judge"))
    return Extraction(letter, method)


def _score_option(sample: Sample, ex: Extraction) -> dict:
    target = (target_of(sample) or "").strip().upper()
    return {"score": float(ex.answer is not None and ex.answer.upper() == target), "extra": _categories(sample)}


def _score_rotation(sample: Sample, ex: Extraction) -> dict:
    scored = _score_option(sample, ex)
    scored["extra"].update(sample.meta["circular"])
    return scored


def _agg_circular(rows: list[ItemRecord]) -> dict:
    from vlmkit.eval.metrics.mcq import circular_scores

    records = [{"question_id": r["extra"]["question_id"], "rotation": r["extra"]["rotation"],
                "prediction": r["extracted"], "answer": r["target"], "method": r["method"],
                "category": r["extra"]["category"], "l2-category": r["extra"]["l2_category"]} for r in rows]  # fmt: skip
    scores = circular_scores(records)
    return {"accuracy": scores["circular_accuracy"], **scores}


def _agg_mcq(rows: list[ItemRecord]) -> dict:
    by_letter = accuracy_by_type(((r["target"] or "").strip().upper(), r["score"]) for r in rows)["by_type"]
    return {"accuracy": sum(r["score"] for r in rows) / len(rows) if rows else 0.0,
            "by_category": _by(rows, "category"), "by_l2_category": _by(rows, "l2_category"),
            "by_letter": by_letter}  # fmt: skip


# ------------------------------------------------------------------ yes/no


def _extract_yesno(sample: Sample, prediction: str, ctx: dict) -> Extraction:
    return extract(prediction, "yesno", kind="yesno")


def _image_key(sample: Sample) -> str:
    path = sample.meta.get("image_path")
    if path:
        return str(path)
    ref = sample.images[0] if sample.images else None
    data = ref.data if ref is not None and ref.data is not None else repr(ref).encode()
    return hashlib.sha1(data).hexdigest()


def _score_yesno(sample: Sample, ex: Extraction) -> dict:
    extra = {**_categories(sample), "image": _image_key(sample)}
    return {"score": float(exact_match(ex.answer, target_of(sample))), "extra": extra}


def _agg_yesno(rows: list[ItemRecord]) -> dict:
    from vlmkit.eval.metrics.mme import SUBTASKS, mme_scores

    metrics = yesno_metrics([r["extracted"] for r in rows], [(r["target"] or "").lower() for r in rows])
    out = {**metrics, "by_category": _by(rows, "category")}
    if rows and all(r["extra"]["category"] in SUBTASKS for r in rows):  # an MME file
        records = [(r["extra"]["category"], r["extra"]["image"], r["prediction"], r["target"]) for r in rows]
        out["mme"] = mme_scores(records, questions_per_image=None)
    return out


# ------------------------------------------------------------------ open answers


def _extract_whole(sample: Sample, prediction: str, ctx: dict) -> Extraction:
    text = prediction.strip()
    return Extraction(text if text else None, "whole_answer" if text else "failed")


def _score_vqa(sample: Sample, ex: Extraction) -> dict:
    answers = sample.meta.get("answers")
    if isinstance(answers, list) and len(answers) > 1:
        score = vqa_accuracy(ex.answer, [str(a) for a in answers])
    else:
        target = target_of(sample)
        score = float(ex.answer is not None and target is not None
                      and normalize_vqa_answer(ex.answer) == normalize_vqa_answer(target))  # fmt: skip
    return {"score": score, "extra": _categories(sample)}


def _agg_vqa(rows: list[ItemRecord]) -> dict:
    return {"accuracy": sum(r["score"] for r in rows) / len(rows) if rows else 0.0,
            "by_category": _by(rows, "category"),  # VQAv2: the answer type
            "by_l2_category": _by(rows, "l2_category"),  # VQAv2: the question type
            "n_by_category": dict(sorted(Counter(r["extra"].get("category", "none") for r in rows).items()))}  # fmt: skip


BENCHMARK_TASKS: dict[str, TaskDef] = {
    t.name: t
    for t in (
        TaskDef("benchmark_mcq", "a benchmark's multiple-choice questions (option letter)",
                lambda s: _kind_is("mcq")(s) and "circular" not in s.meta, _extract_option, _score_option, _agg_mcq),
        TaskDef("benchmark_mcq_circular", "multiple choice under CircularEval (every rotation right)",
                lambda s: _kind_is("mcq")(s) and "circular" in s.meta, _extract_option, _score_rotation,
                _agg_circular),
        TaskDef("benchmark_yesno", "a benchmark's yes/no questions", _kind_is("yesno"), _extract_yesno,
                _score_yesno, _agg_yesno),
        TaskDef("benchmark_vqa", "a benchmark's open questions (VQA accuracy)", _kind_is("vqa"), _extract_whole,
                _score_vqa, _agg_vqa),
        dataclasses.replace(TASKS["shapes_pope"], name="pope", description="POPE question files, per split",
                            accepts=_kind_is("pope")),
    )
}  # fmt: skip
