"""Interleaved image-text documents: the reader and writer, plain-text encoding with the loss on
all text, the shapes world's documents.jsonl, and a pre-training stage that trains on them.

Expected ids are built from the tokenizer piece by piece (text pieces and ``<image>`` runs, which
byte-level BPE never merges across), and the world's documents are checked against the scenes
in train.json with code written here, not the generator's.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from _model_helpers import chat_tokenizer
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from conftest import TINY_WORLD, tiny_recipe_dict
from vlmkit.config import ConfigError, DataSource
from vlmkit.data.bad_samples import BadSampleError, BadSampleLog
from vlmkit.data.dataset import SampleEncoder, load_sources
from vlmkit.data.formats.interleaved import (
    is_interleaved_file,
    read_interleaved,
    write_interleaved,
)
from vlmkit.data.formats.llava import DatasetFormatError
from vlmkit.data.sample import ImageRef, Part, Sample, Turn
from vlmkit.data.template import IGNORE_INDEX, ChatTemplate
from vlmkit.data.tokenizer import DEFAULT_CHAT_TEMPLATE, EOS, IM_START, IMAGE, train_tiny_tokenizer
from vlmkit.data.worlds import shapes
from vlmkit.data.worlds.shapes import generate_world, world_texts

# ---------------------------------------------------------------- the reader on a hand-written file

GOOD_A = {
    "id": "doc-a",
    "texts": ["Two pictures. Picture 1: ", None, " A red circle.\nPicture 2: ", None, " A blue square."],
    "images": [None, "images/a.png", None, "sub/b.png", None],
    "metadata": {"url": "https://example.com/page", "lang": "en"},
}
GOOD_TEXT_ONLY = {"texts": ["Just words, no pictures."], "images": [None]}  # no id, no metadata
GOOD_URL = {
    "id": "doc-c",
    "texts": ["See ", None, " there."],
    "images": [None, "https://example.com/x.png", None],
    "metadata": {"task": "web"},
}

# (line text, expected id, expected reason); None as reason: a good line, "" as line: blank
LINES = [
    (json.dumps(GOOD_A), "doc-a", None),
    (json.dumps(GOOD_TEXT_ONLY), "2", None),
    ("", None, None),
    ('{"id": "broken", "texts": ["a"', "4", "malformed_row"),
    ('{"id": "unequal", "texts": ["a", null], "images": [null]}', "unequal", "malformed_row"),
    ('{"id": "both", "texts": ["a", "b"], "images": [null, "x.png"]}', "both", "malformed_row"),
    ('{"id": "neither", "texts": ["a", null], "images": [null, null]}', "neither", "malformed_row"),
    ('{"id": "images-only", "texts": [null, null], "images": ["x.png", "y.png"]}', "images-only", "no_text"),
    ('{"id": "blank-text", "texts": ["  \\n", null], "images": [null, "x.png"]}', "blank-text", "no_text"),
    (json.dumps(GOOD_URL), "doc-c", None),
    ('{"id": "bad-meta", "texts": ["a"], "images": [null], "metadata": ["x"]}', "bad-meta", "malformed_row"),
    ('{"id": "literal", "texts": ["look <image> here"], "images": [null]}', "literal", "image_count_mismatch"),
    ('{"id": "no-texts", "images": [null]}', "no-texts", "malformed_row"),
    ("[1, 2]", "14", "malformed_row"),
    ('{"id": "empty-image", "texts": ["a", null], "images": [null, ""]}', "empty-image", "malformed_row"),
]


@pytest.fixture
def docs_file(tmp_path) -> Path:
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(line for line, _, _ in LINES) + "\n", encoding="utf-8")
    return path


def test_reader_yields_documents_as_one_assistant_turn(docs_file):
    log = BadSampleLog()
    samples = read_interleaved(docs_file, bad_log=log)
    assert [s.id for s in samples] == ["doc-a", "2", "doc-c"]
    a, text_only, url = samples
    assert a.turns == [Turn("assistant", [
        Part(text="Two pictures. Picture 1: "), Part(image=0), Part(text=" A red circle.\nPicture 2: "),
        Part(image=1), Part(text=" A blue square."),
    ])]  # fmt: skip
    assert a.images == [ImageRef(path="images/a.png"), ImageRef(path="sub/b.png")]
    assert a.meta == {"task": "document", "document": True, "url": "https://example.com/page", "lang": "en"}
    a.validate()
    assert text_only.images == [] and text_only.turns[0].text == "Just words, no pictures."
    assert text_only.meta == {"task": "document", "document": True}
    assert url.images == [ImageRef(url="https://example.com/x.png")]
    assert url.meta["task"] == "web" and url.meta["document"] is True  # metadata may set the task


def test_reader_names_and_counts_every_bad_line(docs_file):
    log = BadSampleLog()
    read_interleaved(docs_file, bad_log=log)
    expected = [(f"{docs_file}:line {n}", sid, reason) for n, (_, sid, reason) in enumerate(LINES, 1) if reason]
    assert [(where, sid, reason.split(":")[0]) for where, sid, reason in log.bad] == expected
    assert log.seen == sum(1 for line, _, _ in LINES if line)  # the blank line is not a row
    by_id = {sid: reason for _, sid, reason in log.bad}
    assert "position 1" in by_id["both"] and "position 1" in by_id["neither"]
    assert "2" in by_id["unequal"] and "1" in by_id["unequal"]
    assert log.summary().startswith(f"{len(expected)} of {log.seen} samples skipped")


def test_reader_without_a_log_raises_on_the_first_bad_line(docs_file):
    with pytest.raises(BadSampleError) as err:
        read_interleaved(docs_file)
    assert err.value.reason == "malformed_row" and f"{docs_file}:line 4" in str(err.value)


def test_a_file_that_is_not_json_lines_is_refused(tmp_path):
    llava_list = tmp_path / "list.json"
    llava_list.write_text('[\n{"id": "x", "conversations": []}\n]\n')
    with pytest.raises(DatasetFormatError):
        read_interleaved(llava_list)
    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DatasetFormatError):
        read_interleaved(binary)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    assert read_interleaved(empty, bad_log=BadSampleLog()) == []


def test_format_sniffing(docs_file, tiny_world):
    assert is_interleaved_file(docs_file)
    assert is_interleaved_file(tiny_world / "documents.jsonl")
    assert not is_interleaved_file(tiny_world / "train.json")
    assert not is_interleaved_file(tiny_world / "world.json")


# ---------------------------------------------------------------- the writer


def test_write_then_read_is_exact(docs_file, tmp_path):
    samples = read_interleaved(docs_file, bad_log=BadSampleLog())
    out = tmp_path / "out" / "docs.jsonl"
    write_interleaved(samples, out)
    assert read_interleaved(out) == samples
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert lines[0] == GOOD_A  # the hand-written line comes back as written
    assert lines[1] == {"id": "2", **GOOD_TEXT_ONLY}
    assert lines[2] == GOOD_URL
    assert not list(out.parent.glob(".*.tmp"))  # written atomically: no temporary file left


def test_writer_paths_bytes_and_placeholder_order(tmp_path):
    from PIL import Image

    from vlmkit.data.worlds.shapes import png_bytes

    root = tmp_path / "data"
    png = png_bytes(Image.new("RGB", (4, 4), (255, 0, 0)))
    doc = Sample(
        "w",
        # the second image is referred to first: the file lists images in reading order
        [Turn("assistant", [Part(text="one "), Part(image=1), Part(text=" two "), Part(image=0)])],
        [ImageRef(path=str((root / "images" / "abs.png").resolve())), ImageRef(data=png)],
        {"task": "document", "document": True},
    )
    write_interleaved([doc], root / "docs.jsonl")
    (line,) = [json.loads(x) for x in (root / "docs.jsonl").read_text().splitlines()]
    assert line["texts"] == ["one ", None, " two ", None]
    written_bytes, absolute = line["images"][1], line["images"][3]
    assert absolute == "images/abs.png"
    assert written_bytes.startswith("images/") and (root / written_bytes).read_bytes() == png
    (back,) = read_interleaved(root / "docs.jsonl")
    assert back.images == [ImageRef(path=written_bytes), ImageRef(path="images/abs.png")]
    assert back.image_order() == [0, 1]


# ---------------------------------------------------------------- encoding

TEXTS = [
    "A red circle. and a blue square here. Picture 1: It shows two pictures of shapes.",
    "<image>\nWhat is it? answer1 Hello Fine",
] * 20


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return chat_tokenizer(TEXTS, tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def ct(tok):
    return ChatTemplate(tok)


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def document(parts: list[Part], n_images: int, sid: str = "d1") -> Sample:
    images = [ImageRef(path=f"img{i}.png") for i in range(n_images)]
    return Sample(sid, [Turn("assistant", parts)], images, {"task": "document", "document": True})


TWO_IMAGES = [Part(text="A red circle. "), Part(image=0), Part(text=" and a blue square "), Part(image=1),
              Part(text=" here.")]  # fmt: skip


def test_document_is_plain_text_with_the_loss_on_all_text(ct, tok):
    enc = ct.encode_document(document(TWO_IMAGES, 2), tokens_per_image=[2, 3])
    img, eos = tok.convert_tokens_to_ids(IMAGE), tok.convert_tokens_to_ids(EOS)
    expected = ids(tok, "A red circle. ") + [img] * 2 + ids(tok, " and a blue square ") + [img] * 3
    expected += ids(tok, " here.") + [eos]
    assert enc.input_ids == expected
    assert tok.convert_tokens_to_ids(IM_START) not in enc.input_ids  # not rendered as a chat
    for i, (t, label) in enumerate(zip(enc.input_ids, enc.labels)):
        assert label == (IGNORE_INDEX if t == img else t), i  # every text token and the eos is a target
    assert enc.n_targets == len(expected) - 5 and enc.n_images == 2 and enc.sample_id == "d1"
    # the images keep their order: the first run has 2 tokens, the second 3
    first = enc.input_ids.index(img)
    assert enc.input_ids[first : first + 3] == [img, img, ids(tok, " and")[0]]
    # tiling segments expand through the same path
    tiled = ct.encode_document(document(TWO_IMAGES, 2), tokens_per_image=[[(None, 2), (None, 1)], 1])
    assert tiled.input_ids.count(img) == 4 and tiled.n_targets == enc.n_targets


def test_encode_for_training_sends_documents_to_the_document_path(ct):
    doc = document(TWO_IMAGES, 2)
    assert ct.encode_for_training(doc, 3) == ct.encode_document(doc, 3)
    as_chat = Sample(doc.id, doc.turns, doc.images, {"task": "document"})  # no document flag
    with pytest.raises(ValueError):  # a lone assistant turn is no conversation
        ct.encode_for_training(as_chat, 3)


def test_image_count_mismatch_and_too_long(ct):
    one_placeholder = document([Part(text="A red circle. "), Part(image=0)], 2)
    with pytest.raises(BadSampleError) as err:
        ct.encode_document(one_placeholder, 2)
    assert err.value.reason == "image_count_mismatch"
    typed_placeholder = document([Part(text="A red <image> circle.")], 0)
    with pytest.raises(BadSampleError) as err:
        ct.encode_document(typed_placeholder, 2)
    assert err.value.reason == "image_count_mismatch"
    n = len(ct.encode_document(document(TWO_IMAGES, 2), 2))
    assert len(ct.encode_document(document(TWO_IMAGES, 2), 2, max_len=n)) == n
    with pytest.raises(BadSampleError) as err:
        ct.encode_document(document(TWO_IMAGES, 2), 2, max_len=n - 1)
    assert err.value.reason == "too_long"


def bos_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer that puts ``<s>`` before plain text, as Llama's does."""
    words = ["<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<s>", "<unk>",
             "user", "assistant", "Hello", "Fine", "red", "circle", "square"]  # fmt: skip
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 5)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|endoftext|>",
                                   pad_token="<|pad|>", unk_token="<unk>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>", "<image>"])  # fmt: skip
    fast.chat_template = DEFAULT_CHAT_TEMPLATE
    return fast


