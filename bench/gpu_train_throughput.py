"""Training throughput and MFU of vlmkit's own training path on one GPU; prints JSON lines.

    python bench/gpu_train_throughput.py --out runs/gpu-bench [--steps 40] [--batch 16]
        [--variants sdpa,eager] [--llm smollm2-360m] [--vision siglip-base]

The model has the shapes of a real small VLM but random weights (nothing is downloaded): a
SigLIP-base-sized encoder at 224 px (196 visual tokens) and a SmolLM2-360M-sized Llama, saved
with ``save_pretrained`` and loaded through the same path as hub checkpoints. The data is the
shapes world rendered at 224 px (captions and multi-question dialogues). Every variant trains
all parts with bf16 autocast through ``vlmkit.train.run.train``: exactly what ``vlmkit train``
does, progress bar and checkpoints included (the final checkpoint's save is excluded from the
timing, which uses the steps after ``--skip`` warm-up steps).

Variants differ only in ``model.llm.attn_implementation``: ``sdpa`` (PyTorch's fused attention,
FlashAttention kernels where the mask allows) against ``eager`` (plain matmuls): the baseline,
measured in the same process on the same card.

MFU = achieved model FLOPs / peak dense bf16 FLOPs of the card (``--peak-tflops``, default 989
for an H100 SXM; an H200 has the same). Model FLOPs per step follow the usual accounting
(Kaplan et al. 2020; PaLM appendix B): 6 x parameters x tokens for the weights (the LM head
counted once even though it is tied), plus 12 x layers x width x context per token for
attention scores, halved for causal attention; the encoder is counted the same way on its 196
patches per image. Padding tokens are not counted as useful work.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

import torch

LLMS = {
    # HuggingFaceTB/SmolLM2-360M's shapes
    "smollm2-360m": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                         num_key_value_heads=5, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048),
    # HuggingFaceTB/SmolLM2-135M's shapes
    # a smoke-test size for checking this script on a CPU (--device cpu)
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=True, max_position_embeddings=512),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048),
}  # fmt: skip
VISIONS = {
    # google/siglip-base-patch16-224's vision tower
    "siglip-base": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                        image_size=224, patch_size=16),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 image_size=64, patch_size=16),
}  # fmt: skip


WORLD_TRAIN = 1500


def make_backbones(root: Path, llm: str, vision: str) -> tuple[Path, Path]:
    from transformers import LlamaConfig, LlamaForCausalLM, SiglipVisionConfig, SiglipVisionModel

    vdir, ldir = root / f"vision-{vision}", root / f"llm-{llm}"
    if not (vdir / "config.json").exists():
        SiglipVisionModel(SiglipVisionConfig(**VISIONS[vision])).save_pretrained(vdir)
    if not (ldir / "config.json").exists():
        LlamaForCausalLM(LlamaConfig(**LLMS[llm])).save_pretrained(ldir)
    return vdir, ldir


def recipe_tree(vdir: Path, ldir: Path, attn: str, steps: int, batch: int, device: str, size: int) -> dict:
    lr = 1e-4
    return {
        "name": f"gpu-bench-{attn}",
        "seed": 0,
        "model": {
            "vision": {"name": str(vdir), "image_size": size},
            "connector": {"type": "mlp2x_gelu"},
            "llm": {"name": str(ldir), "attn_implementation": attn},
            "tokenizer": "tiny",
        },
        "world": {"train": WORLD_TRAIN, "test": 8, "seed": 0, "size": size},
        "data": {
            "captions": {"path": "train.json", "tasks": ["caption"]},
            "dialogues": {"path": "train.json", "tasks": ["vqa_drill"]},
        },
        "stages": [{
            "name": "instruct", "data": {"captions": 0.5, "dialogues": 0.5},
            "trainable": ["vision", "connector", "llm"], "lr": {"vision": lr, "connector": lr, "llm": lr},
            "batch_size": batch, "steps": steps, "warmup_steps": 2, "max_seq_len": 1024, "log_every": 1,
        }],  # fmt: skip
        "train": {"device": device},
    }


def model_flops_per_step(model, rows: list[dict], batch: int) -> float:
    """FLOPs of one optimizer step, from the measured tokens (no padding) and the model's shapes."""
    llm_cfg = model.llm.config
    n_llm = sum(p.numel() for p in model.llm.parameters())  # embedding is tied to the head: counted once
    n_vision = model.vision.parameters_run()  # the blocks after the feature layer do not run
    n_conn = sum(p.numel() for p in model.connector.parameters())
    tokens = (rows[-1]["tokens_seen"] - rows[0]["tokens_seen"]) / max(len(rows) - 1, 1)  # per step
    ctx = tokens / batch  # mean sequence length
    attn_llm = 12 * llm_cfg.num_hidden_layers * llm_cfg.hidden_size * ctx / 2  # causal
    patches = model.tokens_per_image
    vcfg = model.vision.hf_config
    attn_vis = 12 * (model.vision.blocks_run or vcfg.num_hidden_layers) * vcfg.hidden_size * patches
    return tokens * (6 * n_llm + attn_llm) + batch * patches * (6 * n_vision + attn_vis) + batch * patches * 6 * n_conn


