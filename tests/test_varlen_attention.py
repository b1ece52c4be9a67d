"""The varlen attention backend (models/varlen_attention.py): segment lengths from packed
position ids, the per-segment reference against SDPA's block-diagonal mask, the kernel call
adapted to PyTorch's signatures, and a varlen model that decodes as an SDPA one does."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from _model_helpers import make_model, tiny_model_config
from vlmkit.data.packing import pack_collate
from vlmkit.models import varlen_attention
from vlmkit.models.varlen_attention import packed_segments, reference_varlen


def test_packed_segments_by_hand():
    # row 0: samples of 3 and 2 tokens, then 1 padding token; row 1: 4 tokens, 2 padding
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]])
    cu, max_len = packed_segments(pos)
    assert cu.tolist() == [0, 3, 5, 6, 10, 12]
    assert cu.dtype == torch.int32
    assert max_len == 4


def test_packed_segments_rejects_rows_that_do_not_start_at_zero():
    try:
        packed_segments(torch.tensor([[1, 2, 0, 1]]))
    except ValueError as e:
        assert "start every row at 0" in str(e)
    else:
        raise AssertionError("expected a ValueError")


def test_reference_equals_sdpa_with_a_block_diagonal_mask_gqa_included():
    g = torch.Generator().manual_seed(0)
    lengths, heads, kv_heads, dim = [5, 1, 7, 3], 4, 2, 8
    n = sum(lengths)
    q = torch.randn(n, heads, dim, generator=g)
    k, v = torch.randn(n, kv_heads, dim, generator=g), torch.randn(n, kv_heads, dim, generator=g)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    out = reference_varlen(q, k, v, cu, scale=dim**-0.5)
    seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    mask = (seg[:, None] == seg[None, :]) & torch.ones(n, n, dtype=torch.bool).tril()
    expected = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1).repeat_interleave(2, 0),
                                              v.transpose(0, 1).repeat_interleave(2, 0), attn_mask=mask)  # fmt: skip
    torch.testing.assert_close(out, expected.transpose(0, 1), rtol=1e-5, atol=1e-6)


def _fake_kernel(params: str):
    """A stand-in for torch's varlen_attn with an older (is_causal) or newer (window_size,
    enable_gqa) keyword set; records what it was given and runs the reference."""
    calls = []

    def kernel(q, k, v, cu_q, cu_k, max_q, max_k, **kw):
        calls.append({"kw": kw, "kv_heads": k.shape[1], "max": (max_q, max_k)})
        return reference_varlen(q, k, v, cu_q, kw["scale"]) if k.shape[1] == q.shape[1] else torch.zeros_like(q)

    names = frozenset(["query", "key", "value", "scale", *params.split()])
    return (kernel, names), calls


def test_kernel_call_follows_the_installed_signature(monkeypatch):
    q = torch.randn(6, 4, 8, dtype=torch.bfloat16)
    k = v = torch.randn(6, 2, 8, dtype=torch.bfloat16)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    old, old_calls = _fake_kernel("is_causal")
    monkeypatch.setattr(varlen_attention, "_torch_varlen", lambda: old)
    out = varlen_attention._cuda_varlen(q, k, v, cu, 4, 0.5)
    assert old_calls[0]["kw"] == {"scale": 0.5, "is_causal": True}
    assert old_calls[0]["kv_heads"] == 4  # no GQA in that kernel: the kv heads were repeated
    torch.testing.assert_close(out, reference_varlen(q, k, v, cu, 0.5))
    new, new_calls = _fake_kernel("window_size enable_gqa")
    monkeypatch.setattr(varlen_attention, "_torch_varlen", lambda: new)
    varlen_attention._cuda_varlen(q, k, v, cu, 4, 0.5)
    assert new_calls[0]["kw"] == {"scale": 0.5, "window_size": (-1, 0), "enable_gqa": True}
    assert new_calls[0]["kv_heads"] == 2 and new_calls[0]["max"] == (4, 4)


def _varlen_model():
    cfg = tiny_model_config()
    cfg = cfg.model_copy(update={"llm": cfg.llm.model_copy(update={"attn_implementation": "varlen"})})
    return make_model(cfg=cfg)


def test_packed_forward_goes_through_the_segments_once_per_layer(monkeypatch):
    model, _ = _varlen_model()
    seen = []
    real = varlen_attention.bucketed_varlen
    monkeypatch.setattr(varlen_attention, "bucketed_varlen", lambda q, k, v, cu, scale: seen.append(cu) or real(q, k, v, cu, scale))
    items = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    from vlmkit.data.template import Encoded

    enc = [Encoded(input_ids=ids, labels=ids, n_images=0, sample_id=str(i)) for i, ids in enumerate(items)]
    batch = pack_collate(enc, [[] for _ in enc], pad_id=0, max_tokens=16)
    with torch.no_grad():
        model(batch["input_ids"], batch["attention_mask"], None, labels=batch["labels"], position_ids=batch["position_ids"])
    assert len(seen) == model.llm.config.num_hidden_layers
    assert seen[0].tolist() == [0, 4, 6, 9]  # one row of 9 tokens: no trailing padding


def test_a_varlen_model_decodes_like_an_sdpa_model(tmp_path):
    """Generation (KV cache, left padding) takes the SDPA branch: same weights, same tokens;
    and the attention choice survives a checkpoint round trip."""
    from vlmkit.models.checkpoint_io import load_checkpoint, save_checkpoint

    varlen, tok = _varlen_model()
    sdpa, _ = make_model()  # same seed: same weights
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    a = varlen.generate(ids, mask, max_new_tokens=6)
    b = sdpa.generate(ids, mask, max_new_tokens=6)
    assert a == b and all(len(r) == 6 for r in a)
    path = save_checkpoint(varlen, tok, tmp_path / "ckpt")
    loaded, _ = load_checkpoint(path)
    assert loaded.config.llm.attn_implementation == "varlen"
    assert loaded.llm.config._attn_implementation == varlen_attention.NAME


def test_kernel_gets_half_precision_and_an_fp32_model_gets_fp32_back(monkeypatch):
    seen = []

    def kernel(q, k, v, cu_q, cu_k, max_q, max_k, **kw):
        seen.append(q.dtype)
        return reference_varlen(q.float(), k.float(), v.float(), cu_q, kw["scale"]).to(q.dtype)

    monkeypatch.setattr(varlen_attention, "_torch_varlen", lambda: (kernel, frozenset(["scale", "window_size"])))
    q = k = v = torch.randn(5, 2, 4)
    out = varlen_attention._cuda_varlen(q, k, v, torch.tensor([0, 5], dtype=torch.int32), 5, 0.5)
    assert seen == [torch.bfloat16] and out.dtype == torch.float32
    torch.testing.assert_close(out, reference_varlen(q, k, v, torch.tensor([0, 5]), 0.5), atol=2e-2, rtol=2e-2)


def test_packed_varlen_refuses_sliding_windows_and_soft_capping():
    """Mistral passes ``sliding_window`` and Gemma 2 ``softcap`` to the attention function; the
    varlen path would silently ignore them, so it refuses."""
    q = k = v = torch.randn(1, 2, 4, 8)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    for option, value in (("sliding_window", 2), ("softcap", 30.0)):
        try:
            varlen_attention.varlen_attention_forward(None, q, k, v, None, cu_seq_lens_q=cu, max_length_q=4,
                                                      **{option: value})  # fmt: skip
        except ValueError as e:
            assert option in str(e)
        else:
            raise AssertionError(f"{option} was not refused")
    out, _ = varlen_attention.varlen_attention_forward(None, q, k, v, None, cu_seq_lens_q=cu, max_length_q=4,
                                                       sliding_window=None)  # fmt: skip
    assert out.shape == (1, 4, 2, 8)


def test_bucketed_varlen_equals_the_per_segment_reference_values_and_gradients():
    """The CPU path groups segments of similar length (padded on the right) into one SDPA call
    each; lengths here span several buckets, with grouped-query heads and one-token segments.
    Padded slots must not send gradient anywhere: a padded query attends to its segment's keys."""
    torch.manual_seed(0)
    lengths = torch.tensor([5, 1, 24, 40, 3, 33, 20, 1, 31, 9])
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    n = int(cu[-1])
    q = torch.randn(n, 4, 8, requires_grad=True)
    k = torch.randn(n, 2, 8, requires_grad=True)
    v = torch.randn(n, 2, 8, requires_grad=True)
    plan = varlen_attention._bucket_plan(tuple(cu.tolist()), "cpu")
    assert 1 < len(plan.buckets) < len(cu) - 1  # segments were grouped, and not all into one bucket
    assert plan.padding.numel() > 0  # and some buckets are padded
    fast = varlen_attention.bucketed_varlen(q, k, v, cu, scale=0.3)
    slow = reference_varlen(q, k, v, cu, scale=0.3)
    torch.testing.assert_close(fast, slow)
    g = torch.randn_like(fast)
    for a, b in zip(torch.autograd.grad(fast, (q, k, v), g), torch.autograd.grad(slow, (q, k, v), g)):
        torch.testing.assert_close(a, b)


