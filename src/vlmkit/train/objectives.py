"""What a stage optimises: how its items become batches, what its loss counts, and the loss.

The trainer normalises every step by the objective's count over all of the step's
micro-batches (target tokens for next-token prediction, pairs for DPO), so the gradient is that
of the mean over the step whatever the split into micro-batches.

* ``NextTokenObjective``: cross-entropy on the assistant turns (the model computes it).
* ``DPOObjective``: Direct Preference Optimization (Rafailov et al. 2023) on preference pairs:
  the chosen and rejected answers of a micro-batch's pairs go through the model as one batch
  (chosen rows first), their sequence log-probabilities are compared with those of a frozen
  reference model -- the model as the stage begins, saved once to
  ``<run>/reference-<stage>.safetensors`` so that a resumed run compares against the same
  weights -- or with none (``dpo.reference_free``).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from vlmkit.config import ConfigError, StageConfig
from vlmkit.data.bad_samples import TooManyBadSamples
from vlmkit.data.packing import pack_collate
from vlmkit.data.template import Encoded
from vlmkit.train.losses import dpo_loss, resolve_loss_chunk, sequence_logprobs

IGNORE_INDEX = -100


def count_targets(labels: torch.Tensor) -> int:
    """Target tokens of a next-token loss: labels that are not ignored, after the shift."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def _model_inputs(batch: dict) -> dict:
    extra = {"image_layouts": batch["image_layouts"]} if batch.get("image_layouts") else {}
    if batch.get("position_ids") is not None:  # packed rows (data.packing)
        extra["position_ids"] = batch["position_ids"]
    return dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                pixel_values=batch.get("pixel_values"), sample_ids=batch.get("sample_ids"), **extra)  # fmt: skip


class NextTokenObjective:
    """Mean cross-entropy over the step's target tokens (computed in chunks of
    ``loss_chunk_tokens`` target positions when set)."""

    unit = "targets"

    def __init__(self, loss_chunk_tokens: int | None = None, packing=None, one_row: bool = False) -> None:
        self.chunk = {"loss_chunk_tokens": loss_chunk_tokens} if loss_chunk_tokens else {}
        self.packing = packing  # a PackingConfig: the micro-batch's samples share rows
        self.one_row = one_row  # flash-attention: all of them in one row (its varlen kernel)

    def length(self, item) -> int:
        return len(item[0].input_ids)

    def has_images(self, item) -> bool:
        return bool(item[1])

    def collate(self, items: list, collate_fn, pad_id: int) -> dict:
        encoded = [e for e, _ in items]
        if self.packing is not None:
            return pack_collate(encoded, [pxs for _, pxs in items], pad_id, self.packing.tokens, self.packing.max_images,
                                one_row=self.one_row)  # fmt: skip
        pixels = [px for _, pxs in items for px in pxs]
        batch = collate_fn(encoded, pixels, pad_id, padding_side="right")
        batch["sample_ids"] = [getattr(e, "sample_id", None) for e in encoded]
        return batch

    def count(self, batch: dict) -> int:
        return count_targets(batch["labels"])

    def placeholder(self, pad_id: int):
        """A one-token row with no image and no target (a data-parallel rank with nothing else)."""
        return Encoded(input_ids=[pad_id], labels=[IGNORE_INDEX], n_images=0, sample_id="<placeholder>"), []

    def loss_sum(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, int, dict[str, float]]:
        out = model(labels=batch["labels"], **_model_inputs(batch), **self.chunk)
        counted = int(out.n_targets)
        if counted != self.count(batch):
            raise RuntimeError(
                f"the model counted {counted} target tokens, the trainer {self.count(batch)}: "
                "labels must be unshifted, -100 where no loss (see count_targets)"
            )
        return out.loss_sum, counted, {}


class DPOObjective:
    """Mean DPO loss over the step's pairs; logs the mean implicit rewards and how often the
    chosen answer's reward is the higher (``reward_accuracy``)."""

    unit = "pairs"

    def __init__(self, beta: float, reference: nn.Module | None) -> None:
        self.beta = beta
        self.reference = reference

    def length(self, item) -> int:
        chosen, rejected = item[0]
        return max(len(chosen.input_ids), len(rejected.input_ids))

    def has_images(self, item) -> bool:
        return bool(item[1])

    def collate(self, items: list, collate_fn, pad_id: int) -> dict:
        chosen = [c for (c, _), _ in items]
        rejected = [r for (_, r), _ in items]
        pixels = [px for _, pxs in items for px in pxs]
        batch = collate_fn(chosen + rejected, pixels + pixels, pad_id, padding_side="right")
        batch["sample_ids"] = [e.sample_id for e in chosen + rejected]
        batch["n_pairs"] = len(items)
        return batch

    def count(self, batch: dict) -> int:
        return batch["n_pairs"]

    def placeholder(self, pad_id: int):
        raise TooManyBadSamples("DPO: every pair of this rank's share of a micro-batch was bad")

    def loss_sum(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, int, dict[str, float]]:
        n = batch["n_pairs"]
        logps = sequence_logprobs(model(**_model_inputs(batch)).logits, batch["labels"])  # [2n]
        ref_c = ref_r = None
        if self.reference is not None:
            with torch.no_grad():
                ref = sequence_logprobs(self.reference(**_model_inputs(batch)).logits, batch["labels"])
            ref_c, ref_r = ref[:n], ref[n:]
        losses, chosen_r, rejected_r = dpo_loss(logps[:n], logps[n:], ref_c, ref_r, self.beta)
        stats = {
            "reward_chosen": float(chosen_r.sum()),
            "reward_rejected": float(rejected_r.sum()),
            "reward_accuracy": float((chosen_r > rejected_r).float().sum()),
        }
        return losses.sum(), n, stats


