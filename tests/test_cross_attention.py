"""Flamingo-style gated cross-attention (vlmkit.models.cross_attention) in tiny Llama / Qwen2 LMs."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, Qwen2Config

from vlmkit.models.cross_attention import (
    CrossAttentionDecoderLayer,
    GatedCrossAttentionBlock,
    group_media,
    insert_cross_attention,
    media_attend_mask,
    media_index_from_ids,
)

DIM, VOCAB, IMG, K = 64, 100, 99, 3  # width, vocab, <image> marker id, tokens per image
FAMILIES = ("llama", "qwen2")


def tiny_llm(family: str = "llama", layers: int = 4, seed: int = 0):
    common = dict(
        vocab_size=VOCAB,
        hidden_size=DIM,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    config = LlamaConfig(**common) if family == "llama" else Qwen2Config(**common)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def text_ids(rows: int, length: int, markers: dict[int, list[int]], seed: int = 1) -> torch.Tensor:
    """Random word ids (never the marker) with ``<image>`` at ``markers[row]`` positions."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, IMG, (rows, length), generator=g)
    for row, positions in markers.items():
        ids[row, positions] = IMG
    return ids


def random_media(rows: int, images: int, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, images, K, DIM, generator=g)  # [B, M, K, D]


def open_gates(adapter, value: float = 1.0) -> None:
    with torch.no_grad():
        for block in adapter.blocks:
            block.alpha_attn.fill_(value)
            block.alpha_ffn.fill_(value)


def logits_with(llm, adapter, ids, media, media_mask=None) -> torch.Tensor:
    with torch.no_grad(), adapter.media(media, media_mask, media_index_from_ids(ids, IMG)):
        return llm(input_ids=ids).logits


def plain_logits(llm, ids) -> torch.Tensor:
    with torch.no_grad():
        return llm(input_ids=ids).logits


# ---------------------------------------------------------------------- media bookkeeping


def test_media_index_counts_markers_and_continues_from_offset():
    ids = torch.tensor([[5, IMG, 6, 7, IMG, 8], [IMG, 5, 6, 7, 8, 9]])
    assert media_index_from_ids(ids, IMG).tolist() == [[0, 1, 1, 1, 2, 2], [1, 1, 1, 1, 1, 1]]
    step = torch.tensor([[IMG], [5]])
    assert media_index_from_ids(step, IMG, offset=torch.tensor([2, 1])).tolist() == [[3], [1]]


def test_attend_mask_last_all_and_padding():
    index = torch.tensor([[0, 1, 2, 2]])
    real = torch.tensor([[True, True, False]])
    last = media_attend_mask(index, real, "last")[0].int().tolist()
    every = media_attend_mask(index, real, "all")[0].int().tolist()
    assert last == [[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 1, 0]]
    assert every == [[0, 0, 0], [1, 0, 0], [1, 1, 0], [1, 1, 0]]
    # a padding slot is never attended, even when the index points at it
    assert not media_attend_mask(torch.tensor([[3]]), real, "all")[0, 0, 2]
    with pytest.raises(ValueError, match="mode"):
        media_attend_mask(index, real, "first")


def test_group_media_pads_rows():
    embeds = torch.arange(3 * K * DIM, dtype=torch.float).view(3, K, DIM)
    media, mask = group_media(embeds, [2, 0, 1])
    assert media.shape == (3, 2, K, DIM)
    assert mask.tolist() == [[True, True], [False, False], [True, False]]
    assert torch.equal(media[0], embeds[:2]) and torch.equal(media[2, 0], embeds[2])
    assert not media[1].any() and not media[2, 1].any()
    empty, empty_mask = group_media(embeds[:0], [0, 0])
    assert empty.shape == (2, 0, K, DIM) and empty_mask.shape == (2, 0)
    with pytest.raises(ValueError, match="sums to"):
        group_media(embeds, [1, 1])


# ---------------------------------------------------------------------- the block alone


