"""Robustness suites on the shapes world, beside the image corruptions (`eval.corruptions`).

  typographic   `eval.typographic`: colour / shape questions on each test scene, clean and with a
                misleading word written next to the asked object; accuracy both ways and the
                attack success rate.
  paraphrase    `eval.paraphrase`: the world's VQA and POPE questions under several phrasings;
                accuracy per phrasing, its spread, and how often the answer stays the same.
  option_order  `eval.option_order`: the world's MCQ rows single-pass and under CircularEval
                (every rotation of the options must be answered right), with the letter bias.

Each suite takes a *predictor* (`eval.runner.Predictor`) or a vlmkit checkpoint (loaded with
`vlmkit.infer.predictor.load_predictor`, images resolved under the world folder), scores its
questions with `eval.runner.run_evaluation` (item records in the suite's subfolders) and writes
its table atomically to ``out_dir/<suite>.json``. `run_suites` runs several into
``out_dir/<suite>/`` and writes them together to ``out_dir/suites.json``. docs/robustness.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from vlmkit.data.sample import Part, Sample, Turn

SUITES: tuple[str, ...] = ("typographic", "paraphrase", "option_order")
SUITES_FILE = "suites.json"


# ------------------------------------------------------------------ helpers shared by the suites


def resolve_predictor(model, data_dir: str | Path, max_new_tokens: int | None = None) -> tuple[Callable, dict]:
    """``model`` as a predictor and a description of it: a callable is used as it is; anything
    else is a vlmkit checkpoint, loaded with its images resolved under ``data_dir``."""
    if callable(model):
        return model, {"predictor": type(model).__name__}
    from vlmkit.infer.predictor import load_predictor

    kwargs: dict[str, Any] = {"image_root": data_dir}
    if max_new_tokens is not None:
        kwargs["max_new_tokens"] = max_new_tokens
    predictor, info = load_predictor(model, **kwargs)
    return predictor, {"checkpoint": str(model), **(info or {})}


def read_test(data_dir: str | Path) -> list[Sample]:
    """The world's held-out rows (``data_dir/test.json``), image paths relative to ``data_dir``."""
    from vlmkit.data.formats.llava import read_llava

    data_dir = Path(data_dir)
    return read_llava(data_dir / "test.json", root=data_dir)


def ask(sample: Sample, question: str, answer: str, meta: dict, sid: str | None = None, images=None) -> Sample:
    """A one-question sample written the way the world writes its rows: the image parts of
    ``sample``'s prompt, then ``"\\n" + question``; the answer as the assistant turn."""
    prompt = sample.prompt_turns()
    image_parts = [p for p in (prompt[-1].parts if prompt else []) if p.is_image]
    user = Turn("user", [*image_parts, Part(text=("\n" if image_parts else "") + question)])
    return Sample(sid if sid is not None else sample.id, [user, Turn.of_text("assistant", answer)],
                  list(sample.images if images is None else images), meta)  # fmt: skip


def item_rows(run_dir: str | Path) -> list[dict]:
    """The item records of one `run_evaluation` run (its samples.jsonl), in the order written."""
    from vlmkit.eval.runner import SAMPLES_FILE
    from vlmkit.utils.io import read_jsonl

    return [r for r in read_jsonl(Path(run_dir) / SAMPLES_FILE) if not r.get("blind")]


def share(num: float, den: float) -> float:
    return num / den if den else 0.0


# ------------------------------------------------------------------ several suites at once


def headline(name: str, table: dict) -> dict:
    """The few numbers of a suite's table that a summary line shows."""
    keys = {
        "typographic": ("n", "accuracy_clean", "accuracy_attacked", "drop", "attack_success_rate"),
        "paraphrase": ("n_questions", "accuracy_min", "accuracy_max", "spread", "consistency"),
        "option_order": ("n_questions", "single_pass_accuracy", "circular_accuracy", "drop"),
    }[name]
    return {k: table[k] for k in keys}


def parse_suites(suites: str | Sequence[str]) -> tuple[str, ...]:
    """``"all"``, ``"typographic,paraphrase"`` or a sequence of names -> checked suite names."""
    if isinstance(suites, str):
        suites = SUITES if suites.strip() == "all" else [s.strip() for s in suites.split(",") if s.strip()]
    names = tuple(dict.fromkeys(suites))
    unknown = [s for s in names if s not in SUITES]
    if unknown or not names:
        raise ValueError(f"unknown robustness suite(s) {unknown or list(names)}; expected some of {SUITES}")
    return names


def run_suites(model, data_dir: str | Path, out_dir: str | Path, suites: str | Sequence[str] = SUITES,
               batch_size: int = 32, limit: int | None = None, seed: int = 0,
               max_new_tokens: int | None = None, placement: str = "near") -> dict:  # fmt: skip
    """Run the chosen suites (a checkpoint is loaded once) into ``out_dir/<suite>/``; return and
    write atomically to ``out_dir/suites.json``. ``limit`` is each suite's own (typographic: the
    first N items; paraphrase: the first N questions of each type; option order: the first N
    questions); ``seed`` and ``placement`` are the typographic suite's::

        {"suites": {name: the suite's table}, "summary": {name: its headline numbers},
         "model": {...}, "config": {"suites", "batch_size", "limit", "seed", "placement", "data"}}
    """
    from vlmkit.eval.option_order import evaluate_option_order
    from vlmkit.eval.paraphrase import evaluate_paraphrase
    from vlmkit.eval.typographic import PLACEMENTS, evaluate_typographic
    from vlmkit.utils.io import atomic_write_json

    names = parse_suites(suites)
    if placement not in PLACEMENTS:  # checked before a checkpoint is loaded
        raise ValueError(f"unknown typographic placement {placement!r}; expected one of {PLACEMENTS}")
    out = Path(out_dir)
    predictor, model_info = resolve_predictor(model, data_dir, max_new_tokens)
    runners = {"typographic": evaluate_typographic, "paraphrase": evaluate_paraphrase,
               "option_order": evaluate_option_order}  # fmt: skip
    tables = {}
    for name in names:
        extra = {"seed": seed, "placement": placement} if name == "typographic" else {}  # the others are not random
        tables[name] = runners[name](predictor, data_dir, out / name, batch_size=batch_size, limit=limit,
                                     model_info=model_info, **extra)  # fmt: skip
    result = {
        "suites": tables,
        "summary": {name: headline(name, t) for name, t in tables.items()},
        "model": model_info,
        "config": {"suites": list(names), "batch_size": batch_size, "limit": limit, "seed": seed,
                   "placement": placement, "data": str(data_dir)},  # fmt: skip
    }
    atomic_write_json(out / SUITES_FILE, result)
    return result


def summary_lines(result: dict) -> list[str]:
    """One line per suite of a `run_suites` result, for the command line."""
    lines = []
    for name, numbers in result["summary"].items():
        lines.append(f"{name:13s} " + "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                                for k, v in numbers.items()))  # fmt: skip
    return lines
