"""Accuracy versus training minutes for `vlmkit demo` on this machine.

    python bench/demo_curve.py --out runs/curve [--minutes 2,4,7,11] [--data DIR]

Each point is a full `vlmkit demo --minutes N` run (every stage's steps scaled by N / 11), run
one after another so that each gets the whole CPU. The first run generates the world (unless
``--data`` names one) and the others reuse it. One JSON line per point goes to stdout and to
``OUT/curve.jsonl``; ``OUT/curve.png`` plots the figures against measured training minutes, with
the issue's required levels and goals as dashed lines. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import torch

from vlmkit.demo import run_demo
from vlmkit.utils.io import append_jsonl


def point(results: dict, minutes: float) -> dict:
    vqa = results["tasks"]["shapes_vqa"]["metrics"]
    blind = results["blind"]["shapes_vqa"]["metrics"]
    pope = results["tasks"].get("shapes_pope", {}).get("metrics", {})
    grounding = results["tasks"].get("shapes_grounding", {}).get("metrics", {})
    return {
        "minutes_budget": minutes,
        "train_s": results["demo"]["train_seconds"],
        "total_s": results["demo"]["total_seconds"],
        "vqa": vqa["accuracy"],
        "blind": blind["accuracy"],
        **{k: round(v, 4) for k, v in results["demo"]["figures"].items()},
        "by_type": vqa.get("by_type", {}),
        "pope_f1_min": min((pope[s]["f1"] for s in ("random", "popular", "adversarial") if s in pope),
                           default=None),
        "grounding_acc_iou50": grounding.get("acc_iou50"),
    }


def plot(points: list[dict], out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = sorted(points, key=lambda p: p["train_s"])
    xs = [p["train_s"] / 60 for p in points]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.plot(xs, [p["vqa"] for p in points], "o-", label="image-dependent VQA")
    ax.plot(xs, [p["blind"] for p in points], "o-", label="same questions, blind")
    ax.plot(xs, [p["counting accuracy"] for p in points], "o-", label="counting")
    ax.axhline(0.50, ls="--", c="C0", lw=0.8, label="VQA required (0.50)")
    ax.axhline(0.80, ls=":", c="C0", lw=0.8, label="VQA goal (0.80)")
    ax.axhline(0.70, ls="--", c="C2", lw=0.8, label="counting required (0.70)")
    ax.set_xlabel("training minutes (2-core CPU)")
    ax.set_ylabel("accuracy, held-out split")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    tmp = out_png.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, out_png)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="runs/curve")
    p.add_argument("--minutes", default="2,4,7,11")
    p.add_argument("--data", default=None, help="a generated world to reuse (default: OUT/world)")
    p.add_argument("--plot-only", action="store_true", help="redraw OUT/curve.png from OUT/curve.jsonl")
    args = p.parse_args()
    out = Path(args.out)
    if args.plot_only:
        from vlmkit.utils.io import read_jsonl

        plot(read_jsonl(out / "curve.jsonl"), out / "curve.png")
        return
    out.mkdir(parents=True, exist_ok=True)
    data = Path(args.data) if args.data else out / "world"
    machine = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
               "processor": platform.processor() or platform.machine(), "torch": torch.__version__}
    points = []
    for minutes in [float(m) for m in args.minutes.split(",")]:
        results = run_demo(out_dir=out / f"m{minutes:g}", minutes=minutes, data_dir=data)
        row = {"bench": "demo_curve", "machine": machine, **point(results, minutes)}
        points.append(row)
        append_jsonl(out / "curve.jsonl", row)
        print(json.dumps(row), flush=True)
    plot(points, out / "curve.png")


if __name__ == "__main__":
    main()
