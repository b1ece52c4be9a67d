"""Attention of packed rows on a CPU: SDPA over masked rows against vlmkit's ``bucketed_varlen``.

    python bench/packed_attention.py [--batch 16] [--pack-tokens 256,512,1024] [--steps 20]
        [--heads 4] [--head-dim 64] [--threads N]

The two CPU paths of ``llm.attn_implementation`` (docs/training.md):

* ``mask`` (``auto`` and ``sdpa`` on a CPU): each packed row [H, W, D] goes through SDPA with
  the block-diagonal causal mask transformers builds; the work is rows x W^2, cross-sample pairs
  included (the mask only zeroes them);
* ``bucketed`` (``varlen`` on a CPU): ``models.varlen_attention.bucketed_varlen``, segments of
  similar length padded into one causal SDPA call per group.

Each "step" is one micro-batch's attention, forward and backward, for one layer; the figure is
milliseconds per step, best of ``--repeats`` passes over ``--steps`` micro-batches, both paths
in the same process on the same tensors. Sample lengths are drawn from a log-normal with median
40 tokens, clipped to [20, 192] (the spread of the shapes world's instruct mixture), seeded;
micro-batches of ``--batch`` samples are packed by ``data.packing.plan_rows`` into rows of at
most ``--pack-tokens`` tokens. Prints one JSON line per row budget, then a summary line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16, help="samples per micro-batch")
    p.add_argument("--pack-tokens", default="256,512,1024", help="row budgets, comma-separated")
    p.add_argument("--steps", type=int, default=20, help="micro-batches per pass")
    p.add_argument("--repeats", type=int, default=5, help="passes; the best is reported")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def sample_lengths(n: int, seed: int) -> list[int]:
    import torch

    g = torch.Generator().manual_seed(seed)
    raw = torch.exp(torch.randn(n, generator=g) * 0.6 + torch.log(torch.tensor(40.0)))
    return [int(v) for v in raw.clamp(20, 192).round()]


def packed_micro_batches(args, budget: int) -> list[list[list[int]]]:
    """Per micro-batch, the segment lengths of each row."""
    from vlmkit.data.packing import plan_rows

    lengths = sample_lengths(args.batch * args.steps, args.seed)
    batches = []
    for start in range(0, len(lengths), args.batch):
        part = lengths[start : start + args.batch]
        rows = plan_rows(part, [0] * len(part), budget)
        batches.append([[part[i] for i in row] for row in rows])
    return batches


def make_inputs(rows: list[list[int]], heads: int, dim: int, generator):
    """Masked-row tensors [R, H, W, D] with their mask, and the same tokens as a stream."""
    import torch

    width = max(sum(r) for r in rows)
    segment = torch.full((len(rows), width), -1, dtype=torch.long)  # -1: the row's padding
    bounds, at, seg_id = [0], 0, 0
    for r, row in enumerate(rows):
        col = 0
        for length in row:
            segment[r, col : col + length] = seg_id
            seg_id, col, at = seg_id + 1, col + length, at + length
            bounds.append(at)
        if col < width:  # trailing padding: its own segment in the stream, as packed_segments reads it
            segment[r, col:] = seg_id
            seg_id, at = seg_id + 1, at + width - col
            bounds.append(at)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    mask = ((segment[:, :, None] == segment[:, None, :]) & causal)[:, None]  # [R, 1, W, W]
    qkv = [torch.randn(len(rows), heads, width, dim, generator=generator) for _ in range(3)]
    stream = [x.transpose(1, 2).reshape(-1, heads, dim) for x in qkv]  # [R * W, H, D]
    return ([x.requires_grad_() for x in qkv], mask, [x.requires_grad_() for x in stream],
            torch.tensor(bounds, dtype=torch.int32))  # fmt: skip


def best_ms(fn, cases, repeats: int) -> float:
    fn(cases[0])  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for case in cases:
            fn(case)
        best = min(best, time.perf_counter() - t0)
    return 1000 * best / len(cases)


def main(argv=None) -> None:
    import torch
    import torch.nn.functional as F

    from vlmkit.models import varlen_attention

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    scale = args.head_dim**-0.5

    def masked(case):
        (q, k, v), mask, _, _ = case
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).sum().backward()

    def bucketed(case):
        _, _, (q, k, v), cu = case
        varlen_attention.bucketed_varlen(q, k, v, cu, scale).sum().backward()

    results = []
    for budget in (int(b) for b in args.pack_tokens.split(",")):
        g = torch.Generator().manual_seed(args.seed)
        batches = packed_micro_batches(args, budget)
        cases = [make_inputs(rows, args.heads, args.head_dim, g) for rows in batches]
        ms_mask = best_ms(masked, cases, args.repeats)
        ms_bucketed = best_ms(bucketed, cases, args.repeats)
        row = {"bench": "packed_attention", "pack_tokens": budget, "batch": args.batch,
               "rows_per_step": round(sum(len(b) for b in batches) / len(batches), 2),
               "mask_ms_per_step": round(ms_mask, 2), "bucketed_ms_per_step": round(ms_bucketed, 2),
               "speedup_bucketed_vs_mask": round(ms_mask / ms_bucketed, 3)}  # fmt: skip
        print(json.dumps(row), flush=True)
        results.append(row)
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads,
               "torch": torch.__version__, "heads": args.heads, "head_dim": args.head_dim}  # fmt: skip
    print(json.dumps({"speedup_bucketed_vs_mask": {r["pack_tokens"]: r["speedup_bucketed_vs_mask"] for r in results},
                      "machine": machine}))  # fmt: skip


if __name__ == "__main__":
    main()
