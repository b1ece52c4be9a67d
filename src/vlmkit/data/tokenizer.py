"""Tokenizers: a tiny byte-level BPE trained on the data, or any HF tokenizer made VLM-ready.

Both paths end with a tokenizer that has

* ``<image>`` as a single special token (the placeholder that ``ChatTemplate`` expands to
  ``tokens_per_image`` copies),
* a pad token,
* a chat template (the model's own, or ``DEFAULT_CHAT_TEMPLATE``, ChatML).

See docs/template.md.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

PAD = "<|pad|>"
EOS = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
IMAGE = "<image>"

# Order fixes the ids of the tiny tokenizer: pad=0, eos=1, im_start=2, im_end=3, image=4.
SPECIAL_TOKENS: tuple[str, ...] = (PAD, EOS, IM_START, IM_END, IMAGE)

# ChatML. Every message is rendered the same way wherever it sits in the conversation, so any
# rendered prefix of a conversation is a string prefix (and, with the control tokens as single
# special ids, a token prefix) of the whole: what ChatTemplate's label masking relies on.
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)


_ROLE_HEADERS = "system\nuser\nassistant\n"


def train_tiny_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path):
    """Train a byte-level BPE on ``texts`` and save it (HF format) to ``out_dir``.

    Digits are split one by one before the byte-level step, so ``"0.125"`` is always
    ``0 . 1 2 5`` whatever the training data. The special tokens (``SPECIAL_TOKENS``) get the
    first ids and are matched before pre-tokenization, so they never merge with neighbours.
    The role names the chat template writes (system/user/assistant) are added to the corpus.
    Deterministic for the same texts and vocab size. Returns the loaded
    ``PreTrainedTokenizerFast`` (identical to ``AutoTokenizer.from_pretrained(out_dir)``).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    texts = list(texts)
    # The chat template writes role names around every turn; callers usually pass turn texts
    # only, so add the headers (about once per text) to let BPE learn them as whole words.
    corpus = texts + [_ROLE_HEADERS] * max(2, len(texts) // 2)
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer, length=len(corpus))

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=EOS,
        extra_special_tokens=[IM_START, IM_END, IMAGE],
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = DEFAULT_CHAT_TEMPLATE
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    # Return what a later run will load, so training and loading can't drift apart.
    return AutoTokenizer.from_pretrained(out_dir)


def load_tokenizer(name_or_path: str | Path):
    """Load a tokenizer (hub name or local dir) and make it VLM-ready.

    * adds ``<image>`` as an extra special token if it is missing,
    * sets a pad token if there is none (the eos token when there is one, else adds ``<|pad|>``),
    * if the tokenizer has no chat template (base models), sets ``DEFAULT_CHAT_TEMPLATE`` and
      adds ``<|im_start|>`` / ``<|im_end|>`` as special tokens.

    Returns ``(tokenizer, n_added)``: the number of new vocabulary entries, for which the
    model must resize its embeddings (``len(tokenizer)`` is the new size).
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(name_or_path))
    before = len(tok)

    new_special: list[str] = []
    if not tok.chat_template:
        tok.chat_template = DEFAULT_CHAT_TEMPLATE
        new_special += [IM_START, IM_END]
    new_special.append(IMAGE)
    vocab = tok.get_vocab()
    existing = set(tok.all_special_tokens)
    # Tokens already in the vocab as special tokens are left alone; others are (re)registered
    # as special so they are never split and are skipped when decoding.
    missing = [t for t in new_special if t not in existing or t not in vocab]
    if missing:
        tok.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)

    if tok.pad_token is None:
        if tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        else:
            tok.add_special_tokens({"pad_token": PAD})

    return tok, len(tok) - before
