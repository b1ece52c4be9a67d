"""Supervised pre-training of a preset image encoder on the shapes world's scene labels.

Every VLM starts from an image encoder that was pre-trained on its own: on labelled images
(ResNets on ImageNet), contrastively on image-text pairs (CLIP, SigLIP) or self-supervised
(DINOv2). This is the shapes world's stand-in for that step, so the tiny demo does what the
field does: a randomly initialised encoder trained only through the LLM's next-token loss does
not learn to tell shapes apart within a CPU budget (a linear probe on its features stays near
chance after 900 steps, docs/binding.md), while the same encoder learns them in a few hundred
steps when it is told what is in each cell.

Targets, per visual token: the shape, colour and size of the object whose box centre falls in
that token's cell of the feature grid (or "none"); per image: the written word (or "none"), from
the mean of the tokens. Heads are linear and are thrown away; the encoder is saved as a Hugging
Face model directory (``save_pretrained`` + ``preprocessor_config.json``) that a recipe loads
like any pretrained encoder: ``model.vision.name: <dir>``.
"""

from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.config import VisionConfig
from vlmkit.data.bad_samples import BadSampleError
from vlmkit.data.images import ImageProcessor, load_image
from vlmkit.data.sample import ImageRef
from vlmkit.models.vision import VisionEncoder, build_vision_encoder
from vlmkit.utils.io import atomic_write_json

log = logging.getLogger("vlmkit.train")

NONE = "none"


@dataclass
class Labels:
    """Class names of each head; index 0 is always ``none``."""

    shapes: list[str]
    colors: list[str]
    sizes: list[str]
    words: list[str]


def world_labels() -> Labels:
    from vlmkit.data.worlds.shapes import COLORS, SHAPES, SIZES, WORDS

    return Labels([NONE, *SHAPES], [NONE, *sorted(COLORS)], [NONE, *sorted(SIZES)], [NONE, *WORDS])


def token_targets(scene: dict, grid: int, labels: Labels) -> dict[str, torch.Tensor]:
    """Per-token class indices ``[grid * grid]`` for shape, colour and size; the word's index."""
    shape = torch.zeros(grid * grid, dtype=torch.long)
    color, size = shape.clone(), shape.clone()
    for obj in scene["objects"]:
        x0, y0, x1, y1 = obj["box"]
        col = min(int((x0 + x1) / 2 * grid), grid - 1)
        row = min(int((y0 + y1) / 2 * grid), grid - 1)
        k = row * grid + col
        shape[k] = labels.shapes.index(obj["shape"])
        color[k] = labels.colors.index(obj["color"])
        size[k] = labels.sizes.index(obj["size"])
    word = labels.words.index(scene["word"]) if scene.get("word") else 0
    return {"shape": shape, "color": color, "size": size, "word": torch.tensor(word)}


