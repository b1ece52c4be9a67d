"""VLMEvalKit benchmark TSVs (MMBench, MME, SEED-Bench, ... as that toolkit ships them) -> `Sample`s.

A file is tab-separated with a header row; fields may be quoted with ``"`` (as pandas writes
them). Columns:

``index``         the row's id (required; unique; becomes ``Sample.id``)
``image``         base64-encoded image bytes; or a JSON / Python-literal list of such strings for
                  a multi-image row; or, when the cell has at most 64 characters, the ``index`` of
                  another row whose image(s) this row reuses (references are followed, also inside
                  a list; a missing or circular reference is a bad row). Required.
``image_path``    optional; kept in ``meta["image_path"]`` only.
``question``      required.
``hint``          optional context shown before the question.
``A``, ``B``, ... options: every single upper-case letter column. An empty cell (or ``nan``, as
                  pandas may write a missing value) means the option is absent. *All* present
                  letters are taken, gaps included (``A``, ``B``, ``D`` when ``C`` is empty), so a
                  letter always names the same column and ``answer`` stays valid.
``answer``        optional (test splits lack it): the option letter, ``yes``/``no`` or free text.
``category``, ``l2-category``, ``split``: optional, copied to ``meta``.

Kinds (``kind`` argument, or detected once per file from its well-formed rows):
``mcq``    some row has an option -> every row must have options, and a given answer must be
           one of its letters (stored upper-case);
``yesno``  no options and every given answer (at least one) is yes/no, case-insensitive ->
           a given answer must be yes/no (stored lower-case);
``vqa``    anything else; free-form answers, options (if any) are kept in meta but not shown.

The user turn is the image(s), then one text part: a newline and the prompt rendered from the
kind's template (``meta["prompt_template"]`` holds it; ``{hint}`` is ``"Hint: <hint>\\n"`` or
nothing, ``{options}`` the present options as ``"A. text"`` lines joined by newlines)::

    mcq:   "{hint}{question}\\n{options}\\nAnswer with the option's letter from the given choices directly."
    yesno: "{hint}{question}\\nAnswer the question with yes or no."
    vqa:   "{hint}{question}\\nAnswer the question using a single word or phrase."

Base64 is decoded strictly (whitespace such as line wrapping is dropped first; any other
character outside the base64 alphabet, or bad padding, is a ``bad_base64`` row). Whether the
bytes are a decodable image is left to `vlmkit.data.images.load_image`. The file is read whole
(references may point forward), and a reused image's bytes are decoded once and shared.
"""

from __future__ import annotations

import ast
import base64
import binascii
import csv
import json
import sys
from pathlib import Path
from typing import Iterator

from vlmkit.data.bad_samples import BadSampleError, BadSampleLog, keep_good
from vlmkit.data.formats.llava import DatasetFormatError
from vlmkit.data.sample import ImageRef, Part, Sample, Turn

KINDS = ("mcq", "yesno", "vqa")
REF_MAX_LEN = 64  # an image cell this short is another row's index
REQUIRED_COLUMNS = ("index", "image", "question")
ABSENT = frozenset({"", "nan"})  # compared case-insensitively, after stripping

INSTRUCTIONS = {
    "mcq": "Answer with the option's letter from the given choices directly.",
    "yesno": "Answer the question with yes or no.",
    "vqa": "Answer the question using a single word or phrase.",
}
PROMPT_TEMPLATES = {
    "mcq": "{hint}{question}\n{options}\n" + INSTRUCTIONS["mcq"],
    "yesno": "{hint}{question}\n" + INSTRUCTIONS["yesno"],
    "vqa": "{hint}{question}\n" + INSTRUCTIONS["vqa"],
}


def _raise_field_size_limit() -> None:
    # base64 images are far larger than csv's default 128 KiB field limit (a process-wide setting)
    limit = sys.maxsize
    while True:
        try:
            if csv.field_size_limit() < limit:
                csv.field_size_limit(limit)
            return
        except OverflowError:  # C long is 32 bits on some platforms
            limit //= 2


def _absent(cell: str | None) -> bool:
    return cell is None or cell.strip().lower() in ABSENT


def _cell(row: dict[str, str], key: str) -> str | None:
    v = row.get(key)
    return None if _absent(v) else v.strip()  # type: ignore[union-attr]


def build_prompt(kind: str, question: str, hint: str | None = None, options: dict[str, str] | None = None) -> str:
    """The prompt text for one row (see the module docstring for the templates)."""
    if kind not in PROMPT_TEMPLATES:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    lines = "\n".join(f"{k}. {v}" for k, v in (options or {}).items())
    return PROMPT_TEMPLATES[kind].format(
        hint=f"Hint: {hint}\n" if hint else "", question=question, options=lines
    )


