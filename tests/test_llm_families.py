"""Real LLM families through the real loading path (docs/encoders.md, "LLM families").

Each family is a tiny random model saved with ``save_pretrained`` next to a tokenizer, then
loaded as a recipe naming a local LLM would load it (``train/run.py``): the tokenizer with
``load_tokenizer(dir)`` (``model.tokenizer`` is the directory, not ``"tiny"``) and the model with
``VisionLanguageModel.from_config``.

Tokenizers, one per situation ``load_tokenizer`` handles:

* qwen2 -- byte-level BPE with ChatML control tokens and its own chat template (a default
  system prompt), no ``<image>``: one token added. transformers 5 always loads a qwen2
  directory's tokenizer as ``Qwen2Tokenizer``, which rebuilds a byte-level BPE from the vocab
  and merges, so a word-level tokenizer would lose its words there; a byte-level BPE is also
  what Qwen ships.
* gemma -- word-level with Gemma's turn tokens and a Gemma-style template (tied embeddings),
  no ``<image>``: one token added.
* gemma2 -- ``_model_helpers.tiny_tokenizer`` as it is (it has ``<image>`` and the ChatML
  tokens) and no chat template: nothing added, the default template set.
* mistral -- a base model's word-level tokenizer (``<s>``, ``</s>``, ``<unk>``; no pad, no
  template, no ``<image>``; untied embeddings): ``<|im_start|>``, ``<|im_end|>`` and
  ``<image>`` added, the default ChatML template set, eos used as the pad token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from _model_helpers import tiny_tokenizer
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    GemmaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from vlmkit.config import ConfigError, ModelConfig
from vlmkit.data.collate import collate
from vlmkit.data.packing import pack_collate
from vlmkit.data.sample import ImageRef, Part, Sample, Turn
from vlmkit.data.template import ChatTemplate
from vlmkit.data.tokenizer import DEFAULT_CHAT_TEMPLATE, load_tokenizer
from vlmkit.models.checkpoint_io import load_checkpoint, save_checkpoint
from vlmkit.models.vlm import VisionLanguageModel

IMAGE_SIZE = 32  # tiny-cnn: a 2x2 grid, 4 tokens per image
N_WORDS = 40
ROLE_WORDS = ["system", "user", "assistant", "model"]

QWEN_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
GEMMA_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{- '<start_of_turn>' + role + '\\n' + message['content'] + '<end_of_turn>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}"
)


def word_tokenizer(specials: list[str], **kwargs) -> PreTrainedTokenizerFast:
    """Like ``_model_helpers.tiny_tokenizer`` with other special tokens: ``specials`` first, then
    the role words, ``w0 .. w{N_WORDS-1}`` and ``<unk>``."""
    vocab = {tok: i for i, tok in enumerate(specials)}
    for word in ROLE_WORDS + [f"w{i}" for i in range(N_WORDS)]:
        vocab[word] = len(vocab)
    vocab["<unk>"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", **kwargs)


def byte_bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A Qwen-like byte-level BPE: ``<|endoftext|>`` (pad), ``<|im_start|>``, ``<|im_end|>`` (eos)."""
    corpus = [" ".join(f"w{(i * 7 + j) % N_WORDS}" for j in range(8)) for i in range(60)]
    corpus += ["system\nuser\nassistant\nYou are a helpful assistant.\n"] * 10
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=["<|im_start|>"],
    )


@dataclass
class Family:
    config_class: type
    make_tokenizer: object
    chat_template: str | None  # the model's own template; None: a base model
    n_added: int  # what load_tokenizer adds
    end_of_turn: str
    extra: dict
    attn: str = "auto"  # llm.attn_implementation (the default); Gemma2 (logit soft-capping) has no sdpa path


FAMILIES: dict[str, Family] = {
    "qwen2": Family(Qwen2Config, byte_bpe_tokenizer, QWEN_TEMPLATE, 1, "<|im_end|>", {"tie_word_embeddings": False}),
    "gemma": Family(
        GemmaConfig,
        lambda: word_tokenizer(
            ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
            pad_token="<pad>",
            eos_token="<eos>",
            bos_token="<bos>",
            extra_special_tokens=["<start_of_turn>", "<end_of_turn>"],
        ),
        GEMMA_TEMPLATE,
        1,
        "<end_of_turn>",
        {},  # tied embeddings (Gemma's default)
    ),
    "gemma2": Family(Gemma2Config, tiny_tokenizer, None, 0, "<|im_end|>", {"query_pre_attn_scalar": 16}, "eager"),
    "mistral": Family(
        MistralConfig,
        lambda: word_tokenizer(["<s>", "</s>"], bos_token="<s>", eos_token="</s>"),
        None,
        3,
        "<|im_end|>",
        {"tie_word_embeddings": False},
    ),
}


