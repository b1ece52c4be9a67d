"""Hugging Face benchmark datasets as parquet (the layouts lmms-eval's tasks read) -> `Sample`s.

``path`` is one ``.parquet`` file, or a directory: every ``*.parquet`` below it, in path order,
as a dataset snapshot stores them (``data/validation-00000-of-00003.parquet``; DocVQA keeps its
config in a folder, ``DocVQA/validation-*.parquet``). A shard named ``{split}-NNNNN-of-NNNNN``
(optionally ``-<hash>``) belongs to ``split``; the ``split`` argument keeps that split's files
(or those in a folder of that name, as the parquet-converter writes ``default/val/0000.parquet``),
and a directory holding several splits without ``split`` is an error. Files are read a batch of
rows at a time (`pyarrow.parquet.ParquetFile.iter_batches`), only the columns the layout uses.

Images are the HF ``Image`` feature, a struct ``{bytes, path}`` (a plain binary column is read
too): ``bytes`` becomes ``ImageRef(data=...)``, decoded later by `vlmkit.data.images.load_image`;
identical bytes are shared between samples. A row whose bytes are absent or empty is a bad row.

Layouts (``layout`` argument, else detected from the first file's schema; columns not listed are
not read). ``where`` of a row is ``"{file}:row {i}"``, ``i`` its 0-based position in its file.

=============  ========================================================  ==========  ==========
layout         columns (required; optional)                              meta task   id
=============  ========================================================  ==========  ==========
vqav2          question_id, question, image, answers (list of {answer,   vqa         question_id
               answer_confidence, answer_id}); multiple_choice_answer,
               answer_type, question_type, image_id
textvqa        question_id, question, image, answers (list of str);       vqa         question_id
               image_id
docvqa         questionId, question, image, answers (list of str);        anls        questionId
               question_types (list of str), docId
chartqa        question, answer (str), image; type                        relaxed     row number
coco_caption   question_id, image, answer (list of reference captions);   caption     question_id
               id, file_name
refcoco        question_id, image, answer (list of referring              grounding   question_id#k
               expressions), bbox ([x, y, w, h] pixels); image_width /
               image_height or width / height
=============  ========================================================  ==========  ==========

Detection, first rule that holds: ``bbox`` and ``answer`` -> refcoco; ``questionId`` and
``answers`` -> docvqa; ``answers`` a list of structs with an ``answer`` field, or a
``multiple_choice_answer`` column -> vqav2; ``answers`` (a list of strings) -> textvqa; ``answer``
a string and a ``type`` column -> chartqa; ``answer`` a list of strings -> coco_caption. No rule
holds: `DatasetFormatError` naming the columns seen. A given or detected layout whose required
columns a file lacks is a `DatasetFormatError` too.

Prompts (``meta["prompt_template"]``; the user turn is the image, then ``"\\n"`` + the prompt)::

    vqav2, textvqa, docvqa, chartqa:  "{question}\\nAnswer the question using a single word or phrase."
    coco_caption:                     "Provide a one-sentence caption for the provided image."
    refcoco:                          "Give the box of the {expression}."

(lmms-eval's default post-prompts and COCO prompt; the grounding prompt is the shapes world's
``ground_ref`` question, with a leading article and a final period of the expression dropped.)

Samples: ``meta`` has ``benchmark: True``, ``task`` (above), ``layout``, ``answer`` (the target as
text: VQAv2's ``multiple_choice_answer`` else the most frequent answer; TextVQA's most frequent
answer; the first non-blank DocVQA answer / COCO reference; ChartQA's answer; RefCOCO's box as
``Box.to_text()``), ``answers`` (all answers / references; for RefCOCO all expressions of the
object), ``category`` (VQAv2 ``answer_type``, ChartQA ``type``, DocVQA ``question_types`` as a
list; else None), ``question``, ``prompt_template``, ``source`` (the file name) and the id
columns. VQAv2 also has ``question_type`` and ``l2-category`` = ``question_type`` (so the
``benchmark_vqa`` task keeps both breakdowns in its records). RefCOCO has ``box`` (normalised
``[x0, y0, x1, y1]``), ``bbox_pixels``, ``image_size`` and ``expression``.

RefCOCO: one sample per referring expression of a row (as lmms-eval explodes them), id
``"{question_id}#{k}"``. The box is ``[x/W, y/H, (x+w)/W, (y+h)/H]`` clipped to [0, 1], with
``W, H`` from the width/height columns when present, else from the image header (read with PIL,
pixels not decoded).

Bad rows (skipped and named through a `BadSampleLog`, or raised without one): a null or blank
question (``malformed_row``), a null id (``malformed_row``), absent or empty image bytes
(``missing_image``), answers null, empty, not a list of strings / ``{answer}`` structs, or all
blank (``bad_answer``), a RefCOCO box that is not 4 numbers with positive width and height inside
the image (``bad_box``), an image whose size can't be read (``undecodable_image``), an id seen
before (``duplicate_id``). Test splits without answers are therefore all bad rows.
"""

