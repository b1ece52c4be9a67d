"""Prompt paraphrase sensitivity: the world's questions asked in several phrasings.

The world asks each question type in one phrasing (a regular language for a tiny LM). This suite
reads that phrasing back (`parse_question`: the slots, e.g. the shape of "What color is the
circle?") and asks the same question, about the same image and with the same answer, in
`N_TEMPLATES` phrasings (`TEMPLATES`); template 0 is always the world's own, so its accuracy is
the plain evaluation's. The world's VQA and POPE prompts carry no answer-format instruction, so
none is added: every phrasing asks for the same short answer, and each item is extracted and
scored by its task as usual (``shapes_vqa`` by question type, ``shapes_pope`` yes/no).

Reported: accuracy per template (over all questions, per question type and per task), its
minimum, maximum, mean and spread (max - min), and the *consistency*: the share of questions
whose extracted answer is the same under every template (a failed extraction counts as no
answer, so a question with one is never consistent). ``consistent_and_correct`` is the share
answered right under every template.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Sequence

from vlmkit.data.sample import Sample
from vlmkit.eval.suites import ask, item_rows, read_test, resolve_predictor, share
from vlmkit.eval.tasks import prompt_text

RESULTS_FILE = "paraphrase.json"
TASKS = ("shapes_vqa", "shapes_pope")

# question type -> phrasings; slots: {shape}, {color}, {plural}, {a}, {b}, {art} (a / an)
TEMPLATES: dict[str, tuple[str, ...]] = {
    "color": (
        "What color is the {shape}?",
        "Which colour does the {shape} have?",
        "Tell me the {shape}'s color.",
        "The {shape} is what color?",
        "What is the color of the {shape}?",
    ),
    "shape": (
        "What shape is the {color} object?",
        "Which shape does the {color} object have?",
        "Tell me the shape of the {color} object.",
        "The {color} object is what shape?",
        "What kind of shape is the {color} object?",
    ),
    "count_total": (
        "How many objects are there?",
        "How many shapes are in the image?",
        "Count the objects in the image.",
        "What is the number of objects?",
        "The image contains how many objects?",
    ),
    "count_color": (
        "How many {color} objects are there?",
        "How many objects are {color}?",
        "Count the {color} objects.",
        "What is the number of {color} objects?",
        "The image contains how many {color} objects?",
    ),
    "count_shape": (
        "How many {plural} are there?",
        "How many {plural} does the image contain?",
        "Count the {plural} in the image.",
        "What is the number of {plural}?",
        "The image contains how many {plural}?",
    ),
    "spatial": (
        "Where is the {a} relative to the {b}?",
        "Where is the {a} compared to the {b}?",
        "Relative to the {b}, where is the {a}?",
        "What is the position of the {a} relative to the {b}?",
        "Where is the {a} with respect to the {b}?",
    ),
    "reading": (
        "What word is written in the image?",
        "Which word is written in the image?",
        "Read the word in the image.",
        "What does the text in the image say?",
        "What is the word in the image?",
    ),
    "exists": (
        "Is there {art} {color} {shape} in the image?",
        "Does the image contain {art} {color} {shape}?",
        "Can you see {art} {color} {shape} in the image?",
        "Is {art} {color} {shape} present in the image?",
        "Is there {art} {color} {shape} anywhere in the picture?",
    ),
}
N_TEMPLATES = len(TEMPLATES["color"])
assert all(len(t) == N_TEMPLATES for t in TEMPLATES.values())
QUESTION_TYPES: tuple[str, ...] = tuple(TEMPLATES)

_SLOT = {"shape": r"(?P<shape>[a-z]+)", "color": r"(?P<color>[a-z]+)", "plural": r"(?P<plural>[a-z]+)",
         "a": r"(?P<a>[a-z]+ [a-z]+)", "b": r"(?P<b>[a-z]+ [a-z]+)", "art": r"(?P<art>an?)"}  # fmt: skip


def _pattern(template: str) -> re.Pattern:
    out, pos = [], 0
    for m in re.finditer(r"\{(\w+)\}", template):
        out += [re.escape(template[pos : m.start()]), _SLOT[m.group(1)]]
        pos = m.end()
    out.append(re.escape(template[pos:]))
    return re.compile("".join(out))


_PARSERS = {qt: _pattern(t[0]) for qt, t in TEMPLATES.items()}


def parse_question(question_type: str, question: str) -> dict[str, str] | None:
    """The slots of a question written in the world's phrasing (template 0), or None."""
    pattern = _PARSERS.get(question_type)
    m = pattern.fullmatch(question.strip()) if pattern else None
    return m.groupdict() if m else None