def test_block_output_is_exactly_zero_without_media_and_finite():
    torch.manual_seed(0)
    block = GatedCrossAttentionBlock(DIM, num_heads=4)
    with torch.no_grad():
        block.alpha_attn.fill_(1.0)
        block.alpha_ffn.fill_(1.0)
    hidden = torch.randn(1, 4, DIM)
    attend = media_attend_mask(torch.tensor([[0, 0, 1, 1]]), torch.tensor([[True]]), "last")
    text = block.attn_norm(hidden)
    cross = block.attn(text, random_media(1, 1), attend)
    assert torch.isfinite(cross).all()
    assert torch.equal(cross[0, :2], torch.zeros(2, DIM))  # no image yet: exactly 0, no NaN
    assert cross[0, 2:].abs().min() > 0
    out = block(hidden, random_media(1, 1), attend)
    assert torch.equal(out[0, :2], hidden[0, :2])
    assert not torch.allclose(out[0, 2:], hidden[0, 2:])


def test_block_mode_last_reads_only_the_latest_image_all_reads_every_earlier_one():
    torch.manual_seed(0)
    block = GatedCrossAttentionBlock(DIM, num_heads=4)
    with torch.no_grad():
        block.alpha_attn.fill_(1.0)
        block.alpha_ffn.fill_(1.0)
    hidden = torch.randn(1, 6, DIM)
    index = torch.tensor([[0, 1, 1, 2, 2, 2]])
    real = torch.ones(1, 2, dtype=torch.bool)
    media = random_media(1, 2)
    changed = media.clone()
    changed[:, 0] = torch.randn(1, K, DIM)  # image 1 only
    for mode, after_second_changes in (("last", False), ("all", True)):
        attend = media_attend_mask(index, real, mode)
        a, b = block(hidden, media, attend), block(hidden, changed, attend)
        assert torch.equal(a[0, 0], b[0, 0])
        assert not torch.allclose(a[0, 1:3], b[0, 1:3])
        assert torch.equal(a[0, 3:], b[0, 3:]) is not after_second_changes


# ---------------------------------------------------------------------- inside an LM


@pytest.mark.parametrize("family", FAMILIES)
def test_fresh_blocks_leave_the_lm_unchanged(family):
    llm = tiny_llm(family)
    ids = text_ids(2, 12, {0: [2, 7], 1: [4]})
    expected = plain_logits(llm, ids)
    adapter = insert_cross_attention(llm, every=2, num_heads=4, mode="last")
    got = logits_with(llm, adapter, ids, random_media(2, 2), torch.tensor([[True, True], [True, False]]))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_open_gates_change_tokens_after_an_image_only(family):
    llm = tiny_llm(family)
    ids = text_ids(1, 12, {0: [5]})
    expected = plain_logits(llm, ids)
    adapter = insert_cross_attention(llm, every=2, num_heads=4, mode="last")
    open_gates(adapter)
    got = logits_with(llm, adapter, ids, random_media(1, 1))
    assert torch.equal(got[0, :5], expected[0, :5])  # before the first marker: exactly the plain LM
    per_position = (got[0, 5:] - expected[0, 5:]).abs().amax(-1)
    assert (per_position > 1e-3).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_text_only_and_empty_media_behave_as_the_plain_lm(family):
    llm = tiny_llm(family)
    ids = text_ids(2, 10, {})
    expected = plain_logits(llm, ids)
    adapter = insert_cross_attention(llm, every=1, num_heads=4)
    open_gates(adapter)
    assert torch.equal(plain_logits(llm, ids), expected)  # no media set at all
    no_images = torch.zeros(2, 0, K, DIM)
    assert torch.equal(logits_with(llm, adapter, ids, no_images), expected)  # M = 0


