import pytest

from vlmkit.eval.metrics.mcq import circular_scores, circular_variants, extract_option
from vlmkit.eval.metrics.mme import mme_scores

OPTS = {"A": "red circle", "B": "blue square", "C": "green triangle", "D": "yellow star"}


# ---------------------------------------------------------------- extract_option: rule 1


@pytest.mark.parametrize("answer", ["B", "B.", "(B)", "B)", "The answer: B", "  **B**  \n", "I choose option (B)."])
def test_standalone_letter_at_end(answer):
    assert extract_option(answer, OPTS) == ("B", "rule_letter")


def test_letter_inside_word_is_not_an_option():
    # "CAD" and "BAD" contain C, A, B, D, none standalone; no option text either
    assert extract_option("It looks BAD in CAD", OPTS) == (None, "failed")


def test_article_a_at_start_is_not_option_a():
    # "A" followed by a word is an article; the option text decides instead
    assert extract_option("A blue square.", OPTS) == ("B", "option_text")
    assert extract_option("A shape", OPTS) == (None, "failed")


def test_lowercase_letter_only_as_whole_answer():
    assert extract_option("c", OPTS) == ("C", "rule_letter")
    assert extract_option("(d).", OPTS) == ("D", "rule_letter")
    # lower-case letters inside a sentence are words, not options
    assert extract_option("i think it is b", OPTS) == (None, "failed")


def test_multiple_letters_last_standalone_wins():
    assert extract_option("B, not A.", OPTS) == ("A", "rule_letter")
    # "A is" is not standalone (followed by a word), so C is the only candidate
    assert extract_option("Option A is wrong; C.", OPTS) == ("C", "rule_letter")


def test_letter_outside_tail_window_is_ignored():
    answer = "B. " + "x" * 50
    assert extract_option(answer, OPTS) == (None, "failed")
    assert extract_option(answer, OPTS, tail_chars=60) == ("B", "rule_letter")


def test_letter_not_among_options_is_ignored():
    assert extract_option("E.", OPTS) == (None, "failed")
    assert extract_option("C.", {"A": "x", "B": "y"}) == (None, "failed")


def test_abbreviation_letters_do_not_count():
    assert extract_option("Made in the U.S.A.", OPTS) == (None, "failed")
    # a letter joined by a hyphen or apostrophe is part of a word
    assert extract_option("It looks like a D-shape", OPTS) == (None, "failed")
    assert extract_option("It is in plan B's list", OPTS) == (None, "failed")


# ---------------------------------------------------------------- rule 2


def test_answer_is_pattern():
    assert extract_option("I believe the answer is C because it has three sides", OPTS) == ("C", "rule_answer_is")
    assert extract_option("answer: d, since it is a star shape", OPTS) == ("D", "rule_answer_is")
    assert extract_option("The correct answer is option B here, judging by the colour", OPTS) == (
        "B",
        "rule_answer_is",
    )


def test_answer_is_article_a_is_not_option_a():
    # "a" followed by a word is the article; the option text decides
    assert extract_option("The answer is a red circle", OPTS) == ("A", "option_text")
    assert extract_option("The answer is a shape of some kind", OPTS) == (None, "failed")
    # but "a" at the end of the phrase is the letter
    assert extract_option("the answer is a, clearly, as seen in the picture here", OPTS) == ("A", "rule_answer_is")


# ---------------------------------------------------------------- rule 3


def test_unique_option_text_match():
    assert extract_option("It is the green triangle", OPTS) == ("C", "option_text")
    assert extract_option("YELLOW STAR!", OPTS) == ("D", "option_text")


def test_ambiguous_option_text_fails():
    assert extract_option("the red circle or the blue square", OPTS) == (None, "failed")


def test_option_text_needs_whole_words():
    opts = {"A": "red", "B": "blue"}
    assert extract_option("reddish", opts) == (None, "failed")
    assert extract_option("bluered", opts) == (None, "failed")


