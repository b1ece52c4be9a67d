"""Score saved predictions against a benchmark's own ground-truth file, without a model.

``vlmkit score TASK PREDICTIONS.jsonl --references FILE [--out DIR]`` (and the Python API
`score_predictions`) recomputes a benchmark's metrics from predictions saved earlier, by vlmkit
or by another toolkit, so that results can be recomputed and compared. See ``docs/score.md``.

Predictions: JSON lines, one ``{"id": ..., "prediction": "..."}`` per line. Ids are compared as
strings (``1`` and ``"1"`` are the same id). A line that is not JSON, not an object, lacks ``id``
or ``prediction``, has an id that is not a non-empty string or an integer, or a prediction that
is not a string is *bad*: it is named (file and line) in a warning, counted in
``n_bad_prediction_lines`` and skipped. More than ``max_bad_fraction`` bad lines (default 0.5),
or no good line at all, is an error. A repeated id is an error.

Tasks and their references (the benchmark's own file):

* ``pope``: a POPE question file (JSON lines ``question_id``, ``image``, ``text``, ``label``), read
  with `vlmkit.eval.formats.pope.read_pope`; ids are the ``question_id``. The answer is extracted
  with ``extract(prediction, None, kind="yesno")`` and scored with `yesno_metrics`; the metrics
  are given under the split named by the file name (``random``/``popular``/``adversarial``, or
  ``split=``) and under ``all``; a file whose name names no split gets ``all`` only.
* ``coco_caption``: COCO captions JSON (``{"annotations": [{"image_id", "caption"}], ...}``); ids
  are the ``image_id``s that have at least one caption; `caption_scores` (BLEU-1..4, ROUGE-L,
  CIDEr-D).
* ``vqav2``: VQAv2 annotations (``{"annotations": [{"question_id", "answers": [{"answer"}],
  "answer_type", "question_type"}]}``); `vqa_scores` on the raw prediction (the official script
  normalises it; no extraction), without the per-question list.
* ``textvqa``: TextVQA (``{"data": [{"question_id", "answers": [str, ...]}]}``); `vqa_scores`.

A prediction whose id is not in the references is an error (a few are named). A reference with
no prediction is *missing*: counted in ``n_missing`` and scored as wrong (POPE: an unparsed
answer, counted in ``n_unparsed`` too and as ``"missing"`` in ``extraction``; VQA: accuracy 0;
captions: the empty caption).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from collections import Counter
from pathlib import Path
from typing import Any

log = logging.getLogger("vlmkit.eval.score")

TASKS = ("pope", "coco_caption", "vqav2", "textvqa")
MAX_BAD_FRACTION = 0.5
MAX_NAMED = 5  # ids / lines named in an error message
MAX_LISTED_BAD = 20  # bad prediction lines listed in the results


class ScoreError(ValueError):
    """The predictions or the references can't be scored (the message says why and where)."""


# ------------------------------------------------------------------ files


