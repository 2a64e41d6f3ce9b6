"""FLUX.1 [dev]/[schnell] and FLUX.1 Kontext (``FluxTransformer2DModel``): joint attention over ``[text, image]``.

19 double-stream blocks (text and image projected separately, then joined) and 38 single-stream blocks (one
joined sequence), numbered in one flat joint index. The stock ``FluxAttnProcessor`` sends attention through
diffusers' dispatcher, so attnedit keeps it and only says where the tokens are. Kontext appends the reference
image's tokens after the target's (``img_ids[:, 0] == 1``): edits act on the target image; reference tokens are
neither image nor text to them (key masks keep them visible). CFG: separate passes (guidance-distilled: usually one).
"""

from __future__ import annotations

import math

import torch

from attnedit.core.families import TWO_STREAM_RULES, Family, ForwardInfo, ProcessorCall, TokenLayout


def _ids(bound: dict) -> torch.Tensor | None:
    ids = bound.get("img_ids")
    return None if ids is None else (ids if ids.ndim == 2 else ids[0])


def read_grid(model: torch.nn.Module, latent: torch.Tensor, bound: dict) -> tuple[int, int]:
    """The target image's grid of packed tokens, from ``img_ids`` (row, column); reference tokens excluded."""
    ids = _ids(bound)
    if ids is None:
        side = math.isqrt(latent.shape[1])
        return (side, latent.shape[1] // side)
    target = ids[ids[:, 0] == 0] if bool((ids[:, 0] != 0).any()) else ids
    return (int(target[:, 1].max()) + 1, int(target[:, 2].max()) + 1)


def layout(call: ProcessorCall, info: ForwardInfo | None, num_queries: int, num_keys: int) -> TokenLayout | None:
    if call.index:  # IP-adapter processors attend to the adapter's tokens after the main call
        return None
    text_states = call.get("encoder_hidden_states")
    text = text_states.shape[1] if text_states is not None else (info.text_tokens if info is not None else 0)
    image_tokens = math.prod(info.grid) if info is not None else num_queries - text
    image = slice(text, text + image_tokens)
    words = slice(0, text) if text else None
    return TokenLayout(image, image, words, words)


from attnedit.families import _flux_pipeline as _pipeline  # the pipeline hooks (refocusing, DesignEdit, video editing)

FAMILY = Family(
    name="flux",
    model_class="FluxTransformer2DModel",
    batched_cfg=False,
    site_rules=TWO_STREAM_RULES,
    read_grid=read_grid,
    layout=layout,
    perturbed_kind="joint",
    text_kind="joint",
    aliases=("flux1", "flux-kontext"),
    image_pipeline=_pipeline.PIPELINE,  # refocusing: FluxPipeline; DesignEdit: FLUX.1 (2x2 packing, distilled)
)


# -- published checkpoints (attnedit.models.architectures) ------------------------------------------------------
PUBLISHED = (
    dict(name="flux1-dev", hub_id="black-forest-labs/FLUX.1-dev", pipeline="FluxPipeline",
         reduced={"num_layers": 1, "num_single_layers": 1}),
    # transformer/config.json of black-forest-labs/FLUX.1-Kontext-dev (FLUX.1-dev's widths; written out by hand)
    dict(name="flux1-kontext-dev", hub_id="black-forest-labs/FLUX.1-Kontext-dev", pipeline="FluxKontextPipeline",
         reduced={"num_layers": 1, "num_single_layers": 1}, pipeline_config={"reference_image": True}),
)


def published_sites(c: dict) -> list[tuple[str, str, int, str]]:
    """Double-stream then single-stream blocks, one flat joint index."""
    h = c["num_attention_heads"]
    return ([(f"transformer_blocks.{i}.attn", "joint", h, "double") for i in range(c["num_layers"])]
            + [(f"single_transformer_blocks.{i}.attn", "joint", h, "single") for i in range(c["num_single_layers"])])


def example_inputs(arch, model, batch, size, text, rand, t) -> dict:
    """Packed latents (2x2 VAE latents per token) with their ids; guidance for guidance-distilled checkpoints.

    Kontext (``pipeline_config["reference_image"]``): a same-size reference image's tokens follow the target's,
    ids ``(1, row, column)``, as ``FluxKontextPipeline.prepare_latents`` builds them.
    """
    c = model.config
    h, w = size or (4, 6)
    dtype = next(model.parameters()).dtype
    ids = torch.zeros(h, w, 3)
    ids[..., 1], ids[..., 2] = torch.arange(h)[:, None], torch.arange(w)[None, :]
    out = {"hidden_states": rand(batch, h * w, c.in_channels), "timestep": t / 1000,
           "encoder_hidden_states": rand(batch, text, c.joint_attention_dim),
           "pooled_projections": rand(batch, c.pooled_projection_dim),
           "img_ids": ids.reshape(-1, 3).to(dtype), "txt_ids": torch.zeros(text, 3, dtype=dtype)}
    if c.guidance_embeds:
        out["guidance"] = torch.full((batch,), 3.5)
    if arch.pipeline_config.get("reference_image"):
        reference = out["img_ids"].clone()
        reference[:, 0] = 1
        out["hidden_states"] = torch.cat([out["hidden_states"], rand(batch, h * w, c.in_channels)], dim=1)
        out["img_ids"] = torch.cat([out["img_ids"], reference])
    return out


# -- tiny random-weight pipeline (attnedit.models.zoo) ------------------------------------------------------------
def _build_kontext():
    """FLUX.1 Kontext at the tiny FLUX sizes (attnedit.models.zoo's "flux"): same denoiser class, reference tokens."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxTransformer2DModel

    from attnedit.models.zoo_text import _clip_encoder, _t5_encoder, clip_tokenizer, word_tokenizer

    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16 * 4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=[4, 4, 8])
    vae = AutoencoderKL(  # vae_scale_factor 8, 8 channels everywhere
        latent_channels=16, block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, norm_num_groups=4, sample_size=64,
        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    return FluxKontextPipeline(transformer=transformer, scheduler=scheduler, vae=vae,
                               text_encoder=_clip_encoder(32), tokenizer=clip_tokenizer(),
                               text_encoder_2=_t5_encoder(32), tokenizer_2=word_tokenizer("t5"))


def _reference_image():
    """A 64x64 two-colour picture: the image Kontext conditions on."""
    from PIL import Image

    image = Image.new("RGB", (64, 64), (40, 90, 200))
    image.paste((220, 40, 40), (16, 16, 40, 40))
    return image


TINY = {
    "flux_kontext": {
        "build": _build_kontext,
        # max_area and _auto_resize keep the tiny model at 64x64 (the defaults resize to ~1 megapixel)
        "call": {"height": 64, "width": 64, "guidance_scale": 2.5, "max_sequence_length": 32, "max_area": 64 * 64,
                 "_auto_resize": False, "image": _reference_image()},
    },
}