def paraphrase(question_type: str, slots: dict[str, str], template: int) -> str:
    return TEMPLATES[question_type][template].format(**slots)


def _task(sample: Sample) -> str | None:
    return {"vqa": "shapes_vqa", "pope": "shapes_pope"}.get(str(sample.meta.get("task")))


def paraphrase_items(samples: list[Sample], question_types: Sequence[str] = QUESTION_TYPES,
                     limit: int | None = None) -> tuple[list[tuple[Sample, dict]], dict]:  # fmt: skip
    """(row, slots) of every VQA / POPE row of the chosen question types whose question parses
    (``limit``: the first N of each type), and ``{type: count}`` of the rows that did not."""
    bad = [q for q in question_types if q not in TEMPLATES]
    if bad:
        raise ValueError(f"no paraphrases for question type(s) {bad}; known: {QUESTION_TYPES}")
    kept: dict[str, list] = defaultdict(list)
    unparsed: dict[str, int] = defaultdict(int)
    for s in samples:
        qt = str(s.meta.get("question_type"))
        if _task(s) is None or qt not in question_types or s.meta.get("answer") is None:
            continue
        slots = parse_question(qt, prompt_text(s))
        if slots is None:
            unparsed[qt] += 1
        elif limit is None or len(kept[qt]) < limit:
            kept[qt].append((s, slots))
    order = {id(s): i for i, s in enumerate(samples)}
    items = sorted((x for v in kept.values() for x in v), key=lambda x: order[id(x[0])])
    return items, dict(sorted(unparsed.items()))


def paraphrased_samples(items: list[tuple[Sample, dict]], template: int) -> list[Sample]:
    """Every item asked with ``template`` (same id, image and answer; ``meta["paraphrase"]``)."""
    out = []
    for s, slots in items:
        qt = str(s.meta["question_type"])
        meta = {**s.meta, "paraphrase": {"template": template}}
        out.append(ask(s, paraphrase(qt, slots, template), str(s.meta["answer"]), meta))
    return out


def _spread(values: list[float]) -> dict:
    return {"min": min(values), "max": max(values), "mean": sum(values) / len(values),
            "spread": max(values) - min(values)}  # fmt: skip


def _consistency(answers: list[list]) -> float:
    return share(sum(1 for a in answers if a[0] is not None and all(x == a[0] for x in a)), len(answers))


