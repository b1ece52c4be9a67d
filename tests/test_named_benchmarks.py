"""``vlmkit eval --tasks NAME``: named benchmarks found in the benchmark folder, fetched only with
--download, each scored by its own task (never pooled with another of the same kind)."""

from __future__ import annotations

import dataclasses
import http.server
import json
import threading

import pytest

from test_eval_formats import HEADER, b64, png, write_tsv
from vlmkit.eval import named_benchmarks as nb
from vlmkit.eval.named_benchmarks import BenchmarkNotFound, locate, read_benchmark
from vlmkit.eval.runner import run_evaluation


def _mmbench_rows():
    image = b64(png((24, 24)))
    return [
        ["1", image, "What colour?", "", "red", "blue", "green", "", "A", "colour", "perception", "dev"],
        ["2", "1", "What shape?", "", "circle", "square", "", "", "B", "shape", "perception", "dev"],
    ]


def _mme_rows():
    image = b64(png((24, 24), (0, 0, 200)))
    header = ["index", "image", "question", "answer", "category", "image_path"]
    rows = [["1", image, "Is it blue?", "Yes", "color", "color/1.png"],
            ["2", "1", "Is it red?", "No", "color", "color/1.png"]]  # fmt: skip
    return header, rows


@pytest.fixture
def bench_root(tmp_path):
    root = tmp_path / "benchmarks"
    (root / "mmbench").mkdir(parents=True)
    write_tsv(root / "mmbench" / "MMBench_DEV_EN.tsv", HEADER, _mmbench_rows())
    (root / "mmstar").mkdir()
    write_tsv(root / "mmstar" / "MMStar.tsv", HEADER, _mmbench_rows())
    return root


def test_each_named_benchmark_is_its_own_task(bench_root, tmp_path):
    """mmbench (CircularEval) and mmstar (single pass) are both multiple choice; one run keeps
    them apart, and mmbench asks every rotation."""
    samples = []
    for name in ("mmbench", "mmstar"):
        got, files = read_benchmark(name, bench_root)
        assert [f.name for f in files] == [nb.BENCHMARKS[name].location.rsplit("/", 1)[1]]
        samples += got
    # question 1 has 3 options (3 rotations), question 2 has 2: 5 mmbench items, 2 mmstar items
    assert sum(s.meta["benchmark_name"] == "mmbench" for s in samples) == 5

    def always_a(batch):
        return ["A"] * len(batch)

    res = run_evaluation(always_a, samples, tmp_path / "out", tasks=["mmbench", "mmstar"])
    assert res["tasks"]["mmbench"]["n"] == 5 and res["tasks"]["mmstar"]["n"] == 2
    # always "A": single pass gets question 1 (answer A) right and question 2 (B) wrong;
    # under CircularEval no question survives every rotation
    assert res["tasks"]["mmstar"]["metrics"]["accuracy"] == 0.5
    assert res["tasks"]["mmbench"]["metrics"]["accuracy"] == 0.0


def test_a_missing_benchmark_names_the_folder_and_the_flag(tmp_path):
    with pytest.raises(BenchmarkNotFound, match=r"--download") as err:
        locate("mme", tmp_path / "empty")
    assert str(tmp_path / "empty" / "mme") in str(err.value)


def test_download_fetches_a_tsv_once_and_atomically(tmp_path, monkeypatch):
    header, rows = _mme_rows()
    served = write_tsv(tmp_path / "MME.tsv", header, rows).read_bytes()
    requests = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(served)))
            self.end_headers()
            self.wfile.write(served)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/files/MME.tsv"
        monkeypatch.setitem(nb.BENCHMARKS, "mme", dataclasses.replace(nb.BENCHMARKS["mme"], location=url))
        root = tmp_path / "root"
        with pytest.raises(BenchmarkNotFound):
            locate("mme", root)  # no network use without the flag
        assert requests == []
        files = locate("mme", root, download=True)
        assert files == [root / "mme" / "MME.tsv"] and files[0].read_bytes() == served
        assert not list((root / "mme").glob("*.part"))
        samples, _ = read_benchmark("mme", root, download=True)  # already there: not fetched again
        assert requests == ["/files/MME.tsv"]
        assert [s.meta["answer"] for s in samples] == ["yes", "no"]
    finally:
        server.shutdown()


