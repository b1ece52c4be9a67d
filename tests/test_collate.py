"""collate: right/left padding, labels and masks on padding, image stacking order."""

from __future__ import annotations

import pytest
import torch

from vlmkit.data.collate import collate
from vlmkit.data.template import IGNORE_INDEX, Encoded

PAD = 0


def items():
    return [
        Encoded([5, 9, 9, 6, 7], [-100, -100, -100, 6, 7], n_images=2, sample_id="a"),
        Encoded([5, 8, 7], [-100, 8, 7], n_images=0, sample_id="b"),
        Encoded([5, 9, 6, 7], [-100, -100, 6, 7], n_images=1, sample_id="c"),
    ]


def pixels():
    # image k is filled with the value k so the order can be checked
    return [torch.full((3, 4, 4), float(k)) for k in range(3)]


def unpad(batch, row):
    keep = batch["attention_mask"][row].bool()
    return batch["input_ids"][row][keep].tolist(), batch["labels"][row][keep].tolist()


def test_right_padding():
    its = items()
    b = collate(its, pixels(), pad_id=PAD)
    assert b["input_ids"].shape == (3, 5) and b["input_ids"].dtype == torch.long
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]]
    assert b["input_ids"][1].tolist() == [5, 8, 7, PAD, PAD]
    assert b["labels"][1].tolist() == [-100, 8, 7, IGNORE_INDEX, IGNORE_INDEX]
    assert b["labels"][2, 4].item() == IGNORE_INDEX
    for row, it in enumerate(its):
        assert unpad(b, row) == (it.input_ids, it.labels)
    assert b["pixel_values"].shape == (3, 3, 4, 4)
    assert [int(b["pixel_values"][k, 0, 0, 0]) for k in range(3)] == [0, 1, 2]
    assert b["sample_ids"] == ["a", "b", "c"]


def test_left_padding():
    its = items()
    b = collate(its, pixels(), pad_id=PAD, padding_side="left")
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [0, 1, 1, 1, 1]]
    assert b["input_ids"][1].tolist() == [PAD, PAD, 5, 8, 7]
    assert b["labels"][1].tolist() == [IGNORE_INDEX, IGNORE_INDEX, -100, 8, 7]
    # the last column holds every row's last real token (what generation continues from)
    assert b["input_ids"][:, -1].tolist() == [7, 7, 7]
    for row, it in enumerate(its):
        assert unpad(b, row) == (it.input_ids, it.labels)


def test_pad_to_multiple_and_pad_id():
    b = collate(items(), pixels(), pad_id=42, pad_to_multiple_of=8)
    assert b["input_ids"].shape == (3, 8)
    assert b["input_ids"][0, 5:].tolist() == [42, 42, 42]
    assert b["attention_mask"][:, 5:].sum().item() == 0
    assert (b["labels"][:, 5:] == IGNORE_INDEX).all()


def test_no_images():
    its = [Encoded([1, 2], [-100, 2], 0, "x"), Encoded([1], [1], 0, "y")]
    assert collate(its, None, pad_id=PAD)["pixel_values"] is None
    assert collate(its, [], pad_id=PAD)["pixel_values"] is None


def test_image_count_must_match():
    with pytest.raises(ValueError, match="3 image"):
        collate(items(), pixels()[:2], pad_id=PAD)
    with pytest.raises(ValueError):
        collate(items(), None, pad_id=PAD)


def test_prompt_records_without_n_images():
    """infer/predictor passes bare records (input_ids, labels, sample_id): trusted, stacked."""

    class Prompt:
        def __init__(self, ids, sid):
            self.input_ids, self.labels, self.sample_id = ids, [-100] * len(ids), sid

    b = collate([Prompt([1, 9, 2], "p"), Prompt([3], "q")], pixels()[:1], pad_id=PAD, padding_side="left")
    assert b["input_ids"].tolist() == [[1, 9, 2], [PAD, PAD, 3]]
    assert b["pixel_values"].shape == (1, 3, 4, 4)
