"""The vision-language model: vision encoder -> connector -> causal LM (LLaVA-style splicing).

Each image becomes ``tokens_per_image`` embeddings that replace a run of that many ``<image>``
tokens in the text; images are taken in order, row by row.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel

from vlmkit.config import ModelConfig
from vlmkit.data import tiling
from vlmkit.data.tiling import TileLayout
from vlmkit.models.connectors import build_connector
from vlmkit.models.cross_attention import (
    CrossAttentionAdapter,
    CrossAttentionDecoderLayer,
    decoder_layers,
    group_media,
    insert_cross_attention,
    media_index_from_ids,
)
from vlmkit.models.varlen_attention import (
    check_attention_supported,
    hf_attn_implementation,
    packed_segments,
    wants_segments,
)
from vlmkit.models.vision import VisionEncoder, build_vision_encoder
from vlmkit.train.losses import chunked_next_token_loss, next_token_loss

IMAGE_TOKEN = "<image>"
LLM_PRESETS = ("tiny-llama",)


class ImageTokenMismatch(ValueError):
    """The ``<image>`` tokens of a batch don't line up with the images given."""


@dataclass
class VLMOutput:
    logits: torch.Tensor | None  # [B, T, V] (None when the loss was computed in chunks)
    loss_sum: torch.Tensor | None  # scalar: summed token CE over targets (None without labels)
    n_targets: torch.Tensor | None  # int64 scalar: number of target tokens (None without labels)


# ---------------------------------------------------------------------- LLM helpers


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """``cumsum - 1`` clamped at 0: real tokens count from 0 whatever the (left) padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def embedding_rms(llm: PreTrainedModel) -> float:
    """RMS of the LLM's input-embedding matrix (the scale text embeddings enter the LLM at)."""
    w = llm.get_input_embeddings().weight.detach().float()
    return float(w.pow(2).mean().sqrt())


def _grown(rows: torch.Tensor, new_size: int) -> torch.Tensor:
    """``rows`` [V, ...] extended to ``new_size`` rows, the new ones the mean of the old."""
    grown = rows.new_empty((new_size, *rows.shape[1:]))
    with torch.no_grad():
        grown[: rows.shape[0]] = rows
        grown[rows.shape[0] :] = rows.float().mean(0).to(rows.dtype)
    return grown


def resize_embeddings_mean_init(llm: PreTrainedModel, new_size: int) -> None:
    """Grow the vocabulary to ``new_size`` rows; new rows (input and, if untied, output) = mean of old rows.

    Mean initialisation keeps the new tokens' logits at the average of the existing ones, so adding
    tokens does not disturb the model's distribution (Hewitt, 2021).
    """
    emb = llm.get_input_embeddings()
    old_size, dim = emb.weight.shape
    if new_size <= old_size:
        return
    out = llm.get_output_embeddings()
    tied = out is not None and out.weight is emb.weight
    # grow the weights in place, keeping the modules: some LLMs' embedding modules do more than
    # a lookup (Gemma's scales by sqrt(hidden_size)), and a plain nn.Embedding would drop that
    emb.weight = nn.Parameter(_grown(emb.weight.data, new_size), requires_grad=emb.weight.requires_grad)
    emb.num_embeddings = new_size
    if out is not None:
        if tied:
            out.weight = emb.weight
        else:
            out.weight = nn.Parameter(_grown(out.weight.data, new_size), requires_grad=out.weight.requires_grad)
            if out.bias is not None:
                out.bias = nn.Parameter(_grown(out.bias.data, new_size), requires_grad=out.bias.requires_grad)
        if hasattr(out, "out_features"):
            out.out_features = new_size
    llm.config.vocab_size = new_size
    text_cfg = llm.config.get_text_config() if hasattr(llm.config, "get_text_config") else llm.config
    text_cfg.vocab_size = new_size


