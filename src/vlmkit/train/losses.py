"""Training objectives."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy and the number of target tokens.

    ``logits[:, :-1]`` predict ``labels[:, 1:]``; labels equal to -100 carry no loss. The sum (not
    the mean) is returned so that the trainer can divide by the target count of the whole
    accumulated batch. Computed in float32. Returns ``(loss_sum [scalar], n_targets [int64 scalar])``.
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree")
    pred = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    target = labels[:, 1:].reshape(-1)
    n_targets = (target != IGNORE_INDEX).sum()
    loss_sum = F.cross_entropy(pred, target, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_sum, n_targets
