"""Evaluation of a fusion encoder (`vlmkit.models.fusion`) on held-out shapes-world scenes.

``fusion_itm`` -- image-text matching, balanced. For every scene: its own text (a positive)
and one *hard negative* per attribute the caption style shows (`caption_attributes`: colour,
shape, size, count), each the text of the scene graph with that attribute changed
(`hard_negative`, seeded per scene and attribute, so every run scores the same texts). Each
(positive, negative) pair counts both texts, so ``accuracy`` weighs positives and hard negatives
equally (= the mean of ``positive_accuracy`` and ``negative_accuracy``); a text is judged a
match when ``P(match) > 0.5``. ``by_attribute[a]``: the same balanced accuracy over the pairs
whose negative changed ``a``. Also reported: ``pairwise`` (share of pairs whose positive gets a
higher match probability than its negative; threshold-free), per attribute too, and
``easy_negative_accuracy`` (another scene's text; not part of ``accuracy``).

``fusion_mlm`` -- attribute words filled in from the image. Each attribute word of a scene's
text (colour, shape, size, count) is masked in turn, whole word (every piece replaced by the
mask token, everything else intact), and counts as right when the top-1 prediction of every
piece is the original token. ``attribute_accuracy`` over all such words, ``by_attribute`` per
kind. ``shuffled_image`` repeats it with another scene's image: what the text alone gives away
(counts can be read off the object list; shapes partly from the co-occurrence prior).

Results (also written atomically as JSON)::

    {"tasks": {"fusion_itm": {"n", "metrics": {"accuracy", "by_attribute": {attr: acc}, ...}},
               "fusion_mlm": {"n", "metrics": {"attribute_accuracy", "by_attribute": {attr: acc},
                                               "shuffled_image": {...}, ...}}},
     "checkpoint", "data": {"world_dir", "split", "n_scenes"}, "config": {...}, "elapsed_s"}
"""

from __future__ import annotations

import random
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from vlmkit.train.fusion_objectives import (
    ATTRIBUTE_INDEX,
    ATTRIBUTES,
    caption_attributes,
    encode_texts,
    fusion_caption,
    hard_negative,
    load_pixels,
    load_world_scenes,
)
from vlmkit.utils.io import atomic_write_json

KIND_OF_INDEX = {i: a for a, i in ATTRIBUTE_INDEX.items()}


