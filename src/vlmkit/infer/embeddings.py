"""A trained dual encoder as a service: image and text embeddings, and CLIP scores.

    import vlmkit
    model = vlmkit.load_dual_encoder("runs/clip/final")       # (model, tokenizer)
    img = vlmkit.embed_images(model, [pil_or_path, ...])       # [N, E], unit vectors
    txt = vlmkit.embed_texts(model, ["a red circle", ...])     # [N, E]
    s = vlmkit.clip_score(model, images, captions)             # [N] cosine of each pair

``model`` is a checkpoint directory or the ``(model, tokenizer)`` pair `load_dual_encoder`
returns. The CLIP score here is the cosine similarity of an image and its caption, the number
LAION-5B and DataComp filter image-text pairs by (LAION keeps pairs above 0.28 with ViT-B/32);
Hessel et al. 2021's CLIP-S for captioning is ``2.5 * max(cosine, 0)`` of the same number.
``vlmkit clip-score CKPT --data FILE`` scores every row of a LLaVA JSON file (`score_file`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import torch

from vlmkit.data.bad_samples import BadSampleError, BadSampleLog
from vlmkit.utils.io import atomic_write_text

log = logging.getLogger("vlmkit.infer")


def _resolve(model):
    from vlmkit.models.contrastive import load_dual_encoder

    if isinstance(model, (str, Path)):
        return load_dual_encoder(model)
    if isinstance(model, tuple):
        return model
    raise TypeError("model: a dual encoder directory, or the (model, tokenizer) of load_dual_encoder")


def _images(images: Sequence, root: str | Path | None) -> list:
    from vlmkit.data.images import load_image
    from vlmkit.data.sample import ImageRef

    out = []
    for im in images:
        if isinstance(im, (str, Path)):
            im = load_image(ImageRef(path=str(im)), root)
        out.append(im)
    return out


@torch.no_grad()
def embed_images(model, images: Sequence, batch_size: int = 64, root: str | Path | None = None) -> torch.Tensor:
    """``[N, E]`` unit embeddings of PIL images or image paths (relative to ``root``)."""
    from vlmkit.eval.zeroshot import encode_images

    dual, _ = _resolve(model)
    return encode_images(dual, _images(images, root), batch_size=batch_size)


@torch.no_grad()
def embed_texts(model, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """``[N, E]`` unit embeddings of texts."""
    from vlmkit.eval.zeroshot import encode_texts

    dual, tokenizer = _resolve(model)
    return encode_texts(dual, tokenizer, list(texts), batch_size=batch_size)


@torch.no_grad()
def clip_score(model, images: Sequence, texts: Sequence[str], batch_size: int = 64,
               root: str | Path | None = None) -> torch.Tensor:  # fmt: skip
    """``[N]``: the cosine similarity of each image with its text (pairs, in order)."""
    if len(images) != len(texts):
        raise ValueError(f"clip_score: {len(images)} images but {len(texts)} texts")
    resolved = _resolve(model)
    img = embed_images(resolved, images, batch_size, root)
    txt = embed_texts(resolved, texts, batch_size)
    return (img * txt).sum(dim=1)


def score_file(model, data: str | Path, out: str | Path, root: str | Path | None = None, batch_size: int = 64,
               bad_log: BadSampleLog | None = None) -> dict:  # fmt: skip
    """CLIP-score every row of a LLaVA JSON file: its first image against its answer (the
    caption). Writes ``out`` (JSONL, atomically): ``{"id", "image", "text", "clip_score"}`` per
    row, and ``{"id", "error"}`` for a row that can't be scored (no image, no answer, an
    unreadable image), which is also named and counted in ``bad_log``. Returns a summary."""
    from vlmkit.data.formats.llava import read_llava
    from vlmkit.data.images import load_image
    from vlmkit.train.contrastive_run import pair_of

    data = Path(data)
    root = Path(root) if root is not None else data.parent
    bad_log = bad_log or BadSampleLog()
    resolved = _resolve(model)
    rows: list[dict] = []
    pending: list[tuple[int, object, str]] = []  # (row index, image, text)

    def flush() -> None:
        if pending:
            scores = clip_score(resolved, [im for _, im, _ in pending], [t for _, _, t in pending], batch_size)
            for (i, _, _), s in zip(pending, scores.tolist()):
                rows[i]["clip_score"] = s
            pending.clear()

    for sample in read_llava(data, root=root, bad_log=bad_log):
        try:
            ref, text = pair_of(sample)
            image = load_image(ref, root)
            bad_log.ok()
        except BadSampleError as err:
            bad_log.record(str(data), sample.id, err)
            rows.append({"id": sample.id, "error": str(err)})
            continue
        rows.append({"id": sample.id, "image": ref.describe(), "text": text, "clip_score": None})
        pending.append((len(rows) - 1, image, text))
        if len(pending) >= batch_size:
            flush()
    flush()
    atomic_write_text(Path(out), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    scores = [r["clip_score"] for r in rows if "clip_score" in r]
    return {"rows": len(rows), "scored": len(scores), "bad": len(rows) - len(scores),
            "mean": sum(scores) / len(scores) if scores else None, "out": str(out)}  # fmt: skip
