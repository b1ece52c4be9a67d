"""Hand-computed cases for the official VQA accuracy and ANLS (see docs/metrics-vqa.md)."""

import pytest

from vlmkit.eval.metrics.anls import anls, anls_score, levenshtein
from vlmkit.eval.metrics.vqa import (
    CONTRACTIONS,
    normalize_vqa_answer,
    process_digit_article,
    process_punctuation,
    vqa_accuracy,
    vqa_scores,
)

# ---------------------------------------------------------------- normalisation


@pytest.mark.parametrize(
    "raw, expected",
    [
        # a comma between digits anywhere -> every punctuation char is deleted, not spaced
        ("1,000", "1000"),
        ("(1,000)", "1000"),
        # punctuation next to a space is deleted
        ("hello, world", "hello world"),
        ("yes, it's 5", "yes it's 5"),
        # punctuation with no space next to it becomes a space
        ("black-and-white", "black and white"),
        ("Yes!", "yes"),
        ("red/blue", "red blue"),
        # periods: kept before a digit, removed otherwise
        ("2.5", "2.5"),
        ("3.14.", "3.14"),
        ("It is 2.", "it is 2"),
        ("U.S.", "us"),
        # number words -> digits (including the official "none" -> "0")
        ("Two dogs.", "2 dogs"),
        ("ten", "10"),
        ("none", "0"),
        ("twelve", "twelve"),
        # articles dropped
        ("The cat", "cat"),
        ("an apple", "apple"),
        ("a", ""),
        # contractions (after lower-casing)
        ("dont", "don't"),
        ("Whats that", "what's that"),
        ("isnt", "isn't"),
        ("oclock", "o'clock"),
        # whitespace: newline/tab to space, strip, re-split
        ("\tblue\nsky  ", "blue sky"),
    ],
)
def test_normalize_vqa_answer(raw, expected):
    assert normalize_vqa_answer(raw) == expected


def test_punctuation_rule_is_per_character_and_uses_original_text():
    # "-" touches no space -> space; "?" has a space before it -> deleted
    assert process_punctuation("a-b ?") == "a b "
    # the comma-between-digits test switches every character to deletion
    assert process_punctuation("x-y 1,2") == "xy 12"
    # apostrophes and colons are not in the official list
    assert process_punctuation("it's 3:30") == "it's 3:30"


def test_official_contraction_quirks_kept():
    # keys with a capital I never match after lower-casing (official behaviour)
    assert process_digit_article("Im") == "im"
    assert CONTRACTIONS["somebody'd"] == "somebodyd"
    assert len(CONTRACTIONS) > 100


# ---------------------------------------------------------------- accuracy

OTHER = ["x1", "x2", "x3", "x4", "x5", "x6", "x7", "x8", "x9", "x10"]


@pytest.mark.parametrize(
    "m, expected",
    [
        (0, 0.0),
        # 1 match: the subset dropping it has 0; the 9 others have 1/3 -> 9/3/10
        (1, 0.3),
        # 2 matches: 2 subsets with 1/3, 8 with 2/3 -> (2/3 + 16/3) / 10
        (2, 0.6),
        # 3 matches: 3 subsets with 2/3, 7 with 1 -> (2 + 7) / 10
        (3, 0.9),
        # 4 matches: every subset keeps >= 3 matches
        (4, 1.0),
        (10, 1.0),
    ],
)
def test_leave_one_out_with_ten_answers(m, expected):
    answers = ["cat"] * m + OTHER[: 10 - m]
    assert vqa_accuracy("cat", answers) == pytest.approx(expected)


def test_eight_yes_two_no():
    answers = ["yes"] * 8 + ["no"] * 2
    # "no": 8 subsets keep 2 -> 2/3, 2 keep 1 -> 1/3 -> (16/3 + 2/3) / 10
    assert vqa_accuracy("no", answers) == pytest.approx(0.6)
    assert vqa_accuracy("yes", answers) == pytest.approx(1.0)


def test_fewer_than_ten_answers():
    # n = 5, m = 2: 2 subsets with 1/3, 3 with 2/3 -> (2/3 + 2) / 5
    assert vqa_accuracy("cat", ["cat", "cat", "a1", "a2", "a3"]) == pytest.approx(8 / 15)
    # n = 3, m = 1: (0 + 2 * 1/3) / 3
    assert vqa_accuracy("cat", ["cat", "dog", "cow"]) == pytest.approx(2 / 9)
    # n = 3, all match: every subset has 2 matches -> 2/3 (the divisor stays 3)
    assert vqa_accuracy("cat", ["cat"] * 3) == pytest.approx(2 / 3)
    # a single answer: the only leave-one-out subset is empty
    assert vqa_accuracy("cat", ["cat"]) == 0.0
    with pytest.raises(ValueError):
        vqa_accuracy("cat", [])


