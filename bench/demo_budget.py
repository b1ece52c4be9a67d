"""Measure `vlmkit demo` against its 15-minute budget on this machine; prints one JSON object.

    python bench/demo_budget.py [--out runs/bench-demo] [--minutes N]

The demo's own timings (training, total) come from its results.json; the machine is described
so that figures from different machines are not compared by mistake. Run it on an otherwise
idle machine: 2 cores are easily disturbed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from vlmkit.demo import DEMO_BUDGET_MINUTES, run_demo

BUDGET_S = 15 * 60


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="runs/bench-demo")
    p.add_argument("--minutes", type=float, default=None)
    args = p.parse_args()
    t0 = time.time()
    results = run_demo(out_dir=args.out, minutes=args.minutes)
    wall = time.time() - t0
    print(json.dumps({
        "bench": "demo_budget",
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "processor": platform.processor() or platform.machine(), "torch": torch.__version__},
        "minutes_budget_of_recipe": args.minutes or DEMO_BUDGET_MINUTES,
        "wall_s": round(wall, 1),
        "train_s": results["demo"]["train_seconds"],
        "budget_s": BUDGET_S,
        "within_budget": wall <= BUDGET_S,
        "figures": results["demo"]["figures"],
    }))


if __name__ == "__main__":
    main()
