"""Turn a model into a predictor: Samples in, generated answers out.

This is the glue that evaluation and chat share: the same `ChatTemplate` that built
the training labels renders the prompt, the same `ImageProcessor` prepares pixels,
and `VisionLanguageModel.generate` decodes with a KV cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from vlmkit.data.bad_samples import BadSampleError
from vlmkit.data.collate import collate
from vlmkit.data.image_pipeline import ImageInput, ImagePipeline
from vlmkit.data.images import load_image
from vlmkit.data.sample import Sample
from vlmkit.data.template import IGNORE_INDEX, ChatTemplate, Encoded

Predictor = Callable[[list[Sample]], list[str]]


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class VLMPredictor:
    """Batched greedy (or sampled) answers from a `VisionLanguageModel`.

    A sample whose image can't be loaded raises `BadSampleError`; the evaluation runner
    records it instead of crashing (see eval/runner.py).
    """

    def __init__(
        self,
        model,
        tokenizer,
        image_root: str | Path | None = None,
        max_new_tokens: int = 24,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
    ):
        self.model = model.eval()
        self.template = ChatTemplate(tokenizer)
        self.image_root = Path(image_root) if image_root is not None else None
        self.pipeline = ImagePipeline.for_model(model)
        self.processor = self.pipeline.processor
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def images(self, sample: Sample) -> list[ImageInput]:
        """The sample's images (tiles and layout each), in the order their placeholders appear."""
        return [self.pipeline(load_image(sample.images[i], self.image_root)) for i in sample.image_order()]

    @torch.no_grad()
    def __call__(self, samples: list[Sample]) -> list[str]:
        if not samples:
            return []
        items, pixels, layouts = [], [], []
        for s in samples:
            images = self.images(s)
            segments = [self.pipeline.segments(im.layout) for im in images]
            ids = self.template.encode_prompt(s.prompt_turns(), segments)
            items.append(Encoded(ids, [IGNORE_INDEX] * len(ids), len(images), s.id))
            pixels.extend(im.pixels for im in images)
            layouts.extend(im.layout for im in images)
        batch = collate(items, pixels or None, self.template.pad_token_id, padding_side="left",
                        image_layouts=layouts or None)  # fmt: skip
        dev = self.device
        pixel_values = batch["pixel_values"].to(dev) if batch["pixel_values"] is not None else None
        with _autocast(dev):
            out = self.model.generate(
                batch["input_ids"].to(dev),
                batch["attention_mask"].to(dev),
                pixel_values=pixel_values,
                max_new_tokens=self.max_new_tokens,
                stop_token_ids=self.template.stop_token_ids,
                temperature=self.temperature,
                top_p=self.top_p,
                generator=self.generator if self.temperature > 0 else None,
                image_layouts=batch["image_layouts"],
            )
        return [self.template.decode(ids) for ids in out]


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def load_predictor(
    checkpoint: str | Path,
    image_root: str | Path | None = None,
    max_new_tokens: int = 24,
    device: str = "auto",
    **kwargs,
) -> tuple[VLMPredictor, dict]:
    """Load a vlmkit checkpoint directory and wrap it as a predictor; also return model info."""
    from vlmkit.models.checkpoint_io import load_checkpoint

    dev = pick_device(device)
    model, tokenizer = load_checkpoint(checkpoint, device=str(dev))
    model.to(dev)
    info = {
        "checkpoint": str(checkpoint),
        "parameters": sum(p.numel() for p in model.parameters()),
        "vision": model.config.vision.name,
        "connector": model.config.connector.type,
        "llm": model.config.llm.name,
        "device": str(dev),
    }
    return VLMPredictor(model, tokenizer, image_root, max_new_tokens, **kwargs), info


__all__ = ["Predictor", "VLMPredictor", "load_predictor", "pick_device", "BadSampleError"]
