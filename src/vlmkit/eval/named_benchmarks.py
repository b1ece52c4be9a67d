"""Benchmarks by name (``vlmkit eval CKPT --tasks vqav2,mmbench``): where each one lives, how
it is read, and which task scores it.

A named benchmark is a file (or a folder of parquet shards) under a local benchmark folder::

    <root>/<name>/...          root: --benchmark-dir, else $VLMKIT_BENCHMARKS,
                                     else ~/.cache/vlmkit/benchmarks

Nothing is downloaded unless asked (``--download``): evaluation must not depend on the network
by surprise, and a benchmark that is already there is never fetched again. Two sources:

  hf    a Hugging Face dataset repository in the layout lmms-eval uses (parquet with image
        bytes), fetched with ``huggingface_hub.snapshot_download`` restricted to the split's
        files, read by `eval.formats.hf_parquet`;
  tsv   a VLMEvalKit TSV (images inline as base64) fetched from the URL VLMEvalKit itself
        uses, read by `eval.formats.vlmevalkit`.

Every benchmark is scored by its own task, named like the benchmark (results.json has
``tasks.vqav2``, ``tasks.mmbench``, ...): the task of its kind (`eval.benchmark_tasks`,
`eval.hf_tasks`) restricted to the rows of that benchmark, so two benchmarks of the same kind
in one run are never pooled.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from vlmkit.data.bad_samples import BadSampleLog
from vlmkit.data.sample import Sample
from vlmkit.eval.tasks import TaskDef

log = logging.getLogger("vlmkit.eval")

ENV_ROOT = "VLMKIT_BENCHMARKS"


@dataclass(frozen=True)
class NamedBenchmark:
    name: str
    source: Literal["hf", "tsv"]
    location: str  # hf: the dataset repository; tsv: the URL
    layout: str  # hf: the parquet layout (`formats.hf_parquet`); tsv: the kind (mcq, yesno, vqa)
    split: str = ""  # hf: the split whose files are read
    patterns: tuple[str, ...] = ()  # hf: the repository files to fetch (fnmatch patterns)
    circular: bool = False  # tsv mcq: CircularEval (MMBench's protocol)
    description: str = ""


def _hf(name: str, repo: str, layout: str, split: str, folder: str = "data", what: str = "") -> NamedBenchmark:
    return NamedBenchmark(name, "hf", repo, layout, split, (f"{folder}/{split}-*.parquet",), description=what)


_VLMEVAL = "https://opencompass.openxlab.space/utils/VLMEval/"

BENCHMARKS: dict[str, NamedBenchmark] = {
    b.name: b
    for b in (
        _hf("vqav2", "lmms-lab/VQAv2", "vqav2", "validation", what="VQAv2 val, VQA accuracy"),
        _hf("textvqa", "lmms-lab/textvqa", "textvqa", "validation", what="TextVQA val, VQA accuracy"),
        _hf("docvqa", "lmms-lab/DocVQA", "docvqa", "validation", folder="DocVQA", what="DocVQA val, ANLS"),
        _hf("chartqa", "lmms-lab/ChartQA", "chartqa", "test", what="ChartQA test, relaxed accuracy"),
        _hf("coco_caption", "lmms-lab/COCO-Caption2017", "coco_caption", "val",
            what="COCO 2017 val captions, BLEU/ROUGE-L/CIDEr-D"),
        _hf("refcoco", "lmms-lab/RefCOCO", "refcoco", "val", what="RefCOCO val, Acc@IoU0.5"),
        NamedBenchmark("mmbench", "tsv", _VLMEVAL + "MMBench_DEV_EN.tsv", "mcq", circular=True,
                       description="MMBench dev (en), CircularEval"),
        NamedBenchmark("mmstar", "tsv", _VLMEVAL + "MMStar.tsv", "mcq", description="MMStar, single pass"),
        NamedBenchmark("mme", "tsv", _VLMEVAL + "MME.tsv", "yesno", description="MME, acc and acc+"),
    )
}  # fmt: skip


class BenchmarkNotFound(FileNotFoundError):
    """A named benchmark that is neither in the benchmark folder nor allowed to be downloaded."""


def benchmark_root(root: str | Path | None = None) -> Path:
    if root is not None:
        return Path(root)
    env = os.environ.get(ENV_ROOT)
    return Path(env) if env else Path.home() / ".cache" / "vlmkit" / "benchmarks"


def get_benchmark(name: str) -> NamedBenchmark:
    if name not in BENCHMARKS:
        raise KeyError(f"unknown benchmark {name!r}; known: {sorted(BENCHMARKS)}")
    return BENCHMARKS[name]


def _local_files(bench: NamedBenchmark, folder: Path) -> list[Path]:
    if bench.source == "tsv":
        path = folder / Path(bench.location).name
        return [path] if path.is_file() else []
    import fnmatch

    files = sorted(p for p in folder.rglob("*.parquet") if p.is_file())
    rel = [(p, p.relative_to(folder).as_posix()) for p in files]
    # the split's files when the folder mirrors the repository; else every parquet file in it
    chosen = [p for p, r in rel if any(fnmatch.fnmatch(r, pat) for pat in bench.patterns)]
    return chosen or files


def _download_url(url: str, dest: Path) -> None:
    """Stream ``url`` to ``dest`` through a temporary file, renamed only when complete."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
        while chunk := response.read(1 << 20):
            f.write(chunk)
    os.replace(tmp, dest)


