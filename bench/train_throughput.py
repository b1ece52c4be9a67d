"""Training throughput of vlmkit (packed and unpacked rows) against Hugging Face LLaVA.

    python bench/train_throughput.py [--batch 16] [--steps 40] [--warmup 3] [--grad-accum 1] [--pack-tokens 256]
        [--llm-hidden 256] [--llm-layers 4] [--vision-patch 16] [--threads N]
        [--device cpu|cuda] [--json-out docs/data/train_throughput_cpu.json]
        [--vision-type vit|siglip] [--llm-kv-heads K] [--attn auto|sdpa|varlen] [--compile]
        [--skip-alone] [--reuse-prepared]    (the GPU runs: bench/gpu_packed_mfu.sh)

What is compared: the same model, the same weights, the same samples in the same order, trained
with AdamW (``torch.optim.AdamW``, lr 1e-4, betas (0.9, 0.95), no weight decay, no gradient
clipping, every part trainable), fp32 on CPU, bf16 autocast on CUDA. The vlmkit variants use
the fused AdamW kernel, as vlmkit's trainer does (``train.stages.build_optimizer``); the plain
loop keeps PyTorch's default (a per-tensor loop on CPU), or with ``--same-optimizer`` gets the
fused kernel too:

* ``vlmkit-packed``: ``VisionLanguageModel`` on rows packed by ``data.packing.pack_collate``
  (each step's ``--batch`` samples packed into rows of at most ``--pack-tokens`` tokens, as
  few rows as first-fit decreasing needs, balanced; forward with ``position_ids`` and no attention mask, so that transformers builds the
  block-diagonal causal mask); loss = ``loss_sum / n_targets``;
* ``vlmkit-unpacked``: the same model on right-padded batches from ``data.collate.collate``;
* ``hf-llava``: ``transformers.LlavaForConditionalGeneration`` loaded from vlmkit's ``hf-llava``
  export of the same checkpoint, trained by a plain loop (forward with ``labels=``,
  ``.loss.backward()``, ``optimizer.step()``) on the same right-padded batches (the image
  token already expanded to ``tokens_per_image`` copies, as LLaVA expects).

vlmkit's advantages are packing, in ``vlmkit-packed``, and the fused optimizer, in both of its
variants (``forward_backward_optimizer_s`` shows each part). ``--loss-chunk-tokens N`` (off by default, and off in the recorded runs) makes
both vlmkit variants compute the loss N target positions at a time, logits only at target
positions (``train.losses.chunked_next_token_loss``); with this vocabulary of about 540 tokens
the LM head is a small part of the step, so it is not used. Attention (printed as ``attn``):
hf-llava uses transformers' ``sdpa``; the vlmkit variants vlmkit's default ``auto``, which on a
CPU is the same SDPA call with the mask transformers builds (block-diagonal for packed rows), or
``--attn sdpa`` (transformers' own) or ``--attn varlen`` (``models.varlen_attention``: on CPU,
SDPA over groups of similar-length samples; on CUDA, ``auto`` and ``varlen`` are the varlen kernel). The losses of the three variants agree step by step
(``loss_max_abs_diff_vs_hf-llava``): they train the same thing.

Model (options): the ``tiny-vit`` preset (a CLIP vision tower, 64 px, patch 16: 16 tokens per
image, as the recipe's CNN encoder gives; 128 wide, 4 layers), the ``mlp2x_gelu`` connector and
the ``tiny-llama`` preset (256 wide, 4 layers, 4 heads, MLP 768, tied embeddings) over the tiny
BPE tokenizer trained on the world's text. Random weights; nothing is downloaded.

Data: the shapes world (``generate_world(seed=0, size=64)``) and the instruct stage of the
repository's ``shapes-tiny`` recipe: its sources (binding drills, VQA, POPE, grounding,
mcq/dialogue/compare, text-only, captions) drawn by its mixture weights and seed, in mixture
order, not grouped by length: the natural spread of lengths (about 20 to 160 tokens, median
about 40, at 16 tokens per image; the stage's ``max_seq_len`` 192 drops none). The samples are
encoded once, up front, by vlmkit's own encoder (``train.run.make_encoder``) and saved; every
variant reads the same token ids and pixel tensors. Batches are collated (packed or padded)
before the timing; their cost is reported apart as ``collate_ms_per_step``.

Why ``--pack-tokens 256``: transformers' SDPA path has no variable-length kernel on CPU, so a
packed row's attention is computed densely over the whole row (T^2, the block-diagonal mask
only zeroes it), and rows much longer than the samples waste work; 256 is the smallest round
budget above ``max_seq_len``. (With flash-attention's varlen path on a GPU it would not matter.)

Timing, fair to every variant: all three train in one fresh process, step by step in rotated
order (step k: a b c, then b c a, c a b, ...), so that busy moments of a shared machine fall on
all of them alike; the same thread count (``torch.set_num_threads``) and seed. ``--warmup``
steps are left out, then ``--steps`` steps are timed, each from the forward to the end of
``optimizer.step()`` and ``zero_grad`` (the split is ``forward_backward_optimizer_s``). With
``--grad-accum A`` (every variant alike) the optimizer steps after every A-th batch, each
batch's loss divided by A, so its cost is shared by A batches as in a run that accumulates;
``step_s`` stays per batch, and ``step_s_median`` is the median optimizer step's time over A
(also without accumulation, the median step; ``mfu_at_median_step`` uses it). Then
each variant runs once more alone in a fresh process for its peak memory (and its throughput
alone, ``alone_samples_per_s``): on CPU the process's ``ru_maxrss`` (interpreter, data, model
and optimizer included; ``rss_before_train_mib`` is the part before the first step), on CUDA
``torch.cuda.max_memory_allocated``.

MFU (model FLOPs utilisation): the usual 6 x parameters x tokens accounting (forward 2, backward
4 FLOPs per parameter and token), counting useful work only (no padding, no attention scores),
so the FLOPs per step are the same for the three variants:

    FLOPs/step = 6 * N_llm * real_tokens                   (image tokens included; the tied
                                                            embedding counted once, as the LM head)
               + 6 * N_connector * images * tokens_per_image
               + 6 * N_vision * images * vision_seq        (the vision tower per image patch:
                                                            vision_seq = patches + CLS = 17 at the
                                                            defaults; the parameters of the blocks
                                                            it runs: vlmkit stops after the feature
                                                            layer, -2, where hf-llava also runs the
                                                            last block, forward only)
    MFU = FLOPs/step / step_s / peak

The peak on CPU is measured in the same run, before and after the variants: the best rate of
fp32 ``torch.mm`` on 2048 x 2048 matrices with the same threads (MFU on CPU is thus a fraction of
what this CPU's best matmul reaches); on CUDA it is ``--peak-tflops`` (default 989, dense bf16 of
an H100 / H200).

Output: a JSON line about the machine (platform, CPUs, torch, threads, load average) and setup,
one JSON line per variant (samples/s, target / real / padded tokens/s, padding fraction, peak
memory, step time and its split, MFU, first and last loss) and, last, one JSON object with
``ratio_packed`` (samples/s of vlmkit-packed over hf-llava), ``ratio_unpacked``
(vlmkit-unpacked over hf-llava), ``samples_per_s`` and ``mfu`` (dicts by variant),
``padding_fraction`` and ``machine``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("vlmkit-packed", "vlmkit-unpacked", "hf-llava")
LR = 1e-4


# ---------------------------------------------------------------------- options


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="runs/train-throughput", help="world, checkpoint, export and encoded samples")
    p.add_argument("--batch", type=int, default=16, help="samples per step, every variant")
    p.add_argument("--steps", type=int, default=40, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    p.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches (of --batch samples) per optimizer step, every variant; --steps and "
                        "--warmup count micro-batches and must be multiples of it")
    p.add_argument("--pack-tokens", type=int, default=256, help="row budget of vlmkit-packed (>= --max-len)")
    p.add_argument("--max-len", type=int, default=None,
                   help="encoder limit, longer samples are skipped; default: the instruct stage's max_seq_len (192)")
    p.add_argument("--loss-chunk-tokens", type=int, default=0, help="vlmkit variants: chunked loss (0: off)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--vision-patch", type=int, default=16, help="16: 16 tokens per 64 px image, as the recipe's CNN")
    p.add_argument("--vision-hidden", type=int, default=128)
    p.add_argument("--vision-layers", type=int, default=4)
    p.add_argument("--llm-hidden", type=int, default=256)
    p.add_argument("--llm-layers", type=int, default=4)
    p.add_argument("--llm-heads", type=int, default=4)
    p.add_argument("--llm-kv-heads", type=int, default=None, help="grouped-query attention; default: --llm-heads")
    p.add_argument("--llm-intermediate", type=int, default=None, help="default: 3 x --llm-hidden")
    p.add_argument("--vision-type", default="vit", choices=("vit", "siglip"),
                   help="vit: the tiny-vit preset (CLIP tower, CLS token); siglip: a SiglipVisionModel saved "
                        "locally and loaded by path, as a hub checkpoint is (no CLS token)")
    p.add_argument("--attn", default="auto", choices=("auto", "sdpa", "varlen"),
                   help="the vlmkit variants' LLM attention (llm.attn_implementation, default auto: on CPU the "
                        "block-diagonal mask with SDPA); hf-llava always uses sdpa")
    p.add_argument("--compile", action="store_true", help="vlmkit variants: torch.compile each block (train.compile)")
    p.add_argument("--same-optimizer", action="store_true",
                   help="hf-llava gets vlmkit's fused AdamW too (by default it keeps PyTorch's default, as a plain loop does)")
    p.add_argument("--skip-alone", action="store_true",
                   help="no separate run per variant; peak memory is then the interleaved process's")
    p.add_argument("--reuse-prepared", action="store_true",
                   help="keep --work's world, checkpoint and samples when they were made with the same model and data "
                        "options (the GPU runs compare attention kernels and compilation on one preparation)")
    p.add_argument("--world-train", type=int, default=600, help="scenes in the generated world")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads in every variant")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--peak-tflops", type=float, default=989.0, help="CUDA: the card's dense bf16 peak")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--json-out", default=None, help="also write the last JSON object to this file")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: "interleaved" or "alone:VARIANT"
    args = p.parse_args(argv)
    if args.llm_intermediate is None:
        args.llm_intermediate = 3 * args.llm_hidden
    if args.llm_kv_heads is None:
        args.llm_kv_heads = args.llm_heads
    if args.grad_accum < 1 or args.steps % args.grad_accum or args.warmup % args.grad_accum:
        p.error(f"--steps {args.steps} and --warmup {args.warmup} must be multiples of --grad-accum {args.grad_accum}")
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")
    return args


def machine_info(args) -> dict:
    import torch

    info = {"platform": platform.platform(), "processor": cpu_model() or platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "threads": args.threads, "device": args.device}  # fmt: skip
    if args.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    return info


def cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        return None


def matmul_peak(threads: int, n: int = 2048, reps: int = 5, trials: int = 5) -> float:
    """Best fp32 ``torch.mm`` rate (FLOP/s) of n x n matrices on this CPU with ``threads`` threads."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        torch.mm(a, b)
    best = 0.0
    for _ in range(trials):
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0))
    return best


