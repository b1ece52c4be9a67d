"""Hand-built shapes-world-like samples and fake predictors for the evaluation tests."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from vlmkit.data.sample import Box, ImageRef, Part, Sample, Turn


def make_png(path: Path, colour=(255, 0, 0), size: int = 64) -> None:
    img = Image.new("RGB", (size, size), (255, 255, 255))
    for x in range(16, 48):
        for y in range(16, 48):
            img.putpixel((x, y), colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def make_sample(sid: str, question: str, answer: str, image: str | None = "images/a.png", **meta) -> Sample:
    user = ([Part(image=0)] if image else []) + [Part(text=("\n" if image else "") + question)]
    return Sample(
        sid,
        [Turn("user", user), Turn.of_text("assistant", answer)],
        [ImageRef(path=image)] if image else [],
        {"answer": answer, **meta},
    )


def make_world(root: Path) -> list[Sample]:
    """17 rows: 6 vqa, 4 pope, 3 grounding, 2 mcq, 1 caption (not evaluated), 1 more vqa."""
    make_png(root / "images" / "a.png", (255, 0, 0))
    make_png(root / "images" / "b.png", (0, 0, 255))
    box = Box(0.25, 0.25, 0.75, 0.75)
    s = [
        make_sample("v1", "What colour is the square?", "red", task="vqa", question_type="color"),
        make_sample("v2", "What shape is it?", "square", "images/b.png", task="vqa", question_type="shape"),
        make_sample("v3", "How many shapes are there?", "1", task="vqa", question_type="count_total"),
        make_sample("v4", "How many red shapes?", "1", task="vqa", question_type="count_color"),
        make_sample("v5", "What colour is the square?", "blue", "images/b.png", task="vqa", question_type="color"),
        make_sample("v6", "Where is the square?", "center", task="vqa", question_type="spatial"),
        make_sample("p1", "Is there a square?", "yes", task="pope", question_type="exists", pope_split="random"),
        make_sample("p2", "Is there a circle?", "no", task="pope", question_type="exists", pope_split="random"),
        make_sample("p3", "Is there a triangle?", "no", task="pope", question_type="exists", pope_split="popular"),
        make_sample("p4", "Is there a square?", "yes", "images/b.png", task="pope", question_type="exists",
                    pope_split="adversarial"),
        make_sample("g1", "Where is the red square?", box.to_text(), task="grounding", question_type="ground_ref",
                    box=box.as_list()),
        make_sample("g2", "Where is the blue square?", box.to_text(), "images/b.png", task="grounding",
                    question_type="ground_ref", box=box.as_list()),
        make_sample("g3", "Where is the square?", box.to_text(), task="grounding", question_type="ground_ref",
                    box=box.as_list()),
        make_sample("m1", "What colour is the square?\nA. red\nB. blue\nC. green\nD. yellow", "a",
                    task="mcq", question_type="color"),
        make_sample("m2", "What colour is the square?\nA. red\nB. blue\nC. green\nD. yellow", "b",
                    "images/b.png", task="mcq", question_type="color"),
        make_sample("c1", "Describe the image.", "a red square.", task="caption", question_type="caption"),
        make_sample("v7", "What colour is the square?", "red", task="vqa", question_type="color"),
    ]
    return s


N_EVALUATED = 16  # every row except the caption


def oracle(samples: list[Sample]) -> list[str]:
    return [s.meta["answer"] for s in samples]


def sighted(samples: list[Sample]) -> list[str]:
    """Right with the image, confidently wrong without it (always a well-formed answer)."""
    wrong = {"vqa": "purple", "pope": "maybe", "grounding": "[0.000, 0.000, 0.100, 0.100]", "mcq": "D"}
    out = []
    for s in samples:
        if s.images:
            out.append(s.meta["answer"])
        else:
            out.append(wrong[s.meta["task"]])
    return out
