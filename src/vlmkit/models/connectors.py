"""Connectors: map vision features ``[N, T, C]`` to LLM-width image embeddings ``[N, T', D]``.

Order of operations (``Connector``): pool -> pixel shuffle -> projector -> output norm.

* ``linear`` -- one linear map (LLaVA, Liu et al. 2023).
* ``mlp2x_gelu`` -- Linear -> GELU -> Linear (LLaVA-1.5, Liu et al. 2023, "Improved Baselines with
  Visual Instruction Tuning"); ``mlpNx_gelu`` for any N >= 1 builds N linear layers with GELUs between.
* ``perceiver`` -- Perceiver resampler (Flamingo, Alayrac et al. 2022; Idefics2, Laurençon et al.
  2024): ``num_queries`` learned latents cross-attend to the image features; T' = ``num_queries``.
* ``qformer`` -- Q-Former (BLIP-2, Li et al. 2023): ``num_queries`` learned queries, each block
  self-attention -> cross-attention to the image -> FFN (post-LN); T' = ``num_queries``.
* ``pool_tokens`` average-pools the square token grid to a fixed square count (adaptive average
  pooling, as in LLaVA-style token budgets, e.g. 24x24 = 576 -> 12x12 = 144).
* ``pixel_shuffle`` (space-to-depth) before the projector trades tokens for width: ``s*s`` fewer
  tokens, each ``s*s`` times wider (Idefics3, Laurençon et al. 2024, "Building and better
  understanding vision-language models").
* ``output_norm`` RMS-normalises the outputs with a learnable gain initialised to the RMS of the
  LLM's input embeddings, so image embeddings start on the same scale as text embeddings.

Registry contract: ``CONNECTORS[cfg.type](in_dim, out_dim, cfg)`` builds the projector, where
``in_dim`` is the width after pixel shuffle (``C * s * s``) and ``out_dim`` the LLM width ``D``.
A projector that changes the number of tokens defines ``output_tokens(num_tokens) -> int``;
without it the count is unchanged.
"""

from __future__ import annotations

import math
import re
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.config import ConnectorConfig

CONNECTORS: dict[str, type] = {}


def register_connector(name: str) -> Callable[[type], type]:
    """Class decorator: ``CONNECTORS[name] = cls``; ``cls(in_dim, out_dim, cfg)`` builds a projector."""

    def deco(cls: type) -> type:
        if name in CONNECTORS:
            raise ValueError(f"connector {name!r} is already registered")
        CONNECTORS[name] = cls
        return cls

    return deco


# ------------------------------------------------------------------ token-preserving projectors


@register_connector("linear")
class LinearProjector(nn.Module):
    """One linear map from vision width to LLM width (LLaVA). ``cfg`` is not read."""

    def __init__(self, in_dim: int, out_dim: int, cfg: ConnectorConfig | None = None) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)  # [N, T, C] -> [N, T, D]


class MLPGeluProjector(nn.Module):
    """``depth`` linear layers with GELU between them; depth 2 is LLaVA-1.5's ``mlp2x_gelu``.

    Built for ``mlpNx_gelu`` types (N parsed from the name); not itself registered.
    """

    def __init__(self, in_dim: int, out_dim: int, depth: int = 2) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError("an MLP projector needs at least one layer")
        layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)  # [N, T, C] -> [N, T, D]


@register_connector("mlp2x_gelu")
class MLP2xGelu(MLPGeluProjector):
    """LLaVA-1.5's projector: Linear -> GELU -> Linear. ``cfg`` is not read."""

    def __init__(self, in_dim: int, out_dim: int, cfg: ConnectorConfig | None = None) -> None:
        super().__init__(in_dim, out_dim, depth=2)


_MLP_RE = re.compile(r"^mlp(\d+)x_gelu$")


# ------------------------------------------------------------------ attention building blocks


def _check_heads(width: int, cfg: ConnectorConfig) -> None:
    if width % cfg.num_heads:
        raise ValueError(
            f"connector.num_heads={cfg.num_heads} does not divide the {cfg.type} width {width} "
            "(the LLM hidden size); pick a divisor of it"
        )


