"""The vision-language model: vision encoder -> connector -> causal LM (LLaVA-style splicing).

Each image becomes ``tokens_per_image`` embeddings that replace a run of that many ``<image>``
tokens in the text; images are taken in order, row by row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel

from vlmkit.config import ModelConfig
from vlmkit.models.connectors import build_connector
from vlmkit.models.vision import VisionEncoder, build_vision_encoder
from vlmkit.train.losses import next_token_loss

IMAGE_TOKEN = "<image>"
LLM_PRESETS = ("tiny-llama",)


class ImageTokenMismatch(ValueError):
    """The ``<image>`` tokens of a batch don't line up with the images given."""


@dataclass
class VLMOutput:
    logits: torch.Tensor  # [B, T, V]
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


def resize_embeddings_mean_init(llm: PreTrainedModel, new_size: int) -> None:
    """Grow the vocabulary to ``new_size`` rows; new rows (input and, if untied, output) = mean of old rows.

    Mean initialisation keeps the new tokens' logits at the average of the existing ones, so adding
    tokens does not disturb the model's distribution (Hewitt, 2021).
    """
    old_in = llm.get_input_embeddings()
    old_size, dim = old_in.weight.shape
    if new_size <= old_size:
        return
    out = llm.get_output_embeddings()
    tied = out is not None and out.weight is old_in.weight
    w = old_in.weight.data
    new_in = nn.Embedding(new_size, dim, padding_idx=old_in.padding_idx, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new_in.weight[:old_size] = w
        new_in.weight[old_size:] = w.float().mean(0).to(w.dtype)
    llm.set_input_embeddings(new_in)
    if out is not None:
        if tied:
            out.weight = new_in.weight
        else:
            ow = out.weight.data
            new_out = nn.Linear(dim, new_size, bias=out.bias is not None, device=ow.device, dtype=ow.dtype)
            with torch.no_grad():
                new_out.weight[:old_size] = ow
                new_out.weight[old_size:] = ow.float().mean(0).to(ow.dtype)
                if out.bias is not None:
                    new_out.bias[:old_size] = out.bias
                    new_out.bias[old_size:] = out.bias.float().mean().to(out.bias.dtype)
            llm.set_output_embeddings(new_out)
    llm.config.vocab_size = new_size
    text_cfg = llm.config.get_text_config() if hasattr(llm.config, "get_text_config") else llm.config
    text_cfg.vocab_size = new_size


def tiny_llama_config(tokenizer, overrides: dict | None = None) -> LlamaConfig:
    cfg = LlamaConfig(
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
    for key, value in (overrides or {}).items():
        if not hasattr(cfg, key):
            raise ValueError(f"llm.overrides: LlamaConfig has no field {key!r}")
        setattr(cfg, key, value)
    return cfg


def build_llm(model_cfg: ModelConfig, tokenizer) -> PreTrainedModel:
    name = model_cfg.llm.name
    if name == "tiny-llama":
        llm = AutoModelForCausalLM.from_config(
            tiny_llama_config(tokenizer, model_cfg.llm.overrides), attn_implementation=model_cfg.llm.attn_implementation
        )
    else:
        llm = AutoModelForCausalLM.from_pretrained(
            name, attn_implementation=model_cfg.llm.attn_implementation, **model_cfg.llm.overrides
        )
    if len(tokenizer) > llm.get_input_embeddings().weight.shape[0]:
        resize_embeddings_mean_init(llm, len(tokenizer))
    return llm


def image_token_id_of(tokenizer) -> int:
    tid = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if tid is None or (tokenizer.unk_token_id is not None and tid == tokenizer.unk_token_id):
        raise ValueError(f"the tokenizer has no {IMAGE_TOKEN!r} token; add it as a special token")
    return int(tid)


# ---------------------------------------------------------------------- the model


class VisionLanguageModel(nn.Module):
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
        self.tokens_per_image = int(connector.num_output_tokens(vision.num_tokens))

    @classmethod
    def from_config(cls, model_cfg: ModelConfig, tokenizer) -> "VisionLanguageModel":
        """Build vision encoder, connector and LLM from the config (presets: random weights)."""
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
        return {"vision": self.vision, "connector": self.connector, "llm": self.llm}

    @property
    def device(self) -> torch.device:
        return self.llm.get_input_embeddings().weight.device

    # ------------------------------------------------------------------ images

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[N, 3, S, S]`` -> ``[N, tokens_per_image, D]`` in the LLM's embedding dtype."""
        feats = self.connector(self.vision(pixel_values))
        return feats.to(self.llm.get_input_embeddings().weight.dtype)

    def _check_image_tokens(
        self, is_img: torch.Tensor, n_images: int, sample_ids: Sequence | None
    ) -> None:
        k = self.tokens_per_image
        rows = is_img.shape[0]
        ids = list(sample_ids) if sample_ids is not None else [f"row {i}" for i in range(rows)]
        mask = is_img.cpu()
        counts = mask.sum(1).tolist()
        broken = []
        for r in range(rows):
            if counts[r] == 0:
                continue
            pos = mask[r].nonzero().flatten()
            if counts[r] % k or (pos.view(-1, k)[:, -1] - pos.view(-1, k)[:, 0] != k - 1).any():
                broken.append(r)
        if broken:
            detail = ", ".join(f"{ids[r]} ({counts[r]} image tokens)" for r in broken)
            raise ImageTokenMismatch(
                f"image tokens do not come in whole runs of {k} (tokens_per_image) in: {detail}"
            )
        total = sum(counts)
        if total != n_images * k:
            per_row = ", ".join(f"{ids[r]}: {counts[r] // k}" for r in range(rows))
            raise ImageTokenMismatch(
                f"the batch's <image> tokens make {total // k} image(s) but {n_images} image(s) were given "
                f"(images per sample by tokens: {per_row})"
            )

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        sample_ids: Sequence | None = None,
    ) -> torch.Tensor:
        """Token embeddings with each image's features over its run of ``<image>`` tokens."""
        embeds = self.llm.get_input_embeddings()(input_ids)
        is_img = input_ids == self.image_token_id
        n_images = 0 if pixel_values is None else int(pixel_values.shape[0])
        self._check_image_tokens(is_img, n_images, sample_ids)
        if n_images == 0:
            return embeds
        feats = self.encode_images(pixel_values)  # [N, K, D]
        # masked_scatter fills positions in row-major order: images in order, row by row
        return embeds.masked_scatter(is_img.unsqueeze(-1), feats.reshape(-1, feats.shape[-1]))

    # ------------------------------------------------------------------ forward / generate

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        sample_ids: Sequence | None = None,
    ) -> VLMOutput:
        embeds = self.embed(input_ids, pixel_values, sample_ids)
        out = self.llm(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        )
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
        )
