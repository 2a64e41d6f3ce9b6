"""Wan 2.1 VACE (``WanVACETransformer3DModel``): Wan's blocks plus VACE control blocks that run first.

The control video never enters a main block's attention: each ``vace_blocks.j`` runs Wan's block (``attn1`` self-
attention, ``attn2`` cross-attention to the text, the stock ``WanAttnProcessor``, so attnedit keeps it) over a
control stream aligned token for token with the video (block 0 adds the patchified control latents to the video
tokens), and its projected output is *added* to the hidden states before main block ``vace_layers[j]``. So the
control stream's tokens sit on the video's grid: attnedit treats them as video tokens (a key mask hides the region
in the control stream too, so the hints carry no hidden-region information; radial attention sees the same grid).
Sites, numbered per kind in forward order: every ``vace_blocks`` site (stream ``"vace"``) comes before the main
``blocks`` (stream ``""``), so Wan's layer ``L`` is VACE layer ``L + len(vace_layers)``.
Radial attention: Wan's released settings carry over (same attention, same grid): Wan 2.1's for these checkpoints,
Wan 2.2's when a VACE pipeline holds two experts (``transformer_2``, as Wan 2.2 VACE-Fun does).
No context parallelism: diffusers ships no ``_cp_plan`` for the VACE model (its control stream would need a split too).

Configs (``attnedit/models/configs``): the ``transformer/config.json`` of Wan-AI/Wan2.1-VACE-1.3B-diffusers and
Wan-AI/Wan2.1-VACE-14B-diffusers as written by diffusers' ``scripts/convert_wan_to_diffusers.py`` (model types
``Wan-VACE-1.3B`` / ``Wan-VACE-14B``), with the constructor defaults it leaves out (``image_dim``,
``pos_embed_seq_len``, ``rope_max_seq_len``) written in as ``from_config`` saves them.
"""

from __future__ import annotations

from attnedit.core.families import Family, patch_grid
from attnedit.families import wan

FAMILY = Family(
    name="wan_vace",
    model_class="WanVACETransformer3DModel",
    batched_cfg=False,
    site_rules=(
        (r"vace_blocks\.\d+\.attn1", "self", "vace"), (r"vace_blocks\.\d+\.attn2", "cross", "vace"),
        (r"blocks\.\d+\.attn1", "self", ""), (r"blocks\.\d+\.attn2", "cross", ""),
    ),
    read_grid=patch_grid,
    layout=wan.layout,  # control blocks: [control stream on the video grid] x [control stream]; attn2: text
    perturbed_kind="self",
    video=True,
    radial_preset=wan.radial_preset,  # Wan 2.1's; Wan 2.2's for a two-expert VACE pipeline (transformer_2)
    text_kind="cross",
    aliases=("vace", "wan2.1-vace"),
)


# -- published checkpoints (attnedit.models.architectures) ------------------------------------------------------
PUBLISHED = (
    dict(name="wan2.1-vace-1.3b", hub_id="Wan-AI/Wan2.1-VACE-1.3B-diffusers", pipeline="WanVACEPipeline",
         reduced={"num_layers": 1, "vace_layers": [0]}),
    dict(name="wan2.1-vace-14b", hub_id="Wan-AI/Wan2.1-VACE-14B-diffusers", pipeline="WanVACEPipeline",
         reduced={"num_layers": 1, "vace_layers": [0]}),
)


def published_sites(c: dict) -> list[tuple[str, str, int, str]]:
    """Control blocks first (they all run before block 0), then Wan's blocks."""
    h = c["num_attention_heads"]
    vace = [s for j in range(len(c["vace_layers"]))
            for s in ((f"vace_blocks.{j}.attn1", "self", h, "vace"), (f"vace_blocks.{j}.attn2", "cross", h, "vace"))]
    return vace + [s for i in range(c["num_layers"])
                   for s in ((f"blocks.{i}.attn1", "self", h, ""), (f"blocks.{i}.attn2", "cross", h, ""))]


def example_inputs(arch, model, batch, size, text, rand, t) -> dict:
    """Wan's inputs plus the control latents (``vace_in_channels``: video, mask and reference channels)."""
    c = model.config
    f, h, w = size or (4, 4, 4)
    return {"hidden_states": rand(batch, c.in_channels, f, h, w), "timestep": t,
            "encoder_hidden_states": rand(batch, 512, c.text_dim),
            "control_hidden_states": rand(batch, c.vace_in_channels, f, h, w)}


# -- tiny pipeline (attnedit.models.zoo) ---------------------------------------------------------------------------
def tiny_wan_parts() -> dict:
    """The tiny Wan pipelines' shared parts, as in the zoo's tiny Wan: word-level tokenizer, UMT5 (d_model 32), a
    4-level Wan VAE (8x spatial, 4x temporal) and the flow-matching scheduler."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler

    from attnedit.models.zoo_text import _t5_encoder, word_tokenizer

    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    return {"tokenizer": word_tokenizer("t5"), "text_encoder": _t5_encoder(32, umt5=True), "vae": vae,
            "scheduler": FlowMatchEulerDiscreteScheduler(shift=7.0)}


def _build_tiny_vace():
    """WanVACEPipeline with the tiny Wan parts and a 2-block VACE transformer (control blocks before both)."""
    from diffusers import WanVACEPipeline, WanVACETransformer3DModel

    transformer = WanVACETransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32, vace_layers=[0, 1], vace_in_channels=16 * 2 + 64,  # video+reactive latents, 8x8 mask
    )
    return WanVACEPipeline(**tiny_wan_parts(), transformer=transformer)


TINY = {
    "wan_vace": {"build": _build_tiny_vace, "video": True,
                 "call": {"height": 32, "width": 32, "num_frames": 5, "guidance_scale": 5.0,
                          "max_sequence_length": 32}},
}
