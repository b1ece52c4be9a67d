"""Image corruptions for robustness evaluation: Gaussian noise, blur and JPEG, at three levels.

In the spirit of ImageNet-C (Hendrycks & Dietterich 2019), at three severities chosen for small
images. Each corruption is deterministic (noise is seeded by the sample id), so a rerun scores
the same. `corrupt_samples` returns the samples with every image replaced by its corrupted
copy (PNG bytes, lossless), so any predictor sees them without knowing; `robustness_suite`
evaluates the same tasks clean and under every corruption and level.

  noise  additive Gaussian noise, sigma = 8, 16, 32 (of 255)
  blur   Gaussian blur, radius 0.5, 1, 2 px
  jpeg   JPEG re-encoding at quality 50, 20, 5
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from vlmkit.data.images import load_image
from vlmkit.data.sample import ImageRef, Sample

LEVELS = {"noise": (8.0, 16.0, 32.0), "blur": (0.5, 1.0, 2.0), "jpeg": (50, 20, 5)}
KINDS = tuple(LEVELS)


def corrupt(image: Image.Image, kind: str, level: int, seed: int = 0) -> Image.Image:
    """``image`` (RGB) corrupted by ``kind`` at ``level`` 1..3."""
    if kind not in LEVELS:
        raise ValueError(f"unknown corruption {kind!r}; expected one of {KINDS}")
    if level not in (1, 2, 3):
        raise ValueError(f"corruption level must be 1, 2 or 3, got {level}")
    amount = LEVELS[kind][level - 1]
    image = image.convert("RGB")
    if kind == "noise":
        pixels = np.asarray(image, dtype=np.float32)
        noise = np.random.default_rng(seed).normal(0.0, amount, pixels.shape)
        return Image.fromarray(np.clip(pixels + noise, 0, 255).round().astype(np.uint8), "RGB")
    if kind == "blur":
        return image.filter(ImageFilter.GaussianBlur(radius=amount))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=int(amount))
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def _seed(ref: ImageRef) -> int:
    """Noise seeded by the image itself, so every question about an image sees the same copy."""
    key = ref.data if ref.data is not None else ref.describe().encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little")


def corrupt_samples(samples: list[Sample], kind: str, level: int, image_root: str | Path | None) -> list[Sample]:
    """The samples with each image loaded, corrupted (once per distinct image) and stored inline
    as PNG bytes."""
    done: dict[ImageRef, ImageRef] = {}
    out = []
    for s in samples:
        refs = []
        for ref in s.images:
            if ref not in done:
                image = corrupt(load_image(ref, image_root), kind, level, seed=_seed(ref))
                buf = io.BytesIO()
                image.save(buf, format="PNG")
                done[ref] = ImageRef(data=buf.getvalue())
            refs.append(done[ref])
        out.append(dataclasses.replace(s, images=refs, meta={**s.meta, "corruption": f"{kind}-{level}"}))
    return out


def robustness_suite(predictor, samples: list[Sample], out_dir: str | Path, image_root, tasks=None,
                     kinds=KINDS, batch_size: int = 32, limit: int | None = None) -> dict:  # fmt: skip
    """Each task's headline metric clean and under every corruption and level; the full runs go to
    ``out_dir/clean`` and ``out_dir/<kind>-<level>``. Returns ``{"clean": {task: value},
    "<kind>-<level>": {task: value}, ..., "drop": {"<kind>-<level>": {task: clean - corrupted}}}``."""
    from vlmkit.eval.runner import run_evaluation
    from vlmkit.eval.tasks import primary_value

    out_dir = Path(out_dir)

    def headline(results: dict) -> dict:
        return {name: primary_value(name, task["metrics"]) for name, task in results["tasks"].items()}

    table = {"clean": headline(run_evaluation(predictor, samples, out_dir / "clean", tasks=tasks,
                                              batch_size=batch_size, limit=limit))}  # fmt: skip
    for kind in kinds:
        for level in (1, 2, 3):
            corrupted = corrupt_samples(samples, kind, level, image_root)
            results = run_evaluation(predictor, corrupted, out_dir / f"{kind}-{level}", tasks=tasks,
                                     batch_size=batch_size, limit=limit)  # fmt: skip
            table[f"{kind}-{level}"] = headline(results)
    table["drop"] = {k: {t: table["clean"][t] - v[t] for t in v} for k, v in table.items() if k != "clean"}
    return table


def evaluate_robustness(checkpoint, data_dir, out_dir, kinds=KINDS, batch_size: int = 32,
                        limit: int | None = None, tasks=None) -> dict:  # fmt: skip
    """``vlmkit eval CKPT --data D --out O --corruptions noise,blur,jpeg``: the suite on the
    world's held-out rows; the table also goes to ``O/robustness.json``."""
    from vlmkit.data.formats.llava import read_llava
    from vlmkit.infer.predictor import load_predictor
    from vlmkit.utils.io import atomic_write_json

    data_dir = Path(data_dir)
    samples = read_llava(data_dir / "test.json", root=data_dir)
    predictor, _ = load_predictor(checkpoint, image_root=data_dir)
    table = robustness_suite(predictor, samples, out_dir, data_dir, tasks=tasks, kinds=tuple(kinds),
                             batch_size=batch_size, limit=limit)  # fmt: skip
    atomic_write_json(Path(out_dir) / "robustness.json", table)
    return table
