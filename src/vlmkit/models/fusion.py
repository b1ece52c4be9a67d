"""A single-stream fusion encoder (ViLT, Kim et al. 2021; VisualBERT, Li et al. 2019).

Where a LLaVA-style VLM feeds image features to a causal LM that generates text, a fusion
encoder reads an image and a text *together* in one bidirectional transformer and is trained
with BERT-style objectives: masked-language modelling (MLM, predict masked words from the rest
of the text and the image) and image-text matching (ITM, does this text describe this image?).
The objectives live in ``vlmkit.train.fusion_objectives``, the evaluation in
``vlmkit.eval.fusion_eval``; see docs/fusion.md.

Architecture (ViLT's "patch projection" visual embedding, no CNN or detector)::

    text ids [B, L] --word_embed--> [B, L, H] + text_pos[:L] + modality[TEXT]
    pixels [B, 3, S, S] --patch_embed (Conv2d k=P, s=P: a linear map of each P x P patch)-->
        [B, N, H] + image_pos + modality[IMAGE]               (N = (S / P)^2 patches)
    [CLS] (learned vector) + modality[TEXT]                       [B, 1, H]
    x = LayerNorm(cat([CLS, text, image], dim=1))               [B, 1 + L + N, H]
    x = torch.nn.TransformerEncoder (pre-LN layers, key padding mask on text pads)
    MLM head: text positions -> dense -> GELU -> LayerNorm -> decoder   [B, L, V]
    ITM head: pooler (dense + tanh on [CLS]) -> linear                  [B, 2]  (0: mismatch, 1: match)

The MLM decoder is **tied** to the word embeddings by default (``tie_word_embeddings``, as in
BERT), with its own output bias; set it False for an untied decoder.

Saved as a directory: ``config.json`` (``{"format", "version", "config", "meta"}``) and
``model.safetensors`` (tied weights written once), plus the tokenizer files when one is given;
the directory is replaced atomically (`vlmkit.utils.io.atomic_directory`). Never a pickle.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from pydantic import Field, model_validator
from torch import nn

from vlmkit.config import StrictModel
from vlmkit.utils.io import atomic_directory, atomic_write_json

FORMAT = "vlmkit-fusion-encoder"
VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"

TEXT, IMAGE = 0, 1  # modality (token-type) ids


class FusionEncoderConfig(StrictModel):
    """Sizes of a `FusionEncoder`. ``vocab_size`` must cover the tokenizer (``len(tokenizer)``,
    mask token included); ``mask_token_id`` is the id MLM writes in place of masked words."""

    image_size: int = Field(64, gt=0)
    patch_size: int = Field(16, gt=0)
    channels: int = Field(3, gt=0)
    vocab_size: int = Field(1024, gt=0)
    max_text_len: int = Field(96, gt=0)
    hidden: int = Field(64, gt=0)  # the defaults are the CPU model measured in docs/fusion.md
    layers: int = Field(3, gt=0)
    heads: int = Field(4, gt=0)
    mlp_ratio: float = Field(4.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)  # BERT and ViLT use 0.1; 0 learns faster in the tiny regime
    layer_norm_eps: float = Field(1e-6, gt=0)
    pad_token_id: int = Field(0, ge=0)
    mask_token_id: int | None = None
    tie_word_embeddings: bool = True
    init_std: float = Field(0.02, gt=0)

    @model_validator(mode="after")
    def _check(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden {self.hidden} is not divisible by heads {self.heads}")
        for name in ("pad_token_id", "mask_token_id"):
            v = getattr(self, name)
            if v is not None and v >= self.vocab_size:
                raise ValueError(f"{name} {v} is outside the vocabulary (vocab_size {self.vocab_size})")
        return self

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class FusionOutput:
    hidden: torch.Tensor  # [B, 1 + L + N, H] final hidden states (after the final LayerNorm)
    mlm_logits: torch.Tensor | None  # [B, L, V] over the text positions
    itm_logits: torch.Tensor | None  # [B, 2] (index 1 = the text matches the image)


class FusionEncoder(nn.Module):
    """One transformer over [CLS] + text tokens + image patches, with MLM and ITM heads."""

    def __init__(self, config: FusionEncoderConfig) -> None:
        super().__init__()
        self.config = c = config
        h = c.hidden
        # ---- embeddings
        self.word_embed = nn.Embedding(c.vocab_size, h, padding_idx=c.pad_token_id)
        self.text_pos = nn.Parameter(torch.zeros(1, c.max_text_len, h))
        # a Conv2d with kernel = stride = patch size is exactly a linear map of each flattened patch
        self.patch_embed = nn.Conv2d(c.channels, h, kernel_size=c.patch_size, stride=c.patch_size)
        self.image_pos = nn.Parameter(torch.zeros(1, c.num_patches, h))
        self.cls = nn.Parameter(torch.zeros(1, 1, h))
        self.modality = nn.Embedding(2, h)  # TEXT / IMAGE token-type embedding
        self.embed_norm = nn.LayerNorm(h, eps=c.layer_norm_eps)
        self.embed_drop = nn.Dropout(c.dropout)
        # ---- the single-stream encoder: PyTorch's own transformer layer (pre-LN, GELU)
        layer = nn.TransformerEncoderLayer(
            d_model=h,
            nhead=c.heads,
            dim_feedforward=int(round(h * c.mlp_ratio)),
            dropout=c.dropout,
            activation="gelu",
            layer_norm_eps=c.layer_norm_eps,
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(
            layer, c.layers, norm=nn.LayerNorm(h, eps=c.layer_norm_eps), enable_nested_tensor=False
        )
        # ---- heads
        self.mlm_transform = nn.Sequential(nn.Linear(h, h), nn.GELU(), nn.LayerNorm(h, eps=c.layer_norm_eps))
        self.mlm_decoder = nn.Linear(h, c.vocab_size)
        self.pooler = nn.Sequential(nn.Linear(h, h), nn.Tanh())
        self.itm_head = nn.Linear(h, 2)
        self._init_weights()
        if c.tie_word_embeddings:
            self.mlm_decoder.weight = self.word_embed.weight

    def _init_weights(self) -> None:
        std = self.config.init_std
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.trunc_normal_(m.weight, std=std)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        with torch.no_grad():
            self.word_embed.weight[self.config.pad_token_id].zero_()
        for p in (self.text_pos, self.image_pos, self.cls):
            nn.init.trunc_normal_(p, std=std)

    # ------------------------------------------------------------------ embeddings

    @property
    def num_patches(self) -> int:
        return self.config.num_patches

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        """The summed embeddings before the embedding LayerNorm: ``[B, 1 + L + N, H]``
        (position 0: [CLS], then L text tokens, then N image patches)."""
        b, length = input_ids.shape
        if length > self.config.max_text_len:
            raise ValueError(f"text of {length} tokens is longer than max_text_len {self.config.max_text_len}")
        s = self.config.image_size
        if pixel_values.shape[1:] != (self.config.channels, s, s):
            want = f"[B, {self.config.channels}, {s}, {s}]"
            raise ValueError(f"pixel_values {tuple(pixel_values.shape)}: expected {want}")
        if pixel_values.shape[0] != b:
            raise ValueError(f"{pixel_values.shape[0]} images for {b} texts")
        pixel_values = pixel_values.to(self.patch_embed.weight.dtype)
        text = self.word_embed(input_ids) + self.text_pos[:, :length]  # [B, L, H]
        text = text + self.modality.weight[TEXT]
        image = self.patch_embed(pixel_values).flatten(2).transpose(1, 2)  # [B, H, S/P, S/P] -> [B, N, H]
        image = image + self.image_pos + self.modality.weight[IMAGE]  # [B, N, H]
        cls = (self.cls + self.modality.weight[TEXT]).expand(b, -1, -1)  # [B, 1, H]
        return torch.cat([cls, text, image], dim=1)  # [B, 1 + L + N, H]

    def modality_ids(self, text_len: int) -> torch.Tensor:
        """``[1 + L + N]``: TEXT for [CLS] and the text positions, IMAGE for the patches."""
        return torch.tensor([TEXT] * (1 + text_len) + [IMAGE] * self.num_patches)

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, L] token ids (pad: pad_token_id)
        attention_mask: torch.Tensor | None,  # [B, L] 1 = real token, 0 = padding; None: all real
        pixel_values: torch.Tensor,  # [B, 3, S, S] normalised pixels (ImageProcessor)
        mlm: bool = True,
        itm: bool = True,
    ) -> FusionOutput:
        b, length = input_ids.shape
        x = self.embed_drop(self.embed_norm(self.embed(input_ids, pixel_values)))  # [B, T, H], T = 1 + L + N
        if attention_mask is None:
            attention_mask = torch.ones(b, length, dtype=torch.bool, device=input_ids.device)
        keep = torch.ones(b, 1 + length + self.num_patches, dtype=torch.bool, device=input_ids.device)
        keep[:, 1 : 1 + length] = attention_mask.bool()
        h = self.encoder(x, src_key_padding_mask=~keep)  # [B, T, H]; True in the mask = ignored key
        mlm_logits = self.mlm_decoder(self.mlm_transform(h[:, 1 : 1 + length])) if mlm else None  # [B, L, V]
        itm_logits = self.itm_head(self.pooler(h[:, 0])) if itm else None  # [B, 2]
        return FusionOutput(h, mlm_logits, itm_logits)

    # ------------------------------------------------------------------ save / load

    def save(self, path: str | Path, tokenizer=None, meta: dict[str, Any] | None = None) -> Path:
        """Write ``config.json`` + ``model.safetensors`` (+ the tokenizer's files) to ``path``,
        replacing the directory atomically. ``meta``: JSON-able notes kept in config.json
        (e.g. how the training texts were phrased)."""
        path = Path(path)
        with atomic_directory(path) as tmp:
            self.write_to(tmp, tokenizer, meta)
        return path

    def write_to(self, directory: str | Path, tokenizer=None, meta: dict[str, Any] | None = None) -> None:
        """``save``'s files into an existing directory that the caller makes atomic (a
        training checkpoint adds its training state next to them)."""
        directory = Path(directory)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(directory))
        # after the tokenizer, so a config.json of its own can never win
        atomic_write_json(
            directory / CONFIG_FILE,
            {"format": FORMAT, "version": VERSION, "config": self.config.model_dump(mode="json"),
             "meta": meta or {}},  # fmt: skip
        )
        # save_model writes tied parameters once (safetensors refuses shared storage otherwise)
        safetensors.torch.save_model(self, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "FusionEncoder":
        """Rebuild from ``config.json`` and load the weights strictly; returned in eval mode."""
        path = Path(path)
        info = read_fusion_config(path)
        model = cls(FusionEncoderConfig.model_validate(info["config"]))
        safetensors.torch.load_model(model, str(path / WEIGHTS_FILE), strict=True, device=str(device))
        model.to(device)
        model.eval()
        return model


def read_fusion_config(path: str | Path) -> dict:
    """The parsed ``config.json`` of a saved fusion encoder (ValueError if it is not one)."""
    path = Path(path)
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise ValueError(f"{path} is not a fusion encoder checkpoint: no {CONFIG_FILE}")
    info = json.loads(cfg_file.read_text(encoding="utf-8"))
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        found = info.get("format") if isinstance(info, dict) else None
        raise ValueError(f"{path}: format {found!r}, expected {FORMAT!r}")
    if info.get("version") != VERSION:
        raise ValueError(f"{path}: version {info.get('version')!r} is not supported (expected {VERSION})")
    if not (path / WEIGHTS_FILE).is_file():
        raise ValueError(f"{path} has no {WEIGHTS_FILE}")
    return info


def load_fusion(path: str | Path, device: str | torch.device = "cpu"):
    """``(model, tokenizer, meta)`` from a directory written by `FusionEncoder.save` with a tokenizer."""
    from transformers import AutoTokenizer

    path = Path(path)
    model = FusionEncoder.load(path, device)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    return model, tokenizer, read_fusion_config(path).get("meta", {})
