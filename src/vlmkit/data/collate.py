"""Batching encoded samples: pad ids and labels, stack the images in token order."""

from __future__ import annotations

from typing import Literal

import torch

from vlmkit.data.template import IGNORE_INDEX, Encoded


def collate(
    items: list[Encoded],
    pixel_values: list[torch.Tensor] | None,
    pad_id: int,
    padding_side: Literal["right", "left"] = "right",
    pad_to_multiple_of: int | None = None,
    image_layouts: list | None = None,
) -> dict:
    """Pad ``items`` into a batch.

    Returns ``input_ids`` [B,T] (``pad_id`` on padding), ``attention_mask`` [B,T] (1 on real
    tokens), ``labels`` [B,T] (-100 on padding), ``pixel_values`` [N,3,S,S] or None,
    ``image_layouts`` (one ``TileLayout`` per image, or None) and ``sample_ids`` (a list).
    ``pixel_values`` must hold one tensor per image, in the order the image tokens appear, item
    by item: ``[3,S,S]``, or ``[K,3,S,S]`` for an image cut into K tiles (the tiles are
    concatenated, and ``image_layouts`` says which belong to which image). Their count must
    equal ``sum(item.n_images)`` (checked when every item has ``n_images``; duck-typed prompt
    records without it are trusted).
    Right padding is for training, left padding for batched generation.
    """
    if not items:
        raise ValueError("collate needs at least one item")
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    for it in items:
        if len(it.input_ids) != len(it.labels):
            raise ValueError(f"sample {it.sample_id}: {len(it.input_ids)} ids but {len(it.labels)} labels")
        if not it.input_ids:
            raise ValueError(f"sample {it.sample_id}: no tokens")

    width = max(len(it.input_ids) for it in items)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    b = len(items)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    labels = torch.full((b, width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((b, width), dtype=torch.long)
    for row, it in enumerate(items):
        n = len(it.input_ids)
        sl = slice(0, n) if padding_side == "right" else slice(width - n, width)
        input_ids[row, sl] = torch.tensor(it.input_ids, dtype=torch.long)
        labels[row, sl] = torch.tensor(it.labels, dtype=torch.long)
        attention_mask[row, sl] = 1

    given = len(pixel_values) if pixel_values is not None else 0
    counts = [getattr(it, "n_images", None) for it in items]
    if None not in counts:  # Encoded items: check; bare prompt records without n_images: trust the caller
        n_images = sum(counts)
        if given != n_images:
            raise ValueError(
                f"the batch's tokens refer to {n_images} image(s) but {given} pixel tensor(s) were given"
            )
    if image_layouts is None and any(getattr(it, "image_layouts", None) for it in items):
        image_layouts = [lay for it in items for lay in (getattr(it, "image_layouts", None) or [])]
    if image_layouts is not None and len(image_layouts) != given:
        raise ValueError(f"{len(image_layouts)} image layouts for {given} image(s)")
    pixels = torch.cat([p if p.ndim == 4 else p.unsqueeze(0) for p in pixel_values]) if given else None

    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "pixel_values": pixels,
        "image_layouts": list(image_layouts) if image_layouts is not None and given else None,
        "sample_ids": [it.sample_id for it in items],
    }