def test_mode_last_and_all_follow_the_markers():
    p1, p2, length = 3, 7, 12
    ids = text_ids(1, length, {0: [p1, p2]})
    media = random_media(1, 2)
    new_first, new_second = media.clone(), media.clone()
    new_first[:, 0] = torch.randn(1, K, DIM)
    new_second[:, 1] = torch.randn(1, K, DIM)
    outputs = {}
    for mode in ("last", "all"):
        llm = tiny_llm("llama")
        adapter = insert_cross_attention(llm, every=2, num_heads=4, mode=mode)
        open_gates(adapter)
        base = logits_with(llm, adapter, ids, media)
        first = logits_with(llm, adapter, ids, new_first)
        second = logits_with(llm, adapter, ids, new_second)
        # image 1 changes positions from its marker on; image 2 nothing before its marker
        assert torch.equal(first[0, :p1], base[0, :p1])
        assert ((first[0, p1:] - base[0, p1:]).abs().amax(-1) > 1e-4).all()
        assert torch.equal(second[0, :p2], base[0, :p2])
        assert ((second[0, p2:] - base[0, p2:]).abs().amax(-1) > 1e-4).all()
        outputs[mode] = base
    # same weights (same seeds): the modes agree until the second marker, then "all" also reads image 1
    assert torch.equal(outputs["last"][0, :p2], outputs["all"][0, :p2])
    assert ((outputs["last"][0, p2:] - outputs["all"][0, p2:]).abs().amax(-1) > 1e-4).all()


@pytest.mark.parametrize("mode", ["last", "all"])
def test_padded_media_row_matches_the_row_alone(mode):
    llm = tiny_llm("qwen2")
    adapter = insert_cross_attention(llm, every=2, num_heads=4, mode=mode)
    open_gates(adapter)
    ids = text_ids(2, 10, {0: [1, 5], 1: [3]})
    media = random_media(2, 2)
    media[1, 1] = float("nan")  # a padding slot's content must not matter
    mask = torch.tensor([[True, True], [True, False]])
    batch = logits_with(llm, adapter, ids, media, mask)
    alone = logits_with(llm, adapter, ids[1:], media[1:, :1])
    assert torch.isfinite(batch).all()
    torch.testing.assert_close(batch[1:], alone, rtol=1e-5, atol=1e-5)


def test_more_markers_than_images_is_an_error():
    llm = tiny_llm("llama", layers=2)
    adapter = insert_cross_attention(llm, every=1, num_heads=4)
    ids = text_ids(2, 8, {0: [1, 4], 1: [2]})
    with pytest.raises(ValueError, match="more images than given"):
        with adapter.media(random_media(2, 2), torch.tensor([[True, False], [True, False]]), media_index_from_ids(ids, IMG)):
            pass


def test_media_are_cleared_after_an_error_and_length_mismatch_is_reported():
    llm = tiny_llm("llama", layers=2)
    ids = text_ids(1, 8, {0: [2]})
    expected = plain_logits(llm, ids)
    adapter = insert_cross_attention(llm, every=1, num_heads=4)
    open_gates(adapter)
    with pytest.raises(ValueError, match="media_index is"):
        with adapter.media(random_media(1, 1), None, media_index_from_ids(ids[:, :5], IMG)):
            llm(input_ids=ids)
    assert torch.equal(plain_logits(llm, ids), expected)  # no media left behind


