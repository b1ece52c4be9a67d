"""CLIP / SigLIP dual encoders: an image tower and a text tower mapped into one embedding space
(docs/contrastive.md).

Building (nothing is downloaded for presets)::

    cfg = DualEncoderConfig(vision=VisionConfig(name="tiny-cnn"), text=TextTowerConfig(), loss="clip")
    tokenizer = build_text_tokenizer(cfg.text, texts=caption_texts, out_dir=run_dir / "tokenizer")
    model = build_dual_encoder(cfg, tokenizer)
    processor = model.image_processor()           # PIL -> FloatTensor[3, S, S]
    batch = collate_pairs(processor, tokenizer, images, captions, cfg.text.max_length)
    out = model(**batch)                          # image_embeds, text_embeds, logit_scale, logit_bias
    loss = dual_encoder_loss(out, cfg.loss)       # vlmkit.train.contrastive_losses

Towers:

* image: the VLM's encoder wrapper (``build_vision_encoder``: presets ``tiny-cnn`` /
  ``tiny-vit`` or any supported HF vision model, fused encoders too) reading
  ``vision.feature_layer`` (the family default when None: ``-2`` for ViTs, ``-1`` for CNNs),
  then the **mean of its tokens** (CNN: of the H x W cells; ViT: of the patch tokens, CLS and
  registers already dropped by the wrapper), then a linear projection (no bias) to
  ``embed_dim``, then L2 normalisation. Mean pooling keeps the tower exactly what a VLM reads:
  the exported encoder (``export_image_tower``) gives the VLM the same patch features.
* text: ``tiny-text`` (a small bidirectional BERT built from a ``BertConfig``, random weights,
  vocabulary = the tokenizer's) or any HF text encoder by hub name / local path
  (``AutoModel``; a full CLIP / SigLIP checkpoint gives its text model), then ``pooling`` of
  ``last_hidden_state``: ``cls`` (position 0), ``mean`` (over attended positions), ``eos``
  (the last attended position: the EOS that ``tokenize_texts`` appends, or BERT's [SEP]), then
  a linear projection (no bias) and L2 normalisation.

Temperature. ``logit_scale`` is stored as a log: ``t = exp(logit_scale)``, initialised to
``log(1/0.07)`` for CLIP and ``log(10)`` for SigLIP (``init_logit_scale`` overrides, also in log
space); SigLIP also learns ``logit_bias`` (init -10). When used, ``t`` is clamped to at most
``MAX_LOGIT_SCALE = 100``: above that the clamp passes no gradient to ``logit_scale`` (it would
stay where it is), so trainers should call ``model.clamp_logit_scale_()`` after each optimizer
step, as OpenCLIP does, which puts the stored value back into ``[0, log 100]``.

Saved format (``save_dual_encoder`` / ``load_dual_encoder``): a directory with ``config.json``
(``format: vlmkit-dual-encoder``, the ``DualEncoderConfig``, the towers' HF config dicts),
``model.safetensors`` and the tokenizer's files. Loading rebuilds both towers from the saved
configs (no download, no pickle) and loads the weights strictly.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any, Sequence

import safetensors.torch
import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import CONFIG_MAPPING, AutoConfig, AutoModel, AutoTokenizer, PretrainedConfig

from vlmkit.config import MAX_LOGIT_SCALE, DualEncoderConfig, TextTowerConfig  # configs: with the recipe schema
from vlmkit.data.images import ImageProcessor
from vlmkit.models.vision import (
    FusedVisionEncoder,
    VisionEncoder,
    build_vision_encoder,
    vision_from_state,
    vision_state,
)
from vlmkit.utils.io import atomic_directory, atomic_write_json

FORMAT = "vlmkit-dual-encoder"
VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"

TEXT_PRESETS = ("tiny-text",)
TEXT_BUCKETS = 4  # length groups of a training forward's texts (DualEncoder.encode_text)
# full image-text checkpoints named as a text tower: their text model's class
TEXT_TOWER_OF = {"clip": "CLIPTextModel", "siglip": "SiglipTextModel", "siglip2": "Siglip2TextModel"}


class DualEncoderError(ValueError):
    """A directory that is not a loadable dual encoder, or a model that can't be built."""


