"""Training objectives of the fusion encoder (`vlmkit.models.fusion`): MLM and ITM on the shapes world.

Texts. A scene's text is the world's own caption (`caption_detailed` by default, or
`caption_short`) followed by a count sentence, ``" there are N objects."`` (`fusion_caption`)::

    a small red circle at top left, a large blue square at bottom right. there are 2 objects.

Masked-language modelling (`mask_for_mlm`). BERT's recipe on *words*: each word of the text is
chosen independently with probability ``word_prob`` (0.15), or ``attribute_prob`` (0.5) if it is
an attribute word -- a colour, shape (singular or plural), size or count (number) word of the
world (`attribute_lexicon`). A chosen word is replaced by the mask token with probability
``mask_prob`` (0.8), by random tokens with ``random_prob`` (0.1), and left as it is otherwise
(0.1); its label is the original token, every other label is -100. Masking is **whole-word**:
the tiny BPE may split a word into several tokens (and splits numbers into digits), so words are
found in the text (``[A-Za-z]+|[0-9]+``) and mapped to tokens through the tokenizer's offset
mapping (`encode_texts`); all pieces of a word -- including a lone leading-space token -- share
one draw and one 80/10/10 decision (a random replacement draws a random token for each piece).
Punctuation tokens are one-token units of their own. Special tokens and padding are never
chosen. The decision is a Bernoulli draw per word, so the masked share matches the rates in
expectation (BERT instead masks a fixed 15% of each sequence).

Image-text matching (`itm_examples`). The image is kept and the *text* is changed (cheaper than
rendering a new image, and the image batch is the same for both objectives): a pair is a
positive (the scene's own text) with probability ``p_positive``; a negative otherwise, an *easy*
one (another training scene's text) with probability ``easy_ratio`` and else a *hard* one
(`hard_negative`): the text of the same scene graph with one attribute changed
(`perturb_scene`): one object's colour, shape or size swapped for another value, or the number
of objects changed (an object removed, or a random one added in a free cell), phrased by the
world's caption functions on the modified copy. Size is only changed when the caption style
shows sizes (``detailed``).

Loss (`fusion_loss`): MLM cross-entropy averaged over the masked tokens, plus ITM
cross-entropy averaged over the pairs, each with a weight. A training step (`train_fusion`)
runs one forward pass over ``2 * batch_size`` rows: the masked positive texts (MLM rows) and
the unmasked ITM pairs (ITM rows), both with the batch's images, as ViLT computes MLM and ITM
on separate views of a batch; MLM is only computed on matching pairs.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from safetensors.torch import load_model as safetensors_load_model

from vlmkit.config import StrictModel
from vlmkit.models.fusion import FusionEncoder, FusionEncoderConfig, FusionOutput

log = logging.getLogger("vlmkit.train")

ATTRIBUTES: tuple[str, ...] = ("color", "shape", "size", "count")
ATTRIBUTE_INDEX = {a: i + 1 for i, a in enumerate(ATTRIBUTES)}  # 0: not an attribute word
CAPTION_STYLES = ("detailed", "short")
MASK_TOKEN = "<|mask|>"
WORD_RE = re.compile(r"[A-Za-z]+|[0-9]+")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve")  # fmt: skip
STAGE = "fusion"


# ================================================================== texts


def attribute_lexicon() -> dict[str, str]:
    """Attribute word -> its kind (``color``/``shape``/``size``/``count``), lower case. Numbers
    (any run of digits, see `attribute_kind`) and number words are ``count``."""
    from vlmkit.data.worlds.shapes import COLORS, PLURALS, SHAPES, SIZES

    lex = {c: "color" for c in COLORS}
    lex.update({s: "shape" for s in SHAPES})
    lex.update({p: "shape" for p in PLURALS.values()})
    lex.update({s: "size" for s in SIZES})
    lex.update({w: "count" for w in NUMBER_WORDS})
    return lex


_LEXICON: dict[str, str] | None = None


def attribute_kind(word: str) -> str | None:
    """The attribute kind of one word, or None."""
    global _LEXICON
    if _LEXICON is None:
        _LEXICON = attribute_lexicon()
    if word.isdigit():
        return "count"
    return _LEXICON.get(word.lower())


def fusion_caption(scene: dict, style: str = "detailed", count: bool = True) -> str:
    """The text of a scene: the world's caption (``detailed`` or ``short``), then
    ``" there are N objects."`` when ``count``."""
    from vlmkit.data.worlds.shapes import caption_detailed, caption_short

    if style not in CAPTION_STYLES:
        raise ValueError(f"unknown caption style {style!r}; expected one of {CAPTION_STYLES}")
    text = caption_detailed(scene) if style == "detailed" else caption_short(scene)
    if count:
        text += f" there are {len(scene['objects'])} objects."
    return text


def caption_attributes(style: str = "detailed", count: bool = True) -> tuple[str, ...]:
    """The attributes a text of this style shows (what a hard negative may change). The number
    of objects always shows: the caption lists every object."""
    del count  # the object list shows the count even without the count sentence
    return ATTRIBUTES if style == "detailed" else ("color", "shape", "count")


# ================================================================== tokenising with word units


def add_mask_token(tokenizer) -> int:
    """Register `MASK_TOKEN` as the tokenizer's mask token (if it has none); its id."""
    if tokenizer.mask_token is None:
        tokenizer.add_special_tokens({"mask_token": MASK_TOKEN})
    return int(tokenizer.mask_token_id)


