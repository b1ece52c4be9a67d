"""Recipe errors name the key path and what was expected; --set overrides work by index and name."""

import pytest
import yaml

from vlmkit.config import ConfigError, load_recipe, recipe_from_dict
from conftest import tiny_recipe_dict


def test_valid_recipe_and_defaults():
    r = recipe_from_dict(tiny_recipe_dict())
    assert [s.name for s in r.stages] == ["lm_warmup", "align", "instruct"]
    assert r.train.max_bad_fraction == 0.01  # documented default
    assert r.stages[0].schedule == "cosine"


def test_unknown_key_names_its_path():
    tree = tiny_recipe_dict()
    tree["stages"][1]["lrr"] = 1.0
    with pytest.raises(ConfigError) as err:
        recipe_from_dict(tree)
    assert "stages.1.lrr" in str(err.value) and "unknown key" in str(err.value)


def test_wrong_type_names_path_and_expectation():
    tree = tiny_recipe_dict()
    tree["stages"][0]["batch_size"] = "lots"
    with pytest.raises(ConfigError) as err:
        recipe_from_dict(tree)
    assert "stages.0.batch_size" in str(err.value) and "integer" in str(err.value)


def test_missing_rate_for_a_trainable_part():
    tree = tiny_recipe_dict()
    tree["stages"][1]["lr"] = {"vision": 1e-3}
    with pytest.raises(ConfigError, match="connector"):
        recipe_from_dict(tree)


def test_stage_naming_unknown_source():
    tree = tiny_recipe_dict()
    tree["stages"][0]["data"] = {"nope": 1.0}
    with pytest.raises(ConfigError, match="nope"):
        recipe_from_dict(tree)


def test_set_overrides_by_index_and_by_stage_name():
    r = recipe_from_dict(tiny_recipe_dict(), ["stages.align.steps=7", "stages.0.lr.llm=0.5", "seed=9"])
    assert r.stage("align").steps == 7
    assert r.stages[0].lr == {"llm": 0.5}
    assert r.seed == 9


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("stages.nostage.steps=3", "no item named 'nostage'"),
        ("stages.9.steps=3", "index out of range"),
        ("model.vision.imagesize=32", "model.vision.imagesize"),
        ("stages.0.steps=-1", "stages.0.steps"),
        ("seed", "expected key=value"),
    ],
)
def test_bad_set_overrides(override, fragment):
    with pytest.raises(ConfigError) as err:
        recipe_from_dict(tiny_recipe_dict(), [override])
    assert fragment in str(err.value)


def test_builtin_recipe_loads_by_name(tmp_path):
    r = load_recipe("shapes-tiny")
    assert len(r.stages) >= 2
    trainables = {tuple(s.trainable) for s in r.stages}
    assert len(trainables) >= 2  # stages differ in what trains
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe_dict()))
    assert load_recipe(path, ["stages.0.steps=11"]).stages[0].steps == 11
