"""Chunked cross-entropy: the same loss and gradients as the full logits, without holding them."""

from __future__ import annotations

import pytest
import torch
from _model_helpers import left_pad, tiny_tokenizer

from vlmkit.config import ModelConfig
from vlmkit.models.vlm import VisionLanguageModel
from vlmkit.train.losses import chunked_next_token_loss, next_token_loss


@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_chunked_equals_full_on_random_states(chunk):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 7, 16, generator=g, requires_grad=True)
    head = torch.nn.Linear(16, 11)
    labels = torch.tensor([[-100, 3, 4, -100, 5, 6, 7], [-100, -100, 1, 2, -100, -100, 9]])
    full_sum, full_n = next_token_loss(head(hidden), labels)
    full_sum.backward()
    want = (hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone())
    hidden.grad = head.weight.grad = head.bias.grad = None
    got_sum, got_n = chunked_next_token_loss(hidden, labels, head, chunk)
    got_sum.backward()
    assert int(got_n) == int(full_n) == 8  # after the shift: 5 targets in row 0, 3 in row 1
    torch.testing.assert_close(got_sum, full_sum, rtol=1e-6, atol=1e-5)
    for a, b in zip((hidden.grad, head.weight.grad, head.bias.grad), want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fusion", ["splice", "cross_attention"])
def test_vlm_chunked_loss_and_gradients_match(fusion):
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    cfg = ModelConfig.model_validate({"vision": {"name": "tiny-cnn", "image_size": 32},
                                      "connector": {"fusion": fusion},
                                      "llm": {"name": "tiny-llama", "overrides": {"num_hidden_layers": 2}}})  # fmt: skip
    model = VisionLanguageModel.from_config(cfg, tok)
    if fusion == "cross_attention":
        with torch.no_grad():
            for block in model.cross_attention.blocks:
                block.alpha_attn.fill_(0.5)
    img = [model.image_token_id] * model.tokens_per_image
    ids, mask = left_pad([[6, *img, 7, 8, 9, 10], [11, 12, 13]])
    labels = ids.masked_fill(mask == 0, -100)
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    model.eval()  # BatchNorm in the tiny CNN: the same statistics for both passes

    def grads(**kw):
        model.zero_grad(set_to_none=True)
        out = model(ids, mask, pixels, labels, **kw)
        out.loss_sum.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    full, g_full = grads()
    chunked, g_chunk = grads(loss_chunk_tokens=2)
    assert chunked.logits is None and int(chunked.n_targets) == int(full.n_targets)
    torch.testing.assert_close(chunked.loss_sum, full.loss_sum, rtol=1e-6, atol=1e-5)
    assert g_full.keys() == g_chunk.keys()
    for name in g_full:
        torch.testing.assert_close(g_chunk[name], g_full[name], rtol=1e-4, atol=1e-6)


def test_a_stage_with_chunked_loss_logs_the_same_losses(tiny_world, tmp_path):
    from conftest import tiny_recipe_dict
    from vlmkit.config import recipe_from_dict
    from vlmkit.train.run import train
    from vlmkit.utils.io import read_jsonl

    def losses(chunk, out):
        tree = tiny_recipe_dict(steps=2)
        for stage in tree["stages"]:
            stage["loss_chunk_tokens"] = chunk
        train(recipe_from_dict(tree), data_dir=tiny_world, out_dir=tmp_path / out)
        return [r["loss"] for r in read_jsonl(tmp_path / out / "metrics.jsonl")]

    full, chunked = losses(None, "full"), losses(5, "chunked")
    assert len(full) == len(chunked) == 6
    assert chunked == pytest.approx(full, rel=1e-4)


def test_activation_checkpointing_gives_the_same_losses(tiny_world, tmp_path):
    from conftest import tiny_recipe_dict
    from vlmkit.config import recipe_from_dict
    from vlmkit.train.run import train
    from vlmkit.utils.io import read_jsonl

    def losses(on, out):
        tree = tiny_recipe_dict(steps=2)
        tree["model"]["vision"] = {"name": "tiny-vit", "image_size": 64}  # an encoder that supports it
        tree["train"] = {"activation_checkpointing": on}
        train(recipe_from_dict(tree), data_dir=tiny_world, out_dir=tmp_path / out)
        return [r["loss"] for r in read_jsonl(tmp_path / out / "metrics.jsonl")]

    assert losses(True, "ckpt") == pytest.approx(losses(False, "plain"), rel=1e-5)


def test_activation_checkpointing_recomputes_in_backward():
    from vlmkit.train.run import enable_activation_checkpointing

    torch.manual_seed(0)
    tok = tiny_tokenizer()
    cfg = ModelConfig.model_validate({"vision": {"name": "tiny-vit", "image_size": 32},
                                      "llm": {"name": "tiny-llama", "overrides": {"num_hidden_layers": 2}}})  # fmt: skip
    model = VisionLanguageModel.from_config(cfg, tok).train()
    assert enable_activation_checkpointing(model) == ["llm", "vision.0"]
    calls = []
    # transformers checkpoints a layer's forward (its own hooks stay outside), so watch a module
    # inside it; a pre-hook, because the non-reentrant recomputation may stop before a post-hook
    model.llm.model.layers[0].self_attn.register_forward_pre_hook(lambda *a: calls.append(1))
    ids, mask = left_pad([[6, *[model.image_token_id] * model.tokens_per_image, 7, 8]])
    out = model(ids, mask, torch.randn(1, 3, 32, 32), ids.clone())
    assert len(calls) == 1
    out.loss_sum.backward()
    assert len(calls) == 2  # the layer ran again in the backward pass


def test_auto_chunks_large_vocabularies_only():
    from vlmkit.train.losses import AUTO_CHUNK_MIN_VOCAB, AUTO_CHUNK_TOKENS, resolve_loss_chunk

    assert AUTO_CHUNK_MIN_VOCAB <= 49_152  # SmolLM2's vocabulary is chunked by default
    assert resolve_loss_chunk("auto", 49_152) == AUTO_CHUNK_TOKENS
    assert resolve_loss_chunk("auto", 540) is None  # the shapes world's tokenizer: full logits
    assert resolve_loss_chunk("auto", None) is None  # no LM head (a dual encoder)
    assert resolve_loss_chunk(7, 540) == 7 and resolve_loss_chunk(None, 151_936) is None


def test_a_large_vocabulary_stage_computes_its_loss_in_chunks_by_default(monkeypatch):
    """The default ``loss_chunk_tokens: auto``: a 40k-entry vocabulary gets the chunked loss,
    the tiny one the full logits; a stage can still turn it off."""
    from vlmkit.config import StageConfig
    from vlmkit.train import objectives
    from vlmkit.train.losses import AUTO_CHUNK_TOKENS

    tok = tiny_tokenizer()

    def model_with_vocab(vocab):
        cfg = ModelConfig.model_validate({"vision": {"name": "tiny-cnn", "image_size": 32},
                                          "llm": {"name": "tiny-llama", "overrides": {
                                              "num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64,
                                              "vocab_size": vocab}}})  # fmt: skip
        return VisionLanguageModel.from_config(cfg, tok)

    stage = StageConfig.model_validate({"name": "s", "data": {"x": 1.0}, "trainable": ["llm"], "lr": 1e-3, "steps": 1})
    assert stage.loss_chunk_tokens == "auto"
    big = objectives.make_objective(stage, model_with_vocab(40_000), run_dir=".")
    assert big.chunk == {"loss_chunk_tokens": AUTO_CHUNK_TOKENS}
    small = objectives.make_objective(stage, model_with_vocab(len(tok)), run_dir=".")
    assert small.chunk == {}
    off = stage.model_copy(update={"loss_chunk_tokens": None})
    assert objectives.make_objective(off, model_with_vocab(40_000), run_dir=".").chunk == {}


def test_chunked_loss_soft_caps_the_logits_as_gemma2_does(tmp_path):
    """Gemma 2 soft-caps its final logits (cap * tanh(logits / cap)): the chunked loss applies the
    same cap, so it equals the loss from the LM's own capped logits."""
    from transformers import AutoModelForCausalLM, Gemma2Config

    tok = tiny_tokenizer()
    cfg = Gemma2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16,
                       final_logit_softcapping=0.05)  # fmt: skip  below the random logits: it changes the loss
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").save_pretrained(tmp_path / "gemma2")
    model_cfg = ModelConfig.model_validate({"vision": {"name": "tiny-cnn", "image_size": 32},
                                            "llm": {"name": str(tmp_path / "gemma2"), "attn_implementation": "eager"}})  # fmt: skip
    model = VisionLanguageModel.from_config(model_cfg, tok).eval()
    ids, mask = left_pad([[6, 7, 8, 9, 10, 11], [12, 13, 14]])
    labels = ids.masked_fill(mask == 0, -100)
    full = model(ids, mask, None, labels)
    chunked = model(ids, mask, None, labels, loss_chunk_tokens=3)
    torch.testing.assert_close(chunked.loss_sum, full.loss_sum, rtol=1e-6, atol=1e-5)
    uncapped, _ = next_token_loss(model.llm.get_output_embeddings()(
        model.llm.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state), labels)  # fmt: skip
    assert abs(float(uncapped.detach()) - float(full.loss_sum.detach())) > 0.1  # the cap matters here


def test_a_row_without_targets_still_reaches_the_head_and_the_states():
    """A data-parallel rank can be left with a placeholder row and no target: its loss is zero
    but still a function of the head and the hidden states, so that every parameter gets a
    (zero) gradient and the gradient reduction sees the same parameters on every rank."""
    hidden = torch.randn(1, 4, 8, requires_grad=True)
    head = torch.nn.Linear(8, 5)
    loss_sum, n = chunked_next_token_loss(hidden, torch.full((1, 4), -100), head, 2)
    loss_sum.backward()
    assert int(n) == 0 and float(loss_sum.detach()) == 0.0
    assert hidden.grad is not None and head.weight.grad is not None
    assert not hidden.grad.any() and not head.weight.grad.any()
