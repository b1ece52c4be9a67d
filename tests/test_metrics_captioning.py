"""Caption metrics (BLEU/ROUGE-L/CIDEr-D via pycocoevalcap) and CHAIR; expected values by hand."""

import math
import shutil

import pytest

pytest.importorskip("pycocoevalcap")

from pycocoevalcap.bleu.bleu import Bleu  # noqa: E402
from pycocoevalcap.cider.cider import Cider  # noqa: E402
from pycocoevalcap.rouge.rouge import Rouge  # noqa: E402

from vlmkit.eval.metrics import captioning  # noqa: E402
from vlmkit.eval.metrics.captioning import caption_scores, python_tokenize  # noqa: E402
from vlmkit.eval.metrics.chair import (  # noqa: E402
    COCO_SYNONYMS_FILE,
    Vocabulary,
    chair_scores,
    coco_vocabulary,
    load_synonyms,
    scene_truth,
    shapes_attribute_chair,
    shapes_vocabulary,
)

HAS_JAVA = shutil.which("java") is not None
COCO_SYNONYMS = COCO_SYNONYMS_FILE  # the project's shared/data/coco_synonyms.txt, shipped with vlmkit

# ================================================================== caption scores


PRED = {
    "img1": "a red circle next to a blue square",
    "img2": "two green triangles on a black background",
    "img3": "a yellow hexagon",
    7: "an orange cross and a purple diamond at the top",
}
REFS = {
    "img1": ["a red circle and a blue square", "a blue square to the right of a red circle"],
    "img2": ["two green triangles", "a pair of green triangles on black", "green triangles"],
    "img3": ["a small yellow hexagon at top left"],
    7: ["an orange cross and a purple diamond", "a purple diamond near an orange cross at the top"],
}


def test_equal_to_pycocoevalcap_on_pretokenised_text():
    for text in list(PRED.values()) + [r for rs in REFS.values() for r in rs]:
        assert python_tokenize(text) == text  # already tokenised: the tokenizer must not change it
    gts = {k: list(v) for k, v in REFS.items()}
    res = {k: [v] for k, v in PRED.items()}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    m = caption_scores(PRED, REFS, tokenizer="python")
    assert [m["bleu_1"], m["bleu_2"], m["bleu_3"], m["bleu_4"]] == [float(b) for b in bleu]
    assert m["rouge_l"] == float(rouge)
    assert m["cider_d"] == float(cider)
    assert m["n"] == 4 and m["tokenizer"] == "python"
    assert 0 < m["bleu_4"] < m["bleu_1"] < 1 and m["cider_d"] > 0


def test_bleu_hand_computed():
    m = caption_scores({0: "a red circle"}, {0: ["a red square"]}, tokenizer="python")
    # unigrams: a, red match; circle does not -> 2/3; c = r = 3 -> brevity penalty 1
    assert m["bleu_1"] == pytest.approx(2 / 3, abs=1e-9)  # pycocoevalcap adds 1e-15 / 1e-9
    # bigrams: "a red" matches, "red circle" does not -> 1/2; BLEU-2 = sqrt(2/3 * 1/2)
    assert m["bleu_2"] == pytest.approx(math.sqrt(1 / 3), abs=1e-9)
    # a shorter candidate: precision 1, brevity penalty exp(1 - r/c) = exp(1 - 3/2)
    m = caption_scores({0: "a red"}, {0: ["a red square"]}, tokenizer="python")
    assert m["bleu_1"] == pytest.approx(math.exp(-0.5), abs=1e-9)
    # clipping: "the" counts at most once (its count in the reference); c = 3 > r = 2 -> BP 1
    m = caption_scores({0: "the the the"}, {0: ["the cat"]}, tokenizer="python")
    assert m["bleu_1"] == pytest.approx(1 / 3, abs=1e-9)
    # closest reference length: c = 2, refs of length 2 and 5 -> r = 2, no penalty
    m = caption_scores({0: "red circle"}, {0: ["red circle", "a big red circle here"]}, tokenizer="python")
    assert m["bleu_1"] == pytest.approx(1.0, abs=1e-9)


def test_rouge_l_hand_computed():
    m = caption_scores({0: "a red circle"}, {0: ["a big red square shape"]}, tokenizer="python")
    p, r, b2 = 2 / 3, 2 / 5, 1.2**2  # LCS "a red" = 2 words
    assert m["rouge_l"] == pytest.approx((1 + b2) * p * r / (r + b2 * p))


def test_cider_d_hand_computed_and_depends_on_the_image_set():
    # Two images, one reference each. IDF = log(2) - log(df); every n-gram has df 1 -> log 2.
    # A: candidate = reference -> cosine 1 for 1- and 2-grams, 0 for 3-, 4-grams (none) ->
    #    mean 0.5, x10 = 5. B: no shared n-gram -> 0. CIDEr-D = mean = 2.5.
    preds = {"A": "red circle", "B": "green cross"}
    refs = {"A": ["red circle"], "B": ["blue square"]}
    assert caption_scores(preds, refs, tokenizer="python")["cider_d"] == pytest.approx(2.5)
    # A alone: one image -> every reference n-gram has IDF log(1) - log(1) = 0 -> score 0
    assert caption_scores({"A": "red circle"}, {"A": ["red circle"]}, tokenizer="python")["cider_d"] == 0.0


