"""Attention kernels and the projection-halves contract for families whose stock processor bypasses the dispatcher.

Most families keep their stock processor (:mod:`attnedit.processors.stock`). UNet's and SD3's stock processors
call SDPA (or xFormers) themselves, so their family modules split the processor at the attention call:
``project`` turns module inputs into q, k, v ``(B, H, S, D)`` plus the token layout (:class:`Projected`),
``finish`` turns the attention output back into what the block expects (:class:`FamilyIO`). The kernels here
(``sdpa``, ``dispatched``, ``xformers_attention``) run the stock attention of a call, ``(B, H, S, D)`` in and out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
import attnedit.core.versions  # noqa: F401  (a clear error on an untested diffusers, before its internals)
from diffusers.models.attention_dispatch import dispatch_attention_fn


@dataclass
class Projected:
    q: torch.Tensor  # (B, H, S_q, D)
    k: torch.Tensor  # (B, H, S_k, D)
    v: torch.Tensor
    mask: torch.Tensor | None  # as the stock processor passes it to attention
    image_q: slice
    image_k: slice
    text_q: slice | None = None
    text_k: slice | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def heads_view(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, S, H*D) -> (B, H, S, D) as a view, like the stock ``view(...).transpose(1, 2)``."""
    return x.view(x.shape[0], -1, heads, x.shape[-1] // heads).transpose(1, 2)


def merge_heads(out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, H, S, D) -> (B, S, H*D)."""
    return out.transpose(1, 2).reshape(out.shape[0], -1, out.shape[1] * out.shape[3]).to(dtype)


def sdpa(q, k, v, mask, processor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)


def dispatched(q, k, v, mask, processor) -> torch.Tensor:
    """diffusers' dispatcher (respects ``set_attention_backend``), in and out as (B, H, S, D)."""
    out = dispatch_attention_fn(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, dropout_p=0.0, is_causal=False,
        backend=processor._attention_backend, parallel_config=processor._parallel_config,
    )
    return out.transpose(1, 2)


# diffusers attention backends that apply any (B, 1, 1, S_k) bool key mask. The flash and sage kernels take no mask
# (diffusers' "_native_flash" raises; the varlen ones read a mask as sequence lengths, i.e. padding at the end only),
# and its "xformers" backend adds a 4-D bool mask to the scores as numbers (True = 1.0), so it would mask nothing.
MASKING_BACKENDS = frozenset({"native", "_native_math", "_native_efficient", "flex"})


def dispatched_masked(q, k, v, mask, processor) -> torch.Tensor:
    """``dispatched`` for a key mask an edit added: the user's backend when it applies masks, else diffusers' native
    SDPA (a fallback for the masked calls only; calls whose mask is the stock one keep the user's kernel)."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    backend = processor._attention_backend
    if backend is None:  # the dispatcher's active backend (set_attention_backend / attention_backend() set it)
        backend = _AttentionBackendRegistry._active_backend
    if mask is None or getattr(backend, "value", backend) in MASKING_BACKENDS:
        return dispatched(q, k, v, mask, processor)
    out = dispatch_attention_fn(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, dropout_p=0.0, is_causal=False,
        backend=AttentionBackendName.NATIVE, parallel_config=processor._parallel_config,
    )
    return out.transpose(1, 2)


def xformers_attention(q, k, v, mask, processor) -> torch.Tensor:
    """xFormers memory-efficient attention (CUDA), kept where the user enabled xformers on the model."""
    import xformers.ops

    bias = None
    if mask is not None:
        bias = mask if mask.dtype != torch.bool else torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
        bias = bias.to(q.dtype).expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])  # stride-0 broadcast, no copy
    out = xformers.ops.memory_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias, op=getattr(processor, "attention_op", None)
    )
    return out.transpose(1, 2)


@dataclass(frozen=True)
class FamilyIO:
    project: Callable[..., Projected]
    finish: Callable[..., Any]
    native: Callable[..., torch.Tensor]  # the stock attention call, (B, H, S, D) in and out
    masked: Callable[..., torch.Tensor]  # the same, for a call whose key mask an edit changed
    level_grid: Callable[[tuple[int, ...], int], tuple[int, ...]] | None = None  # (forward grid, tokens) -> call grid
