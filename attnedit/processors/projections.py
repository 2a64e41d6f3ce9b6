"""Per-family input and output halves of diffusers' attention processors.

Each family's stock processor is split at the attention call: ``project`` turns module inputs into
q, k, v ``(B, H, S, D)`` plus the token layout, ``finish`` turns the attention output back into what the
block expects. The math between them belongs to :mod:`attnedit.core.attention`. The halves follow diffusers
0.42's ``AttnProcessor2_0``, ``JointAttnProcessor2_0``, ``FluxAttnProcessor``, ``WanAttnProcessor`` and
``HunyuanVideoAttnProcessor2_0`` operation by operation, so that with no edit the result is the stock one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
import attnedit.core.versions  # noqa: F401  (a clear error on an untested diffusers, before its internals)
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb


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


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, S, H*D) -> (B, H, S, D) as a view, like the stock ``view(...).transpose(1, 2)``."""
    return x.view(x.shape[0], -1, heads, x.shape[-1] // heads).transpose(1, 2)


def _merge(out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
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


# --- UNet (Attention + AttnProcessor2_0) ------------------------------------------------------------------------


def project_unet(attn, hidden_states, encoder_hidden_states, attention_mask, rotary, temb, text_tokens=0) -> Projected:
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    input_ndim = hidden_states.ndim
    shape = hidden_states.shape
    if input_ndim == 4:
        hidden_states = hidden_states.view(shape[0], shape[1], shape[2] * shape[3]).transpose(1, 2)
    batch_size, sequence_length, _ = (hidden_states if encoder_hidden_states is None else encoder_hidden_states).shape
    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    query = attn.to_q(hidden_states)
    cross = encoder_hidden_states is not None
    if not cross:
        encoder_hidden_states = hidden_states
    elif attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    q, k, v = (_heads(x, attn.heads) for x in (query, attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)))
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    everything = slice(0, q.shape[2])
    return Projected(
        q, k, v, attention_mask, everything, slice(0, 0) if cross else everything,
        text_k=slice(0, k.shape[2]) if cross else None,
        extra={"residual": residual, "shape": shape, "ndim": input_ndim},
    )


def finish_unet(attn, out: torch.Tensor, p: Projected, processor=None):
    hidden_states = _merge(out, p.q.dtype)
    hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
    if p.extra["ndim"] == 4:
        b, c, h, w = p.extra["shape"]
        hidden_states = hidden_states.transpose(-1, -2).reshape(b, c, h, w)
    if attn.residual_connection:
        hidden_states = hidden_states + p.extra["residual"]
    return hidden_states / attn.rescale_output_factor


# --- SD3 (Attention + JointAttnProcessor2_0): [image, text] -----------------------------------------------------


def project_sd3(attn, hidden_states, encoder_hidden_states, attention_mask, rotary, temb, text_tokens=0) -> Projected:
    q, k, v = (_heads(f(hidden_states), attn.heads) for f in (attn.to_q, attn.to_k, attn.to_v))
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    n = hidden_states.shape[1]
    if encoder_hidden_states is None:
        return Projected(q, k, v, None, slice(0, n), slice(0, n), extra={"n": n})
    eq, ek, ev = (_heads(f(encoder_hidden_states), attn.heads) for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
    if attn.norm_added_q is not None:
        eq = attn.norm_added_q(eq)
    if attn.norm_added_k is not None:
        ek = attn.norm_added_k(ek)
    q, k, v = torch.cat([q, eq], dim=2), torch.cat([k, ek], dim=2), torch.cat([v, ev], dim=2)
    text = slice(n, q.shape[2])
    return Projected(q, k, v, None, slice(0, n), slice(0, n), text, text, extra={"n": n, "joint": True})


def finish_sd3(attn, out: torch.Tensor, p: Projected, processor=None):
    hidden_states = _merge(out, p.q.dtype)
    encoder_hidden_states = None
    if p.extra.get("joint"):
        n = p.extra["n"]
        hidden_states, encoder_hidden_states = hidden_states[:, :n], hidden_states[:, n:]
        if not attn.context_pre_only:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
    hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
    return hidden_states if encoder_hidden_states is None else (hidden_states, encoder_hidden_states)


# --- FLUX (FluxAttention + FluxAttnProcessor): [text, image] ----------------------------------------------------


def project_flux(attn, hidden_states, encoder_hidden_states, attention_mask, rotary, temb, text_tokens=0) -> Projected:
    from diffusers.models.transformers.transformer_flux import _get_qkv_projections

    query, key, value, eq, ek, ev = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
    q, k, v = (x.unflatten(-1, (-1, attn.head_dim)) for x in (query, key, value))  # (B, S, H, D)
    q, k = attn.norm_q(q), attn.norm_k(k)
    joint = attn.added_kv_proj_dim is not None
    if joint:
        eq, ek, ev = (x.unflatten(-1, (-1, attn.head_dim)) for x in (eq, ek, ev))
        eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
        q, k, v = torch.cat([eq, q], dim=1), torch.cat([ek, k], dim=1), torch.cat([ev, v], dim=1)
        text_tokens = encoder_hidden_states.shape[1]
    if rotary is not None:
        q = apply_rotary_emb(q, rotary, sequence_dim=1)
        k = apply_rotary_emb(k, rotary, sequence_dim=1)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    text, image = slice(0, text_tokens), slice(text_tokens, q.shape[2])
    return Projected(
        q, k, v, attention_mask, image, image, text if text_tokens else None, text if text_tokens else None,
        extra={"split": encoder_hidden_states.shape[1] if encoder_hidden_states is not None else None},
    )


def finish_flux(attn, out: torch.Tensor, p: Projected, processor=None):
    hidden_states = out.transpose(1, 2).flatten(2, 3).to(p.q.dtype)
    split = p.extra["split"]
    if split is None:
        return hidden_states
    encoder_hidden_states, hidden_states = hidden_states.split_with_sizes([split, hidden_states.shape[1] - split], dim=1)
    hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
    return hidden_states, attn.to_add_out(encoder_hidden_states.contiguous())


# --- Wan (WanAttention + WanAttnProcessor): attn1 self over video, attn2 cross to text --------------------------


def _wan_rotary(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


def project_wan(attn, hidden_states, encoder_hidden_states, attention_mask, rotary, temb, text_tokens=0) -> Projected:
    from diffusers.models.transformers.transformer_wan import _get_added_kv_projections, _get_qkv_projections

    image_context = None
    if attn.add_k_proj is not None:  # I2V: image-conditioning tokens ahead of the 512 text tokens
        split = encoder_hidden_states.shape[1] - 512
        image_context, encoder_hidden_states = encoder_hidden_states[:, :split], encoder_hidden_states[:, split:]
    query, key, value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
    query, key = attn.norm_q(query), attn.norm_k(key)
    q, k, v = (x.unflatten(2, (attn.heads, -1)) for x in (query, key, value))  # (B, S, H, D)
    if rotary is not None:
        q, k = _wan_rotary(q, *rotary), _wan_rotary(k, *rotary)
    extra: dict[str, Any] = {"image_context": None, "cross": encoder_hidden_states is not None}
    if image_context is not None:
        key_img, value_img = _get_added_kv_projections(attn, image_context)
        key_img = attn.norm_added_k(key_img)
        extra["image_context"] = (key_img.unflatten(2, (attn.heads, -1)), value_img.unflatten(2, (attn.heads, -1)))
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    cross = encoder_hidden_states is not None
    everything = slice(0, q.shape[2])
    return Projected(
        q, k, v, attention_mask, everything, slice(0, 0) if cross else everything,
        text_k=slice(0, k.shape[2]) if cross else None, extra=extra,
    )


def finish_wan(attn, out: torch.Tensor, p: Projected, processor=None):
    hidden_states = out.transpose(1, 2).flatten(2, 3).type_as(p.q)
    if p.extra["image_context"] is not None:
        key_img, value_img = p.extra["image_context"]
        img = dispatch_attention_fn(
            p.q.transpose(1, 2), key_img, value_img, attn_mask=None, dropout_p=0.0, is_causal=False,
            backend=processor._attention_backend, parallel_config=None,
        )
        hidden_states = hidden_states + img.flatten(2, 3).type_as(p.q)
    return attn.to_out[1](attn.to_out[0](hidden_states))


# --- HunyuanVideo (Attention + HunyuanVideoAttnProcessor2_0): [video, text] + key padding mask -------------------


def project_hunyuan_video(attn, hidden_states, encoder_hidden_states, attention_mask, rotary, temb, text_tokens=0) -> Projected:
    single = attn.add_q_proj is None and encoder_hidden_states is not None
    if single:
        hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)
    q, k, v = (f(hidden_states).unflatten(2, (attn.heads, -1)) for f in (attn.to_q, attn.to_k, attn.to_v))
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    n_text = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else 0
    if rotary is not None:
        if single:
            q = torch.cat([apply_rotary_emb(q[:, :-n_text], rotary, sequence_dim=1), q[:, -n_text:]], dim=1)
            k = torch.cat([apply_rotary_emb(k[:, :-n_text], rotary, sequence_dim=1), k[:, -n_text:]], dim=1)
        else:
            q, k = apply_rotary_emb(q, rotary, sequence_dim=1), apply_rotary_emb(k, rotary, sequence_dim=1)
    if attn.add_q_proj is not None and encoder_hidden_states is not None:
        eq, ek, ev = (f(encoder_hidden_states).unflatten(2, (attn.heads, -1)) for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        if attn.norm_added_q is not None:
            eq = attn.norm_added_q(eq)
        if attn.norm_added_k is not None:
            ek = attn.norm_added_k(ek)
        q, k, v = torch.cat([q, eq], dim=1), torch.cat([k, ek], dim=1), torch.cat([v, ev], dim=1)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    total = q.shape[2]
    video, text = slice(0, total - n_text), slice(total - n_text, total)
    return Projected(
        q, k, v, attention_mask, video, video, text if n_text else None, text if n_text else None,
        extra={"n_text": n_text},
    )


def finish_hunyuan_video(attn, out: torch.Tensor, p: Projected, processor=None):
    hidden_states = out.transpose(1, 2).flatten(2, 3).to(p.q.dtype)
    n_text = p.extra["n_text"]
    encoder_hidden_states = None
    if n_text:
        hidden_states, encoder_hidden_states = hidden_states[:, :-n_text], hidden_states[:, -n_text:]
        if getattr(attn, "to_out", None) is not None:
            hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if getattr(attn, "to_add_out", None) is not None:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
    return hidden_states, encoder_hidden_states


@dataclass(frozen=True)
class FamilyIO:
    project: Callable[..., Projected]
    finish: Callable[..., Any]
    native: Callable[..., torch.Tensor]  # the stock attention call, (B, H, S, D) in and out
    masked: Callable[..., torch.Tensor]  # the same, for a call whose key mask an edit changed


IO: dict[str, FamilyIO] = {
    "unet": FamilyIO(project_unet, finish_unet, sdpa, sdpa),
    "sd3": FamilyIO(project_sd3, finish_sd3, sdpa, sdpa),
    "flux": FamilyIO(project_flux, finish_flux, dispatched, dispatched_masked),
    "wan": FamilyIO(project_wan, finish_wan, dispatched, dispatched_masked),
    "hunyuan_video": FamilyIO(project_hunyuan_video, finish_hunyuan_video, dispatched, dispatched_masked),
}
