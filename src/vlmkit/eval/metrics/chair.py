"""CHAIR object-hallucination metrics (Rohrbach et al. 2018, "Object Hallucination in Image
Captioning").

For a set of captions, each with the set of object classes truly in its image:

  mention      = an occurrence in the caption of a name of a vocabulary class (counted per
                 occurrence: "a dog and another dog" is 2 mentions of ``dog``)
  hallucinated = a mention whose class is not in the image's truth set
  CHAIRi = #hallucinated mentions / #mentions            (0.0 when there are no mentions)
  CHAIRs = #captions with >= 1 hallucinated mention / #captions

Finding mentions (`Vocabulary.find`): the caption is lower-cased and split into words of letters
and digits (so hyphens and apostrophes separate words: "hot-dog" reads "hot dog", "dog's" reads
"dog s"); then, scanning left to right, the longest vocabulary name starting at each word is
taken and its words are consumed, so two-word names win over their last word ("hot dog" is a
``hot dog``, never a ``dog``; "teddy bear" is never a ``bear``). Each name also matches its plural:
the last word gets ``s``/``es``/``ies``, or an irregular plural (men, women, children, mice,
knives, geese, ...), unless the plural is itself a name of another class.

Vocabularies:

* COCO: `coco_vocabulary` / `load_synonyms` read a synonym file with one class per line, the
  class name first, then its synonyms, comma separated (the 80-class file used by CHAIR; in this
  project's ``shared/data/coco_synonyms.txt``, shipped as ``vlmkit/eval/data/coco_synonyms.txt``). Differences from the original CHAIR script: plurals
  come from explicit rules instead of a WordNet lemmatiser, and the original's special phrases
  (e.g. "baby" before an animal name, "toilet seat") are not handled.
* The shapes world: `shapes_vocabulary` (the classes are `SHAPES`, plurals from `PLURALS`) and
  `scene_truth` (the set of ``shape`` values of a scene's ``objects``).

Attribute hallucination in the shapes world (`shapes_attribute_chair`, reported separately): a
colour word directly before a shape name (optionally with a size word between, "a red small
circle" / "a small red circle") is a colour-shape mention; it is hallucinated when the scene has
no object of that shape *and* colour. Mentions of a shape with no colour are not counted there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Hashable, Iterable, Mapping

_WORD = re.compile(r"[a-z0-9]+")
_IRREGULAR = {
    "man": "men", "woman": "women", "child": "children", "person": "people", "mouse": "mice",
    "knife": "knives", "goose": "geese", "foot": "feet", "ox": "oxen", "calf": "calves",
    "leaf": "leaves", "shelf": "shelves", "wife": "wives", "life": "lives", "sheep": "sheep",
    "fish": "fish", "deer": "deer", "bison": "bison", "cattle": "cattle", "people": "people",
    "policeman": "policemen", "gentleman": "gentlemen", "serviceman": "servicemen",
    "scissors": "scissors", "skis": "skis",
}  # fmt: skip


def words(text: str) -> list[str]:
    """The lower-cased words (runs of letters and digits) of ``text``."""
    return _WORD.findall(text.lower())


def plural(name: str) -> str:
    """English plural of a (possibly multi-word) name: the last word is inflected."""
    head, _, last = name.rpartition(" ")
    if last in _IRREGULAR:
        p = _IRREGULAR[last]
    elif last.endswith(("s", "x", "z", "ch", "sh")):
        p = last + "es"
    elif last.endswith("y") and len(last) > 1 and last[-2] not in "aeiou":
        p = last[:-1] + "ies"
    else:
        p = last + "s"
    return f"{head} {p}" if head else p


@dataclass
class Vocabulary:
    """Object classes and the names that mention them (each a tuple of words)."""

    synonyms: dict[str, tuple[str, ...]]
    plurals: Mapping[str, str] | None = None  # explicit plural per name; else `plural`
    names: dict[tuple[str, ...], str] = field(init=False, repr=False)
    max_len: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        singular: dict[tuple[str, ...], str] = {}
        for cls, syns in self.synonyms.items():
            for name in (cls, *syns):
                key = tuple(words(name))
                if not key:
                    continue
                if key in singular and singular[key] != cls:
                    raise ValueError(f"name {' '.join(key)!r} belongs to two classes: {singular[key]!r} and {cls!r}")
                singular[key] = cls
        names = dict(singular)
        for key, cls in singular.items():
            text = " ".join(key)
            p = (self.plurals or {}).get(text) or plural(text)
            pkey = tuple(words(p))
            if pkey not in singular:  # a plural never overrides a name of its own
                names.setdefault(pkey, cls)
        self.names = names
        self.max_len = max((len(k) for k in names), default=0)

    @property
    def classes(self) -> list[str]:
        return list(self.synonyms)

    def find(self, text: str) -> list[tuple[str, str, int]]:
        """Mentions in ``text``: ``(class, matched words, word index)``, longest match first."""
        ws = words(text)
        found = []
        i = 0
        while i < len(ws):
            for n in range(min(self.max_len, len(ws) - i), 0, -1):
                cls = self.names.get(tuple(ws[i : i + n]))
                if cls is not None:
                    found.append((cls, " ".join(ws[i : i + n]), i))
                    i += n
                    break
            else:
                i += 1
        return found


def load_synonyms(path: str | Path) -> dict[str, list[str]]:
    """Read a CHAIR synonym file: per line ``class, synonym, synonym, ...`` (comma separated).

    Names are lower-cased and stripped of surrounding spaces (inner spaces collapsed); duplicate
    synonyms are dropped; blank lines and lines starting with ``#`` are skipped.
    """
    out: dict[str, list[str]] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        items = [" ".join(x.lower().split()) for x in line.split(",")]
        items = [x for x in items if x]
        cls, syns = items[0], []
        for s in items[1:]:
            if s != cls and s not in syns:
                syns.append(s)
        if cls in out:
            raise ValueError(f"{path}: class {cls!r} appears on two lines")
        out[cls] = syns
    return out


# the 80 COCO classes and their synonyms, one class per line (shipped with vlmkit)
COCO_SYNONYMS_FILE = Path(__file__).resolve().parent.parent / "data" / "coco_synonyms.txt"


def coco_vocabulary(path: str | Path = COCO_SYNONYMS_FILE) -> Vocabulary:
    """The COCO CHAIR vocabulary from a synonym file (see `load_synonyms`); by default the
    80-class list shipped with vlmkit."""
    return Vocabulary({c: tuple(s) for c, s in load_synonyms(path).items()})


def shapes_vocabulary() -> Vocabulary:
    """The shapes world's vocabulary: one class per shape, named by the shape and its plural."""
    from vlmkit.data.worlds.shapes import PLURALS, SHAPES

    return Vocabulary({s: () for s in SHAPES}, plurals=dict(PLURALS))


