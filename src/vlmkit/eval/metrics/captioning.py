"""Caption metrics: BLEU-1..4, ROUGE-L and CIDEr-D against several references per image, computed
by the scorers of ``pycocoevalcap`` (the COCO caption evaluation code) on tokenised text.

Scorers (pycocoevalcap 1.2, read in its installed source):

* BLEU-n: ``pycocoevalcap.bleu.bleu.Bleu(4)``. Corpus-level BLEU (Papineni et al. 2002): clipped
  n-gram counts and candidate lengths are summed over all images before the precisions are
  taken; the reference length of each image is the reference length *closest* to the candidate
  length (``option="closest"``); brevity penalty ``exp(1 - r/c)`` when ``c < r``. BLEU-n is the
  geometric mean of the 1..n-gram precisions. Each precision is computed as
  ``(correct + 1e-15) / (guess + 1e-9)`` (pycocoevalcap's epsilons), so values can differ from
  the exact fraction in the ninth decimal place.
* ROUGE-L: ``pycocoevalcap.rouge.rouge.Rouge()``. Per image: the longest common subsequence with
  each reference gives a precision (LCS / candidate length) and a recall (LCS / reference length);
  the maxima over references give ``F = (1 + b^2) P R / (R + b^2 P)`` with ``b = 1.2``; the result
  is the mean over images.
* CIDEr-D: ``pycocoevalcap.cider.cider.Cider()``. Despite its name this class *is* CIDEr-D
  (Vedantam et al. 2015, the variant used on the COCO leaderboard): TF-IDF vectors of 1..4-grams
  (no stemming), cosine similarity with each reference where the candidate's weights are
  *clipped* to the reference's (``min(w_cand, w_ref) * w_ref``), times a Gaussian length penalty
  ``exp(-(l_cand - l_ref)^2 / (2 sigma^2))`` with ``sigma = 6``; the similarities are averaged
  over n and over references and multiplied by 10; the result is the mean over images. (The
  installed code measures lengths in bigrams, i.e. tokens - 1, which leaves the difference unchanged.)

  **CIDEr-D depends on which images are scored together**: the document frequencies of the
  n-grams (the IDF) come from the *references of the evaluated set* (an n-gram's document
  frequency is the number of evaluated images whose references contain it; IDF =
  ``log(n_images) - log(df)``). The same caption for the same image gets a different score in a
  different set of images; compare CIDEr-D only across runs evaluated on the same image set. On a
  single image every reference n-gram has IDF 0 and CIDEr-D is 0.

Tokenisation (the result's ``"tokenizer"`` says which was used):

* ``"ptb"``: pycocoevalcap's ``PTBTokenizer`` (Stanford CoreNLP 3.4.1 ``PTBTokenizer`` run with
  ``-preserveLines -lowerCase``, then the tokens in its ``PUNCTUATIONS`` list are removed:
  ``'' ' `` ` -LRB- -RRB- -LCB- -RCB- . ? ! , : - -- ... ;``). It needs ``java`` on the PATH and
  write access to pycocoevalcap's installed folder (it writes a temporary file there).
  Note that ``-lowerCase`` turns brackets into ``-lrb-`` etc., which do not match the upper-case
  entries of that list, so brackets survive as tokens in the official pipeline.
* ``"python"``: `python_tokenize`, a pure-Python imitation of that pipeline (see its docstring);
  it agrees with the Java tokenizer on ordinary captions, not on every corner of PTB tokenisation.
* ``"auto"`` (default): ``"ptb"`` when ``shutil.which("java")`` finds Java, else ``"python"``;
  if the Java tokenizer fails, a warning is issued and the Python tokenizer is used instead.
"""

from __future__ import annotations

import re
import shutil
import warnings
from typing import Hashable, Mapping, Sequence

try:  # the official list of punctuation tokens removed after PTB tokenisation
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS as _PTB_PUNCTUATIONS
except ImportError:  # pragma: no cover - pycocoevalcap is a dependency; same list, pycocoevalcap 1.2
    _PTB_PUNCTUATIONS = ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                         ".", "?", "!", ",", ":", "-", "--", "...", ";"]  # fmt: skip

PUNCTUATIONS: frozenset[str] = frozenset(_PTB_PUNCTUATIONS)
TOKENIZERS = ("auto", "ptb", "python")

# ------------------------------------------------------------------ pure-Python PTB imitation

