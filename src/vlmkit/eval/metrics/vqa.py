"""VQAv2 / TextVQA accuracy, exactly as the official VQA evaluation script computes it.

Reference: ``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` of the official VQA repository
(GT-Vision-Lab/VQA, current master). This module is an independent re-implementation of that
script's rules; the fact tables (punctuation list, number words, articles, contractions) are
the official ones, including their quirks. See ``docs/metrics-vqa.md``.

Per question, with ground-truth human answers ``g_1 .. g_n`` (n = 10 in VQAv2 and TextVQA)::

    acc = 1/n * sum_i min(1, #{j != i : g_j == prediction} / 3)

i.e. the mean, over the n leave-one-out subsets of n - 1 answers, of ``min(1, matches / 3)``.
With m = the number of answers equal to the prediction this is
``(m * min(1, (m - 1) / 3) + (n - m) * min(1, m / 3)) / n``.

Answer processing follows the official script:

* the prediction and every ground-truth answer get whitespace clean-up (newline and tab to a
  space, then ``strip``);
* **only if the cleaned ground-truth answers are not all identical** (``len(set(answers)) > 1``)
  are the prediction and the answers normalised with `normalize_vqa_answer` (punctuation, then
  lower-case / number words / articles / contractions). When all annotators gave the same string
  the comparison is an exact, case-sensitive string match: ``"Black."`` scores 0 against ten
  ``"black"``. (The official rationale is to leave OCR-style answers untouched.)
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any, Iterable, Mapping, Sequence

__all__ = [
    "CONTRACTIONS",
    "normalize_vqa_answer",
    "process_digit_article",
    "process_punctuation",
    "vqa_accuracy",
    "vqa_scores",
]

# The official punctuation list (the period is handled separately by _PERIOD_STRIP).
_PUNCT: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
)
# Official pattern, kept verbatim in meaning: ``(?!<=\d)`` is a (harmless) negative look-ahead for
# the literal text "<=digit", so in effect this removes every period NOT followed by a digit:
# "2.5" keeps its period, "dog." and "U.S." lose theirs.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
# A comma between two digits ("1,000"). If it occurs anywhere in the text, EVERY punctuation
# character of _PUNCT is deleted instead of being replaced by a space.
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
# The official script passes ``re.UNICODE`` (== 32) positionally as ``count`` to ``sub``, so at
# most 32 periods are removed. Reproduced for fidelity.
_PERIOD_SUB_COUNT = int(re.UNICODE)

# Official "manualMap": number words to digits (note "none" -> "0").
_NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})

# The official contractions table, complete. Lookups happen after lower-casing, so the keys with a
# capital "I" ("Id've", "I'dve", "Im", "Ive") can never match — an official quirk kept as is, as is
# the reversed entry "somebody'd" -> "somebodyd".
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's",
    "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}


def _clean_whitespace(text: str) -> str:
    """Newline and tab to a space, then strip (the official first step for every answer)."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(text: str) -> str:
    """The official ``processPunctuation``.

    For each character ``p`` of the official list (``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !``),
    in that order: if the ORIGINAL text contains ``p + " "`` or ``" " + p``, or contains a comma
    between two digits anywhere, every ``p`` is deleted; otherwise every ``p`` becomes a space.
    Then periods not followed by a digit are deleted (at most 32 of them, as in the official code).
    Case and spacing are otherwise untouched (`process_digit_article` re-splits on whitespace).
    """
    digit_comma = _COMMA_STRIP.search(text) is not None
    out = text
    for p in _PUNCT:
        if digit_comma or (p + " ") in text or (" " + p) in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_SUB_COUNT)


def process_digit_article(text: str) -> str:
    """The official ``processDigitArticle``.

    Lower-case, split on whitespace, map number words ``none``/``zero``..``ten`` to digits, drop
    the articles ``a``/``an``/``the``, then replace words found in `CONTRACTIONS`; rejoin with
    single spaces.
    """
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(text: str) -> str:
    """Full official answer normalisation: whitespace clean-up, `process_punctuation`, then
    `process_digit_article`. E.g. ``"Two dogs."`` -> ``"2 dogs"``, ``"1,000"`` -> ``"1000"``,
    ``"2.5"`` -> ``"2.5"``, ``"dont"`` -> ``"don't"``.

    Note: `vqa_accuracy` applies this only when the ground-truth answers of a question differ.
    """
    return process_digit_article(process_punctuation(_clean_whitespace(text)))


