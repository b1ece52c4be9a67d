"""Gated cross-attention ("feature-level" fusion): Flamingo (Alayrac et al. 2022, "Flamingo: a
Visual Language Model for Few-Shot Learning") inserted into any Hugging Face causal LM.

Instead of splicing image embeddings into the token sequence (LLaVA), each image keeps one
``<image>`` marker token in the text, and gated cross-attention blocks placed before every k-th
decoder layer let the text tokens read the image embeddings::

    h = h + tanh(alpha_attn) * CrossAttn(LN(h), media)
    h = h + tanh(alpha_ffn)  * FFN(LN(h))

Both gates start at 0, so a freshly inserted block is the identity and the LM is unchanged.

Which images a text token sees (Flamingo sec. 2.3): ``media_index[b, t]`` is the number of
``<image>`` markers at or before position ``t`` of row ``b``. Mode ``"last"`` (Flamingo) lets the
token attend to image number ``media_index`` only, mode ``"all"`` to images ``1..media_index``.
A token with ``media_index == 0`` sees no image; for it the whole block is the identity (its
cross-attention output is exactly 0 and the gated FFN is skipped too), so text before the first
image is computed exactly as by the plain LM.

Usage::

    adapter = insert_cross_attention(llm, every=4, num_heads=8, mode="last")
    media, media_mask = group_media(image_embeds, images_per_row)   # [B, M, K, D], [B, M]
    media_index = media_index_from_ids(input_ids, image_token_id)   # [B, T]
    with adapter.media(media, media_mask, media_index):
        logits = llm(input_ids=input_ids, attention_mask=attention_mask).logits

KV-cache decoding: keep the context open, and before each step give the media index of the new
tokens only, continued from the images each row has already seen::

    seen = (input_ids == image_token_id).sum(1)                     # [B]
    with adapter.media(media, media_mask, media_index_from_ids(input_ids, image_token_id)):
        out = llm(input_ids=input_ids, cache=cache, use_cache=True)   # prefill
        for ...:
            step_index = media_index_from_ids(next_ids, image_token_id, offset=seen)  # [B, 1]
            seen = step_index[:, -1]
            adapter.set_media_index(step_index)
            out = llm(input_ids=next_ids, cache=cache, use_cache=True)

Image keys/values are recomputed at every step (nothing of the cross-attention is cached).

Parameter names. ``insert_cross_attention`` replaces ``layers[i]`` (``i = 0, k, 2k, ...``) by a
``CrossAttentionDecoderLayer`` that holds the block as ``xattn`` and the original layer as
``layer``. For a ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` (layers at ``model.layers``):

* wrapped layer ``i``: ``model.layers.{i}.layer.<original names>``, e.g.
  ``model.layers.0.layer.self_attn.q_proj.weight``;
* its block: ``model.layers.{i}.xattn.`` + one of ``alpha_attn``, ``alpha_ffn``,
  ``attn_norm.{weight,bias}``, ``attn.{q_proj,k_proj,v_proj,o_proj}.weight``,
  ``ffn_norm.{weight,bias}``, ``ffn.{up_proj,down_proj}.weight``;
* other layers keep their names (``model.layers.{j}.*``).

A trainable glob for the blocks is ``*.xattn.*``. Load pretrained LM weights before inserting
(the wrapped layers' names gain ``.layer.``). The adapter's own parameters (``blocks.{n}.*``)
are the same tensors as the LM's ``...xattn.*``: a module that registers both the LM and the
adapter lists them once in ``named_parameters()`` but twice in ``state_dict()``.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

MediaMode = Literal["last", "all"]
MEDIA_MODES = ("last", "all")


# ---------------------------------------------------------------------- media bookkeeping


def media_index_from_ids(
    input_ids: torch.Tensor, image_token_id: int, offset: torch.Tensor | None = None
) -> torch.Tensor:
    """``[B, T]`` count of ``<image>`` markers at or before each position, plus ``offset [B]``.

    ``offset`` continues the count during KV-cache decoding: the number of markers each row has
    already seen (e.g. ``(prompt_ids == image_token_id).sum(1)``).
    """
    index = (input_ids == image_token_id).long().cumsum(dim=1)  # [B, T]
    if offset is not None:
        index = index + offset.to(device=index.device, dtype=torch.long).view(-1, 1)
    return index


def media_attend_mask(
    media_index: torch.Tensor, media_mask: torch.Tensor, mode: MediaMode = "last"
) -> torch.Tensor:
    """``[B, T, M]`` bool: may text position ``t`` of row ``b`` attend to image ``m`` (0-based)?

    ``"last"``: only image number ``media_index`` (1-based); ``"all"``: images ``1..media_index``
    (Flamingo sec. 2.3). Padding images (``media_mask`` False) are never attended.
    """
    if mode not in MEDIA_MODES:
        raise ValueError(f"cross-attention media mode must be one of {MEDIA_MODES}, got {mode!r}")
    num_images = media_mask.shape[1]
    image_number = torch.arange(1, num_images + 1, device=media_index.device)  # [M]
    index = media_index.unsqueeze(-1)  # [B, T, 1]
    attend = image_number == index if mode == "last" else image_number <= index  # [B, T, M]
    return attend & media_mask.to(attend.device).unsqueeze(1)


def group_media(
    image_embeds: torch.Tensor, images_per_row: Sequence[int] | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, K, D]`` images in row order -> padded ``media [B, M, K, D]`` and ``media_mask [B, M]``.

    ``M`` is the largest per-row count (0 when no row has an image); padding slots are zeros.
    """
    counts = [int(c) for c in (images_per_row.tolist() if torch.is_tensor(images_per_row) else images_per_row)]
    n, k, d = image_embeds.shape
    if sum(counts) != n:
        raise ValueError(f"images_per_row sums to {sum(counts)} but {n} image embeddings were given")
    rows, most = len(counts), max(counts, default=0)
    media = image_embeds.new_zeros(rows, most, k, d)
    media_mask = torch.zeros(rows, most, dtype=torch.bool, device=image_embeds.device)
    start = 0
    for row, count in enumerate(counts):
        media[row, :count] = image_embeds[start : start + count]
        media_mask[row, :count] = True
        start += count
    return media, media_mask