def attribute_pieces(tokenizer) -> dict[str, list[int]]:
    """Each attribute word of the lexicon -> its token ids as it appears inside a sentence (after
    a space), e.g. ``{"red": [id(" red")], "hexagon": [id(" hex"), id("agon")], ...}``: how the
    tokenizer splits the words MLM masks whole (digits are split one by one, so counts above 9
    are several pieces)."""
    words = list(attribute_lexicon()) + [str(i) for i in range(10)]
    return {w: tokenizer(" " + w, add_special_tokens=False)["input_ids"] for w in words}


@dataclass
class MLMVocab:
    mask_id: int
    special_ids: list[int]
    regular_ids: torch.Tensor  # [R] ids a random replacement may draw (every non-special id)


def mlm_vocab(tokenizer) -> MLMVocab:
    if tokenizer.mask_token_id is None:
        raise ValueError("the tokenizer has no mask token; call add_mask_token(tokenizer) first")
    special = sorted(set(int(i) for i in tokenizer.all_special_ids))
    regular = torch.tensor([i for i in range(len(tokenizer)) if i not in set(special)], dtype=torch.long)
    return MLMVocab(int(tokenizer.mask_token_id), special, regular)


@dataclass
class TextBatch:
    """Tokenised texts with their word units (right-padded to the longest)."""

    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L] 1 = token, 0 = padding
    word_ids: torch.Tensor  # [B, L] unit index of each token within its row; -1: padding or special token
    attr_ids: torch.Tensor  # [B, L] ATTRIBUTE_INDEX of the token's word; 0: not an attribute word
    units: list[list[str]] = field(default_factory=list)  # per row, the text of each unit


def encode_texts(tokenizer, texts: Sequence[str], max_len: int) -> TextBatch:
    """Tokenise ``texts`` (no special tokens added, truncated to ``max_len``) and find the word
    units of the tokens through the offset mapping.

    A word is a run of letters or digits; it owns every token whose character span overlaps it or
    the whitespace just before it (byte-level BPE keeps the leading space on the token, or as a
    lone ``Ġ`` token before digits and rare words). Each remaining token (punctuation) is a unit
    of its own; special tokens belong to no unit.
    """
    special = set(int(i) for i in tokenizer.all_special_ids)
    rows_ids, rows_wid, rows_attr, rows_units = [], [], [], []
    for text in texts:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, truncation=True,
                        max_length=max_len)  # fmt: skip
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        words = []  # (start including the leading whitespace, end, text)
        for m in WORD_RE.finditer(text):
            start = m.start()
            while start > 0 and text[start - 1].isspace():
                start -= 1
            words.append((start, m.end(), m.group()))
        wid, attr, units = [], [], []
        unit_of_word: dict[int, int] = {}
        w = 0
        for tid, (s, e) in zip(ids, offsets):
            if tid in special:
                wid.append(-1)
                attr.append(0)
                continue
            while w < len(words) and words[w][1] <= s:  # words that end before this token
                w += 1
            if w < len(words) and max(s, words[w][0]) < min(e, words[w][1]):
                if w not in unit_of_word:
                    unit_of_word[w] = len(units)
                    units.append(words[w][2])
                kind = attribute_kind(words[w][2])
                wid.append(unit_of_word[w])
                attr.append(ATTRIBUTE_INDEX[kind] if kind else 0)
            else:
                wid.append(len(units))
                units.append(text[s:e])
                attr.append(0)
        rows_ids.append(ids)
        rows_wid.append(wid)
        rows_attr.append(attr)
        rows_units.append(units)
    length = max([len(r) for r in rows_ids] + [1])
    pad = int(tokenizer.pad_token_id)

    def padded(rows, value):
        return torch.tensor([r + [value] * (length - len(r)) for r in rows], dtype=torch.long)

    return TextBatch(
        input_ids=padded(rows_ids, pad),
        attention_mask=padded([[1] * len(r) for r in rows_ids], 0),
        word_ids=padded(rows_wid, -1),
        attr_ids=padded(rows_attr, 0),
        units=rows_units,
    )