# ------------------------------------------------------------------ reading the table


def load_tsv(path: str | Path) -> tuple[list[str], list[tuple[int, dict[str, str] | BadSampleError]]]:
    """The header and ``(first line number, row dict or BadSampleError)`` for every non-blank row.

    A row with the wrong number of fields is a ``malformed_row``. A file without a header or
    without a required column, or not UTF-8, raises `DatasetFormatError`.
    """
    _raise_field_size_limit()
    path = Path(path)
    rows: list[tuple[int, dict[str, str] | BadSampleError]] = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, delimiter="\t")
            header = next(reader, None)
            if header is None:
                raise DatasetFormatError(f"{path}: empty file (expected a header row)")
            header = [h.strip() for h in header]
            missing = [c for c in REQUIRED_COLUMNS if c not in header]
            if missing:
                raise DatasetFormatError(f"{path}: no {', '.join(repr(c) for c in missing)} column (header: {header[:12]})")
            start = reader.line_num + 1
            for cells in reader:
                line, start = start, reader.line_num + 1
                if not cells or (len(cells) == 1 and not cells[0].strip()):
                    continue
                if len(cells) != len(header):
                    rows.append((line, BadSampleError("malformed_row", f"{len(cells)} fields, the header has {len(header)}")))
                else:
                    rows.append((line, dict(zip(header, cells))))
    except UnicodeDecodeError as err:
        raise DatasetFormatError(f"{path}: not UTF-8 text ({err})") from None
    except csv.Error as err:
        raise DatasetFormatError(f"{path}: not a readable TSV ({err})") from None
    return header, rows


def option_columns(header: list[str]) -> list[str]:
    """The option columns: single upper-case letters, in alphabetical order."""
    return sorted(h for h in header if len(h) == 1 and "A" <= h <= "Z")


def detect_kind(rows: list[dict[str, str]], options: list[str]) -> str:
    """``mcq`` if any row has an option; ``yesno`` if every given answer (>= 1) is yes/no; else ``vqa``."""
    if any(not _absent(r.get(c)) for r in rows for c in options):
        return "mcq"
    answers = [a.lower() for a in (_cell(r, "answer") for r in rows) if a is not None]
    if answers and all(a in ("yes", "no") for a in answers):
        return "yesno"
    return "vqa"


# ------------------------------------------------------------------ images


def decode_base64(text: str) -> bytes:
    """Strict base64 (whitespace ignored); ``bad_base64`` otherwise."""
    compact = "".join(text.split())
    try:
        data = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as err:
        raise BadSampleError("bad_base64", f"image is not valid base64 ({err})") from None
    if not data:
        raise BadSampleError("bad_base64", "image decodes to no bytes")
    return data


def _parse_list(cell: str) -> list:
    try:
        items = json.loads(cell)
    except json.JSONDecodeError:
        try:
            items = ast.literal_eval(cell)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            raise BadSampleError("malformed_row", "image cell starts with '[' but is not a list of strings") from None
    if not isinstance(items, list):
        raise BadSampleError("malformed_row", "image cell starts with '[' but is not a list")
    return items


class _Images:
    """Decodes image cells, following references to other rows; caches per index."""

    def __init__(self, by_index: dict[str, str]):
        self.by_index = by_index
        self.cache: dict[str, list[bytes]] = {}

    def of_index(self, ref: str, stack: tuple[str, ...] = ()) -> list[bytes]:
        if ref in self.cache:
            return self.cache[ref]
        if ref in stack:
            raise BadSampleError("bad_image_ref", f"circular image reference {' -> '.join((*stack, ref))}")
        if ref not in self.by_index:
            raise BadSampleError("missing_image_ref", f"image refers to index {ref!r}, which no row has")
        images = self.of_cell(self.by_index[ref], (*stack, ref))
        self.cache[ref] = images
        return images

    def _follow(self, ref: str, stack: tuple[str, ...]) -> list[bytes]:
        try:
            return self.of_index(ref, stack)
        except BadSampleError as err:
            if err.reason in ("missing_image_ref", "bad_image_ref"):
                raise
            raise BadSampleError("bad_image_ref", f"index {ref!r}'s image: {err}") from None

    def of_cell(self, cell: str, stack: tuple[str, ...]) -> list[bytes]:
        cell = cell.strip()
        if not cell:
            raise BadSampleError("missing_image", "the image cell is empty")
        if len(cell) <= REF_MAX_LEN:
            return self._follow(cell, stack)
        if not (cell.startswith("[") and cell.endswith("]")):
            return [decode_base64(cell)]
        out: list[bytes] = []
        for k, item in enumerate(_parse_list(cell)):
            if not isinstance(item, str) or not item.strip():
                raise BadSampleError("malformed_row", f"image list entry {k} is not a non-empty string")
            item = item.strip()
            if len(item) <= REF_MAX_LEN:
                out.extend(self._follow(item, stack))
            else:
                try:
                    out.append(decode_base64(item))
                except BadSampleError as err:
                    raise BadSampleError(err.reason, f"image {k}: {err.detail}") from None
        if not out:
            raise BadSampleError("missing_image", "the image list is empty")
        return out


