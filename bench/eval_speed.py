"""How fast a checkpoint answers POPE-style questions: the evaluation harness end to end.

    python bench/eval_speed.py CHECKPOINT --data WORLD [--n 3000] [--batch-size 64] [--threads N]

Takes the world's held-out POPE questions (``test.json``, task ``pope``), repeats them in order
until there are ``--n`` (each copy gets its own id), and times ``eval.runner.run_evaluation``
on them with the checkpoint's predictor: image loading and processing, batched generation with
the KV cache, answer extraction, scoring and the writes of ``samples.jsonl``/``results.json``.
Model loading is timed apart. The baseline of the same run is batch size 1 on the first
``--baseline-n`` questions (what an unbatched loop costs), so the speed-up is measured on the
same machine at the same moment. Prints one JSON object per variant, then a summary line.

The target of the evaluation issue: the demo's tiny model answers 3,000 questions in at most
60 s on the 2-core CPU (``make demo`` leaves the checkpoint at runs/demo/final).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import tempfile
import time
from pathlib import Path


def pope_questions(data_dir: Path, n: int) -> list:
    from vlmkit.data.formats.llava import read_llava

    pope = [s for s in read_llava(data_dir / "test.json", root=data_dir) if s.meta.get("task") == "pope"]
    if not pope:
        raise SystemExit(f"{data_dir}/test.json has no POPE questions")
    out = []
    for k in range(n):
        s = pope[k % len(pope)]
        out.append(dataclasses.replace(s, id=f"{s.id}#{k // len(pope)}"))
    return out


def timed_run(predictor, samples, batch_size: int) -> dict:
    from vlmkit.eval.runner import run_evaluation

    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        results = run_evaluation(predictor, samples, out, tasks=["shapes_pope"], batch_size=batch_size)
        seconds = time.perf_counter() - t0
    splits = results["tasks"]["shapes_pope"]["metrics"]  # per POPE split
    accuracy = {name: m["accuracy"] for name, m in splits.items() if isinstance(m, dict) and "accuracy" in m}
    return {"questions": len(samples), "batch_size": batch_size, "seconds": round(seconds, 2),
            "questions_per_s": round(len(samples) / seconds, 1), "accuracy_by_split": accuracy}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--data", required=True, help="the shapes world the checkpoint was trained on")
    p.add_argument("--n", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--baseline-n", type=int, default=200, help="questions for the batch-size-1 baseline")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    args = p.parse_args()

    import torch

    from vlmkit.infer.predictor import load_predictor

    torch.set_num_threads(args.threads)
    data = Path(args.data)
    t0 = time.perf_counter()
    predictor, _ = load_predictor(args.checkpoint, image_root=data)
    load_s = time.perf_counter() - t0
    samples = pope_questions(data, args.n)
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads,
               "torch": torch.__version__}  # fmt: skip
    baseline = timed_run(predictor, samples[: args.baseline_n], 1)
    print(json.dumps({"variant": "batch-1 (baseline)", **baseline}), flush=True)
    batched = timed_run(predictor, samples, args.batch_size)
    print(json.dumps({"variant": f"batch-{args.batch_size}", **batched}), flush=True)
    print(json.dumps({"bench": "eval_speed", "questions": batched["questions"], "seconds": batched["seconds"],
                      "model_load_s": round(load_s, 2), "target_s": 60.0, "met": batched["seconds"] <= 60.0,
                      "speedup_vs_batch_1": round(batched["questions_per_s"] / baseline["questions_per_s"], 2),
                      "machine": machine}))  # fmt: skip


if __name__ == "__main__":
    main()