def test_gradients_at_init_reach_only_the_gates_then_everything():
    llm = tiny_llm("llama")
    adapter = insert_cross_attention(llm, every=2, num_heads=4)
    ids = text_ids(2, 10, {0: [2], 1: [6]})
    weights = torch.randn(2, 10, VOCAB, generator=torch.Generator().manual_seed(5))
    with adapter.media(random_media(2, 1), None, media_index_from_ids(ids, IMG)):
        (llm(input_ids=ids).logits * weights).sum().backward()
    for block in adapter.blocks:
        # d/d alpha = tanh'(0) * <upstream, branch output> != 0; the branches themselves get 0 (gate is 0)
        assert block.alpha_attn.grad.abs() > 0 and block.alpha_ffn.grad.abs() > 0
        for name, p in block.named_parameters():
            if not name.startswith("alpha"):
                assert p.grad is not None and not p.grad.any(), name
    llm.zero_grad()
    open_gates(adapter)
    with adapter.media(random_media(2, 1), None, media_index_from_ids(ids, IMG)):
        (llm(input_ids=ids).logits * weights).sum().backward()
    for block in adapter.blocks:
        for name, p in block.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_gradient_checkpointing_recomputes_blocks_and_gives_the_same_grads():
    ids = text_ids(2, 10, {0: [2], 1: [6]})
    media = random_media(2, 1)
    grads, calls = [], []
    for checkpointing in (False, True):
        llm = tiny_llm("llama")
        adapter = insert_cross_attention(llm, every=2, num_heads=4)
        open_gates(adapter, 0.5)
        if checkpointing:
            llm.activation_checkpointing_enable()
        llm.train()
        count = [0]
        # a pre-hook: the recompute stops early (torch checkpoint early stop), before forward hooks
        adapter.blocks[0].register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1))
        with adapter.media(media, None, media_index_from_ids(ids, IMG)):
            llm(input_ids=ids).logits.square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in llm.named_parameters() if p.grad is not None})
        calls.append(count[0])
    assert calls == [1, 2]  # checkpointed: the block runs again in the backward
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["last", "all"])
def test_kv_cache_decoding_matches_a_full_forward(family, mode):
    llm = tiny_llm(family)
    adapter = insert_cross_attention(llm, every=2, num_heads=4, mode=mode)
    open_gates(adapter)
    # row 0: one image in the prompt, one more marker while decoding; row 1: its image only while decoding
    length, prompt = 12, 6
    ids = text_ids(2, length, {0: [1, 8], 1: [9]})
    media = random_media(2, 2)
    mask = torch.tensor([[True, True], [True, False]])
    full = logits_with(llm, adapter, ids, media, mask)

    cache = DynamicCache(config=llm.config)
    steps = []
    with torch.no_grad(), adapter.media(media, mask, media_index_from_ids(ids[:, :prompt], IMG)):
        steps.append(llm(input_ids=ids[:, :prompt], cache=cache, use_cache=True).logits)
        seen = (ids[:, :prompt] == IMG).sum(1)
        for t in range(prompt, length):
            step_ids = ids[:, t : t + 1]
            step_index = media_index_from_ids(step_ids, IMG, offset=seen)  # [B, 1]
            seen = step_index[:, -1]
            adapter.set_media_index(step_index)
            steps.append(llm(input_ids=step_ids, cache=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    # the decoded positions really used the images (else this test would prove nothing)
    assert (full[0, 8:] - plain_logits(llm, ids)[0, 8:]).abs().amax() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_parameter_names_and_ownership(family):
    llm = tiny_llm(family, layers=4)
    before = {n for n, _ in llm.named_parameters()}
    adapter = insert_cross_attention(llm, every=3, num_heads=4)
    assert adapter.layer_indices == (0, 3)
    layers = llm.model.layers
    assert [isinstance(layer, CrossAttentionDecoderLayer) for layer in layers] == [True, False, False, True]
    # the wrapper reads the original layer's attributes (Qwen2's model reads attention_type)
    assert layers[0].self_attn is layers[0].layer.self_attn
    names = {n for n, _ in llm.named_parameters()}
    block_names = {
        "alpha_attn", "alpha_ffn", "attn_norm.weight", "attn_norm.bias",
        "attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight", "attn.o_proj.weight",
        "ffn_norm.weight", "ffn_norm.bias", "ffn.up_proj.weight", "ffn.down_proj.weight",
    }  # fmt: skip
    expected = set()
    for name in before:
        for i in (0, 3):
            prefix = f"model.layers.{i}."
            if name.startswith(prefix):
                name = prefix + "layer." + name[len(prefix) :]
        expected.add(name)
    for i in (0, 3):
        expected |= {f"model.layers.{i}.xattn.{b}" for b in block_names}
    assert names == expected
    assert "model.layers.0.layer.self_attn.q_proj.weight" in names
    assert "model.layers.1.self_attn.q_proj.weight" in names
    # the adapter owns the same tensors the LM runs
    llm_params = dict(llm.named_parameters())
    for n, block in enumerate(adapter.blocks):
        for b, p in block.named_parameters():
            assert p is llm_params[f"model.layers.{adapter.layer_indices[n]}.xattn.{b}"]
    with pytest.raises(ValueError, match="already"):
        insert_cross_attention(llm, every=1, num_heads=4)