def file_info(path: str | Path) -> dict:
    """``{"path", "size", "sha256"}`` of a file (the path as given, resolved to absolute)."""
    path = Path(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return {"path": str(path.resolve()), "size": path.stat().st_size, "sha256": h.hexdigest()}


def _valid_id(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, str) and value.strip() != ""


def read_predictions(
    path: str | Path, max_bad_fraction: float = MAX_BAD_FRACTION
) -> tuple[dict[str, str], list[tuple[int, str]]]:
    """``({id: prediction}, [(line number, reason), ...])`` of a predictions JSONL file.

    Bad lines are skipped and returned; blank lines are ignored. Raises `ScoreError` on a
    repeated id, when there is no good line, or when the bad lines are more than
    ``max_bad_fraction`` of the non-blank lines.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise ScoreError(f"{path}: not UTF-8 text ({err})") from None
    preds: dict[str, str] = {}
    first_line: dict[str, int] = {}
    bad: list[tuple[int, str]] = []
    n_lines = 0
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        n_lines += 1
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            bad.append((n, f"not valid JSON ({err.msg})"))
            continue
        if not isinstance(row, dict):
            bad.append((n, f"a {type(row).__name__}, not an object"))
            continue
        missing = [k for k in ("id", "prediction") if k not in row]
        if missing:
            bad.append((n, f"no {', '.join(missing)}"))
            continue
        if not _valid_id(row["id"]):
            bad.append((n, f"id must be an integer or a non-empty string, got {row['id']!r}"))
            continue
        if not isinstance(row["prediction"], str):
            bad.append((n, f"prediction must be a string, got {type(row['prediction']).__name__}"))
            continue
        pid = str(row["id"]).strip()
        if pid in preds:
            raise ScoreError(f"{path}:line {n}: duplicate id {pid!r} (first on line {first_line[pid]})")
        preds[pid] = row["prediction"]
        first_line[pid] = n
    for n, reason in bad[:MAX_LISTED_BAD]:
        log.warning("bad prediction line %s:line %d: %s", path, n, reason)
    if len(bad) > MAX_LISTED_BAD:
        log.warning("... and %d more bad prediction lines in %s", len(bad) - MAX_LISTED_BAD, path)
    if not preds:
        what = f"all {n_lines} lines are bad (first: line {bad[0][0]}: {bad[0][1]})" if bad else "it is empty"
        raise ScoreError(f"{path}: no usable prediction: {what}")
    if bad and len(bad) > max_bad_fraction * n_lines:
        raise ScoreError(
            f"{path}: {len(bad)} of {n_lines} lines are bad (more than {max_bad_fraction:.0%}); "
            f"first: line {bad[0][0]}: {bad[0][1]}"
        )
    return preds, bad


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ScoreError(f"{path}: not a JSON file ({err})") from None


def _records(path: Path, key: str, fields: tuple[str, ...]) -> list[dict]:
    data = _load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise ScoreError(f"{path}: expected a JSON object with a {key!r} list")
    out = []
    for i, rec in enumerate(data[key]):
        if not isinstance(rec, dict):
            raise ScoreError(f"{path}: {key}[{i}] is a {type(rec).__name__}, not an object")
        missing = [f for f in fields if f not in rec]
        if missing:
            raise ScoreError(f"{path}: {key}[{i}] has no {', '.join(missing)}")
        out.append(rec)
    if not out:
        raise ScoreError(f"{path}: the {key!r} list is empty")
    return out


# ------------------------------------------------------------------ references per task


def _pope_refs(path: Path, split: str | None) -> tuple[dict[str, str], str | None]:
    """``({question id: label}, split or None)``."""
    from vlmkit.data.bad_samples import BadSampleError
    from vlmkit.data.formats.llava import DatasetFormatError
    from vlmkit.eval.formats.pope import SPLITS, pope_split_of, read_pope

    try:
        split = pope_split_of(path, split)
    except ValueError:
        if split is not None:  # an unknown split given explicitly
            raise
        split = None
    try:
        # read_pope needs a split; with none named the placeholder is read and never reported
        samples = read_pope(path, split=split or SPLITS[0])
    except (BadSampleError, DatasetFormatError) as err:
        raise ScoreError(f"bad POPE reference file: {err}") from None
    if not samples:
        raise ScoreError(f"{path}: no POPE questions")
    return {s.id: s.meta["answer"] for s in samples}, split


def _caption_refs(path: Path) -> dict[str, list[str]]:
    refs: dict[str, list[str]] = {}
    for i, rec in enumerate(_records(path, "annotations", ("image_id", "caption"))):
        if not _valid_id(rec["image_id"]) or not isinstance(rec["caption"], str):
            raise ScoreError(f"{path}: annotations[{i}] needs an integer/string image_id and a string caption")
        refs.setdefault(str(rec["image_id"]).strip(), []).append(rec["caption"])
    return refs


def _vqa_refs(path: Path, task: str) -> dict[str, dict]:
    """``{question id: {"answers": [str], "answer_type"?, "question_type"?}}``."""
    key = "data" if task == "textvqa" else "annotations"
    refs: dict[str, dict] = {}
    for i, rec in enumerate(_records(path, key, ("question_id", "answers"))):
        where = f"{path}: {key}[{i}]"
        if not _valid_id(rec["question_id"]):
            raise ScoreError(f"{where}: question_id must be an integer or a non-empty string")
        raw = rec["answers"]
        if not isinstance(raw, list) or not raw:
            raise ScoreError(f"{where}: answers must be a non-empty list")
        answers = []
        for a in raw:
            a = a.get("answer") if isinstance(a, dict) else a
            if not isinstance(a, str):
                raise ScoreError(f"{where}: every answer must be a string (or an object with an 'answer' string)")
            answers.append(a)
        qid = str(rec["question_id"]).strip()
        if qid in refs:
            raise ScoreError(f"{where}: duplicate question_id {qid!r}")
        item: dict[str, Any] = {"answers": answers}
        for t in ("answer_type", "question_type"):
            if rec.get(t) is not None:
                item[t] = rec[t]
        refs[qid] = item
    return refs


# ------------------------------------------------------------------ scoring


def _check_ids(preds: dict[str, str], ref_ids: list[str], references_path: Path) -> list[str]:
    """The reference ids without a prediction; raises on predictions with unknown ids."""
    known = set(ref_ids)
    unknown = [k for k in preds if k not in known]
    if unknown:
        raise ScoreError(
            f"{len(unknown)} prediction id(s) are not in the references {references_path} "
            f"(e.g. {unknown[:MAX_NAMED]!r}); are these predictions for another file or split?"
        )
    return [k for k in ref_ids if k not in preds]


def score_predictions(
    task: str,
    predictions_path: str | Path,
    references_path: str | Path,
    *,
    split: str | None = None,
    tokenizer: str = "auto",
    max_bad_fraction: float = MAX_BAD_FRACTION,
) -> dict:
    """Score a predictions JSONL file for ``task`` against its references; returns the results dict.

    ``split`` (POPE only) overrides the split named by the references' file name; ``tokenizer``
    (coco_caption only) is passed to `caption_scores`. Raises `ScoreError` (a ValueError) for
    unusable input; the rules are in the module docstring and ``docs/score.md``.
    """
    if task not in TASKS:
        raise ScoreError(f"unknown task {task!r}; expected one of {TASKS}")
    predictions_path, references_path = Path(predictions_path), Path(references_path)
    for p in (predictions_path, references_path):
        if not p.is_file():
            raise ScoreError(f"no such file: {p}")
    preds, bad = read_predictions(predictions_path, max_bad_fraction)
    extraction: dict[str, int] | None = None
    notes: dict[str, Any] = {}

    if task == "pope":
        from vlmkit.eval.extract import extract
        from vlmkit.eval.metrics.yesno import yesno_metrics

        labels, found_split = _pope_refs(references_path, split)
        ids = list(labels)
        missing = _check_ids(preds, ids, references_path)
        answers, methods = [], Counter()
        for k in ids:
            if k in preds:
                ex = extract(preds[k], None, kind="yesno")
                answers.append(ex.answer)
                methods[ex.method] += 1
            else:
                answers.append(None)
                methods["missing"] += 1
        m = yesno_metrics(answers, [labels[k] for k in ids])
        metrics = {found_split: m, "all": m} if found_split else {"all": m}
        extraction = dict(sorted(methods.items()))
        notes["split"] = found_split
    elif task == "coco_caption":
        from vlmkit.eval.metrics.captioning import caption_scores

        refs = _caption_refs(references_path)
        ids = list(refs)
        missing = _check_ids(preds, ids, references_path)
        metrics = caption_scores({k: preds.get(k, "") for k in ids}, refs, tokenizer=tokenizer)
    else:
        from vlmkit.eval.metrics.vqa import vqa_scores

        refs = _vqa_refs(references_path, task)
        ids = list(refs)
        missing = _check_ids(preds, ids, references_path)
        metrics = vqa_scores({**refs[k], "prediction": preds.get(k)} for k in ids)
        metrics.pop("per_question", None)

    if missing:
        log.warning("%d of %d references have no prediction (scored as wrong), e.g. %s",
                    len(missing), len(ids), missing[:MAX_NAMED])
    task_entry: dict[str, Any] = {"n": len(ids), "metrics": metrics}
    if extraction is not None:
        task_entry["extraction"] = extraction
    results: dict[str, Any] = {
        "task": task,
        "metrics": metrics,
        "n": len(ids),
        "n_predicted": len(ids) - len(missing),
        "n_missing": len(missing),
        "missing_ids": missing[:MAX_LISTED_BAD],
        "n_bad_prediction_lines": len(bad),
        "bad_prediction_lines": [{"line": n, "reason": r} for n, r in bad[:MAX_LISTED_BAD]],
        **({"extraction": extraction} if extraction is not None else {}),
        **notes,
        "references": file_info(references_path),
        "predictions": file_info(predictions_path),
        # the shape of an evaluation's results.json (docs/evaluation.md), so its readers work too
        "tasks": {task: task_entry},
        "blind": {},
        "config": {"task": task, "split": split, "tokenizer": tokenizer, "max_bad_fraction": max_bad_fraction},
    }
    return results


# ------------------------------------------------------------------ command line


def _cmd_score(args: argparse.Namespace) -> int:
    from vlmkit.utils.io import atomic_write_json

    try:
        results = score_predictions(
            args.task,
            args.predictions,
            args.references,
            split=args.split,
            tokenizer=args.tokenizer,
            max_bad_fraction=args.max_bad_fraction,
        )
    except (ScoreError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.out:
        out = Path(args.out) / "results.json"
        atomic_write_json(out, results)
        log.info("wrote %s", out)
    print(json.dumps(results, ensure_ascii=False))
    return 0


def add_score_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``score`` subcommand to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    p = subparsers.add_parser(
        "score",
        help="score saved predictions against a benchmark's ground truth, without a model",
        description="Score a predictions JSONL file ({\"id\", \"prediction\"} per line) against the "
        "benchmark's own reference file; print the results JSON (see docs/score.md).",
    )
    p.add_argument("task", choices=TASKS)
    p.add_argument("predictions", help="PREDICTIONS.jsonl: one {\"id\": ..., \"prediction\": \"...\"} per line")
    p.add_argument("--references", required=True,
                   help="the benchmark's ground-truth file (POPE question file, COCO captions JSON, "
                   "VQAv2 annotations JSON, TextVQA JSON)")
    p.add_argument("--out", default=None, metavar="DIR", help="also write DIR/results.json (atomically)")
    p.add_argument("--split", default=None, choices=["random", "popular", "adversarial"],
                   help="pope: the split (default: the word in the references' file name)")
    p.add_argument("--tokenizer", default="auto", choices=["auto", "ptb", "python"],
                   help="coco_caption: caption tokenizer (default auto: PTB when java is found)")
    p.add_argument("--max-bad-fraction", type=float, default=MAX_BAD_FRACTION,
                   help=f"fail when more than this fraction of prediction lines is bad (default {MAX_BAD_FRACTION})")
    p.set_defaults(func=_cmd_score)
    return p


__all__ = ["TASKS", "ScoreError", "add_score_parser", "file_info", "read_predictions", "score_predictions"]
