"""Variable-length ("varlen") attention for packed rows, as a transformers attention backend.

A packed row (``data.packing``) holds several samples, each attending only to itself. With
``attn_implementation: sdpa`` transformers turns the position ids into a block-diagonal causal
mask and PyTorch's SDPA then computes attention densely over the whole row (the mask only
zeroes the cross-sample scores), with its memory-efficient kernel rather than FlashAttention's.
A varlen kernel (Dao, FlashAttention-2, 2023: ``cu_seqlens``) instead treats the tokens of all
rows as one stream cut into segments, and computes each segment's causal attention alone:
no work on cross-sample pairs, and the fast kernel.

Two settings of ``llm.attn_implementation`` select this module. Both register a name with
transformers' ``AttentionInterface`` (so that any causal LM that dispatches through it, Llama,
Qwen2/3, Gemma, Mistral, SmolLM, ... gets it without code changes) and, for its masks,
transformers' own SDPA mask builder; ``VisionLanguageModel.forward`` passes ``cu_seq_lens_q``
and ``max_length_q``, computed once per forward from the position ids, with packed rows.

* ``auto`` (the default): a packed training forward runs the varlen kernel,
  ``torch.nn.attention.varlen.varlen_attn`` (PyTorch's FlashAttention build, no extra package),
  where it exists (a CUDA device) and is exact (no sliding window, soft-capping or attention
  dropout); everything else is SDPA with the mask transformers built, block-diagonal for packed
  rows. The issue's rule: the varlen kernel on a GPU, SDPA with a block-diagonal mask otherwise.
* ``varlen``: packed rows always take a varlen path: the kernel on CUDA, elsewhere
  ``bucketed_varlen`` (SDPA over groups of similar-length segments: on a CPU even with the
  masked rows at short rows, and faster the longer the rows, bench/packed_attention.py); an
  LLM with sliding windows or soft-capping is refused rather than silently computed without them.

Unpacked batches and generation with a KV cache are plain SDPA under both.

Why not transformers' ``flash_attention_2``: it needs the ``flash-attn`` package, which has no
wheels for most PyTorch/CUDA pairs and takes an hour to build; PyTorch ships the same kernel.
"""

from __future__ import annotations

import functools
import inspect
from typing import NamedTuple

import torch
import torch.nn.functional as F

from vlmkit.config import ConfigError

NAME = "vlmkit_varlen"  # the names registered with transformers: llm.attn_implementation varlen
AUTO_NAME = "vlmkit_auto"  # and auto
KERNEL_LACKS = ("sliding_window", "softcap")  # attention options (Mistral's windows, Gemma 2's caps) not implemented


