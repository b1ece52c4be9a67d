"""The image-as-text baseline: captions replace images, each image is described once."""

from __future__ import annotations

from vlmkit.data.sample import ImageRef, Part, Sample, Turn
from vlmkit.data.template import turn_content
from vlmkit.infer.image_as_text import ImageAsTextPredictor, describe_images


def vqa(sid: str, paths: list[str], question: str) -> Sample:
    parts = [p for i in range(len(paths)) for p in (Part(image=i), Part(text="\n"))] + [Part(text=question)]
    return Sample(id=sid, turns=[Turn("user", parts)], images=[ImageRef(path=p) for p in paths])


class Captioner:
    def __init__(self):
        self.seen: list[str] = []

    def __call__(self, samples):
        out = []
        for s in samples:
            assert len(s.images) == 1 and s.turns[0].parts[0].is_image
            self.seen.append(s.images[0].path)
            out.append(f"caption of {s.images[0].path}")
        return out


class Answerer:
    def __init__(self):
        self.prompts: list[str] = []

    def __call__(self, samples):
        assert all(not s.images for s in samples)
        self.prompts += [turn_content(s.turns[-1]) for s in samples]
        return ["ok"] * len(samples)


def test_describe_images_puts_each_caption_where_its_image_was():
    s = vqa("a", ["x.png", "y.png"], "Which has more circles?")
    text = describe_images(s, ["one", "two"])
    assert text.images == [] and text.meta == s.meta
    assert turn_content(text.turns[0]) == "Scene: one\nScene: two\nWhich has more circles?"


def test_each_image_is_described_once_and_text_only_samples_pass_through():
    cap, ans = Captioner(), Answerer()
    predict = ImageAsTextPredictor(cap, ans)
    batch = [vqa("q1", ["a.png"], "What color?"), vqa("q2", ["a.png"], "What shape?"),
             vqa("q3", ["b.png", "a.png"], "Which?"), Sample(id="t", turns=[Turn.of_text("user", "2+2?")])]  # fmt: skip
    assert predict(batch) == ["ok"] * 4
    assert cap.seen == ["a.png", "b.png"]
    assert ans.prompts == [
        "Scene: caption of a.png\nWhat color?",
        "Scene: caption of a.png\nWhat shape?",
        "Scene: caption of b.png\nScene: caption of a.png\nWhich?",
        "2+2?",
    ]
    predict([vqa("q4", ["a.png"], "Again?")])
    assert cap.seen == ["a.png", "b.png"]  # cached
    assert predict.last_captions == {"q4": ["caption of a.png"]}


def test_evaluate_with_a_captioner_checkpoint(tiny_run, tiny_world, tmp_path):
    from vlmkit.eval.runner import evaluate

    _, final = tiny_run
    results = evaluate(final, data_dir=tiny_world, out_dir=tmp_path / "e", limit=2, tasks=["shapes_vqa"],
                       max_new_tokens=4, image_as_text=final)  # fmt: skip
    info = results["model"]["image_as_text"]
    assert info["captioner"]["checkpoint"] == str(final) and info["describe_as"] == "Scene: {caption}"
    assert results["tasks"]["shapes_vqa"]["n"] == 2