# ---------------------------------------------------------------------- the block


class MaskedCrossAttention(nn.Module):
    """Multi-head attention from text ``[B, T, D]`` to image tokens ``[B, M*K, D]``.

    Rows with no attendable image get exactly 0 (no all-masked softmax, so no NaN).
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"cross-attention width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, text: torch.Tensor, media: torch.Tensor, attend: torch.Tensor) -> torch.Tensor:
        b, t, d = text.shape
        _, m, k, _ = media.shape
        media = media.reshape(b, m * k, d)  # [B, M*K, D]
        q = self.q_proj(text).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, T, dh]
        key = self.k_proj(media).view(b, m * k, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, MK, dh]
        value = self.v_proj(media).view(b, m * k, self.num_heads, self.head_dim).transpose(1, 2)
        token_attend = attend.repeat_interleave(k, dim=-1)  # [B, T, M*K]
        has_media = attend.any(-1, keepdim=True)  # [B, T, 1]
        # rows that see nothing attend everywhere (finite softmax) and are zeroed below
        sdpa_mask = (token_attend | ~has_media).unsqueeze(1)  # [B, 1, T, M*K]
        out = F.scaled_dot_product_attention(q, key, value, attn_mask=sdpa_mask)  # [B, H, T, dh]
        out = self.o_proj(out.transpose(1, 2).reshape(b, t, d))
        return out * has_media.to(out.dtype)


class FeedForward(nn.Module):
    """Linear -> GELU -> Linear, as in Flamingo's gated blocks."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        self.up_proj = nn.Linear(dim, dim * mult, bias=False)
        self.down_proj = nn.Linear(dim * mult, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(x)))


