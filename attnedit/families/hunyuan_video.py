"""HunyuanVideo (``HunyuanVideoTransformer3DModel``): joint attention over ``[video, text]`` with a text padding mask.

20 double-stream and 40 single-stream blocks in one flat joint index; the token refiner's attention (text only)
is not a site. The stock processor sends attention through diffusers' dispatcher with the key padding mask, so
attnedit keeps it. CFG: separate passes (the released model is guidance-distilled: one pass).
"""

from __future__ import annotations

import torch
from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

from attnedit.core.families import TWO_STREAM_RULES, ContextParallel, Family, ForwardInfo, ProcessorCall, TokenLayout, patch_grid

# In the style of WanTransformer3DModel._cp_plan (diffusers 0.42 has none for HunyuanVideo): split the video and the
# (already refined) text tokens where they enter the first block, the RoPE tables (S, D/2) with them, and gather the
# video before the unpatchify. The text leaves the model after the last block, so it is never gathered. Each rank's
# joint sequence is then [video_r; text_r]; the key padding mask, built inside forward() over [video; text], is cut
# to match per block (split_text: attnedit.core.parallel.TextMaskShardHook).
CP_PLAN = {
    "rope": {
        0: ContextParallelInput(split_dim=0, expected_dims=2, split_output=True),
        1: ContextParallelInput(split_dim=0, expected_dims=2, split_output=True),
    },
    "transformer_blocks.0": {
        "hidden_states": ContextParallelInput(split_dim=1, expected_dims=3, split_output=False),
        "encoder_hidden_states": ContextParallelInput(split_dim=1, expected_dims=3, split_output=False),
    },
    "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
}


def refuse_split(model) -> str | None:
    if getattr(model.config, "image_condition_type", None) == "token_replace":
        return ("HunyuanVideo token_replace image conditioning treats the first frame's tokens apart, which a "
                "sequence split across ranks does not keep; context parallelism supports text-to-video")
    return None


def layout(call: ProcessorCall, info: ForwardInfo | None, num_queries: int, num_keys: int) -> TokenLayout | None:
    text_states = call.get("encoder_hidden_states")
    n_text = text_states.shape[1] if text_states is not None else 0
    video = slice(0, num_queries - n_text)
    text = slice(num_queries - n_text, num_queries) if n_text else None
    return TokenLayout(video, video, text, text)


from attnedit.families import _hunyuan_video_pipeline as _pipeline  # the pipeline hooks (refocusing, DesignEdit, video editing)

FAMILY = Family(
    name="hunyuan_video",
    model_class="HunyuanVideoTransformer3DModel",
    batched_cfg=False,
    site_rules=TWO_STREAM_RULES,
    read_grid=patch_grid,
    layout=layout,
    perturbed_kind="joint",
    video=True,
    radial_preset=lambda pipe: "hunyuan_video",
    text_kind="joint",
    context_parallel=ContextParallel(plan=CP_PLAN, split_text=True, refuse=refuse_split),
    aliases=("hunyuanvideo",),
    video_pipeline=_pipeline.PIPELINE,
)


# -- published checkpoints (attnedit.models.architectures) ------------------------------------------------------
PUBLISHED = (
    dict(name="hunyuan-video", hub_id="hunyuanvideo-community/HunyuanVideo", pipeline="HunyuanVideoPipeline",
         reduced={"num_layers": 1, "num_single_layers": 1, "num_refiner_layers": 1}),
)


def published_sites(c: dict) -> list[tuple[str, str, int, str]]:
    """Double-stream then single-stream blocks, one flat joint index."""
    h = c["num_attention_heads"]
    return ([(f"transformer_blocks.{i}.attn", "joint", h, "double") for i in range(c["num_layers"])]
            + [(f"single_transformer_blocks.{i}.attn", "joint", h, "single") for i in range(c["num_single_layers"])])


def example_inputs(arch, model, batch, size, text, rand, t) -> dict:
    """Video latents, padded text with its mask (the last 3 tokens are padding, as the pipeline pads prompts)."""
    c = model.config
    f, h, w = size or (4, 4, 4)
    mask = torch.zeros(batch, text, dtype=torch.bool)
    mask[:, : text - 3] = True
    return {"hidden_states": rand(batch, c.in_channels, f, h, w), "timestep": t,
            "encoder_hidden_states": rand(batch, text, c.text_embed_dim), "encoder_attention_mask": mask,
            "pooled_projections": rand(batch, c.pooled_projection_dim), "guidance": torch.full((batch,), 6000.0)}
