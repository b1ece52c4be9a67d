"""POPE question files (Li et al. 2023, object hallucination) -> `Sample`s.

A file holds JSON lines (despite its usual ``.json`` suffix), one question each::

    {"question_id": 1, "image": "COCO_val2014_000000310196.jpg",
     "text": "Is there a snowboard in the image?", "label": "yes"}

A file that is one JSON list of such objects is read too. The split (``random``, ``popular`` or
``adversarial``) is the ``split`` argument, else the word in the file name
(``coco_pope_random.json``, ``aokvqa_pope_seem_adversarial.json``); neither raises ``ValueError``.

Each line becomes a `Sample` whose user turn is the image then ``"\\n"`` plus
`POPE_PROMPT_TEMPLATE` filled with the question; ``meta`` is ``{"question_id", "answer"
(the label, lower-case), "pope_split", "task": "pope"}``. ``ImageRef(path=...)`` keeps the
``image`` name as written, relative to the image folder: pass that folder as the root to
`vlmkit.data.images.load_image`, which reports missing files (they are not checked here).
A line that is not a JSON object, lacks a field, has an empty ``image``/``text``, a label other
than yes/no, or repeats a ``question_id`` is a bad row named by file and line.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator

from vlmkit.data.bad_samples import BadSampleError, BadSampleLog, keep_good
from vlmkit.data.formats.llava import DatasetFormatError
from vlmkit.data.sample import ImageRef, Part, Sample, Turn

SPLITS = ("random", "popular", "adversarial")
POPE_PROMPT_TEMPLATE = "{question}\nAnswer the question with yes or no."
_SPLIT_RE = re.compile(r"(?<![a-z])(" + "|".join(SPLITS) + r")(?![a-z])")


def pope_split_of(path: str | Path, split: str | None = None) -> str:
    """``split`` if given (checked), else the split named in the file name."""
    if split is not None:
        if split not in SPLITS:
            raise ValueError(f"unknown POPE split {split!r}; expected one of {SPLITS}")
        return split
    found = set(_SPLIT_RE.findall(Path(path).name.lower()))
    if len(found) != 1:
        raise ValueError(
            f"can't tell the POPE split from the file name {Path(path).name!r}; pass split= one of {SPLITS}"
        )
    return found.pop()


def _lines(path: Path) -> list[tuple[int, object]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DatasetFormatError(f"{path}: not UTF-8 text ({err})") from None
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None
        if isinstance(data, list):
            return [(i + 1, row) for i, row in enumerate(data)]  # "line" = item number here
    out: list[tuple[int, object]] = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((n, json.loads(line)))
        except json.JSONDecodeError as err:
            out.append((n, BadSampleError("malformed_row", f"not valid JSON ({err.msg})")))
    return out


def _parse(row: object, split: str, template: str) -> Sample:
    if not isinstance(row, dict):
        raise BadSampleError("malformed_row", f"a {type(row).__name__}, not an object")
    missing = [k for k in ("question_id", "image", "text", "label") if k not in row]
    if missing:
        raise BadSampleError("malformed_row", f"no {', '.join(missing)}")
    qid, image, text, label = row["question_id"], row["image"], row["text"], row["label"]
    if not isinstance(qid, (int, str)) or isinstance(qid, bool) or str(qid).strip() == "":
        raise BadSampleError("malformed_row", f"question_id must be an integer or a non-empty string, got {qid!r}")
    for key, value in (("image", image), ("text", text)):
        if not isinstance(value, str) or not value.strip():
            raise BadSampleError("malformed_row", f"{key!r} must be a non-empty string, got {value!r}")
    if not isinstance(label, str) or label.strip().lower() not in ("yes", "no"):
        raise BadSampleError("bad_answer", f"label must be 'yes' or 'no', got {label!r}")
    prompt = template.format(question=text.strip())
    turn = Turn("user", [Part(image=0), Part(text="\n" + prompt)])
    meta = {"question_id": qid, "answer": label.strip().lower(), "pope_split": split, "task": "pope"}
    return Sample(str(qid), [turn], [ImageRef(path=image.strip())], meta)


def iter_pope(
    path: str | Path, split: str | None = None, template: str = POPE_PROMPT_TEMPLATE
) -> Iterator[tuple[str, str, Sample | BadSampleError]]:
    """``(question id, where, Sample or BadSampleError)`` per line; ``where`` is ``"{path}:line {n}"``."""
    split = pope_split_of(path, split)
    seen: dict[str, int] = {}
    for n, row in _lines(Path(path)):
        where = f"{path}:line {n}"
        sid = str(row["question_id"]) if isinstance(row, dict) and "question_id" in row else f"line {n}"
        if isinstance(row, BadSampleError):
            yield sid, where, row
            continue
        try:
            sample = _parse(row, split, template)
        except BadSampleError as err:
            yield sid, where, err
            continue
        if sample.id in seen:
            yield sid, where, BadSampleError("duplicate_id", f"question_id {sample.id} already on line {seen[sample.id]}")
            continue
        seen[sample.id] = n
        yield sid, where, sample


def read_pope(
    path: str | Path,
    image_root: str | Path | None = None,
    split: str | None = None,
    bad_log: BadSampleLog | None = None,
    template: str = POPE_PROMPT_TEMPLATE,
) -> list[Sample]:
    """Read a POPE question file into `Sample`s.

    ``image_root`` is the image folder the ``image`` names are relative to; paths are kept as
    written and nothing is read from it here (give it to ``load_image`` as the root). A bad line
    raises `BadSampleError`, or is recorded in ``bad_log`` and skipped.
    """
    del image_root  # kept relative, like read_llava's root; missing images are reported at load time
    return keep_good(iter_pope(path, split, template), bad_log)