class GatedCrossAttentionBlock(nn.Module):
    """Flamingo's GATED XATTN-DENSE block (Alayrac et al. 2022, sec. 2.2, Fig. 4)::

        h = h + tanh(alpha_attn) * CrossAttn(LN(h), media)
        h = h + tanh(alpha_ffn)  * FFN(LN(h))

    The scalar gates start at 0 (identity at initialisation). Tokens that see no image are left
    exactly unchanged (both terms are masked for them).
    """

    def __init__(self, dim: int, num_heads: int, ffn_mult: int = 4) -> None:
        super().__init__()
        self.alpha_attn = nn.Parameter(torch.zeros(()))
        self.alpha_ffn = nn.Parameter(torch.zeros(()))
        self.attn_norm = nn.LayerNorm(dim)
        self.attn = MaskedCrossAttention(dim, num_heads)
        self.ffn_norm = nn.LayerNorm(dim)
        self.ffn = FeedForward(dim, ffn_mult)

    def forward(self, hidden: torch.Tensor, media: torch.Tensor, attend: torch.Tensor) -> torch.Tensor:
        """``hidden [B, T, D]``, ``media [B, M, K, D]``, ``attend [B, T, M]`` (``media_attend_mask``)."""
        if media.shape[1] == 0 or media.shape[2] == 0:  # no image in the batch
            return hidden
        media = media.to(hidden.dtype)
        has_media = attend.any(-1, keepdim=True).to(hidden.dtype)  # [B, T, 1]
        attn_out = self.attn(self.attn_norm(hidden), media, attend)  # [B, T, D], 0 where no media
        hidden = hidden + torch.tanh(self.alpha_attn).to(hidden.dtype) * attn_out
        ffn_out = self.ffn(self.ffn_norm(hidden)) * has_media
        return hidden + torch.tanh(self.alpha_ffn).to(hidden.dtype) * ffn_out


# ---------------------------------------------------------------------- insertion into an LM


@dataclass
class _MediaInputs:
    media: torch.Tensor  # [B, M, K, D], padding slots zeroed
    media_mask: torch.Tensor  # [B, M] bool
    attend: torch.Tensor  # [B, T, M] bool


class _MediaSlot:
    """The media of the current forward, shared by the adapter and its wrapped layers (a plain
    object, not a module, so the layers don't register the adapter)."""

    def __init__(self) -> None:
        self.current: _MediaInputs | None = None


class CrossAttentionDecoderLayer(nn.Module):
    """A decoder layer with a gated cross-attention block run on its input hidden states.

    Calls the original layer with exactly the arguments it got (hidden states replaced) and
    returns its output unchanged. Without media set it is the plain layer. Public attributes it
    lacks (``attention_type``, ``self_attn``, ...) are read from the original layer. Under
    transformers' activation checkpointing the block is checkpointed whenever its layer is.
    """

    def __init__(self, layer: nn.Module, block: GatedCrossAttentionBlock, slot: _MediaSlot) -> None:
        super().__init__()
        self.xattn = block
        self.layer = layer
        self._media_slot = slot

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_"):  # private state (hooks, flags) stays the wrapper's own
                raise
            return getattr(super().__getattr__("layer"), name)

    def _cross_attend(self, hidden: torch.Tensor) -> torch.Tensor:
        inputs = self._media_slot.current
        if inputs is None:
            return hidden
        if inputs.attend.shape[:2] != hidden.shape[:2]:
            raise ValueError(
                f"media_index is {list(inputs.attend.shape[:2])} but the layer got hidden states "
                f"{list(hidden.shape[:2])}; during KV-cache decoding give the new tokens' index "
                "(adapter.set_media_index)"
            )
        # follow the original layer's activation checkpointing (transformers' flag)
        if getattr(self.layer, "gradient_checkpointing", False) and self.training and torch.is_grad_enabled():
            return checkpoint(self.xattn, hidden, inputs.media, inputs.attend, use_reentrant=False)
        return self.xattn(hidden, inputs.media, inputs.attend)

    def forward(self, *args, **kwargs):
        if args:
            args = (self._cross_attend(args[0]), *args[1:])
        else:
            kwargs["hidden_states"] = self._cross_attend(kwargs["hidden_states"])
        return self.layer(*args, **kwargs)


