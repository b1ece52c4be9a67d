"""Shared helpers for the model tests: a tiny word-level tokenizer and a tiny VLM."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from vlmkit.config import ModelConfig

SPECIALS = ["<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]


def tiny_tokenizer(n_words: int = 59) -> PreTrainedTokenizerFast:
    """Word-level tokenizer: the 5 special tokens, then ``w0 .. w{n_words-1}``, then ``<unk>``."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for i in range(n_words):
        vocab[f"w{i}"] = len(vocab)
    vocab["<unk>"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<|pad|>",
        eos_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>", "<image>"],
    )
    return fast


def tiny_model_config(**llm_overrides) -> ModelConfig:
    over = {"num_hidden_layers": 2}
    over.update(llm_overrides)
    return ModelConfig.model_validate({"llm": {"name": "tiny-llama", "overrides": over}})


def make_model(seed: int = 0, cfg: ModelConfig | None = None, tokenizer=None):
    from vlmkit.models.vlm import VisionLanguageModel

    torch.manual_seed(seed)
    tokenizer = tokenizer or tiny_tokenizer()
    model = VisionLanguageModel.from_config(cfg or tiny_model_config(), tokenizer)
    model.eval()
    return model, tokenizer


def prompt_ids(model, words: list[int], n_images: int = 0) -> list[int]:
    """``<image>`` runs for each image first, then word ids ``w{k}``."""
    img = [model.image_token_id] * (model.tokens_per_image * n_images)
    return img + [5 + w for w in words]


def left_pad(rows: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    t = max(len(r) for r in rows)
    ids = torch.full((len(rows), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), t), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, t - len(r) :] = torch.tensor(r)
        mask[i, t - len(r) :] = 1
    return ids, mask


def chat_tokenizer(texts: list[str], out_dir, vocab_size: int = 400):
    """The tiny byte-level BPE trained on ``texts``, with vlmkit's default chat template."""
    from vlmkit.data.tokenizer import DEFAULT_CHAT_TEMPLATE, train_tiny_tokenizer

    tok = train_tiny_tokenizer(texts, vocab_size, out_dir)
    tok.chat_template = DEFAULT_CHAT_TEMPLATE
    return tok