# ---------------------------------------------------------------------- text tower


def _preset_text_config(text: TextTowerConfig, vocab_size: int | None, pad_token_id: int) -> PretrainedConfig:
    if text.name != "tiny-text":  # pragma: no cover - guarded by the caller
        raise ValueError(text.name)
    overrides = dict(text.overrides)
    vocab = overrides.pop("vocab_size", vocab_size)
    if vocab is None:
        raise DualEncoderError("text: tiny-text needs the tokenizer (its vocabulary size) or text.overrides.vocab_size")
    c = transformers.BertConfig(
        vocab_size=int(vocab),
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=text.max_length,
        type_vocab_size=1,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=pad_token_id,
    )
    for k, value in overrides.items():
        if not hasattr(c, k):
            raise DualEncoderError(f"text.overrides: tiny-text (BertConfig) has no field {k!r}")
        setattr(c, k, value)
    return c


def _text_model_from_config(hf_config: PretrainedConfig, preset: bool) -> nn.Module:
    """A randomly initialised text model for ``hf_config`` (presets: BERT without its pooler)."""
    if preset:
        return transformers.BertModel(hf_config, add_pooling_layer=False)
    if hf_config.model_type in TEXT_TOWER_OF:
        hf_config = hf_config.text_config
    return AutoModel.from_config(hf_config)


def build_text_model(text: TextTowerConfig, tokenizer=None) -> nn.Module:
    """The text tower's HF model: the preset (random weights, vocabulary = ``len(tokenizer)``)
    or a pretrained HF text encoder, its embeddings grown when the tokenizer has more entries."""
    if text.name in TEXT_PRESETS:
        pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
        vocab = len(tokenizer) if tokenizer is not None else None
        return _text_model_from_config(_preset_text_config(text, vocab, pad if pad is not None else 0), preset=True)
    hf_config = AutoConfig.from_pretrained(text.name)
    if hf_config.model_type in TEXT_TOWER_OF:
        cls = getattr(transformers, TEXT_TOWER_OF[hf_config.model_type])
        model = cls.from_pretrained(text.name)
    else:
        for k, value in text.overrides.items():
            if not hasattr(hf_config, k):
                raise DualEncoderError(f"text.overrides: {text.name} config has no field {k!r}")
            setattr(hf_config, k, value)
        model = AutoModel.from_pretrained(text.name, config=hf_config)
    if tokenizer is not None and len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    return model


def build_text_tokenizer(text: TextTowerConfig, texts: Sequence[str] | None = None, out_dir: str | Path | None = None):
    """The text tower's tokenizer.

    ``tiny-text``: a byte-level BPE (``vlmkit.data.tokenizer.train_tiny_tokenizer``) trained on
    ``texts`` with ``text.tokenizer_vocab_size`` entries, saved to ``out_dir`` (a temporary
    directory when None). HF encoders: ``AutoTokenizer`` from ``text.name``, with a pad token
    (eos, else unk, else an added ``<|pad|>``).
    """
    if text.name in TEXT_PRESETS:
        from vlmkit.data.tokenizer import train_tiny_tokenizer

        if texts is None:
            raise DualEncoderError("text: tiny-text trains its tokenizer on the data's texts; pass texts")
        if out_dir is not None:
            return train_tiny_tokenizer(texts, text.tokenizer_vocab_size, out_dir)
        with tempfile.TemporaryDirectory() as tmp:
            return train_tiny_tokenizer(texts, text.tokenizer_vocab_size, tmp)
    tok = AutoTokenizer.from_pretrained(text.name)
    if tok.pad_token is None:
        if tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        elif tok.unk_token is not None:
            tok.pad_token = tok.unk_token
        else:
            tok.add_special_tokens({"pad_token": "<|pad|>"})
    return tok


def _adds_special_tokens(tokenizer) -> bool:
    return len(tokenizer("", add_special_tokens=True)["input_ids"]) > 0


