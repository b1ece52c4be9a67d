"""The one place prompts are rendered: training, evaluation and serving all go through here.

``ChatTemplate`` wraps a tokenizer (with a chat template and an ``<image>`` token, see
``data.tokenizer.load_tokenizer``) and turns ``Sample``/``Turn`` records into token ids.

Label masking is derived from the chat template itself, turn by turn, with no hard-coded
offsets: for assistant turn *i* we render the conversation up to turn *i-1* with the generation
prompt (where the answer starts) and up to turn *i* without it (where the turn ends). Both
renderings must tokenize to a prefix of the whole conversation's ids, otherwise the template
does not render a turn the same way wherever it sits, and we refuse (``LabelMaskingError``)
rather than guess. See docs/template.md for a worked example.

Interleaved documents (``meta["document"]``, docs/formats.md) are not chats: ``encode_document``
tokenizes their text as plain text, images as ``<image>``, ends it with eos, and puts the loss on
every text token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from vlmkit.data.bad_samples import BadSampleError
from vlmkit.data.sample import Sample, Turn
from vlmkit.data.tokenizer import IMAGE

IGNORE_INDEX = -100

# How many image tokens each image gets: one count for all, or per image a count or a list of
# (marker token or None, count) segments -- see ``ChatTemplate._expand``.
ImageTokens = int | Sequence[int | Sequence[tuple[str | None, int]]]

# Used once, at construction, to find the template's end-of-turn token.
_PROBE_USER = "Hello"
_PROBE_ANSWER = "Fine"


class LabelMaskingError(ValueError):
    """The labels of a sample can't be derived safely from the chat template."""


