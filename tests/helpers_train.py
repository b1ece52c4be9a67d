"""A toy model, fake samples, encoder and collate for the training tests (no real VLM parts)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.data.bad_samples import BadSampleError
from vlmkit.data.dataset import SourceData
from vlmkit.data.sample import Sample, Turn

VOCAB = 16


class ToyVLM(nn.Module):
    """vision -> connector added to every position; per-token LLM with dropout (uses the RNG)."""

    def __init__(self, dim: int = 8, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.vision = nn.Linear(4, dim)
        self.connector = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.llm = nn.ModuleDict(
            {"embed": nn.Embedding(VOCAB, dim), "norm": nn.LayerNorm(dim), "drop": nn.Dropout(0.2),
             "head": nn.Linear(dim, VOCAB)}
        )

    def parts(self):
        return {"vision": self.vision, "connector": self.connector, "llm": self.llm}

    def forward(self, input_ids, attention_mask, pixel_values=None, labels=None, sample_ids=None):
        h = self.llm["embed"](input_ids)
        if pixel_values is not None:
            h = h + self.connector(self.vision(pixel_values))[:, None, :]
        logits = self.llm["head"](self.llm["drop"](self.llm["norm"](h)))
        shifted = labels[:, 1:]
        loss_sum = F.cross_entropy(
            logits[:, :-1].reshape(-1, VOCAB), shifted.reshape(-1), ignore_index=-100, reduction="sum"
        )
        return SimpleNamespace(logits=logits, loss_sum=loss_sum, n_targets=int((shifted != -100).sum()))


@dataclass
class Enc:
    input_ids: list[int]
    labels: list[int]
    n_images: int
    sample_id: str


def make_source(name: str, n: int, bad_every: int = 0, seed: int = 0) -> SourceData:
    """Samples whose text is a digit string of varying length; every ``bad_every``-th is bad."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(n):
        length = 3 + int(torch.randint(0, 9, (1,), generator=g))
        digits = "".join(str(int(d)) for d in torch.randint(0, 10, (length,), generator=g))
        meta = {"bad": bool(bad_every) and i % bad_every == 0}
        samples.append(Sample(f"{name}-{i}", [Turn.of_text("user", "q"), Turn.of_text("assistant", digits)], [], meta))
    return SourceData(name, Path(f"/fake/{name}.json"), Path("/fake"), samples)


def fake_encode(sample: Sample, root) -> tuple[Enc, list[torch.Tensor]]:
    if sample.meta.get("bad"):
        raise BadSampleError("missing_image", f"{sample.id}: images/nothing.png")
    ids = [10] + [int(c) for c in sample.turns[1].text] + [11]
    labels = [-100] + ids[1:]
    pixels = torch.tensor([float(len(ids)), float(ids[1]), 1.0, -1.0]) / 10
    return Enc(ids, labels, 1, sample.id), [pixels]


def fake_collate(items, pixel_values, pad_id, padding_side="right"):
    width = max(len(e.input_ids) for e in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), -100, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for r, e in enumerate(items):
        n = len(e.input_ids)
        ids[r, :n] = torch.tensor(e.input_ids)
        labels[r, :n] = torch.tensor(e.labels)
        mask[r, :n] = 1
    pixels = torch.stack(pixel_values) if pixel_values else None
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": pixels}