from __future__ import annotations

import hashlib
import io
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

from vlmkit.data.bad_samples import BadSampleError, BadSampleLog, keep_good
from vlmkit.data.formats.llava import DatasetFormatError
from vlmkit.data.sample import Box, ImageRef, Part, Sample, Turn

LAYOUTS = ("vqav2", "textvqa", "docvqa", "chartqa", "coco_caption", "refcoco")
TASK_OF_LAYOUT = {"vqav2": "vqa", "textvqa": "vqa", "docvqa": "anls", "chartqa": "relaxed",
                  "coco_caption": "caption", "refcoco": "grounding"}  # fmt: skip
REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "vqav2": ("question_id", "question", "image", "answers"),
    "textvqa": ("question_id", "question", "image", "answers"),
    "docvqa": ("questionId", "question", "image", "answers"),
    "chartqa": ("question", "answer", "image"),
    "coco_caption": ("question_id", "image", "answer"),
    "refcoco": ("question_id", "image", "answer", "bbox"),
}
OPTIONAL_COLUMNS: dict[str, tuple[str, ...]] = {
    "vqav2": ("multiple_choice_answer", "answer_type", "question_type", "image_id"),
    "textvqa": ("image_id",),
    "docvqa": ("question_types", "docId"),
    "chartqa": ("type",),
    "coco_caption": ("id", "file_name"),
    "refcoco": ("file_name", "image_width", "image_height", "width", "height"),
}

VQA_INSTRUCTION = "Answer the question using a single word or phrase."
VQA_TEMPLATE = "{question}\n" + VQA_INSTRUCTION
CAPTION_TEMPLATE = "Provide a one-sentence caption for the provided image."
GROUNDING_TEMPLATE = "Give the box of the {expression}."
PROMPT_TEMPLATES = {"vqav2": VQA_TEMPLATE, "textvqa": VQA_TEMPLATE, "docvqa": VQA_TEMPLATE, "chartqa": VQA_TEMPLATE,
                    "coco_caption": CAPTION_TEMPLATE, "refcoco": GROUNDING_TEMPLATE}  # fmt: skip

BATCH_ROWS = 64
_SHARD = re.compile(r"^(?P<split>.+?)-\d{5}-of-\d{5}(?:-[0-9a-f]+)?\.parquet$")
_ARTICLE = re.compile(r"^(?:the|a|an)\s+", re.IGNORECASE)


# ------------------------------------------------------------------ files and layouts


def split_of(file: str | Path) -> str | None:
    """The split a shard's name gives (``validation-00000-of-00003.parquet`` -> ``validation``)."""
    m = _SHARD.match(Path(file).name)
    return m.group("split") if m else None