_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_LEADING = set("\"'`([{$#*")
_TRAILING_MULTI = ("...", "--")
_TRAILING = set("\"'`)]},;:!?%*")
_CLITICS = ("'s", "'m", "'d", "'re", "'ve", "'ll")
_SPLIT_WORDS = {"cannot": ("can", "not"), "gonna": ("gon", "na"), "wanna": ("wan", "na"), "gotta": ("got", "ta")}
_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "st", "jr", "sr", "vs", "etc", "inc", "ltd"}
_SINGLE_LETTER_ABBR = re.compile(r"^[a-z]$")
_BANG_RUN = re.compile(r"[!?]+$")


def _keeps_final_period(word: str) -> bool:
    """Whether PTB keeps the final period of ``word`` (``"u.s."``, ``"p.m."``, ``"mr."``, ``"m."``)."""
    stem = word[:-1]
    return "." in stem or stem in _ABBREVIATIONS or bool(_SINGLE_LETTER_ABBR.match(stem))


def _split_word(word: str) -> list[str]:
    if word in _CLITICS or word == "n't":
        return [word]
    pre: list[str] = []
    post: list[str] = []
    # leading quotes, brackets and symbols
    while word and word[0] in _LEADING and word not in _CLITICS:
        pre.append(_BRACKETS.get(word[0], word[0]))
        word = word[1:]
    # trailing punctuation, outermost first
    while word:
        multi = next((m for m in _TRAILING_MULTI if word.endswith(m) and word != m), None)
        run = _BANG_RUN.search(word)
        if run and len(run.group()) > 1 and run.start() > 0:  # "!!" and "?!" stay one token
            post.insert(0, run.group())
            word = word[: run.start()]
        elif multi:
            post.insert(0, multi)
            word = word[: -len(multi)]
        elif word[-1] in _TRAILING and len(word) > 1 and word not in _CLITICS:
            post.insert(0, _BRACKETS.get(word[-1], word[-1]))
            word = word[:-1]
        elif word.endswith(".") and len(word) > 1 and not _keeps_final_period(word):
            post.insert(0, ".")
            word = word[:-1]
        else:
            break
    if word in _BRACKETS:
        word = _BRACKETS[word]
    # contractions and clitics
    middle: list[str]
    if word in _SPLIT_WORDS:
        middle = list(_SPLIT_WORDS[word])
    elif word.endswith("n't") and len(word) > 3:
        head = word[:-3]
        middle = [head, "n't"]  # can't -> ca n't, won't -> wo n't
    else:
        clitic = next((c for c in _CLITICS if word.endswith(c) and len(word) > len(c)), None)
        middle = [word[: -len(clitic)], clitic] if clitic else ([word] if word else [])
    return pre + middle + post


def python_tokenize(text: str) -> str:
    """Tokenise one caption the way pycocoevalcap's PTB pipeline does, without Java.

    Steps: newlines become spaces; lower-case; split on whitespace; from each word split off
    leading quotes/brackets/``$ # *`` and trailing quotes/brackets/``, ; : ! ? % * ... --`` (a run
    such as ``!!`` stays one token, which is then *not* removed, as in PTB); split
    off a final period unless the word is an abbreviation (contains another period as in
    ``u.s.``, is a single letter, or is one of a few titles such as ``mr``); brackets become
    ``-lrb- -rrb- -lsb- -rsb- -lcb- -rcb-`` (lower-case, as ``-lowerCase`` PTB output);
    contractions split as PTB does (``don't`` -> ``do n't``, ``can't`` -> ``ca n't``, ``dog's`` ->
    ``dog 's``, ``cannot`` -> ``can not``, ``gonna`` -> ``gon na``); double quotes are removed (PTB
    turns them into `````` / ``''``, which are removed). Then every token in pycocoevalcap's
    `PUNCTUATIONS` list is dropped and the tokens are joined with single spaces.

    Known differences from Stanford's tokenizer: punctuation *inside* a word (``a,b``,
    ``cat...sat``) is not split, the abbreviation list is short, and Unicode quotes and dashes
    are not normalised.
    """
    tokens: list[str] = []
    for word in text.replace("\n", " ").replace('"', " ").lower().split():
        tokens.extend(_split_word(word))
    return " ".join(t for t in tokens if t not in PUNCTUATIONS)


# ------------------------------------------------------------------ tokenisation of the two sides