def _download(bench: NamedBenchmark, folder: Path) -> None:
    log.info("downloading benchmark %s from %s into %s", bench.name, bench.location, folder)
    if bench.source == "tsv":
        _download_url(bench.location, folder / Path(bench.location).name)
        return
    from huggingface_hub import snapshot_download  # a dependency of transformers

    snapshot_download(repo_id=bench.location, repo_type="dataset", allow_patterns=list(bench.patterns),
                      local_dir=str(folder))  # fmt: skip


def locate(name: str, root: str | Path | None = None, download: bool = False) -> list[Path]:
    """The local files of benchmark ``name`` (fetched first when missing and ``download``)."""
    bench = get_benchmark(name)
    folder = benchmark_root(root) / name
    files = _local_files(bench, folder) if folder.is_dir() else []
    if not files and download:
        _download(bench, folder)
        files = _local_files(bench, folder)
    if not files:
        what = (f"the split '{bench.split}' of {bench.location} (parquet)" if bench.source == "hf"
                else f"{Path(bench.location).name} from {bench.location}")  # fmt: skip
        raise BenchmarkNotFound(
            f"benchmark {name!r} is not in {folder}: put {what} there, or pass --download to fetch it"
        )
    return files


def read_benchmark(name: str, root: str | Path | None = None, download: bool = False,
                   bad_log: BadSampleLog | None = None) -> tuple[list[Sample], list[Path]]:  # fmt: skip
    """The benchmark's samples, each marked with ``meta["benchmark_name"]``, and the files read."""
    from vlmkit.eval.benchmark_tasks import circular_expand, mark_benchmark

    bench = get_benchmark(name)
    files = locate(name, root, download)
    samples: list[Sample] = []
    if bench.source == "tsv":
        from vlmkit.eval.formats.vlmevalkit import read_vlmevalkit

        for path in files:
            samples += read_vlmevalkit(path, kind=bench.layout, bad_log=bad_log)
        samples = mark_benchmark(samples)
        if bench.circular:
            samples = circular_expand(samples)
    else:
        from vlmkit.eval.formats.hf_parquet import read_hf_parquet

        for path in files:
            samples += read_hf_parquet(path, layout=bench.layout, bad_log=bad_log)
    marked = [dataclasses.replace(s, meta={**s.meta, "benchmark": True, "benchmark_name": name}) for s in samples]
    return marked, files


def kind_task_name(bench: NamedBenchmark) -> str:
    """The task of the benchmark's kind, which its own task specialises."""
    if bench.source == "tsv":
        return f"benchmark_{bench.layout}" + ("_circular" if bench.circular else "")
    from vlmkit.eval.hf_tasks import task_for_layout

    return task_for_layout(bench.layout)


def named_task(name: str) -> TaskDef:
    """The task scoring benchmark ``name``: its kind's task on that benchmark's rows only."""
    from vlmkit.eval.tasks import get_task

    bench = get_benchmark(name)
    base = get_task(kind_task_name(bench))

    def accepts(sample: Sample) -> bool:
        return sample.meta.get("benchmark_name") == name and base.accepts(sample)

    return dataclasses.replace(base, name=name, description=bench.description or base.description, accepts=accepts)
