"""Batched, resumable evaluation of a *predictor* on the shapes-world tasks.

The evaluation core never sees a model. It takes a predictor::

    Predictor = Callable[[list[Sample]], list[str]]

which returns the raw generated text for each sample. The runner hands the predictor each
sample cut to its prompt (``Sample.prompt_turns()``: the turns before the last assistant turn,
so the ground-truth answer is not in the conversation); ``meta`` is passed on unchanged and a
real predictor must not read ``meta["answer"]`` (test oracles do). With ``blind=True`` every
question is asked a second time through ``Sample.without_images()``.

Outputs in ``out_dir``:
  samples.jsonl     one line per finished item, appended and flushed as soon as it is scored
                    (fields: see `run_evaluation`); the record of a resumable run.
  eval_state.json   the fingerprint of the evaluated items, checked when resuming.
  results.json      the aggregate (shape below), written atomically at the end.

``results.json``::

    {"tasks":  {name: {"n", "metrics": {...}, "extraction": {method: count}, "elapsed_s"}},
     "blind":  {name: same shape, questions asked without images}      ({} unless blind),
     "image_gain": {name: {question_type: accuracy_with_image - accuracy_blind}} ({} unless blind),
     "model":  info["model"], "data": {"path", "n_rows", "sha256", "n_by_task", "not_evaluated", ...},
     "config": {"tasks", "blind", "batch_size", "limit"}, "fingerprint": str,
     "timing": {"started", "finished", "wall_s", "predict_s", "items_predicted", "items_resumed",
                "items_per_s"}}
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter, defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from vlmkit.data.sample import Sample
from vlmkit.eval.metrics.exact import mean
from vlmkit.eval.tasks import TASKS, TaskDef, get_task, prompt_text, question_type_of, target_of
from vlmkit.utils.io import append_jsonl, atomic_write_json, atomic_write_text, read_jsonl

log = logging.getLogger("vlmkit.eval")

Predictor = Callable[[list[Sample]], list[str]]

SAMPLES_FILE = "samples.jsonl"
RESULTS_FILE = "results.json"
STATE_FILE = "eval_state.json"
REPORT_FILE = "report.html"


def prompt_sample(sample: Sample, blind: bool = False) -> Sample:
    """What the predictor receives: the sample cut to its prompt turns, without images if blind."""
    base = sample.without_images() if blind else sample
    return Sample(base.id, list(base.prompt_turns()), list(base.images), dict(base.meta))


def _fingerprint(groups: dict[str, list[Sample]]) -> str:
    h = hashlib.sha256()
    for name in sorted(groups):
        for s in groups[name]:
            rec = [name, s.id, question_type_of(s), target_of(s), prompt_text(s)]
            h.update(json.dumps(rec, ensure_ascii=False).encode("utf-8"))
            h.update(b"\n")
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _image_names(sample: Sample) -> list[str | None]:
    return [ref.path if ref.path is not None else ref.url for ref in sample.images]


def _chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


# the shapes tasks ask each question exactly as the data writes it, through the model's chat template
PROMPT_AS_WRITTEN = "{question} (as written in the data; rendered by the model's chat template)"


def generation_settings(predictor, batch_size: int) -> dict:
    """How the answers were generated, from the predictor's attributes (recorded per task)."""
    temperature = float(getattr(predictor, "temperature", 0.0))
    return {
        "max_new_tokens": getattr(predictor, "max_new_tokens", None),
        "temperature": temperature,
        "top_p": float(getattr(predictor, "top_p", 1.0)),
        "greedy": temperature == 0.0,
        "batch_size": batch_size,
        "predictor": type(predictor).__name__,
    }


def _summarise(task: TaskDef, rows: list[dict]) -> dict:
    return {
        "n": len(rows),
        "metrics": task.aggregator(rows),
        "extraction": dict(sorted(Counter(r["method"] for r in rows).items())),
        "elapsed_s": round(sum(float(r.get("elapsed_s", 0.0)) for r in rows), 6),
    }


def _by_type(rows: list[dict]) -> dict[str, float]:
    groups: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        groups[r["question_type"]].append(float(r["score"]))
    return {k: mean(v) for k, v in sorted(groups.items())}


