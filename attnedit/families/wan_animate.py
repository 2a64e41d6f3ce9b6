"""Wan 2.2 Animate (``WanAnimateTransformer3DModel``): Wan 2.1 I2V blocks plus pose and face-motion conditioning.

The pose latents are *added* to the patchified video (frames after the reference frame) before block 0, so they are
not tokens of any attention call. The face motion enters through ``face_adapter.k`` (after blocks 0, 5, 10, ...):
``WanAnimateFaceBlockCrossAttention`` runs its own processor, in which each latent frame's video tokens attend only
to that frame's few face-motion tokens (query reshaped to ``(B * T, S / T)``, keys ``(B * T, N)``). Those keys are
neither video nor text, so no token-level edit (key mask, maps, radial) has anything to act on there, and perturbing
them is not PAG's self-attention perturbation: the face adapters are deliberately not sites. The sites are Wan's:
``blocks.i.attn1`` (self, video) and ``blocks.i.attn2`` (cross; two dispatch calls, the CLIP image tokens first,
left unedited as in Wan I2V, then the text). Animate's ``WanAttnProcessor`` is a copy of Wan's that calls diffusers'
dispatcher, so attnedit keeps it and Wan's token layout applies unchanged. Radial attention: Wan 2.1's released
settings carry over (Animate is built on Wan 2.1 I2V-14B: same attention, same grid).

Config (``attnedit/models/configs/wan2.2-animate-14b.json``): the ``transformer/config.json`` of
Wan-AI/Wan2.2-Animate-14B-Diffusers (``_diffusers_version`` 0.36.0.dev0), as quoted in full by a public converter
script; its values agree with the ``Wan2.2-Animate-14B`` entry of diffusers' ``scripts/convert_wan_to_diffusers.py``.
"""

from __future__ import annotations

from attnedit.core.families import Family, patch_grid
from attnedit.families import wan

FAMILY = Family(
    name="wan_animate",
    model_class="WanAnimateTransformer3DModel",
    batched_cfg=False,
    site_rules=((r"blocks\.\d+\.attn1", "self", ""), (r"blocks\.\d+\.attn2", "cross", "")),
    read_grid=patch_grid,
    layout=wan.layout,
    perturbed_kind="self",
    video=True,
    radial_preset=lambda pipe: "wan",
    text_kind="cross",
    aliases=("animate", "wan2.2-animate"),
)


# -- published checkpoints (attnedit.models.architectures) ------------------------------------------------------
PUBLISHED = (
    dict(name="wan2.2-animate-14b", hub_id="Wan-AI/Wan2.2-Animate-14B-Diffusers", pipeline="WanAnimatePipeline",
         # one block and its face adapter; face crops at 32 px, not 512 (the motion encoder is a conv net outside every
         # attention call, and at 512 px it alone takes ~35 s of a CPU forward)
         reduced={"num_layers": 1, "inject_face_latents_blocks": 1, "motion_encoder_size": 32}),
)


def published_sites(c: dict) -> list[tuple[str, str, int, str]]:
    h = c["num_attention_heads"]
    return [s for i in range(c["num_layers"])
            for s in ((f"blocks.{i}.attn1", "self", h, ""), (f"blocks.{i}.attn2", "cross", h, ""))]


def example_inputs(arch, model, batch, size, text, rand, t) -> dict:
    """Video latents (reference frame first), the pose latents of the frames after it, face crops, CLIP image tokens.

    The face crops are 9 frames at ``motion_encoder_size`` per 3 pose frames: the face encoder's two stride-2
    convolutions turn them into one motion token group per latent frame after the reference.
    """
    c = model.config
    f, h, w = size or (4, 4, 4)
    side = c.motion_encoder_size
    return {"hidden_states": rand(batch, c.in_channels, f, h, w), "timestep": t,
            "encoder_hidden_states": rand(batch, 512, c.text_dim),
            "encoder_hidden_states_image": rand(batch, 257, c.image_dim),
            "pose_hidden_states": rand(batch, c.latent_channels, f - 1, h, w),
            "face_pixel_values": rand(batch, 3, 4 * (f - 1) - 3, side, side).clamp(-1, 1)}


# -- tiny pipelines (attnedit.models.zoo) --------------------------------------------------------------------------
def _build_tiny_wan22_i2v():
    """Wan 2.2 I2V-A14B layout: ``WanImageToVideoPipeline``, two denoisers, ``boundary_ratio`` 0.9, no image encoder.

    The image reaches the model only through the latents (``in_channels`` 36 = 16 noise + 4 mask + 16 image-latent
    channels), as in the published checkpoint; ``expand_timesteps`` stays off (that is TI2V-5B's). The tiny UMT5
    stand-in, VAE and scheduler are the tiny Wan parts; ``transformer_2`` is drawn after ``transformer``.
    """
    from diffusers import WanImageToVideoPipeline, WanTransformer3DModel

    from attnedit.families.wan_vace import tiny_wan_parts


    def transformer() -> WanTransformer3DModel:
        return WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=36, out_channels=16,
            text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32)

    return WanImageToVideoPipeline(
        **tiny_wan_parts(), image_processor=None, image_encoder=None, transformer=transformer(),
        transformer_2=transformer(),
        boundary_ratio=0.9, expand_timesteps=False)


def _build_tiny_animate():
    """``WanAnimatePipeline``: the tiny Wan text encoder, VAE and scheduler, a tiny CLIP vision encoder and
    processor (4 px, 2 layers), and an Animate transformer in the shape of diffusers' own pipeline test, plus the
    published model's separate image key/value projections (``added_kv_proj_dim``). Its processor takes the last 512
    context tokens as the text, so the prompt is padded to 512 as in the real pipeline."""
    from diffusers import WanAnimatePipeline, WanAnimateTransformer3DModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    from attnedit.families.wan_vace import tiny_wan_parts

    transformer = WanAnimateTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=36, latent_channels=16,
        out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", image_dim=4, added_kv_proj_dim=24, rope_max_seq_len=32,
        motion_encoder_channel_sizes={"4": 16, "8": 16, "16": 16}, motion_encoder_size=16, motion_style_dim=8,
        motion_dim=4, motion_encoder_dim=16, face_encoder_hidden_dim=16, face_encoder_num_heads=2,
        inject_face_latents_blocks=2)
    encoder = CLIPVisionModel(CLIPVisionConfig(
        hidden_size=4, projection_dim=4, num_hidden_layers=2, num_attention_heads=2, image_size=4,
        intermediate_size=16, patch_size=1))
    return WanAnimatePipeline(**tiny_wan_parts(), image_processor=CLIPImageProcessor(crop_size=4, size=4),
                              image_encoder=encoder, transformer=transformer)


TINY = {
    # pass image=, pose_video= and face_video= (lists of PIL frames; faces at 16 px)
    "wan_animate": {"build": _build_tiny_animate, "video": True,
                    "call": {"height": 32, "width": 32, "segment_frame_length": 5, "guidance_scale": 1.0,
                             "max_sequence_length": 512}},
    # 2 steps at shift 7: t = 1000 (transformer, >= 900), then t = 46.8 (transformer_2); pass image=<PIL image>
    "wan22_i2v": {"build": _build_tiny_wan22_i2v, "video": True,
                  "call": {"height": 32, "width": 32, "num_frames": 5, "guidance_scale": 5.0, "guidance_scale_2": 3.0,
                           "max_sequence_length": 32}},
}