@dataclass
class Loaded:
    name: str
    family: Family
    llm_dir: object
    hf: torch.nn.Module  # the LLM as saved
    raw_len: int  # the saved tokenizer's size
    tokenizer: object
    n_added: int
    model: VisionLanguageModel


@pytest.fixture(scope="module", params=list(FAMILIES))
def loaded(request, tmp_path_factory) -> Loaded:
    name = request.param
    fam = FAMILIES[name]
    raw = fam.make_tokenizer()
    if fam.chat_template:
        raw.chat_template = fam.chat_template
    llm_dir = tmp_path_factory.mktemp(name)
    cfg = fam.config_class(
        vocab_size=len(raw),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        pad_token_id=raw.pad_token_id,
        bos_token_id=raw.bos_token_id,
        eos_token_id=raw.eos_token_id,
        **fam.extra,
    )
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg).eval()
    hf.save_pretrained(llm_dir)
    raw.save_pretrained(llm_dir)
    assert not (llm_dir / "chat_template.jinja").exists() or fam.chat_template

    # as train/run.py does for a recipe whose model.tokenizer is not "tiny"
    model_cfg = ModelConfig.model_validate(
        {
            "vision": {"name": "tiny-cnn", "image_size": IMAGE_SIZE},
            "llm": {"name": str(llm_dir), "attn_implementation": fam.attn},
            "tokenizer": str(llm_dir),
        }
    )
    tokenizer, n_added = load_tokenizer(model_cfg.tokenizer)
    torch.manual_seed(1)
    model = VisionLanguageModel.from_config(model_cfg, tokenizer)
    return Loaded(name, fam, llm_dir, hf, len(raw), tokenizer, n_added, model)


def _sample(n_images: int, sid: str) -> Sample:
    user = [Part(image=i) for i in range(n_images)] + [Part(text=" w1 w2 w3")]
    return Sample(
        id=sid,
        turns=[Turn("user", user), Turn.of_text("assistant", "w4 w5"), Turn.of_text("user", "w6"),
               Turn.of_text("assistant", "w7")],  # fmt: skip
        images=[ImageRef(path=f"{sid}-{i}.png") for i in range(n_images)],
    )


def _batch(model, tokenizer, image_counts: list[int], seed: int = 0) -> dict:
    template = ChatTemplate(tokenizer)
    items = [
        template.encode_for_training(_sample(n, f"s{row}"), model.tokens_per_image)
        for row, n in enumerate(image_counts)
    ]
    g = torch.Generator().manual_seed(seed)
    n = sum(image_counts)
    pixels = [torch.randn(3, IMAGE_SIZE, IMAGE_SIZE, generator=g) for _ in range(n)]
    return collate(items, pixels or None, template.pad_token_id)


def test_tokenizer_is_made_vlm_ready(loaded):
    tok, fam = loaded.tokenizer, loaded.family
    assert loaded.n_added == fam.n_added and len(tok) == loaded.raw_len + fam.n_added
    if fam.chat_template is None:  # a base model: the default ChatML template and its tokens
        assert tok.chat_template == DEFAULT_CHAT_TEMPLATE
        for t in ("<|im_start|>", "<|im_end|>"):
            assert tok(t, add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids(t)]
    else:
        assert tok.chat_template == fam.chat_template
    assert tok.pad_token is not None
    if loaded.name == "mistral":
        assert tok.pad_token == tok.eos_token == "</s>"
    image_id = tok.convert_tokens_to_ids("<image>")
    assert tok("w1<image>w2", add_special_tokens=False)["input_ids"].count(image_id) == 1
    assert loaded.model.image_token_id == image_id
    template = ChatTemplate(tok)
    assert template.end_of_turn_id == tok.convert_tokens_to_ids(fam.end_of_turn)


def test_added_tokens_resize_embeddings_with_the_mean(loaded):
    llm, hf, old = loaded.model.llm, loaded.hf, loaded.raw_len
    n_new = len(loaded.tokenizer)
    assert llm.config.vocab_size == n_new
    emb_in = llm.get_input_embeddings().weight.detach()
    assert emb_in.shape[0] == n_new
    ref_in = hf.get_input_embeddings().weight.detach()
    assert torch.equal(emb_in[:old], ref_in)
    if loaded.n_added:
        expect = ref_in.float().mean(0).to(ref_in.dtype)
        assert torch.allclose(emb_in[old:], expect.expand(n_new - old, -1), atol=1e-6)
    out, ref_out = llm.get_output_embeddings().weight, hf.get_output_embeddings().weight
    if hf.config.tie_word_embeddings:
        assert out.data_ptr() == llm.get_input_embeddings().weight.data_ptr()
    else:
        assert out.data_ptr() != llm.get_input_embeddings().weight.data_ptr()
        assert torch.equal(out.detach()[:old], ref_out.detach())
        if loaded.n_added:
            expect = ref_out.detach().float().mean(0)
            assert torch.allclose(out.detach()[old:], expect.expand(n_new - old, -1), atol=1e-6)