def scene_truth(scene: dict) -> set[str]:
    """The shapes present in a shapes-world scene graph (``{o["shape"] for o in scene["objects"]}``)."""
    return {o["shape"] for o in scene["objects"]}


def _as_vocabulary(vocabulary: Vocabulary | Mapping[str, Iterable[str]]) -> Vocabulary:
    if isinstance(vocabulary, Vocabulary):
        return vocabulary
    return Vocabulary({c: tuple(s) for c, s in vocabulary.items()})


def _chair(details: dict, n_mentions: int, n_hall: int) -> dict:
    n_captions = len(details)
    n_bad = sum(1 for d in details.values() if d["hallucinated"])
    return {
        "chair_i": n_hall / n_mentions if n_mentions else 0.0,
        "chair_s": n_bad / n_captions if n_captions else 0.0,
        "n_mentions": n_mentions,
        "n_hallucinated": n_hall,
        "n_captions": n_captions,
        "n_captions_hallucinated": n_bad,
        "details": details,
    }


def chair_scores(
    captions: Mapping[Hashable, str],
    truth: Mapping[Hashable, Iterable[str]],
    vocabulary: Vocabulary | Mapping[str, Iterable[str]],
) -> dict:
    """Object-level CHAIR (definitions in the module docstring).

    ``captions`` maps an id to a caption; ``truth`` the same ids to the classes in the image;
    ``vocabulary`` is a `Vocabulary` or a mapping ``class -> synonyms``. Truth classes not in the
    vocabulary raise ValueError (a typo there would silently make every mention a hallucination),
    as do ids missing from ``truth``.

    Returns ``chair_i``, ``chair_s``, ``n_mentions``, ``n_hallucinated``, ``n_captions``,
    ``n_captions_hallucinated`` and ``details``: per id ``{"mentioned": [class per mention, in
    order], "hallucinated": [class per hallucinated mention], "words": [matched words]}``.
    """
    vocab = _as_vocabulary(vocabulary)
    missing = [k for k in captions if k not in truth]
    if missing:
        raise ValueError(f"chair_scores: {len(missing)} caption id(s) have no truth (e.g. {missing[:5]!r})")
    known = set(vocab.synonyms)
    details: dict = {}
    n_mentions = n_hall = 0
    for k, cap in captions.items():
        gt = set(truth[k])
        unknown = gt - known
        if unknown:
            raise ValueError(f"chair_scores: truth of id {k!r} has classes not in the vocabulary: {sorted(unknown)}")
        found = vocab.find(cap)
        mentioned = [c for c, _, _ in found]
        hallucinated = [c for c in mentioned if c not in gt]
        details[k] = {"mentioned": mentioned, "hallucinated": hallucinated, "words": [w for _, w, _ in found]}
        n_mentions += len(mentioned)
        n_hall += len(hallucinated)
    return _chair(details, n_mentions, n_hall)


def shapes_attribute_chair(captions: Mapping[Hashable, str], scenes: Mapping[Hashable, dict]) -> dict:
    """Colour-shape CHAIR for the shapes world (see the module docstring); same keys as `chair_scores`.

    A mention is a colour word followed by a shape name (singular or plural), with at most one size
    word between; it is hallucinated when the scene has no object with that colour and shape.
    ``mentioned``/``hallucinated`` hold ``"colour shape"`` strings.
    """
    from vlmkit.data.worlds.shapes import COLORS, SIZES

    vocab = shapes_vocabulary()
    missing = [k for k in captions if k not in scenes]
    if missing:
        raise ValueError(f"shapes_attribute_chair: {len(missing)} caption id(s) have no scene (e.g. {missing[:5]!r})")
    details: dict = {}
    n_mentions = n_hall = 0
    for k, cap in captions.items():
        ws = words(cap)
        present = {(o["color"], o["shape"]) for o in scenes[k]["objects"]}
        mentioned = []
        for shape, _, i in vocab.find(cap):
            j = i - 1
            if j >= 0 and ws[j] in SIZES:
                j -= 1
            if j >= 0 and ws[j] in COLORS:
                mentioned.append((ws[j], shape))
        hallucinated = [m for m in mentioned if m not in present]
        details[k] = {
            "mentioned": [f"{c} {s}" for c, s in mentioned],
            "hallucinated": [f"{c} {s}" for c, s in hallucinated],
        }
        n_mentions += len(mentioned)
        n_hall += len(hallucinated)
    return _chair(details, n_mentions, n_hall)


__all__ = [
    "Vocabulary",
    "chair_scores",
    "coco_vocabulary",
    "load_synonyms",
    "plural",
    "scene_truth",
    "shapes_attribute_chair",
    "shapes_vocabulary",
    "words",
]
