"""`check_dataset` and `vlmkit data check` on a directory holding good and bad rows."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from vlmkit.data.check import check_dataset


def png(color=(1, 2, 3)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


def row(i, image="images/good.png", q="<image>\nWhat color?"):
    r = {"id": i, "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": "red"}]}
    if image is not None:
        r["image"] = image
    return r


@pytest.fixture()
def dataset(tmp_path):
    d = tmp_path / "ds"
    (d / "images").mkdir(parents=True)
    (d / "images" / "good.png").write_bytes(png())
    (d / "images" / "corrupt.png").write_bytes(png()[:40])
    (tmp_path / "secret.png").write_bytes(png())
    rows = [
        row("ok1"),
        row("ok2"),
        row("text-only", image=None, q="What is 2 plus 2?"),
        row("gone", image="images/missing.png"),
        row("broken", image="images/corrupt.png"),
        row("escape", image="../secret.png"),
        {"id": "noconv", "image": "images/good.png"},
        row("mismatch", q="no placeholder here"),
    ]
    (d / "train.json").write_text(json.dumps(rows))
    lines = [json.dumps(row("jl-ok")), "{oops", json.dumps(row("jl-gone", image="images/nope.png"))]
    (d / "extra.jsonl").write_text("\n".join(lines) + "\n")
    (d / "world.json").write_text(json.dumps({"version": 1, "params": {}}))  # a manifest: skipped
    (d / "notes.txt").write_text("ignored")
    return d


EXPECTED_BAD = {
    "gone": "missing_image",
    "broken": "undecodable_image",
    "escape": "path_escapes_root",
    "noconv": "malformed_row",
    "mismatch": "image_count_mismatch",
    "1": "malformed_row",  # the bad JSONL line, named by its index
    "jl-gone": "missing_image",
}


def test_check_directory_names_every_bad_row(dataset):
    report = check_dataset(dataset)
    got = {row_id: reason.split(":")[0] for row_id, _, reason in report.bad}
    assert got == EXPECTED_BAD
    assert report.n_rows == 11
    assert len(report.files) == 2 and len(report.skipped_files) == 1
    wheres = {row_id: where for row_id, where, _ in report.bad}
    assert wheres["gone"] == f"{dataset / 'train.json'}:row 3"
    assert wheres["1"] == f"{dataset / 'extra.jsonl'}:row 1"
    s = report.summary()
    assert "7 bad" in s and "missing_image: 2" in s and "malformed_row: 2" in s and "11 rows" in s


def test_check_single_file_and_pixel_limit(dataset):
    report = check_dataset(dataset / "extra.jsonl")
    assert {r for r, _, _ in report.bad} == {"1", "jl-gone"} and report.n_rows == 3
    good = dataset / "good.json"
    good.write_text(json.dumps([row("a"), row("b")]))
    report = check_dataset(good)
    assert report.bad == [] and report.n_rows == 2 and report.n_images == 1  # decoded once
    assert "all good" in report.summary()
    limited = check_dataset(good, max_pixels=63)  # the image is 8x8
    assert [(r, reason.split(":")[0]) for r, _, reason in limited.bad] == [("a", "image_too_large"), ("b", "image_too_large")]


def test_check_reports_a_file_that_is_not_json(tmp_path):
    (tmp_path / "bad.json").write_text("<<< not json >>>")
    report = check_dataset(tmp_path)
    assert [(r, reason.split(":")[0]) for r, _, reason in report.bad] == [("-", "malformed_file")]


def run_cli(*args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, "-m", "vlmkit", *args], capture_output=True, text=True, env=env, timeout=120)


def test_cli_data_check_and_shapes(dataset, tmp_path):
    res = run_cli("data", "check", str(dataset))
    assert res.returncode == 1, res.stderr
    for row_id in EXPECTED_BAD:
        assert f"BAD {row_id} (" in res.stdout
    assert "BAD ok1" not in res.stdout and "7 bad" in res.stdout

    out = tmp_path / "world"
    res = run_cli("data", "shapes", "--out", str(out), "--train", "5", "--test", "3")
    assert res.returncode == 0, res.stderr
    assert (out / "train.json").exists() and len(list((out / "images").glob("*.png"))) == 8
    res = run_cli("data", "check", str(out))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "all good" in res.stdout