def _mean(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else 0.0


def _max_len(model, default: int = 96) -> int:
    cfg = getattr(model, "config", None)
    return int(getattr(cfg, "max_text_len", default))


# ================================================================== image-text matching


def itm_items(scenes: Sequence[dict], seed: int = 0, style: str = "detailed", count: bool = True,
              easy: bool = True) -> list[dict]:  # fmt: skip
    """The texts scored for ITM: per scene ``{"scene", "text", "label", "kind"}`` for its
    positive (kind ``positive``), one hard negative per shown attribute (kind = the attribute),
    and, with ``easy``, one easy negative (kind ``easy``: the next scene whose text differs)."""
    items = []
    n = len(scenes)
    for i, scene in enumerate(scenes):
        own = fusion_caption(scene, style, count)
        items.append({"scene": i, "text": own, "label": 1, "kind": "positive"})
        for a in caption_attributes(style, count):
            text, _ = hard_negative(scene, random.Random(f"fusion-itm:{seed}:{i}:{a}"), a, style, count)
            items.append({"scene": i, "text": text, "label": 0, "kind": a})
        if easy:
            for k in range(1, n):
                other = fusion_caption(scenes[(i + k) % n], style, count)
                if other != own:
                    items.append({"scene": i, "text": other, "label": 0, "kind": "easy"})
                    break
    return items


@torch.no_grad()
def itm_match_probs(model, tokenizer, pixels: torch.Tensor, items: Sequence[dict], batch_size: int = 64) -> list[float]:
    """``P(match)`` (softmax of the ITM logits) for each item's text with its scene's image."""
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    probs: list[float] = []
    max_len = _max_len(model)
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        batch = encode_texts(tokenizer, [it["text"] for it in chunk], max_len)
        px = pixels[torch.tensor([it["scene"] for it in chunk])]
        out = model(batch.input_ids, batch.attention_mask, px, mlm=False, itm=True)
        probs += out.itm_logits.float().softmax(-1)[:, 1].tolist()
    if was_training:
        model.train()
    return probs


def itm_metrics(items: Sequence[dict], probs: Sequence[float]) -> dict[str, Any]:
    """Balanced ITM metrics from each item's ``P(match)`` (see the module docstring)."""
    if len(items) != len(probs):
        raise ValueError(f"{len(items)} items but {len(probs)} probabilities")
    pos_prob: dict[int, float] = {}
    negs: dict[str, list[tuple[int, float]]] = defaultdict(list)
    easy: list[float] = []
    for it, p in zip(items, probs):
        if it["kind"] == "positive":
            pos_prob[it["scene"]] = float(p)
        elif it["kind"] == "easy":
            easy.append(float(p <= 0.5))
        else:
            negs[it["kind"]].append((it["scene"], float(p)))
    pair_hits: dict[str, list[float]] = defaultdict(list)  # both texts of each pair
    pairwise: dict[str, list[float]] = defaultdict(list)
    neg_hits: dict[str, list[float]] = defaultdict(list)
    pos_hits: list[float] = []
    for kind, rows in negs.items():
        for scene, p in rows:
            if scene not in pos_prob:
                raise ValueError(f"a {kind} negative of scene {scene} has no positive")
            pp = pos_prob[scene]
            pair_hits[kind] += [float(pp > 0.5), float(p <= 0.5)]
            pos_hits.append(float(pp > 0.5))
            neg_hits[kind].append(float(p <= 0.5))
            pairwise[kind].append(float(pp > p))
    order = [a for a in ATTRIBUTES if a in negs] + sorted(k for k in negs if k not in ATTRIBUTES)
    all_pairs = [h for k in order for h in pair_hits[k]]
    return {
        "accuracy": _mean(all_pairs),
        "by_attribute": {k: _mean(pair_hits[k]) for k in order},
        "positive_accuracy": _mean(pos_hits),
        "negative_accuracy": _mean([h for k in order for h in neg_hits[k]]),
        "negative_accuracy_by_attribute": {k: _mean(neg_hits[k]) for k in order},
        "pairwise": _mean([h for k in order for h in pairwise[k]]),
        "pairwise_by_attribute": {k: _mean(pairwise[k]) for k in order},
        "easy_negative_accuracy": _mean(easy) if easy else None,
        "n_pairs": len(all_pairs) // 2,
        "n_pairs_by_attribute": {k: len(pair_hits[k]) // 2 for k in order},
        "n_easy": len(easy),
    }


def evaluate_itm(model, tokenizer, scenes: Sequence[dict], pixels: torch.Tensor, seed: int = 0,
                 style: str = "detailed", count: bool = True, batch_size: int = 64) -> dict:  # fmt: skip
    """``{"n", "metrics"}`` for ITM on ``scenes`` (``pixels[i]`` is scene i's image); ``n`` is
    the number of texts in the balanced set (two per pair)."""
    items = itm_items(scenes, seed, style, count)
    metrics = itm_metrics(items, itm_match_probs(model, tokenizer, pixels, items, batch_size))
    return {"n": 2 * metrics["n_pairs"], "metrics": metrics}


# ================================================================== attribute MLM


def mlm_items(tokenizer, scenes: Sequence[dict], max_len: int, style: str = "detailed",
              count: bool = True) -> list[dict]:  # fmt: skip
    """One item per attribute word of each scene's text: ``{"scene", "ids" [L] (the word's
    pieces masked), "positions" [k], "targets" [k], "kind", "word"}``."""
    mask_id = tokenizer.mask_token_id
    if mask_id is None:
        raise ValueError("the tokenizer has no mask token")
    batch = encode_texts(tokenizer, [fusion_caption(s, style, count) for s in scenes], max_len)
    items = []
    for i in range(len(scenes)):
        n_tok = int(batch.attention_mask[i].sum())
        ids = batch.input_ids[i, :n_tok]
        wid, attr = batch.word_ids[i, :n_tok], batch.attr_ids[i, :n_tok]
        for unit in sorted(set(int(u) for u in wid[attr > 0])):
            pos = (wid == unit).nonzero().flatten()
            masked = ids.clone()
            masked[pos] = mask_id
            items.append({"scene": i, "ids": masked, "positions": pos, "targets": ids[pos],
                          "kind": KIND_OF_INDEX[int(attr[pos[0]])], "word": batch.units[i][unit]})  # fmt: skip
    return items


@torch.no_grad()
def mlm_hits(model, items: Sequence[dict], pixels: torch.Tensor, image_of: Sequence[int] | None = None,
             batch_size: int = 64, pad_id: int = 0) -> list[bool]:  # fmt: skip
    """Whether every masked piece of each item is predicted right (top-1); item ``k`` is shown
    image ``image_of[scene]`` (default: its own scene's)."""
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    hits: list[bool] = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        length = max(len(it["ids"]) for it in chunk)
        ids = torch.stack([F.pad(it["ids"], (0, length - len(it["ids"])), value=pad_id) for it in chunk])
        attn = torch.stack([F.pad(torch.ones(len(it["ids"]), dtype=torch.long), (0, length - len(it["ids"])))
                            for it in chunk])  # fmt: skip
        scenes = [it["scene"] if image_of is None else image_of[it["scene"]] for it in chunk]
        out = model(ids, attn, pixels[torch.tensor(scenes)], mlm=True, itm=False)
        pred = out.mlm_logits.argmax(-1)  # [B, L]
        for r, it in enumerate(chunk):
            hits.append(bool(torch.equal(pred[r, it["positions"]], it["targets"])))
    if was_training:
        model.train()
    return hits


def _mlm_summary(items: Sequence[dict], hits: Sequence[bool]) -> dict:
    by: dict[str, list[float]] = defaultdict(list)
    for it, h in zip(items, hits):
        by[it["kind"]].append(float(h))
    order = [a for a in ATTRIBUTES if a in by]
    return {
        "attribute_accuracy": _mean([float(h) for h in hits]),
        "by_attribute": {a: _mean(by[a]) for a in order},
        "n_by_attribute": {a: len(by[a]) for a in order},
    }


def evaluate_mlm(model, tokenizer, scenes: Sequence[dict], pixels: torch.Tensor, style: str = "detailed",
                 count: bool = True, batch_size: int = 64, shuffled_image: bool = True) -> dict:  # fmt: skip
    """``{"n", "metrics"}`` for attribute-word MLM; ``n``: attribute words scored."""
    items = mlm_items(tokenizer, scenes, _max_len(model), style, count)
    pad = int(tokenizer.pad_token_id)
    metrics = _mlm_summary(items, mlm_hits(model, items, pixels, None, batch_size, pad))
    if shuffled_image and len(scenes) > 1:
        n = len(scenes)
        other = [(i + max(1, n // 2)) % n for i in range(n)]
        metrics["shuffled_image"] = _mlm_summary(items, mlm_hits(model, items, pixels, other, batch_size, pad))
    return {"n": len(items), "metrics": metrics}


# ================================================================== all together


def evaluate_fusion(
    checkpoint: str | Path,
    world_dir: str | Path,
    out_path: str | Path | None = None,
    split: str = "test",
    limit: int | None = None,
    seed: int = 0,
    batch_size: int = 64,
) -> dict:
    """Load a checkpoint written by `train_fusion` and run ``fusion_itm`` and ``fusion_mlm`` on
    the world's ``split`` scenes (the first ``limit``); write the results to ``out_path`` (JSON,
    atomically) when given. The texts are phrased as in training (the checkpoint's ``meta``)."""
    from vlmkit.models.fusion import load_fusion

    t0 = time.perf_counter()
    model, tokenizer, meta = load_fusion(checkpoint)
    text = meta.get("text", {})
    style, count = text.get("caption_style", "detailed"), bool(text.get("count_sentence", True))
    pairs = load_world_scenes(world_dir, split, limit)
    scenes = [s for _, s in pairs]
    pixels = load_pixels(world_dir, [p for p, _ in pairs], model.config.image_size)
    results = {
        "tasks": {
            "fusion_itm": evaluate_itm(model, tokenizer, scenes, pixels, seed, style, count, batch_size),
            "fusion_mlm": evaluate_mlm(model, tokenizer, scenes, pixels, style, count, batch_size),
        },
        "checkpoint": str(checkpoint),
        "data": {"world_dir": str(world_dir), "split": split, "n_scenes": len(scenes)},
        "config": {"seed": seed, "limit": limit, "caption_style": style, "count_sentence": count},
        "elapsed_s": round(time.perf_counter() - t0, 3),
    }
    if out_path is not None:
        atomic_write_json(out_path, results)
    return results
