"""Answer extraction: from a model's raw generation to a short answer, with the rule that was used.

Every prediction goes through `extract`, which returns an `Extraction(answer, method)`. The
method is written next to the answer in ``samples.jsonl`` and counted per task in
``results.json`` (``"extraction": {method: count}``), so a score always says how much of it
came from clean short answers and how much from rules that dig an answer out of a sentence.

Normalisation (`normalize_answer`), applied before every comparison:
  1. lower-case;
  2. every box ``[x0, y0, x1, y1]`` (any spacing, any number of decimals) is rewritten in the
     canonical 3-decimal form of `Box.to_text`, and kept whole;
  3. thousands separators between digits are removed (``1,000`` -> ``1000``); a decimal point
     between digits and a leading minus sign are kept (``-0.5`` stays ``-0.5``);
  4. apostrophes are deleted (``it's`` -> ``its``); every other punctuation character becomes a space;
  5. the articles ``a``, ``an``, ``the`` are dropped, unless the text has no other word
     (so a bare ``"A"`` stays ``a``: it may be an option letter or a piece of text to read);
  6. the number words ``zero`` .. ``twenty`` become digits (``three`` -> ``3``);
  7. runs of whitespace collapse to one space; leading and trailing space is stripped.

Answer kinds. `answer_kind(question_type)` maps a question type to the kind of answer expected
(``yesno``, ``number``, ``box``, ``letter`` or ``open``); callers may pass ``kind`` explicitly, and
passing ``options`` implies ``letter``.

Rules, tried in this order for each kind (the first that fires wins):

``yesno``
  * ``exact``        -- the normalised prediction is exactly ``yes`` or ``no``.
  * ``rule:yesno``   -- the first word of the normalised prediction that is ``yes`` or ``no``
                        (``"Yes, there is."`` -> ``yes``; ``"There is no circle"`` -> ``no``).
  * ``failed``       -- neither word appears.
``number``
  * ``exact``        -- the normalised prediction is a single number (``"3"``, ``"three."``).
  * ``rule:number``  -- the first number in the normalised prediction, number words included
                        (``"There are three."`` -> ``3``). Integral values are written without a
                        decimal part (``3.0`` -> ``3``).
  * ``failed``       -- no number.
``box``
  * ``exact``        -- the normalised prediction is one box and nothing else.
  * ``rule:box``     -- the first box in the prediction, parsed with `vlmkit.data.sample.parse_boxes`
                        (so 2 or 3 decimals and extra spaces are accepted).
  * The answer is always the canonical text ``Box.to_text()``; ``failed`` if there is no box.
``letter`` (multiple choice, options A-D; ``options`` maps letters to option texts)
  * ``exact``        -- the normalised prediction is a single letter a-d (answer upper-cased).
  * ``rule:letter``  -- in the raw prediction: a letter A-D at the very start followed by
                        ``.``, ``)``, ``:`` or the end (``"B. blue"``, ``"C)"``); else a letter
                        in parentheses anywhere (``"I pick (B)"``); else ``answer is B`` /
                        ``answer: B`` / ``option B`` anywhere (case-insensitive).
                        A bare ``"A red circle"`` is *not* read as letter A (it is an article).
  * ``option_text``  -- the normalised prediction equals the normalised text of one option, or
                        exactly one option's text occurs in it as a whole-word phrase.
  * ``failed``       -- none of these.
``open`` (colours, shapes, positions, reading, ...)
  * ``exact``        -- the normalised prediction is non-empty and is a well-formed short answer:
                        one of ``vocabulary`` when a vocabulary is given, otherwise at most
                        ``MAX_SHORT_WORDS`` (3) words. The answer is the whole normalised prediction.
  * ``rule:vocab``   -- (only with a ``vocabulary``) the vocabulary phrase that starts earliest in
                        the normalised prediction as whole words; the longest one on a tie
                        (``"It is light blue."`` with {blue, light blue} -> ``light blue``).
  * ``rule:first_word`` -- the first word of the normalised prediction.
  * ``failed``       -- the prediction is empty after normalisation.

An answer of ``None`` (method ``failed``) is always scored as wrong.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from vlmkit.data.sample import Box, parse_boxes

NUMBER_WORDS: dict[str, str] = {
    w: str(i)
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
        "fifteen sixteen seventeen eighteen nineteen twenty".split()
    )
}
ARTICLES = frozenset({"a", "an", "the"})
MAX_SHORT_WORDS = 3
LETTERS = "ABCD"

KINDS = ("yesno", "number", "box", "letter", "open")
_KIND_OF_TYPE: dict[str, str] = {
    "exists": "yesno",
    "yesno": "yesno",
    "pope": "yesno",
    "count": "number",
    "count_total": "number",
    "count_color": "number",
    "count_shape": "number",
    "ground_ref": "box",
    "mcq": "letter",
}

# a box with any spacing / decimals (the same shape `parse_boxes` accepts)
_NUM = r"\s*-?\d+(?:\.\d+)?\s*"
_BOX_SPAN = re.compile(r"\[" + ",".join([_NUM] * 4) + r"\]")
_SLOT = "vlmkitboxslot"  # a word that stands in for a box while the rest is normalised
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")
_NUMBER_TOKEN = re.compile(r"^-?\d+(?:\.\d+)?$")
# punctuation to turn into spaces: everything that is not a word character or whitespace,
# except '.' between digits and '-' before a digit (handled by the lookarounds)
_PUNCT = re.compile(r"(?!(?<=\d)\.(?=\d))(?!(?<!\w)-(?=\d))[^\w\s]|_")


@dataclass(frozen=True)
class Extraction:
    """The extracted short answer (None when nothing could be extracted) and the rule that fired."""

    answer: str | None
    method: str

    @property
    def ok(self) -> bool:
        return self.answer is not None


FAILED = Extraction(None, "failed")


def _normalize_plain(text: str) -> str:
    text = _THOUSANDS.sub("", text)
    text = text.replace("'", "").replace("\u2019", "")
    text = _PUNCT.sub(" ", text)
    words = text.split()
    if any(w not in ARTICLES for w in words):
        words = [w for w in words if w not in ARTICLES]
    return " ".join(NUMBER_WORDS.get(w, w) for w in words)


def normalize_answer(text: str) -> str:
    """Normalise a prediction or target for comparison (the steps are listed in the module docstring)."""
    text = (text or "").lower()
    boxes: list[str] = []

    def hide(m: re.Match) -> str:
        boxes.append(parse_boxes(m.group(0))[0].to_text())
        return f" {_SLOT}{len(boxes) - 1} "

    plain = _normalize_plain(_BOX_SPAN.sub(hide, text))
    if not boxes:
        return plain
    def show(w: str) -> str:
        i = w[len(_SLOT) :]
        return boxes[int(i)] if w.startswith(_SLOT) and i.isdigit() and int(i) < len(boxes) else w

    return " ".join(show(w) for w in plain.split())


def answer_kind(question_type: str | None) -> str:
    """The kind of answer a question type expects: yesno, number, box, letter or open."""
    qt = (question_type or "").lower()
    if qt in _KIND_OF_TYPE:
        return _KIND_OF_TYPE[qt]
    if qt.startswith("count"):
        return "number"
    return "open"


def _canon_number(tok: str) -> str:
    v = float(tok)
    return str(int(v)) if v.is_integer() else tok


def _extract_yesno(norm: str) -> Extraction:
    if norm in ("yes", "no"):
        return Extraction(norm, "exact")
    for w in norm.split():
        if w in ("yes", "no"):
            return Extraction(w, "rule:yesno")
    return FAILED


def _extract_number(norm: str) -> Extraction:
    if _NUMBER_TOKEN.match(norm):
        return Extraction(_canon_number(norm), "exact")
    for w in norm.split():
        if _NUMBER_TOKEN.match(w):
            return Extraction(_canon_number(w), "rule:number")
    return FAILED


def _extract_box(prediction: str, norm: str) -> Extraction:
    boxes = parse_boxes(prediction)
    if not boxes:
        return FAILED
    first = boxes[0].to_text()
    if norm == first:
        return Extraction(first, "exact")
    return Extraction(first, "rule:box")


_LETTER_START = re.compile(r"^\s*\(?([A-Da-d])\s*(?:[.):]|$)")
_LETTER_PAREN = re.compile(r"\(([A-Da-d])\)")
_LETTER_PHRASE = re.compile(r"\b(?:answer(?:\s+is)?\s*:?|option)\s*\(?([A-Da-d])\b", re.IGNORECASE)


def _phrase_at(words: list[str], phrase: list[str]) -> int:
    """Index of the first whole-word occurrence of ``phrase`` in ``words``, or -1."""
    n = len(phrase)
    if n == 0:
        return -1
    for i in range(len(words) - n + 1):
        if words[i : i + n] == phrase:
            return i
    return -1


def _extract_letter(prediction: str, norm: str, options: Mapping[str, str] | None) -> Extraction:
    if len(norm) == 1 and norm.upper() in LETTERS:
        return Extraction(norm.upper(), "exact")
    for pattern in (_LETTER_START, _LETTER_PAREN, _LETTER_PHRASE):
        m = pattern.search(prediction)
        if m:
            return Extraction(m.group(1).upper(), "rule:letter")
    if options:
        normed = {k.upper(): normalize_answer(v) for k, v in options.items()}
        for letter, text in normed.items():
            if text and norm == text:
                return Extraction(letter, "option_text")
        words = norm.split()
        hits = [k for k, t in normed.items() if t and _phrase_at(words, t.split()) >= 0]
        if len(hits) == 1:
            return Extraction(hits[0], "option_text")
    return FAILED


def _extract_open(norm: str, vocabulary: Iterable[str] | None) -> Extraction:
    if not norm:
        return FAILED
    vocab = None
    if vocabulary is not None:
        vocab = {normalize_answer(v) for v in vocabulary} - {""}
    if vocab is not None:
        if norm in vocab:
            return Extraction(norm, "exact")
        words = norm.split()
        best: tuple[int, int, str] | None = None
        for v in vocab:
            i = _phrase_at(words, v.split())
            if i >= 0:
                key = (i, -len(v.split()), v)
                if best is None or key < best:
                    best = key
        if best is not None:
            return Extraction(best[2], "rule:vocab")
    elif len(norm.split()) <= MAX_SHORT_WORDS:
        return Extraction(norm, "exact")
    return Extraction(norm.split()[0], "rule:first_word")


def normalize_options(options: Mapping[str, str] | Sequence[str] | None) -> dict[str, str] | None:
    """Options as ``{"A": text, ...}``: a list is lettered A, B, C, ... in order."""
    if options is None:
        return None
    if isinstance(options, Mapping):
        return {str(k).strip().upper(): str(v) for k, v in options.items()}
    return {LETTERS[i] if i < len(LETTERS) else chr(ord("A") + i): str(v) for i, v in enumerate(options)}


_OPTION_LINE = re.compile(r"^\s*\(?([A-Da-d])[.):]\s*(.+?)\s*$")


def parse_options(question: str) -> dict[str, str]:
    """Options written one per line in a question (``A. red`` / ``(B) blue`` / ``C: green``)."""
    out: dict[str, str] = {}
    for line in question.splitlines():
        m = _OPTION_LINE.match(line)
        if m:
            out.setdefault(m.group(1).upper(), m.group(2))
    return out


def extract(
    prediction: str,
    question_type: str | None,
    options: Mapping[str, str] | Sequence[str] | None = None,
    *,
    kind: str | None = None,
    vocabulary: Iterable[str] | None = None,
) -> Extraction:
    """Extract a short answer from ``prediction`` (the rules are in the module docstring).

    ``kind`` overrides the kind derived from ``question_type``; ``options`` (a letter -> text
    mapping or a list lettered A, B, ...) implies the ``letter`` kind; ``vocabulary`` (the known
    answer set of an open question type) enables ``rule:vocab``.
    """
    prediction = prediction or ""
    opts = normalize_options(options)
    if kind is None:
        kind = "letter" if opts is not None else answer_kind(question_type)
    if kind not in KINDS:
        raise ValueError(f"unknown answer kind {kind!r}; expected one of {KINDS}")
    norm = normalize_answer(prediction)
    if kind == "yesno":
        return _extract_yesno(norm)
    if kind == "number":
        return _extract_number(norm)
    if kind == "box":
        return _extract_box(prediction, norm)
    if kind == "letter":
        return _extract_letter(prediction, norm, opts)
    return _extract_open(norm, vocabulary)


def parse_box_answer(text: str | None) -> Box | None:
    """The first box in ``text`` (None for None or no box)."""
    if not text:
        return None
    return Box.parse(text)
