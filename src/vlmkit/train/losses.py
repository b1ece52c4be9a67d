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


# loss_chunk_tokens: "auto" chunks the loss of LLMs with at least this many vocabulary entries
# (every current LLM: SmolLM2 49k, Llama 3 128k, Qwen2.5 152k, Gemma 256k), this many target
# positions at a time: bench/chunked_loss_memory.py measured 1024 at a third of the full logits'
# memory and no slower, at SmolLM2's vocabulary. Small vocabularies (the shapes world's ~500
# entries) keep the full logits: they are small, and the recorded demo figures stay exact.
AUTO_CHUNK_MIN_VOCAB = 32_768
AUTO_CHUNK_TOKENS = 1024


def resolve_loss_chunk(setting: int | str | None, vocab_size: int | None) -> int | None:
    """Target positions per loss chunk for a stage's ``loss_chunk_tokens`` (None: full logits)."""
    if setting != "auto":
        return setting
    return AUTO_CHUNK_TOKENS if vocab_size is not None and vocab_size >= AUTO_CHUNK_MIN_VOCAB else None


def _chunk_ce_sum(hidden: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  softcap: float | None = None):  # fmt: skip
    logits = F.linear(hidden, weight, bias).float()
    if softcap:  # Gemma 2's final soft-capping, as its LM applies it to the logits
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, target, reduction="sum")


def chunked_next_token_loss(
    hidden: torch.Tensor, labels: torch.Tensor, head: torch.nn.Module, chunk_tokens: int,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``next_token_loss`` from the LM's last hidden states ``[B, T, D]``, never holding the logits
    of more than ``chunk_tokens`` positions: only target positions go through the LM head, a
    chunk at a time, and each chunk's logits are recomputed in the backward pass instead of
    being kept (activation checkpointing). The same sum and count as the full computation.

    Written here because the logits are the largest activation of a small-LM VLM step
    (positions x vocabulary, e.g. 2k x 49k floats per row) and transformers computes them whole.
    """
    from torch.utils.checkpoint import checkpoint

    if hidden.shape[:2] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} disagree")
    if chunk_tokens < 1:
        raise ValueError("chunk_tokens must be >= 1")
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    target = labels[:, 1:].reshape(-1)
    keep = target != IGNORE_INDEX
    h, target = h[keep], target[keep]
    n_targets = keep.sum()
    loss_sum = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, target.shape[0], chunk_tokens):
        part = slice(start, start + chunk_tokens)
        loss_sum = loss_sum + checkpoint(_chunk_ce_sum, h[part], target[part], head.weight, head.bias, softcap,
                                         use_reentrant=False)  # fmt: skip
    if target.shape[0] == 0:  # no target: still a (zero) function of the head, so that data-parallel
        loss_sum = loss_sum + (head.weight.sum() + hidden.sum()) * 0.0  # reduction sees every parameter used
    return loss_sum, n_targets