def _ptb_tokenize_all(sentences: list[str]) -> list[str]:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # one Java call for every sentence; integer keys keep the order
    captions = {i: [{"caption": s}] for i, s in enumerate(sentences)}
    out = PTBTokenizer().tokenize(captions)
    if len(out) != len(sentences) or any(len(out.get(i, ())) != 1 for i in range(len(sentences))):
        raise RuntimeError("PTBTokenizer returned a different number of lines than it was given")
    return [out[i][0] for i in range(len(sentences))]


def _tokenize(sentences: list[str], tokenizer: str) -> tuple[list[str], str]:
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"tokenizer must be one of {TOKENIZERS}, got {tokenizer!r}")
    if tokenizer == "python" or (tokenizer == "auto" and shutil.which("java") is None):
        return [python_tokenize(s) for s in sentences], "python"
    if tokenizer == "ptb":
        if shutil.which("java") is None:
            raise RuntimeError("tokenizer='ptb' needs Java on the PATH; use tokenizer='python' or 'auto'")
        return _ptb_tokenize_all(sentences), "ptb"
    try:  # auto, Java present
        return _ptb_tokenize_all(sentences), "ptb"
    except Exception as e:  # noqa: BLE001 - any failure of the external tool
        warnings.warn(f"PTBTokenizer failed ({e!r}); using the pure-Python tokenizer instead", stacklevel=3)
        return [python_tokenize(s) for s in sentences], "python"


def _check_ids(predictions: Mapping, references: Mapping) -> list:
    missing_refs = [k for k in predictions if k not in references]
    missing_preds = [k for k in references if k not in predictions]
    if missing_refs or missing_preds:
        parts = []
        if missing_refs:
            parts.append(f"{len(missing_refs)} prediction id(s) have no references (e.g. {missing_refs[:5]!r})")
        if missing_preds:
            parts.append(f"{len(missing_preds)} reference id(s) have no prediction (e.g. {missing_preds[:5]!r})")
        raise ValueError("caption_scores: ids differ between predictions and references: " + "; ".join(parts))
    ids = list(predictions)
    if not ids:
        raise ValueError("caption_scores: no captions to score")
    for k in ids:
        if not isinstance(predictions[k], str):
            kind = type(predictions[k]).__name__
            raise TypeError(f"caption_scores: prediction for id {k!r} must be a str, got {kind}")
        refs = references[k]
        if isinstance(refs, str) or not isinstance(refs, Sequence) or len(refs) == 0:
            raise ValueError(f"caption_scores: references for id {k!r} must be a non-empty list of str")
        if not all(isinstance(r, str) for r in refs):
            raise TypeError(f"caption_scores: references for id {k!r} must all be str")
    return ids


def caption_scores(
    predictions: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    tokenizer: str = "auto",
) -> dict:
    """BLEU-1..4, ROUGE-L and CIDEr-D of one predicted caption per id against its references.

    ``predictions`` maps an image id to the generated caption, ``references`` the same ids to a
    non-empty list of reference captions. Both sides are tokenised with ``tokenizer``
    (``"auto"``, ``"ptb"`` or ``"python"``, see the module docstring) and scored with
    pycocoevalcap's ``Bleu(4)``, ``Rouge()`` and ``Cider()`` (= CIDEr-D, sigma 6).

    Returns ``{"bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider_d"}`` (floats; BLEU and
    ROUGE-L in [0, 1], CIDEr-D in [0, 10]) plus ``"n"`` (number of images) and ``"tokenizer"``
    (``"ptb"`` or ``"python"``, the one actually used).

    Raises ValueError when an id is in one mapping and not the other, when there is nothing to
    score, or when an id has no references. CIDEr-D's IDF comes from the references of exactly
    these ids: scores depend on which images are evaluated together.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    ids = _check_ids(predictions, references)
    sentences = [predictions[k] for k in ids]
    counts = [len(references[k]) for k in ids]
    for k in ids:
        sentences.extend(references[k])
    tokens, used = _tokenize(sentences, tokenizer)

    # integer keys: pycocoevalcap only needs equal key sets; the caller's ids may be any hashable
    res = {i: [tokens[i]] for i in range(len(ids))}
    gts = {}
    pos = len(ids)
    for i, c in enumerate(counts):
        gts[i] = tokens[pos : pos + c]
        pos += c

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    return {
        "bleu_1": float(bleu[0]),
        "bleu_2": float(bleu[1]),
        "bleu_3": float(bleu[2]),
        "bleu_4": float(bleu[3]),
        "rouge_l": float(rouge),
        "cider_d": float(cider),
        "n": len(ids),
        "tokenizer": used,
    }


__all__ = ["PUNCTUATIONS", "caption_scores", "python_tokenize"]