def test_a_tokenizer_that_adds_bos_gets_it_in_front_unlearned():
    fast = bos_tokenizer()
    assert fast("red")["input_ids"] == [5, 11]  # the tokenizer itself adds <s>
    enc = ChatTemplate(fast).encode_document(
        document([Part(text="red "), Part(image=0), Part(text=" square")], 1), tokens_per_image=2
    )
    assert enc.input_ids == [5, 11, 4, 4, 13, 1]
    assert enc.labels == [IGNORE_INDEX, 11, IGNORE_INDEX, IGNORE_INDEX, 13, 1]


def pixel_of(path) -> torch.Tensor:
    return torch.full((3, 2, 2), float(re.search(r"\d+", str(path))[0]))


def test_sample_encoder_dispatches_documents_and_keeps_image_order(ct, tok):
    # parts refer to image 1 before image 0: pixels follow the placeholders
    parts = [Part(text="A red circle. "), Part(image=1), Part(text=" and a blue square "), Part(image=0)]
    doc = document(parts, 2)
    enc = SampleEncoder(ct, processor=pixel_of, tokens_per_image=3, max_len=512, load=lambda ref, root: ref.path)
    encoded, pixels = enc.encode(doc, "root")
    assert [int(p[0, 0, 0]) for p in pixels] == [1, 0]
    assert encoded == ct.encode_document(doc, 3)
    # same id and text without the document flag: not served from the document's cache entry
    with pytest.raises(BadSampleError) as err:
        enc.encode(Sample(doc.id, doc.turns, doc.images, {"task": "document"}), "root")
    assert err.value.reason == "label_masking"
    short = enc.with_max_len(len(encoded) - 1)
    with pytest.raises(BadSampleError) as err:
        short.encode(doc, "root")
    assert err.value.reason == "too_long"