# ---------------------------------------------------------------------- preparation (once)


def siglip_tower(args, work: Path) -> Path:
    """A SigLIP vision tower of the options' sizes, random weights, saved as a hub checkpoint is."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    path = work / "siglip-vision"
    if not (path / "config.json").exists():
        heads = max(1, args.vision_hidden // 64)
        config = SiglipVisionConfig(hidden_size=args.vision_hidden, intermediate_size=4 * args.vision_hidden,
                                    num_hidden_layers=args.vision_layers, num_attention_heads=heads,
                                    image_size=args.image_size, patch_size=args.vision_patch)  # fmt: skip
        SiglipVisionModel(config).save_pretrained(path)
    return path


def bench_recipe(args, work: Path):
    """The repository's shapes-tiny recipe with this benchmark's model."""
    import vlmkit
    from vlmkit.config import load_recipe, recipe_from_dict

    tree = load_recipe(Path(vlmkit.__file__).parent / "recipes" / "shapes-tiny.yaml").model_dump(mode="json")
    if args.vision_type == "siglip":
        tree["model"]["vision"] = {"name": str(siglip_tower(args, work).resolve()), "image_size": args.image_size}
    else:
        tree["model"]["vision"] = {"name": "tiny-vit", "image_size": args.image_size,
                                   "overrides": {"patch_size": args.vision_patch, "hidden_size": args.vision_hidden,
                                                 "intermediate_size": 4 * args.vision_hidden,
                                                 "num_hidden_layers": args.vision_layers}}  # fmt: skip
    tree["model"]["llm"] = {"name": "tiny-llama", "attn_implementation": args.attn,
                            "overrides": {"hidden_size": args.llm_hidden, "intermediate_size": args.llm_intermediate,
                                          "num_hidden_layers": args.llm_layers, "num_attention_heads": args.llm_heads,
                                          "num_key_value_heads": args.llm_kv_heads}}  # fmt: skip
    tree["world"] = {**tree["world"], "train": args.world_train, "test": 1, "seed": 0, "size": args.image_size}
    for stage in tree["stages"]:
        stage["max_seq_len"] = args.max_len or stage["max_seq_len"]
    return recipe_from_dict(tree, source="bench/train_throughput.py")


def encode_samples(stage, sources, encode, n: int, seed: int) -> tuple[list[dict], int]:
    """The first ``n`` samples the stage's mixture draws, encoded; and how many were skipped."""
    from vlmkit.data.bad_samples import BadSampleError
    from vlmkit.data.mixture import MixtureSampler

    mixture = MixtureSampler({k: len(v) for k, v in sources.items()}, stage.data, seed=seed)
    out, skipped = [], 0
    while len(out) < n:
        name, index = mixture.next()
        try:
            enc, pixels = encode(sources[name].samples[index], sources[name].root)
        except BadSampleError:
            skipped += 1
            continue
        out.append({"input_ids": enc.input_ids, "labels": enc.labels, "n_images": enc.n_images,
                    "sample_id": enc.sample_id, "pixels": [p.clone() for p in pixels]})  # fmt: skip
    return out, skipped


