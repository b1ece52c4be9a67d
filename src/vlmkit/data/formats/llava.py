"""LLaVA-style JSON: read rows into `Sample`s and write `Sample`s back.

A row::

    {"id": "x", "image": "images/x.png",            # or "images": [...], or neither
     "conversations": [{"from": "human", "value": "<image>\\nWhat color is the circle?"},
                       {"from": "gpt", "value": "red"}],
     "meta": {...}}                                   # optional

``from`` may be ``human``/``user``, ``gpt``/``assistant`` or ``system``. The k-th ``<image>``
placeholder in the conversation refers to the k-th image. Image paths are kept exactly as written
(relative to the dataset root, which defaults to the JSON file's folder); pass that root to
`vlmkit.data.images.load_image`. Strings that look like URLs become ``ImageRef(url=...)``.

A file is a JSON list of rows, or JSON lines (one row per line). Preference files hold rows whose
conversations are the prompt only, plus ``"chosen"`` and ``"rejected"`` strings.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Iterator

from vlmkit.data.bad_samples import BadSampleError, BadSampleLog, keep_good
from vlmkit.data.sample import ImageRef, Part, PreferencePair, Sample, Turn
from vlmkit.utils.io import atomic_write_bytes, atomic_write_text

IMAGE_TOKEN = "<image>"

ROLE_FROM_LLAVA = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
ROLE_TO_LLAVA = {"user": "human", "assistant": "gpt", "system": "system"}

_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:(//|)")


class DatasetFormatError(ValueError):
    """A whole file that can't be read as LLaVA JSON or JSON lines."""


class NotRowsError(DatasetFormatError):
    """Valid JSON, but an object that is not a row (e.g. a manifest such as ``world.json``)."""


# ------------------------------------------------------------------ reading


def dataset_root(path: str | Path, root: str | Path | None = None) -> Path:
    """The folder image paths are relative to: ``root`` if given, else the JSON file's folder."""
    return Path(root) if root is not None else Path(path).parent