def test_normalisation_only_when_answers_differ():
    same = ["black"] * 10
    assert vqa_accuracy("black", same) == 1.0
    assert vqa_accuracy(" black\n", same) == 1.0  # whitespace clean-up is always applied
    assert vqa_accuracy("Black.", same) == 0.0  # identical answers: exact, case-sensitive
    differ = ["black"] * 9 + ["dark"]
    # now "Black." normalises to "black": 9 matches
    assert vqa_accuracy("Black.", differ) == pytest.approx(1.0)
    # ground truths are normalised too: "two" -> "2" gives 3 matches for "Two"
    assert vqa_accuracy("Two", ["2", "2", "two"] + ["3"] * 7) == pytest.approx(0.9)
    # and "none" -> "0" on both sides
    assert vqa_accuracy("none", ["none", "0", "1", "1", "1", "1", "1", "1", "1", "1"]) == pytest.approx(0.6)


def test_none_prediction_scores_zero():
    assert vqa_accuracy(None, ["cat"] * 10) == 0.0


def test_vqa_scores_breakdown():
    items = [
        {"prediction": "yes", "answers": ["yes"] * 10, "answer_type": "yes/no", "question_type": "is the"},
        {"prediction": "no", "answers": ["no"] * 2 + ["yes"] * 8, "answer_type": "yes/no", "question_type": "is the"},
        {"prediction": "2", "answers": ["2"] + ["3"] * 9, "answer_type": "number", "question_type": "how many"},
    ]
    s = vqa_scores(items)
    # per question: 1.0, 0.6, 0.3
    assert s["per_question"] == pytest.approx([1.0, 0.6, 0.3])
    assert s["accuracy"] == pytest.approx(1.9 / 3)
    assert s["n"] == 3
    assert s["by_answer_type"] == {"number": pytest.approx(0.3), "yes/no": pytest.approx(0.8)}
    assert s["n_by_answer_type"] == {"number": 1, "yes/no": 2}
    assert s["by_question_type"] == {"how many": pytest.approx(0.3), "is the": pytest.approx(0.8)}
    assert s["official"]["overall"] == 63.33
    assert s["official"]["perAnswerType"] == {"number": 30.0, "yes/no": 80.0}


def test_vqa_scores_without_types_and_empty():
    s = vqa_scores([{"prediction": "a1", "answers": ["a1"] * 3 + ["b"] * 7}])
    assert s["accuracy"] == pytest.approx(0.9)
    assert s["by_answer_type"] == {} and s["by_question_type"] == {}
    assert vqa_scores([])["accuracy"] == 0.0


# ---------------------------------------------------------------- ANLS


def test_levenshtein():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3
    assert levenshtein("abc", "abc") == 0
    assert levenshtein("flaw", "lawn") == 2


def test_anls_exact_and_case_whitespace():
    assert anls_score("invoice", ["invoice"]) == 1.0
    assert anls_score("  Total ", ["total"]) == 1.0


def test_anls_near_match():
    # one substitution in a 10-character word: NL = 0.1
    assert anls_score("abcdefghij", ["abcdefghiX"]) == pytest.approx(0.9)
    # one insertion: NL = 1/4
    assert anls_score("abc", ["abcd"]) == pytest.approx(0.75)
    # 2 edits over 5 chars: NL = 0.4 < 0.5
    assert anls_score("abcde", ["abxye"]) == pytest.approx(0.6)


def test_anls_threshold():
    assert anls_score("cat", ["dog"]) == 0.0
    # NL exactly 0.5 is not < tau -> 0
    assert anls_score("abcd", ["abxy"]) == 0.0
    assert anls_score(None, ["x"]) == 0.0


def test_anls_max_over_answers_and_mean():
    # "help": 2 edits / 5 -> 0.6 ; "hello!": 1 edit / 6 -> 5/6
    assert anls_score("hello", ["help", "hello!"]) == pytest.approx(5 / 6)
    assert anls(["a", "b"], [["a"], ["c"]]) == pytest.approx(0.5)
    assert anls([], []) == 0.0
    with pytest.raises(ValueError):
        anls(["a"], [])