def test_option_text_length_cap():
    answer = "Looking closely, I can see the shape is a green triangle"  # 56 characters
    assert len(answer) == 56
    assert extract_option(answer, OPTS, max_text_len=56) == ("C", "option_text")
    assert extract_option(answer, OPTS, max_text_len=55) == (None, "failed")


def test_exact_option_text_ignores_length_cap():
    assert extract_option("Green triangle.", OPTS, max_text_len=3) == ("C", "option_text")


def test_nested_option_texts():
    opts = {"A": "blue", "B": "light blue", "C": "red"}
    assert extract_option("it is light blue", opts) == ("B", "option_text")
    assert extract_option("it is blue", opts) == ("A", "option_text")


def test_judge_only_when_given_and_only_after_rules():
    calls = []

    def judge(answer, options):
        calls.append(answer)
        return "d"

    assert extract_option("no idea", OPTS) == (None, "failed")
    assert extract_option("no idea", OPTS, judge=judge) == ("D", "judge")
    assert extract_option("B", OPTS, judge=judge) == ("B", "rule_letter")
    assert calls == ["no idea"]
    assert extract_option("no idea", OPTS, judge=lambda a, o: "Z") == (None, "failed")


# ---------------------------------------------------------------- CircularEval


def test_circular_variants_of_four_options():
    variants = circular_variants("q1", OPTS)
    assert [v[0] for v in variants] == ["q1@0", "q1@1", "q1@2", "q1@3"]
    texts = [list(v[1].values()) for v in variants]
    assert texts[0] == ["red circle", "blue square", "green triangle", "yellow star"]
    assert texts[1] == ["blue square", "green triangle", "yellow star", "red circle"]
    assert texts[2] == ["green triangle", "yellow star", "red circle", "blue square"]
    assert texts[3] == ["yellow star", "red circle", "blue square", "green triangle"]
    assert all(list(v[1]) == ["A", "B", "C", "D"] for v in variants)
    # correct answer C ("green triangle") moves to C, B, A, D
    assert [v[2]["C"] for v in variants] == ["C", "B", "A", "D"]
    for _, rotated, letter_map in variants:
        for orig, new in letter_map.items():
            assert rotated[new] == OPTS[orig]


def _recs(qid, correct_letters, preds, **extra):
    return [
        {"question_id": qid, "rotation": i, "answer": a, "prediction": p, **extra}
        for i, (a, p) in enumerate(zip(correct_letters, preds))
    ]


def test_circular_three_of_four_is_wrong_but_single_pass_right():
    truth = ["C", "B", "A", "D"]
    recs = _recs("q1", truth, ["C", "B", "A", "A"], category="color", **{"l2-category": "attribute"})
    m = circular_scores(recs)
    assert m["n_questions"] == 1 and m["n_records"] == 4
    assert m["circular_accuracy"] == 0.0
    assert m["single_pass_accuracy"] == 1.0


def test_circular_scores_overall_and_by_category():
    truth = ["C", "B", "A", "D"]
    recs = (
        _recs("q1", truth, ["C", "B", "A", "A"], category="color", **{"l2-category": "attribute"})  # 3/4
        + _recs("q2", truth, ["c", "B", "A", "D"], category="color", **{"l2-category": "attribute"})  # all
        + _recs("q3", ["A", "B"], ["A", "B"], category="count", **{"l2-category": "attribute"})  # 2 options, all
        + _recs("q4", truth, [None, "B", "A", "D"], category="ocr", **{"l2-category": "reading"})  # first missed
    )
    recs[0]["method"] = "rule_letter"
    recs[-4]["method"] = "failed"
    m = circular_scores(recs)
    assert m["n_questions"] == 4 and m["n_records"] == 14
    assert m["circular_accuracy"] == pytest.approx(2 / 4)  # q2, q3
    assert m["single_pass_accuracy"] == pytest.approx(3 / 4)  # q1, q2, q3
    assert m["by_category"]["color"] == {"n": 2, "circular_accuracy": 0.5, "single_pass_accuracy": 1.0}
    assert m["by_category"]["count"]["circular_accuracy"] == 1.0
    assert m["by_category"]["ocr"] == {"n": 1, "circular_accuracy": 0.0, "single_pass_accuracy": 0.0}
    assert m["by_l2_category"]["attribute"]["n"] == 3
    assert m["by_l2_category"]["attribute"]["circular_accuracy"] == pytest.approx(2 / 3)
    assert m["by_l2_category"]["attribute"]["single_pass_accuracy"] == 1.0
    assert m["by_l2_category"]["reading"]["single_pass_accuracy"] == 0.0
    assert m["extraction"] == {"failed": 1, "rule_letter": 1}