def load_rows(path: str | Path) -> list[tuple[int, Any]]:
    """``(row index, row)`` for every row of a JSON list or JSONL file.

    In a JSONL file an undecodable line yields a `BadSampleError` (``malformed_row``) in place of
    the row. A file that is neither raises `DatasetFormatError`.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DatasetFormatError(f"{path}: not UTF-8 text ({err})") from None
    if not text.strip():
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        return _load_jsonl(path, text, err)
    if isinstance(data, dict):
        if "conversations" in data:  # a one-row file
            return [(0, data)]
        raise NotRowsError(
            f"{path}: expected a JSON list of rows (or JSON lines), got an object with keys {sorted(data)[:8]}"
        )
    if not isinstance(data, list):
        raise DatasetFormatError(f"{path}: expected a JSON list of rows, got {type(data).__name__}")
    return list(enumerate(data))


def _load_jsonl(path: Path, text: str, json_err: json.JSONDecodeError) -> list[tuple[int, Any]]:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    try:
        first = json.loads(lines[0])
    except json.JSONDecodeError:
        first = None
    if not isinstance(first, dict):
        raise DatasetFormatError(
            f"{path}: not valid JSON (line {json_err.lineno} column {json_err.colno}: {json_err.msg}) "
            "and not JSON lines (its first line is not a JSON object)"
        )
    rows: list[tuple[int, Any]] = []
    for i, line in enumerate(lines):
        try:
            rows.append((i, json.loads(line)))
        except json.JSONDecodeError as err:
            rows.append((i, BadSampleError("malformed_row", f"line {i + 1} is not valid JSON ({err.msg})")))
    return rows


def _image_refs(row: dict) -> list[ImageRef]:
    if "image" in row and "images" in row and row["image"] is not None and row["images"] is not None:
        raise BadSampleError("malformed_row", "row has both 'image' and 'images'")
    raw = row.get("images") if row.get("images") is not None else row.get("image")
    if raw is None:
        return []
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list):
        raise BadSampleError("malformed_row", f"'image(s)' must be a string or a list, got {type(raw).__name__}")
    refs = []
    for item in raw:
        if not isinstance(item, str) or not item:
            raise BadSampleError("malformed_row", f"image entries must be non-empty strings, got {item!r}")
        refs.append(ImageRef(url=item) if _URL_RE.match(item) and not _looks_like_windows_path(item) else ImageRef(path=item))
    return refs


def _looks_like_windows_path(s: str) -> bool:
    return len(s) > 2 and s[1] == ":" and s[0].isalpha() and s[2] in "\\/"


def _split_value(value: str, next_image: int) -> tuple[list[Part], int]:
    parts: list[Part] = []
    pieces = value.split(IMAGE_TOKEN)
    for k, piece in enumerate(pieces):
        if k > 0:
            parts.append(Part(image=next_image))
            next_image += 1
        if piece:
            parts.append(Part(text=piece))
    return parts, next_image


def parse_turns(conversations: Any) -> list[Turn]:
    """LLaVA ``conversations`` -> `Turn`s; image parts are numbered in order of appearance."""
    if not isinstance(conversations, list) or not conversations:
        raise BadSampleError("malformed_row", "'conversations' must be a non-empty list")
    turns: list[Turn] = []
    n_images = 0
    for j, msg in enumerate(conversations):
        if not isinstance(msg, dict):
            raise BadSampleError("malformed_row", f"conversation turn {j} is not an object")
        role = ROLE_FROM_LLAVA.get(msg.get("from"))  # type: ignore[arg-type]
        if role is None:
            raise BadSampleError("malformed_row", f"turn {j}: unknown role {msg.get('from')!r}")
        value = msg.get("value")
        if not isinstance(value, str):
            raise BadSampleError("malformed_row", f"turn {j}: 'value' must be a string")
        parts, n_images = _split_value(value, n_images)
        turns.append(Turn(role, parts))
    return turns


def _row_id(row: Any, index: int) -> str:
    if isinstance(row, dict) and row.get("id") is not None:
        return str(row["id"])
    return str(index)


def _parse_common(row: Any, index: int) -> tuple[str, list[Turn], list[ImageRef], dict]:
    if not isinstance(row, dict):
        raise BadSampleError("malformed_row", f"row is a {type(row).__name__}, not an object")
    sid = _row_id(row, index)
    if "conversations" not in row:
        raise BadSampleError("malformed_row", "row has no 'conversations'")
    turns = parse_turns(row["conversations"])
    images = _image_refs(row)
    n_placeholders = sum(len(t.image_indices) for t in turns)
    if n_placeholders != len(images):
        raise BadSampleError(
            "image_count_mismatch", f"{n_placeholders} {IMAGE_TOKEN} placeholder(s) but {len(images)} image(s)"
        )
    meta = row.get("meta")
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise BadSampleError("malformed_row", "'meta' must be an object")
    return sid, turns, images, meta


def parse_row(row: Any, index: int) -> Sample:
    """One LLaVA row -> `Sample`; raises `BadSampleError` (``malformed_row``/``image_count_mismatch``)."""
    sid, turns, images, meta = _parse_common(row, index)
    return Sample(sid, turns, images, meta)


def parse_preference_row(row: Any, index: int) -> PreferencePair:
    sid, turns, images, meta = _parse_common(row, index)
    for key in ("chosen", "rejected"):
        if not isinstance(row.get(key), str):
            raise BadSampleError("malformed_row", f"preference row needs a string '{key}'")
    return PreferencePair(sid, turns, row["chosen"], row["rejected"], images, meta)


def iter_llava(path: str | Path, parse=parse_row) -> Iterator[tuple[str, str, Sample | PreferencePair | BadSampleError]]:
    """``(row id, where, Sample or BadSampleError)`` for every row; ``where`` is ``"{path}:row {i}"``."""
    for i, row in load_rows(path):
        where = f"{path}:row {i}"
        if isinstance(row, BadSampleError):
            yield str(i), where, row
            continue
        try:
            yield _row_id(row, i), where, parse(row, i)
        except BadSampleError as err:
            yield _row_id(row, i), where, err


def _read(path, bad_log, parse) -> list:
    return keep_good(iter_llava(path, parse), bad_log)


def read_llava(path: str | Path, root: str | Path | None = None, bad_log: BadSampleLog | None = None) -> list[Sample]:
    """Read a LLaVA JSON (or JSONL) file into `Sample`s.

    Image paths stay as written: relative to ``root`` (default: the file's folder, see
    `dataset_root`). A bad row raises `BadSampleError`, or is recorded in ``bad_log`` and skipped.
    """
    del root  # paths are kept relative; the root is given to load_image by the caller
    return _read(path, bad_log, parse_row)


def read_preferences(
    path: str | Path, root: str | Path | None = None, bad_log: BadSampleLog | None = None
) -> list[PreferencePair]:
    """Read preference rows (prompt-only conversations plus ``chosen``/``rejected``)."""
    del root
    return _read(path, bad_log, parse_preference_row)


# ------------------------------------------------------------------ writing


def turns_to_conversations(turns: Iterable[Turn]) -> list[dict]:
    conv = []
    for t in turns:
        value = "".join(IMAGE_TOKEN if p.is_image else p.text for p in t.parts)  # type: ignore[misc]
        conv.append({"from": ROLE_TO_LLAVA[t.role], "value": value})
    return conv


def _image_strings(images: list[ImageRef], order: list[int], root: Path | None, out_root: Path | None) -> list[str]:
    if sorted(order) != list(range(len(images))):
        raise ValueError(f"image parts {order} do not match {len(images)} image(s)")
    out = []
    for i in order:
        ref = images[i]
        if ref.url is not None:
            out.append(ref.url)
        elif ref.path is not None:
            p = ref.path
            if root is not None and os.path.isabs(p):
                p = os.path.relpath(p, root)
            out.append(Path(p).as_posix() if not _looks_like_windows_path(p) else p)
        else:
            if out_root is None:
                raise ValueError("an image given as bytes needs a root folder to be written to")
            out.append(_write_image_bytes(ref.data or b"", out_root))
    return out


def _write_image_bytes(data: bytes, root: Path) -> str:
    """Write image bytes as ``root/images/<sha1>.png`` (re-encoded to PNG unless already PNG)."""
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            buf = io.BytesIO()
            im.save(buf, format="PNG")
            data = buf.getvalue()
    rel = f"images/{hashlib.sha1(data).hexdigest()[:20]}.png"
    target = root / rel
    if not target.exists():
        atomic_write_bytes(target, data)
    return rel


def _row(sid: str, turns: list[Turn], images: list[ImageRef], meta: dict, root: Path | None, out_root: Path | None) -> dict:
    order = [i for t in turns for i in t.image_indices]
    row: dict[str, Any] = {"id": sid}
    imgs = _image_strings(images, order, root, out_root)
    if len(imgs) == 1:
        row["image"] = imgs[0]
    elif imgs:
        row["images"] = imgs
    # renumber image parts so the k-th placeholder is the k-th image written
    row["conversations"] = turns_to_conversations(turns)
    return row


def sample_to_row(sample: Sample, root: str | Path | None = None, out_root: str | Path | None = None) -> dict:
    """A `Sample` as a LLaVA row dict. Absolute image paths are made relative to ``root``."""
    row = _row(sample.id, sample.turns, sample.images, sample.meta, _p(root), _p(out_root))
    row["meta"] = sample.meta
    return row


def preference_to_row(pair: PreferencePair, root: str | Path | None = None, out_root: str | Path | None = None) -> dict:
    row = _row(pair.id, pair.prompt, pair.images, pair.meta, _p(root), _p(out_root))
    row["chosen"] = pair.chosen
    row["rejected"] = pair.rejected
    row["meta"] = pair.meta
    return row


def _p(x) -> Path | None:
    return Path(x) if x is not None else None


def dumps_rows(rows: list[dict]) -> str:
    """A JSON list with one row per line: valid JSON, and easy to grep and diff."""
    if not rows:
        return "[]\n"
    return "[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n]\n"


def write_llava(samples: Iterable[Sample], path: str | Path, root: str | Path | None = None) -> None:
    """Write samples as a LLaVA JSON list, atomically.

    ``root`` (default: the file's folder) is what image paths are written relative to; images
    given as bytes are written to ``root/images/<hash>.png`` and referred to by that path.
    """
    path = Path(path)
    base = dataset_root(path, root)
    rows = [sample_to_row(s, root=base.resolve(), out_root=base) for s in samples]
    atomic_write_text(path, dumps_rows(rows))


def write_preferences(pairs: Iterable[PreferencePair], path: str | Path, root: str | Path | None = None) -> None:
    path = Path(path)
    base = dataset_root(path, root)
    rows = [preference_to_row(p, root=base.resolve(), out_root=base) for p in pairs]
    atomic_write_text(path, dumps_rows(rows))
