import pytest
import torch
import torch.nn.functional as F
from _model_helpers import left_pad, make_model, prompt_ids, tiny_model_config, tiny_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from vlmkit.config import ModelConfig
from vlmkit.models.vlm import ImageTokenMismatch, VisionLanguageModel, resize_embeddings_mean_init
from vlmkit.train.losses import next_token_loss


@pytest.fixture(scope="module")
def model_tok():
    return make_model(seed=0)


def _images(n, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 64, 64, generator=g)


def test_parts_and_shapes(model_tok):
    model, tok = model_tok
    assert set(model.parts()) == {"vision", "connector", "llm"}
    assert model.tokens_per_image == 16
    assert model.image_token_id == tok.convert_tokens_to_ids("<image>")
    assert model.llm.config.vocab_size == len(tok)


def test_splice_puts_features_exactly_at_image_positions(model_tok):
    model, _ = model_tok
    k = model.tokens_per_image
    img = [model.image_token_id] * k
    row0 = [6, 7] + img + [8] + img + [9]  # two images
    row1 = [10] + img + [11, 12]  # one image
    ids, mask = left_pad([row0, row1])
    pv = _images(3)
    with torch.no_grad():
        emb = model.embed(ids, pv)
        feats = model.encode_images(pv)
        tok_emb = model.llm.get_input_embeddings()(ids)
    is_img = ids == model.image_token_id
    assert torch.equal(emb[~is_img], tok_emb[~is_img])
    pos0 = is_img[0].nonzero().flatten()
    pos1 = is_img[1].nonzero().flatten()
    assert torch.equal(emb[0, pos0[:k]], feats[0])
    assert torch.equal(emb[0, pos0[k:]], feats[1])
    assert torch.equal(emb[1, pos1], feats[2])