# ------------------------------------------------------------------ rows -> samples


def _index_value(index: str) -> int | str:
    try:
        return int(index)
    except ValueError:
        return index


def _parse_row(row: dict[str, str], kind: str, opt_cols: list[str], images: list[bytes], source: str) -> Sample:
    index = row["index"].strip()
    question = _cell(row, "question")
    if question is None:
        raise BadSampleError("malformed_row", "empty question")
    hint = _cell(row, "hint")
    options = {c: row[c].strip() for c in opt_cols if not _absent(row.get(c))}
    answer = _cell(row, "answer")
    if kind == "mcq":
        if not options:
            raise BadSampleError("no_options", "a multiple-choice row with no option cells")
        if answer is not None:
            if answer.upper() not in options:
                raise BadSampleError("bad_answer", f"answer {answer!r} is not one of the options {sorted(options)}")
            answer = answer.upper()
    elif kind == "yesno" and answer is not None:
        if answer.lower() not in ("yes", "no"):
            raise BadSampleError("bad_answer", f"answer {answer!r} is not yes or no")
        answer = answer.lower()
    prompt = build_prompt(kind, question, hint, options)
    parts = [Part(image=i) for i in range(len(images))] + [Part(text="\n" + prompt)]
    meta = {
        "index": _index_value(index),
        "answer": answer,
        "options": options,
        "hint": hint,
        "question": question,
        "category": _cell(row, "category"),
        "l2-category": _cell(row, "l2-category"),
        "split": _cell(row, "split"),
        "task": kind,
        "prompt_template": PROMPT_TEMPLATES[kind],
        "source": source,
    }
    if "image_path" in row:
        meta["image_path"] = _cell(row, "image_path")
    sample = Sample(index, [Turn("user", parts)], [ImageRef(data=b) for b in images], meta)
    sample.validate()
    return sample


def iter_vlmevalkit(path: str | Path, kind: str | None = None) -> Iterator[tuple[str, str, Sample | BadSampleError]]:
    """``(index, where, Sample or BadSampleError)`` for every row; ``where`` is ``"{path}:line {n}"``
    (the row's first physical line). ``kind``: ``mcq``, ``yesno``, ``vqa`` or None to detect."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS} or None")
    header, rows = load_tsv(path)
    opt_cols = option_columns(header)
    good = [r for _, r in rows if isinstance(r, dict)]
    kind = kind or detect_kind(good, opt_cols)
    by_index: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for line, r in rows:
        if isinstance(r, dict):
            idx = r["index"].strip()
            if idx and idx not in by_index:
                by_index[idx] = r["image"]
                first_line[idx] = line
    images = _Images(by_index)
    source = Path(path).stem
    for line, r in rows:
        where = f"{path}:line {line}"
        if isinstance(r, BadSampleError):
            yield f"line {line}", where, r
            continue
        idx = r["index"].strip()
        if not idx:
            yield f"line {line}", where, BadSampleError("malformed_row", "empty index")
            continue
        if first_line[idx] != line:
            yield idx, where, BadSampleError("duplicate_index", f"index {idx!r} already used on line {first_line[idx]}")
            continue
        try:
            yield idx, where, _parse_row(r, kind, opt_cols, images.of_index(idx), source)
        except BadSampleError as err:
            yield idx, where, err


def read_vlmevalkit(path: str | Path, kind: str | None = None, bad_log: BadSampleLog | None = None) -> list[Sample]:
    """Read a VLMEvalKit TSV into `Sample`s. A bad row raises `BadSampleError`, or is recorded in
    ``bad_log`` and skipped. The detected kind is in each sample's ``meta["task"]``."""
    return keep_good(iter_vlmevalkit(path, kind), bad_log)
