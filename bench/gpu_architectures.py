"""What each architecture choice costs on a GPU: training step time, tokens/s and peak memory of
`vlmkit train` in bf16 for every connector, token budget and tiling mode; prints JSON lines.

    python bench/gpu_architectures.py --out runs/gpu-arch [--steps 20] [--batch 16] [--variants mlp,perceiver]

The backbones are those of bench/gpu_train_throughput.py (a SigLIP-base-sized encoder at 224 px,
196 patches, and a SmolLM2-360M-sized Llama; random weights, loaded from local directories) and
the data the shapes world at 224 px. Each variant is the same recipe with one change; ``mlp``
(LLaVA-1.5's ``mlp2x_gelu``, 196 tokens per image) is the baseline, measured in the same process
on the same card. After training, each variant's checkpoint answers a few held-out questions
through the predictor (bf16 autocast, KV cache), so the decoding path of every architecture runs
on the GPU too.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import shutil
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("gpu_train_throughput", HERE / "gpu_train_throughput.py")
base_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(base_bench)
timed_window = base_bench.timed_window



def variants(s: int) -> dict[str, dict]:
    """Each variant's change to the base recipe, for an encoder of side ``s`` px (the world is 2s)."""
    return {
        "mlp": {},
        "linear": {"connector": {"type": "linear"}},
        "pixel-shuffle-2": {"connector": {"pixel_shuffle": 2}},  # 196 -> 49 tokens at 224 px
        "pool-64": {"connector": {"pool_tokens": 64}},
        "perceiver-64": {"connector": {"type": "perceiver", "num_queries": 64, "num_heads": 8}},
        "qformer-32": {"connector": {"type": "qformer", "num_queries": 32, "num_heads": 8}},
        "cross-attention": {"connector": {"fusion": "cross_attention", "cross_attention_every": 4, "num_heads": 8}},
        # a 2s x 2s image: 2x2 tiles + a thumbnail either way
        "anyres": {"tiling": {"mode": "anyres", "grid_pinpoints": [[s, 2 * s], [2 * s, s], [2 * s, 2 * s]]}},
        "split": {"tiling": {"mode": "split", "max_side": 2 * s}},
    }


WORLD_TRAIN = 600


def variant_tree(base: dict, name: str, size: int) -> dict:
    tree = json.loads(json.dumps(base))
    tree["name"] = f"gpu-arch-{name}"
    for section, values in variants(size)[name].items():
        tree["model"][section] = {**(tree["model"].get(section) or {}), **values}
    return tree


def run_variant(args, root: Path, vdir: Path, ldir: Path, name: str) -> dict:
    from vlmkit.config import recipe_from_dict
    from vlmkit.data.formats.llava import read_llava
    from vlmkit.infer.predictor import load_predictor
    from vlmkit.train.run import train
    from vlmkit.utils.io import read_jsonl

    out = root / f"run-{name}"
    shutil.rmtree(out, ignore_errors=True)
    size = base_bench.VISIONS[args.vision]["image_size"]
    tree = variant_tree(base_bench.recipe_tree(vdir, ldir, "sdpa", args.steps, args.batch, args.device, size), name, size)
    tree["stages"][0]["max_seq_len"] = 2048  # a tiled image is about 1000 tokens
    recipe = recipe_from_dict(tree)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    final = train(recipe, data_dir=root / "world", out_dir=out)
    wall = time.perf_counter() - t0
    rows, speed = timed_window(out / "metrics.jsonl", args.skip, args.batch)
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else float("nan")
    from PIL import Image

    predictor, _ = load_predictor(final, image_root=root / "world", max_new_tokens=8, device=args.device)
    probe = Image.new("RGB", (args.world_size, args.world_size))  # the world's images
    tokens_per_image = predictor.model.image_token_count(predictor.pipeline.layout(probe))
    questions = [s for s in read_llava(root / "world" / "test.json", root=root / "world") if s.images][:8]
    t1 = time.perf_counter()
    answers = predictor(questions)
    gen_s = time.perf_counter() - t1
    del predictor
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return {
        "bench": "gpu_architectures", "variant": name, "change": variants(size)[name],
        "image_tokens_per_image": tokens_per_image, **speed, "peak_mem_gib": round(peak, 2),
        "first_loss": read_jsonl(out / "metrics.jsonl")[0]["loss"], "final_loss": rows[-1]["loss"],
        "generate_8_s": round(gen_s, 2), "answers_nonempty": sum(bool(a) for a in answers),
        "wall_s_incl_setup": round(wall, 1),
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/gpu-arch")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--skip", type=int, default=6, help="warm-up steps left out of the timing")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--variants", default=",".join(variants(224)))
    p.add_argument("--llm", default="smollm2-360m", choices=sorted(base_bench.LLMS))
    p.add_argument("--vision", default="siglip-base", choices=sorted(base_bench.VISIONS))
    p.add_argument("--world-size", type=int, default=None, help="image side of the world (default: twice the encoder's)")
    p.add_argument("--device", default="cuda", help="cpu only to smoke-test the script (--llm tiny --vision tiny)")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    vdir, ldir = base_bench.make_backbones(root, args.llm, args.vision)
    from vlmkit.data.worlds.shapes import generate_world

    args.world_size = args.world_size or 2 * base_bench.VISIONS[args.vision]["image_size"]
    generate_world(root / "world", n_train=WORLD_TRAIN, n_test=16, seed=0, size=args.world_size)
    print(json.dumps({"bench": "gpu_architectures", "machine": {
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None, "torch": torch.__version__, "cuda": torch.version.cuda,
        "python": platform.python_version()}, "llm": args.llm, "vision": args.vision}), flush=True)  # fmt: skip
    for name in args.variants.split(","):
        try:
            print(json.dumps(run_variant(args, root, vdir, ldir, name)), flush=True)
        except Exception as err:  # one broken variant must not hide the others' figures
            print(json.dumps({"bench": "gpu_architectures", "variant": name, "error": f"{type(err).__name__}: {err}"}), flush=True)
        shutil.rmtree(root / f"run-{name}", ignore_errors=True)  # checkpoints are ~1.5 GB each


if __name__ == "__main__":
    main()
