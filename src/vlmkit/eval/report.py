"""Reports of an evaluation: a plain-text summary table and a single self-contained report.html.

`summary_table(results)` lists each task's scalar metrics with image, blind and the gain.
`write_report(results, samples_jsonl_path, data_root, out_path)` writes one HTML file with no
external resources: the run's provenance (model, data fingerprint, timing), the summary table,
each task's metrics, a per-question-type table (accuracy with image, blind, gain), the POPE
table per split, the extraction-method counts, and a gallery of items (right and wrong mixed)
whose images are embedded as base64 PNG, upscaled with NEAREST so that 64-px images are
readable; grounding items show the target box in green and the predicted box in red.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterator

from vlmkit.data.sample import ImageRef
from vlmkit.infer.grounding import draw_boxes, parse_box
from vlmkit.utils.io import atomic_write_text, read_jsonl

log = logging.getLogger("vlmkit.eval")

GALLERY_SIZE = 48
THUMB_PX = 192
# keys left out of the terminal table (counts and distributions; report.html shows them)
_SKIP_KEYS = {"n", "tp", "fp", "tn", "fn", "pred_letter_ratio"}


# ------------------------------------------------------------------ plain text


def _flatten(metrics: Any, prefix: str = "") -> Iterator[tuple[str, float]]:
    if isinstance(metrics, dict):
        for k, v in metrics.items():
            if k in _SKIP_KEYS or k.startswith("n_"):
                continue
            yield from _flatten(v, f"{prefix}{k}.")
    elif isinstance(metrics, (int, float)) and not isinstance(metrics, bool):
        yield prefix[:-1], float(metrics)


def _lookup(metrics: Any, dotted: str) -> float | None:
    cur = metrics
    for k in dotted.split("."):
        if not isinstance(cur, dict) or k not in cur:
            return None
        cur = cur[k]
    return float(cur) if isinstance(cur, (int, float)) and not isinstance(cur, bool) else None


def _fmt(v: float | None, signed: bool = False) -> str:
    if v is None:
        return "-"
    return f"{v:+.3f}" if signed else f"{v:.3f}"


def summary_rows(results: dict) -> list[tuple[str, str, float | None, float | None, float | None]]:
    """(task, metric, with image, blind, gain) for every scalar metric of every task."""
    rows = []
    for task, res in results.get("tasks", {}).items():
        blind = results.get("blind", {}).get(task, {}).get("metrics")
        for name, value in _flatten(res.get("metrics", {})):
            b = _lookup(blind, name) if blind is not None else None
            rows.append((task, name, value, b, value - b if b is not None else None))
    return rows


def summary_table(results: dict) -> str:
    """A plain-text table for the terminal: task, metric, with image, blind, gain."""
    header = ("task", "metric", "image", "blind", "gain")
    body = [
        (f"{t} (n={results['tasks'][t]['n']})", m, _fmt(v), _fmt(b), _fmt(g, True))
        for t, m, v, b, g in summary_rows(results)
    ]
    if not body:
        return "no tasks were evaluated"
    widths = [max(len(r[c]) for r in [header, *body]) for c in range(5)]

    def line(r: tuple[str, ...]) -> str:
        left = [r[0].ljust(widths[0]), r[1].ljust(widths[1])]
        right = [r[c].rjust(widths[c]) for c in range(2, 5)]
        return "  ".join(left + right).rstrip()

    out = [line(header), "  ".join("-" * w for w in widths)]
    prev = None
    for r in body:
        out.append(line((r[0] if r[0] != prev else "", *r[1:])))
        prev = r[0]
    return "\n".join(out)


# ------------------------------------------------------------------ images


def _load_image(ref: str | ImageRef | None, data_root: Path | None):
    """The item's image (a path, or an `ImageRef` with inline bytes) as PIL RGB, or None
    (missing file, URL, undecodable): logged, never fatal."""
    from vlmkit.data.bad_samples import BadSampleError
    from vlmkit.data.images import load_image

    if isinstance(ref, str):
        ref = ImageRef(path=ref) if "://" not in ref else None
    if ref is None or ref.url is not None:
        return None
    try:
        return load_image(ref, data_root)
    except BadSampleError as err:  # a report must not die on one bad image
        log.warning("report: cannot load image %s: %s", ref.describe(), err)
        return None


def _thumbnail(img):
    from PIL import Image

    w, h = img.size
    if max(w, h) <= THUMB_PX:
        k = max(1, THUMB_PX // max(w, h))
        return img.resize((w * k, h * k), Image.NEAREST)
    img = img.copy()
    img.thumbnail((THUMB_PX, THUMB_PX))
    return img


def _png_b64(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


# ------------------------------------------------------------------ html pieces

_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd}h3{font-size:15px}
table{border-collapse:collapse;margin:8px 0 16px}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}
th{background:#f3f3f3;text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums}
.pos{color:#070}.neg{color:#a00}.meta{font-size:12px;color:#555}
.gallery{display:flex;flex-wrap:wrap;gap:10px}
.card{border:2px solid #ccc;border-radius:6px;padding:6px;width:200px;font-size:12px;overflow-wrap:anywhere}
.card.right{border-color:#3a3}.card.wrong{border-color:#c33}.card img{display:block;margin:0 auto 4px}
.noimg{width:192px;height:60px;background:#eee;color:#777;display:flex;align-items:center;justify-content:center}
code{background:#f5f5f5;padding:0 2px}
"""


