"""Image corruptions for robustness runs: each kind degrades the image more at each level, is
deterministic, and the suite scores the same tasks clean and corrupted."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from vlmkit.data.sample import ImageRef, Part, Sample, Turn
from vlmkit.eval.corruptions import KINDS, corrupt, corrupt_samples, robustness_suite


def scene() -> Image.Image:
    im = Image.new("RGB", (64, 64), (40, 40, 40))
    d = ImageDraw.Draw(im)
    d.ellipse((8, 8, 30, 30), fill=(220, 30, 30))
    d.rectangle((36, 34, 58, 56), fill=(30, 60, 220))
    return im


def mse(a: Image.Image, b: Image.Image) -> float:
    return float(((np.asarray(a, np.float32) - np.asarray(b, np.float32)) ** 2).mean())


@pytest.mark.parametrize("kind", KINDS)
def test_each_level_degrades_more_and_is_deterministic(kind):
    clean = scene()
    errors = [mse(clean, corrupt(clean, kind, level, seed=1)) for level in (1, 2, 3)]
    assert 0 < errors[0] < errors[1] < errors[2]
    assert np.array_equal(np.asarray(corrupt(clean, kind, 2, seed=1)), np.asarray(corrupt(clean, kind, 2, seed=1)))


def test_bad_kind_or_level_is_refused():
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(scene(), "fog", 1)
    with pytest.raises(ValueError, match="level"):
        corrupt(scene(), "blur", 4)


def test_suite_scores_clean_and_every_corruption(tmp_path):
    scene().save(tmp_path / "a.png")
    samples = [Sample(f"q{k}", [Turn("user", [Part(image=0), Part(text="Is the image sharp?")]),
                                Turn.of_text("assistant", "yes")], [ImageRef(path="a.png")],
                      {"task": "pope", "question_type": "exists", "answer": "yes", "pope_split": "random"})
               for k in range(3)]  # fmt: skip
    # the same corrupted copy for every question about one image
    copies = corrupt_samples(samples, "noise", 3, tmp_path)
    assert len({s.images[0].data for s in copies}) == 1 and copies[0].meta["corruption"] == "noise-3"

    def predictor(batch):  # "yes" while the image is close to the clean one
        from vlmkit.data.images import load_image

        return ["yes" if mse(scene(), load_image(s.images[0], tmp_path)) < 100 else "no" for s in batch]

    table = robustness_suite(predictor, samples, tmp_path / "rob", tmp_path, tasks=["shapes_pope"], kinds=("noise",))
    assert table["clean"]["shapes_pope"] == 1.0
    assert set(table) == {"clean", "noise-1", "noise-2", "noise-3", "drop"}
    assert table["noise-3"]["shapes_pope"] == 0.0 and table["drop"]["noise-3"]["shapes_pope"] == 1.0


def test_vlmkit_eval_corruptions_on_the_world(tiny_world, tmp_path):
    import json

    from _model_helpers import make_model
    from vlmkit.cli import main
    from vlmkit.data.tokenizer import DEFAULT_CHAT_TEMPLATE
    from vlmkit.models.checkpoint_io import save_checkpoint

    model, tok = make_model()
    tok.chat_template = DEFAULT_CHAT_TEMPLATE
    ckpt = save_checkpoint(model, tok, tmp_path / "ckpt")
    args = ["eval", str(ckpt), "--data", str(tiny_world), "--out", str(tmp_path / "r"), "--limit", "2",
            "--corruptions", "blur"]  # fmt: skip
    assert main(args) == 0
    table = json.loads((tmp_path / "r" / "robustness.json").read_text())
    assert set(table) == {"clean", "blur-1", "blur-2", "blur-3", "drop"}
    assert set(table["clean"]) == set(table["blur-3"]) and "shapes_vqa" in table["clean"]