# ================================================================== masked-language modelling


class MaskingConfig(StrictModel):
    """Whole-word MLM masking rates (see the module docstring)."""

    word_prob: float = Field(0.15, ge=0, le=1)  # chance a non-attribute word is chosen
    attribute_prob: float = Field(0.5, ge=0, le=1)  # chance an attribute word is chosen
    attributes: list[str] = Field(default_factory=lambda: list(ATTRIBUTES))  # kinds at attribute_prob
    mask_prob: float = Field(0.8, ge=0, le=1)  # of the chosen: replaced by the mask token
    random_prob: float = Field(0.1, ge=0, le=1)  # of the chosen: replaced by random tokens (rest: kept)

    @model_validator(mode="after")
    def _check(self):
        if self.mask_prob + self.random_prob > 1 + 1e-9:
            raise ValueError("mask_prob + random_prob must be at most 1")
        unknown = sorted(set(self.attributes) - set(ATTRIBUTES))
        if unknown:
            raise ValueError(f"unknown attribute kinds {unknown}; expected some of {list(ATTRIBUTES)}")
        return self


def mask_for_mlm(
    batch: TextBatch, vocab: MLMVocab, cfg: MaskingConfig | None = None, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(masked input_ids [B, L], labels [B, L])``: whole-word 80/10/10 masking; labels are the
    original ids at chosen tokens and -100 elsewhere. Deterministic for a seeded ``generator``."""
    cfg = cfg or MaskingConfig()
    ids = batch.input_ids
    b, length = ids.shape
    valid = (batch.word_ids >= 0) & batch.attention_mask.bool()  # [B, L] never padding or specials
    for sid in vocab.special_ids:
        valid &= ids != sid
    unit = batch.word_ids.clamp(min=0)  # [B, L]; a row has at most L units
    select_draw = torch.rand(b, length, generator=generator).gather(1, unit)  # one draw per unit
    action_draw = torch.rand(b, length, generator=generator).gather(1, unit)
    random_ids = vocab.regular_ids[torch.randint(len(vocab.regular_ids), (b, length), generator=generator)]
    high = torch.zeros_like(valid)
    for kind in cfg.attributes:
        high |= batch.attr_ids == ATTRIBUTE_INDEX[kind]
    prob = torch.where(high, torch.tensor(cfg.attribute_prob), torch.tensor(cfg.word_prob))  # [B, L]
    chosen = valid & (select_draw < prob)
    to_mask = chosen & (action_draw < cfg.mask_prob)
    to_random = chosen & (action_draw >= cfg.mask_prob) & (action_draw < cfg.mask_prob + cfg.random_prob)
    masked = ids.clone()
    masked[to_mask] = vocab.mask_id
    masked[to_random] = random_ids[to_random]
    labels = torch.full_like(ids, -100)
    labels[chosen] = ids[chosen]
    return masked, labels


# ================================================================== image-text matching


def perturb_scene(scene: dict, attribute: str, rng: random.Random) -> tuple[dict, dict]:
    """A deep copy of ``scene`` with one attribute changed, and the change
    ``{"attribute", "object", "old", "new"}``.

    ``color``/``shape``/``size``: a random object gets another value of that attribute.
    ``count``: a random object is removed, or a random object (shape, colour, size) is added in a
    free grid cell (kept in reading order); a one-object scene always gains one, a full scene
    always loses one. ``object`` is the index of the changed, removed or added object.
    """
    from vlmkit.data.worlds.shapes import COLORS, GRID, MAX_OBJECTS, SHAPES, SIZES

    out = copy.deepcopy(scene)
    objs = out["objects"]
    if attribute in ("color", "shape", "size"):
        pool = {"color": sorted(COLORS), "shape": list(SHAPES), "size": sorted(SIZES)}[attribute]
        i = rng.randrange(len(objs))
        old = objs[i][attribute]
        new = rng.choice([v for v in pool if v != old])
        objs[i][attribute] = new
        return out, {"attribute": attribute, "object": i, "old": old, "new": new}
    if attribute != "count":
        raise ValueError(f"unknown attribute {attribute!r}; expected one of {ATTRIBUTES}")
    n = len(objs)
    rows = GRID - 1 if out.get("word") else GRID
    used = {tuple(o["cell"]) for o in objs}
    free = [(r, c) for r in range(rows) for c in range(GRID) if (r, c) not in used]
    add = bool(free) and n < MAX_OBJECTS and (n <= 1 or rng.random() < 0.5)
    if not add:
        i = rng.randrange(n)
        del objs[i]
        return out, {"attribute": "count", "object": i, "old": n, "new": n - 1}
    r, c = rng.choice(free)
    size_name = rng.choice(sorted(SIZES))
    side = SIZES[size_name] / GRID  # as a fraction of the canvas, centred in the cell
    x0, y0 = (c + 0.5) / GRID - side / 2, (r + 0.5) / GRID - side / 2
    obj = {"shape": rng.choice(SHAPES), "color": rng.choice(sorted(COLORS)), "size": size_name, "cell": [r, c],
           "box": [x0, y0, x0 + side, y0 + side]}  # fmt: skip
    objs.append(obj)
    objs.sort(key=lambda o: tuple(o["cell"]))
    return out, {"attribute": "count", "object": objs.index(obj), "old": n, "new": n + 1}


def hard_negative(
    scene: dict,
    rng: random.Random,
    attribute: str | None = None,
    style: str = "detailed",
    count: bool = True,
) -> tuple[str, dict]:
    """``(text, change)``: the text of ``scene`` with one attribute changed (`perturb_scene`);
    ``attribute`` None draws one of those the style shows (`caption_attributes`)."""
    allowed = caption_attributes(style, count)
    if attribute is None:
        attribute = rng.choice(allowed)
    elif attribute not in allowed:
        raise ValueError(f"a {style} caption does not show {attribute!r}; it shows {list(allowed)}")
    positive = fusion_caption(scene, style, count)
    for _ in range(16):  # every change shows in the text; the loop only guards that promise
        modified, change = perturb_scene(scene, attribute, rng)
        text = fusion_caption(modified, style, count)
        if text != positive:
            return text, change
    raise RuntimeError(f"could not phrase a {attribute} negative that differs from {positive!r}")


def itm_examples(
    scenes: Sequence[dict],
    indices: Sequence[int],
    rng: random.Random,
    p_positive: float = 0.5,
    easy_ratio: float = 0.5,
    style: str = "detailed",
    count: bool = True,
) -> tuple[list[str], list[int], list[str]]:
    """For each scene ``scenes[i]`` (i in ``indices``, whose image is kept): ``(texts, labels,
    kinds)`` with label 1 for a match and 0 for a mismatch; kind is ``positive``, ``easy`` (the
    text of another scene of ``scenes``) or the attribute a hard negative changed."""
    texts, labels, kinds = [], [], []
    for i in indices:
        scene = scenes[i]
        if rng.random() < p_positive:
            texts.append(fusion_caption(scene, style, count))
            labels.append(1)
            kinds.append("positive")
            continue
        if len(scenes) > 1 and rng.random() < easy_ratio:
            own = fusion_caption(scene, style, count)
            for _ in range(16):
                j = rng.randrange(len(scenes))
                other = fusion_caption(scenes[j], style, count)
                if j != i and other != own:
                    texts.append(other)
                    labels.append(0)
                    kinds.append("easy")
                    break
            else:  # every other scene reads the same (tiny worlds): fall back to a hard negative
                text, change = hard_negative(scene, rng, style=style, count=count)
                texts.append(text)
                labels.append(0)
                kinds.append(change["attribute"])
            continue
        text, change = hard_negative(scene, rng, style=style, count=count)
        texts.append(text)
        labels.append(0)
        kinds.append(change["attribute"])
    return texts, labels, kinds


# ================================================================== loss


def fusion_loss(
    out: FusionOutput,
    mlm_labels: torch.Tensor | None,
    itm_labels: torch.Tensor | None,
    mlm_weight: float = 1.0,
    itm_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``mlm_weight * MLM + itm_weight * ITM`` and the parts as floats.

    MLM: cross-entropy over the tokens whose label is not -100 (``mlm_labels [B, L]``), averaged
    over those tokens (0 when none is masked). ITM: cross-entropy of ``itm_logits [B, 2]``
    against ``itm_labels [B]`` (1 = match), averaged over the rows whose label is not -100.
    """
    total = None
    parts: dict[str, float] = {}
    if mlm_labels is not None:
        logits = out.mlm_logits  # [B, L, V]
        n = int((mlm_labels != -100).sum())
        if n:
            flat = logits.flatten(0, 1).float()  # [B * L, V]
            mlm = F.cross_entropy(flat, mlm_labels.flatten(), ignore_index=-100, reduction="sum") / n
        else:
            mlm = logits.sum() * 0.0
        parts["mlm_loss"] = float(mlm.detach())
        parts["mlm_tokens"] = n
        total = mlm_weight * mlm
    if itm_labels is not None:
        keep = itm_labels != -100
        logits = out.itm_logits  # [B, 2]
        itm = F.cross_entropy(logits[keep].float(), itm_labels[keep]) if bool(keep.any()) else logits.sum() * 0.0
        parts["itm_loss"] = float(itm.detach())
        if bool(keep.any()):
            parts["itm_accuracy"] = float((logits[keep].argmax(-1) == itm_labels[keep]).float().mean())
        total = itm_weight * itm if total is None else total + itm_weight * itm
    if total is None:
        raise ValueError("fusion_loss needs MLM labels, ITM labels or both")
    return total, parts


# ================================================================== data


def load_world_scenes(world_dir: str | Path, split: str, limit: int | None = None) -> list[tuple[str, dict]]:
    """``(image path, scene graph)`` once per image of the split, in file order, read from the
    scene graphs the world stores in each row's ``meta["scene"]`` (``train.json``/``test.json``)."""
    path = Path(world_dir) / f"{split}.json"
    rows = json.loads(path.read_text(encoding="utf-8"))
    seen: dict[str, dict] = {}
    for row in rows:
        image = row.get("image")
        scene = (row.get("meta") or {}).get("scene")
        if isinstance(image, str) and isinstance(scene, dict) and image not in seen:
            seen[image] = scene
            if limit is not None and len(seen) >= limit:
                break
    if not seen:
        raise ValueError(f"{path} holds no single-image rows with a scene graph")
    return list(seen.items())


def load_pixels(world_dir: str | Path, images: Iterable[str], image_size: int) -> torch.Tensor:
    """``[N, 3, S, S]``: the images (paths relative to the world), through `ImageProcessor`."""
    from vlmkit.data.images import ImageProcessor, load_image
    from vlmkit.data.sample import ImageRef

    processor = ImageProcessor(image_size)
    return processor.batch([load_image(ImageRef(path=p), world_dir) for p in images])


def world_tokenizer(world_dir: str | Path, out_dir: str | Path, vocab_size: int = 1024):
    """The world's tiny BPE (trained on `world_texts`, as the VLM recipes train it) with a mask token."""
    from vlmkit.data.tokenizer import train_tiny_tokenizer
    from vlmkit.data.worlds.shapes import world_texts

    tok = train_tiny_tokenizer(world_texts(world_dir), vocab_size, out_dir)
    add_mask_token(tok)
    return tok


# ================================================================== training


def _lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10%."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train_fusion(
    world_dir: str | Path,
    out_dir: str | Path,
    steps: int = 1500,
    batch_size: int = 32,
    lr: float = 2e-3,
    seed: int = 0,
    model: FusionEncoderConfig | dict[str, Any] | None = None,
    masking: MaskingConfig | dict[str, Any] | None = None,
    p_positive: float = 0.5,
    easy_ratio: float = 0.5,
    caption_style: str = "detailed",
    count_sentence: bool = True,
    mlm_weight: float = 1.0,
    itm_weight: float = 1.0,
    vocab_size: int = 1024,
    warmup_steps: int | None = None,
    weight_decay: float = 0.01,
    grad_clip: float = 1.0,
    log_every: int = 10,
    max_scenes: int | None = None,
    save_every: int | None = 250,
    resume: bool = False,
    stop_after_steps: int | None = None,
) -> Path | None:
    """Train a `FusionEncoder` with MLM + ITM on the world's train scenes; return the final
    checkpoint directory ``out_dir/final`` (model, tokenizer, and in config.json's ``meta`` the
    text settings the evaluation needs).

    Writes ``out_dir/tokenizer/`` (the world's tiny BPE with a mask token), ``out_dir/metrics.jsonl``
    (a fresh file; one row per ``log_every`` steps and for the last step: ``stage`` ("fusion"),
    ``step`` (1-based), ``loss``, ``mlm_loss``, ``itm_loss``, ``itm_accuracy`` -- means over the
    steps since the previous row -- ``lr``, ``elapsed_s``) and ``out_dir/final/``.
    ``model``: FusionEncoderConfig fields (vocabulary, pad and mask ids come from the tokenizer).

    Every ``save_every`` steps a checkpoint ``out_dir/checkpoints/step-N/`` holds the weights and
    the whole training state (optimizer, schedule, the scene order, both random generators and
    the open metrics window; ``train.state``, no pickle). ``resume=True`` continues from the
    latest complete one, and the run then ends exactly as an uninterrupted one (tested bitwise).
    ``stop_after_steps`` returns None after that many steps, as if killed (for resume drills).
    """
    from vlmkit.train.checkpoints import STATE_DIR, CheckpointManager, latest_checkpoint
    from vlmkit.train.run import truncate_metrics
    from vlmkit.train.state import load_training_state
    from vlmkit.utils.io import append_jsonl

    if steps < 1 or batch_size < 1:
        raise ValueError("steps and batch_size must be at least 1")
    if caption_style not in CAPTION_STYLES:
        raise ValueError(f"unknown caption style {caption_style!r}; expected one of {CAPTION_STYLES}")
    world_dir, out_dir = Path(world_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    masking = masking if isinstance(masking, MaskingConfig) else MaskingConfig.model_validate(masking or {})
    model_fields = model.model_dump() if isinstance(model, FusionEncoderConfig) else dict(model or {})

    torch.manual_seed(seed)
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)

    tok = world_tokenizer(world_dir, out_dir / "tokenizer", vocab_size)
    tok.save_pretrained(str(out_dir / "tokenizer"))  # with the mask token
    vocab = mlm_vocab(tok)
    model_fields.update(vocab_size=len(tok), pad_token_id=int(tok.pad_token_id), mask_token_id=vocab.mask_id)
    cfg = FusionEncoderConfig.model_validate(model_fields)

    items = load_world_scenes(world_dir, "train", max_scenes)
    scenes = [s for _, s in items]
    pixels = load_pixels(world_dir, [p for p, _ in items], cfg.image_size)  # [N, 3, S, S]
    longest = max(len(tok(fusion_caption(s, caption_style, count_sentence))["input_ids"]) for s in scenes)
    if longest > cfg.max_text_len:
        log.warning("fusion: the longest text has %d tokens, over max_text_len %d: texts are truncated",
                    longest, cfg.max_text_len)  # fmt: skip

    net = FusionEncoder(cfg)
    net.train()
    decay = [p for n, p in net.named_parameters() if p.ndim >= 2 and "pos" not in n and n != "cls"]
    no_decay = [p for n, p in net.named_parameters() if not (p.ndim >= 2 and "pos" not in n and n != "cls")]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=lr)  # fmt: skip
    warmup = warmup_steps if warmup_steps is not None else min(100, steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, steps, max(1, warmup)))

    metrics_path = out_dir / "metrics.jsonl"
    window: dict[str, list[float]] = {}
    t0 = time.perf_counter()
    order: list[int] = []
    checkpoints = CheckpointManager(out_dir / "checkpoints", lambda m, d: m.write_to(d, tokenizer=tok))
    ckpt = latest_checkpoint(out_dir / "checkpoints") if resume else None
    start = 0
    if ckpt is not None:
        print(f"resuming from {ckpt}")
        safetensors_load_model(net, str(ckpt / "model.safetensors"), strict=True)
        saved = load_training_state(ckpt / STATE_DIR, None, optimizer, scheduler)["progress"]
        start, order, window = saved["global_step"], saved["order"], saved["window"]
        version, state, gauss = saved["rng"]
        rng.setstate((version, tuple(state), gauss))
        gen.set_state(torch.tensor(saved["generator"], dtype=torch.uint8))
        t0 -= saved["elapsed_s"]
        truncate_metrics(metrics_path, start)
    else:
        if resume:
            print(f"no complete checkpoint under {out_dir / 'checkpoints'}: starting from scratch")
        metrics_path.unlink(missing_ok=True)
        shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)  # an earlier run's, in the same --out
    for step in range(start, steps):
        while len(order) < batch_size:  # epochs of shuffled scenes
            fresh = list(range(len(scenes)))
            rng.shuffle(fresh)
            order += fresh
        idx, order = order[:batch_size], order[batch_size:]
        b = len(idx)
        # MLM rows: the scenes' own texts, masked
        mlm_batch = encode_texts(tok, [fusion_caption(scenes[i], caption_style, count_sentence) for i in idx],
                                 cfg.max_text_len)  # fmt: skip
        mlm_ids, mlm_labels = mask_for_mlm(mlm_batch, vocab, masking, gen)
        # ITM rows: positives, hard and easy negatives, unmasked
        texts, labels, _ = itm_examples(scenes, idx, rng, p_positive, easy_ratio, caption_style, count_sentence)
        itm_batch = encode_texts(tok, texts, cfg.max_text_len)
        ids, attn, mlm_lab = _stack_rows(  # [2B, L]: MLM rows, then ITM rows
            [mlm_ids, itm_batch.input_ids], [mlm_batch.attention_mask, itm_batch.attention_mask],
            [mlm_labels, None], int(tok.pad_token_id),
        )
        itm_lab = torch.tensor([-100] * b + labels, dtype=torch.long)
        px = pixels[idx]
        out = net(ids, attn, torch.cat([px, px]))
        loss, parts = fusion_loss(out, mlm_lab, itm_lab, mlm_weight, itm_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
        optimizer.step()
        scheduler.step()
        for k, v in {"loss": float(loss.detach()), **parts}.items():
            if k != "mlm_tokens":
                window.setdefault(k, []).append(v)
        if (step + 1) % log_every == 0 or step + 1 == steps:
            row = {"stage": STAGE, "step": step + 1, **{k: sum(v) / len(v) for k, v in window.items()},
                   "lr": optimizer.param_groups[0]["lr"], "elapsed_s": round(time.perf_counter() - t0, 3)}  # fmt: skip
            append_jsonl(metrics_path, row)
            log.info("fusion step %d: loss %.4f", step + 1, row["loss"])
            window = {}
        if save_every and (step + 1) % save_every == 0 and step + 1 < steps:
            version, state, gauss = rng.getstate()
            progress = {"global_step": step + 1, "order": order, "window": window,
                        "rng": [version, list(state), gauss], "generator": gen.get_state().tolist(),
                        "elapsed_s": time.perf_counter() - t0}  # fmt: skip
            checkpoints.save(net, optimizer, scheduler, progress, mixture=None)
        if stop_after_steps is not None and step + 1 >= stop_after_steps and step + 1 < steps:
            log.warning("fusion: stopped after %d steps (stop_after_steps)", step + 1)
            return None

    net.eval()
    meta = {
        "text": {"caption_style": caption_style, "count_sentence": count_sentence, "max_text_len": cfg.max_text_len},
        "train": {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "p_positive": p_positive,
                  "easy_ratio": easy_ratio, "masking": masking.model_dump(), "mlm_weight": mlm_weight,
                  "itm_weight": itm_weight, "n_scenes": len(scenes), "wall_s": round(time.perf_counter() - t0, 1)},
        "world": json.loads((world_dir / "world.json").read_text(encoding="utf-8")).get("params")
        if (world_dir / "world.json").is_file() else None,
    }  # fmt: skip
    return net.save(out_dir / "final", tokenizer=tok, meta=meta)


def _stack_rows(ids: list[torch.Tensor], masks: list[torch.Tensor], labels: list[torch.Tensor | None], pad: int):
    """Concatenate row blocks of different lengths (right-padded to the longest)."""
    length = max(t.shape[1] for t in ids)

    def grow(t: torch.Tensor, value: int) -> torch.Tensor:
        return F.pad(t, (0, length - t.shape[1]), value=value)

    out_ids = torch.cat([grow(t, pad) for t in ids])
    out_mask = torch.cat([grow(m, 0) for m in masks])
    out_labels = torch.cat([grow(lab, -100) if lab is not None else torch.full((t.shape[0], length), -100)
                            for lab, t in zip(labels, ids)])  # fmt: skip
    return out_ids, out_mask, out_labels