def _e(x: Any) -> str:
    return html.escape("" if x is None else str(x))


def _num(v: Any, signed: bool = False) -> str:
    if v is None:
        return '<td class="num">-</td>'
    if isinstance(v, float):
        cls = ""
        if signed:
            cls = " pos" if v > 0 else (" neg" if v < 0 else "")
        return f'<td class="num{cls}">{_fmt(v, signed)}</td>'
    return f'<td class="num">{_e(v)}</td>'


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _summary_html(results: dict) -> str:
    rows = [
        [f"<td>{_e(t)}</td>", f"<td>{_e(m)}</td>", _num(v), _num(b), _num(g, True)]
        for t, m, v, b, g in summary_rows(results)
    ]
    return _table(["task", "metric", "with image", "blind", "gain"], rows)


def _metrics_html(name: str, res: dict, blind: dict | None) -> str:
    """A task's metrics as key/value rows (nested dicts as dotted keys), image and blind side by side."""
    bm = blind.get("metrics") if blind else None
    rows = []

    def walk(m: Any, prefix: str) -> None:
        for k, v in m.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict):
                walk(v, key + ".")
            else:
                b = _lookup(bm, key) if bm is not None else None
                rows.append([f"<td>{_e(key)}</td>", _num(v), _num(b) if bm is not None else ""])

    walk(res.get("metrics", {}), "")
    header = ["metric", "with image"] + (["blind"] if bm is not None else [])
    if bm is None:
        rows = [r[:2] for r in rows]
    meta = f'<p class="meta">n={res.get("n")}, predictor time {res.get("elapsed_s", 0):.2f}s</p>'
    return f"<h3>{_e(name)}</h3>{meta}" + _table(header, rows)


def _per_type_html(rows: list[dict], has_blind: bool) -> str:
    acc: dict[tuple[str, str, bool], list[float]] = defaultdict(list)
    for r in rows:
        acc[(r["task"], r["question_type"], bool(r.get("blind")))].append(float(r["score"]))
    keys = sorted({(t, q) for t, q, _ in acc})
    out = []
    for t, q in keys:
        img = acc.get((t, q, False), [])
        bl = acc.get((t, q, True), [])
        a = sum(img) / len(img) if img else None
        b = sum(bl) / len(bl) if bl else None
        cells = [f"<td>{_e(t)}</td>", f"<td>{_e(q)}</td>", _num(len(img)), _num(a)]
        if has_blind:
            cells += [_num(b), _num(a - b if a is not None and b is not None else None, True)]
        out.append(cells)
    header = ["task", "question type", "n", "with image"] + (["blind", "gain"] if has_blind else [])
    return _table(header, out)


def _per_category_html(rows: list[dict], has_blind: bool) -> str:
    """Accuracy per (task, category[, l2-category]) for items whose scorer recorded a category
    (the benchmark tasks: MMBench's category and l2-category, VQAv2's answer type, ...)."""
    acc: dict[tuple[str, str, str, bool], list[float]] = defaultdict(list)
    for r in rows:
        extra = r.get("extra") or {}
        if "category" not in extra:
            continue
        key = (r["task"], str(extra.get("l2_category", "")), str(extra["category"]), bool(r.get("blind")))
        acc[key].append(float(r["score"]))
    keys = sorted({k[:3] for k in acc})
    if not keys:
        return ""
    show_l2 = any(l2 not in ("", "none") for _, l2, _ in keys)
    out = []
    for t, l2, cat in keys:
        img, bl = acc.get((t, l2, cat, False), []), acc.get((t, l2, cat, True), [])
        a = sum(img) / len(img) if img else None
        b = sum(bl) / len(bl) if bl else None
        cells = [f"<td>{_e(t)}</td>"] + ([f"<td>{_e(l2)}</td>"] if show_l2 else [])
        cells += [f"<td>{_e(cat)}</td>", _num(len(img)), _num(a)]
        if has_blind:
            cells += [_num(b), _num(a - b if a is not None and b is not None else None, True)]
        out.append(cells)
    header = ["task"] + (["l2-category"] if show_l2 else []) + ["category", "n", "with image"]
    header += ["blind", "gain"] if has_blind else []
    return "<h2>Per category</h2>" + _table(header, out)


