"""The decoding loop: prefill with ``inputs_embeds``, then one token at a time with a KV cache.

Prompts must be left-padded (every row ends with a real token). Position ids come from the
attention mask, so a padded row gives the same tokens as the row alone. Rows stop independently
at a stop token (not returned) or after ``max_new_tokens``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
from transformers import DynamicCache

from vlmkit.models.vlm import position_ids_from_mask

if TYPE_CHECKING:
    from vlmkit.models.vlm import VisionLanguageModel


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token per row from ``logits [B, V]``: argmax at temperature 0, else nucleus sampling.

    Top-p keeps the smallest set of most likely tokens whose probability reaches ``top_p`` (the
    most likely token is always kept), renormalises, and samples with ``generator``.
    """
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass strictly above each token
        drop = before >= top_p
        drop[..., 0] = False
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    probs = probs / probs.sum(-1, keepdim=True)
    if generator is not None and generator.device != probs.device:
        draw = torch.multinomial(probs.cpu(), 1, generator=generator).to(probs.device)
    else:
        draw = torch.multinomial(probs, 1, generator=generator)
    return draw.squeeze(-1)


@torch.no_grad()
def generate(
    model: "VisionLanguageModel",
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pixel_values: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    stop_token_ids: Sequence[int] = (),
    temperature: float = 0.0,
    top_p: float = 1.0,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    image_layouts=None,
) -> list[list[int]]:
    """New token ids per row, stop token excluded. ``use_cache=False`` recomputes the whole
    sequence each step (slow; for checking the cached path)."""
    if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError("input_ids and attention_mask must both be [B, T]")
    if (attention_mask[:, -1] == 0).any():
        raise ValueError("generate needs left-padded prompts: every row must end with a real token")
    llm = model.llm
    emb_layer = llm.get_input_embeddings()
    stops = set(int(t) for t in stop_token_ids)

    embeds = model.embed(input_ids, pixel_values, image_layouts=image_layouts)
    with model.reading_images(input_ids, pixel_values) as advance:
        return _decode(llm, emb_layer, input_ids, embeds, attention_mask, advance, max_new_tokens,
                       stops, temperature, top_p, use_cache, generator)  # fmt: skip


def _decode(llm, emb_layer, input_ids, embeds, attention_mask, advance, max_new_tokens, stops,
            temperature, top_p, use_cache, generator) -> list[list[int]]:  # fmt: skip
    """The loop of ``generate``; ``advance`` tells cross-attention blocks about the new tokens."""
    b = input_ids.shape[0]
    ids = input_ids
    mask = attention_mask.long()
    positions = position_ids_from_mask(mask)
    cache = DynamicCache(config=llm.config) if use_cache else None
    out = llm(
        inputs_embeds=embeds,
        attention_mask=mask,
        position_ids=positions,
        cache=cache,
        use_cache=use_cache,
        logits_to_keep=1,
    )
    logits = out.logits[:, -1]

    results: list[list[int]] = [[] for _ in range(b)]
    done = torch.zeros(b, dtype=torch.bool)
    for step in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_p, generator)
        for r, tok in enumerate(nxt.tolist()):
            if done[r]:
                continue
            if tok in stops:
                done[r] = True
            else:
                results[r].append(tok)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        # finished rows keep decoding (their tokens are ignored) so the batch stays rectangular
        next_pos = mask.sum(-1, keepdim=True)  # real tokens so far = the next position
        next_emb = emb_layer(nxt.unsqueeze(-1))
        mask = torch.cat([mask, mask.new_ones(b, 1)], dim=1)
        ids = torch.cat([ids, nxt.unsqueeze(-1)], dim=1)
        advance(nxt.unsqueeze(-1), whole=None if use_cache else ids)
        if use_cache:
            out = llm(
                inputs_embeds=next_emb,
                attention_mask=mask,
                position_ids=next_pos,
                cache=cache,
                use_cache=True,
            )
        else:
            embeds = torch.cat([embeds, next_emb], dim=1)
            positions = torch.cat([positions, next_pos], dim=1)
            out = llm(
                inputs_embeds=embeds,
                attention_mask=mask,
                position_ids=positions,
                use_cache=False,
                logits_to_keep=1,
            )
        logits = out.logits[:, -1]
    return results
