"""SD3 / SD3.5 (``SD3Transformer2DModel``): joint attention over ``[image, text]``; SD3.5's dual blocks add ``attn2``.

Its stock processor (``JointAttnProcessor2_0``) calls SDPA itself, so this family keeps projection halves that
follow it operation by operation. CFG rows are one batch ``[uncond, cond]``.
"""

from __future__ import annotations

import torch

from attnedit.core.families import Family, patch_grid
from attnedit.processors.projections import FamilyIO, Projected, heads_view, merge_heads, sdpa


def project(attn, hidden_states, encoder_hidden_states, attention_mask, rotary, temb, text_tokens=0) -> Projected:
    q, k, v = (heads_view(f(hidden_states), attn.heads) for f in (attn.to_q, attn.to_k, attn.to_v))
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    n = hidden_states.shape[1]
    if encoder_hidden_states is None:
        return Projected(q, k, v, None, slice(0, n), slice(0, n), extra={"n": n})
    eq, ek, ev = (heads_view(f(encoder_hidden_states), attn.heads) for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
    if attn.norm_added_q is not None:
        eq = attn.norm_added_q(eq)
    if attn.norm_added_k is not None:
        ek = attn.norm_added_k(ek)
    q, k, v = torch.cat([q, eq], dim=2), torch.cat([k, ek], dim=2), torch.cat([v, ev], dim=2)
    text = slice(n, q.shape[2])
    return Projected(q, k, v, None, slice(0, n), slice(0, n), text, text, extra={"n": n, "joint": True})


def finish(attn, out: torch.Tensor, p: Projected, processor=None):
    hidden_states = merge_heads(out, p.q.dtype)
    encoder_hidden_states = None
    if p.extra.get("joint"):
        n = p.extra["n"]
        hidden_states, encoder_hidden_states = hidden_states[:, :n], hidden_states[:, n:]
        if not attn.context_pre_only:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
    hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
    return hidden_states if encoder_hidden_states is None else (hidden_states, encoder_hidden_states)


from attnedit.families import _sd3_pipeline as _pipeline  # the pipeline hooks (refocusing, DesignEdit, video editing)

FAMILY = Family(
    name="sd3",
    model_class="SD3Transformer2DModel",
    batched_cfg=True,
    site_rules=((r"transformer_blocks\.\d+\.attn", "joint", ""), (r"transformer_blocks\.\d+\.attn2", "self", "")),
    read_grid=patch_grid,
    io=FamilyIO(project, finish, sdpa, sdpa),
    perturbed_kind="joint",
    text_kind="joint",
    image_pipeline=_pipeline.PIPELINE,
)


# -- published checkpoints (attnedit.models.architectures) ------------------------------------------------------
PUBLISHED = (
    dict(name="sd3-medium", hub_id="stabilityai/stable-diffusion-3-medium-diffusers",
         pipeline="StableDiffusion3Pipeline", reduced={"num_layers": 2}),
    dict(name="sd3.5-medium", hub_id="stabilityai/stable-diffusion-3.5-medium", pipeline="StableDiffusion3Pipeline",
         reduced={"num_layers": 2, "dual_attention_layers": [0]}),
)


def published_sites(c: dict) -> list[tuple[str, str, int, str]]:
    """MM-DiT blocks: joint attention ``attn``; SD3.5's dual-attention blocks add image self-attention ``attn2``."""
    dual = set(c.get("dual_attention_layers", ()))
    sites = []
    for i in range(c["num_layers"]):
        sites.append((f"transformer_blocks.{i}.attn", "joint", c["num_attention_heads"], ""))
        if i in dual:
            sites.append((f"transformer_blocks.{i}.attn2", "self", c["num_attention_heads"], ""))
    return sites


def example_inputs(arch, model, batch, size, text, rand, t) -> dict:
    c = model.config
    h, w = size or (8, 8)
    return {"hidden_states": rand(batch, c.in_channels, h, w), "timestep": t,
            "encoder_hidden_states": rand(batch, text, c.joint_attention_dim),
            "pooled_projections": rand(batch, c.pooled_projection_dim)}