def prepare(args, work: Path) -> dict:
    """World, tokenizer, model checkpoint, its hf-llava export and the encoded samples, under ``work``."""
    import torch

    from vlmkit.data.dataset import load_sources
    from vlmkit.data.worlds.shapes import generate_world
    from vlmkit.models.checkpoint_io import save_checkpoint
    from vlmkit.models.export import export_checkpoint
    from vlmkit.models.vlm import VisionLanguageModel
    from vlmkit.train.run import build_tokenizer, make_encoder, seed_everything

    recipe = bench_recipe(args, work)
    stage = next(s for s in recipe.stages if s.name == "instruct")
    if args.pack_tokens < stage.max_seq_len:
        raise SystemExit(f"--pack-tokens {args.pack_tokens} is below the longest sample allowed ({stage.max_seq_len})")
    w = recipe.world
    generate_world(work / "world", n_train=w.train, n_test=w.test, seed=w.seed, size=w.size)
    for sub in ("tokenizer", "ckpt", "hf"):  # never reuse a previous run's model (its options may differ)
        shutil.rmtree(work / sub, ignore_errors=True)
    sources = load_sources(recipe.data, work / "world", names=list(stage.data))
    tokenizer = build_tokenizer(recipe, sources, work / "world", work)
    seed_everything(args.seed)
    model = VisionLanguageModel.from_config(recipe.model, tokenizer)
    ckpt = save_checkpoint(model, tokenizer, work / "ckpt", recipe=recipe)
    if "hf-llava" in args.variants.split(","):
        export_checkpoint(ckpt, work / "hf", format="hf-llava", overwrite=True)
    template, encode_for = make_encoder(recipe, model, tokenizer)
    n = (args.warmup + args.steps) * args.batch
    samples, skipped = encode_samples(stage, sources, encode_for(stage), n, recipe.seed)
    torch.save({"samples": samples, "pad_id": template.pad_token_id}, work / "samples.pt")
    lengths = sorted(len(s["input_ids"]) for s in samples)
    return {"samples": n, "skipped_too_long": skipped, "tokens_per_image": model.tokens_per_image,
            "vocab": len(tokenizer), "length_min_median_max": [lengths[0], lengths[len(lengths) // 2], lengths[-1]],
            "mixture": stage.data, "params": param_counts(model)}  # fmt: skip


def param_counts(model) -> dict:
    """Parameters of each part (the LLM's tied embedding counted once; of the vision tower, those
    its forward uses: not the blocks after the feature layer)."""
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {"vision": model.vision.parameters_run(), "connector": count(model.connector), "llm": count(model.llm)}


# ---------------------------------------------------------------------- one variant (child process)


def load_items(work: Path):
    import torch

    from vlmkit.data.template import Encoded

    data = torch.load(work / "samples.pt", weights_only=True)  # our own tensors and lists: no pickled code
    items = [Encoded(s["input_ids"], s["labels"], s["n_images"], s["sample_id"]) for s in data["samples"]]
    return items, [s["pixels"] for s in data["samples"]], data["pad_id"]


def make_batches(variant: str, items, pixels, pad_id: int, args) -> list[dict]:
    """The steps' batches, ``args.batch`` samples each, in the same order for every variant."""
    from vlmkit.data.collate import collate
    from vlmkit.data.packing import pack_collate

    batches = []
    for start in range(0, len(items), args.batch):
        its, pxs = items[start : start + args.batch], pixels[start : start + args.batch]
        if variant == "vlmkit-packed":
            b = pack_collate(its, pxs, pad_id, args.pack_tokens)
        else:
            b = collate(its, [p for px in pxs for p in px], pad_id, padding_side="right")
        batches.append({k: b.get(k) for k in ("input_ids", "attention_mask", "labels", "pixel_values", "position_ids")})
    return batches


def batch_counts(batch: dict, tokens_per_image: int, vision_seq: int) -> dict:
    labels = batch["labels"]
    n_images = 0 if batch["pixel_values"] is None else int(batch["pixel_values"].shape[0])
    return {"real": int(batch["attention_mask"].sum()), "slots": labels.numel(), "rows": labels.shape[0],
            "targets": int((labels[:, 1:] != -100).sum()), "images": n_images,
            "image_tokens": n_images * tokens_per_image, "vision_tokens": n_images * vision_seq}  # fmt: skip


def use_attention(model, attn: str) -> None:
    """Switch the LLM's attention kernel after loading (a reused preparation may have been
    saved with another ``--attn``); the weights are the same."""
    from vlmkit.models.varlen_attention import hf_attn_implementation

    llm_cfg = model.config.llm.model_copy(update={"attn_implementation": attn})
    model.config = model.config.model_copy(update={"llm": llm_cfg})
    model.llm.set_attn_implementation(hf_attn_implementation(llm_cfg))


def load_model(variant: str, work: Path, device, loss_chunk_tokens: int | None, attn: str = "sdpa",
               compile_blocks: bool = False):  # fmt: skip
    """(model, step function ``batch -> loss tensor``) of the variant."""
    import torch

    if variant == "hf-llava":
        from transformers import LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(work / "hf", dtype=torch.float32).to(device)

        def forward(batch):
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         pixel_values=batch["pixel_values"], labels=batch["labels"]).loss  # fmt: skip

    else:
        from vlmkit.models.checkpoint_io import load_checkpoint

        model, _ = load_checkpoint(work / "ckpt", device=device)
        use_attention(model, attn)
        if compile_blocks:
            from vlmkit.train.run import compile_blocks as compile_each_block

            compile_each_block(model)

        def forward(batch):
            out = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                        labels=batch["labels"], position_ids=batch["position_ids"], image_layouts=None,
                        loss_chunk_tokens=loss_chunk_tokens)  # fmt: skip
            return out.loss_sum / out.n_targets

    model.train()
    return model, forward