def vqa_accuracy(prediction: str | None, answers: Sequence[str]) -> float:
    """Official VQA accuracy of one prediction against a question's human answers, in [0, 1].

    Leave-one-out: for each answer ``i``, count the OTHER answers equal to the prediction, score
    ``min(1, count / 3)``; return the mean over the ``len(answers)`` subsets. Normalisation as in
    the module docstring (only when the answers are not all identical after whitespace clean-up).

    Fewer than 10 answers are handled the same way, as the official code does: the mean over the
    ``n`` leave-one-out subsets of ``n - 1`` answers, still dividing by 3. Consequences: with a
    single answer the score is always 0 (the subset is empty); with 3 answers the maximum is 2/3.
    A ``None`` prediction (nothing extracted) scores 0. An empty ``answers`` raises ValueError.
    """
    if isinstance(answers, str):
        raise TypeError("answers must be a sequence of strings, not a single string")
    n = len(answers)
    if n == 0:
        raise ValueError("vqa_accuracy needs at least one ground-truth answer")
    if prediction is None:
        return 0.0
    gts = [_clean_whitespace(str(a)) for a in answers]
    pred = _clean_whitespace(str(prediction))
    if len(set(gts)) > 1:
        gts = [process_digit_article(process_punctuation(g)) for g in gts]
        pred = process_digit_article(process_punctuation(pred))
    m = sum(1 for g in gts if g == pred)
    # The m subsets that leave out a matching answer see m - 1 matches; the others see m.
    total = m * min(1.0, (m - 1) / 3.0) + (n - m) * min(1.0, m / 3.0)
    return total / n


def _get(item: Any, key: str, default: Any = None) -> Any:
    if isinstance(item, Mapping):
        return item.get(key, default)
    return getattr(item, key, default)


def _mean(values: Sequence[float]) -> float:
    return float(sum(values)) / len(values) if values else 0.0


def vqa_scores(items: Iterable[Any]) -> dict:
    """Official VQA accuracy over a set of questions, overall and per answer / question type.

    Each item is a mapping (or object) with ``prediction`` (str or None), ``answers`` (list of
    human answers), and optionally ``answer_type`` and ``question_type`` (the VQAv2 annotation
    fields; TextVQA has none). Items without a type are left out of that breakdown only.

    Returns, all accuracies in [0, 1] (micro averages: every question weighs the same)::

        {"accuracy": mean per-question accuracy, "n": number of questions,
         "per_question": [per-question accuracy, in input order],
         "by_answer_type": {type: mean}, "n_by_answer_type": {type: count},
         "by_question_type": {type: mean}, "n_by_question_type": {type: count},
         "official": {"overall": ..., "perAnswerType": {...}, "perQuestionType": {...}}}

    ``official`` holds the numbers as the official script reports them: ``round(100 * acc, 2)``.
    Types are sorted by name. With no items every accuracy is 0.0 (the official script would
    divide by zero).
    """
    per_q: list[float] = []
    by_at: dict[str, list[float]] = defaultdict(list)
    by_qt: dict[str, list[float]] = defaultdict(list)
    for item in items:
        acc = vqa_accuracy(_get(item, "prediction"), list(_get(item, "answers", [])))
        per_q.append(acc)
        at = _get(item, "answer_type")
        qt = _get(item, "question_type")
        if at is not None:
            by_at[str(at)].append(acc)
        if qt is not None:
            by_qt[str(qt)].append(acc)
    overall = _mean(per_q)
    by_answer_type = {k: _mean(v) for k, v in sorted(by_at.items())}
    by_question_type = {k: _mean(v) for k, v in sorted(by_qt.items())}
    return {
        "accuracy": overall,
        "n": len(per_q),
        "per_question": per_q,
        "by_answer_type": by_answer_type,
        "n_by_answer_type": {k: len(v) for k, v in sorted(by_at.items())},
        "by_question_type": by_question_type,
        "n_by_question_type": {k: len(v) for k, v in sorted(by_qt.items())},
        "official": {
            "overall": round(100 * overall, 2),
            "perAnswerType": {k: round(100 * v, 2) for k, v in by_answer_type.items()},
            "perQuestionType": {k: round(100 * v, 2) for k, v in by_question_type.items()},
        },
    }