@dataclass
class Encoded:
    """One encoded sample: ``labels[i]`` is the target for position ``i`` (-100: no loss).

    ``<image>`` placeholders are already expanded; ``n_images`` is the number of images the
    ids refer to (their pixel tensors go to ``collate`` in this order).
    """

    input_ids: list[int]
    labels: list[int]
    n_images: int
    sample_id: str | None = None
    image_layouts: list | None = None  # one TileLayout per image when images are tiled

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_targets(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def turn_content(turn: Turn) -> str:
    """A turn's parts joined; an image part becomes the literal ``<image>`` (no separators added)."""
    return "".join(IMAGE if p.is_image else (p.text or "") for p in turn.parts)


def to_messages(turns: Sequence[Turn]) -> list[dict[str, str]]:
    return [{"role": t.role, "content": turn_content(t)} for t in turns]


def _is_prefix(prefix: list[int], whole: list[int]) -> bool:
    return len(prefix) <= len(whole) and whole[: len(prefix)] == prefix


class ChatTemplate:
    """Renders conversations with ``tokenizer``'s chat template and builds training labels."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "the tokenizer has no chat template; load it with vlmkit.data.tokenizer.load_tokenizer"
            )
        image_id = tokenizer.convert_tokens_to_ids(IMAGE)
        if image_id is None or image_id == tokenizer.unk_token_id or self._ids(IMAGE) != [image_id]:
            raise ValueError(
                f"the tokenizer has no single {IMAGE} token; load it with vlmkit.data.tokenizer.load_tokenizer"
            )
        self._image_id: int = image_id
        self._control_ids: set[int] = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
        self._control_ids.discard(image_id)
        self._eot_id: int = self._find_end_of_turn()
        self._doc_prefix: list[int] | None = None  # see _document_prefix

    # ------------------------------------------------------------------ properties

    @property
    def image_token_id(self) -> int:
        return self._image_id

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.tokenizer.eos_token_id

    @property
    def end_of_turn_id(self) -> int:
        """The token that closes an assistant turn in this template (e.g. ``<|im_end|>``)."""
        return self._eot_id

    @property
    def stop_token_ids(self) -> list[int]:
        """Generation stops at any of these: the end-of-turn token, then eos if different."""
        ids = [self._eot_id]
        eos = self.tokenizer.eos_token_id
        if eos is not None and eos not in ids:
            ids.append(eos)
        return ids

    # ------------------------------------------------------------------ rendering

    def render(self, turns: Sequence[Turn], add_generation_prompt: bool = False) -> str:
        """The chat template's text for ``turns`` (images as ``<image>``)."""
        return self._render(to_messages(turns), add_generation_prompt)

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        # transformers 5: tokenize=True returns a BatchEncoding by default (return_dict=True);
        # we always render text and tokenize it ourselves so every path tokenizes alike.
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        if not isinstance(text, str):  # pragma: no cover - defensive against API drift
            raise TypeError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}")
        return text

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _find_end_of_turn(self) -> int:
        """The first control token the template writes after an assistant message's content."""
        msgs = [{"role": "user", "content": _PROBE_USER}, {"role": "assistant", "content": _PROBE_ANSWER}]
        full = self._render(msgs, False)
        head = self._render(msgs[:1], True)
        tail = full[len(head):] if full.startswith(head) else full
        at = tail.rfind(_PROBE_ANSWER)
        after = tail[at + len(_PROBE_ANSWER):] if at >= 0 else tail
        for i in self._ids(after):
            if i in self._control_ids:
                return i
        raise ValueError(
            "the chat template writes no special end-of-turn token after an assistant message "
            f"(it renders {full!r}); generation could not stop and labels could not end the turn"
        )

    # ------------------------------------------------------------------ encoding

    def _expand(
        self, ids: list[int], labels: list[int] | None, tokens_per_image: ImageTokens
    ) -> tuple[list[int], list[int] | None, int]:
        """Replace each ``<image>`` placeholder by its image tokens (never a loss on them).

        ``tokens_per_image`` is one count for every image, or one entry per image: a count, or
        a list of segments ``(marker, count)`` -- an optional marker token (e.g. Idefics3's
        ``<row_1_col_2>``, None for none) followed by ``count`` image tokens.
        """
        n_images = sum(1 for i in ids if i == self._image_id)
        per_image = [tokens_per_image] * n_images if isinstance(tokens_per_image, int) else list(tokens_per_image)
        if len(per_image) != n_images:
            raise ValueError(f"tokens_per_image lists {len(per_image)} entries for {n_images} image(s)")
        expansions = [self._image_run(entry) for entry in per_image]
        out_ids: list[int] = []
        out_labels: list[int] | None = [] if labels is not None else None
        k = 0
        for pos, tok in enumerate(ids):
            if tok == self._image_id:
                out_ids.extend(expansions[k])
                if out_labels is not None:
                    out_labels.extend([IGNORE_INDEX] * len(expansions[k]))
                k += 1
            else:
                out_ids.append(tok)
                if out_labels is not None:
                    out_labels.append(labels[pos])
        return out_ids, out_labels, n_images

    def _image_run(self, entry) -> list[int]:
        """The ids one image's placeholder expands to (see ``_expand``)."""
        segments = [(None, entry)] if isinstance(entry, int) else list(entry)
        run: list[int] = []
        for marker, count in segments:
            if count < 1:
                raise ValueError(f"tokens_per_image must be >= 1, got {count}")
            if marker is not None:
                marker_id = self.tokenizer.convert_tokens_to_ids(marker)
                if marker_id is None or marker_id == self.tokenizer.unk_token_id or self._ids(marker) != [marker_id]:
                    raise ValueError(f"the tokenizer has no single {marker!r} token (add the tiling markers)")
                run.append(marker_id)
            run.extend([self._image_id] * count)
        return run

    def _labels(self, sample: Sample) -> tuple[list[int], list[int]]:
        """Token ids of the whole conversation (``<image>`` not yet expanded) and their labels."""
        sid = sample.id
        assistant = [i for i, t in enumerate(sample.turns) if t.role == "assistant"]
        if not assistant:
            raise LabelMaskingError(f"sample {sid}: no assistant turn, nothing to learn from")
        messages = to_messages(sample.turns)
        whole = self._render(messages, False)
        ids = self._ids(whole)
        labels = [IGNORE_INDEX] * len(ids)
        for i in assistant:
            if i == 0:
                raise LabelMaskingError(f"sample {sid}: turn 0 is an assistant turn with nothing before it")
            head_text = self._render(messages[:i], True)
            upto_text = self._render(messages[: i + 1], False)
            head, upto = self._ids(head_text), self._ids(upto_text)
            for name, text, part in (
                ("with the generation prompt", head_text, head),
                ("through it", upto_text, upto),
            ):
                if not _is_prefix(part, ids):
                    why = (
                        "its text is a prefix of the whole but tokenizes differently at the boundary "
                        "(e.g. a space or newline merged into the next word)"
                        if whole.startswith(text)
                        else "the chat template renders turns differently depending on what follows them"
                    )
                    raise LabelMaskingError(
                        f"sample {sid}: assistant turn {i}: the conversation rendered up to turn {i} "
                        f"({name}) is not a token prefix of the whole conversation; {why}"
                    )
            start, stop = len(head), len(upto)
            if stop <= start:
                continue  # the template drops this turn; the all-masked check below catches the worst case
            span = ids[start:stop]
            if self._eot_id not in span:
                raise LabelMaskingError(
                    f"sample {sid}: assistant turn {i}: no end-of-turn token "
                    f"{self.tokenizer.convert_ids_to_tokens(self._eot_id)!r} in the rendered turn"
                )
            end = start + len(span) - span[::-1].index(self._eot_id)  # just past the last end token
            labels[start:end] = ids[start:end]
        for pos, tok in enumerate(ids):
            if tok == self._image_id:
                labels[pos] = IGNORE_INDEX
        if all(x == IGNORE_INDEX for x in labels):
            raise LabelMaskingError(f"sample {sid}: every label is masked; the sample would teach nothing")
        return ids, labels

    def encode_for_training(
        self, sample: Sample, tokens_per_image: ImageTokens, max_len: int | None = None
    ) -> Encoded:
        """Ids and labels for one sample: loss on each assistant turn's text and its end token.

        A document (``sample.meta["document"]``, e.g. from the interleaved format) is not a chat:
        it goes to `encode_document` (plain text, loss on all of it).

        Raises ``LabelMaskingError`` (a ``ValueError``) when the labels can't be derived or would
        all be masked, and ``BadSampleError`` with reason ``image_count_mismatch`` or ``too_long``.
        """
        if sample.meta.get("document"):
            return self.encode_document(sample, tokens_per_image, max_len)
        ids, labels = self._labels(sample)
        n_placeholders = sum(1 for i in ids if i == self._image_id)
        if n_placeholders != len(sample.images):
            raise BadSampleError(
                "image_count_mismatch",
                f"sample {sample.id}: {n_placeholders} {IMAGE} token(s) for {len(sample.images)} image(s)",
            )
        ids, labels, n_images = self._expand(ids, labels, tokens_per_image)
        assert labels is not None
        if max_len is not None and len(ids) > max_len:
            raise BadSampleError("too_long", f"{len(ids)} tokens > {max_len}")
        return Encoded(input_ids=ids, labels=labels, n_images=n_images, sample_id=sample.id)

    # ------------------------------------------------------------------ documents

    @property
    def document_end_id(self) -> int:
        """The token that ends an interleaved document: the tokenizer's eos (end of text), or the
        end-of-turn token if it has none."""
        eos = self.tokenizer.eos_token_id
        return eos if eos is not None else self._eot_id

    def _document_prefix(self) -> list[int]:
        """The special ids the tokenizer puts before plain text by itself (e.g. Llama's BOS;
        nothing for the tiny and Qwen tokenizers), found by tokenizing a probe both ways."""
        prefix = self._doc_prefix
        if prefix is None:
            bare = self._ids(_PROBE_USER)
            full = list(self.tokenizer(_PROBE_USER, add_special_tokens=True)["input_ids"])
            starts = [s for s in range(len(full) - len(bare) + 1) if full[s : s + len(bare)] == bare]
            prefix = full[: starts[0]] if starts else []
            self._doc_prefix = prefix
        return list(prefix)

    def encode_document(self, sample: Sample, tokens_per_image: ImageTokens, max_len: int | None = None) -> Encoded:
        """Ids and labels for an interleaved document (``sample.meta["document"]``): plain text, no
        chat template, loss on all of it.

        The ids are the tokenizer's own prefix (BOS if it adds one to plain text), the parts of
        every turn joined as written with ``<image>`` for each image, tokenized as plain text, then
        `document_end_id`. Every id is its own label except the image tokens and the prefix
        (nothing precedes it to predict it from); the end token is a target, so the model learns
        where documents end. Raises ``BadSampleError`` with reason ``image_count_mismatch`` or
        ``too_long``, and ``LabelMaskingError`` if no text token is left to learn from.
        """
        prefix = self._document_prefix()
        body = self._ids("".join(turn_content(t) for t in sample.turns)) + [self.document_end_id]
        n_placeholders = sum(1 for i in body if i == self._image_id)
        if n_placeholders != len(sample.images):
            raise BadSampleError(
                "image_count_mismatch",
                f"sample {sample.id}: {n_placeholders} {IMAGE} token(s) for {len(sample.images)} image(s)",
            )
        ids = prefix + body
        labels = [IGNORE_INDEX] * len(prefix) + [IGNORE_INDEX if i == self._image_id else i for i in body]
        if not any(i not in self._control_ids for i in body if i != self._image_id):
            raise LabelMaskingError(f"sample {sample.id}: the document has no text; it would teach nothing")
        ids, labels, n_images = self._expand(ids, labels, tokens_per_image)
        assert labels is not None
        if max_len is not None and len(ids) > max_len:
            raise BadSampleError("too_long", f"{len(ids)} tokens > {max_len}")
        return Encoded(input_ids=ids, labels=labels, n_images=n_images, sample_id=sample.id)

    def encode_prompt(self, turns: Sequence[Turn], tokens_per_image: ImageTokens) -> list[int]:
        """The generation prompt for ``turns``: ends with the assistant header, images expanded."""
        if not turns:
            raise ValueError("encode_prompt needs at least one turn")
        ids = self._ids(self._render(to_messages(turns), True))
        ids, _, _ = self._expand(ids, None, tokens_per_image)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Generated ids -> text: cut at the first stop token, special tokens skipped, stripped."""
        ids = [int(i) for i in ids]
        stops = set(self.stop_token_ids)
        for pos, tok in enumerate(ids):
            if tok in stops:
                ids = ids[:pos]
                break
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()