def test_cider_d_length_penalty():
    # candidate 'red circle' + 6 unmatched words vs reference 'red circle': the cosine is < 1
    # and the Gaussian penalty exp(-6^2 / (2 * 6^2)) = exp(-0.5) applies on top
    preds = {"A": "red circle", "B": "green cross"}
    refs = {"A": ["red circle"], "B": ["blue square"]}
    base = caption_scores(preds, refs, tokenizer="python")["cider_d"]
    longer = dict(preds, A="red circle u v w x y z")
    assert caption_scores(longer, refs, tokenizer="python")["cider_d"] < base * math.exp(-0.5)


def test_missing_ids_and_bad_input_raise():
    with pytest.raises(ValueError, match="no references"):
        caption_scores({1: "a", 2: "b"}, {1: ["a"]}, tokenizer="python")
    with pytest.raises(ValueError, match="no prediction"):
        caption_scores({1: "a"}, {1: ["a"], 3: ["c"]}, tokenizer="python")
    with pytest.raises(ValueError, match="non-empty"):
        caption_scores({1: "a"}, {1: []}, tokenizer="python")
    with pytest.raises(ValueError, match="no captions"):
        caption_scores({}, {}, tokenizer="python")
    with pytest.raises(ValueError, match="tokenizer"):
        caption_scores({1: "a"}, {1: ["a"]}, tokenizer="spacy")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("A man riding a horse.", "a man riding a horse"),
        ("The dog's ball, isn't it?", "the dog 's ball is n't it"),
        ("Don't! I can't, we won't; cannot", "do n't i ca n't we wo n't can not"),
        ('A "red" circle: yes -- really...', "a red circle yes really"),
        ("Two (2) hot-dogs", "two -lrb- 2 -rrb- hot-dogs"),  # brackets survive, lower-cased
        ("3.5 m. wide at 5:30 p.m.", "3.5 m. wide at 5:30 p.m."),  # abbreviations keep periods
        ("the cars' wheels, 'quoted' text", "the cars wheels quoted text"),
        ("$5 and 50%", "$ 5 and 50 %"),
        ("wow!!", "wow !!"),  # a run of ! is one token, not in the removal list
        ("  spaced\nout  ", "spaced out"),
        ("A Red Circle, A Blue Square.", "a red circle a blue square"),
    ],
)
def test_python_tokenizer_punctuation(text, expected):
    assert python_tokenize(text) == expected


def test_auto_without_java_uses_python_and_ptb_without_java_raises(monkeypatch):
    monkeypatch.setattr(captioning.shutil, "which", lambda name: None)
    m = caption_scores({0: "A red circle."}, {0: ["A red square!"]})
    assert m["tokenizer"] == "python"
    assert m["bleu_1"] == pytest.approx(2 / 3, abs=1e-9)  # punctuation removed before scoring
    with pytest.raises(RuntimeError, match="Java"):
        caption_scores({0: "a"}, {0: ["a"]}, tokenizer="ptb")


@pytest.mark.skipif(not HAS_JAVA, reason="PTBTokenizer needs Java")
def test_ptb_and_python_tokenizers_agree():
    preds = {
        0: "A red circle, a blue square and an orange hexagon.",
        1: "The dog's ball isn't here; it's gone!",
        2: "a small red circle at top left, a large blue cross at bottom right.",
    }
    refs = {
        0: ["Two shapes: a red circle and a blue square.", "An orange hexagon (left)."],
        1: ["A dog's ball.", "Where's the ball?"],
        2: ["A small red circle at top left and a large blue cross at bottom right."],
    }
    ptb = caption_scores(preds, refs, tokenizer="ptb")
    py = caption_scores(preds, refs, tokenizer="python")
    assert ptb["tokenizer"] == "ptb" and py["tokenizer"] == "python"
    assert caption_scores(preds, refs)["tokenizer"] == "ptb"  # auto picks Java when present
    for k in ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider_d"):
        assert ptb[k] == py[k], k


# ================================================================== CHAIR

TOY = {"dog": ["puppy"], "hot dog": [], "traffic light": ["stop light"], "person": ["man", "woman", "people"]}


def test_vocabulary_matching_plurals_two_word_names_synonyms():
    v = Vocabulary({c: tuple(s) for c, s in TOY.items()})
    found = v.find("Two hot dogs, three puppies and traffic-lights; a dog and two women.")
    assert [(c, w) for c, w, _ in found] == [
        ("hot dog", "hot dogs"),  # longest match first: not a "dog"
        ("dog", "puppies"),  # synonym, -y -> -ies
        ("traffic light", "traffic lights"),  # hyphen splits words
        ("dog", "dog"),
        ("person", "women"),  # irregular plural
    ]
    assert v.find("a hotdog") == [] and v.find("the lights") == []


