"""Image encoders: tiny presets built from configs, or any HF vision model through a family table.

``build_vision_encoder(VisionConfig) -> VisionEncoder | FusedVisionEncoder``;
``VisionEncoder.forward(pixel_values [N,3,S,S])`` returns patch features ``[N, T, C]`` taken from
``hidden_states[feature_layer]`` of the HF model, with the non-patch tokens (CLS, registers)
removed. A list of feature layers concatenates those hidden states channel-wise. With
``VisionConfig.fused`` set, a ``FusedVisionEncoder`` runs further encoders on the same pixels and
concatenates their features channel-wise (docs/encoders.md).

Families are looked up by the HF config's ``model_type`` (never by sniffing the checkpoint name):

============================  =========  =====================  ===============  ==================
model_type                    kind       tokens dropped         default layer    mean / std
============================  =========  =====================  ===============  ==================
clip, clip_vision_model       ViT        CLS                    -2 (LLaVA)       OpenAI CLIP
siglip, siglip_vision_model   ViT        none (no CLS token)    -2               0.5 / 0.5
siglip2, siglip2_vision_model ViT        none                   -2               0.5 / 0.5
dinov2                        ViT        CLS                    -2 (Prismatic)   ImageNet
dinov2_with_registers         ViT        CLS + registers        -2               ImageNet
vit                           ViT        CLS                    -2               ImageNet
resnet, convnext, convnextv2  CNN        none (H x W flattened) -1               ImageNet
============================  =========  =====================  ===============  ==================

``hidden_states[-1]`` is the last block's output *before* any final norm (for SigLIP / DINOv2 /
ViT ``last_hidden_state`` is normed, ``hidden_states[-1]`` is not). DINOv2's default is the
second-to-last block, as Prismatic VLMs use it; set ``feature_layer: -1`` for the last.

Full CLIP / SigLIP checkpoints (text + vision) load their vision tower only.
Preprocessing statistics come from the model directory's ``preprocessor_config.json`` when it
has ``image_mean`` / ``image_std``, otherwise from the family defaults above (presets: 0.5 / 0.5).
"""

from __future__ import annotations

import json
import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from vlmkit.config import VisionConfig

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)

PRESETS = ("tiny-cnn", "tiny-vit")


@dataclass(frozen=True)
class VisionFamily:
    """How to run and read one kind of HF vision model."""

    model_class: str  # a class name in ``transformers``
    kind: str  # "vit" (patch tokens), "cnn" (feature map), "naflex" (SigLIP2: patchified input)
    default_layer: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    n_prefix: Callable[[PretrainedConfig], int] = lambda c: 0  # leading non-patch tokens to drop
    interpolate_kw: bool = False  # forward takes ``interpolate_pos_encoding``
    model_kwargs: tuple[tuple[str, Any], ...] = ()


def _cls(c: PretrainedConfig) -> int:
    return 1


FAMILIES: dict[str, VisionFamily] = {
    "clip_vision_model": VisionFamily("CLIPVisionModel", "vit", -2, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, _cls, True),
    "siglip_vision_model": VisionFamily("SiglipVisionModel", "vit", -2, HALF, HALF, interpolate_kw=True),
    "siglip2_vision_model": VisionFamily("Siglip2VisionModel", "naflex", -2, HALF, HALF),
    "dinov2": VisionFamily("Dinov2Model", "vit", -2, IMAGENET_MEAN, IMAGENET_STD, _cls),
    "dinov2_with_registers": VisionFamily(
        "Dinov2WithRegistersModel", "vit", -2, IMAGENET_MEAN, IMAGENET_STD,
        lambda c: 1 + int(getattr(c, "num_register_tokens", 0)),
    ),
    "vit": VisionFamily(
        "ViTModel", "vit", -2, IMAGENET_MEAN, IMAGENET_STD, _cls, True, (("add_pooling_layer", False),)
    ),
    "resnet": VisionFamily("ResNetModel", "cnn", -1, IMAGENET_MEAN, IMAGENET_STD),
    "convnext": VisionFamily("ConvNextModel", "cnn", -1, IMAGENET_MEAN, IMAGENET_STD),
    "convnextv2": VisionFamily("ConvNextV2Model", "cnn", -1, IMAGENET_MEAN, IMAGENET_STD),
}
# full image-text checkpoints: model_type -> the vision tower's model_type
TOWER_OF: dict[str, str] = {
    "clip": "clip_vision_model",
    "siglip": "siglip_vision_model",
    "siglip2": "siglip2_vision_model",
}