def run_evaluation(
    predictor: Predictor,
    samples: list[Sample],
    out_dir: str | Path,
    tasks: Sequence[str] | None = None,
    blind: bool = False,
    batch_size: int = 32,
    limit: int | None = None,
    resume: bool = False,
    info: dict | None = None,
    judge=None,
) -> dict:
    """Evaluate ``predictor`` on ``samples``; write samples.jsonl and results.json; return the results.

    ``judge`` (an `eval.option_judge.OptionJudge`) places the multiple-choice answers that no
    extraction rule reads; it is recorded under ``results["config"]["judge"]``.

    Samples are grouped into the tasks of `vlmkit.eval.tasks.TASKS` (``tasks`` names a subset;
    default all) by each task's ``accepts``; rows no task accepts are counted in
    ``results["data"]["not_evaluated"]`` as ``{"task/question_type": count}``. ``limit`` keeps the first N items of each task, in input
    order. Each task's items go to the predictor in batches of ``batch_size``; each finished item
    is appended at once to samples.jsonl with the fields

      id, task, question_type, prompt (text of the last user turn), prediction (raw text),
      extracted (the short answer or null), method (extraction rule), target, score (0..1),
      blind (bool), extra (task-specific: POPE split, grounding IoU), item (position within the
      task), images (paths/URLs), elapsed_s (this item's share of its batch's predictor time).

    With ``resume=True`` the items already in samples.jsonl (same task, position, id and blind
    flag) are not predicted again, and the results equal those of an uninterrupted run (apart
    from timing). The data must be the same as before (checked against eval_state.json).
    Without ``resume`` an existing samples.jsonl is replaced.

    ``info`` may carry ``"model"`` (copied to ``results["model"]``) and ``"data"`` (merged into
    ``results["data"]``, e.g. path and sha256 of the data file).
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    info = info or {}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    t_start = time.perf_counter()

    names = list(tasks) if tasks is not None else list(TASKS)
    defs = {n: get_task(n) for n in names}
    groups: dict[str, list[Sample]] = {n: [s for s in samples if d.accepts(s)] for n, d in defs.items()}
    contexts = {n: defs[n].prepare(groups[n]) for n in names}
    if judge is not None:
        for ctx in contexts.values():
            ctx["judge"] = judge
    fingerprint = _fingerprint(groups)
    if limit is not None:
        groups = {n: g[: max(0, int(limit))] for n, g in groups.items()}
    accepted = {id(s) for g in groups.values() for s in g}
    for n in names:
        if not groups[n]:
            log.info("task %s: no items in the data; skipped", n)
    names = [n for n in names if groups[n]]
    flags = [False, True] if blind else [False]
    plan = {(n, f, i): s for n in names for f in flags for i, s in enumerate(groups[n])}

    samples_path = out / SAMPLES_FILE
    state_path = out / STATE_FILE
    done: dict[tuple[str, bool, int], dict] = {}
    if resume and samples_path.exists():
        if state_path.exists():
            state = json.loads(state_path.read_text(encoding="utf-8"))
            if state.get("fingerprint") != fingerprint:
                raise ValueError(
                    f"cannot resume in {out}: the data differ from the run recorded in {STATE_FILE} "
                    "(evaluate into a new directory, or run without resume)"
                )
        for row in read_jsonl(samples_path):
            key = (row.get("task"), bool(row.get("blind")), row.get("item"))
            s = plan.get(key)  # type: ignore[arg-type]
            if s is not None and row.get("id") == s.id:
                done[key] = row  # type: ignore[index]
        # rewrite without a torn last line (or rows of another plan) before appending again
        atomic_write_text(samples_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in done.values()))
        log.info("resuming: %d of %d items already in %s", len(done), len(plan), samples_path)
    else:
        if samples_path.exists():
            samples_path.unlink()
        samples_path.touch()
    atomic_write_json(state_path, {"fingerprint": fingerprint})
    n_resumed = len(done)

    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        tqdm = None
    bar = tqdm(total=len(plan), initial=len(done), desc="eval", unit="item", dynamic_ncols=True) if tqdm else None

    predict_s = 0.0
    n_predicted = 0
    try:
        for n in names:
            task = defs[n]
            for flag in flags:
                todo = [(i, s) for i, s in enumerate(groups[n]) if (n, flag, i) not in done]
                if bar is not None:
                    bar.set_postfix_str(f"{n}{' blind' if flag else ''}")
                for batch in _chunks(todo, batch_size):
                    inputs = [prompt_sample(s, flag) for _, s in batch]
                    t0 = time.perf_counter()
                    preds = predictor(inputs)
                    dt = time.perf_counter() - t0
                    preds = list(preds)
                    if len(preds) != len(batch):
                        raise ValueError(f"predictor returned {len(preds)} outputs for {len(batch)} samples")
                    predict_s += dt
                    for (i, s), pred in zip(batch, preds):
                        if not isinstance(pred, str):
                            raise TypeError(f"predictor returned {type(pred).__name__} for {s.id}; expected str")
                        ex = task.extractor(s, pred, contexts[n])
                        sc = task.scorer(s, ex)
                        row = {
                            "id": s.id,
                            "task": n,
                            "question_type": question_type_of(s),
                            "prompt": prompt_text(s),
                            "prediction": pred,
                            "extracted": ex.answer,
                            "method": ex.method,
                            "target": target_of(s),
                            "score": float(sc["score"]),
                            "blind": flag,
                            "extra": sc.get("extra", {}),
                            "item": i,
                            "images": _image_names(s),
                            "elapsed_s": dt / len(batch),
                        }
                        append_jsonl(samples_path, row)
                        done[(n, flag, i)] = row
                        n_predicted += 1
                    if bar is not None:
                        bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()

    results: dict[str, Any] = {"tasks": {}, "blind": {}, "image_gain": {}}
    generation = generation_settings(predictor, batch_size)
    for n in names:
        rows = [done[(n, False, i)] for i in range(len(groups[n]))]
        results["tasks"][n] = _summarise(defs[n], rows)
        results["tasks"][n]["prompt_template"] = PROMPT_AS_WRITTEN
        results["tasks"][n]["generation"] = generation
        if blind:
            brows = [done[(n, True, i)] for i in range(len(groups[n]))]
            results["blind"][n] = _summarise(defs[n], brows)
            with_img, without = _by_type(rows), _by_type(brows)
            results["image_gain"][n] = {qt: with_img[qt] - without.get(qt, 0.0) for qt in with_img}
            # items answered right without their image: candidates for leakage (MMStar's concern)
            right_blind = [r["id"] for r in brows if float(r["score"]) >= 1.0]
            results.setdefault("answered_without_image", {})[n] = {
                "n": len(right_blind), "share": len(right_blind) / len(brows) if brows else 0.0,
                "ids": right_blind[:200]}  # fmt: skip

    by_task = Counter(str(s.meta.get("task", "unknown")) for s in samples)
    not_eval = Counter(
        f"{s.meta.get('task', 'unknown')}/{s.meta.get('question_type', 'unknown')}"
        for s in samples
        if id(s) not in accepted
    )
    data = {"n_rows": len(samples)}
    data.update(info.get("data", {}))
    data["n_by_task"] = dict(sorted(by_task.items()))
    data["not_evaluated"] = dict(sorted(not_eval.items()))
    results["model"] = info.get("model", {})
    results["data"] = data
    results["config"] = {"tasks": names, "blind": bool(blind), "batch_size": batch_size, "limit": limit}
    if judge is not None:
        results["config"]["judge"] = judge.describe()
    results["fingerprint"] = fingerprint
    wall = time.perf_counter() - t_start
    results["timing"] = {
        "started": started,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_s": round(wall, 6),
        "predict_s": round(predict_s, 6),
        "items_predicted": n_predicted,
        "items_resumed": n_resumed,
        "items_per_s": round(n_predicted / predict_s, 3) if predict_s > 0 else None,
    }
    atomic_write_json(out / RESULTS_FILE, results)
    log.info("evaluated %d items (%d resumed) in %.1fs -> %s", len(plan), n_resumed, wall, out / RESULTS_FILE)
    return results


def evaluate(
    checkpoint: str | Path | None,
    data_dir: str | Path | None,
    out_dir: str | Path,
    blind: bool = False,
    limit: int | None = None,
    batch_size: int = 32,
    max_new_tokens: int | None = None,
    resume: bool = False,
    tasks: Sequence[str] | None = None,
    image_as_text: str | Path | None = None,
    hf_model: str | Path | None = None,
    benchmark: str | Path | None = None,
    kind: str | None = None,
    circular: bool = False,
    base_llm: str | Path | None = None,
    benchmark_dir: str | Path | None = None,
    download: bool = False,
    judge=None,
) -> dict:
    """Evaluate a checkpoint on ``data_dir/test.json``; writes results.json, samples.jsonl, report.html.

    With ``image_as_text`` (a captioner checkpoint) the checkpoint answers from that captioner's
    descriptions of the images instead of the images (``infer.image_as_text``). With ``hf_model``
    (and no checkpoint) a Hugging Face LLaVA-format model answers (``infer.hf_llava``). With
    ``benchmark`` (a VLMEvalKit TSV) the questions come from that file instead of
    ``data_dir/test.json``, scored by the ``benchmark_<kind>`` task (`eval.benchmark_tasks`);
    ``circular`` asks every multiple-choice question in all its rotations (CircularEval).
    With ``base_llm`` (a Hugging Face causal LM, with ``blind``) the same questions go, without
    images, to that text-only model too, and ``results["leakage"]`` gives per task MMStar's
    multimodal leakage ``max(0, blind VLM score - base LLM score)`` of the headline metric.
    When ``tasks`` are named benchmarks (``vqav2``, ``mmbench``, ... `eval.named_benchmarks`),
    their files are read from ``benchmark_dir`` (fetched first if missing and ``download``).
    ``judge`` (a `eval.judge.JudgeConfig`) places multiple-choice answers the rules can't read.
    """
    from vlmkit.data.bad_samples import BadSampleLog
    from vlmkit.data.formats.llava import read_llava
    from vlmkit.eval.report import write_report
    from vlmkit.infer.predictor import load_predictor

    bad_log = BadSampleLog()
    files: list[Path] | None = None  # benchmarks of several files: each one is fingerprinted
    named = [t for t in (tasks or ()) if t in _named_benchmarks()]
    if named and (benchmark is not None or len(named) != len(tasks or ())):
        raise ValueError(f"evaluate: named benchmarks ({', '.join(named)}) can't be mixed with a benchmark "
                         "file or with the shapes tasks")  # fmt: skip
    if named:
        from vlmkit.eval.named_benchmarks import read_benchmark

        samples, files = [], []
        for name in named:
            got, paths = read_benchmark(name, benchmark_dir, download, bad_log=bad_log)
            samples += got
            files += paths
        tasks = named
        data_dir = Path(data_dir) if data_dir is not None else files[0].parent
    elif benchmark is not None:
        from vlmkit.eval.benchmark_tasks import mark_benchmark
        from vlmkit.eval.formats.vlmevalkit import read_vlmevalkit

        test_path = Path(benchmark)
        if test_path.is_dir() or test_path.suffix.lower() == ".parquet":  # HF datasets (lmms-eval layouts)
            from vlmkit.eval.formats.hf_parquet import parquet_files, read_hf_parquet

            samples = read_hf_parquet(test_path, layout=kind, bad_log=bad_log)
            files = parquet_files(test_path)
            tasks = sorted({f"benchmark_{s.meta['task']}" for s in samples})
        elif test_path.suffix.lower() in (".json", ".jsonl"):  # POPE's question files; images under data_dir
            from vlmkit.eval.formats.pope import read_pope

            if data_dir is None:
                raise ValueError(f"{test_path}: a POPE question file needs the image folder (--data)")
            samples = mark_benchmark(read_pope(test_path, bad_log=bad_log))
            tasks = ["pope"]
        else:
            samples = mark_benchmark(read_vlmevalkit(test_path, kind=kind, bad_log=bad_log))
            if circular:
                from vlmkit.eval.benchmark_tasks import circular_expand

                samples = circular_expand(samples)
            tasks = sorted({f"benchmark_{s.meta['task']}" + ("_circular" if "circular" in s.meta else "")
                            for s in samples})  # fmt: skip
        data_dir = Path(data_dir) if data_dir is not None else test_path.parent  # TSV images are inline
    else:
        if data_dir is None:
            raise ValueError("evaluate: give data_dir (a world with test.json) or a benchmark file")
        data_dir = Path(data_dir)
        test_path = data_dir / "test.json"
        samples = read_llava(test_path, root=data_dir, bad_log=bad_log)
    kwargs: dict[str, Any] = {"image_root": data_dir}
    if max_new_tokens is not None:
        kwargs["max_new_tokens"] = max_new_tokens
    if (checkpoint is None) == (hf_model is None):
        raise ValueError("evaluate: give a vlmkit checkpoint or hf_model, not both or neither")
    if hf_model is not None:
        from vlmkit.infer.hf_llava import load_hf_llava_predictor

        predictor, model_info = load_hf_llava_predictor(hf_model, **kwargs)
        model = dict(model_info)
    else:
        predictor, model_info = load_predictor(checkpoint, **kwargs)
        model = {"checkpoint": str(checkpoint)}
        model.update(model_info or {})
    if image_as_text is not None:
        from vlmkit.infer.image_as_text import CAPTION_PROMPT, DESCRIBE_AS, ImageAsTextPredictor

        captioner, captioner_info = load_predictor(image_as_text, **{**kwargs, "max_new_tokens": 64})
        predictor = ImageAsTextPredictor(captioner, predictor)
        model["image_as_text"] = {"captioner": captioner_info, "caption_prompt": CAPTION_PROMPT,
                                  "describe_as": DESCRIBE_AS}  # fmt: skip
    if files is not None:  # one fingerprint per file read
        data: dict[str, Any] = {"files": [{"path": str(f), "sha256": file_sha256(f), "size": f.stat().st_size}
                                          for f in files]}  # fmt: skip
        data.update({"path": str(files[0].parent), "size": sum(f["size"] for f in data["files"])})
    else:
        data = {"path": str(test_path), "sha256": file_sha256(test_path), "size": test_path.stat().st_size}
    data.update({"bad_rows": len(bad_log.bad), "bad_summary": bad_log.summary()})
    results = run_evaluation(
        predictor,
        samples,
        out_dir,
        tasks=tasks,
        blind=blind,
        batch_size=batch_size,
        limit=limit,
        resume=resume,
        info={"model": model, "data": data},
        judge=_option_judge(judge),
    )
    if base_llm is not None:
        if not blind:
            raise ValueError("evaluate: base_llm measures leakage against the blind run; pass blind=True")
        results["leakage"] = _leakage(results, samples, base_llm, Path(out_dir) / "base_llm", batch_size, limit,
                                      max_new_tokens)  # fmt: skip
        atomic_write_json(Path(out_dir) / RESULTS_FILE, results)
    inline = {str(s.id): list(s.images) for s in samples if any(ref.data is not None for ref in s.images)}
    write_report(results, Path(out_dir) / SAMPLES_FILE, data_dir, Path(out_dir) / REPORT_FILE, inline_images=inline)
    return results


def _option_judge(config):
    if config is None:
        return None
    from vlmkit.eval.option_judge import OptionJudge

    return OptionJudge(config)


def _named_benchmarks() -> dict:
    from vlmkit.eval.named_benchmarks import BENCHMARKS

    return BENCHMARKS


def _leakage(results: dict, samples: list, base_llm, out_dir: Path, batch_size: int, limit, max_new_tokens) -> dict:
    """Per task: the blind VLM's and the base LLM's headline metric and ML = max(0, difference)."""
    from vlmkit.eval.tasks import primary_value
    from vlmkit.infer.text_llm import TextLLMPredictor

    predictor = TextLLMPredictor(base_llm, **({"max_new_tokens": max_new_tokens} if max_new_tokens else {}))
    tasks = list(results["blind"])
    base = run_evaluation(predictor, [s.without_images() for s in samples], out_dir, tasks=tasks,
                          batch_size=batch_size, limit=limit, info={"model": {"base_llm": str(base_llm)}})  # fmt: skip
    out = {}
    for name in tasks:
        blind_value = primary_value(name, results["blind"][name]["metrics"])
        base_value = primary_value(name, base["tasks"][name]["metrics"]) if name in base["tasks"] else 0.0
        out[name] = {"blind_vlm": blind_value, "base_llm": base_value, "ml": max(0.0, blind_value - base_value)}
    return {"base_llm": str(base_llm), "tasks": out}