def test_circular_scores_rejects_missing_or_repeated_rotations():
    with pytest.raises(ValueError):
        circular_scores(_recs("q", ["A", "B"], ["A", "B"])[1:])  # only rotation 1
    with pytest.raises(ValueError):
        circular_scores(_recs("q", ["A"], ["A"]) * 2)


# ---------------------------------------------------------------- MME


def test_mme_hand_computed_subtask_scores_and_totals():
    recs = [
        # existence: 2 images, both right on img1, one of two on img2
        ("existence", "img1", "Yes", "yes"),
        ("existence", "img1", "No.", "no"),
        ("existence", "img2", "yes", "yes"),
        ("existence", "img2", "yes", "no"),
        # OCR: one image, both right
        ("OCR", "o1", "yes", "yes"),
        ("OCR", "o1", "No, it does not.", "no"),
        # code_reasoning: one image, one unparseable answer
        ("code_reasoning", "c1", "maybe", "yes"),
        ("code_reasoning", "c1", "no", "no"),
    ]
    m = mme_scores(recs)
    ex = m["subtasks"]["existence"]
    assert ex["acc"] == pytest.approx(3 / 4)
    assert ex["acc_plus"] == pytest.approx(1 / 2)  # img2 counts for acc, not acc+
    assert ex["score"] == pytest.approx(125.0)
    assert (ex["n_questions"], ex["n_images"], ex["n_unparsed"]) == (4, 2, 0)
    assert m["subtasks"]["OCR"]["score"] == pytest.approx(200.0)
    cr = m["subtasks"]["code_reasoning"]
    assert cr["acc"] == pytest.approx(0.5) and cr["acc_plus"] == 0.0 and cr["n_unparsed"] == 1
    assert cr["score"] == pytest.approx(50.0)
    assert m["perception"] == pytest.approx(325.0)
    assert m["cognition"] == pytest.approx(50.0)
    assert m["total"] == pytest.approx(375.0)
    assert "existence" not in m["perception_missing"] and "count" in m["perception_missing"]
    assert len(m["perception_missing"]) == 8
    assert m["cognition_missing"] == ["commonsense_reasoning", "numerical_calculation", "text_translation"]


def test_mme_accepts_mappings_and_full_marks():
    recs = [
        {"subtask": "count", "image_id": i, "prediction": lab, "label": lab}
        for i in range(3)
        for lab in ("yes", "no")
    ]
    m = mme_scores(recs)
    assert m["subtasks"]["count"]["score"] == pytest.approx(200.0)
    assert m["perception"] == pytest.approx(200.0)


def test_mme_rejects_bad_input():
    with pytest.raises(ValueError):
        mme_scores([("ocr", "i", "yes", "yes"), ("ocr", "i", "no", "no")])  # official name is "OCR"
    with pytest.raises(ValueError):
        mme_scores([("count", "i", "yes", "maybe"), ("count", "i", "no", "no")])
    with pytest.raises(ValueError):
        mme_scores([("count", "i", "yes", "yes")])  # one question for the image
    m = mme_scores([("count", "i", "yes", "yes")], questions_per_image=None)
    assert m["subtasks"]["count"]["score"] == pytest.approx(200.0)