class _Attention(nn.Module):
    """Multi-head attention (``scaled_dot_product_attention``): queries ``[N, Q, D]`` attend to a
    context ``[N, S, Dkv]``; returns ``[N, Q, D]``.

    The key projection has no bias: a key bias adds the same ``q . b`` to every score of a
    query, which the softmax cancels, so it would be a parameter that never gets a gradient.
    """

    def __init__(self, dim: int, num_heads: int, kv_dim: int | None = None, bias: bool = True) -> None:
        super().__init__()
        kv_dim = dim if kv_dim is None else kv_dim
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=bias)
        self.k = nn.Linear(kv_dim, dim, bias=False)
        self.v = nn.Linear(kv_dim, dim, bias=bias)
        self.out = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        n, q_len, d = x.shape
        s_len = context.shape[1]
        h = self.num_heads
        q = self.q(x).view(n, q_len, h, d // h).transpose(1, 2)  # [N, H, Q, D/H]
        k = self.k(context).view(n, s_len, h, d // h).transpose(1, 2)  # [N, H, S, D/H]
        v = self.v(context).view(n, s_len, h, d // h).transpose(1, 2)  # [N, H, S, D/H]
        o = F.scaled_dot_product_attention(q, k, v)  # [N, H, Q, D/H]
        return self.out(o.transpose(1, 2).reshape(n, q_len, d))  # [N, Q, D]


# ------------------------------------------------------------------ Perceiver resampler


class PerceiverBlock(nn.Module):
    """One Flamingo resampler block (pre-norm, residual):

    ``latents += Attn(q=LN(latents), kv=[LN(media); LN(latents)])``, then
    ``latents += FFN(latents)`` with ``FFN = LN -> Linear(D, 4D) -> GELU -> Linear(4D, D)``.
    Like Flamingo, the attention and FFN linears have no biases.
    """

    def __init__(self, dim: int, num_heads: int, ff_mult: int = 4) -> None:
        super().__init__()
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.attn = _Attention(dim, num_heads, bias=False)
        self.ff = nn.Sequential(
            nn.LayerNorm(dim),
            nn.Linear(dim, dim * ff_mult, bias=False),
            nn.GELU(),
            nn.Linear(dim * ff_mult, dim, bias=False),
        )

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        m = self.norm_media(media)  # [N, T, D]
        q = self.norm_latents(latents)  # [N, Q, D]
        kv = torch.cat([m, q], dim=1)  # [N, T+Q, D]: the latents also attend to themselves
        latents = latents + self.attn(q, kv)  # [N, Q, D]
        return latents + self.ff(latents)  # [N, Q, D]


@register_connector("perceiver")
class PerceiverResampler(nn.Module):
    """Perceiver resampler (Flamingo, Alayrac et al. 2022; Idefics2, Laurençon et al. 2024).

    ``[N, T, C] -> Linear(C, D) -> num_layers x PerceiverBlock -> LayerNorm -> [N, num_queries, D]``
    for any T. ``cfg.num_queries`` learned latents (init N(0, 0.02)), ``cfg.num_layers`` blocks,
    ``cfg.num_heads`` heads over the internal width D = ``out_dim``. There are no position
    embeddings: the result depends on token positions only through what the encoder put in the
    features (Flamingo's learned time embeddings are for video frames and are not used here).

    Parameters: ``C*D + D`` (input projection) ``+ Q*D`` (latents)
    ``+ L * (12*D^2 + 6*D)`` (blocks) ``+ 2*D`` (final LayerNorm).
    """

    def __init__(self, in_dim: int, out_dim: int, cfg: ConnectorConfig) -> None:
        super().__init__()
        _check_heads(out_dim, cfg)
        self.num_queries = cfg.num_queries
        self.proj_in = nn.Linear(in_dim, out_dim)
        self.latents = nn.Parameter(torch.empty(cfg.num_queries, out_dim))
        nn.init.normal_(self.latents, std=0.02)
        self.blocks = nn.ModuleList(PerceiverBlock(out_dim, cfg.num_heads) for _ in range(cfg.num_layers))
        self.norm = nn.LayerNorm(out_dim)

    def output_tokens(self, num_tokens: int) -> int:
        return self.num_queries

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        media = self.proj_in(x)  # [N, T, C] -> [N, T, D]
        latents = self.latents.unsqueeze(0).expand(x.shape[0], -1, -1)  # [N, Q, D]
        for block in self.blocks:
            latents = block(media, latents)  # [N, Q, D]
        return self.norm(latents)  # [N, Q, D]


# ------------------------------------------------------------------ Q-Former


class QFormerBlock(nn.Module):
    """One Q-Former layer, post-LN as in BERT:

    ``q = LN(q + SelfAttn(q))``; ``q = LN(q + CrossAttn(q, image))``; ``q = LN(q + FFN(q))``
    with ``FFN = Linear(D, 4D) -> GELU -> Linear(4D, D)``. Cross-attention keys/values are
    projected from the image width C.
    """

    def __init__(self, dim: int, image_dim: int, num_heads: int, ff_mult: int = 4) -> None:
        super().__init__()
        self.self_attn = _Attention(dim, num_heads)
        self.norm_self = nn.LayerNorm(dim)
        self.cross_attn = _Attention(dim, num_heads, kv_dim=image_dim)
        self.norm_cross = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, dim * ff_mult), nn.GELU(), nn.Linear(dim * ff_mult, dim))
        self.norm_ff = nn.LayerNorm(dim)

    def forward(self, q: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        q = self.norm_self(q + self.self_attn(q, q))  # [N, Q, D]
        q = self.norm_cross(q + self.cross_attn(q, image))  # [N, Q, D]; image [N, T, C]
        return self.norm_ff(q + self.ff(q))  # [N, Q, D]


@register_connector("qformer")
class QFormer(nn.Module):
    """Q-Former (BLIP-2, Li et al. 2023), the query branch only.

    ``[N, T, C] -> LayerNorm(C)`` (BLIP-2's ``ln_vision``); ``cfg.num_queries`` learned queries
    (init N(0, 0.02)) -> LayerNorm (BERT's embedding norm) -> ``cfg.num_layers`` x QFormerBlock
    (width D = ``out_dim``, ``cfg.num_heads`` heads) -> Linear(D, D) (BLIP-2's projection into the
    LLM) -> ``[N, num_queries, D]`` for any T.

    Not implemented: BLIP-2's text branch (the queries and text sharing self-attention) and its
    stage-1 objectives (image-text contrastive, matching, grounded generation); the Q-Former is
    trained only through the LLM's loss. Every block cross-attends (BLIP-2 does so in every
    other block), and the queries are not initialised from BERT weights.

    Parameters: ``2*C`` (image LayerNorm) ``+ Q*D`` (queries) ``+ 2*D`` (query LayerNorm)
    ``+ L * (14*D^2 + 2*C*D + 17*D)`` (blocks) ``+ D^2 + D`` (output projection).
    """

    def __init__(self, in_dim: int, out_dim: int, cfg: ConnectorConfig) -> None:
        super().__init__()
        _check_heads(out_dim, cfg)
        self.num_queries = cfg.num_queries
        self.norm_image = nn.LayerNorm(in_dim)
        self.queries = nn.Parameter(torch.empty(cfg.num_queries, out_dim))
        nn.init.normal_(self.queries, std=0.02)
        self.norm_queries = nn.LayerNorm(out_dim)
        self.blocks = nn.ModuleList(
            QFormerBlock(out_dim, in_dim, cfg.num_heads) for _ in range(cfg.num_layers)
        )
        self.proj = nn.Linear(out_dim, out_dim)

    def output_tokens(self, num_tokens: int) -> int:
        return self.num_queries

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        image = self.norm_image(x)  # [N, T, C]
        q = self.norm_queries(self.queries).unsqueeze(0).expand(x.shape[0], -1, -1)  # [N, Q, D]
        for block in self.blocks:
            q = block(q, image)  # [N, Q, D]
        return self.proj(q)  # [N, Q, D]


# ------------------------------------------------------------------ token-count changes


def _pooled_side(num_tokens: int, target: int) -> tuple[int, int]:
    """``(side, target_side)`` of the square input grid and the pooled grid; errors name the key."""
    g = math.isqrt(target)
    if g * g != target:
        raise ValueError(f"connector.pool_tokens={target} is not a square number (e.g. 144 = 12x12)")
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"connector.pool_tokens needs a square token grid, got {num_tokens} tokens")
    if target > num_tokens:
        raise ValueError(
            f"connector.pool_tokens={target} is larger than the {num_tokens} tokens "
            f"({side}x{side}) the encoder gives"
        )
    return side, g


def avg_pool_tokens(x: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Adaptive average pooling of the square token grid: ``[N, T, C] -> [N, num_tokens, C]``.

    Tokens are row-major on a ``sqrt(T) x sqrt(T)`` grid; the output is the row-major
    ``g x g`` grid (``g = sqrt(num_tokens)``) of ``F.adaptive_avg_pool2d``: when ``g`` divides the
    side, output token ``(i, j)`` is the mean of the ``k x k`` block at ``(i*k, j*k)``,
    ``k = side / g``; otherwise the windows overlap by at most one token.
    """
    n, t, c = x.shape
    side, g = _pooled_side(t, num_tokens)
    if g == side:
        return x
    grid = x.transpose(1, 2).reshape(n, c, side, side)  # [N, C, side, side]
    pooled = F.adaptive_avg_pool2d(grid, g)  # [N, C, g, g]
    return pooled.flatten(2).transpose(1, 2)  # [N, g*g, C]


def pixel_shuffle(x: torch.Tensor, s: int) -> torch.Tensor:
    """Space-to-depth on the square token grid (Idefics3): ``[N, T, C] -> [N, T/s², C·s²]``.

    With ``h = w = sqrt(T)`` and row-major tokens, output token ``(i, j)`` of the ``(h/s) x (w/s)``
    grid holds the ``s x s`` block whose top-left is input token ``(i*s, j*s)``; its channel block
    ``k = di*s + dj`` (``[k*C, (k+1)*C)``) is input token ``(i*s + di, j*s + dj)``.
    """
    if s == 1:
        return x
    n, t, c = x.shape
    side = math.isqrt(t)
    if side * side != t:
        raise ValueError(f"pixel_shuffle needs a square token grid, got {t} tokens")
    if side % s:
        raise ValueError(f"pixel_shuffle factor {s} does not divide the {side}x{side} token grid")
    g = side // s
    x = x.reshape(n, g, s, g, s, c).permute(0, 1, 3, 2, 4, 5)  # n, i, j, di, dj, c
    return x.reshape(n, g * g, s * s * c)


class RMSOutputNorm(nn.Module):
    """``y = x / rms(x) * gain`` over the last dim; ``gain`` starts at ``target_rms`` everywhere."""

    def __init__(self, dim: int, target_rms: float, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.gain = nn.Parameter(torch.full((dim,), float(target_rms)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.gain.float()).to(x.dtype)


class Connector(nn.Module):
    """Pool (optional) -> pixel shuffle (optional) -> projector -> output norm (optional)."""

    def __init__(
        self,
        projector: nn.Module,
        shuffle: int = 1,
        norm: nn.Module | None = None,
        pool_tokens: int | None = None,
    ) -> None:
        super().__init__()
        self.pool_tokens = None if pool_tokens is None else int(pool_tokens)
        self.shuffle = int(shuffle)
        self.projector = projector
        self.norm = norm

    def num_output_tokens(self, num_tokens: int) -> int:
        """Tokens per image out of the connector for ``num_tokens`` encoder tokens."""
        t = num_tokens
        if self.pool_tokens is not None:
            _pooled_side(t, self.pool_tokens)
            t = self.pool_tokens
        if self.shuffle != 1:
            side = math.isqrt(t)
            if side * side != t or side % self.shuffle:
                raise ValueError(
                    f"pixel_shuffle {self.shuffle} needs a square token grid divisible by it, got {t} tokens"
                )
            t //= self.shuffle**2
        output_tokens = getattr(self.projector, "output_tokens", None)
        return int(output_tokens(t)) if output_tokens is not None else t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool_tokens is not None:
            x = avg_pool_tokens(x, self.pool_tokens)  # [N, T, C] -> [N, P, C]
        x = self.projector(pixel_shuffle(x, self.shuffle))  # -> [N, P/s², C·s²] -> [N, T', D]
        if self.norm is not None:
            x = self.norm(x)
        return x


def build_connector(
    cfg: ConnectorConfig, in_dim: int, out_dim: int, target_rms: float | None = None
) -> Connector:
    """The connector for ``cfg``: vision width ``in_dim`` -> LLM width ``out_dim``.

    ``target_rms`` (the RMS of the LLM's input embeddings) is required when ``cfg.output_norm``.
    """
    s = cfg.pixel_shuffle
    if cfg.pool_tokens is not None:
        g = math.isqrt(cfg.pool_tokens)
        if g * g != cfg.pool_tokens:
            raise ValueError(
                f"connector.pool_tokens={cfg.pool_tokens} is not a square number (e.g. 144 = 12x12)"
            )
        if g % s:
            raise ValueError(
                f"connector.pixel_shuffle={s} does not divide the {g}x{g} grid of "
                f"connector.pool_tokens={cfg.pool_tokens}"
            )
    width = in_dim * s * s
    if cfg.type in CONNECTORS:
        projector = CONNECTORS[cfg.type](width, out_dim, cfg)
    elif (m := _MLP_RE.match(cfg.type)) and int(m.group(1)) >= 1:
        projector = MLPGeluProjector(width, out_dim, depth=int(m.group(1)))
    else:
        raise ValueError(
            f"unknown connector type {cfg.type!r}; registered: {sorted(CONNECTORS)} (or mlpNx_gelu)"
        )
    norm = None
    if cfg.output_norm:
        if target_rms is None:
            raise ValueError("connector.output_norm needs target_rms (the RMS of the LLM's input embeddings)")
        norm = RMSOutputNorm(out_dim, target_rms)
    return Connector(projector, s, norm, pool_tokens=cfg.pool_tokens)