def tiny_llama_config(tokenizer, overrides: dict | None = None) -> LlamaConfig:
    """The ``tiny-llama`` preset with ``overrides`` applied at construction, so that derived
    fields follow them (``head_dim`` is ``hidden_size / num_attention_heads`` unless given)."""
    fields = dict(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    known = LlamaConfig()
    for key in overrides or {}:
        if not hasattr(known, key):
            raise ValueError(f"llm.overrides: LlamaConfig has no field {key!r}")
    return LlamaConfig(**{**fields, **(overrides or {})})


def build_llm(model_cfg: ModelConfig, tokenizer) -> PreTrainedModel:
    name = model_cfg.llm.name
    if name == "tiny-llama":
        llm = AutoModelForCausalLM.from_config(
            tiny_llama_config(tokenizer, model_cfg.llm.overrides), attn_implementation=hf_attn_implementation(model_cfg.llm)
        )
    else:
        llm = AutoModelForCausalLM.from_pretrained(
            name, attn_implementation=hf_attn_implementation(model_cfg.llm), **model_cfg.llm.overrides
        )
    check_attention_supported(llm.config, model_cfg.llm.attn_implementation)
    if len(tokenizer) > llm.get_input_embeddings().weight.shape[0]:
        resize_embeddings_mean_init(llm, len(tokenizer))
    return llm


def _adapter_of(llm: PreTrainedModel, mode: str) -> CrossAttentionAdapter:
    """The adapter over the cross-attention blocks already inside ``llm``'s decoder layers."""
    wrapped = [(i, layer) for i, layer in enumerate(decoder_layers(llm)) if isinstance(layer, CrossAttentionDecoderLayer)]
    return CrossAttentionAdapter([layer.xattn for _, layer in wrapped], [i for i, _ in wrapped], mode,
                                 wrapped[0][1]._media_slot)  # fmt: skip


def _runs(flags: torch.Tensor) -> list[int]:
    """Lengths of the runs of True in a 1-D bool tensor, left to right (vectorised: this runs on
    every forward, over every row)."""
    f = flags.to(torch.int8)
    zero = f.new_zeros(1)
    edges = torch.diff(f, prepend=zero, append=zero)  # +1 where a run starts, -1 just after it ends
    return ((edges == -1).nonzero().flatten() - (edges == 1).nonzero().flatten()).tolist()


def add_marker_tokens(tokenizer, model_cfg: ModelConfig) -> int:
    """Add the tiling marker tokens ``model_cfg`` needs (``split`` mode) to ``tokenizer``, as
    special tokens; returns how many were added."""
    t = model_cfg.tiling
    if t is None or t.mode != "split":
        return 0
    per_side = -(-(t.max_side or 4 * model_cfg.vision.image_size) // model_cfg.vision.image_size)
    markers = tiling.split_marker_tokens(per_side, per_side)
    vocab = tokenizer.get_vocab()
    missing = [m for m in markers if m not in vocab]
    if missing:
        tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
    return len(missing)


def image_token_id_of(tokenizer) -> int:
    tid = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if tid is None or (tokenizer.unk_token_id is not None and tid == tokenizer.unk_token_id):
        raise ValueError(f"the tokenizer has no {IMAGE_TOKEN!r} token; add it as a special token")
    return int(tid)


# ---------------------------------------------------------------------- the model


class ImageNewline(nn.Module):
    """LLaVA-NeXT's learned embedding appended after each row of a tiled image's features, so
    the LLM can tell where a row of the (unpadded) feature map ends."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.embedding = nn.Parameter(torch.randn(dim) / dim**0.5)


class VisionLanguageModel(nn.Module):
    """Vision encoder -> connector -> causal LM.

    ``fusion: splice`` (LLaVA): each image's embeddings replace its ``<image>`` tokens.
    ``tokens_per_tile`` is what one encoder-sized image costs after the connector; with
    ``model.tiling`` an image is several tiles and costs ``image_segments(layout)`` tokens.
    """

    def __init__(
        self,
        config: ModelConfig,
        vision: VisionEncoder,
        connector: nn.Module,
        llm: PreTrainedModel,
        image_token_id: int,
    ) -> None:
        super().__init__()
        self.config = config
        self.vision = vision
        self.connector = connector
        self.llm = llm
        self.image_token_id = int(image_token_id)
        self.tokens_per_tile = int(connector.num_output_tokens(vision.num_tokens))
        c = config.connector
        self.cross_attention: CrossAttentionAdapter | None = None
        if c.fusion == "cross_attention":
            if config.tiling is not None:
                raise ValueError("model.tiling: tiled images are not supported with connector.fusion=cross_attention")
            if not any(isinstance(m, CrossAttentionDecoderLayer) for m in decoder_layers(llm)):
                insert_cross_attention(llm, c.cross_attention_every, c.num_heads, c.cross_attention_media)
            # not a registered submodule: its blocks already live in the LLM's layers (``*.xattn.*``)
            self.__dict__["cross_attention"] = _adapter_of(llm, c.cross_attention_media)
        tiling = config.tiling
        self.newline = None
        if tiling is not None:
            side = math.isqrt(self.tokens_per_tile)
            if tiling.mode == "anyres" and c.type in ("perceiver", "qformer"):
                raise ValueError(
                    f"model.tiling: anyres lays tile features out on a grid; connector.type {c.type!r} "
                    "gives learned queries, not a grid (use split tiling, or a grid connector)"
                )
            if tiling.mode == "anyres" and side * side != self.tokens_per_tile:
                raise ValueError(
                    f"model.tiling: anyres needs a square grid of tokens per tile, the connector gives "
                    f"{self.tokens_per_tile}"
                )
            if tiling.mode == "anyres" and tiling.newline:
                self.newline = ImageNewline(llm.config.get_text_config().hidden_size)

    # set by data-parallel training (train.parallel): run the vision tower even without images
    run_vision_without_images: bool = False

    def set_image_size(self, image_size: int) -> None:
        """Continue at another image resolution (a ``highres`` stage): the encoder runs at
        ``image_size`` (ViT position embeddings interpolated), each image costs the tokens of the
        new grid, and ``config.vision.image_size`` records it so checkpoints reload at that size."""
        if image_size == self.config.vision.image_size:
            return
        self.vision.set_image_size(image_size)
        vision_cfg = self.config.vision.model_copy(update={"image_size": int(image_size)})
        self.config = self.config.model_copy(update={"vision": vision_cfg})
        self.tokens_per_tile = int(self.connector.num_output_tokens(self.vision.num_tokens))
        if self.config.tiling is not None and self.config.tiling.mode == "anyres":
            side = math.isqrt(self.tokens_per_tile)
            if side * side != self.tokens_per_tile:
                raise ValueError(f"image_size {image_size}: anyres needs a square grid, the connector gives "
                                 f"{self.tokens_per_tile} tokens")  # fmt: skip

    @property
    def fuses_by_cross_attention(self) -> bool:
        return self.cross_attention is not None

    @property
    def tokens_per_image(self) -> int:
        """Text tokens of one untiled image (the template's expansion of a plain ``<image>``):
        its embeddings, or one marker token with cross-attention fusion."""
        return 1 if self.fuses_by_cross_attention else self.tokens_per_tile

    @classmethod
    def from_config(cls, model_cfg: ModelConfig, tokenizer) -> "VisionLanguageModel":
        """Build vision encoder, connector and LLM from the config (presets: random weights).

        Tiling marker tokens (``split`` mode) missing from ``tokenizer`` are added to it first.
        """
        add_marker_tokens(tokenizer, model_cfg)
        image_token_id = image_token_id_of(tokenizer)
        vision = build_vision_encoder(model_cfg.vision)
        llm = build_llm(model_cfg, tokenizer)
        connector = build_connector(
            model_cfg.connector,
            vision.hidden_size,
            llm.config.get_text_config().hidden_size,
            target_rms=embedding_rms(llm),
        )
        return cls(model_cfg, vision, connector, llm, image_token_id)

    def parts(self) -> dict[str, nn.Module]:
        """Trainable parts by name. The connector part is everything that maps image features
        into the LLM: the connector and, with anyres tiling, the row-end embedding."""
        bridge = [self.connector, self.newline]
        if self.cross_attention is not None:
            bridge.append(self.cross_attention.blocks)
        return {"vision": self.vision, "connector": nn.ModuleList([m for m in bridge if m is not None]),
                "llm": self.llm}  # fmt: skip

    def added_to_llm(self) -> list[str]:
        """Full names of parameters that vlmkit inserted into the LLM (cross-attention blocks)."""
        return [f"llm.{n}" for n, _ in self.llm.named_parameters() if ".xattn." in n]

    @property
    def device(self) -> torch.device:
        return self.llm.get_input_embeddings().weight.device

    # ------------------------------------------------------------------ images

    def image_segments(self, layout: TileLayout | None = None) -> int | list[tuple[str | None, int]]:
        """What one image's ``<image>`` placeholder expands to (see ``ChatTemplate._expand``)."""
        k = self.tokens_per_tile
        if self.fuses_by_cross_attention:
            return 1  # the marker; the embeddings reach the LLM through cross-attention
        if layout is None or layout.mode == "single":
            return k
        if layout.mode == "anyres":
            return tiling.anyres_num_tokens(layout, math.isqrt(k), newline=self.newline is not None)
        return tiling.split_segments(layout, k)

    def image_token_count(self, layout: TileLayout | None = None) -> int:
        """How many ``<image>`` tokens (markers excluded) one image with ``layout`` fills."""
        seg = self.image_segments(layout)
        return seg if isinstance(seg, int) else sum(n for _, n in seg)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Tiles ``[N, 3, S, S]`` -> ``[N, tokens_per_tile, D]`` in the LLM's embedding dtype."""
        feats = self.connector(self.vision(pixel_values))
        return feats.to(self.llm.get_input_embeddings().weight.dtype)

    def image_features(
        self, pixel_values: torch.Tensor, layouts: Sequence[TileLayout] | None = None
    ) -> list[torch.Tensor]:
        """Per image, the ``[n_i, D]`` embeddings its image tokens receive, in token order.

        ``pixel_values`` holds every image's tiles back to back (``layout.n_tiles`` each; one
        per image without layouts). Anyres: thumbnail, then the tile grid's feature map with the
        padding removed and a newline embedding after each row (LLaVA-NeXT). Split: each tile in
        row-major order, then the thumbnail (Idefics3); the marker tokens between them are text.
        """
        tiles = self.encode_images(pixel_values)  # [sum K, k, D]
        if layouts is None:
            return list(tiles)
        if sum(lay.n_tiles for lay in layouts) != tiles.shape[0]:
            raise ImageTokenMismatch(
                f"{tiles.shape[0]} tiles were given but the layouts describe {sum(l.n_tiles for l in layouts)}"
            )
        out, at = [], 0
        for lay in layouts:
            own = tiles[at : at + lay.n_tiles]
            at += lay.n_tiles
            if lay.mode == "anyres":
                out.append(self._anyres_features(own, lay))
            else:
                out.append(own.reshape(-1, own.shape[-1]))
        return out

    def _anyres_features(self, tiles: torch.Tensor, lay: TileLayout) -> torch.Tensor:
        k, d = tiles.shape[1], tiles.shape[2]
        side = math.isqrt(k)
        thumb, grid = tiles[0], tiles[1:]  # [k, D], [rows*cols, k, D]
        # [rows, cols, side, side, D] -> [rows, side, cols, side, D] -> [rows*side, cols*side, D]
        fmap = grid.reshape(lay.rows, lay.cols, side, side, d).permute(0, 2, 1, 3, 4)
        fmap = tiling.unpad_features(fmap.reshape(lay.rows * side, lay.cols * side, d), lay.original_size)
        if self.newline is not None:
            nl = self.newline.embedding.to(fmap.dtype).expand(fmap.shape[0], 1, d)
            fmap = torch.cat([fmap, nl], dim=1)  # [h, w + 1, D]
        return torch.cat([thumb, fmap.reshape(-1, d)], dim=0)

    def _image_runs(self, layout: TileLayout | None) -> list[int]:
        """The runs of consecutive image tokens one image fills (split mode: one per tile)."""
        seg = self.image_segments(layout)
        return [seg] if isinstance(seg, int) else [n for _, n in seg]

    def _check_image_tokens(
        self, is_img: torch.Tensor, layouts: list[TileLayout | None], sample_ids: Sequence | None
    ) -> None:
        """Each row's runs of image tokens must be filled by whole images, taken in order.

        A run may hold several images back to back (``<image><image>``), never part of one.
        """
        rows = is_img.shape[0]
        ids = list(sample_ids) if sample_ids is not None else [f"row {i}" for i in range(rows)]
        expected: list[int] = []  # the runs every image fills, in order
        image_of_run: list[int] = []  # which image each of them belongs to
        for i, lay in enumerate(layouts):
            runs = self._image_runs(lay)
            expected += runs
            image_of_run += [i] * len(runs)
        mask = is_img.cpu()
        row_counts = mask.sum(1).tolist()
        at = 0
        broken = []
        for r in range(rows):
            for run in _runs(mask[r]):
                got = 0
                while got < run and at < len(expected):
                    got += expected[at]
                    at += 1
                if got != run:
                    broken.append(r)
                    break
            else:
                # a row must end on an image boundary
                if at < len(expected) and at > 0 and image_of_run[at] == image_of_run[at - 1]:
                    broken.append(r)
            if broken:
                break
        if not broken and at == len(expected):
            return
        k = self.tokens_per_tile
        if all(lay is None or lay.mode == "single" for lay in layouts):  # untiled: report whole images
            bad = [r for r in range(rows) if any(run % k for run in _runs(mask[r]))]
            if bad:
                detail = ", ".join(f"{ids[r]} ({row_counts[r]} image tokens)" for r in bad)
                raise ImageTokenMismatch(
                    f"image tokens do not come in whole runs of {k} (tokens_per_image) in: {detail}"
                )
            per_row_text = ", ".join(f"{ids[r]}: {row_counts[r] // k}" for r in range(rows))
            raise ImageTokenMismatch(
                f"the batch's <image> tokens make {sum(row_counts) // k} image(s) but {len(layouts)} "
                f"image(s) were given (images per sample by tokens: {per_row_text})"
            )
        per_row_text = ", ".join(f"{ids[r]}: {row_counts[r]}" for r in range(rows))
        raise ImageTokenMismatch(
            f"the batch's image tokens (per sample: {per_row_text}) are not filled by whole images: "
            f"the {len(layouts)} image(s) given fill runs of {expected} tokens"
        )

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        sample_ids: Sequence | None = None,
        image_layouts: Sequence[TileLayout] | None = None,
    ) -> torch.Tensor:
        """Token embeddings with each image's features over its ``<image>`` tokens, in order."""
        embeds = self.llm.get_input_embeddings()(input_ids)
        is_img = input_ids == self.image_token_id
        if pixel_values is None:
            layouts_or_none: list = []
        else:
            layouts_or_none = list(image_layouts) if image_layouts is not None else [None] * int(pixel_values.shape[0])
        n_images = len(layouts_or_none)
        self._check_image_tokens(is_img, layouts_or_none, sample_ids)
        if n_images == 0 and self.run_vision_without_images and torch.is_grad_enabled():
            embeds = embeds + self._idle_vision_term(embeds)
        if n_images == 0 or self.fuses_by_cross_attention:
            return embeds  # cross-attention: the <image> markers keep their token embeddings
        feats = torch.cat(self.image_features(pixel_values, image_layouts), dim=0)  # [sum n_i, D]
        # masked_scatter fills positions in row-major order: images in order, row by row
        return embeds.masked_scatter(is_img.unsqueeze(-1), feats)

    def _idle_vision_term(self, embeds: torch.Tensor) -> torch.Tensor:
        """A zero that depends on every image parameter: the vision tower and connector run on
        one blank image. Data-parallel training sets ``run_vision_without_images`` so that a
        rank whose batch has no image still takes part in the collectives of those modules."""
        size = self.config.vision.image_size
        blank = embeds.new_zeros((1, 3, size, size), dtype=torch.float32)
        zero = self.encode_images(blank).sum() * 0.0
        if self.newline is not None:
            zero = zero + self.newline.embedding.sum() * 0.0
        return zero.to(embeds.dtype)

    @contextmanager
    def reading_images(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None):
        """Context for the LLM calls of one batch. With cross-attention fusion it hands the
        batch's image embeddings to the gated blocks and yields ``advance(new_ids [B, t])``,
        to call before each decoding step; with splicing it does nothing (``advance`` is a no-op).
        ``advance(new_ids)`` continues the media index over the new tokens (KV-cache decoding);
        ``advance(new_ids, whole=ids)`` recomputes it over the whole sequence (no cache).
        """
        xattn = self.cross_attention
        if xattn is None:
            yield lambda new_ids, whole=None: None
            return
        is_img = input_ids == self.image_token_id
        per_row = is_img.sum(1)  # [B] images per row
        dim = self.llm.config.get_text_config().hidden_size
        if pixel_values is None or pixel_values.shape[0] == 0:
            feats = self.llm.get_input_embeddings().weight.new_zeros(0, self.tokens_per_tile, dim)
        else:
            feats = self.encode_images(pixel_values)  # [N, K, D]
        media, media_mask = group_media(feats, per_row.cpu())
        seen = per_row.clone()

        def advance(new_ids: torch.Tensor, whole: torch.Tensor | None = None) -> None:
            nonlocal seen
            # a generated <image> token has no image behind it: never index past the real ones
            if whole is not None:
                index = media_index_from_ids(whole, self.image_token_id)
            else:
                index = media_index_from_ids(new_ids, self.image_token_id, offset=seen)
            index = torch.minimum(index, per_row[:, None])
            seen = index[:, -1]
            xattn.set_media_index(index)

        with xattn.media(media, media_mask, media_index_from_ids(input_ids, self.image_token_id)):
            yield advance

    # ------------------------------------------------------------------ forward / generate

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        sample_ids: Sequence | None = None,
        image_layouts: Sequence[TileLayout] | None = None,
        loss_chunk_tokens: int | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> VLMOutput:
        """Logits (and with ``labels`` the summed loss and target count). With
        ``loss_chunk_tokens`` the loss is computed from the hidden states a chunk of target
        positions at a time and no logits are returned (``train.losses.chunked_next_token_loss``).

        ``position_ids`` marks packed rows (``data.packing``): they restart at 0 for each sample
        and the LLM gets no attention mask, so that it builds the block-diagonal causal mask (or
        the flash-attention varlen lengths) from them.
        """
        if position_ids is not None and self.fuses_by_cross_attention:
            raise ValueError("packed rows are not supported with cross-attention fusion (media would leak across samples)")
        embeds = self.embed(input_ids, pixel_values, sample_ids, image_layouts)
        if position_ids is None:
            llm_inputs = dict(inputs_embeds=embeds, attention_mask=attention_mask,
                              position_ids=position_ids_from_mask(attention_mask), use_cache=False)  # fmt: skip
        else:
            llm_inputs = dict(inputs_embeds=embeds, attention_mask=None, position_ids=position_ids, use_cache=False)
            if wants_segments(self.config.llm.attn_implementation, position_ids.device):  # once, not per layer
                cu_seqlens, max_len = packed_segments(position_ids)
                llm_inputs.update(cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens,
                                  max_length_q=max_len, max_length_k=max_len)  # fmt: skip
        if loss_chunk_tokens is not None and labels is not None:
            softcap = getattr(self.llm.config.get_text_config(), "final_logit_softcapping", None)
            with self.reading_images(input_ids, pixel_values):
                hidden = self.llm.get_decoder()(**llm_inputs).last_hidden_state
            loss_sum, n_targets = chunked_next_token_loss(hidden, labels, self.llm.get_output_embeddings(),
                                                          loss_chunk_tokens, softcap)  # fmt: skip
            return VLMOutput(logits=None, loss_sum=loss_sum, n_targets=n_targets)
        with self.reading_images(input_ids, pixel_values):
            out = self.llm(**llm_inputs)
        logits = out.logits
        loss_sum = n_targets = None
        if labels is not None:
            loss_sum, n_targets = next_token_loss(logits, labels)
        return VLMOutput(logits=logits, loss_sum=loss_sum, n_targets=n_targets)

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        stop_token_ids: Sequence[int] = (),
        temperature: float = 0.0,
        top_p: float = 1.0,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
        image_layouts: Sequence[TileLayout] | None = None,
    ) -> list[list[int]]:
        """New tokens per row (stop token excluded); see ``vlmkit.infer.generate.generate``."""
        from vlmkit.infer.generate import generate

        return generate(
            self,
            input_ids,
            attention_mask,
            pixel_values=pixel_values,
            max_new_tokens=max_new_tokens,
            stop_token_ids=stop_token_ids,
            temperature=temperature,
            top_p=top_p,
            use_cache=use_cache,
            generator=generator,
            image_layouts=image_layouts,
        )