def decoder_layers(llm: nn.Module) -> nn.ModuleList:
    """The decoder layers of a Hugging Face causal LM (``get_decoder().layers`` or ``model.layers``)."""
    decoder = llm.get_decoder() if hasattr(llm, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if layers is None:
        layers = getattr(getattr(llm, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"can't find the decoder layers of {type(llm).__name__}")
    return layers


class CrossAttentionAdapter(nn.Module):
    """Owns the gated blocks inserted into an LM and passes them the media of each forward."""

    def __init__(
        self, blocks: Sequence[GatedCrossAttentionBlock], layer_indices: Sequence[int], mode: MediaMode, slot: _MediaSlot
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.layer_indices = tuple(layer_indices)  # decoder layer each block runs before
        self.mode = mode
        self._media_slot = slot

    @property
    def dim(self) -> int:
        return self.blocks[0].attn_norm.normalized_shape[0]

    @contextmanager
    def media(
        self, media: torch.Tensor, media_mask: torch.Tensor | None, media_index: torch.Tensor
    ) -> Iterator[None]:
        """Set the media for the LM calls inside the block; cleared on exit (also on errors).

        ``media [B, M, K, D]`` (``M`` may be 0), ``media_mask [B, M]`` bool (True: a real image;
        None: all real), ``media_index [B, T]`` (``media_index_from_ids``) for the tokens of the
        next call. Nested contexts restore the outer media on exit.
        """
        if media.ndim != 4 or media.shape[-1] != self.dim:
            raise ValueError(f"media must be [B, M, K, {self.dim}], got {list(media.shape)}")
        b, m = media.shape[:2]
        if media_mask is None:
            media_mask = torch.ones(b, m, dtype=torch.bool, device=media.device)
        if media_mask.shape != (b, m):
            raise ValueError(f"media_mask must be [{b}, {m}] for media {list(media.shape)}, got {list(media_mask.shape)}")
        media_mask = media_mask.to(device=media.device, dtype=torch.bool)
        # zero the padding slots so whatever they hold (even NaN) can't leak through attention
        media = media.masked_fill(~media_mask[:, :, None, None], 0)
        previous = self._media_slot.current
        self._media_slot.current = _MediaInputs(media, media_mask, self._attend(media_index, media_mask))
        try:
            yield
        finally:
            self._media_slot.current = previous

    def set_media_index(self, media_index: torch.Tensor) -> None:
        """Replace the media index inside ``media(...)`` (KV-cache decoding: the new tokens' ``[B, T_new]``)."""
        inputs = self._media_slot.current
        if inputs is None:
            raise RuntimeError("set_media_index is only valid inside `with adapter.media(...)`")
        inputs.attend = self._attend(media_index, inputs.media_mask)

    def _attend(self, media_index: torch.Tensor, media_mask: torch.Tensor) -> torch.Tensor:
        if media_index.ndim != 2 or media_index.shape[0] != media_mask.shape[0]:
            raise ValueError(f"media_index must be [{media_mask.shape[0]}, T], got {list(media_index.shape)}")
        if media_index.dtype.is_floating_point:
            raise ValueError("media_index must be an integer tensor")
        media_index = media_index.to(media_mask.device)
        if media_index.numel():
            available = media_mask.sum(1)  # [B] real images per row
            seen = media_index.max(dim=1).values  # [B]
            if bool((media_index.min() < 0) | (seen > available).any()):
                raise ValueError(
                    f"media_index asks for more images than given: markers per row {seen.tolist()}, "
                    f"images per row {available.tolist()}"
                )
        return media_attend_mask(media_index, media_mask, self.mode)


def insert_cross_attention(
    llm: nn.Module, every: int, num_heads: int, mode: MediaMode = "last", ffn_mult: int = 4
) -> CrossAttentionAdapter:
    """Place a ``GatedCrossAttentionBlock`` before decoder layers ``0, every, 2*every, ...`` of ``llm``.

    Modifies ``llm`` in place (see the module docstring for the parameter names) and returns the
    adapter that owns the blocks and takes the media (``adapter.media(...)``). Blocks are created
    on the device and in the dtype of the layer they precede; gates start at 0.
    """
    if every < 1:
        raise ValueError(f"cross-attention every must be >= 1, got {every}")
    if mode not in MEDIA_MODES:
        raise ValueError(f"cross-attention media mode must be one of {MEDIA_MODES}, got {mode!r}")
    layers = decoder_layers(llm)
    if any(isinstance(layer, CrossAttentionDecoderLayer) for layer in layers):
        raise ValueError("this LM already has cross-attention blocks")
    config = llm.config.get_text_config() if hasattr(llm.config, "get_text_config") else llm.config
    dim = int(config.hidden_size)
    slot = _MediaSlot()
    blocks, indices = [], []
    for i in range(0, len(layers), every):
        original = layers[i]
        weight = next(original.parameters(), None)
        block = GatedCrossAttentionBlock(dim, num_heads, ffn_mult)
        if weight is not None:
            block.to(device=weight.device, dtype=weight.dtype)
        layers[i] = CrossAttentionDecoderLayer(original, block, slot)
        blocks.append(block)
        indices.append(i)
    return CrossAttentionAdapter(blocks, indices, mode, slot)