def attn_implementations(model) -> dict:
    """The attention kernels the model's parts use (they should agree across variants)."""
    found = {}
    for module in model.modules():
        cfg = getattr(module, "config", None)
        impl = getattr(cfg, "_attn_implementation", None)
        if impl is not None and getattr(cfg, "model_type", None) and cfg.model_type not in found:
            found[cfg.model_type] = impl
    return found


def to_device(batch: dict, device) -> dict:
    return {k: (v.to(device) if v is not None else None) for k, v in batch.items()}


class Variant:
    """One variant's batches, model and optimizer; ``step(k)`` trains on batch ``k``."""

    def __init__(self, name: str, args, work: Path, data, setup: dict) -> None:
        import torch

        items, pixels, pad_id = data
        self.name, self.args = name, args
        self.device = torch.device(args.device)
        t0 = time.perf_counter()
        self.batches = make_batches(name, items, pixels, pad_id, args)
        self.collate_s = time.perf_counter() - t0
        self.counts = [batch_counts(b, setup["tokens_per_image"], setup["vision_seq"]) for b in self.batches]
        self.model, self.forward = load_model(name, work, self.device, args.loss_chunk_tokens or None, args.attn,
                                              args.compile)  # fmt: skip
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.0,
                                           fused=self.fused_optimizer())  # fmt: skip
        self.times: list[float] = []
        self.phases: list[tuple[float, float, float]] = []  # forward, backward, optimizer seconds
        self.losses: list[float] = []

    def fused_optimizer(self) -> bool:
        """vlmkit's variants: what ``train.stages.build_optimizer`` picks (fused AdamW on CPU and
        CUDA); the plain loop: PyTorch's default (a for-loop on CPU, foreach on CUDA), or fused
        too with ``--same-optimizer``."""
        from vlmkit.train.stages import fused_adamw_supported

        if self.name == "hf-llava" and not self.args.same_optimizer:
            return False
        return fused_adamw_supported([{"params": list(self.model.parameters())}])

    def step(self, k: int) -> None:
        """Forward and backward on batch ``k``, and the optimizer step after every
        ``--grad-accum``-th batch, timed (the copy to the device is not)."""
        import contextlib

        import torch

        cuda = self.device.type == "cuda"
        batch = to_device(self.batches[k], self.device)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        sync()
        t0 = time.perf_counter()
        accum = self.args.grad_accum
        with autocast:
            loss = self.forward(batch)
        sync()
        t1 = time.perf_counter()
        (loss / accum if accum > 1 else loss).backward()
        sync()
        t2 = time.perf_counter()
        if (k + 1) % accum == 0:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        sync()
        t3 = time.perf_counter()
        self.times.append(t3 - t0)
        self.phases.append((t1 - t0, t2 - t1, t3 - t2))
        self.losses.append(float(loss.detach()))

    def summary(self) -> dict:
        """Throughput over the steps after the warm-up."""
        w, accum = self.args.warmup, self.args.grad_accum
        times = self.times[w:]
        secs, n = sum(times), len(times)
        # the median optimizer step (accum micro-batches), per micro-batch
        per_update = sorted(sum(times[i : i + accum]) / accum for i in range(0, n, accum))
        tot = {key: sum(c[key] for c in self.counts[w:]) for key in self.counts[0]}
        return {"steps_timed": n, "batch": self.args.batch, "grad_accum": accum, "step_s": round(secs / n, 4),
                "step_s_median": round(per_update[len(per_update) // 2], 4),
                "forward_backward_optimizer_s": [round(sum(p[i] for p in self.phases[w:]) / n, 4) for i in range(3)],
                "samples_per_s": round(self.args.batch * n / secs, 2),
                "target_tokens_per_s": round(tot["targets"] / secs, 1),
                "real_tokens_per_s": round(tot["real"] / secs, 1),
                "padded_tokens_per_s": round(tot["slots"] / secs, 1),
                "padding_fraction": round(1 - tot["real"] / tot["slots"], 4),
                "rows_per_step": round(tot["rows"] / n, 2), "row_width_mean": round(tot["slots"] / tot["rows"], 1),
                "collate_ms_per_step": round(1000 * self.collate_s / len(self.batches), 2),
                "loss_first": round(self.losses[0], 5), "loss_last": round(self.losses[-1], 5),
                "_counts": tot}  # fmt: skip


def child_setup(args):
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    work = Path(args.work)
    return work, load_items(work), json.loads((work / "setup.json").read_text())


def run_interleaved(args) -> dict:
    """Every variant in this process, step by step in rotated order (a b c, b c a, c a b, ...),
    so that a slower or faster moment of a shared machine falls on all of them alike."""
    work, data, setup = child_setup(args)
    variants = [Variant(name, args, work, data, setup) for name in args.variants.split(",")]
    for k in range(len(variants[0].batches)):
        r = k % len(variants)
        for v in variants[r:] + variants[:r]:
            v.step(k)
    out = {v.name: {**v.summary(), "attn": attn_implementations(v.model)} for v in variants}
    ref = next((v for v in variants if v.name == "hf-llava"), variants[0])
    for v in variants:  # the same weights and data: the losses must agree step by step
        diff = max(abs(a - b) for a, b in zip(v.losses, ref.losses))
        out[v.name]["loss_max_abs_diff_vs_" + ref.name] = round(diff, 6)
    if args.device == "cuda":  # every variant of this process together (one variant: its own peak)
        import torch

        for v in variants:
            out[v.name]["interleaved_peak_mem_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def run_alone(name: str, args) -> dict:
    """One variant alone in this fresh process: its peak memory (and its throughput alone)."""
    import torch

    work, data, setup = child_setup(args)
    cuda = args.device == "cuda"
    v = Variant(name, args, work, data, setup)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for k in range(len(v.batches)):
        v.step(k)
    s = v.summary()
    if cuda:
        mem = {"peak_mem_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1),
               "peak_mem_kind": "cuda_max_allocated"}
    else:
        mem = {"peak_mem_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
               "peak_mem_kind": "ru_maxrss", "rss_before_train_mib": round(rss_before / 1024, 1)}  # fmt: skip
    return {**mem, "alone_samples_per_s": s["samples_per_s"], "alone_step_s": s["step_s"]}


# ---------------------------------------------------------------------- accounting


def flops_per_step(params: dict, counts: dict, n_steps: int) -> float:
    """Model FLOPs of one step (6 N tokens per part; see the module docstring)."""
    useful = (params["llm"] * counts["real"] + params["connector"] * counts["image_tokens"]
              + params["vision"] * counts["vision_tokens"])  # fmt: skip
    return 6.0 * useful / n_steps


def with_mfu(row: dict, params: dict, peak: float) -> dict:
    flops = flops_per_step(params, row.pop("_counts"), row["steps_timed"])
    row["model_gflops_per_step"] = round(flops / 1e9, 2)
    row["achieved_gflops_per_s"] = round(flops / row["step_s"] / 1e9, 2)
    row["mfu"] = round(flops / row["step_s"] / peak, 4)
    row["mfu_at_median_step"] = round(flops / row["step_s_median"] / peak, 4)
    return row


# ---------------------------------------------------------------------- driver


PREPARATION_OPTIONS = ("batch", "steps", "warmup", "pack_tokens", "max_len", "image_size", "vision_patch",
                       "vision_hidden", "vision_layers", "vision_type", "llm_hidden", "llm_layers", "llm_heads",
                       "llm_kv_heads", "llm_intermediate", "world_train", "seed")  # fmt: skip


def preparation_key(args) -> dict:
    """The options that change the world, the model or the encoded samples."""
    return {k: getattr(args, k) for k in PREPARATION_OPTIONS}


def reusable_setup(work: Path, key: dict) -> dict | None:
    try:
        setup = json.loads((work / "setup.json").read_text())
    except (OSError, ValueError):
        return None
    ok = setup.get("prepared_with") == key and (work / "ckpt").exists() and (work / "samples.pt").exists()
    return setup if ok else None


def run_child(argv: list[str], child: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--child", child]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{child} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.child == "interleaved":
        print(json.dumps(run_interleaved(args)), flush=True)
        return
    if args.child:
        print(json.dumps(run_alone(args.child.removeprefix("alone:"), args)), flush=True)
        return
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    load_at_start = round(os.getloadavg()[0], 2)  # other work on the machine (this run has not started)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    key = preparation_key(args)
    setup = reusable_setup(work, key) if args.reuse_prepared else None
    if setup is None:
        setup = prepare(args, work)
        cls = 0 if args.vision_type == "siglip" else 1  # a CLIP ViT adds a CLS token, SigLIP none
        vision_seq = (args.image_size // args.vision_patch) ** 2 + cls
        setup.update(vision_seq=vision_seq, prepare_s=round(time.perf_counter() - t0, 1), prepared_with=key)
        (work / "setup.json").write_text(json.dumps(setup))
    elif "hf-llava" in args.variants.split(",") and not (work / "hf").exists():
        from vlmkit.models.export import export_checkpoint

        export_checkpoint(work / "ckpt", work / "hf", format="hf-llava", overwrite=True)
    machine = {**machine_info(args), "loadavg_1min_at_start": load_at_start}
    peak_before = None if args.device == "cuda" else matmul_peak(args.threads)
    print(json.dumps({"bench": "train_throughput", "machine": machine,
                      "options": {k: v for k, v in vars(args).items() if k not in ("child", "work")},
                      "setup": setup}), flush=True)  # fmt: skip
    variants = args.variants.split(",")
    timed = run_child(argv, "interleaved")
    if args.skip_alone:
        alone = {v: {"peak_mem_mib": timed[v].pop("interleaved_peak_mem_mib", None),
                     "peak_mem_kind": "cuda_max_allocated, interleaved process" if args.device == "cuda" else None}
                 for v in variants}  # fmt: skip
    else:
        alone = {v: run_child(argv, f"alone:{v}") for v in variants}
    if args.device == "cuda":
        peak, machine["peak"] = args.peak_tflops * 1e12, f"{args.peak_tflops:g} TFLOP/s bf16 (--peak-tflops)"
    else:  # the matmul rate before and after the runs (they differ when the machine was shared); MFU uses the best
        peak_after = matmul_peak(args.threads)
        peak = max(peak_before, peak_after)
        machine["peak"] = "fp32 torch.mm 2048x2048, best of before/after the runs"
        machine["matmul_gflops_per_s_before_after"] = [round(peak_before / 1e9, 1), round(peak_after / 1e9, 1)]
    machine["peak_gflops_per_s"] = round(peak / 1e9, 1)
    rows = {v: {"bench": "train_throughput", "variant": v, **with_mfu(timed[v], setup["params"], peak), **alone[v]}
            for v in variants}  # fmt: skip
    for v in variants:
        print(json.dumps(rows[v]), flush=True)
    sps = {v: rows[v]["samples_per_s"] for v in variants}
    base = sps.get("hf-llava")
    summary = {
        "ratio_packed": round(sps["vlmkit-packed"] / base, 3) if base and "vlmkit-packed" in sps else None,
        "ratio_unpacked": round(sps["vlmkit-unpacked"] / base, 3) if base and "vlmkit-unpacked" in sps else None,
        "samples_per_s": sps,
        "mfu": {v: rows[v]["mfu"] for v in variants},
        "padding_fraction": {v: rows[v]["padding_fraction"] for v in variants},
        "machine": machine,
    }
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