class AttributeHeads(nn.Module):
    """Linear read-outs of the encoder's tokens (thrown away after pre-training)."""

    def __init__(self, width: int, labels: Labels):
        super().__init__()
        self.shape = nn.Linear(width, len(labels.shapes))
        self.color = nn.Linear(width, len(labels.colors))
        self.size = nn.Linear(width, len(labels.sizes))
        self.word = nn.Linear(width, len(labels.words))

    def forward(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:  # tokens: [N, T, D]
        return {
            "shape": self.shape(tokens),  # [N, T, classes]
            "color": self.color(tokens),
            "size": self.size(tokens),
            "word": self.word(tokens.mean(1)),  # [N, classes]
        }


def attribute_loss(logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
    loss = F.cross_entropy(logits["word"], targets["word"])
    for key in ("shape", "color", "size"):
        loss = loss + F.cross_entropy(logits[key].flatten(0, 1), targets[key].flatten())
    return loss


def _scenes(world_dir: Path, split: str) -> list[tuple[str, dict]]:
    """(image path, scene) once per image of the split, in file order."""
    rows = json.loads((world_dir / f"{split}.json").read_text(encoding="utf-8"))
    seen: dict[str, dict] = {}
    for row in rows:
        image = row.get("image")
        if isinstance(image, str) and image not in seen and "scene" in row.get("meta", {}):
            seen[image] = row["meta"]["scene"]
    return list(seen.items())


def _load_split(world_dir: Path, split: str, processor, grid: int, labels: Labels, limit: int | None = None):
    pixels, targets = [], []
    for image, scene in _scenes(world_dir, split)[:limit]:
        try:
            pixels.append(processor(load_image(ImageRef(path=image), world_dir)))
        except BadSampleError as err:
            log.warning("encoder pre-training: skipping %s: %s", image, err)
            continue
        targets.append(token_targets(scene, grid, labels))
    stacked = {k: torch.stack([t[k] for t in targets]) for k in targets[0]}
    return torch.stack(pixels), stacked


@torch.no_grad()
def attribute_accuracy(encoder: VisionEncoder, heads: AttributeHeads, pixels, targets, batch: int = 128) -> dict:
    """Accuracy of each head; per-token heads over tokens that hold an object."""
    was_training = encoder.training
    encoder.eval()
    hits = {k: 0 for k in targets}
    counts = {k: 0 for k in targets}
    for i in range(0, len(pixels), batch):
        logits = heads(encoder(pixels[i : i + batch]))
        for key, t in targets.items():
            t = t[i : i + batch]
            pred = logits[key].argmax(-1)
            keep = t > 0 if key != "word" else torch.ones_like(t, dtype=torch.bool)
            hits[key] += int((pred[keep] == t[keep]).sum())
            counts[key] += int(keep.sum())
    encoder.train(was_training)
    return {k: hits[k] / max(counts[k], 1) for k in hits}


def pretrain_encoder(
    world_dir: str | Path,
    out_dir: str | Path,
    vision: VisionConfig | None = None,
    steps: int = 400,
    batch_size: int = 32,
    lr: float = 2e-3,
    seed: int = 0,
) -> dict:
    """Train a preset encoder on the world's labels; save it to ``out_dir``; return held-out accuracy.

    Reuses ``out_dir`` when it already holds an encoder trained with the same settings.
    """
    world_dir, out_dir = Path(world_dir), Path(out_dir)
    vision = vision or VisionConfig()
    settings = {"vision": vision.model_dump(), "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
                "world": json.loads((world_dir / "world.json").read_text(encoding="utf-8")).get("params")}  # fmt: skip
    done = out_dir / "pretraining.json"
    if done.is_file() and json.loads(done.read_text(encoding="utf-8")).get("settings") == settings:
        return json.loads(done.read_text(encoding="utf-8"))["heldout_accuracy"]

    torch.manual_seed(seed)
    encoder = build_vision_encoder(vision)
    grid = math.isqrt(encoder.num_tokens)
    labels = world_labels()
    heads = AttributeHeads(encoder.hidden_size, labels)
    processor = ImageProcessor(vision.image_size, encoder.image_mean, encoder.image_std, mode=vision.preprocess)
    train_px, train_t = _load_split(world_dir, "train", processor, grid, labels)
    test_px, test_t = _load_split(world_dir, "test", processor, grid, labels)
    params = list(encoder.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    order = random.Random(seed)
    encoder.train()
    for step in range(steps):
        idx = torch.tensor(order.sample(range(len(train_px)), min(batch_size, len(train_px))))
        loss = attribute_loss(heads(encoder(train_px[idx])), {k: v[idx] for k, v in train_t.items()})
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    accuracy = attribute_accuracy(encoder, heads, test_px, test_t)

    out_dir.mkdir(parents=True, exist_ok=True)
    encoder.model.save_pretrained(out_dir)
    atomic_write_json(out_dir / "preprocessor_config.json",
                      {"image_mean": list(encoder.image_mean), "image_std": list(encoder.image_std),
                       "size": {"height": vision.image_size, "width": vision.image_size}})  # fmt: skip
    atomic_write_json(done, {"settings": settings, "heldout_accuracy": accuracy, "final_loss": float(loss.detach())})
    log.info("encoder pre-training: held-out accuracy %s", {k: round(v, 3) for k, v in accuracy.items()})
    return accuracy