def _pope_html(res: dict, title: str) -> str:
    cols = ["n", "accuracy", "precision", "recall", "f1", "yes_ratio", "n_unparsed"]
    rows = []
    for split, m in res.get("metrics", {}).items():
        if isinstance(m, dict):
            rows.append([f"<td>{_e(split)}</td>"] + [_num(m.get(c)) for c in cols])
    return f"<h3>{_e(title)}</h3>" + _table(["split"] + cols, rows)


def _extraction_html(results: dict) -> str:
    rows = []
    for t, res in results.get("tasks", {}).items():
        bl = results.get("blind", {}).get(t, {}).get("extraction", {})
        ex = res.get("extraction", {})
        for method in sorted(set(ex) | set(bl)):
            rows.append([f"<td>{_e(t)}</td>", f"<td><code>{_e(method)}</code></td>", _num(ex.get(method, 0)),
                         _num(bl.get(method, 0)) if results.get("blind") else ""])
    header = ["task", "method", "with image"] + (["blind"] if results.get("blind") else [])
    if not results.get("blind"):
        rows = [r[:3] for r in rows]
    return _table(header, rows)


def _spread(items: list, m: int) -> list:
    """At most ``m`` items, evenly spaced over ``items``, in order."""
    if len(items) <= m:
        return list(items)
    return [items[(i * len(items)) // m] for i in range(m)]


def select_gallery(rows: list[dict], k: int = GALLERY_SIZE) -> list[dict]:
    """Up to ``k`` non-blind items, deterministic: tasks in turn, right and wrong alternating."""
    per_task: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        if not r.get("blind"):
            per_task[r["task"]].append(r)
    queues = []
    for t in per_task:
        # evenly spaced picks, so the gallery is not all from the first few scenes
        right = _spread([r for r in per_task[t] if r["score"] >= 1.0], k)
        wrong = _spread([r for r in per_task[t] if r["score"] < 1.0], k)
        mixed = []
        for i in range(max(len(right), len(wrong))):
            mixed += ([right[i]] if i < len(right) else []) + ([wrong[i]] if i < len(wrong) else [])
        queues.append(mixed)
    out: list[dict] = []
    i = 0
    while len(out) < k and any(i < len(q) for q in queues):
        for q in queues:
            if i < len(q) and len(out) < k:
                out.append(q[i])
        i += 1
    return out


def _card(r: dict, blind_row: dict | None, data_root: Path | None, inline: dict | None = None) -> str:
    imgs = [name for name in (r.get("images") or []) if name]
    if not imgs and inline:  # benchmark files carry their images as bytes (VLMEvalKit TSV, parquet)
        imgs = list(inline.get(r["id"], []))
    img = _load_image(imgs[0], data_root) if imgs else None
    if img is not None:
        img = _thumbnail(img)
        # grounding items (the shapes task, RefCOCO): their scorers keep the IoU
        if r["task"] == "shapes_grounding" or r["question_type"] == "ground_ref" or "iou" in (r.get("extra") or {}):
            boxes = []
            tb = parse_box(r.get("target"))
            pb = parse_box(r.get("extracted"))
            if tb is not None:
                boxes.append((tb, (0, 170, 0), None))
            if pb is not None:
                boxes.append((pb, (220, 0, 0), None))
            img = draw_boxes(img, boxes, width=2)
        pic = f'<img alt="{_e(r["id"])}" src="data:image/png;base64,{_png_b64(img)}">'
    else:
        pic = '<div class="noimg">no image</div>'
    ok = r["score"] >= 1.0
    extra = r.get("extra") or {}
    iou = f" (IoU {extra['iou']:.2f})" if "iou" in extra else ""
    blind_line = ""
    if blind_row is not None:
        mark = "right" if blind_row["score"] >= 1.0 else "wrong"
        blind_line = f"<div><b>blind:</b> {_e(blind_row['prediction'])} ({mark})</div>"
    return (
        f'<div class="card {"right" if ok else "wrong"}">{pic}'
        f'<div class="meta">{_e(r["task"])} / {_e(r["question_type"])} / {_e(r["id"])}</div>'
        f"<div><b>Q:</b> {_e(r.get('prompt'))}</div>"
        f"<div><b>pred:</b> {_e(r.get('prediction'))}</div>"
        f"<div><b>extracted:</b> {_e(r.get('extracted'))} <code>{_e(r.get('method'))}</code>{_e(iou)}</div>"
        f"<div><b>target:</b> {_e(r.get('target'))}</div>{blind_line}</div>"
    )


def _answered_without_image_html(rows: list[dict], per_task: int = 50) -> str:
    """The items answered right without their image (a leak: the question gives the answer
    away, or the model guesses its prior), per task, with the question and the answer."""
    blind_right = [r for r in rows if r.get("blind") and float(r["score"]) >= 1.0]
    out = ["<h2>Answered correctly without the image</h2>",
           f"<p class='meta'>{len(blind_right)} item(s): the question alone was enough. These are the "
           "first to doubt when reading the scores with the image.</p>"]  # fmt: skip
    by_task: dict[str, list[dict]] = {}
    for r in blind_right:
        by_task.setdefault(r["task"], []).append(r)
    for task, items in sorted(by_task.items()):
        rows_html = [[f"<td>{_e(str(v))}</td>" for v in (r["id"], r.get("prompt", ""), r.get("target"), r.get("prediction"))]
                     for r in items[:per_task]]  # fmt: skip
        out.append(f"<h3>{_e(task)} ({len(items)})</h3>" + _table(["id", "question", "target", "blind answer"], rows_html))
    return "".join(out)


def write_report(
    results: dict,
    samples_jsonl_path: str | Path,
    data_root: str | Path | None,
    out_path: str | Path,
    inline_images: dict[str, list[ImageRef]] | None = None,
) -> Path:
    """Write the self-contained report.html (atomically) and return its path.

    ``inline_images`` maps an item id to its image references, for items whose images are
    bytes inside the benchmark file rather than paths (samples.jsonl records paths only)."""
    rows = read_jsonl(samples_jsonl_path) if Path(samples_jsonl_path).exists() else []
    root = Path(data_root) if data_root is not None else None
    has_blind = bool(results.get("blind"))
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>vlmkit evaluation</title>"
             f"<style>{_CSS}</style></head><body><h1>vlmkit evaluation</h1>"]

    prov = {
        "model": results.get("model", {}),
        "data": results.get("data", {}),
        "config": results.get("config", {}),
        "timing": results.get("timing", {}),
    }
    parts.append("<h2>Run</h2>")
    for k, v in prov.items():
        parts.append(f"<p class='meta'><b>{_e(k)}</b>: <code>{_e(json.dumps(v, ensure_ascii=False))}</code></p>")

    parts.append("<h2>Summary</h2>" + _summary_html(results))

    parts.append("<h2>Tasks</h2>")
    for name, res in results.get("tasks", {}).items():
        parts.append(_metrics_html(name, res, results.get("blind", {}).get(name)))

    parts.append("<h2>Per question type</h2>")
    if has_blind:
        parts.append("<p class='meta'>gain = accuracy with the image &minus; accuracy with the same "
                     "question asked without it (blind). A gain near 0 means the question can be "
                     "answered without looking.</p>")
    parts.append(_per_type_html(rows, has_blind))
    parts.append(_per_category_html(rows, has_blind))

    pope = [n for n, r in results.get("tasks", {}).items() if n.endswith("pope")]
    if pope:
        parts.append("<h2>POPE</h2><p class='meta'>yes is the positive class; yes_ratio is the share of "
                     "<i>predictions</i> that are yes; unparseable answers count as wrong.</p>")
        for n in pope:
            parts.append(_pope_html(results["tasks"][n], f"{n}: with image"))
            if n in results.get("blind", {}):
                parts.append(_pope_html(results["blind"][n], f"{n}: blind"))

    parts.append("<h2>Extraction methods</h2>" + _extraction_html(results))

    if has_blind:
        parts.append(_answered_without_image_html(rows))

    blind_rows = {(r["task"], r.get("item"), r["id"]): r for r in rows if r.get("blind")}
    gallery = select_gallery(rows)
    counts = Counter("right" if r["score"] >= 1.0 else "wrong" for r in gallery)
    parts.append(f"<h2>Gallery</h2><p class='meta'>{len(gallery)} items ({counts['right']} right, "
                 f"{counts['wrong']} wrong). Grounding: target box green, predicted box red.</p>")
    parts.append('<div class="gallery">')
    for r in gallery:
        parts.append(_card(r, blind_rows.get((r["task"], r.get("item"), r["id"])), root, inline_images))
    parts.append("</div></body></html>")

    out = Path(out_path)
    atomic_write_text(out, "\n".join(parts))
    return out
