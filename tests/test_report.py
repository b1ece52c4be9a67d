import base64
import io
import re

from PIL import Image

from eval_helpers import make_world, oracle, sighted
from vlmkit.data.sample import Box
from vlmkit.eval.report import select_gallery, summary_table, write_report
from vlmkit.eval.runner import run_evaluation
from vlmkit.infer.grounding import draw_boxes, parse_box


def _wrong_grounding(batch):
    """Sighted, but the grounding boxes are off (IoU 0) so the report has wrong grounding items."""
    out = sighted(batch)
    return ["[0.000, 0.000, 0.200, 0.200]" if s.meta["task"] == "grounding" else o for s, o in zip(batch, out)]


def test_report_has_tables_and_embedded_images(tmp_path):
    world = tmp_path / "world"
    samples = make_world(world)
    out = tmp_path / "out"
    res = run_evaluation(_wrong_grounding, samples, out, blind=True, batch_size=8, info={"model": {"name": "fake"}})
    path = write_report(res, out / "samples.jsonl", world, out / "report.html")
    text = path.read_text()
    for heading in ("Summary", "Tasks", "Per question type", "POPE", "Extraction methods", "Gallery"):
        assert f"<h2>{heading}</h2>" in text
    for task in ("shapes_vqa", "shapes_pope", "shapes_grounding", "shapes_mcq"):
        assert task in text
    assert "<th>gain</th>" in text and "adversarial" in text and "rule:first_word" in text
    pngs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(pngs) == 16  # every evaluated item fits the gallery; all have images
    img = Image.open(io.BytesIO(base64.b64decode(pngs[0])))
    assert img.size == (192, 192)  # 64 px upscaled 3x
    assert "http" not in text.replace("http-equiv", "")  # self-contained: nothing fetched

    # a grounding card: target box (green) and predicted box (red) drawn on the image
    card = re.search(r'<div class="card wrong"><img alt="g1" src="data:image/png;base64,([^"]+)"', text)
    assert card, "the wrong grounding item g1 is in the gallery"
    g = Image.open(io.BytesIO(base64.b64decode(card.group(1)))).convert("RGB")
    assert g.getpixel((48, 100)) == (0, 170, 0)  # left edge of the target box at x = 0.25 * 192
    assert g.getpixel((0, 20)) == (220, 0, 0)  # left edge of the predicted box at x = 0


def test_summary_table(tmp_path):
    res = run_evaluation(sighted, make_world(tmp_path / "world"), tmp_path / "out", blind=True)
    table = summary_table(res)
    lines = table.splitlines()
    assert lines[0].split() == ["task", "metric", "image", "blind", "gain"]
    vqa = next(line for line in lines if line.startswith("shapes_vqa"))
    assert vqa.split()[-3:] == ["1.000", "0.000", "+1.000"]
    assert "by_type.count_total" in table and "random.yes_ratio" in table and "acc_iou50" in table
    no_blind = run_evaluation(oracle, make_world(tmp_path / "w2"), tmp_path / "o2")
    assert summary_table(no_blind).splitlines()[2].split()[-2:] == ["-", "-"]


def test_gallery_mixes_right_and_wrong():
    rows = [{"task": "t", "id": str(i), "score": float(i % 3 == 0), "blind": False} for i in range(12)]
    rows += [{"task": "t", "id": "b", "score": 1.0, "blind": True}]
    pick = select_gallery(rows, k=6)
    assert [r["score"] for r in pick] == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    assert all(not r["blind"] for r in pick)


def test_draw_boxes_and_parse_box():
    assert parse_box("at [0.10, 0.20 , 0.30,0.40] ok") == Box(0.1, 0.2, 0.3, 0.4)
    assert parse_box("nothing") is None and parse_box(None) is None
    img = Image.new("RGB", (100, 50), "white")
    out = draw_boxes(img, [(Box(0.1, 0.2, 0.5, 0.8), (255, 0, 0), None)], width=1)
    assert out is not img and img.getpixel((10, 10)) == (255, 255, 255)
    assert out.getpixel((10, 25)) == (255, 0, 0)  # left edge: x = 0.1 * 100
    assert out.getpixel((30, 10)) == (255, 0, 0)  # top edge: y = 0.2 * 50
    assert out.getpixel((30, 25)) == (255, 255, 255)  # inside stays
    labelled = draw_boxes(img, [(Box(0, 0, 1, 1), "green", "target")])
    assert labelled.size == (100, 50)
