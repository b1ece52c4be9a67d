"""Multiple-choice metrics: option extraction and CircularEval (MMBench; Liu et al. 2023,
"MMBench: Is Your Multi-modal Model an All-around Player?").

Option extraction (`extract_option`)
------------------------------------
``options`` maps option letters to option texts (``{"A": "red", "B": "blue", ...}``; keys are
upper-cased). The rules are tried in this order; the first that fires wins, and the method is
returned with the letter:

1. ``rule_letter`` -- a *standalone option letter near the end* of the answer.
   The answer is right-stripped; an occurrence of a valid (upper-case) option letter ``L``
   counts when all of these hold:

   * it is not part of a word: the character before it is not a letter, digit, ``_``, ``'``
     or ``-``, and not a ``.`` that follows a letter (so the ``A`` of ``U.S.A.`` does not count);
   * it is followed by the end of the text, or directly by a punctuation character other than
     ``'`` and ``-`` (``B``, ``B.``, ``(B)``, ``B)``, ``B:``, ``**B**``). A letter followed by a
     space and a word does **not** count, so the article in ``"A red circle"`` is not option A,
     nor is the ``A`` in ``"Option A is wrong"``;
   * it starts within the last ``tail_chars`` (default 40) characters of the stripped answer.

   The *last* such occurrence is taken. Lower-case letters count only when the whole answer,
   stripped of whitespace, brackets and punctuation, is that single letter (``"b"``, ``"(b)"``);
   a lower-case letter inside a sentence is too often a word (``a``) or an abbreviation.
   Pitfalls: ``"B, not A."`` gives A (the last letter wins); ``"B. A red square in the middle
   of the image"`` with a long option text puts B outside the window (it may still be found by
   rule 3); a sentence that ends in a capital letter used as a label (``"... the point P."``)
   counts when ``P`` happens to be an option letter.

2. ``rule_answer_is`` -- ``answer is X`` / ``answer: X`` / ``answer is option X`` /
   ``answer is (X)`` anywhere (case-insensitive for both the phrase and the letter; the last
   match wins). ``X`` must be a valid option letter not followed by a letter, digit, ``'`` or
   ``-``. ``a`` / ``A`` and ``i`` / ``I`` are also English words, so for them the letter must be
   followed by the end or by punctuation (``"the answer is a red circle"`` is not option A; it
   falls through to rule 3). Other letters may be followed by a word (``"answer is B because"``).

3. ``option_text`` -- texts are compared after `vlmkit.eval.extract.normalize_answer`
   (lower-case, punctuation and articles dropped, number words as digits), as whole words:

   * if the normalised answer *equals* the normalised text of exactly one option, that option
     (at any length);
   * otherwise, only when the stripped answer has at most ``max_text_len`` characters (default
     80): the options whose text occurs in the answer as a whole-word phrase, dropping any whose
     text is a sub-phrase of another occurring option's text (``"light blue"`` hides ``"blue"``);
     exactly one left -> that option; zero or several -> no match (ambiguous, never a guess).
     The cap keeps a long explanation that mentions several options' words from being read as
     a choice.

4. ``judge`` -- only when a ``judge`` callable is given and rules 1-3 failed:
   ``judge(answer, options)`` returns a letter (or None); a valid option letter is returned
   with method ``"judge"``.

Otherwise ``(None, "failed")``. There is never a random fallback (some reference scripts pick
a random option when nothing matches; that turns failed extractions into 1/k expected accuracy).

CircularEval
------------
A question with ``k`` options is asked ``k`` times. Rotation ``i`` (``i = 0 .. k-1``) shifts the
option texts by ``i`` positions: the option at position ``j`` of rotation ``i`` is the original
option at position ``(j + i) mod k``, so the original option at position ``p`` moves to
position ``(p - i) mod k`` (rotation 0 is the original order). With options A-D and correct
answer C, the correct letter is C, B, A, D in rotations 0, 1, 2, 3.

For records of the rotations (`circular_scores`), a question is correct under CircularEval
only if *all* of its ``k`` rotations are answered correctly (an unextracted answer is wrong):

    circular_accuracy    = #(questions with every rotation correct) / #questions
    single_pass_accuracy = #(questions whose rotation 0 is correct)  / #questions

single_pass_accuracy >= circular_accuracy always; the gap shows how much of the single-pass
score comes from guessing or from a position bias. Both are also reported per ``l2-category``
and per ``category`` (the MMBench fields, taken from the rotation-0 record).
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from typing import Callable, Iterable, Mapping

from vlmkit.eval.extract import normalize_answer

DEFAULT_TAIL_CHARS = 40
DEFAULT_MAX_TEXT_LEN = 80
METHODS = ("rule_letter", "rule_answer_is", "option_text", "judge", "failed")
_WORD_LETTERS = frozenset("AI")  # option letters that are also English one-letter words

Judge = Callable[[str, Mapping[str, str]], "str | None"]


def _letters(options: Mapping[str, str]) -> dict[str, str]:
    out = {str(k).strip().upper(): str(v) for k, v in options.items()}
    bad = [k for k in out if len(k) != 1 or not k.isalpha()]
    if bad:
        raise ValueError(f"option keys must be single letters, got {bad}")
    return out


def _rule_letter(answer: str, letters: Iterable[str], tail_chars: int) -> str | None:
    text = answer.rstrip()
    valid = set(letters)
    bare = re.sub(r"[\W_]", "", text)
    if len(bare) == 1 and bare.upper() in valid:
        return bare.upper()
    cls = "".join(sorted(valid))
    pattern = re.compile(
        rf"(?<![\w'\-])(?<![A-Za-z]\.)([{cls}])(?=$|[^\w\s'\-])"
    )
    found = None
    for m in pattern.finditer(text):
        if m.start() >= len(text) - tail_chars:
            found = m.group(1)
    return found


_ANSWER_IS = re.compile(
    r"\banswer\b\s*(?:is\b\s*:?|:)\s*(?:option\s*)?[(\[]?\s*([A-Za-z])(?![\w'\-])(\s*(?:$|[^\w\s]))?",
    re.IGNORECASE,
)


def _rule_answer_is(answer: str, letters: Iterable[str]) -> str | None:
    valid = set(letters)
    found = None
    for m in _ANSWER_IS.finditer(answer):
        letter = m.group(1).upper()
        if letter not in valid:
            continue
        if letter in _WORD_LETTERS and m.group(2) is None:
            continue  # "the answer is a red circle": an article, not option A
        found = letter
    return found


def _has_phrase(words: list[str], phrase: list[str]) -> bool:
    n = len(phrase)
    return n > 0 and any(words[i : i + n] == phrase for i in range(len(words) - n + 1))


def _option_text(answer: str, options: Mapping[str, str], max_text_len: int) -> str | None:
    norm = normalize_answer(answer)
    normed = {k: normalize_answer(v) for k, v in options.items()}
    equal = [k for k, t in normed.items() if t and t == norm]
    if len(equal) == 1:
        return equal[0]
    if len(answer.strip()) > max_text_len:
        return None
    words = norm.split()
    hits = [k for k, t in normed.items() if _has_phrase(words, t.split())]
    # an option whose text is part of another hit's text (blue inside light blue) is not a hit
    hits = [
        k for k in hits
        if not any(o != k and normed[o] != normed[k] and _has_phrase(normed[o].split(), normed[k].split()) for o in hits)
    ]
    return hits[0] if len(hits) == 1 else None


def extract_option(
    answer: str,
    options: Mapping[str, str],
    max_text_len: int = DEFAULT_MAX_TEXT_LEN,
    *,
    tail_chars: int = DEFAULT_TAIL_CHARS,
    judge: Judge | None = None,
) -> tuple[str | None, str]:
    """The chosen option letter and the rule that found it (rules in the module docstring).

    Returns ``(letter, method)`` with method one of ``rule_letter``, ``rule_answer_is``,
    ``option_text``, ``judge`` (only with a ``judge``) or ``(None, "failed")``.
    """
    answer = answer or ""
    opts = _letters(options)
    letter = _rule_letter(answer, opts, tail_chars)
    if letter is not None:
        return letter, "rule_letter"
    letter = _rule_answer_is(answer, opts)
    if letter is not None:
        return letter, "rule_answer_is"
    letter = _option_text(answer, opts, max_text_len)
    if letter is not None:
        return letter, "option_text"
    if judge is not None:
        verdict = judge(answer, dict(opts))
        if verdict is not None and str(verdict).strip().upper() in opts:
            return str(verdict).strip().upper(), "judge"
    return None, "failed"


def circular_variants(
    question_id: str, options: Mapping[str, str]
) -> list[tuple[str, dict[str, str], dict[str, str]]]:
    """The ``k`` rotations of a ``k``-option question, rotation 0 first.

    Each item is ``(variant_id, rotated_options, answer_letter_map)``: ``variant_id`` is
    ``f"{question_id}@{i}"``; ``rotated_options`` maps the same letters (in the original key
    order) to the rotated texts, ``rotated[letter j] = original[letter (j + i) mod k]``;
    ``answer_letter_map`` maps each original letter to its letter in this rotation
    (``p -> (p - i) mod k``), so the correct letter of rotation ``i`` is
    ``answer_letter_map[original_answer]``.
    """
    opts = _letters(options)
    keys = list(opts)
    texts = [opts[k] for k in keys]
    k = len(keys)
    out = []
    for i in range(k):
        rotated = {keys[j]: texts[(j + i) % k] for j in range(k)}
        letter_map = {keys[p]: keys[(p - i) % k] for p in range(k)}
        out.append((f"{question_id}@{i}", rotated, letter_map))
    return out


def _correct(rec: Mapping) -> bool:
    pred = rec.get("prediction")
    return pred is not None and str(pred).strip().upper() == str(rec["answer"]).strip().upper()


def _acc(items: list[tuple[bool, bool]]) -> dict:
    n = len(items)
    circ = sum(c for c, _ in items)
    single = sum(s for _, s in items)
    return {
        "n": n,
        "circular_accuracy": circ / n if n else 0.0,
        "single_pass_accuracy": single / n if n else 0.0,
    }


def circular_scores(records: Iterable[Mapping]) -> dict:
    """CircularEval scores (definitions in the module docstring).

    Each record is one rotation of one question: ``question_id``, ``rotation`` (int, 0 = the
    original option order), ``prediction`` (the extracted letter, or None), ``answer`` (the
    correct letter *in this rotation*), and optionally ``category``, ``l2-category`` and
    ``method`` (the extraction method). A question's rotations must be exactly ``0 .. m-1``
    (``m`` = its number of records; ValueError otherwise).

    Returns ``{"n_questions", "n_records", "circular_accuracy", "single_pass_accuracy",
    "by_l2_category": {name: {"n", "circular_accuracy", "single_pass_accuracy"}},
    "by_category": {...same...}, "extraction": {method: count}}``. Records without a category
    field are left out of that breakdown (they still count overall).
    """
    by_q: dict[str, dict[int, Mapping]] = defaultdict(dict)
    methods: Counter = Counter()
    n_records = 0
    for rec in records:
        n_records += 1
        qid, rot = str(rec["question_id"]), int(rec["rotation"])
        if rot in by_q[qid]:
            raise ValueError(f"question {qid!r}: rotation {rot} given twice")
        by_q[qid][rot] = rec
        if rec.get("method") is not None:
            methods[str(rec["method"])] += 1
    results: dict[str, tuple[bool, bool]] = {}
    groups: dict[str, dict[str, list[tuple[bool, bool]]]] = {"l2-category": defaultdict(list), "category": defaultdict(list)}
    for qid, rots in by_q.items():
        if set(rots) != set(range(len(rots))):
            raise ValueError(f"question {qid!r}: rotations {sorted(rots)} are not 0..{len(rots) - 1}")
        res = (all(_correct(r) for r in rots.values()), _correct(rots[0]))
        results[qid] = res
        for field, grp in groups.items():
            if rots[0].get(field) is not None:
                grp[str(rots[0][field])].append(res)
    overall = _acc(list(results.values()))
    return {
        "n_questions": overall["n"],
        "n_records": n_records,
        "circular_accuracy": overall["circular_accuracy"],
        "single_pass_accuracy": overall["single_pass_accuracy"],
        "by_l2_category": {k: _acc(v) for k, v in sorted(groups["l2-category"].items())},
        "by_category": {k: _acc(v) for k, v in sorted(groups["category"].items())},
        "extraction": dict(sorted(methods.items())),
    }
