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


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row, the summed log-probability of its target tokens: ``[B, T, V], [B, T] -> [B]``.

    The same shift as ``next_token_loss``: ``logits[:, t]`` scores ``labels[:, t + 1]``; -100 is
    not a target. Computed in float32.
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree")
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    target = labels[:, 1:]
    mask = target != IGNORE_INDEX
    picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # [B, T-1]
    return (picked * mask).sum(-1)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor | None,
    reference_rejected: torch.Tensor | None,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct Preference Optimization (Rafailov et al. 2023), per pair.

    ``loss = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))`` with sequence
    log-probabilities ``[B]``; the implicit rewards are ``beta * (pi - ref)``. Without a reference
    (``reference_* = None``) the reference terms are 0: the reference-free variant, which compares
    the policy's own log-probabilities. Returns ``(losses [B], chosen_rewards [B], rejected_rewards [B])``.
    """
    if (reference_chosen is None) != (reference_rejected is None):
        raise ValueError("give both reference log-probabilities or neither")
    ref_c = reference_chosen if reference_chosen is not None else torch.zeros_like(policy_chosen)
    ref_r = reference_rejected if reference_rejected is not None else torch.zeros_like(policy_rejected)
    chosen_rewards = beta * (policy_chosen - ref_c)
    rejected_rewards = beta * (policy_rejected - ref_r)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()