# ---------------------------------------------------------------- sources


def test_load_sources_reads_interleaved_sources(tiny_world):
    sources = load_sources({"documents": DataSource(path="documents.jsonl", format="interleaved")}, tiny_world,
                           BadSampleLog())  # fmt: skip
    docs = sources["documents"].samples
    assert docs and all(s.meta["document"] and s.meta["source"] == "documents" for s in docs)
    assert sources["documents"].root == tiny_world
    with pytest.raises(ConfigError, match="no samples"):
        load_sources({"d": DataSource(path="documents.jsonl", format="interleaved", tasks=["caption"])}, tiny_world)
    # the real image loader finds the images relative to the file's folder
    from vlmkit.data.images import load_image

    for ref in docs[0].images:
        assert load_image(ref, sources["documents"].root).size == (TINY_WORLD["size"],) * 2


# ---------------------------------------------------------------- the shapes world's documents


def world_docs(world: Path) -> list[dict]:
    return [json.loads(x) for x in (world / "documents.jsonl").read_text().splitlines() if x.strip()]


def llava_scenes(world: Path, split: str) -> dict[str, dict]:
    return {r["image"]: r["meta"]["scene"] for r in json.loads((world / f"{split}.json").read_text()) if "image" in r}


NAME_RE = re.compile(r"\ban? (?:(?:small|large) )?(\w+) (\w+)")
RELATION_RE = re.compile(r" The (\w+) (\w+) is (left of|right of|above|below) the (\w+) (\w+)\.$")


