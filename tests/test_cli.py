"""A smoke run of every subcommand, through the real entry point, on tiny data."""

import json
import subprocess
import sys

import yaml

from conftest import tiny_recipe_dict


def vlmkit(*args, input=None):
    return subprocess.run([sys.executable, "-m", "vlmkit", *map(str, args)], capture_output=True,
                          text=True, input=input, timeout=600)


def test_data_shapes_and_check(tmp_path):
    out = tmp_path / "w"
    r = vlmkit("data", "shapes", "--out", out, "--train", 4, "--test", 2, "--seed", 5)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "world.json").read_text())["params"]["seed"] == 5
    r = vlmkit("data", "check", out)
    assert r.returncode == 0, r.stdout + r.stderr


def test_train_eval_chat(tiny_world, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe_dict(steps=2)))
    run = tmp_path / "run"
    r = vlmkit("train", recipe, "--data", tiny_world, "--out", run, "--max-steps", 1, "--set", "stages.align.batch_size=2")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]  # --max-steps caps each of the three stages

    r = vlmkit("eval", run / "final", "--data", tiny_world, "--out", tmp_path / "ev", "--blind", "--limit", 3)
    assert r.returncode == 0, r.stderr
    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert {"shapes_vqa", "shapes_pope", "shapes_grounding"} <= set(results["tasks"])
    assert "shapes_vqa" in results["blind"]
    assert (tmp_path / "ev" / "report.html").exists() and (tmp_path / "ev" / "samples.jsonl").exists()

    image = next((tiny_world / "images").glob("test_*.png"))
    r = vlmkit("chat", run / "final", "--image", image, "--max-new-tokens", 5, "What color is the circle?")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("\n") == 1  # exactly one answer (its text is untrained noise here)
    r = vlmkit("chat", run / "final", "--max-new-tokens", 3, input="What is 2 plus 3?\n/quit\n")
    assert r.returncode == 0, r.stderr
    assert "vlm>" in r.stdout


def test_bad_recipe_key_exits_with_a_clear_error(tmp_path):
    tree = tiny_recipe_dict()
    tree["stages"][0]["stepz"] = 3
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tree))
    r = vlmkit("train", recipe, "--out", tmp_path / "run")
    assert r.returncode == 2
    assert "stages.0.stepz" in r.stderr


def test_data_check_flags_bad_rows(tiny_world, tmp_path):
    rows = json.loads((tiny_world / "test.json").read_text())[:5]
    rows[1]["image"] = "../../etc/passwd"
    rows[2] = "not a row"
    (tmp_path / "images").symlink_to(tiny_world / "images")
    (tmp_path / "bad.json").write_text(json.dumps(rows))
    r = vlmkit("data", "check", tmp_path / "bad.json")
    assert r.returncode == 1
    assert rows[1]["id"] in r.stdout and "path_escapes_root" in r.stdout
    assert "malformed_row" in r.stdout


def test_ablate_and_eval_image_as_text(tiny_world, tmp_path):
    from test_ablate import TINY

    sets = [a for s in TINY for a in ("--set", s)]
    r = vlmkit("ablate", "connectors-quick", "--out", tmp_path / "ab", "--data", tiny_world, "--only", "mlp", *sets)
    assert r.returncode == 0, r.stderr
    assert "| mlp |" in r.stdout and (tmp_path / "ab" / "table.md").exists()
    final = tmp_path / "ab" / "variants" / "mlp" / "final"
    r = vlmkit("eval", final, "--data", tiny_world, "--out", tmp_path / "iat", "--limit", 2, "--image-as-text", final)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "iat" / "results.json").read_text())["model"]["image_as_text"]["captioner"]
