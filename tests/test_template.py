"""ChatTemplate: label masking derived from the chat template, image expansion, prompts, decoding.

Expected label positions are computed from hand-written rendered strings, tokenized piece by
piece (pieces split at control tokens or before a word after a newline, where byte-level BPE
never merges), not from the code under test.
"""

from __future__ import annotations

import pytest

from vlmkit.data.bad_samples import BadSampleError
from vlmkit.data.sample import ImageRef, Part, Sample, Turn
from vlmkit.data.template import IGNORE_INDEX, ChatTemplate, LabelMaskingError
from vlmkit.data.tokenizer import DEFAULT_CHAT_TEMPLATE, EOS, IM_END, IMAGE, train_tiny_tokenizer

TEXTS = [
    "<image>\nWhat is it? answer1 answer2 question two",
    "You are helpful. A red circle and a blue square.",
    "Where is the square? [0.125, 0.250, 0.500, 0.750]",
] * 20


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tiny_tokenizer(TEXTS, 400, tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def ct(tok):
    tok.chat_template = DEFAULT_CHAT_TEMPLATE
    return ChatTemplate(tok)


def with_template(tok, template: str) -> ChatTemplate:
    tok.chat_template = template
    return ChatTemplate(tok)


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def runs(labels):
    """Contiguous runs of label-carrying positions as (start, end)."""
    out, start = [], None
    for i, x in enumerate(labels + [IGNORE_INDEX]):
        if x != IGNORE_INDEX and start is None:
            start = i
        elif x == IGNORE_INDEX and start is not None:
            out.append((start, i))
            start = None
    return out


def multi_turn(sid="mt1"):
    return Sample(
        sid,
        [
            Turn.of_text("system", "You are helpful."),
            Turn("user", [Part(image=0), Part(text="\nWhat is it?")]),
            Turn.of_text("assistant", "answer1"),
            Turn.of_text("user", "question two"),
            Turn.of_text("assistant", "answer2"),
        ],
        [ImageRef(path="img.png")],
    )


def test_properties(ct, tok):
    assert ct.image_token_id == tok.convert_tokens_to_ids(IMAGE)
    assert ct.pad_token_id == tok.pad_token_id
    assert ct.stop_token_ids == [tok.convert_tokens_to_ids(IM_END), tok.convert_tokens_to_ids(EOS)]


def test_multi_turn_exact_labels(ct, tok):
    K = 5
    enc = ct.encode_for_training(multi_turn(), tokens_per_image=K)
    # the rendered conversation, written by hand
    before1 = (
        "<|im_start|>system\nYou are helpful.<|im_end|>\n"
        "<|im_start|>user\n<image>\nWhat is it?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    target1 = "answer1<|im_end|>"
    before2 = "\n<|im_start|>user\nquestion two<|im_end|>\n<|im_start|>assistant\n"
    target2 = "answer2<|im_end|>"
    tail = "\n"
    a = len(ids(tok, before1)) + (K - 1)  # one <image> grows to K ids
    b = a + len(ids(tok, target1))
    c = b + len(ids(tok, before2))
    d = c + len(ids(tok, target2))
    assert len(enc.input_ids) == d + len(ids(tok, tail))
    assert runs(enc.labels) == [(a, b), (c, d)]
    for s, e in runs(enc.labels):
        assert enc.labels[s:e] == enc.input_ids[s:e]
    decoded = [tok.decode(enc.input_ids[s:e]) for s, e in runs(enc.labels)]
    assert decoded == ["answer1<|im_end|>", "answer2<|im_end|>"]
    # images: exactly K copies, contiguous, masked
    img = ct.image_token_id
    pos = [i for i, t in enumerate(enc.input_ids) if t == img]
    assert len(pos) == K and pos == list(range(pos[0], pos[0] + K))
    assert all(enc.labels[i] == IGNORE_INDEX for i in pos)
    assert enc.n_images == 1 and enc.sample_id == "mt1"
    assert enc.n_targets == (b - a) + (d - c)
    # the whole sequence is the hand-written rendering with the image expanded
    text = before1 + target1 + before2 + target2 + tail
    assert tok.decode(enc.input_ids) == text.replace(IMAGE, IMAGE * K)


def test_per_image_counts(ct):
    s = Sample(
        "two",
        [Turn("user", [Part(image=0), Part(text=" and "), Part(image=1), Part(text="\nSame?")]),
         Turn.of_text("assistant", "no")],
        [ImageRef(path="a.png"), ImageRef(path="b.png")],
    )
    enc = ct.encode_for_training(s, tokens_per_image=[2, 3])
    img = ct.image_token_id
    pos = [i for i, t in enumerate(enc.input_ids) if t == img]
    assert len(pos) == 5 and enc.n_images == 2
    # two separate runs: 2 then 3
    assert pos[1] == pos[0] + 1 and pos[2] > pos[1] + 1 and pos[4] == pos[2] + 2
    with pytest.raises(ValueError):
        ct.encode_for_training(s, tokens_per_image=[2])


def test_text_only(ct, tok):
    s = Sample("t", [Turn.of_text("user", "What is it?"), Turn.of_text("assistant", "answer1")])
    enc = ct.encode_for_training(s, tokens_per_image=4)
    assert enc.n_images == 0 and ct.image_token_id not in enc.input_ids
    ((s0, e0),) = runs(enc.labels)
    assert tok.decode(enc.input_ids[s0:e0]) == "answer1<|im_end|>"


# ---------------------------------------------------------------- templates that break prefixes

# Renders the final assistant message with a reasoning block, earlier ones without (like some
# reasoning models): the conversation up to turn 2 is then not a prefix of the whole.
LAST_TURN_DIFFERENT = (
    "{%- for m in messages -%}"
    "{%- if m.role == 'assistant' and loop.last -%}"
    "{{ '<|im_start|>assistant\\n<think>\\n</think>\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- else -%}"
    "{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

# Llama-2 style: the generation prompt ends with a space and the answer follows that space. The
# strings are prefixes, but byte-level BPE merges " answer1" into one piece, so the rendered
# prompt's lone space token is not a token prefix of the whole conversation.
SPACE_JOINED = (
    "{%- for m in messages -%}"
    "{%- if m.role == 'assistant' -%}{{ ' ' + m.content + '<|im_end|>' }}"
    "{%- else -%}{{ '<|im_start|>' + m.role + '\\n' + m.content + ' [/INST]' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ ' ' }}{%- endif -%}"
)

# The generation prompt differs from how assistant turns are written.
GEN_PROMPT_MISMATCH = DEFAULT_CHAT_TEMPLATE.replace(
    "{{- '<|im_start|>assistant\\n' -}}", "{{- '<|im_start|>assistant:\\n' -}}"
)


@pytest.mark.parametrize("template", [LAST_TURN_DIFFERENT, SPACE_JOINED, GEN_PROMPT_MISMATCH])
def test_prefix_breaking_template_raises(tok, template):
    assert template != DEFAULT_CHAT_TEMPLATE
    ct = with_template(tok, template)
    with pytest.raises(LabelMaskingError, match="sample broken-7") as err:
        ct.encode_for_training(multi_turn("broken-7"), tokens_per_image=2)
    assert "turn" in str(err.value)


QWEN_LIKE = (
    "{%- if messages[0].role != 'system' -%}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif -%}" + DEFAULT_CHAT_TEMPLATE
)


def test_injected_system_prompt_masks_exactly(tok):
    ct = with_template(tok, QWEN_LIKE)
    s = Sample(
        "q",
        [Turn("user", [Part(image=0), Part(text="\nWhat is it?")]), Turn.of_text("assistant", "answer1")],
        [ImageRef(path="a.png")],
    )
    enc = ct.encode_for_training(s, tokens_per_image=3)
    before = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<image>\nWhat is it?<|im_end|>\n<|im_start|>assistant\n"
    )
    a = len(ids(tok, before)) + 2
    b = a + len(ids(tok, "answer1<|im_end|>"))
    assert runs(enc.labels) == [(a, b)]
    assert tok.decode(enc.input_ids[a:b]) == "answer1<|im_end|>"
    assert "You are a helpful assistant." in tok.decode(enc.input_ids)
    # and with an explicit system turn the default one is not injected, labels still exact
    enc2 = ct.encode_for_training(multi_turn(), tokens_per_image=3)
    assert [tok.decode(enc2.input_ids[s:e]) for s, e in runs(enc2.labels)] == [
        "answer1<|im_end|>", "answer2<|im_end|>"
    ]
    assert "helpful assistant" not in tok.decode(enc2.input_ids)


# ---------------------------------------------------------------- bad samples

def test_image_count_mismatch(ct):
    s = multi_turn()
    s.images = [ImageRef(path="a.png"), ImageRef(path="b.png")]
    with pytest.raises(BadSampleError) as err:
        ct.encode_for_training(s, tokens_per_image=2)
    assert err.value.reason == "image_count_mismatch"
    # a literal "<image>" typed in text counts as a placeholder too
    s2 = Sample("lit", [Turn.of_text("user", "<image> hi"), Turn.of_text("assistant", "ok")])
    with pytest.raises(BadSampleError) as err:
        ct.encode_for_training(s2, tokens_per_image=2)
    assert err.value.reason == "image_count_mismatch"


def test_too_long(ct):
    enc = ct.encode_for_training(multi_turn(), tokens_per_image=4)
    n = len(enc.input_ids)
    assert ct.encode_for_training(multi_turn(), tokens_per_image=4, max_len=n).input_ids == enc.input_ids
    with pytest.raises(BadSampleError) as err:
        ct.encode_for_training(multi_turn(), tokens_per_image=4, max_len=n - 1)
    assert err.value.reason == "too_long"
    assert err.value.detail == f"{n} tokens > {n - 1}"


def test_no_assistant_turn_raises(ct):
    s = Sample("noans", [Turn.of_text("system", "sys"), Turn.of_text("user", "hello")])
    with pytest.raises(LabelMaskingError, match="noans"):
        ct.encode_for_training(s, tokens_per_image=2)


def test_all_masked_raises(tok):
    # a template that leaves assistant turns out (and has no generation prompt): every prefix is
    # consistent, but nothing would carry a loss
    drops_assistant = (
        "{%- for m in messages -%}{%- if m.role != 'assistant' -%}"
        "{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
        "{%- endif -%}{%- endfor -%}"
    )
    # the probe for the end-of-turn token needs an assistant turn, so build on the normal template
    ct = with_template(tok, DEFAULT_CHAT_TEMPLATE)
    tok.chat_template = drops_assistant
    with pytest.raises(LabelMaskingError, match="masked") as err:
        ct.encode_for_training(multi_turn("silent"), tokens_per_image=2)
    assert "silent" in str(err.value)


# ---------------------------------------------------------------- prompts and decoding

def test_encode_prompt_matches_training_prefix(ct, tok):
    s = multi_turn()
    enc = ct.encode_for_training(s, tokens_per_image=4)
    last_start = runs(enc.labels)[-1][0]
    prompt = ct.encode_prompt(s.prompt_turns(), tokens_per_image=4)
    assert prompt == enc.input_ids[:last_start]
    assert tok.decode(prompt).endswith("<|im_start|>assistant\n")
    # single turn, no system
    s1 = Sample("one", [Turn("user", [Part(image=0), Part(text="\nWhat is it?")]),
                        Turn.of_text("assistant", "answer1")], [ImageRef(path="a.png")])
    enc1 = ct.encode_for_training(s1, tokens_per_image=[3])
    assert ct.encode_prompt(s1.prompt_turns(), [3]) == enc1.input_ids[: runs(enc1.labels)[0][0]]


def test_decode_stops_at_end_of_turn(ct, tok):
    gen = ids(tok, "answer1<|im_end|>\n<|im_start|>user\nmore")
    assert ct.decode(gen) == "answer1"
    assert ct.decode(ids(tok, "  red circle <|endoftext|> junk")) == "red circle"
    assert ct.decode(ids(tok, "no stop <image> here")) == "no stop  here"  # specials skipped
    assert ct.decode([]) == ""


def test_tokenizer_without_image_token_is_refused(tmp_path):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=280, show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tk)
    fast.chat_template = DEFAULT_CHAT_TEMPLATE
    with pytest.raises(ValueError, match="image"):
        ChatTemplate(fast)
