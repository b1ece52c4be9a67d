import pytest

from vlmkit.data.sample import Box
from vlmkit.eval.metrics import accuracy_by_type, box_iou, exact_match, grounding_metrics, yesno_metrics


def test_exact_match_normalises_both_sides():
    assert exact_match("Three.", "3")
    assert exact_match("the Red", "red")
    assert not exact_match(None, "red")
    assert not exact_match("blue", "red")


def test_accuracy_by_type_is_micro_average():
    m = accuracy_by_type([("color", 1), ("color", 0), ("color", 1), ("shape", 0)])
    assert m["accuracy"] == pytest.approx(2 / 4)
    assert m["by_type"] == {"color": pytest.approx(2 / 3), "shape": 0.0}
    assert m["n_by_type"] == {"color": 3, "shape": 1}
    assert accuracy_by_type([])["accuracy"] == 0.0


def test_pope_hand_computed():
    targets = ["yes"] * 5 + ["no"] * 5
    preds = ["yes", "yes", "yes", "no", None, "yes", "no", "no", "no", "no"]
    # TP=3 (items 0-2), FN=1 (item 3), item 4 unparsed on a yes; FP=1 (item 5), TN=4
    m = yesno_metrics(preds, targets)
    assert (m["tp"], m["fp"], m["tn"], m["fn"], m["n_unparsed"]) == (3, 1, 4, 1, 1)
    assert m["accuracy"] == pytest.approx(7 / 10)
    assert m["precision"] == pytest.approx(3 / 4)
    assert m["recall"] == pytest.approx(3 / 5)
    assert m["f1"] == pytest.approx(2 * 0.75 * 0.6 / (0.75 + 0.6))  # 0.6667
    assert m["yes_ratio"] == pytest.approx(4 / 10)  # of the predictions (labels are 5/10)


def test_pope_always_yes_has_yes_ratio_one_on_balanced_labels():
    targets = ["yes", "no"] * 5
    m = yesno_metrics(["yes"] * 10, targets)
    assert m["yes_ratio"] == 1.0
    assert m["accuracy"] == 0.5
    assert m["precision"] == 0.5
    assert m["recall"] == 1.0
    assert m["f1"] == pytest.approx(2 / 3)


def test_pope_always_no_and_unparsed():
    m = yesno_metrics(["no"] * 4, ["yes", "no", "yes", "no"])
    assert m["precision"] == 0.0 and m["recall"] == 0.0 and m["f1"] == 0.0 and m["yes_ratio"] == 0.0
    assert m["accuracy"] == 0.5
    m = yesno_metrics([None, "maybe"], ["yes", "no"])
    assert m["accuracy"] == 0.0 and m["n_unparsed"] == 2 and m["yes_ratio"] == 0.0
    with pytest.raises(ValueError):
        yesno_metrics(["yes"], ["perhaps"])
    with pytest.raises(ValueError):
        yesno_metrics(["yes"], [])


def test_iou_cases():
    full = Box(0, 0, 1, 1)
    assert box_iou(Box(0, 0, 0.5, 0.5), full) == pytest.approx(0.25)
    # overlap 0.25 x 1, union 0.5 + 0.5 - 0.25
    assert box_iou(Box(0, 0, 0.5, 1), Box(0.25, 0, 0.75, 1)) == pytest.approx(1 / 3)
    assert box_iou(full, full) == 1.0
    assert box_iou(Box(0, 0, 0.2, 0.2), Box(0.5, 0.5, 1, 1)) == 0.0
    assert box_iou(None, full) == 0.0
    assert box_iou(Box(0.5, 0.5, 0.5, 0.9), full) == 0.0  # zero area


def test_grounding_metrics():
    ious = [1.0, box_iou(Box(0, 0, 0.5, 1), Box(0, 0, 1, 1)), 1 / 3, 0.0]  # 0.5 counts as a hit
    m = grounding_metrics(ious, n_unparsed=1)
    assert m["acc_iou50"] == pytest.approx(2 / 4)
    assert m["mean_iou"] == pytest.approx((1 + 0.5 + 1 / 3 + 0) / 4)
    assert m["n"] == 4 and m["n_unparsed"] == 1
    assert grounding_metrics([])["acc_iou50"] == 0.0