def test_resize_keeps_the_embedding_module(loaded, request):
    """Old tokens embed exactly as in the saved LLM (module class, scale and all)."""
    emb, ref = loaded.model.llm.get_input_embeddings(), loaded.hf.get_input_embeddings()
    ids = torch.arange(loaded.raw_len).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(emb(ids), ref(ids))
    assert type(emb) is type(ref)


@pytest.mark.parametrize("n_images", [1, 2, 0])
def test_forward_gives_finite_loss_and_grads(loaded, n_images):
    model, tok = loaded.model, loaded.tokenizer
    batch = _batch(model, tok, [n_images])
    assert (batch["input_ids"] == model.image_token_id).sum() == n_images * model.tokens_per_image
    model.zero_grad(set_to_none=True)
    out = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["labels"])
    assert out.n_targets > 0
    loss = out.loss_sum / out.n_targets
    assert math.isfinite(loss.item())
    loss.backward()

    def norm(module):
        return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)

    assert norm(model.llm) > 0
    if n_images:
        assert norm(model.connector) > 0 and norm(model.vision) > 0
    else:
        assert norm(model.connector) == 0
    model.zero_grad(set_to_none=True)


def test_packed_rows_give_the_unpacked_loss(loaded):
    """Packing across LLM families under the default attention (``auto``: on a CPU, the
    block-diagonal mask transformers builds from the restarting position ids): the summed loss
    and target count of three samples are those of the padded batch."""
    model, tok = loaded.model, loaded.tokenizer
    model.eval()
    template = ChatTemplate(tok)
    counts = [1, 0, 2]
    items = [template.encode_for_training(_sample(n, f"s{i}"), model.tokens_per_image) for i, n in enumerate(counts)]
    g = torch.Generator().manual_seed(0)
    pixels = [[torch.randn(3, IMAGE_SIZE, IMAGE_SIZE, generator=g) for _ in range(n)] for n in counts]
    padded = collate(items, [p for ps in pixels for p in ps], template.pad_token_id)
    longest = max(len(it.input_ids) for it in items)
    packed = pack_collate(items, pixels, template.pad_token_id, max_tokens=2 * longest)
    assert packed["input_ids"].shape[0] < len(items)  # samples do share a row
    with torch.no_grad():
        a = model(padded["input_ids"], padded["attention_mask"], padded["pixel_values"], padded["labels"])
        b = model(packed["input_ids"], packed["attention_mask"], packed["pixel_values"], packed["labels"],
                  position_ids=packed["position_ids"])  # fmt: skip
    assert int(a.n_targets) == int(b.n_targets)
    torch.testing.assert_close(b.loss_sum, a.loss_sum, rtol=1e-5, atol=1e-5)


def test_checkpoint_roundtrip_gives_identical_logits(loaded, tmp_path, request):
    model, tok = loaded.model, loaded.tokenizer
    model.eval()  # as loaded: tiny-cnn's BatchNorm uses its running statistics
    path = save_checkpoint(model, tok, tmp_path / "ck")
    again, tok2 = load_checkpoint(path)
    assert len(tok2) == len(tok) and tok2.chat_template == tok.chat_template
    assert tok2.convert_tokens_to_ids("<image>") == again.image_token_id == model.image_token_id
    batch = _batch(model, tok, [1, 2, 0], seed=3)
    assert torch.equal(_batch(again, tok2, [1, 2, 0], seed=3)["input_ids"], batch["input_ids"])
    with torch.no_grad():
        a = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"]).logits
        b = again(batch["input_ids"], batch["attention_mask"], batch["pixel_values"]).logits
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert type(again.llm) is type(model.llm)


@pytest.mark.parametrize("attn", ["auto", "varlen"])
def test_a_soft_capping_llm_with_sdpa_attention_is_refused_when_built(tmp_path, attn):
    """Gemma 2 soft-caps its attention scores, which SDPA cannot do: the recipe key is named
    when the model is built, not at the first training step."""
    tok = tiny_tokenizer()
    cfg = Gemma2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16)  # fmt: skip
    AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").save_pretrained(tmp_path / "gemma2")
    model_cfg = ModelConfig.model_validate({"vision": {"name": "tiny-cnn", "image_size": IMAGE_SIZE},
                                            "llm": {"name": str(tmp_path / "gemma2"), "attn_implementation": attn}})  # fmt: skip
    with pytest.raises(ConfigError, match="model.llm.attn_implementation.*eager"):
        VisionLanguageModel.from_config(model_cfg, tok)