def center(o: dict) -> tuple[float, float]:
    x0, y0, x1, y1 = o["box"]
    return (x0 + x1) / 2, (y0 + y1) / 2


def check_relation(m: re.Match, scene: dict) -> None:
    def the(color, shape):
        match = [o for o in scene["objects"] if (o["color"], o["shape"]) == (color, shape)]
        assert len(match) == 1, "a relation must name unique objects"
        return center(match[0])

    (ax, ay), (bx, by) = the(m[1], m[2]), the(m[4], m[5])
    dx, dy = ax - bx, ay - by
    expected = ("left of" if dx < 0 else "right of") if abs(dx) > abs(dy) else ("above" if dy < 0 else "below")
    assert m[3] == expected, (m[0], scene)


def test_world_documents_use_train_images_and_describe_them_truthfully(tiny_world):
    train, test = llava_scenes(tiny_world, "train"), llava_scenes(tiny_world, "test")
    test_scenes = [json.dumps(s, sort_keys=True) for s in test.values()]
    docs = world_docs(tiny_world)
    assert len(docs) >= 2 and len({d["id"] for d in docs}) == len(docs)
    n_relations = 0
    for d in docs:
        images = [p for p in d["images"] if p is not None]
        assert 2 <= len(images) <= 4 and len(set(images)) == len(images)
        for p in images:
            assert p.startswith("images/train_") and p in train and (tiny_world / p).is_file()
        scenes = d["metadata"]["scenes"]
        assert scenes == [train[p] for p in images]
        assert not {json.dumps(s, sort_keys=True) for s in scenes} & set(test_scenes)
        # reading order: text, image, text, image, ..., text
        assert [t is None for t in d["texts"]] == [i is not None for i in d["images"]]
        assert [t is None for t in d["texts"]] == [k % 2 == 1 for k in range(2 * len(images) + 1)]
        texts = [t for t in d["texts"] if t is not None]
        assert f" {len(images)} pictures of shapes" in f" {texts[0]}"
        for k, scene in enumerate(scenes):
            assert texts[k].endswith(f"Picture {k + 1}: ")
            paragraph = texts[k + 1].split("\n")[0]
            assert paragraph.startswith(" It shows ")
            rel = RELATION_RE.search(paragraph)
            if rel:
                check_relation(rel, scene)
                n_relations += 1
                paragraph = paragraph[: rel.start()]
            names = NAME_RE.findall(paragraph)
            assert names == [(o["color"], o["shape"]) for o in scene["objects"]], paragraph
        closing = texts[-1].split("\n", 1)[1]
        n = [len(s["objects"]) for s in scenes]
        first_two = {1: "The first picture has more objects than the second.",
                     -1: "The second picture has more objects than the first.",
                     0: "The first and second pictures have the same number of objects."}  # fmt: skip
        assert closing.startswith(first_two[(n[0] > n[1]) - (n[0] < n[1])])
        if len(n) > 2:
            assert closing.endswith(f"In all, there are {sum(n)} objects.")
            ordinals = ["first", "second", "third", "fourth"]
            if n.count(max(n)) == 1:
                assert f"The {ordinals[n.index(max(n))]} picture has the most objects." in closing
            else:
                assert "the most objects" not in closing
        else:
            assert closing == first_two[(n[0] > n[1]) - (n[0] < n[1])]
    # read back through the reader: nothing bad, each a valid one-turn document
    log = BadSampleLog()
    samples = read_interleaved(tiny_world / "documents.jsonl", bad_log=log)
    assert not log.bad and len(samples) == len(docs)
    for s in samples:
        s.validate()