def timed_window(metrics_path: Path, skip: int, batch: int) -> tuple[list[dict], dict]:
    """The metric rows after ``skip`` warm-up steps, and the throughput over them."""
    from vlmkit.utils.io import read_jsonl

    rows = [r for r in read_jsonl(metrics_path) if r["stage_step"] > skip]
    secs = rows[-1]["elapsed_s"] - rows[0]["elapsed_s"]
    steps = rows[-1]["step"] - rows[0]["step"]
    return rows, {
        "steps_timed": steps, "batch": batch, "step_s": round(secs / steps, 4),
        "tokens_per_s": round((rows[-1]["tokens_seen"] - rows[0]["tokens_seen"]) / secs),
        "images_per_s": round(batch * steps / secs, 1),
        "data_fraction": round(sum(r["data_fraction"] for r in rows[1:]) / max(len(rows) - 1, 1), 3),
    }  # fmt: skip


def run_variant(args, root: Path, vdir: Path, ldir: Path, attn: str) -> dict:
    from vlmkit.config import recipe_from_dict
    from vlmkit.models.checkpoint_io import load_checkpoint
    from vlmkit.train.run import train

    out = root / f"run-{attn}"
    shutil.rmtree(out, ignore_errors=True)  # a fresh run each time
    recipe = recipe_from_dict(recipe_tree(vdir, ldir, attn, args.steps, args.batch, args.device, VISIONS[args.vision]["image_size"]))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    final = train(recipe, data_dir=root / "world", out_dir=out)
    wall = time.perf_counter() - t0
    rows, speed = timed_window(out / "metrics.jsonl", args.skip, args.batch)
    model, _ = load_checkpoint(final, device="cpu")
    flops = model_flops_per_step(model, rows, args.batch)
    return {
        "bench": "gpu_train_throughput", "variant": attn, **speed,
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
        "model_tflops_per_step": round(flops / 1e12, 2), "mfu": round(flops / speed["step_s"] / (args.peak_tflops * 1e12), 4),
        "final_loss": rows[-1]["loss"], "wall_s_incl_setup": round(wall, 1),
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/gpu-bench")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--skip", type=int, default=10, help="warm-up steps left out of the timing")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--variants", default="sdpa,eager")
    p.add_argument("--llm", default="smollm2-360m", choices=sorted(LLMS))
    p.add_argument("--vision", default="siglip-base", choices=sorted(VISIONS))
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--device", default="cuda", help="cpu only to smoke-test the script (--llm tiny --vision tiny)")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    vdir, ldir = make_backbones(root, args.llm, args.vision)
    from vlmkit.data.worlds.shapes import generate_world

    generate_world(root / "world", n_train=WORLD_TRAIN, n_test=8, seed=0, size=VISIONS[args.vision]["image_size"])
    print(json.dumps({
        "bench": "gpu_train_throughput", "machine": {
            "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None, "torch": torch.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version(), "peak_tflops_bf16": args.peak_tflops},
        "llm": args.llm, "vision": args.vision,
    }), flush=True)  # fmt: skip
    for attn in args.variants.split(","):
        print(json.dumps(run_variant(args, root, vdir, ldir, attn)), flush=True)


if __name__ == "__main__":
    main()