def paraphrase_suite(predictor, samples: list[Sample], out_dir: str | Path,
                     question_types: Sequence[str] = QUESTION_TYPES, batch_size: int = 32,
                     limit: int | None = None, info: dict | None = None) -> dict:  # fmt: skip
    """Ask the VQA and POPE rows of ``samples`` in every phrasing (``out_dir/template-<t>``, one
    `run_evaluation` run each) and write the table (returned) to ``out_dir/paraphrase.json``::

        {"n_questions", "n_templates", "accuracy_min", "accuracy_max", "accuracy_mean", "spread",
         "consistency", "consistent_and_correct",
         "by_template": [{"template", "accuracy", "by_type": {qt: acc}, "by_task": {task: acc}}],
         "by_type": {qt: {"n", "accuracy": [per template], "min", "max", "mean", "spread",
                          "consistency", "consistent_and_correct"}},
         "templates": {qt: [phrasings]}, "unparsed": {qt: count},
         "config": {"question_types", "limit"}, "model": {...}, "runs": ["template-0", ...]}
    """
    from vlmkit.eval.runner import run_evaluation
    from vlmkit.utils.io import atomic_write_json

    out = Path(out_dir)
    items, unparsed = paraphrase_items(samples, question_types, limit)
    if not items:
        raise ValueError("paraphrase suite: no VQA or POPE row of the chosen types in the data")
    run_info = {"model": (info or {}).get("model", {})}
    runs = [f"template-{t}" for t in range(N_TEMPLATES)]
    records: list[dict[str, dict]] = []
    for t, name in enumerate(runs):
        asked = paraphrased_samples(items, t)
        tasks = [n for n in TASKS if any(_task(s) == n for s in asked)]
        run_evaluation(predictor, asked, out / name, tasks=tasks, batch_size=batch_size, info=run_info)
        records.append({r["id"]: r for r in item_rows(out / name)})
    ids = [s.id for s, _ in items]
    task_of = {s.id: _task(s) for s, _ in items}
    type_of = {s.id: str(s.meta["question_type"]) for s, _ in items}

    def accuracy(t: int, keep) -> float:
        chosen = [i for i in ids if keep(i)]
        return share(sum(records[t][i]["score"] for i in chosen), len(chosen))

    types = sorted(set(type_of.values()), key=QUESTION_TYPES.index)
    by_template = [{"template": t, "accuracy": accuracy(t, lambda i: True),
                    "by_type": {qt: accuracy(t, lambda i, qt=qt: type_of[i] == qt) for qt in types},
                    "by_task": {n: accuracy(t, lambda i, n=n: task_of[i] == n)
                                for n in TASKS if n in task_of.values()}}
                   for t in range(N_TEMPLATES)]  # fmt: skip

    def answers(keep) -> list[list]:
        return [[records[t][i]["extracted"] for t in range(N_TEMPLATES)] for i in ids if keep(i)]

    def all_right(keep) -> float:
        chosen = [i for i in ids if keep(i)]
        return share(sum(all(records[t][i]["score"] >= 1.0 for t in range(N_TEMPLATES)) for i in chosen), len(chosen))

    overall = _spread([b["accuracy"] for b in by_template])
    table = {
        "n_questions": len(ids),
        "n_templates": N_TEMPLATES,
        "accuracy_min": overall["min"],
        "accuracy_max": overall["max"],
        "accuracy_mean": overall["mean"],
        "spread": overall["spread"],
        "consistency": _consistency(answers(lambda i: True)),
        "consistent_and_correct": all_right(lambda i: True),
        "by_template": by_template,
        "by_type": {},
    }
    for qt in types:
        keep = lambda i, qt=qt: type_of[i] == qt  # noqa: E731
        table["by_type"][qt] = {"n": sum(1 for i in ids if keep(i)),
                                "accuracy": [b["by_type"][qt] for b in by_template],
                                **_spread([b["by_type"][qt] for b in by_template]),
                                "consistency": _consistency(answers(keep)),
                                "consistent_and_correct": all_right(keep)}  # fmt: skip
    table["templates"] = {qt: list(TEMPLATES[qt]) for qt in types}
    table["unparsed"] = unparsed
    table["config"] = {"question_types": list(question_types), "limit": limit}
    table["model"] = run_info["model"]
    table["runs"] = runs
    atomic_write_json(out / RESULTS_FILE, table)
    return table


def evaluate_paraphrase(model, data_dir: str | Path, out_dir: str | Path, batch_size: int = 32,
                        limit: int | None = None, question_types: Sequence[str] = QUESTION_TYPES,
                        max_new_tokens: int | None = None, model_info: dict | None = None) -> dict:  # fmt: skip
    """The suite on the world in ``data_dir``; ``model`` is a predictor or a vlmkit checkpoint.
    ``limit`` keeps the first N questions of each question type. Writes
    ``out_dir/paraphrase.json``; returns the table."""
    predictor, described = resolve_predictor(model, data_dir, max_new_tokens)
    return paraphrase_suite(predictor, read_test(data_dir), out_dir, question_types=question_types,
                            batch_size=batch_size, limit=limit, info={"model": model_info or described})  # fmt: skip