class ContrastiveObjective:
    """CLIP's or SigLIP's loss (`train.contrastive_losses`) on image-caption pairs, for a
    `models.contrastive.DualEncoder`. Items are ``(caption token ids, [pixels])``.

    The count is the pairs of the micro-batch; the loss of this rank's rows is *summed* against
    the batch gathered over ranks, so that the trainer's division by the pairs of all ranks
    gives exactly one process's gradient on the same global batch. Negatives are the other
    pairs of the same micro-batch (over all ranks): gradient accumulation therefore does not
    equal a bigger batch, as for any contrastive loss.
    """

    unit = "pairs"

    def __init__(self, loss: str) -> None:
        self.loss = loss

    def length(self, item) -> int:
        return len(item[0])

    def has_images(self, item) -> bool:
        return True

    @staticmethod
    def _pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(1, max(len(r) for r in rows))
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
        return ids, mask

    def collate(self, items: list, collate_fn, pad_id: int) -> dict:
        input_ids, attention_mask = self._pad([list(ids) for ids, _ in items], pad_id)
        pixels = torch.stack([pxs[0] for _, pxs in items])
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixels,
                 "sample_ids": [getattr(ids, "sample_id", None) for ids, _ in items]}  # fmt: skip
        per_row = [list(getattr(ids, "negatives", [])) for ids, _ in items]
        k = max(len(negs) for negs in per_row)
        if k:  # hard negatives (NegCLIP): k slots per row, [pad] and masked out where a row has fewer
            slots = [negs[j] if j < len(negs) else None for negs in per_row for j in range(k)]
            batch["negative_input_ids"], batch["negative_attention_mask"] = self._pad(
                [neg if neg is not None else [pad_id] for neg in slots], pad_id)
            batch["negative_mask"] = torch.tensor([neg is not None for neg in slots])
        return batch

    def count(self, batch: dict) -> int:
        return int(batch["input_ids"].shape[0])

    def placeholder(self, pad_id: int):
        raise TooManyBadSamples("contrastive: every pair of this rank's share of a micro-batch was bad")

    def loss_sum(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, int, dict[str, float]]:
        import torch.distributed as dist

        from vlmkit.train.contrastive_losses import dual_encoder_loss, in_batch_accuracy

        out = model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"], negative_input_ids=batch.get("negative_input_ids"),
                    negative_attention_mask=batch.get("negative_attention_mask"))  # fmt: skip
        if "negative_mask" in batch:
            out["negative_mask"] = batch["negative_mask"]
        gather = dist.is_available() and dist.is_initialized()  # outside the model: DDP's forward ends above
        loss = dual_encoder_loss(out, self.loss, gather=gather, reduction="sum")
        n = self.count(batch)
        acc = in_batch_accuracy(out["image_embeds"].detach(), out["text_embeds"].detach())
        stats = {"i2t_acc": acc["i2t_acc"] * n, "t2i_acc": acc["t2i_acc"] * n,
                 "logit_scale": float(out["logit_scale"].detach()) * n}  # fmt: skip
        return loss, n, stats

    def after_step(self, model: nn.Module) -> None:
        """Keep the learned temperature inside CLIP's cap (its gradient is 0 above it)."""
        model.clamp_logit_scale_()


def frozen_reference(model: nn.Module, path: Path, write: bool = True) -> nn.Module:
    """A frozen copy of ``model`` with the weights saved at ``path``; the first call saves the
    model's current weights there (atomically), so a resumed stage gets the same reference.
    ``write=False`` (data-parallel ranks but the first) never writes the file."""
    reference = copy.deepcopy(model)
    if path.exists():
        safetensors.torch.load_model(reference, str(path), strict=True, device=str(next(model.parameters()).device))
    elif write:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        safetensors.torch.save_model(model, str(tmp))
        os.replace(tmp, path)
    reference.requires_grad_(False)
    return reference.eval()


def _lm_head_rows(model: nn.Module) -> int | None:
    """The vocabulary size of the model's LM head (None: the model has no HF causal LM)."""
    get_head = getattr(getattr(model, "llm", None), "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    return int(head.weight.shape[0]) if head is not None else None


def make_objective(stage: StageConfig, model: nn.Module, run_dir: Path, write_reference: bool = True):
    if stage.objective == "contrastive":
        return ContrastiveObjective(model.config.loss)
    if stage.objective == "next_token":
        if stage.packing is not None and getattr(model, "fuses_by_cross_attention", False):
            raise ConfigError(f"stages.{stage.name}.packing: not supported with connector.fusion=cross_attention "
                              "(a sample's text would read the images of the samples before it in the row)")
        config = getattr(model, "config", None)
        flash = getattr(getattr(config, "llm", None), "attn_implementation", None) == "flash_attention_2"
        chunk = resolve_loss_chunk(stage.loss_chunk_tokens, _lm_head_rows(model))
        return NextTokenObjective(chunk, stage.packing, one_row=flash)
    reference = None
    if not stage.dpo.reference_free:
        reference = frozen_reference(model, Path(run_dir) / f"reference-{stage.name}.safetensors", write_reference)
    return DPOObjective(stage.dpo.beta, reference)