def test_vlmkit_eval_tasks_with_a_checkpoint(bench_root, tmp_path):
    """The CLI reads two named benchmarks from --benchmark-dir, scores each under its own name,
    and fingerprints every file it read."""
    from _model_helpers import make_model
    from vlmkit.cli import main
    from vlmkit.data.tokenizer import DEFAULT_CHAT_TEMPLATE
    from vlmkit.models.checkpoint_io import save_checkpoint

    model, tok = make_model()
    tok.chat_template = DEFAULT_CHAT_TEMPLATE
    ckpt = save_checkpoint(model, tok, tmp_path / "ckpt")
    out = tmp_path / "e"
    argv = ["eval", str(ckpt), "--tasks", "mmbench,mmstar", "--benchmark-dir", str(bench_root), "--out", str(out)]
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert sorted(res["tasks"]) == ["mmbench", "mmstar"]
    assert [f["path"] for f in res["data"]["files"]] == [str(bench_root / "mmbench" / "MMBench_DEV_EN.tsv"),
                                                        str(bench_root / "mmstar" / "MMStar.tsv")]  # fmt: skip
    assert all(len(f["sha256"]) == 64 for f in res["data"]["files"])
    # a missing benchmark is a clean error, not a traceback
    assert main(["eval", str(ckpt), "--tasks", "mme", "--benchmark-dir", str(bench_root), "--out",
                 str(tmp_path / "e2")]) == 2  # fmt: skip


# ------------------------------------------------------------------ Hugging Face parquet benchmarks

from test_hf_parquet import textvqa_dir, vqav2  # noqa: E402,F401  (fixtures: lmms-eval layouts)


def test_download_asks_the_hub_for_the_split_only(vqav2, tmp_path, monkeypatch):
    import shutil

    import huggingface_hub

    source, _ = vqav2
    calls = []

    def fake_snapshot_download(**kwargs):  # what the Hub would leave in local_dir
        calls.append(kwargs)
        target = tmp_path / "root" / "vqav2" / "data" / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
        return kwargs["local_dir"]

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    with pytest.raises(BenchmarkNotFound):
        read_benchmark("vqav2", tmp_path / "root")
    assert calls == []
    samples, files = read_benchmark("vqav2", tmp_path / "root", download=True, bad_log=nb.BadSampleLog())
    assert calls == [{"repo_id": "lmms-lab/VQAv2", "repo_type": "dataset",
                      "allow_patterns": ["data/validation-*.parquet"], "local_dir": str(tmp_path / "root" / "vqav2")}]  # fmt: skip
    assert len(samples) == 4 and all(s.meta["benchmark_name"] == "vqav2" for s in samples)  # 1 bad row of 5
    read_benchmark("vqav2", tmp_path / "root", download=True, bad_log=nb.BadSampleLog())
    assert len(calls) == 1  # already there: not fetched again


def test_two_vqa_benchmarks_in_one_run_are_not_pooled(vqav2, textvqa_dir, tmp_path):
    import shutil

    root = tmp_path / "root"
    shutil.copytree(vqav2[0].parent.parent, root / "vqav2")
    shutil.copytree(textvqa_dir, root / "textvqa")
    samples = []
    for name in ("vqav2", "textvqa"):
        samples += read_benchmark(name, root, bad_log=nb.BadSampleLog())[0]

    def answer_vqav2_only(batch):  # right on VQAv2 (its most common answer), empty on TextVQA
        return [s.meta["answers"][0] if s.meta["benchmark_name"] == "vqav2" else "" for s in batch]

    res = run_evaluation(answer_vqav2_only, samples, tmp_path / "out", tasks=["vqav2", "textvqa"])
    # VQAv2: 4 good rows; TextVQA validation: 3 good rows (its test split and its bad row left out)
    assert res["tasks"]["vqav2"]["n"] == 4 and res["tasks"]["textvqa"]["n"] == 3
    assert res["tasks"]["textvqa"]["metrics"]["accuracy"] == 0.0
    assert res["tasks"]["vqav2"]["metrics"]["accuracy"] > 0.5
    assert set(res["tasks"]["vqav2"]["metrics"]["by_l2_category"]) == {"how many", "is the", "what color is the"}


def test_vlmkit_eval_benchmark_on_a_parquet_folder(textvqa_dir, tmp_path):
    """`--benchmark DIR` with an HF snapshot: read per split, every file fingerprinted."""
    from _model_helpers import make_model
    from vlmkit.cli import main
    from vlmkit.data.tokenizer import DEFAULT_CHAT_TEMPLATE
    from vlmkit.models.checkpoint_io import save_checkpoint

    model, tok = make_model()
    tok.chat_template = DEFAULT_CHAT_TEMPLATE
    ckpt = save_checkpoint(model, tok, tmp_path / "ckpt")
    only_validation = tmp_path / "tv"
    (only_validation / "data").mkdir(parents=True)
    for f in (textvqa_dir / "data").glob("validation-*.parquet"):
        (only_validation / "data" / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "e"
    assert main(["eval", str(ckpt), "--benchmark", str(only_validation), "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert list(res["tasks"]) == ["benchmark_vqa"] and res["tasks"]["benchmark_vqa"]["n"] == 3
    assert [f["path"].rsplit("/", 1)[1] for f in res["data"]["files"]] == [
        "validation-00000-of-00002.parquet", "validation-00001-of-00002.parquet"]
    assert res["data"]["bad_rows"] == 1