def parquet_files(path: str | Path, split: str | None = None) -> list[Path]:
    """The parquet files to read: ``path`` itself, or the ``*.parquet`` files below a directory
    (sorted; with ``split``, only that split's). `DatasetFormatError` for none, or for a directory
    of several splits read without ``split``."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DatasetFormatError(f"{path}: no such file or directory")
    files = sorted(p for p in path.rglob("*.parquet") if p.is_file())
    if not files:
        raise DatasetFormatError(f"{path}: no .parquet files in this directory")
    splits = sorted({s for s in map(split_of, files) if s is not None})
    if split is not None:
        kept = [f for f in files if split_of(f) == split or (split_of(f) is None and f.parent.name == split)]
        if not kept:
            raise DatasetFormatError(f"{path}: no parquet files of split {split!r} (splits seen: {splits})")
        return kept
    if len(splits) > 1:
        raise DatasetFormatError(f"{path}: holds the splits {splits}; pass split= one of them")
    return files


def _list_item(field_type: Any) -> Any | None:
    import pyarrow as pa

    if pa.types.is_list(field_type) or pa.types.is_large_list(field_type) or pa.types.is_fixed_size_list(field_type):
        return field_type.value_type
    return None


def detect_layout(schema: Any) -> str:
    """The layout of a parquet file from its `pyarrow.Schema` (rules in the module docstring)."""
    import pyarrow as pa

    names = set(schema.names)

    def item(name: str) -> Any | None:
        return _list_item(schema.field(name).type) if name in names else None

    if {"bbox", "answer"} <= names:
        return "refcoco"
    if {"questionId", "answers"} <= names:
        return "docvqa"
    answers_item = item("answers")
    if "multiple_choice_answer" in names or (
        answers_item is not None and pa.types.is_struct(answers_item) and answers_item.get_field_index("answer") >= 0
    ):
        return "vqav2"
    if answers_item is not None:
        return "textvqa"
    if "answer" in names:
        answer_type = schema.field("answer").type
        if "type" in names and (pa.types.is_string(answer_type) or pa.types.is_large_string(answer_type)):
            return "chartqa"
        if item("answer") is not None:
            return "coco_caption"
    raise DatasetFormatError(
        f"can't tell the benchmark layout from the columns {list(schema.names)}; "
        f"pass layout= one of {LAYOUTS}"
    )


def _check_columns(file: Path, names: list[str], layout: str) -> list[str]:
    missing = [c for c in REQUIRED_COLUMNS[layout] if c not in names]
    if missing:
        raise DatasetFormatError(
            f"{file}: layout {layout!r} needs the column(s) {missing}; the file has {names}"
        )
    return [c for c in (*REQUIRED_COLUMNS[layout], *OPTIONAL_COLUMNS[layout]) if c in names]


# ------------------------------------------------------------------ cells


def _text(row: dict, key: str) -> str | None:
    v = row.get(key)
    if v is None:
        return None
    v = str(v).strip()
    return v or None


def _question(row: dict) -> str:
    q = _text(row, "question")
    if q is None:
        raise BadSampleError("malformed_row", "empty question")
    return q


def _id(row: dict, key: str) -> str:
    v = _text(row, key)
    if v is None:
        raise BadSampleError("malformed_row", f"no {key}")
    return v


def _strings(value: Any, what: str) -> list[str]:
    """A non-empty list of strings, not all blank (kept as written)."""
    if value is None:
        raise BadSampleError("bad_answer", f"{what} is null")
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise BadSampleError("bad_answer", f"{what} is a {type(value).__name__}, not a list")
    if not value:
        raise BadSampleError("bad_answer", f"{what} is empty")
    for k, v in enumerate(value):
        if not isinstance(v, str):
            raise BadSampleError("bad_answer", f"{what}[{k}] is {v!r}, not a string")
    if not any(v.strip() for v in value):
        raise BadSampleError("bad_answer", f"every entry of {what} is blank")
    return list(value)


def most_common(answers: list[str]) -> str:
    """The most frequent of ``answers`` (stripped); on a tie, the one that comes first."""
    stripped = [a.strip() for a in answers if a.strip()]
    counts = Counter(stripped)
    return max(stripped, key=lambda a: (counts[a], -stripped.index(a)))


class _Images:
    """Image cells -> bytes; identical bytes are one shared object."""

    def __init__(self) -> None:
        self.shared: dict[bytes, bytes] = {}

    def __call__(self, cell: Any) -> bytes:
        data = cell.get("bytes") if isinstance(cell, dict) else cell
        if data is None or len(data) == 0:
            where = f" (path {cell.get('path')!r})" if isinstance(cell, dict) and cell.get("path") else ""
            raise BadSampleError("missing_image", f"no image bytes{where}")
        if not isinstance(data, bytes):
            raise BadSampleError("missing_image", f"image bytes are a {type(data).__name__}")
        return self.shared.setdefault(hashlib.blake2b(data, digest_size=16).digest(), data)


def _sample(sid: str, prompt: str, image: bytes, meta: dict) -> Sample:
    turn = Turn("user", [Part(image=0), Part(text="\n" + prompt)])
    return Sample(sid, [turn], [ImageRef(data=image)], meta)


# ------------------------------------------------------------------ layouts: row -> samples


def _vqa_meta(layout: str, question: str, answers: list[str], answer: str) -> dict:
    return {"benchmark": True, "task": TASK_OF_LAYOUT[layout], "layout": layout, "question": question,
            "answers": answers, "answer": answer, "prompt_template": VQA_TEMPLATE}  # fmt: skip


def _vqav2(row: dict, image: bytes, ctx: dict) -> list[Sample]:
    sid, question = _id(row, "question_id"), _question(row)
    raw = row.get("answers")
    if isinstance(raw, list):
        for k, a in enumerate(raw):
            if not isinstance(a, dict) or not isinstance(a.get("answer"), str):
                raise BadSampleError("bad_answer", f"answers[{k}] is not an {{answer, ...}} struct with a string")
        raw = [a["answer"] for a in raw]
    answers = _strings(raw, "answers")
    answer = _text(row, "multiple_choice_answer") or most_common(answers)
    meta = _vqa_meta("vqav2", question, answers, answer)
    answer_type, question_type = _text(row, "answer_type"), _text(row, "question_type")
    meta.update({"category": answer_type, "answer_type": answer_type, "question_type": question_type,
                 "l2-category": question_type, "question_id": row["question_id"],
                 "image_id": row.get("image_id")})  # fmt: skip
    return [_sample(sid, VQA_TEMPLATE.format(question=question), image, meta)]


def _textvqa(row: dict, image: bytes, ctx: dict) -> list[Sample]:
    sid, question = _id(row, "question_id"), _question(row)
    answers = _strings(row.get("answers"), "answers")
    meta = _vqa_meta("textvqa", question, answers, most_common(answers))
    meta.update({"category": None, "question_id": row["question_id"], "image_id": row.get("image_id")})
    return [_sample(sid, VQA_TEMPLATE.format(question=question), image, meta)]


def _docvqa(row: dict, image: bytes, ctx: dict) -> list[Sample]:
    sid, question = _id(row, "questionId"), _question(row)
    answers = _strings(row.get("answers"), "answers")
    types = row.get("question_types")
    types = [str(t) for t in types if t is not None and str(t).strip()] if isinstance(types, list) else []
    meta = _vqa_meta("docvqa", question, answers, next(a.strip() for a in answers if a.strip()))
    meta.update({"category": types, "question_id": row["questionId"], "doc_id": row.get("docId")})
    return [_sample(sid, VQA_TEMPLATE.format(question=question), image, meta)]


def _chartqa(row: dict, image: bytes, ctx: dict) -> list[Sample]:
    question = _question(row)
    answer = row.get("answer")
    if not isinstance(answer, str) or not answer.strip():
        raise BadSampleError("bad_answer", f"answer must be a non-empty string, got {answer!r}")
    meta = _vqa_meta("chartqa", question, [answer.strip()], answer.strip())
    meta.update({"category": _text(row, "type"), "row": ctx["row_number"]})
    return [_sample(str(ctx["row_number"]), VQA_TEMPLATE.format(question=question), image, meta)]


def _coco_caption(row: dict, image: bytes, ctx: dict) -> list[Sample]:
    sid = _id(row, "question_id")
    refs = [r for r in _strings(row.get("answer"), "answer") if r.strip()]
    meta = {"benchmark": True, "task": "caption", "layout": "coco_caption", "question": CAPTION_TEMPLATE,
            "answers": refs, "answer": refs[0], "category": None, "prompt_template": CAPTION_TEMPLATE,
            "question_id": row["question_id"], "coco_id": row.get("id"), "file_name": row.get("file_name")}  # fmt: skip
    return [_sample(sid, CAPTION_TEMPLATE, image, meta)]


def grounding_prompt(expression: str) -> str:
    """The shapes world's ``ground_ref`` question for a referring expression: ``"Give the box of
    the {expression}."``, the expression stripped of a leading article and a final period."""
    expr = _ARTICLE.sub("", expression.strip()).rstrip(". ").strip()
    return GROUNDING_TEMPLATE.format(expression=expr)


