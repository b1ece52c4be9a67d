"""Option-order sensitivity: the world's multiple-choice rows, single pass and under CircularEval.

MMBench's CircularEval (Liu et al. 2023; `metrics.mcq`): a question with k options is asked k
times, its options rotated (rotation i puts the original option at position p at (p - i) mod k,
`metrics.mcq.circular_variants`), and it counts only if every rotation is answered right. The
world's MCQ rows (``task=mcq``, ``meta["options"]`` a list, answer a letter) are rebuilt with the
rotated options exactly the way the world writes them (`mcq_prompt`: the question, one
``"L. text"`` line per option, then "Answer with the letter."); rotation 0 is the row as written,
so the single-pass accuracy is the plain evaluation's ``shapes_mcq`` accuracy. Every rotation is
scored by the ``shapes_mcq`` task in one `run_evaluation` run (``out_dir/rotations``).

Reported: single-pass and circular accuracy and their difference, per MCQ type too, accuracy per
rotation, and the letter bias: the share of each predicted letter (``none`` for a failed
extraction) and of each target letter, in the single pass and over all rotations. A model that
always answers "A" scores the share of A-targets single-pass and 0 circular (every rotation
moves the answer to another letter).
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from pathlib import Path

from vlmkit.data.sample import Sample
from vlmkit.data.worlds.shapes import MCQ_SUFFIX
from vlmkit.eval.metrics.mcq import circular_scores, circular_variants
from vlmkit.eval.suites import ask, item_rows, read_test, resolve_predictor, share
from vlmkit.eval.tasks import prompt_text

RESULTS_FILE = "option_order.json"
TASK = "shapes_mcq"
LETTERS = "ABCDEFGH"
_OPTION_LINE = re.compile(r"^[A-H]\. ")


def mcq_prompt(question: str, options: list[str]) -> str:
    """A multiple-choice prompt as the world writes it (`shapes.mcq_question`)."""
    return question + "\n" + "\n".join(f"{LETTERS[i]}. {v}" for i, v in enumerate(options)) + "\n" + MCQ_SUFFIX


def split_mcq(sample: Sample) -> tuple[str, list[str]] | None:
    """(question, options) of a world MCQ row, or None when its prompt is not the world's
    layout (the rebuilt rotation 0 must equal the prompt as written)."""
    options = sample.meta.get("options")
    if not isinstance(options, list) or not 2 <= len(options) <= len(LETTERS):
        return None
    text = prompt_text(sample)
    lines = text.split("\n")
    first = next((k for k, line in enumerate(lines) if _OPTION_LINE.match(line)), None)
    if not first:
        return None
    question = "\n".join(lines[:first])
    options = [str(o) for o in options]
    return (question, options) if mcq_prompt(question, options) == text else None


def rotated_samples(samples: list[Sample], limit: int | None = None) -> tuple[list[Sample], int]:
    """Every rotation of every world MCQ row (the first ``limit`` questions), ids ``<id>@<i>``,
    ``meta["circular"] = {"question_id", "rotation"}``, the answer letter moved with its option;
    and the number of MCQ rows left out because their prompt could not be rebuilt."""
    out: list[Sample] = []
    skipped = n = 0
    for s in samples:
        if s.meta.get("task") != "mcq":
            continue
        parts = split_mcq(s)
        answer = str(s.meta.get("answer") or "").strip().upper()
        if parts is None or answer not in LETTERS[: len(parts[1])]:
            skipped += 1
            continue
        if limit is not None and n >= limit:
            continue
        n += 1
        question, options = parts
        for rotation, (vid, rotated, letter_of) in enumerate(circular_variants(str(s.id), dict(zip(LETTERS, options)))):
            texts = list(rotated.values())
            meta = {**s.meta, "options": texts, "answer": letter_of[answer],
                    "circular": {"question_id": str(s.id), "rotation": rotation}}  # fmt: skip
            out.append(ask(s, mcq_prompt(question, texts), letter_of[answer], meta, sid=vid))
    return out, skipped


def _ratio(values: list[str]) -> dict[str, float]:
    counts = Counter(values)
    return {k: share(v, len(values)) for k, v in sorted(counts.items())}


def _letters(rows: list[dict]) -> dict:
    preds = [r["extracted"].upper() if r["extracted"] else "none" for r in rows]
    targets = [(r["target"] or "").strip().upper() for r in rows]
    by_letter: dict[str, list[float]] = defaultdict(list)
    for r, t in zip(rows, targets):
        by_letter[t].append(float(r["score"]))
    return {"n": len(rows), "accuracy": share(sum(float(r["score"]) for r in rows), len(rows)),
            "pred_letter_ratio": _ratio(preds), "target_letter_ratio": _ratio(targets),
            "by_letter": {k: share(sum(v), len(v)) for k, v in sorted(by_letter.items())}}  # fmt: skip


def option_order_suite(predictor, samples: list[Sample], out_dir: str | Path, batch_size: int = 32,
                       limit: int | None = None, info: dict | None = None) -> dict:  # fmt: skip
    """Ask every rotation of the MCQ rows of ``samples``; write the table (returned) to
    ``out_dir/option_order.json``::

        {"n_questions", "n_rotations", "single_pass_accuracy", "circular_accuracy", "drop",
         "by_type": {mcq type: {"n", "single_pass_accuracy", "circular_accuracy", "drop"}},
         "by_rotation": [accuracy of rotation i],
         "single_pass": {"n", "accuracy", "pred_letter_ratio", "target_letter_ratio", "by_letter"},
         "all_rotations": {the same over every rotation}, "extraction": {method: count},
         "skipped": MCQ rows not in the world's layout, "config": {"limit"}, "model": {...},
         "run": "rotations"}
    """
    from vlmkit.eval.runner import run_evaluation
    from vlmkit.utils.io import atomic_write_json

    out = Path(out_dir)
    rotations, skipped = rotated_samples(samples, limit)
    if not rotations:
        raise ValueError("option-order suite: no multiple-choice row (task=mcq with options) in the data")
    run_info = {"model": (info or {}).get("model", {})}
    run_evaluation(predictor, rotations, out / "rotations", tasks=[TASK], batch_size=batch_size, info=run_info)
    by_id = {r["id"]: r for r in item_rows(out / "rotations")}
    rows = [by_id[s.id] for s in rotations]
    circ = [s.meta["circular"] for s in rotations]
    records = [{"question_id": c["question_id"], "rotation": c["rotation"], "prediction": r["extracted"],
                "answer": r["target"], "method": r["method"], "category": r["question_type"]}
               for c, r in zip(circ, rows)]  # fmt: skip
    scores = circular_scores(records)
    k_max = max(c["rotation"] for c in circ) + 1
    by_rotation = [_letters([r for c, r in zip(circ, rows) if c["rotation"] == i])["accuracy"] for i in range(k_max)]
    table = {
        "n_questions": scores["n_questions"],
        "n_rotations": scores["n_records"],
        "single_pass_accuracy": scores["single_pass_accuracy"],
        "circular_accuracy": scores["circular_accuracy"],
        "drop": scores["single_pass_accuracy"] - scores["circular_accuracy"],
        "by_type": {qt: {**v, "drop": v["single_pass_accuracy"] - v["circular_accuracy"]}
                    for qt, v in scores["by_category"].items()},  # fmt: skip
        "by_rotation": by_rotation,
        "single_pass": _letters([r for c, r in zip(circ, rows) if c["rotation"] == 0]),
        "all_rotations": _letters(rows),
        "extraction": scores["extraction"],
        "skipped": skipped,
        "config": {"limit": limit},
        "model": run_info["model"],
        "run": "rotations",
    }
    atomic_write_json(out / RESULTS_FILE, table)
    return table


def evaluate_option_order(model, data_dir: str | Path, out_dir: str | Path, batch_size: int = 32,
                          limit: int | None = None, max_new_tokens: int | None = None,
                          model_info: dict | None = None) -> dict:  # fmt: skip
    """The suite on the world in ``data_dir``; ``model`` is a predictor or a vlmkit checkpoint.
    ``limit`` keeps the first N questions (each asked in all its rotations). Writes
    ``out_dir/option_order.json``; returns the table."""
    predictor, described = resolve_predictor(model, data_dir, max_new_tokens)
    return option_order_suite(predictor, read_test(data_dir), out_dir, batch_size=batch_size, limit=limit,
                              info={"model": model_info or described})  # fmt: skip