def family_of(model_type: str) -> VisionFamily:
    key = TOWER_OF.get(model_type, model_type)
    if key not in FAMILIES:
        known = sorted(set(FAMILIES) | set(TOWER_OF))
        raise ValueError(f"unsupported vision model_type {model_type!r}; supported: {known}")
    return FAMILIES[key]


@contextmanager
def _quiet_transformers():
    """Loading a vision tower from a full CLIP checkpoint logs every unused text weight; hush it."""
    logger = logging.getLogger("transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _layer_list(feature_layer: int | Sequence[int] | None, default: int) -> tuple[list[int], bool]:
    """``(layers, is_list)``: the hidden-state indices to read, and whether a list was given."""
    if feature_layer is None:
        return [default], False
    if isinstance(feature_layer, (list, tuple)):
        if not feature_layer:
            raise ValueError("feature_layer: an empty list selects no layer")
        return [int(v) for v in feature_layer], True
    return [int(feature_layer)], False


class VisionEncoder(nn.Module):
    """An HF vision model plus the rules to turn its hidden states into patch features.

    Attributes: ``model`` (the HF module), ``hf_config``, ``family`` (the model_type key),
    ``feature_layer`` (resolved index into ``hidden_states``, or the list of indices whose states
    are concatenated channel-wise), ``feature_layers`` (always a tuple), ``image_size``,
    ``num_tokens``, ``hidden_size``, ``image_mean``, ``image_std``.

    ``key`` is the config path named in errors (``vision``, ``vision.fused.0``).
    """

    def __init__(
        self,
        model: nn.Module,
        family: str,
        feature_layer: int | Sequence[int] | None,
        image_size: int,
        image_mean: tuple[float, ...],
        image_std: tuple[float, ...],
        key: str = "vision",
    ) -> None:
        super().__init__()
        self.model = model
        self.family = family
        self.spec = FAMILIES[family]
        self.hf_config = model.config
        layers, is_list = _layer_list(feature_layer, self.spec.default_layer)
        self.feature_layers: tuple[int, ...] = tuple(layers)
        self.feature_layer: int | list[int] = list(layers) if is_list else layers[0]
        self.image_size = int(image_size)
        self.image_mean = tuple(float(v) for v in image_mean)
        self.image_std = tuple(float(v) for v in image_std)
        self.n_prefix = self.spec.n_prefix(self.hf_config)
        n_layers = self._num_hidden_states()
        if n_layers is not None:
            for layer in self.feature_layers:
                if not -n_layers <= layer < n_layers:
                    raise ValueError(
                        f"{key}.feature_layer {layer} is out of range: {family} has {n_layers} hidden states "
                        f"(indices {-n_layers} .. {n_layers - 1})"
                    )
        self.key = key
        # the deepest hidden state read: blocks after it are skipped (``_only_blocks_read``)
        self._resolved_layers = tuple(i % n_layers for i in self.feature_layers) if n_layers else self.feature_layers
        self._blocks_at = _block_list_path(model, self.hf_config) if self.spec.kind != "cnn" else None
        self._measure()

    def _measure(self) -> None:
        """``num_tokens`` and ``hidden_size`` at ``image_size`` (a CNN is probed with a blank image)."""
        key, family = self.key, self.family
        if self.spec.kind == "cnn":
            with torch.no_grad():
                probe = self._hidden_states(
                    torch.zeros(1, 3, self.image_size, self.image_size, dtype=self._dtype())
                )
            shapes = [tuple(probe[i].shape[2:]) for i in self._resolved_layers]
            if len(set(shapes)) > 1:
                described = ", ".join(f"{i}: {h}x{w}" for i, (h, w) in zip(self.feature_layers, shapes))
                raise ValueError(
                    f"{key}.feature_layer {list(self.feature_layers)}: the {family} hidden states have "
                    f"different resolutions ({described}) and can't be concatenated channel-wise; "
                    "pick layers of one resolution or a single layer"
                )
            self.num_tokens = int(shapes[0][0] * shapes[0][1])
            self.hidden_size = int(sum(probe[i].shape[1] for i in self._resolved_layers))
        else:
            patch = int(self.hf_config.patch_size)
            if self.image_size % patch:
                raise ValueError(
                    f"{key}: image_size {self.image_size} is not a multiple of the patch size {patch}"
                )
            self.num_tokens = (self.image_size // patch) ** 2
            self.hidden_size = int(self.hf_config.hidden_size) * len(self.feature_layers)

    def set_image_size(self, image_size: int) -> None:
        """Run at another resolution from now on (high-resolution continuation): ViTs
        interpolate their position embeddings, CNNs just see a larger grid."""
        native = getattr(self.hf_config, "image_size", None)
        if self.spec.kind == "vit" and not self.spec.interpolate_kw and native not in (None, image_size):
            if self.family not in ("dinov2", "dinov2_with_registers"):  # DINOv2 always interpolates
                raise ValueError(f"{self.key}: {self.family} can't run at {image_size} px (no position interpolation)")
        previous = self.image_size
        self.image_size = int(image_size)
        try:
            self._measure()
        except ValueError:
            self.image_size = previous
            raise

    # ------------------------------------------------------------------ helpers

    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _num_hidden_states(self) -> int | None:
        if self.spec.kind == "cnn":
            n = len(getattr(self.hf_config, "depths", []) or [])
            return n + 1 if n else None
        return int(self.hf_config.num_hidden_layers) + 1

    @property
    def frozen(self) -> bool:
        return not any(p.requires_grad for p in self.parameters())

    @property
    def blocks_run(self) -> int | None:
        """How many transformer blocks a forward runs (None: a CNN, or no block list found)."""
        if self._blocks_at is None:
            return None
        parent, name = self._blocks_at
        return min(len(getattr(parent, name)), max(self._resolved_layers))

    def parameters_run(self) -> int:
        """Parameters a forward uses: all but those of the blocks it skips (FLOPs accounting)."""
        total = sum(p.numel() for p in self.parameters())
        if self._blocks_at is None:
            return total
        parent, name = self._blocks_at
        skipped = list(getattr(parent, name))[self.blocks_run :]
        return total - sum(p.numel() for block in skipped for p in block.parameters())

    @contextmanager
    def _only_blocks_read(self):
        """Run only the transformer blocks up to the deepest feature layer: LLaVA's default,
        the second-to-last layer, leaves the last block's forward unused (timm's
        ``forward_intermediates(stop_early=True)`` does the same; transformers has no such
        option). The HF model's block list is swapped for its first blocks during the call and
        restored after; ``hidden_states[i]`` for ``i`` up to that depth are unchanged (tested)."""
        keep = self.blocks_run
        if keep is None:
            yield
            return
        parent, name = self._blocks_at
        blocks = getattr(parent, name)
        if keep == len(blocks):
            yield
            return
        setattr(parent, name, nn.ModuleList(list(blocks)[:keep]))
        try:
            yield
        finally:
            setattr(parent, name, blocks)

    def _hidden_states(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The HF model's hidden states up to the deepest feature layer, as they come out."""
        with self._only_blocks_read():
            return self._run_model(pixel_values)

    def _run_model(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        kwargs: dict[str, Any] = {"output_hidden_states": True}
        if self.spec.kind == "naflex":
            n, c, h, w = pixel_values.shape
            p = int(self.hf_config.patch_size)
            gh, gw = h // p, w // p
            # (N, C, gh, p, gw, p) -> (N, gh, gw, p, p, C) -> (N, gh*gw, p*p*C), the SigLIP2 processor's order
            patches = pixel_values.reshape(n, c, gh, p, gw, p).permute(0, 2, 4, 3, 5, 1).reshape(n, gh * gw, -1)
            out = self.model(
                pixel_values=patches,
                pixel_attention_mask=torch.ones(n, gh * gw, dtype=torch.long, device=patches.device),
                spatial_shapes=torch.tensor([[gh, gw]] * n, dtype=torch.long, device=patches.device),
                **kwargs,
            )
        else:
            if self.spec.interpolate_kw and self.image_size != getattr(self.hf_config, "image_size", self.image_size):
                kwargs["interpolate_pos_encoding"] = True
            out = self.model(pixel_values=pixel_values, **kwargs)
        return out.hidden_states

    def _hidden(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``hidden_states[feature_layer]`` of the HF model (several: concatenated channel-wise)."""
        states = self._hidden_states(pixel_values)
        if len(self._resolved_layers) == 1:
            return states[self._resolved_layers[0]]
        channel_dim = 1 if self.spec.kind == "cnn" else -1  # CNN: [N, C, H, W]; ViT: [N, T, C]
        return torch.cat([states[i] for i in self._resolved_layers], dim=channel_dim)

    # ------------------------------------------------------------------ forward

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[N, 3, S, S]`` -> ``[N, num_tokens, hidden_size]``.

        A frozen encoder (no parameter requires grad) runs under ``no_grad`` and in eval mode.
        """
        pixel_values = pixel_values.to(self._dtype())
        frozen = self.frozen
        # a frozen encoder also runs in eval mode: BatchNorm statistics must not drift, dropout is off
        restore = frozen and self.model.training
        if restore:
            self.model.eval()
        try:
            with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
                h = self._hidden(pixel_values)
        finally:
            if restore:
                self.model.train()
        if self.spec.kind == "cnn":
            return h.flatten(2).transpose(1, 2)  # [N, C, H, W] -> [N, H*W, C], row-major grid
        return h[:, self.n_prefix :]


def _block_list_path(model: nn.Module, hf_config: PretrainedConfig) -> tuple[nn.Module, str] | None:
    """(parent module, attribute) of the HF model's list of transformer blocks: the one
    ``nn.ModuleList`` of ``num_hidden_layers`` modules (found by structure, as its attribute path
    differs between families and transformers releases); None if there is not exactly one."""
    n_blocks = getattr(hf_config, "num_hidden_layers", None)
    found = [name for name, module in model.named_modules()
             if isinstance(module, nn.ModuleList) and len(module) == n_blocks]  # fmt: skip
    if len(found) != 1:
        return None
    parent, _, name = found[0].rpartition(".")
    return model.get_submodule(parent), name


def resize_token_grid(features: torch.Tensor, side: int) -> torch.Tensor:
    """``[N, s*s, C]`` (a row-major square grid) -> ``[N, side*side, C]``, bilinear on the 2-D grid.

    ``align_corners=False``: the token centres of both grids cover the same image area.
    """
    n, t, c = features.shape
    s = grid_side(t)
    if s == side:
        return features
    grid = features.transpose(1, 2).reshape(n, c, s, s)
    dtype = grid.dtype
    if grid.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
        grid = grid.float()  # half-precision bilinear is not implemented everywhere on CPU
    grid = F.interpolate(grid, size=(side, side), mode="bilinear", align_corners=False)
    return grid.to(dtype).flatten(2).transpose(1, 2)


class FusedVisionEncoder(nn.Module):
    """Several encoders on the same image, fused channel-wise (Prismatic VLMs' DINOv2 + SigLIP).

    ``main`` fixes the interface: pixels come normalised with its statistics (``image_mean`` /
    ``image_std`` are the main encoder's, so the data pipeline is unchanged), and the output grid
    is its grid (``num_tokens``). Each further encoder in ``fused`` gets the pixels converted
    back to [0, 1] (``x * std_main + mean_main``) and re-normalised with its own statistics, and
    its feature grid is resized bilinearly to the main grid when they differ. Output:
    ``[N, num_tokens, main.hidden_size + sum(fused[i].hidden_size)]``, main first.

    Parameter names: ``main.model.*`` for the main encoder, ``fused.{i}.model.*`` for
    ``VisionConfig.fused[i]`` (inside a VLM: ``vision.main.*``, ``vision.fused.0.*``).
    Every part runs as ``VisionEncoder`` does: a frozen part under ``no_grad`` and in eval mode,
    whatever the others do.
    """

    family = "fused"

    def __init__(self, main: VisionEncoder, fused: Sequence[VisionEncoder]) -> None:
        super().__init__()
        if not fused:
            raise ValueError("a FusedVisionEncoder needs at least one further encoder")
        self.main = main
        self.fused = nn.ModuleList(fused)
        for i, enc in enumerate(fused):
            if enc.image_size != main.image_size:
                raise ValueError(
                    f"vision.fused.{i}: image_size {enc.image_size} differs from the main encoder's "
                    f"{main.image_size}; every encoder of a fusion sees the same image"
                )
        self.image_size = main.image_size
        self.image_mean = main.image_mean
        self.image_std = main.image_std
        self.num_tokens = main.num_tokens
        self.grid = grid_side(main.num_tokens)
        for i, enc in enumerate(fused):
            try:
                grid_side(enc.num_tokens)
            except ValueError as err:
                raise ValueError(f"vision.fused.{i}: {err}; its features can't be resized to the main grid") from None
        self.hidden_size = main.hidden_size + sum(enc.hidden_size for enc in fused)
        # what code written for one encoder reads: the main encoder's config and layer
        self.hf_config = main.hf_config
        self.feature_layer = main.feature_layer

    def set_image_size(self, image_size: int) -> None:
        """Every encoder at the new size; the output grid is the main encoder's new grid."""
        for enc in self.encoders:
            enc.set_image_size(image_size)
        self.image_size = self.main.image_size
        self.num_tokens = self.main.num_tokens
        self.grid = grid_side(self.main.num_tokens)

    @property
    def encoders(self) -> list[VisionEncoder]:
        """The main encoder, then the further ones, in output-channel order."""
        return [self.main, *self.fused]

    def parameters_run(self) -> int:
        """Parameters a forward uses, every encoder's (``VisionEncoder.parameters_run``)."""
        return sum(enc.parameters_run() for enc in self.encoders)

    @property
    def families(self) -> list[str]:
        return [enc.family for enc in self.encoders]

    @property
    def hf_configs(self) -> list[PretrainedConfig]:
        return [enc.hf_config for enc in self.encoders]

    @property
    def frozen(self) -> bool:
        return not any(p.requires_grad for p in self.parameters())

    def renormalise(self, pixel_values: torch.Tensor, enc: VisionEncoder) -> torch.Tensor:
        """Pixels normalised with the main statistics -> the same pixels normalised with ``enc``'s."""
        if enc.image_mean == self.image_mean and enc.image_std == self.image_std:
            return pixel_values
        x = pixel_values.float()

        def stat(v):
            return torch.tensor(v, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)

        raw = x * stat(self.image_std) + stat(self.image_mean)
        return (raw - stat(enc.image_mean)) / stat(enc.image_std)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[N, 3, S, S]`` (main normalisation) -> ``[N, num_tokens, hidden_size]``."""
        main = self.main(pixel_values)
        feats = [main]
        for enc in self.fused:
            x = self.renormalise(pixel_values, enc)
            feats.append(resize_token_grid(enc(x), self.grid).to(main.dtype))
        return torch.cat(feats, dim=-1)


# ---------------------------------------------------------------------- building


def _apply_overrides(hf_config: PretrainedConfig, overrides: dict[str, Any], what: str, key: str = "vision") -> None:
    for k, value in overrides.items():
        if not hasattr(hf_config, k):
            raise ValueError(f"{key}.overrides: {what} config has no field {k!r}")
        setattr(hf_config, k, value)


def _preset_config(
    name: str, image_size: int, overrides: dict[str, Any], key: str = "vision"
) -> PretrainedConfig:
    if name == "tiny-cnn":
        # embedder: conv s2 + maxpool s2 (/4); stages s1, s2, s2 (/16 overall): 64 px -> 4x4 x 128
        c = transformers.ResNetConfig(
            num_channels=3,
            embedding_size=32,
            hidden_sizes=[32, 64, 128],
            depths=[1, 1, 1],
            layer_type="basic",
            downsample_in_first_stage=False,
        )
    elif name == "tiny-vit":
        c = transformers.CLIPVisionConfig(
            image_size=image_size,
            patch_size=16,
            hidden_size=128,
            intermediate_size=512,
            num_hidden_layers=4,
            num_attention_heads=4,
        )
    else:  # pragma: no cover - guarded by the caller
        raise ValueError(name)
    _apply_overrides(c, overrides, name, key)
    return c


def read_image_stats(name_or_path: str) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """``(image_mean, image_std)`` from ``preprocessor_config.json`` next to the model, if it has them."""
    path = Path(name_or_path)
    file: Path | None = None
    if path.is_dir():
        file = path / "preprocessor_config.json"
    else:
        try:
            from transformers.utils import cached_file

            found = cached_file(
                name_or_path,
                "preprocessor_config.json",
                _raise_exceptions_for_missing_entries=False,
                _raise_exceptions_for_connection_errors=False,
            )
            file = Path(found) if found else None
        except Exception:
            file = None
    if file is None or not file.is_file():
        return None
    data = json.loads(file.read_text(encoding="utf-8"))
    mean, std = data.get("image_mean"), data.get("image_std")
    if mean is None or std is None:
        return None
    if isinstance(mean, (int, float)):
        mean = [mean] * 3
    if isinstance(std, (int, float)):
        std = [std] * 3
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def vision_from_hf_config(
    hf_config: PretrainedConfig | dict,
    feature_layer: int | Sequence[int] | None,
    image_size: int,
    image_mean: tuple[float, ...] | None = None,
    image_std: tuple[float, ...] | None = None,
    key: str = "vision",
) -> VisionEncoder:
    """A randomly initialised encoder for an HF config (or its ``to_dict()``); no downloads."""
    if isinstance(hf_config, dict):
        from transformers import CONFIG_MAPPING

        hf_config = CONFIG_MAPPING[hf_config["model_type"]].from_dict(dict(hf_config))
    model_type = hf_config.model_type
    if model_type in TOWER_OF:
        hf_config = hf_config.vision_config
        model_type = hf_config.model_type
    spec = family_of(model_type)
    model = getattr(transformers, spec.model_class)(hf_config, **dict(spec.model_kwargs))
    return VisionEncoder(
        model,
        model_type,
        feature_layer,
        image_size,
        image_mean if image_mean is not None else spec.mean,
        image_std if image_std is not None else spec.std,
        key=key,
    )


def _build_one(
    name: str,
    image_size: int,
    feature_layer: int | Sequence[int] | None,
    overrides: dict[str, Any],
    key: str,
) -> VisionEncoder:
    """One encoder: a preset (random init) or a pretrained HF vision model, by hub name or local path."""
    if name in PRESETS:
        return vision_from_hf_config(
            _preset_config(name, image_size, overrides, key), feature_layer, image_size, HALF, HALF, key=key
        )

    hf_config = AutoConfig.from_pretrained(name)
    if hf_config.model_type in TOWER_OF:  # a full image-text model: keep the vision tower
        hf_config = hf_config.vision_config
    spec = family_of(hf_config.model_type)
    _apply_overrides(hf_config, overrides, name, key)
    with _quiet_transformers():
        model = getattr(transformers, spec.model_class).from_pretrained(
            name, config=hf_config, **dict(spec.model_kwargs)
        )
    stats = read_image_stats(name)
    mean, std = stats if stats is not None else (spec.mean, spec.std)
    return VisionEncoder(model, hf_config.model_type, feature_layer, image_size, mean, std, key=key)


def build_vision_encoder(cfg: VisionConfig) -> VisionEncoder | FusedVisionEncoder:
    """The encoder ``cfg`` names; a ``FusedVisionEncoder`` when ``cfg.fused`` lists further ones.

    Every encoder of a fusion uses ``cfg.image_size``.
    """
    main = _build_one(cfg.name, cfg.image_size, cfg.feature_layer, cfg.overrides, "vision")
    if not cfg.fused:
        return main
    fused = [
        _build_one(f.name, cfg.image_size, f.feature_layer, f.overrides, f"vision.fused.{i}")
        for i, f in enumerate(cfg.fused)
    ]
    return FusedVisionEncoder(main, fused)


# ---------------------------------------------------------------------- checkpoints


def _encoder_state(enc: VisionEncoder) -> dict[str, Any]:
    return {
        "family": enc.family,
        "feature_layer": enc.feature_layer,
        "image_size": enc.image_size,
        "image_mean": list(enc.image_mean),
        "image_std": list(enc.image_std),
    }


def vision_state(encoder: VisionEncoder | FusedVisionEncoder) -> dict[str, Any]:
    """The checkpoint ``config.json`` entries that rebuild ``encoder`` without downloads.

    ``{"vision_hf_config": <the (main) encoder's HF config dict>, "vision": {...}}``. For one
    encoder ``vision`` holds ``family``, ``feature_layer`` (an int or a list), ``image_size``,
    ``image_mean``, ``image_std``. For a fusion it holds ``family: "fused"``, ``image_size``,
    the pixel statistics (the main encoder's) and ``encoders``: one entry per encoder, main
    first, each with the keys above plus its ``hf_config``.
    """
    if isinstance(encoder, FusedVisionEncoder):
        vision = {
            "family": FusedVisionEncoder.family,
            "image_size": encoder.image_size,
            "image_mean": list(encoder.image_mean),
            "image_std": list(encoder.image_std),
            "encoders": [
                {**_encoder_state(enc), "hf_config": enc.hf_config.to_dict()} for enc in encoder.encoders
            ],
        }
        return {"vision_hf_config": encoder.main.hf_config.to_dict(), "vision": vision}
    return {"vision_hf_config": encoder.hf_config.to_dict(), "vision": _encoder_state(encoder)}


def vision_from_state(state: dict[str, Any]) -> VisionEncoder | FusedVisionEncoder:
    """The encoder ``vision_state`` described (random weights: load the checkpoint's after)."""
    v = state["vision"]
    if v["family"] == FusedVisionEncoder.family:
        encs = [
            vision_from_hf_config(
                e["hf_config"],
                e["feature_layer"],
                e.get("image_size", v["image_size"]),
                tuple(e["image_mean"]),
                tuple(e["image_std"]),
                key="vision" if i == 0 else f"vision.fused.{i - 1}",
            )
            for i, e in enumerate(v["encoders"])
        ]
        return FusedVisionEncoder(encs[0], encs[1:])
    return vision_from_hf_config(
        state["vision_hf_config"], v["feature_layer"], v["image_size"], tuple(v["image_mean"]), tuple(v["image_std"])
    )


def grid_side(num_tokens: int) -> int:
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"{num_tokens} tokens do not form a square grid")
    return side