def tokenize_texts(tokenizer, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    """``{"input_ids": [B, L], "attention_mask": [B, L]}``, right-padded with the pad id,
    ``L`` = the longest row (at most ``max_length``).

    A tokenizer that adds special tokens itself (BERT's [CLS] .. [SEP], CLIP's BOS .. EOS) is
    left to do so and truncates keeping them; otherwise (the tiny BPE) the EOS token is
    appended after truncating the text to ``max_length - 1`` tokens, so ``eos`` pooling always
    reads an EOS.
    """
    texts = list(texts)
    if not texts:
        return {"input_ids": torch.zeros(0, 1, dtype=torch.long), "attention_mask": torch.zeros(0, 1, dtype=torch.long)}
    if _adds_special_tokens(tokenizer):
        rows = tokenizer(texts, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
    else:
        eos = tokenizer.eos_token_id
        raw = tokenizer(texts, add_special_tokens=False)["input_ids"]
        if eos is None:
            rows = [r[:max_length] for r in raw]
        else:
            rows = [r[: max_length - 1] + [eos] for r in raw]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    width = max((len(r) for r in rows), default=1) or 1
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def collate_pairs(processor: ImageProcessor, tokenizer, images: Sequence, texts: Sequence[str],
                  max_length: int) -> dict[str, torch.Tensor]:  # fmt: skip
    """A training / scoring batch: ``pixel_values [B, 3, S, S]`` (PIL images through
    ``processor``; tensors ``[3, S, S]`` are taken as already processed), ``input_ids`` and
    ``attention_mask`` ``[B, L]``. Row ``i`` of the images matches row ``i`` of the texts."""
    if len(images) != len(texts):
        raise ValueError(f"{len(images)} images but {len(texts)} texts")
    pixels = [im if torch.is_tensor(im) else processor(im) for im in images]
    px = torch.stack(pixels) if pixels else torch.zeros(0, 3, processor.size, processor.size)
    return {"pixel_values": px, **tokenize_texts(tokenizer, texts, max_length)}


def pool_text(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """``[B, L, D]`` -> ``[B, D]``: ``cls`` position 0, ``mean`` over attended positions, ``eos``
    the last attended position."""
    mask = attention_mask.to(hidden.dtype)
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "mean":
        return (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1.0)
    if pooling == "eos":
        positions = torch.arange(1, hidden.shape[1] + 1, device=hidden.device)
        last = (attention_mask.long() * positions).argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(f"pooling: expected cls, mean or eos, got {pooling!r}")


# ---------------------------------------------------------------------- the model


class DualEncoder(nn.Module):
    """Image tower + text tower + projections into ``embed_dim`` and a learned temperature.

    Parameter names: ``vision.*`` (the encoder wrapper, as in a VLM), ``text.*`` (the HF text
    model), ``image_proj.weight``, ``text_proj.weight``, ``logit_scale`` and (SigLIP)
    ``logit_bias``. Use ``build_dual_encoder`` / ``load_dual_encoder`` to make one.
    """

    def __init__(self, config: DualEncoderConfig, vision: VisionEncoder | FusedVisionEncoder, text: nn.Module):
        super().__init__()
        self.config = config
        self.vision = vision
        self.text = text
        text_width = int(text.config.hidden_size)
        self.image_proj = nn.Linear(vision.hidden_size, config.embed_dim, bias=False)
        self.text_proj = nn.Linear(text_width, config.embed_dim, bias=False)
        nn.init.normal_(self.image_proj.weight, std=vision.hidden_size**-0.5)
        nn.init.normal_(self.text_proj.weight, std=text_width**-0.5)
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init))
        if config.loss == "siglip":
            self.logit_bias = nn.Parameter(torch.tensor(config.logit_bias_init))
        else:
            self.logit_bias = None

    # ------------------------------------------------------------------ pieces

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    def parts(self) -> dict[str, nn.Module]:
        """The towers, by the names a stage's ``trainable`` uses; the projections and the
        temperature are matched by globs (``"*_proj.*"``, ``"logit_*"``)."""
        return {"vision": self.vision, "text": self.text}

    def image_processor(self) -> ImageProcessor:
        """The preprocessing the image tower expects (size, statistics, resize mode)."""
        return ImageProcessor(self.vision.image_size, self.vision.image_mean, self.vision.image_std,
                              mode=self.config.vision.preprocess)  # fmt: skip

    def scale(self) -> torch.Tensor:
        """``exp(logit_scale)`` clamped to at most ``MAX_LOGIT_SCALE`` (no gradient above it)."""
        return self.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Put the stored log-scale back into ``[0, log MAX_LOGIT_SCALE]`` (after an optimizer step)."""
        self.logit_scale.clamp_(0.0, math.log(MAX_LOGIT_SCALE))

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` (normalised as ``image_processor`` does) -> ``[B, E]``, unit norm."""
        tokens = self.vision(pixel_values)  # [B, T, C]
        pooled = tokens.mean(dim=1)
        return F.normalize(self.image_proj(pooled.to(self.image_proj.weight.dtype)), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    buckets: int = 1) -> torch.Tensor:  # fmt: skip
        """``[B, L]`` token ids (right-padded, ``tokenize_texts``) -> ``[B, E]``, unit norm.

        ``buckets > 1``: the texts are sorted by length and encoded in that many groups, each
        cut to its own longest text. The result is the same (padding is masked), the work is
        less when lengths vary: a batch of short captions, detailed ones and their hard
        negatives is otherwise padded to the longest of all."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if buckets > 1 and input_ids.shape[0] > buckets:
            lengths = attention_mask.sum(dim=1)
            order = lengths.argsort()
            pieces = []
            for group in order.chunk(buckets):
                width = max(1, int(lengths[group].max()))
                pieces.append(self.encode_text(input_ids[group, :width], attention_mask[group, :width]))
            return torch.cat(pieces)[order.argsort()]  # back to the input order
        hidden = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        pooled = pool_text(hidden, attention_mask, self.config.text.pooling)
        return F.normalize(self.text_proj(pooled.to(self.text_proj.weight.dtype)), dim=-1)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None, negative_input_ids: torch.Tensor | None = None,
                negative_attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor | None]:  # fmt: skip
        """Both towers on a batch of pairs: ``{"image_embeds" [B, E], "text_embeds" [B, E],
        "logit_scale" (the clamped scale t, a scalar), "logit_bias" (SigLIP; else None)}`` --
        what ``contrastive_losses.dual_encoder_loss`` reads. With ``negative_input_ids``
        ``[M, L']`` (hard-negative captions, k per row) also ``"negative_embeds" [M, E]``: the
        text tower runs once on captions and negatives together."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        negatives = None
        if negative_input_ids is not None:
            if negative_attention_mask is None:
                negative_attention_mask = torch.ones_like(negative_input_ids)
            width = max(input_ids.shape[1], negative_input_ids.shape[1])
            pad = self.text.config.pad_token_id or 0
            ids = torch.cat([F.pad(input_ids, (0, width - input_ids.shape[1]), value=pad),
                             F.pad(negative_input_ids, (0, width - negative_input_ids.shape[1]), value=pad)])
            mask = torch.cat([F.pad(attention_mask, (0, width - attention_mask.shape[1])),
                              F.pad(negative_attention_mask, (0, width - negative_attention_mask.shape[1]))])  # fmt: skip
            both = self.encode_text(ids, mask, buckets=TEXT_BUCKETS)
            texts, negatives = both.split([input_ids.shape[0], negative_input_ids.shape[0]])
        else:
            texts = self.encode_text(input_ids, attention_mask, buckets=TEXT_BUCKETS)
        out = {
            "image_embeds": self.encode_image(pixel_values),
            "text_embeds": texts,
            "logit_scale": self.scale(),
            # a copy, not the parameter itself: DDP (find_unused_parameters) finds the parameters
            # an output depends on through its grad_fn, which a bare leaf does not have
            "logit_bias": self.logit_bias.clone() if self.logit_bias is not None else None,
        }
        if negatives is not None:
            out["negative_embeds"] = negatives
        return out

    @torch.no_grad()
    def similarity(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """Cosine similarities ``[N_images, N_texts]`` (the embeddings are unit vectors)."""
        return image_embeds.float() @ text_embeds.float().T


def build_dual_encoder(config: DualEncoderConfig, tokenizer=None) -> DualEncoder:
    """The dual encoder ``config`` names. Pretrained towers (HF names / paths) are loaded;
    presets get random weights (``tiny-text``'s vocabulary is ``len(tokenizer)``, or
    ``text.overrides.vocab_size`` without a tokenizer). ``config.vision.pretrain`` is not
    applied here (the caller runs it and names the result)."""
    vision = build_vision_encoder(config.vision)
    text = build_text_model(config.text, tokenizer)
    return DualEncoder(config, vision, text)


# ---------------------------------------------------------------------- save / load


def save_dual_encoder(model: DualEncoder, tokenizer, out_dir: str | Path) -> Path:
    """Write ``out_dir`` atomically: config.json, model.safetensors, the tokenizer's files."""
    out_dir = Path(out_dir)
    text_cfg = model.text.config
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "config": model.config.model_dump(mode="json"),
        "text_hf_config": text_cfg.to_dict(),
        "text_preset": model.config.text.name in TEXT_PRESETS,
        **vision_state(model.vision),  # vision_hf_config, vision
    }
    with atomic_directory(out_dir) as tmp:
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        atomic_write_json(tmp / CONFIG_FILE, meta)  # after the tokenizer, which must not leave its own
        safetensors.torch.save_model(model, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
    return out_dir


def read_dual_encoder_config(path: str | Path) -> dict:
    """The saved ``config.json``, checked (``DualEncoderError`` names what is wrong)."""
    path = Path(path)
    file = path / CONFIG_FILE
    if not file.is_file():
        raise DualEncoderError(f"{path} is not a dual encoder directory: it has no {CONFIG_FILE}")
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DualEncoderError(f"{file} is not valid JSON: {err}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise DualEncoderError(f"{path} is not a dual encoder: format is {found!r}, expected {FORMAT!r}")
    if meta.get("version") != VERSION:
        raise DualEncoderError(f"{path}: version {meta.get('version')!r} is not supported (expected {VERSION})")
    if not (path / WEIGHTS_FILE).is_file():
        raise DualEncoderError(f"{path} has no {WEIGHTS_FILE}")
    return meta


def load_dual_encoder(path: str | Path, device: str | torch.device = "cpu") -> tuple[DualEncoder, Any]:
    """``(model in eval mode on device, tokenizer or None)`` from ``save_dual_encoder``'s directory.

    Both towers are rebuilt from the saved HF configs (nothing downloaded) and the weights are
    read from safetensors, strictly.
    """
    path = Path(path)
    meta = read_dual_encoder_config(path)
    config = DualEncoderConfig.model_validate(meta["config"])
    vision = vision_from_state(meta)
    text_dict = dict(meta["text_hf_config"])
    text_hf = CONFIG_MAPPING[text_dict["model_type"]].from_dict(text_dict)
    text = _text_model_from_config(text_hf, preset=bool(meta.get("text_preset")))
    model = DualEncoder(config, vision, text)
    safetensors.torch.load_model(model, str(path / WEIGHTS_FILE), strict=True, device=str(device))
    model.to(device)
    model.eval()
    has_tokenizer = any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"))
    tokenizer = AutoTokenizer.from_pretrained(str(path)) if has_tokenizer else None
    return model, tokenizer


def export_image_tower(model: DualEncoder, out_dir: str | Path) -> Path:
    """Write the image tower as a Hugging Face vision-model directory (``save_pretrained`` +
    ``preprocessor_config.json`` with its statistics and size), atomically -- what
    ``train.encoder_pretrain`` writes, so ``VisionConfig(name=out_dir)`` loads it into a VLM.

    The projection and temperature are not part of it. The VLM reads the family's default
    feature layer unless its recipe sets ``vision.feature_layer``: set the one the dual
    encoder used (``model.vision.feature_layer``) when that was not the default.
    """
    vision = model.vision
    if isinstance(vision, FusedVisionEncoder):
        raise DualEncoderError("export_image_tower: a fused image tower is several models; export each encoder")
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        vision.model.save_pretrained(str(tmp))
        atomic_write_json(tmp / "preprocessor_config.json",
                          {"image_mean": list(vision.image_mean), "image_std": list(vision.image_std),
                           "size": {"height": vision.image_size, "width": vision.image_size}})  # fmt: skip
    return out_dir
