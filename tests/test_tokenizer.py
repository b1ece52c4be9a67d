"""The tiny tokenizer and load_tokenizer, on tokenizers saved to temp dirs (never the hub)."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from vlmkit.data.sample import Sample, Turn, Part, ImageRef
from vlmkit.data.template import ChatTemplate
from vlmkit.data.tokenizer import (
    DEFAULT_CHAT_TEMPLATE,
    EOS,
    IM_END,
    IM_START,
    IMAGE,
    PAD,
    load_tokenizer,
    train_tiny_tokenizer,
)

TEXTS = [
    "<image>\nWhat color is the circle?",
    "The circle is red.",
    "<image>\nWhere is the square? [0.125, 0.250, 0.500, 0.750]",
    "How many triangles are there? 125 125 125 2024",
    "<image>\nDescribe the image. A red circle and a blue square.",
] * 30


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    return train_tiny_tokenizer(TEXTS, 400, out), out


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_round_trip_identical(tiny):
    tok, out = tiny
    loaded = AutoTokenizer.from_pretrained(out)
    probes = TEXTS[:5] + ["unseen words: zebra 3.14159", "<|im_start|>user\n<image>\nhi<|im_end|>\n"]
    for text in probes:
        assert _ids(loaded, text) == _ids(tok, text)
    assert loaded.get_vocab() == tok.get_vocab()
    assert loaded.chat_template == tok.chat_template == DEFAULT_CHAT_TEMPLATE
    assert loaded.pad_token == PAD and loaded.eos_token == EOS
    assert loaded.pad_token_id != loaded.eos_token_id


def test_special_tokens_are_single_ids(tiny):
    tok, _ = tiny
    seen = set()
    for special in (PAD, EOS, IM_START, IM_END, IMAGE):
        ids = _ids(tok, special)
        assert len(ids) == 1, special
        assert tok.convert_ids_to_tokens(ids[0]) == special
        seen.add(ids[0])
    assert len(seen) == 5
    # and they are skipped when decoding
    assert tok.decode(_ids(tok, f"{IM_START}hi{IM_END}{IMAGE}"), skip_special_tokens=True) == "hi"


def test_image_token_never_merges(tiny):
    tok, _ = tiny
    image_id = tok.convert_tokens_to_ids(IMAGE)
    # "<image>\n" is in every training text, yet it stays the image id followed by the newline
    assert _ids(tok, "<image>\n") == [image_id] + _ids(tok, "\n")
    ids = _ids(tok, "red<image>blue")
    assert ids == _ids(tok, "red") + [image_id] + _ids(tok, "blue")
    ids = _ids(tok, "<image><image>")
    assert ids == [image_id, image_id]


def test_digits_split_individually(tiny):
    tok, _ = tiny
    # "125" occurs 90 times in the training texts, so BPE would merge it if digits were not split
    tokens = tok.convert_ids_to_tokens(_ids(tok, "[0.125, 0.250, 0.500, 0.750]"))
    digit_tokens = [t for t in tokens if any(c.isdigit() for c in t)]
    assert "".join(digit_tokens) == "0125025005000750"
    assert all(len(t) == 1 for t in digit_tokens), tokens
    assert tok.convert_ids_to_tokens(_ids(tok, "2024")) == ["2", "0", "2", "4"]
    assert tok.decode(_ids(tok, "[0.125, 0.250, 0.500, 0.750]")) == "[0.125, 0.250, 0.500, 0.750]"


def test_deterministic(tmp_path):
    a = train_tiny_tokenizer(TEXTS, 350, tmp_path / "a")
    b = train_tiny_tokenizer(TEXTS, 350, tmp_path / "b")
    ja = json.loads((tmp_path / "a" / "tokenizer.json").read_text())
    jb = json.loads((tmp_path / "b" / "tokenizer.json").read_text())
    assert ja["model"] == jb["model"]
    assert a.get_vocab() == b.get_vocab()


def test_load_tokenizer_on_tiny_adds_nothing(tiny):
    _, out = tiny
    tok, added = load_tokenizer(out)
    assert added == 0
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE


def _base_tokenizer(path, with_eos: bool, chat_template: str | None = None):
    """A 'base model' tokenizer: byte-level BPE, no <image>, maybe no eos, no chat template."""
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    specials = ["</s>"] if with_eos else []
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(TEXTS, trainer=trainer)
    kwargs = {"eos_token": "</s>"} if with_eos else {}
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, **kwargs)
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(path)
    return len(fast)


def _sample():
    return Sample(
        "s1",
        [Turn("user", [Part(image=0), Part(text="\nWhat color?")]), Turn.of_text("assistant", "red")],
        [ImageRef(path="a.png")],
    )


def test_load_tokenizer_base_model_with_eos(tmp_path):
    n0 = _base_tokenizer(tmp_path, with_eos=True)
    tok, added = load_tokenizer(tmp_path)
    assert added == 3  # <|im_start|>, <|im_end|>, <image>
    assert len(tok) == n0 + 3
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE
    assert tok.pad_token == "</s>"  # reuses eos
    for special in (IMAGE, IM_START, IM_END):
        assert len(_ids(tok, special)) == 1
    ct = ChatTemplate(tok)
    enc = ct.encode_for_training(_sample(), tokens_per_image=2)
    assert enc.input_ids.count(ct.image_token_id) == 2
    assert ct.stop_token_ids == [tok.convert_tokens_to_ids(IM_END), tok.convert_tokens_to_ids("</s>")]
    # a second load of the saved result adds nothing more
    tok.save_pretrained(tmp_path / "again")
    _, added_again = load_tokenizer(tmp_path / "again")
    assert added_again == 0


def test_load_tokenizer_base_model_without_eos(tmp_path):
    n0 = _base_tokenizer(tmp_path, with_eos=False)
    tok, added = load_tokenizer(tmp_path)
    assert added == 4  # the three above and <|pad|>
    assert len(tok) == n0 + 4
    assert tok.pad_token == PAD and len(_ids(tok, PAD)) == 1


def test_load_tokenizer_keeps_existing_chat_template(tmp_path):
    custom = DEFAULT_CHAT_TEMPLATE.replace("'\\n' + message['content']", "':\\n' + message['content']")
    assert custom != DEFAULT_CHAT_TEMPLATE
    # a template that uses <|im_start|>/<|im_end|> which the tokenizer lacks would be the model's
    # problem; here the tokenizer knows them already (as ordinary added special tokens)
    _base_tokenizer(tmp_path, with_eos=True, chat_template=custom)
    t = AutoTokenizer.from_pretrained(tmp_path)
    t.add_special_tokens({"extra_special_tokens": [IM_START, IM_END]})
    t.save_pretrained(tmp_path / "chat")
    tok, added = load_tokenizer(tmp_path / "chat")
    assert added == 1  # only <image>
    assert tok.chat_template == custom


def test_role_names_are_whole_tokens(tiny):
    tok, _ = tiny
    # the training texts never mention roles, yet the chat headers tokenize compactly
    for role in ("user", "assistant", "system"):
        assert tok.convert_ids_to_tokens(_ids(tok, f"{IM_START}{role}\n")) == [IM_START, role, "Ċ"]
