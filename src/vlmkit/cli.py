"""The ``vlmkit`` command line: subcommands only; each delegates to a module of the library."""

from __future__ import annotations

import argparse
import logging
import sys


def _cmd_data_shapes(args: argparse.Namespace) -> int:
    from vlmkit.data.worlds.shapes import generate_world

    manifest = generate_world(args.out, n_train=args.train, n_test=args.test, seed=args.seed, size=args.size)
    print(f"wrote the shapes world to {args.out}: {manifest['counts']}")
    return 0


def _cmd_data_check(args: argparse.Namespace) -> int:
    from vlmkit.data.check import check_dataset

    report = check_dataset(args.path, max_pixels=args.max_pixels)
    for row_id, where, reason in report.bad:
        print(f"BAD {row_id} ({where}): {reason}")
    print(report.summary())
    return 1 if report.bad else 0


def _cmd_train(args: argparse.Namespace) -> int:
    from vlmkit.config import load_recipe
    from vlmkit.train.run import train

    recipe = load_recipe(args.recipe, args.set or [])
    try:
        final = train(
            recipe,
            data_dir=args.data,
            out_dir=args.out,
            max_steps=args.max_steps,
            save_every=args.save_every,
            resume=args.resume,
            stop_after_steps=args.stop_after_steps,
            strategy=args.strategy,
        )
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    if final is None:
        print(f"stopped after {args.stop_after_steps} steps (--stop-after-steps); resume with --resume")
        return 0
    print(f"final checkpoint: {final}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    if (args.checkpoint is None) == (args.hf_model is None):
        raise SystemExit("vlmkit eval: give a vlmkit CHECKPOINT or --hf-model PATH (one of them)")
    tasks = args.tasks.split(",") if args.tasks else None
    if args.data is None and args.benchmark is None and tasks is None:
        raise SystemExit("vlmkit eval: give --data WORLD, --tasks BENCHMARK[,..], or --benchmark FILE "
                         "(with --data IMAGES for POPE files)")
    if args.corruptions:
        from vlmkit.eval.corruptions import KINDS, evaluate_robustness

        if args.checkpoint is None or args.data is None:
            raise SystemExit("vlmkit eval --corruptions: needs a vlmkit CHECKPOINT and --data WORLD")

        kinds = KINDS if args.corruptions == "all" else tuple(args.corruptions.split(","))
        table = evaluate_robustness(args.checkpoint, args.data, args.out, kinds, args.batch_size, args.limit)
        for name, row in table.items():
            if name != "drop":
                print(f"{name:10s} " + "  ".join(f"{task} {value:.3f}" for task, value in row.items()))
        return 0
    if args.checkpoint is not None and _is_dual_encoder(args.checkpoint):
        from vlmkit.eval.contrastive_eval import evaluate_dual_encoder, summary_lines

        if args.data is None:
            raise SystemExit("vlmkit eval DUAL_ENCODER: needs --data WORLD (zero-shot and retrieval on its test split)")
        results = evaluate_dual_encoder(args.checkpoint, args.data, args.out, batch_size=args.batch_size,
                                        limit=args.limit)  # fmt: skip
        print("\n".join(summary_lines(results)))
        return 0
    if args.suite:
        from vlmkit.eval.suites import parse_suites, run_suites, summary_lines

        if args.data is None:
            raise SystemExit("vlmkit eval --suite: needs --data WORLD (the suites are built from the shapes world)")
        model = args.checkpoint if args.checkpoint is not None else None
        if model is None:
            raise SystemExit("vlmkit eval --suite: needs a vlmkit CHECKPOINT")
        result = run_suites(model, args.data, args.out, suites=parse_suites(args.suite), batch_size=args.batch_size,
                            limit=args.limit, seed=args.suite_seed, placement=args.typographic_placement)  # fmt: skip
        print("\n".join(summary_lines(result)))
        return 0
    from vlmkit.eval.named_benchmarks import BenchmarkNotFound

    try:
        results = _run_evaluate(args, tasks)
    except BenchmarkNotFound as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from vlmkit.eval.report import summary_table

    print(summary_table(results))
    return 0


def _is_dual_encoder(path: str) -> bool:
    import json
    from pathlib import Path

    config = Path(path) / "config.json"
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("format") == "vlmkit-dual-encoder"
    except (OSError, ValueError, AttributeError):
        return False


def _cmd_clip_score(args: argparse.Namespace) -> int:
    from vlmkit.data.bad_samples import BadSampleLog
    from vlmkit.infer.embeddings import score_file

    out = args.out or str(args.data) + ".clip_scores.jsonl"
    summary = score_file(args.checkpoint, args.data, out, root=args.root, batch_size=args.batch_size,
                         bad_log=BadSampleLog(max_fraction=args.max_bad_fraction))  # fmt: skip
    mean = "n/a" if summary["mean"] is None else f"{summary['mean']:.4f}"
    print(f"scored {summary['scored']} of {summary['rows']} rows (mean CLIP score {mean}; {summary['bad']} bad) -> {out}")
    return 0


def _cmd_fusion(args: argparse.Namespace) -> int:
    if args.fusion_command == "train":
        from vlmkit.train.fusion_objectives import train_fusion

        final = train_fusion(args.data, args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                             seed=args.seed, easy_ratio=args.easy_ratio, save_every=args.save_every or None,
                             resume=args.resume, stop_after_steps=args.stop_after_steps)  # fmt: skip
        if final is None:
            print(f"stopped after {args.stop_after_steps} steps; continue with --resume")
            return 0
        print(f"final checkpoint: {final}")
        return 0
    import json

    from vlmkit.eval.fusion_eval import evaluate_fusion

    results = evaluate_fusion(args.checkpoint, args.data, out_path=args.out, limit=args.limit)
    print(json.dumps({name: task["metrics"] for name, task in results["tasks"].items()}, indent=1))
    return 0


def _run_evaluate(args: argparse.Namespace, tasks: list[str] | None) -> dict:
    from vlmkit.eval.runner import evaluate

    return evaluate(
        args.checkpoint,
        hf_model=args.hf_model,
        benchmark=args.benchmark,
        kind=args.kind,
        circular=args.circular,
        base_llm=args.base_llm,
        tasks=tasks,
        benchmark_dir=args.benchmark_dir,
        download=args.download,
        data_dir=args.data,
        out_dir=args.out,
        blind=args.blind,
        limit=args.limit,
        batch_size=args.batch_size,
        resume=args.resume,
        image_as_text=args.image_as_text,
        judge=_eval_judge(args),
    )


def _eval_judge(args: argparse.Namespace):
    if (args.judge_url is None) != (args.judge_model is None):
        raise SystemExit("vlmkit eval: --judge-url and --judge-model go together")
    if args.judge_url is None:
        return None
    from vlmkit.eval.judge import JudgeConfig

    return JudgeConfig(base_url=args.judge_url, model=args.judge_model, api_key_env=args.judge_api_key_env,
                       cache_path=f"{args.out}/judge_cache.jsonl")  # fmt: skip


def _cmd_judge(args: argparse.Namespace) -> int:
    from vlmkit.eval.judge import JudgeConfig, JudgeError, JudgeInputError, format_summary, judge_main

    expected = 2 if args.kind == "pairwise" else 1
    if len(args.files) != expected:
        raise SystemExit(f"vlmkit judge {args.kind}: give {expected} file(s), got {len(args.files)}")
    try:
        config = JudgeConfig(base_url=args.base_url, model=args.judge_model, api_key_env=args.api_key_env,
                             temperature=args.temperature, max_tokens=args.max_tokens, timeout_s=args.timeout,
                             max_retries=args.max_retries, http_retries=args.http_retries,
                             cache_path=args.cache or f"{args.out}/judge_cache.jsonl")  # fmt: skip
        results = judge_main(args.kind, args.files if expected == 2 else args.files[0], config, args.out,
                             references=args.references, names=args.names, task=args.task, limit=args.limit,
                             with_reference=not args.no_reference)  # fmt: skip
    except (JudgeError, JudgeInputError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_summary(results))
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    from vlmkit.infer.chat import chat_main

    return chat_main(
        args.checkpoint,
        images=args.image or [],
        prompt=args.prompt,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
    )


def _cmd_ablate(args: argparse.Namespace) -> int:
    from vlmkit.ablate import markdown_table, run_ablation

    only = args.only.split(",") if args.only else None
    rows = run_ablation(args.file, args.out, data_dir=args.data, overrides=args.set or [], only=only)
    print(markdown_table(rows))
    print(f"table: {args.out}/table.md, {args.out}/table.png; rows: {args.out}/results.jsonl")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from vlmkit.demo import run_demo

    run_demo(out_dir=args.out, minutes=args.minutes, overrides=args.set or [], data_dir=args.data)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from vlmkit.models.checkpoint_io import CheckpointError
    from vlmkit.models.export import ExportError, describe, export_checkpoint

    try:
        out = export_checkpoint(args.checkpoint, args.out, format=args.format, overwrite=args.overwrite)
    except (ExportError, CheckpointError, FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} as {args.format} to {out}: {describe(out)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlmkit", description="Build, train, evaluate and chat with VLMs.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="generate and check datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    shapes = data_sub.add_parser("shapes", help="generate the synthetic shapes world (LLaVA JSON + PNG)")
    shapes.add_argument("--out", required=True)
    shapes.add_argument("--train", type=int, default=4000, help="number of training scenes")
    shapes.add_argument("--test", type=int, default=500, help="number of held-out scenes")
    shapes.add_argument("--seed", type=int, default=0)
    shapes.add_argument("--size", type=int, default=64, help="image side in pixels")
    shapes.set_defaults(func=_cmd_data_shapes)
    check = data_sub.add_parser("check", help="read every row and decode every image; exit 1 if any is bad")
    check.add_argument("path", help="a LLaVA JSON file, or a directory of them")
    check.add_argument("--max-pixels", type=int, default=None)
    check.set_defaults(func=_cmd_data_check)

    train = sub.add_parser("train", help="train a recipe, stage by stage")
    train.add_argument("recipe", help="a YAML recipe (path, or the name of a built-in one)")
    train.add_argument("--data", default=None, help="dataset root (default: generate the shapes world)")
    train.add_argument("--out", default=None, help="run directory (default: runs/<recipe name>)")
    train.add_argument("--max-steps", type=int, default=None, help="cap every stage at N optimizer steps")
    train.add_argument("--save-every", type=int, default=None, help="checkpoint every N steps")
    train.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint")
    train.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe key")
    train.add_argument("--strategy", choices=["ddp", "fsdp"], default=None,
                       help="data-parallel wrapping under torchrun, for every stage (default: the stages')")
    train.add_argument("--stop-after-steps", type=int, default=None, metavar="N",
                       help="stop after N optimizer steps as if killed (no final checkpoint): for resume drills")
    train.set_defaults(func=_cmd_train)

    ev = sub.add_parser("eval", help="evaluate a checkpoint on the held-out split")
    ev.add_argument("checkpoint", nargs="?", default=None, help="a vlmkit checkpoint (or use --hf-model)")
    ev.add_argument("--hf-model", default=None, metavar="PATH",
                    help="evaluate a Hugging Face LLaVA-format model (directory or hub name) instead")
    ev.add_argument("--data", default=None, help="dataset root holding test.json (the shapes world)")
    ev.add_argument("--benchmark", default=None, metavar="FILE",
                    help="a VLMEvalKit TSV (MCQ, yes/no or VQA), a POPE question file with --data IMAGES, "
                         "or an HF dataset's parquet file(s) in an lmms-eval layout (a file or a folder)")
    ev.add_argument("--tasks", default=None, metavar="NAME[,NAME]",
                    help="named benchmarks (vqav2, textvqa, docvqa, chartqa, coco_caption, refcoco, mmbench, "
                         "mmstar, mme), or a subset of the shapes tasks with --data")
    ev.add_argument("--benchmark-dir", default=None, metavar="DIR",
                    help="where named benchmarks live (default: $VLMKIT_BENCHMARKS or ~/.cache/vlmkit/benchmarks)")
    ev.add_argument("--download", action="store_true",
                    help="fetch a named benchmark that is not in the benchmark folder (needs the network)")
    ev.add_argument("--kind", default=None,
                    choices=["mcq", "yesno", "vqa", "vqav2", "textvqa", "docvqa", "chartqa", "coco_caption", "refcoco"],
                    help="the TSV's kind, or the parquet layout (default: detected from the columns)")
    ev.add_argument("--corruptions", default=None, metavar="KINDS",
                    help="robustness: also evaluate under noise,blur,jpeg (or all) at three levels each")
    ev.add_argument("--suite", default=None, metavar="SUITES",
                    help="robustness suites on the shapes world: typographic,paraphrase,option_order (or all)")
    ev.add_argument("--suite-seed", type=int, default=0, help="seed of the typographic suite's misleading words")
    ev.add_argument("--typographic-placement", choices=["near", "over"], default="near",
                    help="draw the misleading word near the asked object, or over it")
    ev.add_argument("--base-llm", default=None, metavar="PATH",
                    help="with --blind: also ask a text-only HF causal LM, for the multimodal leakage ML")
    ev.add_argument("--circular", action="store_true",
                    help="CircularEval: ask each multiple-choice question in every rotation of its options")
    ev.add_argument("--judge-url", default=None, metavar="URL",
                    help="an OpenAI-compatible endpoint that places MCQ answers no rule can read (default: none)")
    ev.add_argument("--judge-model", default=None, help="the judge's model name (with --judge-url)")
    ev.add_argument("--judge-api-key-env", default="OPENAI_API_KEY", help="the variable holding the judge's key")
    ev.add_argument("--out", required=True)
    ev.add_argument("--blind", action="store_true", help="also ask every question without its image")
    ev.add_argument("--limit", type=int, default=None, help="at most N items per task")
    ev.add_argument("--batch-size", type=int, default=32)
    ev.add_argument("--resume", action="store_true", help="skip items already in OUT/samples.jsonl")
    ev.add_argument("--image-as-text", default=None, metavar="CAPTIONER",
                    help="baseline: CAPTIONER (a checkpoint) describes each image, CHECKPOINT answers from the text")
    ev.set_defaults(func=_cmd_eval)

    judge = sub.add_parser("judge", help="LLM-as-judge through an OpenAI-compatible endpoint (docs/judges.md)")
    judge.add_argument("kind", choices=["relative", "grade", "pairwise"],
                       help="relative: LLaVA-Bench score; grade: MM-Vet 0-1; pairwise: battles for vlmkit arena")
    judge.add_argument("files", nargs="+", help="an items/predictions JSONL; pairwise: two samples.jsonl")
    judge.add_argument("--base-url", required=True, help="e.g. http://localhost:8000/v1")
    judge.add_argument("--judge-model", required=True, help="the model name the server serves")
    judge.add_argument("--out", required=True)
    judge.add_argument("--references", default=None, help="ground truth to join by id (relative, grade)")
    judge.add_argument("--names", nargs=2, default=None, metavar=("A", "B"), help="pairwise: the two models' names")
    judge.add_argument("--no-reference", action="store_true", help="pairwise: don't show the judge the target")
    judge.add_argument("--api-key-env", default="OPENAI_API_KEY", help="the environment variable holding the key")
    judge.add_argument("--temperature", type=float, default=0.0)
    judge.add_argument("--max-tokens", type=int, default=512)
    judge.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    judge.add_argument("--max-retries", type=int, default=2, help="re-asks of an unreadable reply")
    judge.add_argument("--http-retries", type=int, default=3, help="retries of a failed request")
    judge.add_argument("--cache", default=None, help="answer cache (default: OUT/judge_cache.jsonl)")
    judge.add_argument("--task", default=None, help="only the rows of this task")
    judge.add_argument("--limit", type=int, default=None)
    judge.set_defaults(func=_cmd_judge)

    cs = sub.add_parser("clip-score", help="score each image-caption row of a LLaVA JSON file with a dual encoder")
    cs.add_argument("checkpoint", help="a dual encoder (a contrastive run's final/)")
    cs.add_argument("--data", required=True, help="a LLaVA JSON file: each row's first image against its answer")
    cs.add_argument("--root", default=None, help="image root (default: the file's folder)")
    cs.add_argument("--out", default=None, help="JSONL of scores (default: DATA.clip_scores.jsonl)")
    cs.add_argument("--batch-size", type=int, default=64)
    cs.add_argument("--max-bad-fraction", type=float, default=0.01, help="stop when more rows than this are bad")
    cs.set_defaults(func=_cmd_clip_score)

    fusion = sub.add_parser("fusion", help="a single-stream fusion encoder (ViLT-style) trained by MLM and ITM")
    fusion_sub = fusion.add_subparsers(dest="fusion_command", required=True)
    ftrain = fusion_sub.add_parser("train", help="train on the shapes world's scenes (docs/fusion.md)")
    ftrain.add_argument("--data", required=True, help="a shapes world directory")
    ftrain.add_argument("--out", required=True)
    ftrain.add_argument("--steps", type=int, default=1500)
    ftrain.add_argument("--batch-size", type=int, default=32)
    ftrain.add_argument("--lr", type=float, default=2e-3)
    ftrain.add_argument("--seed", type=int, default=0)
    ftrain.add_argument("--easy-ratio", type=float, default=0.5, help="share of ITM negatives from another scene")
    ftrain.add_argument("--save-every", type=int, default=250, help="checkpoint every N steps (0: never)")
    ftrain.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint")
    ftrain.add_argument("--stop-after-steps", type=int, default=None, metavar="N",
                        help="stop after N steps as if killed (no final checkpoint): for resume drills")
    ftrain.set_defaults(func=_cmd_fusion)
    feval = fusion_sub.add_parser("eval", help="ITM accuracy (hard negatives) and MLM accuracy on attribute words")
    feval.add_argument("checkpoint")
    feval.add_argument("--data", required=True, help="a shapes world directory (its test split)")
    feval.add_argument("--out", required=True, help="results JSON file")
    feval.add_argument("--limit", type=int, default=None)
    feval.set_defaults(func=_cmd_fusion)

    chat = sub.add_parser("chat", help="talk to a checkpoint; interactive when no prompt is given")
    chat.add_argument("checkpoint")
    chat.add_argument("prompt", nargs="?", default=None)
    chat.add_argument("--image", action="append", help="an image to show (repeatable)")
    chat.add_argument("--temperature", type=float, default=0.0)
    chat.add_argument("--top-p", type=float, default=1.0)
    chat.add_argument("--max-new-tokens", type=int, default=64)
    chat.set_defaults(func=_cmd_chat)

    demo = sub.add_parser("demo", help="generate the world, train shapes-tiny, evaluate with and without images")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--minutes", type=float, default=None, help="training budget (default: the recipe's)")
    demo.add_argument("--data", default=None, help="where to cache the world (default: <out>/world)")
    demo.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe key")
    demo.set_defaults(func=_cmd_demo)

    ablate = sub.add_parser("ablate", help="train architecture variants on shared parts and tabulate them")
    ablate.add_argument("file", help="an ablation YAML (path, or a built-in name: connectors, connectors-quick)")
    ablate.add_argument("--out", required=True, help="the ablation directory (a rerun finishes what is missing)")
    ablate.add_argument("--data", default=None, help="dataset root (default: generate the shapes world in OUT)")
    ablate.add_argument("--only", default=None, help="comma-separated variant names")
    ablate.add_argument("--set", action="append", metavar="KEY=VALUE", help="override an ablation key")
    ablate.set_defaults(func=_cmd_ablate)

    export = sub.add_parser("export", help="export a checkpoint for other tools (hf-llava: transformers, vLLM)")
    export.add_argument("checkpoint", help="a vlmkit checkpoint directory")
    export.add_argument("out", help="the directory to write (atomically)")
    export.add_argument("--format", choices=["hf-llava"], default="hf-llava",
                        help="hf-llava: LlavaForConditionalGeneration + LlavaProcessor (see docs/export.md)")
    export.add_argument("--overwrite", action="store_true", help="replace OUT if it exists and is not empty")
    export.set_defaults(func=_cmd_export)

    from vlmkit.eval.arena import add_arena_parser
    from vlmkit.eval.score import add_score_parser

    add_arena_parser(sub)
    add_score_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse binds an optional positional (the chat prompt) before any option that follows the
    # checkpoint, so `vlmkit chat CKPT --image X "question"` leaves the question unparsed.
    if extra and args.command == "chat" and args.prompt is None and not extra[0].startswith("-"):
        args.prompt, extra = " ".join(extra), []
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    from vlmkit.config import ConfigError
    from vlmkit.data.bad_samples import TooManyBadSamples
    from vlmkit.train.trainer import NonFiniteLoss

    try:
        return args.func(args)
    except (ConfigError, TooManyBadSamples, NonFiniteLoss) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
