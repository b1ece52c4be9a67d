"""Interleaved image-text documents (OBELICS style): read JSON lines into `Sample`s and write them back.

One document per line::

    {"id": "doc-7",
     "texts":  ["Two pictures of shapes. Picture 1: ", null, " It shows a red circle.", null],
     "images": [null, "images/train_000003.png", null, "images/train_000011.png"],
     "metadata": {"url": "..."}}                      # optional

``texts`` and ``images`` are parallel lists of equal length; at each position exactly one of the
two is non-null: a text segment, or an image path relative to the dataset root (the file's folder
unless a root is given; kept exactly as written, like `vlmkit.data.formats.llava`; a string with a
URL scheme becomes ``ImageRef(url=...)``). The positions are the document's reading order.

A document becomes a `Sample` with a single ``assistant`` turn holding the parts in order (the
whole document is what the model learns to produce; there is no prompt), ``images`` in order of
appearance, and ``meta = {"task": "document", **metadata, "document": True}`` (so ``metadata``
may set its own ``task`` for a source's ``tasks`` filter; ``meta["document"]`` is always True and
is what makes `ChatTemplate.encode_document` encode it as plain text rather than a chat). The
segments are joined exactly as written when encoded: put spaces or newlines inside the texts where
they belong.

Bad lines are skipped and named like LLaVA rows (`BadSampleLog`, ``where = "{path}:line {n}"``,
``n`` the 1-based line number in the file; a document without an ``id`` gets ``str(n)``):
``malformed_row`` (not JSON, not an object, ``texts``/``images`` missing, not lists or of unequal
length, a position with both or neither, a text that is not a string, an image that is not a
non-empty string, ``metadata`` not an object), ``image_count_mismatch`` (a text holding a literal
``<image>``, which would be read as one more image) and ``no_text`` (no non-blank text at all:
nothing to learn from).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Iterator

from vlmkit.data.bad_samples import BadSampleError, BadSampleLog, keep_good
from vlmkit.data.formats.llava import (
    IMAGE_TOKEN,
    _URL_RE,
    DatasetFormatError,
    _image_strings,
    _looks_like_windows_path,
    dataset_root,
)
from vlmkit.data.sample import ImageRef, Part, Sample, Turn
from vlmkit.utils.io import atomic_write_text

DOCUMENT_TASK = "document"
DOCUMENT_ROLE = "assistant"

# ------------------------------------------------------------------ reading


def _image_ref(item: str) -> ImageRef:
    if _URL_RE.match(item) and not _looks_like_windows_path(item):
        return ImageRef(url=item)
    return ImageRef(path=item)


def _doc_id(row: Any, lineno: int) -> str:
    if isinstance(row, dict) and row.get("id") is not None:
        return str(row["id"])
    return str(lineno)


def parse_document(row: Any, lineno: int) -> Sample:
    """One decoded line -> `Sample`; raises `BadSampleError` (see the module docstring for reasons)."""
    if not isinstance(row, dict):
        raise BadSampleError("malformed_row", f"line is a JSON {type(row).__name__}, not an object")
    texts, images = row.get("texts"), row.get("images")
    for key, value in (("texts", texts), ("images", images)):
        if not isinstance(value, list):
            what = "missing" if value is None else f"a {type(value).__name__}"
            raise BadSampleError("malformed_row", f"'{key}' must be a list, got {what}")
    if len(texts) != len(images):
        raise BadSampleError("malformed_row", f"'texts' has {len(texts)} entries but 'images' has {len(images)}")
    parts: list[Part] = []
    refs: list[ImageRef] = []
    for k, (text, image) in enumerate(zip(texts, images)):
        if (text is None) == (image is None):
            which = "both a text and an image" if text is not None else "neither a text nor an image"
            raise BadSampleError("malformed_row", f"position {k} has {which}")
        if text is not None:
            if not isinstance(text, str):
                raise BadSampleError("malformed_row", f"position {k}: text must be a string, got {type(text).__name__}")
            if IMAGE_TOKEN in text:
                raise BadSampleError(
                    "image_count_mismatch", f"position {k}: the text holds a literal {IMAGE_TOKEN} placeholder"
                )
            parts.append(Part(text=text))
        else:
            if not isinstance(image, str) or not image:
                raise BadSampleError("malformed_row", f"position {k}: image must be a non-empty string, got {image!r}")
            parts.append(Part(image=len(refs)))
            refs.append(_image_ref(image))
    if not any(p.text is not None and p.text.strip() for p in parts):
        raise BadSampleError("no_text", "the document has no text")
    metadata = row.get("metadata")
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise BadSampleError("malformed_row", f"'metadata' must be an object, got {type(metadata).__name__}")
    meta = {"task": DOCUMENT_TASK, **metadata, "document": True}
    return Sample(_doc_id(row, lineno), [Turn(DOCUMENT_ROLE, parts)], refs, meta)


def iter_interleaved(path: str | Path) -> Iterator[tuple[str, str, Sample | BadSampleError]]:
    """``(document id, where, Sample or BadSampleError)`` for every non-blank line; ``where`` is
    ``"{path}:line {n}"`` (1-based). A file that is not UTF-8 JSON lines raises `DatasetFormatError`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DatasetFormatError(f"{path}: not UTF-8 text ({err})") from None
    first = True
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:line {lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if first:
                raise DatasetFormatError(
                    f"{path}: not JSON lines (line {lineno} is not a JSON object: {err.msg}); "
                    "interleaved documents are one JSON object per line"
                ) from None
            yield str(lineno), where, BadSampleError("malformed_row", f"line {lineno} is not valid JSON ({err.msg})")
            continue
        if first and not isinstance(row, dict):
            raise DatasetFormatError(
                f"{path}: not JSON lines (line {lineno} is a JSON {type(row).__name__}, not an object); "
                "interleaved documents are one JSON object per line"
            )
        first = False
        try:
            yield _doc_id(row, lineno), where, parse_document(row, lineno)
        except BadSampleError as err:
            yield _doc_id(row, lineno), where, err


def read_interleaved(
    path: str | Path, root: str | Path | None = None, bad_log: BadSampleLog | None = None
) -> list[Sample]:
    """Read an interleaved-documents JSONL file into `Sample`s (see the module docstring).

    Image paths stay as written: relative to ``root`` (default: the file's folder, see
    `dataset_root`). A bad line raises `BadSampleError`, or is recorded in ``bad_log`` and skipped.
    """
    del root  # paths are kept relative; the root is given to load_image by the caller
    return keep_good(iter_interleaved(path), bad_log)


def is_interleaved_file(path: str | Path) -> bool:
    """Whether ``path`` looks like interleaved documents: its first non-blank line is a JSON object
    with ``texts`` and ``images`` and no ``conversations`` (for tools that sniff a file's format)."""
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    return isinstance(row, dict) and "texts" in row and "images" in row and "conversations" not in row
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return False


# ------------------------------------------------------------------ writing


def sample_to_document(sample: Sample, root: str | Path | None = None, out_root: str | Path | None = None) -> dict:
    """A `Sample` as one document dict: every turn's parts in order (roles are not kept).

    Absolute image paths are made relative to ``root``; images given as bytes are written under
    ``out_root/images/`` (as in `vlmkit.data.formats.llava.write_llava`). ``meta`` goes to
    ``metadata`` without the keys the reader adds (``document``, and ``task`` when it is
    ``"document"``), so reading the line back gives the same `Sample`.
    """
    parts = [p for t in sample.turns for p in t.parts]
    order = [p.image for p in parts if p.image is not None]
    strings = iter(_image_strings(sample.images, order, _p(root), _p(out_root)))
    texts: list[str | None] = []
    images: list[str | None] = []
    for p in parts:
        texts.append(p.text)
        images.append(next(strings) if p.is_image else None)
    row: dict[str, Any] = {"id": sample.id, "texts": texts, "images": images}
    metadata = {
        k: v for k, v in sample.meta.items() if k != "document" and not (k == "task" and v == DOCUMENT_TASK)
    }
    if metadata:
        row["metadata"] = metadata
    return row


def _p(x) -> Path | None:
    return Path(x) if x is not None else None


def dumps_documents(rows: Iterable[dict]) -> str:
    """JSON lines: one document per line."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def write_interleaved(samples: Iterable[Sample], path: str | Path, root: str | Path | None = None) -> None:
    """Write samples as interleaved-document JSON lines, atomically.

    Same argument order and conventions as `vlmkit.data.formats.llava.write_llava`: ``root``
    (default: the file's folder) is what image paths are written relative to.
    """
    path = Path(path)
    base = dataset_root(path, root)
    rows = [sample_to_document(s, root=base.resolve(), out_root=base) for s in samples]
    atomic_write_text(path, dumps_documents(rows))
