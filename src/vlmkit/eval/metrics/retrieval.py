"""Image <-> text retrieval recall@k with several captions per image (COCO / Flickr30k protocol).

Input: a similarity matrix ``sim [n_images, n_texts]`` (higher is more similar) and, for each
text, the index of its image (``text_image[j]``). Every image needs at least one caption.

* text -> image: each *caption* is a query over all images; a hit at ``k`` when its own image
  is among the ``k`` best. Recall = hits / n_texts.
* image -> text: each *image* is a query over all captions; a hit at ``k`` when *any* of its
  captions is among the ``k`` best. Recall = hits / n_images.

Ranks and ties. A query's rank is the number of wrong candidates that score *at least* as high
as its best right candidate (0 = first place); a hit at ``k`` is ``rank < k``. Ties therefore
count against the query: a model that gives every candidate the same score is not rewarded
(its recall is 0 until ``k`` exceeds the number of wrong candidates).

Returned keys: ``i2t_r@k``, ``t2i_r@k`` for each ``k`` (fractions in [0, 1]), ``mean_recall``
(the mean of all of them, CLIP papers' "RSUM / 6"), ``n_images``, ``n_texts``.
"""

from __future__ import annotations

from typing import Sequence

import torch


def _as_tensor(sim) -> torch.Tensor:
    t = torch.as_tensor(sim)
    if t.dim() != 2:
        raise ValueError(f"similarity must be [n_images, n_texts], got shape {tuple(t.shape)}")
    return t.double()


def retrieval_ranks(sim, text_image: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(i2t_ranks [n_images], t2i_ranks [n_texts])``: per query, how many wrong candidates
    score at least as high as the best right one."""
    s = _as_tensor(sim)
    n_images, n_texts = s.shape
    owner = torch.as_tensor(list(text_image), dtype=torch.long)
    if owner.shape != (n_texts,):
        raise ValueError(f"text_image has {owner.numel()} entries for {n_texts} texts")
    if n_texts and (owner.min() < 0 or owner.max() >= n_images):
        raise ValueError(f"text_image holds an image index outside 0..{n_images - 1}")
    right = owner.unsqueeze(0) == torch.arange(n_images).unsqueeze(1)  # [n_images, n_texts]
    missing = (~right.any(dim=1)).nonzero().flatten().tolist()
    if missing:
        raise ValueError(f"images {missing[:10]} have no caption")
    # image -> text: the best right caption per image, then the wrong captions at or above it
    best = s.masked_fill(~right, float("-inf")).max(dim=1, keepdim=True).values
    i2t = ((s >= best) & ~right).sum(dim=1)
    # text -> image: the caption's own image, then the other images at or above it
    own = s.gather(0, owner.unsqueeze(0)).squeeze(0)  # [n_texts]
    t2i = ((s >= own.unsqueeze(0)) & ~right).sum(dim=0)
    return i2t, t2i


def retrieval_recall(sim, text_image: Sequence[int], ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k both ways (see the module doc for the protocol and ties)."""
    if any(int(k) < 1 for k in ks):
        raise ValueError(f"ks must be >= 1, got {list(ks)}")
    i2t, t2i = retrieval_ranks(sim, text_image)
    out: dict[str, float] = {}
    for k in ks:
        out[f"i2t_r@{k}"] = float((i2t < k).double().mean()) if i2t.numel() else 0.0
    for k in ks:
        out[f"t2i_r@{k}"] = float((t2i < k).double().mean()) if t2i.numel() else 0.0
    recalls = list(out.values())
    out["mean_recall"] = sum(recalls) / len(recalls) if recalls else 0.0
    out["n_images"] = int(i2t.numel())
    out["n_texts"] = int(t2i.numel())
    return out