def register() -> str:
    """Register both backends with transformers (idempotent); returns the ``varlen`` one's name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, varlen_attention_forward)
    AttentionInterface.register(AUTO_NAME, auto_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    AttentionMaskInterface.register(AUTO_NAME, sdpa_mask)
    return NAME


def hf_attn_implementation(llm_config) -> str:
    """The name to give transformers for an ``LLMConfig`` (vlmkit's own are registered first)."""
    ours = {"varlen": NAME, "auto": AUTO_NAME}
    if llm_config.attn_implementation in ours:
        register()
        return ours[llm_config.attn_implementation]
    return llm_config.attn_implementation


def packed_attention(llm_attn: str, device: torch.device, llm_config=None) -> str:
    """How packed rows are attended under ``llm.attn_implementation`` on ``device``, in words (logs)."""
    windowed = llm_config is not None and _windowed_or_capped(llm_config)
    if llm_attn == "flash_attention_2":
        return "flash-attention varlen (flash-attn package, one row per micro-batch)"
    if llm_attn in ("varlen", "auto") and _kernel_on(device) and not windowed:
        return "varlen kernel (torch.nn.attention.varlen)"
    if llm_attn == "varlen":
        return "SDPA per group of similar-length samples (vlmkit's CPU varlen path)"
    return f"{'SDPA' if llm_attn != 'eager' else 'eager attention'} with a block-diagonal mask"


# From this row budget on, SDPA's masked rows cost clearly more than bucketed_varlen on a CPU
# (bench/packed_attention.py on 2 cores: 1.3-1.5x at 512 tokens, 2.6-3.2x at 1,024; even at 256).
_LONG_ROWS_ON_CPU = 512


def packed_attention_hint(llm_attn: str, device: torch.device, row_tokens: int, llm_config=None) -> str | None:
    """Advice for the stage log when long packed rows will be masked, by ``sdpa`` anywhere or by
    ``auto`` without the varlen kernel, where ``varlen`` would be faster (on an H100 2.7x at
    4,096 tokens, docs/benchmarks.md); None otherwise."""
    windowed = llm_config is not None and _windowed_or_capped(llm_config)
    masked = llm_attn == "sdpa" or (llm_attn == "auto" and not _kernel_on(device))
    if not masked or windowed or row_tokens < _LONG_ROWS_ON_CPU:
        return None
    return (f"rows of up to {row_tokens} tokens are masked densely (rows x width^2); "
            "model.llm.attn_implementation: varlen computes each sample's attention alone and is faster "
            "here (bench/packed_attention.py)")


def wants_segments(llm_attn: str, device: torch.device) -> bool:
    """Whether a packed forward should compute ``cu_seqlens`` (``packed_segments``, a host sync)
    for its attention: ``varlen`` always, ``auto`` only where the kernel can read them."""
    return llm_attn == "varlen" or (llm_attn == "auto" and _kernel_on(device))


def check_attention_supported(llm_config, llm_attn: str) -> None:
    """Refuse, when the model is built, vlmkit's SDPA-based settings for an LLM that soft-caps its
    attention scores (Gemma 2): SDPA has no cap, and transformers, which refuses its own
    ``sdpa`` for such a model at load, would only say so at the first forward."""
    text = _text_config(llm_config)
    if llm_attn in ("auto", "varlen") and getattr(text, "attn_logit_softcapping", None):
        raise ConfigError(f"model.llm.attn_implementation: {llm_attn!r} computes attention with SDPA, which cannot "
                          f"soft-cap scores as this LLM ({text.model_type}) does; expected eager")


def _text_config(llm_config):
    return llm_config.get_text_config() if hasattr(llm_config, "get_text_config") else llm_config


def _windowed_or_capped(llm_config) -> bool:
    text = _text_config(llm_config)
    window = getattr(text, "sliding_window", None) if getattr(text, "use_sliding_window", True) else None
    return bool(window) or bool(getattr(text, "attn_logit_softcapping", None))


def packed_segments(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``cu_seqlens`` (int32, [segments + 1]) and the longest segment of packed rows.

    ``position_ids`` [R, W] restart at 0 at every sample (and at a row's trailing padding);
    the rows are read as one stream of R * W tokens, each row starting a new segment.
    """
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).flatten()
    if starts.numel() == 0 or int(starts[0]) != 0:
        raise ValueError("packed position_ids must start every row at 0")
    cu = torch.cat([starts, starts.new_tensor([flat.numel()])]).to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max())  # one host sync per forward, not per layer
    return cu, max_len


def auto_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,  # [B, H, T, D]
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """``llm.attn_implementation: auto``: the varlen kernel for packed rows where it exists and
    computes exactly what the model asks; SDPA with transformers' mask for everything else."""
    exact = not dropout and all(kwargs.get(option) is None for option in KERNEL_LACKS)
    if kwargs.get("cu_seq_lens_q") is not None and exact and _kernel_available(query):
        return varlen_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return _sdpa(module, query, key, value, attention_mask, dropout=dropout, **kwargs)


def _sdpa(module, query, key, value, attention_mask, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' own SDPA attention, without the varlen keywords it does not take."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    for name in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"):
        kwargs.pop(name, None)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,  # [B, H, T, D]
    key: torch.Tensor,  # [B, Hkv, T, D]
    value: torch.Tensor,  # [B, Hkv, T, D]
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    max_length_q: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: returns ([B, T, H, D], no weights)."""
    if cu_seq_lens_q is None or query.shape[2] != key.shape[2]:  # not a packed training forward
        return _sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if dropout:
        raise ValueError("varlen attention: attention dropout is not supported")
    for option in KERNEL_LACKS:
        if kwargs.get(option) is not None:
            raise ValueError(f"varlen attention: this LLM uses {option}, which the varlen path does not "
                             "implement; train it with llm.attn_implementation sdpa or eager")
    b, h, t, d = query.shape
    scale = scaling if scaling is not None else d**-0.5
    q = query.transpose(1, 2).reshape(b * t, h, d)  # [B*T, H, D]: the rows as one token stream
    k = key.transpose(1, 2).reshape(b * t, key.shape[1], d)
    v = value.transpose(1, 2).reshape(b * t, value.shape[1], d)
    max_len = int(max_length_q) if max_length_q is not None else t
    if _kernel_available(q):
        out = _cuda_varlen(q, k, v, cu_seq_lens_q, max_len, scale)
    else:
        out = bucketed_varlen(q, k, v, cu_seq_lens_q, scale)
    return out.reshape(b, t, h, d), None


def reference_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     scale: float) -> torch.Tensor:  # fmt: skip
    """Causal attention of each segment alone (SDPA per segment): [N, H, D] -> [N, H, D]."""
    groups = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        qs = q[start:end].transpose(0, 1)  # [H, L, D]
        ks = k[start:end].transpose(0, 1).repeat_interleave(groups, dim=0)
        vs = v[start:end].transpose(0, 1).repeat_interleave(groups, dim=0)
        out[start:end] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale).transpose(0, 1)
    return out


@torch.compiler.disable  # its plan is data-dependent Python: traced, every new batch would recompile
def bucketed_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                    scale: float) -> torch.Tensor:  # fmt: skip
    """The same result as ``reference_varlen``, fast enough to train with where no varlen kernel
    exists (CPU): segments of similar length are padded on the right into one batch each and
    go through SDPA's causal kernel together, a few calls per layer instead of one per segment.

    Right padding is safe under a causal mask: a real query never sees the padded keys after it,
    and the padded queries' outputs are dropped (and get no gradient). PyTorch has no CPU varlen
    kernel, hence this.
    """
    h, d = q.shape[1:]
    plan = _bucket_plan(tuple(cu_seqlens.tolist()), str(q.device))
    gqa = k.shape[1] != h
    # [P, H, D]: every bucket's [segments, longest] tokens, one bucket after the other
    qp, kp, vp = (_ToBuckets.apply(x, plan.take, plan.inverse) for x in (q, k, v))
    sizes = [segments * longest for segments, longest in plan.buckets]
    outs = []  # split, not sliced: the backward of a split is one cat, of each slice a zero-filled copy
    for (segments, longest), *qkv in zip(plan.buckets, *(x.split(sizes) for x in (qp, kp, vp))):
        qb, kb, vb = (x.unflatten(0, (segments, longest)).transpose(1, 2) for x in qkv)  # views: [S, H, L, D]
        ob = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale, enable_gqa=gqa)
        outs.append(ob.transpose(1, 2).reshape(-1, h, d))  # [S, H, L, D] -> [S * L, H, D]
    return _FromBuckets.apply(torch.cat(outs), plan.inverse, plan.take, plan.padding)  # [N, H, D]


class _BucketPlan(NamedTuple):
    take: torch.Tensor  # [P]: the stream token at each bucket slot (token 0 on padding slots)
    inverse: torch.Tensor  # [N]: each stream token's bucket slot
    padding: torch.Tensor  # the padding slots
    buckets: list[tuple[int, int]]  # (segments, longest segment) per bucket, in slot order


class _ToBuckets(torch.autograd.Function):
    """``x[take]``: stream tokens to bucket slots. Every token has exactly one slot, so the
    gradient is a gather too (``grad[inverse]``), where autograd's ``index_select`` backward
    would zero-fill and scatter-add (most of the time of this path, measured). Padding slots
    read token 0: any finite value does, they are masked or dropped."""

    @staticmethod
    def forward(ctx, x, take, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, take)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


class _FromBuckets(torch.autograd.Function):
    """``y[inverse]``: bucket slots back to the stream; padding slots get a zero gradient (a
    padded query attends to its segment's keys, so any other value would reach them)."""

    @staticmethod
    def forward(ctx, y, inverse, take, padding):
        ctx.save_for_backward(take, padding)
        return y.index_select(0, inverse)

    @staticmethod
    def backward(ctx, grad):
        take, padding = ctx.saved_tensors
        return grad.index_select(0, take).index_fill_(0, padding, 0.0), None, None, None


# A segment joins a bucket when it is at least this fraction of the bucket's longest one, so a
# bucket wastes at most 1 - 0.75 of its tokens on padding (and less of its attention scores).
_BUCKET_FILL = 0.75


@functools.lru_cache(maxsize=16)  # one plan per packed batch, reused by every layer
def _bucket_plan(bounds: tuple[int, ...], device: str) -> _BucketPlan:
    """Which stream token goes to which bucket slot, and back."""
    n = bounds[-1]
    segments = sorted(zip(bounds[:-1], bounds[1:]), key=lambda se: (se[0] - se[1], se[0]))  # longest first
    groups: list[list[tuple[int, int]]] = []
    for start, end in segments:
        if groups and end - start >= _BUCKET_FILL * (groups[-1][0][1] - groups[-1][0][0]):
            groups[-1].append((start, end))
        else:
            groups.append([(start, end)])
    takes, is_padding, buckets = [], [], []
    inverse, at = torch.empty(n, dtype=torch.long), 0
    for group in groups:
        longest = group[0][1] - group[0][0]
        take = torch.zeros(len(group), longest, dtype=torch.long)
        real = torch.zeros(len(group), longest, dtype=torch.bool)
        for row, (start, end) in enumerate(group):
            take[row, : end - start] = torch.arange(start, end)
            real[row, : end - start] = True
            inverse[start:end] = torch.arange(at + row * longest, at + row * longest + end - start)
        buckets.append((len(group), longest))
        takes.append(take.flatten())
        is_padding.append(~real.flatten())
        at += len(group) * longest
    padding = torch.nonzero(torch.cat(is_padding)).flatten()
    return _BucketPlan(torch.cat(takes).to(device), inverse.to(device), padding.to(device), buckets)


def _kernel_available(q: torch.Tensor) -> bool:
    return _kernel_on(q.device)


def _kernel_on(device) -> bool:
    return torch.device(device).type == "cuda" and _torch_varlen() is not None


@functools.cache
def _torch_varlen():
    """PyTorch's varlen FlashAttention entry point and the keywords it takes (its signature
    changed between releases: ``is_causal`` before ``window_size``, GQA added later)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def _cuda_varlen(q, k, v, cu_seqlens: torch.Tensor, max_len: int, scale: float) -> torch.Tensor:
    varlen_attn, params = _torch_varlen()
    given = q.dtype
    autocast = torch.is_autocast_enabled("cuda")
    if given not in (torch.float16, torch.bfloat16):  # the kernel takes half precision only
        # (under autocast, rotary embeddings promote q and k to fp32)
        dtype = torch.get_autocast_dtype("cuda") if autocast else torch.bfloat16
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    extra = {"scale": scale} if "scale" in params else {}
    if "window_size" in params:
        extra["window_size"] = (-1, 0)  # causal
    else:
        extra["is_causal"] = True
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            extra["enable_gqa"] = True
        else:
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    out = varlen_attn(q.contiguous(), k.contiguous(), v.contiguous(), cu, cu, max_len, max_len, **extra)
    # an fp32 model outside autocast gets fp32 back (its output projection would refuse bf16)
    return out if autocast else out.to(given)