def _auto_inputs():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 9, 4), torch.randn(1, 2, 9, 4), torch.randn(1, 2, 9, 4)
    return q, k, v, torch.tensor([0, 4, 9], dtype=torch.int32)


class _Attention(torch.nn.Module):
    is_causal = True
    num_key_value_groups = 1


def test_auto_uses_the_mask_on_cpu_and_the_kernel_where_it_exists(monkeypatch):
    """``attn_implementation: auto`` (the default): on a CPU, packed rows are SDPA with the mask
    transformers built (the per-group path is never taken); with a varlen kernel, the kernel;
    with a sliding window (which the kernel call does not implement), the mask again."""
    q, k, v, cu = _auto_inputs()
    mask = torch.zeros(1, 1, 9, 9, dtype=torch.bool)
    mask[..., :4, :4] = torch.ones(4, 4).tril().bool()
    mask[..., 4:, 4:] = torch.ones(5, 5).tril().bool()
    monkeypatch.setattr(varlen_attention, "bucketed_varlen", lambda *a: pytest.fail("auto took the CPU varlen path"))
    out, _ = varlen_attention.auto_attention_forward(_Attention(), q, k, v, mask, scaling=0.5, cu_seq_lens_q=cu,
                                                     max_length_q=5, cu_seq_lens_k=cu, max_length_k=5)  # fmt: skip
    expected = reference_varlen(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu, 0.5)
    torch.testing.assert_close(out[0], expected)  # [T, H, D]: the block-diagonal mask did its job

    calls = []
    monkeypatch.setattr(varlen_attention, "_kernel_available", lambda q: True)
    monkeypatch.setattr(varlen_attention, "_cuda_varlen", lambda q, k, v, cu, n, scale: calls.append(n) or q)
    varlen_attention.auto_attention_forward(_Attention(), q, k, v, mask, scaling=0.5, cu_seq_lens_q=cu, max_length_q=5)
    assert calls == [5]
    varlen_attention.auto_attention_forward(_Attention(), q, k, v, mask, scaling=0.5, cu_seq_lens_q=cu, max_length_q=5,
                                            sliding_window=3)  # fmt: skip
    assert calls == [5]  # not called again