def test_chair_hand_computed_toy():
    captions = {
        "a": "Two hot dogs next to a dog.",  # hot dog ok, dog hallucinated
        "b": "A man waits at the traffic light.",  # 2 mentions, both true
        "c": "A puppy, a woman and a stop light.",  # dog true; person, traffic light hallucinated
        "d": "An empty street at night.",  # no object
    }
    truth = {"a": {"hot dog"}, "b": {"person", "traffic light"}, "c": {"dog"}, "d": {"person"}}
    m = chair_scores(captions, truth, TOY)
    assert m["n_mentions"] == 2 + 2 + 3 + 0
    assert m["n_hallucinated"] == 1 + 0 + 2
    assert m["chair_i"] == pytest.approx(3 / 7)
    assert m["n_captions"] == 4 and m["chair_s"] == pytest.approx(2 / 4)
    assert m["details"]["a"] == {"mentioned": ["hot dog", "dog"], "hallucinated": ["dog"], "words": ["hot dogs", "dog"]}
    assert m["details"]["c"]["hallucinated"] == ["person", "traffic light"]
    assert m["details"]["d"]["mentioned"] == [] and m["details"]["d"]["hallucinated"] == []


def test_chair_errors():
    with pytest.raises(ValueError, match="no truth"):
        chair_scores({1: "a dog"}, {}, TOY)
    with pytest.raises(ValueError, match="not in the vocabulary"):
        chair_scores({1: "a dog"}, {1: {"dgo"}}, TOY)
    with pytest.raises(ValueError, match="two classes"):
        Vocabulary({"dog": ("pup",), "cat": ("pup",)})
    assert chair_scores({}, {}, TOY)["chair_i"] == 0.0


def test_load_synonyms_format(tmp_path):
    p = tmp_path / "syn.txt"
    p.write_text("motorcycle, scooter,  motor bike, scooter\nCell Phone, phone, iPhone\n\nhot dog\n")
    assert load_synonyms(p) == {
        "motorcycle": ["scooter", "motor bike"],
        "cell phone": ["phone", "iphone"],
        "hot dog": [],
    }


def test_coco_vocabulary_hand_computed():
    v = coco_vocabulary(COCO_SYNONYMS)
    assert len(v.classes) == 80 and "hot dog" in v.classes and "traffic light" in v.classes
    captions = {
        1: "A man on a motor bike stops at the traffic lights.",  # person, motorcycle, traffic light
        2: "Two teddy bears and a kitten on a sofa.",  # teddy bear, cat, couch
        3: "A plate with hot dogs.",  # hot dog (not dog)
    }
    truth = {1: {"person", "motorcycle", "traffic light"}, 2: {"teddy bear", "bed"}, 3: {"hot dog", "dining table"}}
    m = chair_scores(captions, truth, v)
    assert m["details"][1]["mentioned"] == ["person", "motorcycle", "traffic light"]
    assert m["details"][2]["mentioned"] == ["teddy bear", "cat", "couch"]
    assert m["details"][3]["mentioned"] == ["hot dog"]
    assert (m["n_mentions"], m["n_hallucinated"]) == (7, 2)  # kitten, sofa
    assert m["chair_i"] == pytest.approx(2 / 7) and m["chair_s"] == pytest.approx(1 / 3)


def _scene(*objs):
    return {"objects": [{"shape": s, "color": c, "size": "small"} for c, s in objs]}


def test_shapes_world_object_and_attribute_chair():
    scenes = {
        "s1": _scene(("red", "circle"), ("red", "circle"), ("blue", "triangle")),
        "s2": _scene(("green", "cross")),
        "s3": _scene(("yellow", "hexagon"), ("purple", "diamond")),
    }
    captions = {
        "s1": "Two red circles and a blue square.",  # circle ok, square hallucinated
        "s2": "a small blue cross and two crosses.",  # object ok twice; colour wrong once
        "s3": "a yellow hexagon, a purple diamond and a red triangle.",  # triangle hallucinated
    }
    truth = {k: scene_truth(s) for k, s in scenes.items()}
    assert truth["s1"] == {"circle", "triangle"}
    m = chair_scores(captions, truth, shapes_vocabulary())
    assert m["details"]["s1"]["mentioned"] == ["circle", "square"]
    assert m["details"]["s2"]["mentioned"] == ["cross", "cross"]
    assert (m["n_mentions"], m["n_hallucinated"]) == (2 + 2 + 3, 1 + 0 + 1)
    assert m["chair_i"] == pytest.approx(2 / 7) and m["chair_s"] == pytest.approx(2 / 3)
    a = shapes_attribute_chair(captions, scenes)
    # colour-shape mentions: red circle, blue square | blue cross (no colour on "two crosses")
    # | yellow hexagon, purple diamond, red triangle
    assert a["details"]["s1"] == {"mentioned": ["red circle", "blue square"], "hallucinated": ["blue square"]}
    assert a["details"]["s2"] == {"mentioned": ["blue cross"], "hallucinated": ["blue cross"]}
    assert (a["n_mentions"], a["n_hallucinated"]) == (6, 3)
    assert a["chair_i"] == pytest.approx(3 / 6) and a["chair_s"] == pytest.approx(3 / 3)