def _image_size(row: dict, image: bytes) -> tuple[int, int]:
    for wk, hk in (("image_width", "image_height"), ("width", "height")):
        w, h = row.get(wk), row.get(hk)
        if isinstance(w, (int, float)) and isinstance(h, (int, float)) and w > 0 and h > 0:
            return int(w), int(h)
    from PIL import Image

    try:
        with Image.open(io.BytesIO(image)) as im:  # reads the header only
            w, h = im.size
    except Exception as err:  # noqa: BLE001 - any failure to read an image header
        raise BadSampleError("undecodable_image", f"can't read the image size ({type(err).__name__}: {err})") from None
    if w <= 0 or h <= 0:
        raise BadSampleError("undecodable_image", f"empty image ({w}x{h})")
    return w, h


def normalized_box(bbox: Any, width: int, height: int) -> Box:
    """A COCO ``[x, y, w, h]`` pixel box as a normalised `Box`, clipped to [0, 1]; ``bad_box``
    unless it is 4 finite numbers with ``w, h > 0`` that overlap the image."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        raise BadSampleError("bad_box", f"bbox must be 4 numbers [x, y, w, h], got {bbox!r}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox):
        raise BadSampleError("bad_box", f"bbox must be 4 finite numbers, got {bbox!r}")
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        raise BadSampleError("bad_box", f"bbox has width {w} and height {h}; both must be positive")

    def clip(v: float) -> float:
        return min(1.0, max(0.0, v))

    box = Box(clip(x / width), clip(y / height), clip((x + w) / width), clip((y + h) / height))
    if box.area() <= 0:
        raise BadSampleError("bad_box", f"bbox {list(bbox)} lies outside the {width}x{height} image")
    return box


def _refcoco(row: dict, image: bytes, ctx: dict) -> list[Sample]:
    qid = _id(row, "question_id")
    expressions = _strings(row.get("answer"), "answer")
    if not all(e.strip() for e in expressions):
        raise BadSampleError("bad_answer", "a referring expression is blank")
    width, height = _image_size(row, image)
    box = normalized_box(row.get("bbox"), width, height)
    out = []
    for k, expression in enumerate(expressions):
        meta = {"benchmark": True, "task": "grounding", "layout": "refcoco", "question": expression.strip(),
                "expression": expression.strip(), "answers": [e.strip() for e in expressions],
                "answer": box.to_text(), "box": box.as_list(), "bbox_pixels": [float(v) for v in row["bbox"]],
                "image_size": [width, height], "category": None, "prompt_template": GROUNDING_TEMPLATE,
                "question_id": row["question_id"], "file_name": row.get("file_name")}  # fmt: skip
        out.append(_sample(f"{qid}#{k}", grounding_prompt(expression), image, meta))
    return out


PARSERS: dict[str, Callable[[dict, bytes, dict], list[Sample]]] = {
    "vqav2": _vqav2, "textvqa": _textvqa, "docvqa": _docvqa, "chartqa": _chartqa,
    "coco_caption": _coco_caption, "refcoco": _refcoco,
}  # fmt: skip
_ID_COLUMN = {"vqav2": "question_id", "textvqa": "question_id", "docvqa": "questionId", "chartqa": None,
              "coco_caption": "question_id", "refcoco": "question_id"}  # fmt: skip


# ------------------------------------------------------------------ reading


def iter_hf_parquet(
    path: str | Path, layout: str | None = None, split: str | None = None, batch_rows: int = BATCH_ROWS
) -> Iterator[tuple[str, str, Sample | BadSampleError]]:
    """``(id, where, Sample or BadSampleError)`` per sample (a RefCOCO row gives one per
    expression) or bad row, reading ``batch_rows`` rows at a time; ``where`` is
    ``"{file}:row {i}"``. ``layout`` is one of `LAYOUTS`, or None to detect it from the first file."""
    import pyarrow.parquet as pq

    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS} or None")
    files = parquet_files(path, split)
    if layout is None:
        try:
            layout = detect_layout(pq.read_schema(files[0]))
        except DatasetFormatError as err:
            raise DatasetFormatError(f"{files[0]}: {err}") from None
    parse, id_column = PARSERS[layout], _ID_COLUMN[layout]
    images = _Images()
    seen: dict[str, str] = {}
    row_number = 0  # across all files: ChartQA's id
    for file in files:
        try:
            pf = pq.ParquetFile(file)
        except Exception as err:  # noqa: BLE001 - pyarrow raises several types for a broken file
            raise DatasetFormatError(f"{file}: not a readable parquet file ({type(err).__name__}: {err})") from None
        columns = _check_columns(file, pf.schema_arrow.names, layout)
        i = 0
        for batch in pf.iter_batches(batch_size=batch_rows, columns=columns):
            for row in batch.to_pylist():
                where = f"{file}:row {i}"
                rid = _text(row, id_column) if id_column else None
                rid = rid if rid is not None else str(row_number)
                try:
                    samples = parse(row, images(row.get("image")), {"row_number": row_number})
                except BadSampleError as err:
                    yield rid, where, err
                else:
                    for s in samples:
                        if s.id in seen:
                            yield s.id, where, BadSampleError("duplicate_id", f"id {s.id} already at {seen[s.id]}")
                            continue
                        seen[s.id] = where
                        s.meta["source"] = file.name
                        yield s.id, where, s
                i += 1
                row_number += 1


def read_hf_parquet(
    path: str | Path,
    layout: str | None = None,
    bad_log: BadSampleLog | None = None,
    split: str | None = None,
    limit: int | None = None,
) -> list[Sample]:
    """Read a Hugging Face benchmark parquet file or snapshot directory into `Sample`s.

    A bad row raises `BadSampleError`, or is recorded in ``bad_log`` and skipped. ``limit`` stops
    after that many good samples (the rest of the files is not read). The layout is in each
    sample's ``meta["layout"]``, its task kind in ``meta["task"]``.
    """
    items = iter_hf_parquet(path, layout, split)
    if limit is not None:
        items = _first_good(items, max(0, int(limit)))
    return keep_good(items, bad_log)


def _first_good(items: Iterator, n: int) -> Iterator:
    good = 0
    for item in items:
        if good >= n:
            return
        yield item
        if not isinstance(item[2], BadSampleError):
            good += 1


def layout_of(path: str | Path, split: str | None = None) -> str:
    """The detected layout of a parquet file or snapshot directory (its first file's schema)."""
    import pyarrow.parquet as pq

    return detect_layout(pq.read_schema(parquet_files(path, split)[0]))
