"""Sequence packing: several samples share a row, each attending only to itself.

A packed row holds samples back to back. Each sample's ``position_ids`` restart at 0, which is
what tells the LLM where one sample ends: with ``attention_mask=None`` transformers derives a
block-diagonal causal mask from the position ids (SDPA, eager), and its flash-attention path
derives the varlen ``cu_seqlens`` from them (one row per batch there). The trailing padding of
a row is one more "sample" that no real token can see, with no labels.

The first label of every sample is set to -100: in an unpacked row position 0 is never a
target (the loss predicts token t+1 from token t), and in a packed row that label would be
predicted from the previous sample's last token, across the sample boundary.

``plan_rows`` finds the fewest rows by first-fit decreasing under two budgets per row: tokens
and images (images are the expensive part of a VLM row, and a row of many images can blow the
vision tower's memory), then balances the items over that many rows, so that the rows, padded to
the longest, carry little padding.
The samples stay the same as without packing, only their arrangement changes, so the step's
loss (normalised by its target tokens) is the same as the unpacked step's.
"""

from __future__ import annotations

import torch

from vlmkit.data.template import IGNORE_INDEX, Encoded


def plan_rows(lengths: list[int], images: list[int], max_tokens: int, max_images: int | None = None) -> list[list[int]]:
    """Indices of the items in each row: as few rows as first-fit decreasing finds, then
    balanced (longest first, each into the emptiest row it fits) when that fits as many rows.

    A row's total length stays ``<= max_tokens`` and its image count ``<= max_images``; an item
    that alone exceeds a budget gets a row of its own. Within a row the items keep their
    original order, and rows are ordered by their first item (deterministic).

    Why balance: the rows of a batch are padded to the longest one, so first-fit's full rows
    followed by a half-empty last row pad the others' width; balanced rows of the same count
    carry almost no padding, and (SDPA's dense masked attention costs width^2) less attention.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    fits = lambda fill, i: fill[0] + lengths[i] <= max_tokens and (  # noqa: E731
        max_images is None or fill[1] + images[i] <= max_images)
    rows: list[list[int]] = []
    fill: list[tuple[int, int]] = []  # (tokens, images) per row
    for i in order:  # first-fit decreasing: the fewest rows
        r = next((r for r, f in enumerate(fill) if fits(f, i)), None)
        if r is None:
            rows.append([])
            fill.append((0, 0))
            r = len(rows) - 1
        rows[r].append(i)
        fill[r] = (fill[r][0] + lengths[i], fill[r][1] + images[i])
    balanced = _balanced_rows(order, lengths, images, len(rows), fits)
    if balanced is not None:
        rows = balanced
    rows = [sorted(r) for r in rows]
    return sorted(rows, key=lambda r: r[0])


def _balanced_rows(order, lengths, images, n_rows, fits) -> list[list[int]] | None:
    """Longest-processing-time-first into ``n_rows`` rows (each item to the emptiest row where it
    fits); None when some item fits in none of them."""
    rows: list[list[int]] = [[] for _ in range(n_rows)]
    fill = [(0, 0)] * n_rows
    for i in order:
        r = min((r for r in range(n_rows) if fits(fill[r], i) or not rows[r]), key=lambda r: (fill[r][0], r),
                default=None)  # fmt: skip
        if r is None:
            return None
        rows[r].append(i)
        fill[r] = (fill[r][0] + lengths[i], fill[r][1] + images[i])
    return [r for r in rows if r]


def pack_collate(
    items: list[Encoded],
    pixel_values: list[list[torch.Tensor]],
    pad_id: int,
    max_tokens: int,
    max_images: int | None = None,
    one_row: bool = False,
) -> dict:
    """Pack ``items`` (with each item's own image tensors) into rows.

    ``one_row``: every item in a single row, whatever the budgets: the layout transformers'
    flash-attention path turns into one varlen call (it detects packing only with batch size 1).

    Returns the keys of ``collate`` plus ``position_ids`` [R, W] (restarting at 0 per sample)
    and ``sequence_ids`` [R, W] (the item index of each token, -1 on padding).
    ``attention_mask`` [R, W] marks real tokens (for counting); the model must be given
    ``position_ids`` and no mask (see ``VisionLanguageModel.forward``).
    """
    if not items:
        raise ValueError("pack_collate needs at least one item")
    if len(pixel_values) != len(items):
        raise ValueError(f"{len(items)} items but pixel lists for {len(pixel_values)}")
    for it, pxs in zip(items, pixel_values):
        if it.n_images != len(pxs):
            raise ValueError(f"sample {it.sample_id}: {it.n_images} image(s) in its tokens, {len(pxs)} given")
    if one_row:
        rows = [list(range(len(items)))]
    else:
        rows = plan_rows([len(it.input_ids) for it in items], [it.n_images for it in items], max_tokens, max_images)
    width = max(sum(len(items[i].input_ids) for i in row) for row in rows)
    n_rows = len(rows)
    input_ids = torch.full((n_rows, width), pad_id, dtype=torch.long)
    labels = torch.full((n_rows, width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((n_rows, width), dtype=torch.long)
    position_ids = torch.zeros((n_rows, width), dtype=torch.long)
    sequence_ids = torch.full((n_rows, width), -1, dtype=torch.long)
    pixels: list[torch.Tensor] = []
    layouts: list = []
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            it = items[i]
            n = len(it.input_ids)
            input_ids[r, at : at + n] = torch.tensor(it.input_ids, dtype=torch.long)
            labels[r, at : at + n] = torch.tensor(it.labels, dtype=torch.long)
            labels[r, at] = IGNORE_INDEX  # never predicted from the previous sample (see module doc)
            attention_mask[r, at : at + n] = 1
            position_ids[r, at : at + n] = torch.arange(n)
            sequence_ids[r, at : at + n] = i
            pixels += list(pixel_values[i])
            layouts += list(it.image_layouts or [None] * it.n_images)
            at += n
        position_ids[r, at:] = torch.arange(width - at)  # the padding: a sequence of its own
    stacked = torch.cat([p if p.ndim == 4 else p.unsqueeze(0) for p in pixels]) if pixels else None
    tiled = any(lay is not None for lay in layouts)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "sequence_ids": sequence_ids,
        "labels": labels,
        "pixel_values": stacked,
        "image_layouts": layouts if tiled and pixels else None,
        # per row (error messages name rows): the ids of its samples joined by "+"
        "sample_ids": ["+".join(str(items[i].sample_id) for i in row) for row in rows],
    }