def test_world_documents_are_deterministic_and_seeded(tiny_world, tmp_path):
    again = tmp_path / "again"
    generate_world(again, **TINY_WORLD)
    assert (again / "documents.jsonl").read_bytes() == (tiny_world / "documents.jsonl").read_bytes()
    other = tmp_path / "other-seed"
    generate_world(other, **{**TINY_WORLD, "seed": TINY_WORLD["seed"] + 1})
    assert world_docs(other) != world_docs(tiny_world)
    manifest = json.loads((tiny_world / "world.json").read_text())
    assert manifest["files"]["documents"] == "documents.jsonl"
    assert manifest["counts"]["documents"] == len(world_docs(tiny_world))


def test_a_cached_world_without_documents_gets_them(tmp_path):
    out = tmp_path / "w"
    generate_world(out, n_train=8, n_test=2, seed=1)
    expected = (out / "documents.jsonl").read_bytes()
    # the file removed from a complete world: regenerated
    (out / "documents.jsonl").unlink()
    generate_world(out, n_train=8, n_test=2, seed=1)
    assert (out / "documents.jsonl").read_bytes() == expected
    # a world written by the previous version (no documents, older manifest): regenerated
    manifest = json.loads((out / "world.json").read_text())
    manifest["version"] = shapes.VERSION - 1
    del manifest["files"]["documents"]
    (out / "world.json").write_text(json.dumps(manifest))
    (out / "documents.jsonl").unlink()
    m = generate_world(out, n_train=8, n_test=2, seed=1)
    assert m["version"] == shapes.VERSION and (out / "documents.jsonl").read_bytes() == expected


def test_documents_round_trip_through_the_tiny_tokenizer_trained_without_them(tiny_world, tmp_path):
    """The tiny BPE is trained on the conversations only (the demo's tokenizer stays as it was);
    the byte-level BPE still encodes every document exactly."""
    from vlmkit.data.tokenizer import load_tokenizer

    texts = list(world_texts(tiny_world))
    docs = world_docs(tiny_world)
    segments = [t for d in docs for t in d["texts"] if t is not None]
    assert not any(seg.strip() in "\n".join(texts) for seg in segments if "Picture" in seg)
    train_tiny_tokenizer(texts, 400, tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")[0]
    for seg in segments:
        assert tok.decode(tok(seg, add_special_tokens=False)["input_ids"]) == seg


def test_a_pretrain_stage_trains_on_documents(tiny_world, tmp_path):
    """kind: pretrain with no data takes MM1's captions : documents : text mixture; every drawn
    document is encoded (none skipped) and the loss is finite."""
    from vlmkit.config import recipe_from_dict
    from vlmkit.train.run import train
    from vlmkit.utils.io import read_jsonl

    tree = tiny_recipe_dict(steps=3)
    tree["data"]["documents"] = {"path": "documents.jsonl", "format": "interleaved"}
    stage = {k: v for k, v in tree["stages"][1].items() if k not in ("data", "name")}
    tree["stages"] = [{**stage, "name": "pretrain", "kind": "pretrain", "trainable": ["connector", "llm"],
                       "lr": 1e-3, "max_seq_len": 512}]  # fmt: skip
    recipe = recipe_from_dict(tree)
    assert set(recipe.stages[0].data) == {"captions", "documents", "text"}
    train(recipe, data_dir=tiny_world, out_dir=tmp_path / "run")
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and r["n_targets"] > 0 for r in rows)
    assert rows[-1]["bad_samples"] == 0
