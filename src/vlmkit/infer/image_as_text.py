"""The "image as text" baseline: a captioner describes each image, then a text-only LLM answers
from the descriptions.

This is how language models were first given sight (e.g. Socratic Models, Zeng et al. 2022;
PICa, Yang et al. 2022) and what end-to-end VLMs replaced. Evaluating it on the same tasks as a
VLM measures what the captions lose: every image part of the prompt is replaced by
``describe_as.format(caption=...)``, so ``<image>\\nWhat color is the square?`` becomes
``Scene: a large green square at top left.\\nWhat color is the square?`` -- the format of the
shapes world's ``text_scene`` instructions.

    predictor = ImageAsTextPredictor(captioner, answerer)   # both: Samples -> answers
    vlmkit eval ANSWERER --image-as-text CAPTIONER --data DIR --out DIR
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import replace

from vlmkit.data.sample import Part, Sample, Turn

CAPTION_PROMPT = "Describe the image in detail."
DESCRIBE_AS = "Scene: {caption}"


def caption_request(sample: Sample, image_index: int, prompt: str = CAPTION_PROMPT) -> Sample:
    """A one-image sample asking the captioner to describe ``sample.images[image_index]``."""
    return Sample(
        id=f"{sample.id}#image{image_index}",
        turns=[Turn("user", [Part(image=0), Part(text="\n" + prompt)])],
        images=[sample.images[image_index]],
    )


def describe_images(sample: Sample, captions: list[str], describe_as: str = DESCRIBE_AS) -> Sample:
    """``sample`` with every image part replaced by the text of its caption (no images left)."""
    turns = [
        Turn(t.role, [Part(text=describe_as.format(caption=captions[p.image])) if p.is_image else p for p in t.parts])
        for t in sample.turns
    ]
    return replace(sample, turns=turns, images=[])


class ImageAsTextPredictor:
    """``captioner`` (a VLM predictor) describes each image once; ``answerer`` (any predictor,
    called with image-free samples) answers from the descriptions. Captions are cached by image
    path, so an image asked about many times is described once. ``last_captions`` holds the
    captions of the latest call, by sample id, for reports."""

    def __init__(self, captioner, answerer, caption_prompt: str = CAPTION_PROMPT,
                 describe_as: str = DESCRIBE_AS, cache_size: int = 10_000):  # fmt: skip
        self.captioner = captioner
        self.answerer = answerer
        self.caption_prompt = caption_prompt
        self.describe_as = describe_as
        self.cache_size = cache_size
        self._cache: OrderedDict[str, str] = OrderedDict()
        self.last_captions: dict[str, list[str]] = {}

    def _key(self, sample: Sample, i: int) -> str:
        ref = sample.images[i]
        return ref.path or ref.url or f"{sample.id}#image{i}"

    def captions(self, samples: list[Sample]) -> list[list[str]]:
        """Per sample, one caption per image (in ``sample.images`` order)."""
        wanted: dict[str, Sample] = {}
        for s in samples:
            for i in range(len(s.images)):
                key = self._key(s, i)
                if key not in self._cache and key not in wanted:
                    wanted[key] = caption_request(s, i, self.caption_prompt)
        if wanted:
            for key, text in zip(wanted, self.captioner(list(wanted.values()))):
                self._cache[key] = text
                if len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return [[self._cache[self._key(s, i)] for i in range(len(s.images))] for s in samples]

    def __call__(self, samples: list[Sample]) -> list[str]:
        captions = self.captions(samples)
        self.last_captions = {s.id: c for s, c in zip(samples, captions) if c}
        texts = [describe_images(s, c, self.describe_as) if s.images else s for s, c in zip(samples, captions)]
        return self.answerer(texts)
