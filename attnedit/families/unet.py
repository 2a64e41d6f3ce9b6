"""SD 1.5 / SDXL (``UNet2DConditionModel``): ``attn1`` self-attention and ``attn2`` cross-attention per block.

Its stock processor (``AttnProcessor2_0``) calls SDPA itself, not diffusers' dispatcher, so this family keeps
projection halves that follow it operation by operation (``project`` / ``finish``); with no edit the result is the
stock one. The CFG rows are one batch ``[uncond, cond]``. Each UNet level halves the token grid (rounding up).
"""

from __future__ import annotations

from typing import Any

import torch

from attnedit.core.families import Family
from attnedit.processors.projections import FamilyIO, Projected, heads_view, merge_heads, sdpa


def level_grid(grid: tuple[int, ...], num_tokens: int) -> tuple[int, int]:
    """Grid of a UNet level with ``num_tokens`` tokens, given the latent grid (each level halves, rounding up)."""
    h, w = grid
    while h * w > num_tokens and h > 1:
        h, w = -(-h // 2), -(-w // 2)
    if h * w != num_tokens:
        raise ValueError(f"{num_tokens} tokens do not form a downsampled grid of the {grid} latent")
    return (h, w)


def project(attn, hidden_states, encoder_hidden_states, attention_mask, rotary, temb, text_tokens=0) -> Projected:
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
    q, k, v = (heads_view(x, attn.heads) for x in (query, attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)))
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


def finish(attn, out: torch.Tensor, p: Projected, processor=None):
    hidden_states = merge_heads(out, p.q.dtype)
    hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
    if p.extra["ndim"] == 4:
        b, c, h, w = p.extra["shape"]
        hidden_states = hidden_states.transpose(-1, -2).reshape(b, c, h, w)
    if attn.residual_connection:
        hidden_states = hidden_states + p.extra["residual"]
    return hidden_states / attn.rescale_output_factor


from attnedit.families import _unet_pipeline as _pipeline  # the pipeline hooks (refocusing, DesignEdit, video editing)

FAMILY = Family(
    name="unet",
    model_class="UNet2DConditionModel",
    batched_cfg=True,
    site_rules=((r".*\.attn1", "self", ""), (r".*\.attn2", "cross", "")),
    read_grid=lambda model, latent, bound: tuple(latent.shape[-2:]),
    io=FamilyIO(project, finish, sdpa, sdpa, level_grid),
    perturbed_kind="self",
    text_kind="cross",
    latent_key="sample",
    aliases=("sd15", "sdxl"),
    share_prefix=False,
    image_pipeline=_pipeline.PIPELINE,
)


# -- published checkpoints (attnedit.models.architectures) ------------------------------------------------------
PUBLISHED = (
    dict(name="sd15", hub_id="stable-diffusion-v1-5/stable-diffusion-v1-5", pipeline="StableDiffusionPipeline",
         reduced={"layers_per_block": 1}, denoisers=("unet",)),
    dict(name="sdxl-base", hub_id="stabilityai/stable-diffusion-xl-base-1.0", pipeline="StableDiffusionXLPipeline",
         reduced={"layers_per_block": 1, "transformer_layers_per_block": [1, 1, 1]}, denoisers=("unet",)),
)


def _per_level(value: Any, levels: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * levels


def published_sites(c: dict) -> list[tuple[str, str, int, str]]:
    """Transformer blocks of a UNet2DConditionModel: down, mid, up; heads = the legacy ``attention_head_dim``."""
    levels = len(c["block_out_channels"])
    heads = _per_level(c.get("num_attention_heads") or c["attention_head_dim"], levels)
    depth = _per_level(c.get("transformer_layers_per_block", 1), levels)
    layers = _per_level(c["layers_per_block"], levels)
    blocks: list[tuple[str, int, int]] = []  # (prefix, transformer layers, heads)
    for i, kind in enumerate(c["down_block_types"]):
        if kind.startswith("CrossAttn"):
            blocks += [(f"down_blocks.{i}.attentions.{a}", depth[i], heads[i]) for a in range(layers[i])]
    if c.get("mid_block_type", "UNetMidBlock2DCrossAttn") == "UNetMidBlock2DCrossAttn":
        blocks.append(("mid_block.attentions.0", depth[-1], heads[-1]))
    for i, kind in enumerate(c["up_block_types"]):
        level = levels - 1 - i
        if kind.startswith("CrossAttn"):
            blocks += [(f"up_blocks.{i}.attentions.{a}", depth[level], heads[level]) for a in range(layers[level] + 1)]
    sites = []
    for prefix, n, h in blocks:
        for t in range(n):
            sites += [(f"{prefix}.transformer_blocks.{t}.attn1", "self", h, ""),
                      (f"{prefix}.transformer_blocks.{t}.attn2", "cross", h, "")]
    return sites


def example_inputs(arch, model, batch, size, text, rand, t) -> dict:
    """One forward's inputs at a small latent size, with the real text width (77 CLIP tokens) and SDXL's ids."""
    c = model.config
    h, w = size or (16, 16)
    out = {"sample": rand(batch, c.in_channels, h, w), "timestep": t,
           "encoder_hidden_states": rand(batch, 77, c.cross_attention_dim)}
    if c.addition_embed_type == "text_time":
        pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
        ids = torch.tensor([[h * 8, w * 8, 0, 0, h * 8, w * 8]] * batch, dtype=out["sample"].dtype)
        out["added_cond_kwargs"] = {"text_embeds": rand(batch, pooled), "time_ids": ids}
    return out
