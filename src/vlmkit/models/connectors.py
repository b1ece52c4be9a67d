"""Connectors: map vision features ``[N, T, C]`` to LLM-width image embeddings ``[N, T', D]``.

* ``linear`` -- one linear map (LLaVA, Liu et al. 2023).
* ``mlp2x_gelu`` -- Linear -> GELU -> Linear (LLaVA-1.5, Liu et al. 2023, "Improved Baselines with
  Visual Instruction Tuning"); ``mlpNx_gelu`` for any N >= 1 builds N linear layers with GELUs between.
* ``pixel_shuffle`` (space-to-depth) before the projector trades tokens for width: ``s*s`` fewer
  tokens, each ``s*s`` times wider (Idefics3, Laurençon et al. 2024, "Building and better
  understanding vision-language models").
* ``output_norm`` RMS-normalises the outputs with a learnable gain initialised to the RMS of the
  LLM's input embeddings, so image embeddings start on the same scale as text embeddings.
"""

from __future__ import annotations

import math
import re
from typing import Callable

import torch
from torch import nn

from vlmkit.config import ConnectorConfig

CONNECTORS: dict[str, type] = {}


def register_connector(name: str) -> Callable[[type], type]:
    """Class decorator: ``CONNECTORS[name] = cls``; ``cls(in_dim, out_dim)`` builds a projector."""

    def deco(cls: type) -> type:
        if name in CONNECTORS:
            raise ValueError(f"connector {name!r} is already registered")
        CONNECTORS[name] = cls
        return cls

    return deco


@register_connector("linear")
class LinearProjector(nn.Module):
    """One linear map from vision width to LLM width (LLaVA)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class MLPGeluProjector(nn.Module):
    """``depth`` linear layers with GELU between them; depth 2 is LLaVA-1.5's ``mlp2x_gelu``."""

    def __init__(self, in_dim: int, out_dim: int, depth: int = 2) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError("an MLP projector needs at least one layer")
        layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


@register_connector("mlp2x_gelu")
class MLP2xGelu(MLPGeluProjector):
    """LLaVA-1.5's projector: Linear -> GELU -> Linear."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__(in_dim, out_dim, depth=2)


_MLP_RE = re.compile(r"^mlp(\d+)x_gelu$")


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
    """Pixel shuffle (optional) -> projector -> output norm (optional)."""

    def __init__(self, projector: nn.Module, shuffle: int = 1, norm: nn.Module | None = None) -> None:
        super().__init__()
        self.shuffle = int(shuffle)
        self.projector = projector
        self.norm = norm

    def num_output_tokens(self, num_tokens: int) -> int:
        if self.shuffle == 1:
            return num_tokens
        side = math.isqrt(num_tokens)
        if side * side != num_tokens or side % self.shuffle:
            raise ValueError(
                f"pixel_shuffle {self.shuffle} needs a square token grid divisible by it, got {num_tokens} tokens"
            )
        return num_tokens // (self.shuffle**2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.projector(pixel_shuffle(x, self.shuffle))
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
    width = in_dim * s * s
    if cfg.type in CONNECTORS:
        projector = CONNECTORS[cfg.type](width, out_dim)
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
    return Connector(projector, s, norm)
