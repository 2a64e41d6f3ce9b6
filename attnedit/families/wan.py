"""Wan 2.1 / 2.2 (``WanTransformer3DModel``): ``attn1`` self-attention over video, ``attn2`` cross-attention to text.

The stock ``WanAttnProcessor`` sends attention through diffusers' dispatcher, so attnedit keeps it. Image-to-video
checkpoints make two calls in ``attn2``: first to the CLIP image tokens, then to the text; the first is left
unedited. CFG: separate passes (cond, then uncond). Wan 2.2 A14B's second expert (``transformer_2``) has the same sites.
"""

from __future__ import annotations

from attnedit.core.families import ContextParallel, Family, ForwardInfo, ProcessorCall, TokenLayout, patch_grid


def layout(call: ProcessorCall, info: ForwardInfo | None, num_queries: int, num_keys: int) -> TokenLayout | None:
    video = slice(0, num_queries)
    if call.get("encoder_hidden_states") is None:
        return TokenLayout(video, slice(0, num_keys))
    if call.get("attn").add_k_proj is not None and call.index == 0:  # I2V: attention to the CLIP image tokens
        return None
    return TokenLayout(video, slice(0, 0), None, slice(0, num_keys))


def radial_preset(pipe) -> str:
    """Wan 2.2 (two denoisers, or one timestep per token as in TI2V-5B) has its own released radial settings."""
    config = getattr(pipe, "config", {}) or {}
    return "wan22" if getattr(pipe, "transformer_2", None) is not None or config.get("expand_timesteps") else "wan"


from attnedit.families import _wan_pipeline as _pipeline  # the pipeline hooks (refocusing, DesignEdit, video editing)

FAMILY = Family(
    name="wan",
    model_class="WanTransformer3DModel",
    batched_cfg=False,
    site_rules=((r"blocks\.\d+\.attn1", "self", ""), (r"blocks\.\d+\.attn2", "cross", "")),
    read_grid=patch_grid,
    layout=layout,
    perturbed_kind="self",
    video=True,
    radial_preset=radial_preset,
    text_kind="cross",
    context_parallel=ContextParallel(),  # the model's own _cp_plan
    aliases=("wan2.1", "wan2.2"),
    video_pipeline=_pipeline.PIPELINE,
)


# -- published checkpoints (attnedit.models.architectures) ------------------------------------------------------
PUBLISHED = (
    dict(name="wan2.1-t2v-1.3b", hub_id="Wan-AI/Wan2.1-T2V-1.3B-Diffusers", pipeline="WanPipeline",
         reduced={"num_layers": 2}),
    dict(name="wan2.1-i2v-14b-480p", hub_id="Wan-AI/Wan2.1-I2V-14B-480P-Diffusers",
         pipeline="WanImageToVideoPipeline", reduced={"num_layers": 1}),
    dict(name="wan2.2-t2v-a14b", hub_id="Wan-AI/Wan2.2-T2V-A14B-Diffusers", pipeline="WanPipeline",
         reduced={"num_layers": 1}, denoisers=("transformer", "transformer_2"),
         pipeline_config={"boundary_ratio": 0.875, "expand_timesteps": False}),
    dict(name="wan2.2-i2v-a14b", hub_id="Wan-AI/Wan2.2-I2V-A14B-Diffusers", pipeline="WanImageToVideoPipeline",
         reduced={"num_layers": 1}, denoisers=("transformer", "transformer_2"),
         pipeline_config={"boundary_ratio": 0.9, "expand_timesteps": False}),  # no image encoder: image in latents
    dict(name="wan2.2-ti2v-5b", hub_id="Wan-AI/Wan2.2-TI2V-5B-Diffusers", pipeline="WanPipeline",
         reduced={"num_layers": 1}, pipeline_config={"boundary_ratio": None, "expand_timesteps": True}),
)


def published_sites(c: dict) -> list[tuple[str, str, int, str]]:
    h = c["num_attention_heads"]
    return [s for i in range(c["num_layers"])
            for s in ((f"blocks.{i}.attn1", "self", h, ""), (f"blocks.{i}.attn2", "cross", h, ""))]


def example_inputs(arch, model, batch, size, text, rand, t) -> dict:
    """Video latents with the real 512-token text; Wan 2.2 TI2V's per-token timesteps; I2V's CLIP image tokens."""
    c = model.config
    f, h, w = size or (4, 4, 4)
    out = {"hidden_states": rand(batch, c.in_channels, f, h, w), "timestep": t,
           "encoder_hidden_states": rand(batch, 512, c.text_dim)}
    if arch.pipeline_config.get("expand_timesteps"):  # Wan 2.2 TI2V: one timestep per token
        ph, pw = c.patch_size[1:]
        out["timestep"] = t[:, None].expand(batch, f * (h // ph) * (w // pw)).contiguous()
    if c.image_dim is not None:  # I2V: CLIP image tokens ahead of the text
        out["encoder_hidden_states_image"] = rand(batch, 257, c.image_dim)
    return out