def test_packed_attention_is_named_for_the_logs(monkeypatch):
    from transformers import MistralConfig

    from vlmkit.models.varlen_attention import packed_attention

    assert "block-diagonal mask" in packed_attention("auto", torch.device("cpu"))
    assert "group" in packed_attention("varlen", torch.device("cpu"))
    monkeypatch.setattr(varlen_attention, "_torch_varlen", lambda: (None, frozenset()))
    assert "varlen kernel" in packed_attention("auto", torch.device("cuda"))
    assert "block-diagonal mask" in packed_attention("sdpa", torch.device("cuda"))
    windowed = MistralConfig(sliding_window=16)
    assert "block-diagonal mask" in packed_attention("auto", torch.device("cuda"), windowed)


def test_long_masked_rows_without_the_kernel_get_a_hint(monkeypatch):
    """The stage log suggests ``varlen`` where the masked rows are long and no kernel exists,
    and stays quiet where the advice would be wrong (the kernel, short rows, sliding windows)."""
    from transformers import MistralConfig

    from vlmkit.models.varlen_attention import packed_attention_hint

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert "varlen" in packed_attention_hint("auto", cpu, 1024)
    assert "varlen" in packed_attention_hint("sdpa", cpu, 512)
    assert packed_attention_hint("auto", cpu, 256) is None
    assert packed_attention_hint("varlen", cpu, 1024) is None
    assert packed_attention_hint("eager", cpu, 1024) is None
    assert packed_attention_hint("auto", cpu, 1024, MistralConfig(sliding_window=16)) is None
    monkeypatch.setattr(varlen_attention, "_torch_varlen", lambda: (None, frozenset()))
    assert packed_attention_hint("auto", cuda, 4096) is None  # auto takes the kernel there
    assert "varlen" in packed_attention_hint("sdpa", cuda, 4096)


def test_segments_are_computed_only_where_they_are_read(monkeypatch):
    """``auto`` on a CPU attends packed rows through the mask, so its forward skips
    ``packed_segments`` (a host sync); ``varlen`` always reads them, and so does ``auto`` where
    the kernel exists."""
    from vlmkit.models.varlen_attention import wants_segments

    monkeypatch.setattr(varlen_attention, "_torch_varlen", lambda: None)
    assert not wants_segments("auto", torch.device("cpu"))
    assert not wants_segments("auto", torch.device("cuda"))
    assert not wants_segments("sdpa", torch.device("cpu"))
    assert wants_segments("varlen", torch.device("cpu"))
    monkeypatch.setattr(varlen_attention, "_torch_varlen", lambda: (None, frozenset()))
    assert wants_segments("auto", torch.device("cuda"))
    assert not wants_segments("auto", torch.device("cpu"))


def test_compiled_blocks_do_not_recompile_for_each_batch_of_the_cpu_varlen_path():
    """``train.compile`` with ``varlen`` on a CPU: the grouping plan is data-dependent Python, so
    dynamo must leave ``bucketed_varlen`` alone; traced, every batch's segment lengths were baked
    into a new graph (7.5 samples/s against 90 in bench/train_throughput.py)."""
    import torch._dynamo

    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def block(q, k, v, cu):
        return varlen_attention.bucketed_varlen(q * 2, k, v, cu, 0.5) + 1

    torch._dynamo.reset()
    compiled = torch.compile(block, backend=counting_backend, dynamic=True)
    g = torch.Generator().manual_seed(0)
    layouts = [[0, 5, 12, 30], [0, 9, 10, 30], [0, 3, 17, 22, 30], [0, 30], [0, 14, 15, 16, 30]]
    for bounds in layouts:
        q, k, v = (torch.randn(30, 2, 4, generator=g) for _ in range(3))
        cu = torch.tensor(bounds)
        torch.testing.assert_close(compiled(q, k, v, cu), reference_varlen(q * 2, k, v, cu, 0.5) + 1)
    assert len(graphs) <= 3  # the code before and after the call, once; not once per layout
    torch._dynamo.reset()
