"""Peak memory and time of the next-token loss with full logits against ``loss_chunk_tokens``.

    python bench/chunked_loss_memory.py [--batch 4] [--seq 1024] [--width 576] [--vocab 49152]

The shapes default to a SmolLM2-135M-sized head (width 576, 49,152-token vocabulary) on 4 rows
of 1,024 tokens, half of them targets. Each variant (``full``: ``next_token_loss`` on the
logits, the baseline; ``chunk-N``: ``chunked_next_token_loss``) runs forward and backward in a
fresh process, so its peak resident memory (``ru_maxrss``) is its own; one JSON line each.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time


def run_one(variant: str, args) -> dict:
    import torch

    from vlmkit.train.losses import chunked_next_token_loss, next_token_loss

    torch.manual_seed(0)
    head = torch.nn.Linear(args.width, args.vocab, bias=False)
    hidden = torch.randn(args.batch, args.seq, args.width, requires_grad=True)
    labels = torch.randint(0, args.vocab, (args.batch, args.seq))
    labels[:, : args.seq // 2] = -100  # the prompt half carries no loss
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if variant == "full":
        loss, n = next_token_loss(head(hidden), labels)
    else:
        loss, n = chunked_next_token_loss(hidden, labels, head, int(variant.split("-")[1]))
    (loss / n).backward()
    secs = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"bench": "chunked_loss_memory", "variant": variant, "loss": round(float(loss / n), 5),
            "seconds": round(secs, 3), "peak_rss_mib_over_start": round((peak - base) / 1024, 1)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--width", type=int, default=576)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--variants", default="full,chunk-1024,chunk-256")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one variant here
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args)))
        return
    print(json.dumps({"bench": "chunked_loss_memory", "machine": {"cpus": os.cpu_count(),
          "processor": platform.processor() or platform.machine(), "python": platform.python_version()},
          "shape": {"batch": args.batch, "seq": args.seq, "width": args.width, "vocab": args.vocab}}))  # fmt: skip
    for variant in args.variants.split(","):
        cmd = [sys.executable, __file__, "--one", variant, "--batch", str(args.batch), "--seq", str(args.seq),
               "--width", str(args.width), "--vocab", str(args.vocab)]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        print(out, flush=True)


if __name__ == "__main__":
    main()
