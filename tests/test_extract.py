import pytest

from vlmkit.eval.extract import Extraction, answer_kind, extract, normalize_answer, parse_options


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Yes, there is.", "yes there is"),
        ("There are THREE.", "there are 3"),
        ("The answer is: a circle!", "answer is circle"),
        ("It's an apple", "its apple"),
        ("1,000 cats and 2.5 dogs.", "1000 cats and 2.5 dogs"),
        ("[0.12,  0.25 , 0.5, 0.75]", "[0.120, 0.250, 0.500, 0.750]"),
        ("box: [0.125, 0.250, 0.500, 0.750].", "box [0.125, 0.250, 0.500, 0.750]"),
        ("  twenty   zero  ", "20 0"),
        ("The [0.1, 0.2, 0.3, 0.4]", "[0.100, 0.200, 0.300, 0.400]"),
        ("", ""),
        ("A.", "a"),
        ("the one", "1"),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_answer_kinds():
    assert answer_kind("exists") == "yesno"
    assert answer_kind("count_shape") == "number"
    assert answer_kind("ground_ref") == "box"
    assert answer_kind("color") == "open"
    assert answer_kind(None) == "open"


@pytest.mark.parametrize(
    "pred, qt, expected",
    [
        ("yes", "exists", Extraction("yes", "exact")),
        ("No.", "exists", Extraction("no", "exact")),
        ("Yes, there is.", "exists", Extraction("yes", "rule:yesno")),
        ("I think there is no circle", "exists", Extraction("no", "rule:yesno")),
        ("Perhaps.", "exists", Extraction(None, "failed")),
        ("3", "count_total", Extraction("3", "exact")),
        ("three.", "count_total", Extraction("3", "exact")),
        ("There are three.", "count_total", Extraction("3", "rule:number")),
        ("I count 12 shapes, maybe 13", "count_color", Extraction("12", "rule:number")),
        ("2.0", "count_shape", Extraction("2", "exact")),
        ("many", "count_total", Extraction(None, "failed")),
        ("[0.125, 0.250, 0.500, 0.750]", "ground_ref", Extraction("[0.125, 0.250, 0.500, 0.750]", "exact")),
        ("[0.12,0.25,  0.5 ,0.75]", "ground_ref", Extraction("[0.120, 0.250, 0.500, 0.750]", "exact")),
        ("It is at [ 0.10, 0.20, 0.30, 0.40 ] and [0.5, 0.5, 0.6, 0.6]", "ground_ref",
         Extraction("[0.100, 0.200, 0.300, 0.400]", "rule:box")),
        ("somewhere on the left", "ground_ref", Extraction(None, "failed")),
        ("Red.", "color", Extraction("red", "exact")),
        ("the big red square", "color", Extraction("big red square", "exact")),
        ("A", "reading", Extraction("a", "exact")),
        ("It is a red square in the corner", "color", Extraction("it", "rule:first_word")),
        ("!!!", "color", Extraction(None, "failed")),
    ],
)
def test_extract_rules(pred, qt, expected):
    assert extract(pred, qt) == expected


def test_extract_with_vocabulary():
    vocab = ["red", "blue", "light blue"]
    assert extract("Blue", "color", vocabulary=vocab) == Extraction("blue", "exact")
    assert extract("It is a red square.", "color", vocabulary=vocab) == Extraction("red", "rule:vocab")
    # earliest match wins; on the same start the longer phrase
    assert extract("light blue, not red", "color", vocabulary=vocab) == Extraction("light blue", "rule:vocab")
    # out of vocabulary: first word (scored wrong later)
    assert extract("purple", "color", vocabulary=vocab) == Extraction("purple", "rule:first_word")


OPTS = {"A": "red", "B": "blue", "C": "green", "D": "light blue"}


@pytest.mark.parametrize(
    "pred, expected",
    [
        ("B", Extraction("B", "exact")),
        ("b.", Extraction("B", "exact")),
        ("B. blue", Extraction("B", "rule:letter")),
        ("C) green", Extraction("C", "rule:letter")),
        ("(D)", Extraction("D", "exact")),
        ("I would pick (C) here", Extraction("C", "rule:letter")),
        ("The answer is A.", Extraction("A", "rule:letter")),
        ("answer: d", Extraction("D", "rule:letter")),
        ("Green", Extraction("C", "option_text")),
        ("It looks red to me", Extraction("A", "option_text")),
        # "A red circle": the article is not read as letter A; "red" names option A
        ("A red circle", Extraction("A", "option_text")),
        # two options' texts occur ("blue" and "light blue"): ambiguous
        ("light blue", Extraction("D", "option_text")),
        ("it is blue or light blue", Extraction(None, "failed")),
        ("no idea", Extraction(None, "failed")),
    ],
)
def test_extract_letter(pred, expected):
    assert extract(pred, "mcq_color", options=OPTS) == expected


def test_extract_letter_options_list_and_kind():
    assert extract("blue", "x", options=["red", "blue"]) == Extraction("B", "option_text")
    assert extract("(A)", "x", kind="letter") == Extraction("A", "exact")
    with pytest.raises(ValueError):
        extract("x", "color", kind="nonsense")


def test_parse_options():
    q = "What colour?\nA. red\n(B) blue\nC: green\nD) light blue"
    assert parse_options(q) == {"A": "red", "B": "blue", "C": "green", "D": "light blue"}
