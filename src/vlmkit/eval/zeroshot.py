"""Zero-shot classification and retrieval with a dual encoder (docs/contrastive.md).

Zero-shot (Radford et al. 2021): each class name is written into several prompt templates;
the class embedding is the L2-normalised mean of the templates' L2-normalised text embeddings
("prompt ensembling"). An image is assigned the class whose embedding has the highest cosine
similarity with its image embedding. Top-1 / top-5 accuracy: the label is among the ``k`` best
classes, ``k`` capped at the number of classes (so top-5 of a 3-class task is top-3 = 1.0).
Ties are broken by ``torch.topk`` (lower class index first in practice).

Templates are ``str.format`` strings: ``{}`` is the class name and ``{article}`` the indefinite
article that fits it ("a red circle", "an orange square").

The model is anything with ``encode_image(pixel_values) -> [B, E]`` and
``encode_text(input_ids, attention_mask) -> [B, E]`` (unit vectors), e.g. ``DualEncoder``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from vlmkit.eval.metrics.retrieval import retrieval_recall
from vlmkit.models.contrastive import tokenize_texts

DEFAULT_TEMPLATES: tuple[str, ...] = (
    "{article} {}.",
    "a photo of {article} {}.",
    "{article} {} object.",
    "an image of {article} {}.",
)
DEFAULT_MAX_LENGTH = 77


def article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def format_prompt(template: str, classname: str) -> str:
    return template.format(classname, article=article(classname))


def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def _max_length(model, max_length: int | None) -> int:
    if max_length is not None:
        return max_length
    cfg = getattr(model, "config", None)
    text = getattr(cfg, "text", None)
    return int(getattr(text, "max_length", DEFAULT_MAX_LENGTH))


class _EvalMode:
    """Eval mode for the block, the previous mode restored after."""

    def __init__(self, model):
        self.model, self.was = model, getattr(model, "training", False)

    def __enter__(self):
        if hasattr(self.model, "eval"):
            self.model.eval()

    def __exit__(self, *exc):
        if hasattr(self.model, "train"):
            self.model.train(self.was)


@torch.no_grad()
def encode_texts(model, tokenizer, texts: Sequence[str], batch_size: int = 64,
                 max_length: int | None = None) -> torch.Tensor:  # fmt: skip
    """``[len(texts), E]`` unit text embeddings (float32, CPU), ``batch_size`` texts at a time."""
    device, length = _device(model), _max_length(model, max_length)
    out = []
    with _EvalMode(model):
        for i in range(0, len(texts), batch_size):
            batch = tokenize_texts(tokenizer, texts[i : i + batch_size], length)
            emb = model.encode_text(batch["input_ids"].to(device), batch["attention_mask"].to(device))
            out.append(emb.float().cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)


@torch.no_grad()
def encode_images(model, images: Sequence, processor=None, batch_size: int = 64) -> torch.Tensor:
    """``[len(images), E]`` unit image embeddings (float32, CPU). Images are PIL images (through
    ``processor``, default ``model.image_processor()``) or tensors ``[3, S, S]`` already processed."""
    if processor is None and any(not torch.is_tensor(im) for im in images):
        processor = model.image_processor()
    device = _device(model)
    out = []
    with _EvalMode(model):
        for i in range(0, len(images), batch_size):
            px = torch.stack([im if torch.is_tensor(im) else processor(im) for im in images[i : i + batch_size]])
            out.append(model.encode_image(px.to(device)).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)


@torch.no_grad()
def class_embeddings(model, tokenizer, classnames: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES,
                     batch_size: int = 64, max_length: int | None = None) -> torch.Tensor:  # fmt: skip
    """``[n_classes, E]``: per class, the normalised mean of its prompts' normalised embeddings."""
    if not templates:
        raise ValueError("templates: at least one prompt template is needed")
    if not classnames:
        raise ValueError("classnames: at least one class is needed")
    prompts = [format_prompt(t, c) for c in classnames for t in templates]
    emb = encode_texts(model, tokenizer, prompts, batch_size, max_length)
    emb = torch.nn.functional.normalize(emb, dim=-1).view(len(classnames), len(templates), -1).mean(dim=1)
    return torch.nn.functional.normalize(emb, dim=-1)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor | Sequence[int],
                  ks: Sequence[int] = (1, 5)) -> dict[str, float]:  # fmt: skip
    """``{"top{k}": fraction}`` for each ``k`` (capped at the number of classes)."""
    logits = torch.as_tensor(logits)
    labels = torch.as_tensor(labels, dtype=torch.long)
    n, n_classes = logits.shape
    out = {}
    for k in ks:
        kk = min(int(k), n_classes)
        if n == 0:
            out[f"top{k}"] = 0.0
            continue
        top = logits.topk(kk, dim=1).indices
        out[f"top{k}"] = float((top == labels.unsqueeze(1)).any(dim=1).double().mean())
    return out


def _label_index(label, classnames: Sequence[str]) -> int:
    if isinstance(label, str):
        try:
            return list(classnames).index(label)
        except ValueError:
            raise ValueError(f"label {label!r} is not one of the classes {list(classnames)}") from None
    idx = int(label)
    if not 0 <= idx < len(classnames):
        raise ValueError(f"label {idx} is outside 0..{len(classnames) - 1}")
    return idx


@torch.no_grad()
def zero_shot_classify(model, tokenizer, pairs: Sequence[tuple[Any, Any]], classnames: Sequence[str],
                       templates: Sequence[str] = DEFAULT_TEMPLATES, processor=None,
                       batch_size: int = 64) -> dict[str, Any]:  # fmt: skip
    """Zero-shot classification of ``pairs`` = ``(image, label)`` (label: class index or name).

    Returns ``{"top1", "top5", "n", "n_classes", "predictions"}`` (predicted class indices).
    """
    labels = torch.tensor([_label_index(lab, classnames) for _, lab in pairs], dtype=torch.long)
    classes = class_embeddings(model, tokenizer, classnames, templates, batch_size)
    images = encode_images(model, [im for im, _ in pairs], processor, batch_size)
    logits = images @ classes.T if len(pairs) else torch.zeros(0, len(classnames))
    result: dict[str, Any] = topk_accuracy(logits, labels, (1, 5))
    result.update(n=len(pairs), n_classes=len(classnames), predictions=logits.argmax(dim=1).tolist())
    return result


@torch.no_grad()
def retrieval_eval(model, tokenizer, images: Sequence, captions: Sequence[Sequence[str]], processor=None,
                   batch_size: int = 64, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:  # fmt: skip
    """Image <-> text recall@k of ``images`` and their ``captions`` (one list per image),
    as ``eval.metrics.retrieval.retrieval_recall`` computes it."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} caption lists")
    texts = [c for caps in captions for c in caps]
    owner = [i for i, caps in enumerate(captions) for _ in caps]
    img = encode_images(model, images, processor, batch_size)
    txt = encode_texts(model, tokenizer, texts, batch_size)
    return retrieval_recall(img @ txt.T, owner, ks)
