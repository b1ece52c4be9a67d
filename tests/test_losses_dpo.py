"""DPO and sequence log-probabilities against hand-computed values."""

import math

import pytest
import torch

from vlmkit.train.losses import dpo_loss, sequence_logprobs


def test_sequence_logprobs_by_hand():
    # vocab 2; logits at position 0 are [0, ln 3] -> p = [1/4, 3/4]; position 1: uniform
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0], [5.0, 5.0]]])
    labels = torch.tensor([[-100, 1, 0]])  # targets: token 1 at t=1 (scored by t=0), token 0 at t=2
    got = sequence_logprobs(logits, labels)
    assert got.shape == (1,)
    assert got.item() == pytest.approx(math.log(0.75) + math.log(0.5), abs=1e-6)
    labels_masked = torch.tensor([[-100, 1, -100]])
    assert sequence_logprobs(logits, labels_masked).item() == pytest.approx(math.log(0.75), abs=1e-6)


def test_dpo_loss_by_hand():
    pc, pr = torch.tensor([-1.0]), torch.tensor([-3.0])
    rc, rr = torch.tensor([-2.0]), torch.tensor([-2.5])
    beta = 0.5
    # margin = 0.5 * ((-1 + 2) - (-3 + 2.5)) = 0.5 * 1.5 = 0.75; loss = log(1 + e^-0.75)
    losses, cr, rj = dpo_loss(pc, pr, rc, rr, beta)
    assert losses.item() == pytest.approx(math.log1p(math.exp(-0.75)), abs=1e-6)
    assert cr.item() == pytest.approx(0.5) and rj.item() == pytest.approx(-0.25)
    # reference-free: margin = 0.5 * (-1 - -3) = 1
    losses, _, _ = dpo_loss(pc, pr, None, None, beta)
    assert losses.item() == pytest.approx(math.log1p(math.exp(-1.0)), abs=1e-6)
    with pytest.raises(ValueError):
        dpo_loss(pc, pr, rc, None, beta)


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    pc = torch.tensor([-2.0], requires_grad=True)
    pr = torch.tensor([-2.0], requires_grad=True)
    losses, _, _ = dpo_loss(pc, pr, torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.1)
    losses.sum().backward()
    # d/d(pc) = -beta * sigmoid(-margin) = -0.05 at margin 0; the opposite for pr
    assert pc.grad.item() == pytest.approx(-0.05) and pr.grad.item() == pytest.approx(0.05)
