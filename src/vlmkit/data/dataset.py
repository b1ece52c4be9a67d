"""Training data: the recipe's sources read into memory, and the sample -> tensors encoder.

``load_sources`` reads each ``DataSource`` (LLaVA JSON, LLaVA preferences, or interleaved
documents) once and keeps the samples of the listed tasks. ``SampleEncoder.encode`` turns one
sample into token ids/labels (``ChatTemplate``: a conversation through the chat template, a
document -- ``meta["document"]`` -- as plain text with the loss on all of it) and pixel tensors
(``load_image`` -> ``ImageProcessor``), with bounded in-memory LRUs of encoded conversations
and processed images. The caches never change results: encoding and
processing are deterministic, and a cached entry is exactly what a fresh encode gives. (The text
cache matters for multi-turn dialogues: deriving their labels turn by turn tokenizes every prefix,
about 8 ms for an 8-question dialogue, and a run draws each row several times.)
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from vlmkit.config import ConfigError, DataSource
from vlmkit.data.bad_samples import BadSampleError, BadSampleLog
from vlmkit.data.sample import ImageRef, Sample


@dataclass
class SourceData:
    """One source's samples; image paths in them are relative to ``root``."""

    name: str
    path: Path
    root: Path
    samples: list[Sample]

    def __len__(self) -> int:
        return len(self.samples)


def load_sources(
    data: dict[str, DataSource],
    data_dir: str | Path,
    bad_log: BadSampleLog | None = None,
    names: list[str] | None = None,
) -> dict[str, SourceData]:
    """Read the sources (all, or those in ``names``), filtered by their ``tasks``."""
    from vlmkit.data.formats.interleaved import read_interleaved
    from vlmkit.data.formats.llava import read_llava, read_preferences

    readers = {"llava": read_llava, "llava-preference": read_preferences, "interleaved": read_interleaved}

    out = {}
    files: dict[tuple[Path, str], list] = {}  # several sources often filter one file: read it once
    for name in names if names is not None else list(data):
        src = data[name]
        path = Path(data_dir) / src.path
        if not path.exists():
            raise ConfigError(f"data.{name}.path: {path} does not exist")
        if (path, src.format) not in files:
            files[(path, src.format)] = readers[src.format](path, root=path.parent, bad_log=bad_log)
        samples = files[(path, src.format)]
        if src.tasks is not None:
            samples = [s for s in samples if s.meta.get("task") in src.tasks]
        if not samples:
            raise ConfigError(f"data.{name}: no samples in {path} (tasks filter: {src.tasks})")
        if src.drop_images:
            if src.format != "llava":
                raise ConfigError(f"data.{name}.drop_images: only conversation sources (format llava) drop images")
            samples = [s.without_images() for s in samples]
        samples = [replace(s, meta={**s.meta, "source": name}) for s in samples]
        out[name] = SourceData(name, path, path.parent, samples)
    return out


class SampleEncoder:
    """``encode(sample, root) -> (Encoded, [pixel tensor per image, in token order])``.

    Raises ``BadSampleError`` for anything wrong with the sample (a ``LabelMaskingError`` from
    the template is reported as reason ``label_masking``). ``load`` defaults to
    ``data.images.load_image``; it is a parameter so tests can run without image files.
    """

    def __init__(
        self,
        template,
        processor: Callable,
        tokens_per_image: int,
        max_len: int,
        max_pixels: int | None = None,
        cache_size: int = 4096,
        load: Callable | None = None,
    ):
        self.template = template
        self.processor = processor
        self.tokens_per_image = tokens_per_image
        self.max_len = max_len
        self.max_pixels = max_pixels
        self.cache_size = cache_size
        self._load = load
        self._cache: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()
        self._text_cache: OrderedDict[tuple, object] = OrderedDict()
        self.text_cache_size = 8 * cache_size

    def with_max_len(self, max_len: int) -> "SampleEncoder":
        """The same encoder (sharing the image cache) with another sequence limit."""
        other = SampleEncoder.__new__(SampleEncoder)
        other.__dict__.update(self.__dict__)
        other.max_len = max_len
        return other

    def encode(self, sample: Sample, root: str | Path):
        """``(Encoded, pixels)``: pixels per image in placeholder order. With an ``ImagePipeline``
        as processor, each image's tensor is its tiles ``[K, 3, S, S]`` and ``Encoded.image_layouts``
        holds the layouts; the images are then prepared first, since their sizes decide how many
        tokens each placeholder becomes."""
        from vlmkit.data.image_pipeline import ImageInput

        order = sample.image_order()
        if not order or not self._tiled():
            encoded = self._encode_text(sample, self.tokens_per_image)
            return encoded, [self.image(sample.images[i], root) for i in order]
        inputs: list[ImageInput] = [self.image(sample.images[i], root) for i in order]
        layouts = [im.layout for im in inputs]
        encoded = self._encode_text(sample, [self.processor.segments(lay) for lay in layouts])
        return replace(encoded, image_layouts=layouts), [im.pixels for im in inputs]

    __call__ = encode

    def encode_pair(self, pair, root: str | Path):
        """A preference pair -> ``((Encoded chosen, Encoded rejected), pixels)``; both answers
        follow the same prompt and images (the images are prepared once)."""
        chosen, rejected = pair.as_samples()
        enc_chosen, pixels = self.encode(chosen, root)
        enc_rejected, _ = self.encode(rejected, root)
        return (enc_chosen, enc_rejected), pixels

    def _tiled(self) -> bool:
        from vlmkit.data.image_pipeline import ImagePipeline

        return isinstance(self.processor, ImagePipeline)

    def _encode_text(self, sample: Sample, tokens_per_image):
        from vlmkit.data.template import LabelMaskingError, turn_content

        # keyed by everything the encoding depends on, so equal keys give equal encodings
        per_image = tokens_per_image if isinstance(tokens_per_image, int) else tuple(
            e if isinstance(e, int) else tuple(e) for e in tokens_per_image)  # fmt: skip
        document = bool(sample.meta.get("document"))
        key = (
            sample.id,
            document,
            len(sample.images),
            tuple((t.role, turn_content(t)) for t in sample.turns),
            per_image,
        )
        cached = self._text_cache.get(key)
        if cached is None:
            try:
                if document:  # interleaved documents: plain text, loss on all of it
                    cached = self.template.encode_document(sample, tokens_per_image, None)
                else:
                    cached = self.template.encode_for_training(sample, tokens_per_image, None)
            except LabelMaskingError as err:
                raise BadSampleError("label_masking", str(err)) from err
            if self.text_cache_size > 0:
                self._text_cache[key] = cached
                if len(self._text_cache) > self.text_cache_size:
                    self._text_cache.popitem(last=False)
        else:
            self._text_cache.move_to_end(key)
        if self.max_len is not None and len(cached) > self.max_len:
            raise BadSampleError("too_long", f"{len(cached)} tokens > {self.max_len}")
        return cached

    def image(self, ref: ImageRef, root: str | Path) -> torch.Tensor:
        key = (str(root), ref.path) if ref.path is not None else None
        if key is not None and key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        pixels = self.processor(self._load_image(ref, root))
        if key is not None and self.cache_size > 0:
            self._cache[key] = pixels
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return pixels

    def _load_image(self, ref: ImageRef, root: str | Path):
        if self._load is None:
            from vlmkit.data.images import load_image

            self._load = load_image
        if self.max_pixels is None:
            return self._load(ref, root)
        return self._load(ref, root, max_pixels=self.max_pixels)