def test_count_mismatch_names_the_sample(model_tok):
    model, _ = model_tok
    k = model.tokens_per_image
    ok = prompt_ids(model, [1, 2], n_images=1)
    ids, mask = left_pad([ok, ok])
    with pytest.raises(ImageTokenMismatch, match="2 image.*1 image.*sample-a: 1, sample-b: 1"):
        model.embed(ids, _images(1), sample_ids=["sample-a", "sample-b"])
    # a row with a partial run of image tokens is named
    broken = [model.image_token_id] * (k - 3) + [5, 6]
    ids, mask = left_pad([ok, broken])
    with pytest.raises(ImageTokenMismatch, match="sample-b") as err:
        model.embed(ids, _images(2), sample_ids=["sample-a", "sample-b"])
    assert "sample-a" not in str(err.value)
    # two runs of k/2 tokens: the right count, but not whole runs
    half = [model.image_token_id] * (k // 2)
    split = half + [5] + half
    ids, mask = left_pad([split])
    with pytest.raises(ImageTokenMismatch, match="row 0"):
        model.embed(ids, _images(1))
    # image tokens but no images at all
    ids, mask = left_pad([ok])
    with pytest.raises(ImageTokenMismatch):
        model(ids, mask, None)


def test_text_only_batch(model_tok):
    model, _ = model_tok
    ids, mask = left_pad([[5, 6, 7], [8, 9]])
    out = model(ids, mask)
    assert out.logits.shape == (2, 3, model.llm.config.vocab_size)
    assert out.loss_sum is None and out.n_targets is None


def test_left_padded_batch_matches_single_rows(model_tok):
    model, _ = model_tok
    rows = [prompt_ids(model, [1, 2, 3, 4], 1), prompt_ids(model, [5], 1), prompt_ids(model, [6, 7, 8], 0)]
    pv = _images(2)
    images_of = [pv[0:1], pv[1:2], None]
    ids, mask = left_pad(rows)
    with torch.no_grad():
        batch = model(ids, mask, pv).logits
        for r, row in enumerate(rows):
            single = model(torch.tensor([row]), torch.ones(1, len(row), dtype=torch.long), images_of[r]).logits[0]
            real = batch[r, ids.shape[1] - len(row) :]
            assert torch.allclose(real, single, atol=1e-5), r


def test_loss_sum_and_targets_by_hand(model_tok):
    model, _ = model_tok
    rows = [prompt_ids(model, [1, 2, 3], 1), prompt_ids(model, [4, 5], 0)]
    ids, mask = left_pad(rows)
    labels = ids.clone()
    labels[mask == 0] = -100
    labels[0, :-2] = -100  # row 0: only the last two tokens are targets
    pv = _images(1)
    out = model(ids, mask, pv, labels=labels)
    logp = F.log_softmax(out.logits.detach().double(), -1)
    total, n = 0.0, 0
    for b in range(ids.shape[0]):
        for t in range(1, ids.shape[1]):
            if labels[b, t] != -100:
                total -= float(logp[b, t - 1, labels[b, t]])
                n += 1
    assert n == 2 + 2  # row 0: its last two tokens; row 1: both real tokens (the first follows a pad)
    assert int(out.n_targets) == n
    assert out.loss_sum.item() == pytest.approx(total, rel=1e-5)
    out.loss_sum.backward()  # the sum is differentiable through the connector
    assert model.connector.projector.layers[0].weight.grad is not None
    model.zero_grad()


def test_next_token_loss_all_ignored_is_zero():
    loss, n = next_token_loss(torch.randn(2, 4, 7), torch.full((2, 4), -100))
    assert float(loss) == 0.0 and int(n) == 0


def test_resize_embeddings_mean_init_tied(tmp_path):
    tok = tiny_tokenizer()  # 65 tokens
    torch.manual_seed(0)
    base = LlamaForCausalLM(
        LlamaConfig(vocab_size=60, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
    )
    base.save_pretrained(tmp_path)
    old = base.get_input_embeddings().weight.detach().clone()
    cfg = ModelConfig.model_validate({"llm": {"name": str(tmp_path)}})
    model = VisionLanguageModel.from_config(cfg, tok)
    emb = model.llm.get_input_embeddings().weight
    assert emb.shape == (65, 32) and model.llm.config.vocab_size == 65
    assert torch.equal(emb[:60], old)
    assert torch.allclose(emb[60:], old.mean(0).expand(5, -1))
    assert model.llm.get_output_embeddings().weight is emb  # still tied
    ids, mask = left_pad([prompt_ids(model, [1], 1)])
    assert model(ids, mask, _images(1)).logits.shape[-1] == 65


def test_resize_embeddings_mean_init_untied():
    torch.manual_seed(0)
    llm = LlamaForCausalLM(
        LlamaConfig(vocab_size=10, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    )
    old_in = llm.get_input_embeddings().weight.detach().clone()
    old_out = llm.get_output_embeddings().weight.detach().clone()
    resize_embeddings_mean_init(llm, 13)
    assert torch.allclose(llm.get_input_embeddings().weight[10:], old_in.mean(0).expand(3, -1))
    assert torch.allclose(llm.get_output_embeddings().weight[10:], old_out.mean(0).expand(3, -1))
    assert torch.equal(llm.get_output_embeddings().weight[:10], old_out)
    assert llm(torch.tensor([[12, 3]])).logits.shape == (1, 2, 13)


def test_output_norm_puts_images_on_text_scale():
    tok = tiny_tokenizer()
    cfg = tiny_model_config()
    cfg.connector.output_norm = True
    model, _ = make_model(cfg=cfg, tokenizer=tok)
    text_rms = model.llm.get_input_embeddings().weight.pow(2).mean().sqrt()
    with torch.no_grad():
        img = model.encode_images(_images(2))
    assert torch.allclose(img.pow(2).mean(-1).sqrt(), text_rms.expand(2, 16), rtol=1e-3)


def test_tiny_llama_overrides_shape_the_attention_heads():
    """Overriding the width re-derives the head size (it once stayed at the preset's 32)."""
    from _model_helpers import tiny_tokenizer
    from vlmkit.models.vlm import tiny_llama_config

    cfg = tiny_llama_config(tiny_tokenizer(), {"hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2})
    assert cfg.head_dim == 64
    from transformers import LlamaForCausalLM

    attn = LlamaForCausalLM(cfg).model.layers[0].self_attn
    assert tuple(attn.q_proj.weight.shape) == (256, 256) and tuple(attn.k_proj.weight.shape) == (128, 256)
    with pytest.raises(ValueError, match="no field 'hidden_sise'"):
        tiny_llama_config(tiny_tokenizer(), {"hidden_sise": 256})
