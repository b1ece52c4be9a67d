"""Sequence packing: row planning under token and image budgets, packed collation, and the
model's per-sample losses, which must not change when samples share a row."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from _model_helpers import make_model, tiny_model_config
from vlmkit.config import ConfigError, ModelConfig, StageConfig
from vlmkit.data.collate import collate
from vlmkit.data.packing import pack_collate, plan_rows
from vlmkit.data.template import IGNORE_INDEX, Encoded


def test_plan_rows_by_hand():
    # lengths 5,4,3,3,1 into rows of 8. First-fit decreasing needs two rows; balanced over two
    # (each item into the emptier row): 5 -> A; 4 -> B; 3 -> B (7); 3 -> A (8); 1 -> B (8)
    rows = plan_rows([5, 4, 3, 3, 1], [0] * 5, max_tokens=8)
    assert rows == [[0, 3], [1, 2, 4]]


def test_plan_rows_balances_the_rows_first_fit_found():
    # rows of 16: first-fit decreasing fills A with 5+5+4 = 14 and leaves B at 4+3+3 = 10, so
    # both rows would be padded to 14 (4 padding tokens); balanced, both hold 12 (none)
    lengths = [5, 5, 4, 4, 3, 3]
    rows = plan_rows(lengths, [0] * 6, max_tokens=16)
    assert len(rows) == 2
    assert [sum(lengths[i] for i in r) for r in rows] == [12, 12]


def test_plan_rows_keeps_first_fit_when_balancing_would_break_a_budget():
    # rows of 10 tokens and 1 image; lengths 4,5,5,5 with images on items 0 and 2. First fit
    # decreasing: 5 (item 1) -> A; 5 (item 2) -> A (10 tokens, 1 image); 5 (item 3) -> B;
    # 4 (item 0) -> B (9, 1). Balancing over two rows would put item 3 with item 1 (the emptier
    # row on a tie is the first) and leave item 0 nowhere, so first fit's rows are kept.
    rows = plan_rows([4, 5, 5, 5], [1, 0, 1, 0], max_tokens=10, max_images=1)
    assert rows == [[0, 3], [1, 2]]


def test_plan_rows_respects_the_image_budget_and_oversized_items():
    lengths, images = [2, 2, 2, 2, 20], [1, 1, 1, 0, 3]
    rows = plan_rows(lengths, images, max_tokens=10, max_images=2)
    assert sorted(i for r in rows for i in r) == [0, 1, 2, 3, 4]
    for r in rows:
        if r != [4]:  # the oversized item sits alone
            assert sum(lengths[i] for i in r) <= 10
            assert sum(images[i] for i in r) <= 2
    assert [4] in rows


def _encoded(model, sid: str, words: list[int], n_images: int, target_from: int) -> Encoded:
    img = [model.image_token_id] * (model.tokens_per_image * n_images)
    ids = [5 + w for w in words[:1]] + img + [5 + w for w in words[1:]]
    labels = [IGNORE_INDEX if i < target_from else t for i, t in enumerate(ids)]
    return Encoded(input_ids=ids, labels=labels, n_images=n_images, sample_id=sid)


def _items(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    specs = [("a", 7, 1), ("b", 3, 0), ("c", 12, 2), ("d", 5, 0), ("e", 9, 1)]
    items, pixels = [], []
    for sid, n_words, n_img in specs:
        words = torch.randint(0, 50, (n_words,), generator=g).tolist()
        target_from = 0 if sid == "b" else 2 + n_img * model.tokens_per_image  # "b": all targets
        items.append(_encoded(model, sid, words, n_img, target_from))
        pixels.append([torch.rand(3, 64, 64, generator=g) for _ in range(n_img)])
    return items, pixels


def test_pack_collate_positions_restart_and_first_labels_are_ignored():
    model, _ = make_model()
    items, pixels = _items(model)
    width = max(len(it.input_ids) for it in items) + 20
    batch = pack_collate(items, pixels, pad_id=0, max_tokens=width)
    seq, pos = batch["sequence_ids"], batch["position_ids"]
    assert batch["input_ids"].shape[0] < len(items)  # fewer rows than samples
    for i, it in enumerate(items):
        where = (seq == i).nonzero()
        r = int(where[0, 0])
        cols = where[:, 1]
        assert torch.equal(pos[r, cols], torch.arange(len(it.input_ids)))
        assert torch.equal(batch["input_ids"][r, cols], torch.tensor(it.input_ids))
        expected = torch.tensor(it.labels)
        expected[0] = IGNORE_INDEX
        assert torch.equal(batch["labels"][r, cols], expected)
    assert int(batch["attention_mask"].sum()) == sum(len(it.input_ids) for it in items)
    assert batch["pixel_values"].shape[0] == sum(len(p) for p in pixels)


def _per_sample_losses(logits, labels, owner, n_items):
    """Summed token cross-entropy per item (``owner``: the item of each position)."""
    tok = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=IGNORE_INDEX, reduction="none")
    who = owner[:, 1:]
    return torch.stack([tok[who == i].sum() for i in range(n_items)])


@pytest.mark.parametrize("attn,one_row", [("sdpa", False), ("eager", False), ("sdpa", True), ("varlen", False),
                                          ("varlen", True), ("auto", False), ("auto", True)])  # fmt: skip
def test_packed_and_unpacked_give_the_same_per_sample_losses(attn, one_row):
    """Rows under a budget (SDPA, eager), or every sample in one row (the flash-attention
    varlen layout, checked here with SDPA's block-diagonal mask)."""
    cfg = tiny_model_config()
    cfg = cfg.model_copy(update={"llm": cfg.llm.model_copy(update={"attn_implementation": attn})})
    model, _ = make_model(cfg=cfg)
    items, pixels = _items(model)
    flat = [px for pxs in pixels for px in pxs]
    plain = collate(items, flat, pad_id=0)
    with torch.no_grad():
        out = model(plain["input_ids"], plain["attention_mask"], plain["pixel_values"], labels=plain["labels"])
    owner = torch.arange(len(items))[:, None].expand_as(plain["input_ids"]).clone()
    owner[plain["attention_mask"] == 0] = -1
    unpacked = _per_sample_losses(out.logits, plain["labels"], owner, len(items))

    packed_batch = pack_collate(items, pixels, pad_id=0, max_tokens=64, one_row=one_row)
    assert packed_batch["input_ids"].shape[0] == 1 if one_row else 1 < packed_batch["input_ids"].shape[0] < len(items)
    with torch.no_grad():
        out_p = model(packed_batch["input_ids"], packed_batch["attention_mask"], packed_batch["pixel_values"],
                      labels=packed_batch["labels"], position_ids=packed_batch["position_ids"])  # fmt: skip
    packed = _per_sample_losses(out_p.logits, packed_batch["labels"], packed_batch["sequence_ids"], len(items))
    torch.testing.assert_close(packed, unpacked, rtol=1e-5, atol=1e-5)
    # and the step's totals agree: same target count, same summed loss
    assert int(out_p.n_targets) == int(out.n_targets)
    torch.testing.assert_close(out_p.loss_sum, out.loss_sum, rtol=1e-5, atol=1e-5)


def test_packing_without_position_restart_would_leak_across_samples():
    """The check above is not vacuous: the same packed rows with a plain causal mask (one
    sequence per row) give different losses for the samples that follow another."""
    model, _ = make_model()
    items, pixels = _items(model)
    batch = pack_collate(items, pixels, pad_id=0, max_tokens=64)
    with torch.no_grad():
        right = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], labels=batch["labels"],
                      position_ids=batch["position_ids"]).logits  # fmt: skip
        leaky = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], labels=batch["labels"]).logits
    assert not torch.allclose(right, leaky, atol=1e-4)


def test_packing_config_is_validated():
    base = dict(name="s", data={"x": 1.0}, trainable=["llm"], lr=1e-3, steps=1, max_seq_len=128)
    StageConfig.model_validate({**base, "packing": {"tokens": 256, "max_images": 4}})
    with pytest.raises(ValueError, match="max_seq_len"):
        StageConfig.model_validate({**base, "packing": {"tokens": 64}})
    with pytest.raises(ValueError, match="only next_token"):
        StageConfig.model_validate({**base, "objective": "dpo", "packing": {"tokens": 256}})


def test_packing_is_refused_with_cross_attention_fusion(tmp_path):
    from vlmkit.train.objectives import make_objective

    cfg = ModelConfig.model_validate({"llm": {"name": "tiny-llama", "overrides": {"num_hidden_layers": 2}},
                                      "connector": {"fusion": "cross_attention"}})  # fmt: skip
    model, _ = make_model(cfg=cfg)
    stage = StageConfig.model_validate(dict(name="s", data={"x": 1.0}, trainable=["llm"], lr=1e-3, steps=1,
                                            max_seq_len=128, packing={"tokens": 256}))  # fmt: skip
    with pytest.raises(ConfigError, match="cross_attention"):
        make_objective(stage, model, tmp_path)
