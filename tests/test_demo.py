"""The demo's pass/fail logic and its minutes scaling (the demo itself is a benchmark, not a test)."""

from vlmkit.config import load_recipe
from vlmkit.demo import check_required, headline, scale_recipe_to_minutes


def _results(acc, blind_acc, by_type, n_by_type):
    vqa = {"accuracy": acc, "by_type": by_type, "n_by_type": n_by_type}
    return {"tasks": {"shapes_vqa": {"metrics": vqa}}, "blind": {"shapes_vqa": {"metrics": {"accuracy": blind_acc}}}}


def test_headline_weights_counting_by_item_counts():
    by_type = {"count_total": 1.0, "count_color": 0.5, "count_shape": 0.0, "color": 0.2}
    n = {"count_total": 100, "count_color": 300, "count_shape": 100, "color": 100}
    figs = headline(_results(0.6, 0.4, by_type, n))
    assert abs(figs["counting accuracy"] - (100 + 150 + 0) / 500) < 1e-12
    assert abs(figs["blind drop on the same types"] - 0.2) < 1e-12


def test_check_required_flags_each_figure():
    lines = check_required({"image-dependent VQA accuracy": 0.49, "blind drop on the same types": 0.2,
                            "counting accuracy": 0.7})
    assert lines[0].startswith("FAIL") and lines[1].startswith("PASS") and lines[2].startswith("PASS")


def test_minutes_scale_stage_steps():
    recipe = load_recipe("shapes-tiny")
    doubled = scale_recipe_to_minutes(recipe, 22.0, baseline_minutes=11.0)
    assert [s.steps for s in doubled.stages] == [2 * s.steps for s in recipe.stages]
