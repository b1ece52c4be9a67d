"""LLaVA JSON: parsing into Samples, exact round trips, and every malformed-row reason."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from vlmkit.data.bad_samples import BadSampleError, BadSampleLog
from vlmkit.data.formats.llava import (
    DatasetFormatError,
    read_llava,
    read_preferences,
    write_llava,
    write_preferences,
)
from vlmkit.data.sample import ImageRef, Part, PreferencePair, Sample, Turn


def write_json(path, obj):
    path.write_text(json.dumps(obj))
    return path


def row(i="r0", image="images/a.png", q="<image>\nWhat color is the circle?", a="red", **extra):
    r = {"id": i, "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}], **extra}
    if image is not None:
        r["image"] = image
    return r


def test_parts_split_at_image_placeholders(tmp_path):
    rows = [
        row(),
        {
            "id": "two",
            "images": ["images/a.png", "images/b.png"],
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "user", "value": "Image 1: <image>\nImage 2: <image>\nWhich has more?"},
                {"from": "assistant", "value": "first"},
            ],
        },
        {"conversations": [{"from": "human", "value": "What is 2 plus 2?"}, {"from": "gpt", "value": "4"}]},
    ]
    s1, s2, s3 = read_llava(write_json(tmp_path / "d.json", rows))
    assert s1.turns[0].parts == [Part(image=0), Part(text="\nWhat color is the circle?")]
    assert s1.turns[1] == Turn("assistant", [Part(text="red")])
    assert s1.images == [ImageRef(path="images/a.png")] and s1.meta == {}
    assert [t.role for t in s2.turns] == ["system", "user", "assistant"]
    assert s2.turns[1].parts == [
        Part(text="Image 1: "),
        Part(image=0),
        Part(text="\nImage 2: "),
        Part(image=1),
        Part(text="\nWhich has more?"),
    ]
    assert [r.path for r in s2.images] == ["images/a.png", "images/b.png"]
    assert s3.id == "2" and s3.images == [] and s3.target_text() == "4"  # missing id -> row index


def test_round_trip_is_exact(tmp_path):
    samples = [
        Sample(
            "single",
            [Turn("user", [Part(image=0), Part(text="\nWhat color?")]), Turn.of_text("assistant", "red")],
            [ImageRef(path="images/x.png")],
            {"task": "vqa", "answer": "red", "scene": {"objects": [{"box": [0.1, 0.2, 0.3, 0.4]}], "word": None}},
        ),
        Sample(
            "multi",
            [
                Turn.of_text("system", "You are helpful."),
                Turn("user", [Part(text="A: "), Part(image=0), Part(text=" B: "), Part(image=1)]),
                Turn.of_text("assistant", "second"),
                Turn("user", [Part(text="And now?")]),
                Turn.of_text("assistant", "ünïcode ✓"),
            ],
            [ImageRef(path="images/x.png"), ImageRef(url="https://example.com/y.jpg")],
            {"k": [1, 2.5, None, True]},
        ),
        Sample("text", [Turn.of_text("user", "2+2?"), Turn.of_text("assistant", "4")], [], {}),
    ]
    path = tmp_path / "out" / "d.json"
    write_llava(samples, path)
    back = read_llava(path)
    assert back == samples
    raw = json.loads(path.read_text())
    assert raw[0]["image"] == "images/x.png" and "images" not in raw[0]
    assert raw[1]["images"] == ["images/x.png", "https://example.com/y.jpg"]
    assert "image" not in raw[2] and "images" not in raw[2]
    assert raw[0]["conversations"][0] == {"from": "human", "value": "<image>\nWhat color?"}
    # writing what was read gives the same file
    write_llava(back, tmp_path / "out" / "again.json")
    assert (tmp_path / "out" / "again.json").read_text() == path.read_text()


def test_raw_rows_round_trip(tmp_path):
    rows = [row("a", meta={"task": "vqa", "box": [0.0, 0.5, 0.25, 1.0]}), row("b", image=None, q="hi")]
    src = write_json(tmp_path / "src.json", rows)
    write_llava(read_llava(src), tmp_path / "dst.json")
    assert json.loads((tmp_path / "dst.json").read_text()) == [rows[0], {**rows[1], "meta": {}}]


def test_image_bytes_and_absolute_paths_are_written_relative(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (3, 2), (10, 20, 30)).save(buf, format="PNG")
    (tmp_path / "pics").mkdir()
    Image.new("RGB", (2, 2)).save(tmp_path / "pics" / "abs.png")
    s = Sample(
        "b",
        [Turn("user", [Part(image=0), Part(image=1), Part(text="?")]), Turn.of_text("assistant", "x")],
        [ImageRef(data=buf.getvalue()), ImageRef(path=str(tmp_path / "pics" / "abs.png"))],
    )
    write_llava([s], tmp_path / "d.json")
    (back,) = read_llava(tmp_path / "d.json")
    rel = back.images[0].path
    assert rel.startswith("images/") and rel.endswith(".png")
    with Image.open(tmp_path / rel) as im:
        assert im.size == (3, 2) and im.convert("RGB").getpixel((0, 0)) == (10, 20, 30)
    assert back.images[1].path == "pics/abs.png"


def test_images_written_in_placeholder_order(tmp_path):
    # parts refer to image 1 before image 0: the file must list them in placeholder order
    s = Sample(
        "o",
        [Turn("user", [Part(image=1), Part(text=" then "), Part(image=0)]), Turn.of_text("assistant", "x")],
        [ImageRef(path="zero.png"), ImageRef(path="one.png")],
    )
    write_llava([s], tmp_path / "d.json")
    assert json.loads((tmp_path / "d.json").read_text())[0]["images"] == ["one.png", "zero.png"]
    (back,) = read_llava(tmp_path / "d.json")
    assert [back.images[i].path for i in back.image_order()] == ["one.png", "zero.png"]


BAD_ROWS = {
    "not_object": (["just a string"], "malformed_row"),
    "no_conversations": ([{"id": "x", "image": "a.png"}], "malformed_row"),
    "empty_conversations": ([{"id": "x", "conversations": []}], "malformed_row"),
    "bad_role": ([{"id": "x", "conversations": [{"from": "robot", "value": "hi"}]}], "malformed_row"),
    "value_not_string": ([{"id": "x", "conversations": [{"from": "human", "value": 3}]}], "malformed_row"),
    "meta_not_object": ([row(meta=[1])], "malformed_row"),
    "too_many_images": ([row(q="no placeholder")], "image_count_mismatch"),
    "too_few_images": ([row(image=None)], "image_count_mismatch"),
    "two_placeholders_one_image": ([row(q="<image><image>")], "image_count_mismatch"),
}


@pytest.mark.parametrize("name", sorted(BAD_ROWS))
def test_bad_rows_raise_or_are_logged(tmp_path, name):
    rows, reason = BAD_ROWS[name]
    path = write_json(tmp_path / "d.json", [row("good")] + rows)
    with pytest.raises(BadSampleError) as err:
        read_llava(path)
    assert err.value.reason == reason
    log = BadSampleLog(max_fraction=1.0)
    samples = read_llava(path, bad_log=log)
    assert [s.id for s in samples] == ["good"]
    assert len(log.bad) == 1
    where, sid, msg = log.bad[0]
    assert where == f"{path}:row 1" and msg.startswith(reason)
    expected_id = rows[0]["id"] if isinstance(rows[0], dict) else "1"  # no id: the row index
    assert sid == expected_id
    assert log.seen == 2


def test_jsonl_with_a_bad_line(tmp_path):
    lines = [json.dumps(row("a")), "{not json", "", json.dumps(row("c", image=None, q="hi"))]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(BadSampleError, match="malformed_row"):
        read_llava(path)
    log = BadSampleLog(max_fraction=1.0)
    assert [s.id for s in read_llava(path, bad_log=log)] == ["a", "c"]
    assert [(w, r.split(":")[0]) for w, _, r in log.bad] == [(f"{path}:row 1", "malformed_row")]


def test_not_json_at_all_is_a_clear_error(tmp_path):
    path = tmp_path / "d.json"
    path.write_text("this is not json\nnor lines\n")
    with pytest.raises(DatasetFormatError, match="not valid JSON"):
        read_llava(path)
    path.write_text('{"model": "x"}')
    with pytest.raises(DatasetFormatError, match="list of rows"):
        read_llava(path)


def test_bad_log_threshold_stops_the_read(tmp_path):
    from vlmkit.data.bad_samples import TooManyBadSamples

    path = write_json(tmp_path / "d.json", [row(str(i)) for i in range(5)] + ["bad"] * 5)
    with pytest.raises(TooManyBadSamples):
        read_llava(path, bad_log=BadSampleLog(max_fraction=0.1, min_seen=5))


def test_preferences_round_trip_and_validation(tmp_path):
    pairs = [
        PreferencePair(
            "p0",
            [Turn("user", [Part(image=0), Part(text="\nWhat color is the circle?")])],
            "red",
            "blue",
            [ImageRef(path="images/a.png")],
            {"task": "preference"},
        ),
        PreferencePair("p1", [Turn.of_text("user", "2+2?")], "4", "5"),
    ]
    path = tmp_path / "prefs.json"
    write_preferences(pairs, path)
    raw = json.loads(path.read_text())
    assert raw[0]["chosen"] == "red" and raw[0]["rejected"] == "blue"
    assert raw[0]["conversations"] == [{"from": "human", "value": "<image>\nWhat color is the circle?"}]
    assert read_preferences(path) == pairs
    del raw[1]["rejected"]
    write_json(path, raw)
    with pytest.raises(BadSampleError, match="malformed_row"):
        read_preferences(path)
    log = BadSampleLog(max_fraction=1.0)
    assert [p.id for p in read_preferences(path, bad_log=log)] == ["p0"]
