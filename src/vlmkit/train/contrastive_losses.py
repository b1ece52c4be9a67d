"""Contrastive image-text losses: CLIP's softmax loss and SigLIP's sigmoid loss, single-process
and data-parallel (docs/contrastive.md).

Inputs are L2-normalised embeddings ``img [n, E]`` and ``txt [n, E]`` where row ``i`` of both
is a matching pair, and the *scale* ``t`` (already ``exp``-ed and clamped: what
``DualEncoder.forward`` returns as ``logit_scale``), plus SigLIP's bias ``b``.

* CLIP (Radford et al. 2021): logits ``s_ij = t * img_i . txt_j``;
  ``L = 1/2 * (1/N sum_i CE(s_i., i) + 1/N sum_j CE(s_.j, j))``.
* SigLIP (Zhai et al. 2023): ``z_ij = +1`` if ``i == j`` else ``-1``;
  ``L = -1/N sum_i sum_j log sigmoid(z_ij * (t * img_i . txt_j + b))`` -- summed over all
  ``N^2`` pairs and divided by the batch size ``N`` (not by ``N^2``), as in the paper.

Per-row form. Both losses are sums of per-row terms: CLIP's row ``i`` is
``1/2 * (CE(s_i., i) + CE(s_.i, i))`` (image ``i`` against every text, text ``i`` against every
image), SigLIP's row ``i`` is ``sum_j -log sigmoid(z_ij (t img_i . txt_j + b))``. ``reduction``
says what is returned for the rows given: ``"mean"`` (their sum / their number: the usual loss)
or ``"sum"`` (for a trainer that divides by the global count itself).

Data parallelism (``gather=True`` under an initialised ``torch.distributed`` group). Each rank
holds the embeddings of its own rows (``n_r`` rows; sizes may differ between ranks).
``gather_features`` concatenates every rank's rows in rank order (the global batch, ``N``
rows), and the rank computes only its *local* rows' terms against the whole global batch:
CLIP gathers images and texts (one collective), SigLIP only texts. Its gradient is correct
because the backward of ``gather_features`` sums, over ranks, the gradients that every rank's
loss sends to each slot (an all-reduce of the gradient of the gathered tensor; each rank keeps
its own slot): rank ``r`` receives ``d(sum_s L_s)/d f_r`` for its own features ``f_r``, so its
parameter gradient is ``d(sum_s L_s)/d f_r * d f_r/d theta`` and the sum over ranks of those is
the gradient of ``sum_s L_s``. Then:

* ``reduction="sum"``: ``sum_s L_s`` is ``N`` times the single-process loss. A trainer that
  divides each rank's loss by the global ``N`` and *sums* gradients over ranks gets exactly the
  single-process gradient (vlmkit's trainer: ``loss_sum * world_size / N``, then DDP's mean).
* ``reduction="mean"`` with equal shards (``n_r = N / W``): each rank's loss is ``W`` times its
  share of the global loss, so DDP's *average* over ranks gives exactly the single-process
  gradient, and the mean of the ranks' loss values is the global loss.

``logit_scale`` / ``logit_bias`` are used by every rank; their gradients add up the same way.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F

Reduction = Literal["mean", "sum"]


# ---------------------------------------------------------------------- gathering


def _world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default group; ``(0, 1)`` when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherRows(torch.autograd.Function):
    """All ranks' rows, concatenated in rank order, with a gradient to this rank's rows.

    Forward: an all-gather (padded to the longest share). Backward: the gradient of the gathered
    tensor is summed over ranks (all-reduce; gloo has no reduce-scatter) and this rank keeps
    its own slot, which therefore carries every rank's loss gradient for these rows.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: tuple[int, ...], rank: int) -> torch.Tensor:
        n_max = max(sizes)
        padded = x.new_zeros((n_max, *x.shape[1:]))
        padded[: x.shape[0]] = x
        bufs = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(bufs, padded)
        ctx.sizes, ctx.rank = sizes, rank
        return torch.cat([b[:n] for b, n in zip(bufs, sizes)], dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        sizes, rank = ctx.sizes, ctx.rank
        n_max = max(sizes)
        padded = grad.new_zeros((len(sizes), n_max, *grad.shape[1:]))
        offset = 0
        for r, n in enumerate(sizes):
            padded[r, :n] = grad[offset : offset + n]
            offset += n
        dist.all_reduce(padded)  # sum over ranks
        return padded[rank, : sizes[rank]].clone(), None, None


def gather_features(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(global rows [N, ...], offset of this rank's rows in them)``, differentiable.

    Every rank of the default process group must call it (same order of calls); shares may
    have different lengths. Without a group (or with one rank) it returns ``(x, 0)``.
    """
    rank, world = _world()
    if world == 1:
        return x, 0
    n = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    all_n = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(all_n, n)
    sizes = tuple(int(t.item()) for t in all_n)
    return _GatherRows.apply(x.contiguous(), sizes, rank), sum(sizes[:rank])


# ---------------------------------------------------------------------- losses


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32 at least (bf16 / fp16 embeddings are upcast), float64 stays float64."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _reduce(per_row: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    if reduction == "sum":
        return per_row.sum()
    if reduction == "mean":
        return per_row.mean() if per_row.numel() else per_row.sum()
    raise ValueError(f"reduction: expected 'mean' or 'sum', got {reduction!r}")


def _check(img: torch.Tensor, txt: torch.Tensor) -> None:
    if img.dim() != 2 or img.shape != txt.shape:
        raise ValueError(f"expected img and txt of the same shape [n, E], got {tuple(img.shape)} "
                         f"and {tuple(txt.shape)}")


def clip_loss(
    img: torch.Tensor,
    txt: torch.Tensor,
    logit_scale: torch.Tensor | float,
    *,
    gather: bool = False,
    reduction: Reduction = "mean",
    negatives: torch.Tensor | None = None,
    negative_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """CLIP's symmetric cross-entropy (Radford et al. 2021) of the rows given.

    ``logit_scale`` is the scale ``t`` itself (not its log). With ``gather`` (and a process
    group) the local rows are scored against the gathered global batch; see the module doc for
    how ``reduction`` makes the data-parallel gradient equal the single-process one.

    ``negatives`` ``[n, E]`` (NegCLIP, Yuksekgonul et al. 2023): a hard-negative caption per
    row, added (over all ranks, like the texts) to the texts every image is contrasted with;
    ``negative_mask`` ``[n]`` marks the rows that have one (the others' columns are left out).
    The text -> image direction is unchanged.
    """
    _check(img, txt)
    dtype = _compute_dtype(img, txt)
    img, txt = img.to(dtype), txt.to(dtype)
    n = img.shape[0]
    if gather:
        both, offset = gather_features(torch.cat([img, txt], dim=1))  # one collective for both
        all_img, all_txt = both.split(img.shape[1], dim=1)
    else:
        all_img, all_txt, offset = img, txt, 0
    t = torch.as_tensor(logit_scale, device=img.device).to(dtype)
    targets = torch.arange(offset, offset + n, device=img.device)
    logits_i2t = t * img @ all_txt.T  # [n, N]: local images against every text
    logits_t2i = t * txt @ all_img.T  # [n, N]: local texts against every image
    if negatives is not None:
        all_neg, keep = _gathered_negatives(negatives.to(dtype), negative_mask, gather)
        extra = (t * img @ all_neg.T).masked_fill(~keep[None, :], float("-inf"))  # [n, N]
        logits_i2t = torch.cat([logits_i2t, extra], dim=1)
    per_row = 0.5 * (
        F.cross_entropy(logits_i2t, targets, reduction="none") + F.cross_entropy(logits_t2i, targets, reduction="none")
    )
    return _reduce(per_row, reduction)


def siglip_loss(
    img: torch.Tensor,
    txt: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float,
    *,
    gather: bool = False,
    reduction: Reduction = "mean",
    negatives: torch.Tensor | None = None,
    negative_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss (Zhai et al. 2023) of the rows (images) given.

    ``-1/n sum_i sum_j log sigmoid(z_ij (t img_i . txt_j + b))`` with ``z_ii = 1``, ``z_ij = -1``
    otherwise: summed over pairs, divided by the number of rows (``reduction="mean"``). With
    ``gather`` the local images are scored against every rank's texts (images stay local).
    """
    _check(img, txt)
    dtype = _compute_dtype(img, txt)
    img, txt = img.to(dtype), txt.to(dtype)
    n = img.shape[0]
    all_txt, offset = gather_features(txt) if gather else (txt, 0)
    t = torch.as_tensor(logit_scale, device=img.device).to(dtype)
    b = torch.as_tensor(logit_bias, device=img.device).to(dtype)
    logits = t * img @ all_txt.T + b  # [n, N]
    labels = -torch.ones_like(logits)
    labels[torch.arange(n, device=img.device), torch.arange(offset, offset + n, device=img.device)] = 1.0
    per_row = -F.logsigmoid(labels * logits).sum(dim=1)
    if negatives is not None:  # more negative pairs (label -1): every image against every hard negative
        all_neg, keep = _gathered_negatives(negatives.to(dtype), negative_mask, gather)
        extra = -F.logsigmoid(-(t * img @ all_neg.T + b))  # [n, N]
        per_row = per_row + (extra * keep[None, :].to(dtype)).sum(dim=1)
    return _reduce(per_row, reduction)


def _gathered_negatives(negatives: torch.Tensor, mask: torch.Tensor | None, gather: bool):
    """Hard negatives of all ranks (differentiable) and which of them exist."""
    if mask is None:
        mask = torch.ones(negatives.shape[0], dtype=torch.bool, device=negatives.device)
    if not gather:
        return negatives, mask.bool()
    both, _ = gather_features(torch.cat([negatives, mask.to(negatives.dtype)[:, None]], dim=1))
    return both[:, :-1], both[:, -1] > 0.5


def dual_encoder_loss(
    outputs: dict, kind: Literal["clip", "siglip"], *, gather: bool = False, reduction: Reduction = "mean"
) -> torch.Tensor:
    """The loss of ``DualEncoder.forward``'s outputs (``image_embeds``, ``text_embeds``,
    ``logit_scale``, ``logit_bias``)."""
    img, txt = outputs["image_embeds"], outputs["text_embeds"]
    neg = {"negatives": outputs.get("negative_embeds"), "negative_mask": outputs.get("negative_mask")}
    if kind == "clip":
        return clip_loss(img, txt, outputs["logit_scale"], gather=gather, reduction=reduction, **neg)
    if kind == "siglip":
        if outputs.get("logit_bias") is None:
            raise ValueError("siglip loss: the outputs have no logit_bias (a model built with loss: clip?)")
        return siglip_loss(img, txt, outputs["logit_scale"], outputs["logit_bias"], gather=gather, reduction=reduction,
                           **neg)  # fmt: skip
    raise ValueError(f"loss: expected 'clip' or 'siglip', got {kind!r}")


@torch.no_grad()
def in_batch_accuracy(img: torch.Tensor, txt: torch.Tensor) -> dict[str, float]:
    """Top-1 accuracy of picking the matching row within the (local) batch, both directions:
    ``{"i2t_acc", "t2i_acc"}`` -- a cheap training-time signal (ties count as misses)."""
    _check(img, txt)
    sim = img.float() @ txt.float().T
    n = sim.shape[0]
    if n == 0:
        return {"i2t_acc": 0.0, "t2i_acc": 0.0}
    diag = sim.diagonal()
    eye = torch.eye(n, dtype=torch.bool, device=sim.device)
    others = sim.masked_fill(eye, float("-inf"))
    i2t = (diag > others.max(dim=1).values).float().mean() if n > 1 else torch.tensor(1.0)
    t2i = (diag > others.max(dim=0).values).float().mean() if n > 1 else torch.tensor(1.0)
    return {"i2t_acc": float(i2t), "t2i_acc": float(t2i)}
