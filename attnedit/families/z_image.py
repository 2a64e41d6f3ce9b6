"""Z-Image (``ZImageTransformer2DModel``): a single-stream DiT over ``[image; caption]``, with refiners before it.

The denoiser takes lists (one latent ``(C, 1, H, W)`` and one caption ``(L, D)`` per row). Image tokens (2x2
patches) first run through ``noise_refiner`` blocks (self-attention over the image alone: kind "self"), the caption
through ``context_refiner`` blocks (caption alone: not sites, like HunyuanVideo's token refiner), then the main
``layers`` attend over one joint sequence per row: ``[image, padded to a multiple of 32; caption, padded to a
multiple of 32]`` (kind "joint"), rows padded to the longest with a key mask. The image's pad tokens are neither
image nor text (key masks keep them). The stock ``ZSingleStreamAttnProcessor`` calls diffusers' dispatcher, so
attnedit keeps it. CFG: one batch, rows ``[cond, uncond]`` (Turbo runs without CFG).

Published config: ``transformer/config.json`` of Tongyi-MAI/Z-Image-Turbo (written out by hand; the hub is not
reachable here).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from attnedit.core.families import Family, ForwardInfo, ProcessorCall, TokenLayout

SEQ_MULTI_OF = 32  # diffusers' transformer_z_image pads every image and caption sequence to this


def _padded(n: int) -> int:
    return n + (-n) % SEQ_MULTI_OF


def read_grid(model: torch.nn.Module, latent: Any, bound: dict) -> tuple[int, int]:
    """The (rows, columns) of image tokens: the first row's latent ``(C, F, H, W)`` over the patch size."""
    p = bound.get("patch_size", 2)
    first = latent[0] if isinstance(latent, (list, tuple)) else latent
    return (first.shape[-2] // p, first.shape[-1] // p)


def extra_info(model: torch.nn.Module, bound: dict) -> Mapping[str, Any]:
    """The padded image length (where the caption starts in the joint sequence) and the first row's caption length."""
    grid = read_grid(model, bound["x"], bound)
    caption = bound.get("cap_feats")
    return {"image_padded": _padded(grid[0] * grid[1]), "caption": len(caption[0]) if caption else 0}


def layout(call: ProcessorCall, info: ForwardInfo | None, num_queries: int, num_keys: int) -> TokenLayout | None:
    if info is None:
        return None
    image = slice(0, info.grid[0] * info.grid[1])
    if call.site.kind == "self":  # noise refiner: the image (and its pad tokens) alone
        return TokenLayout(image, image)
    start = info.extra["image_padded"]
    words = slice(start, start + info.extra["caption"]) if info.extra["caption"] else None
    return TokenLayout(image, image, words, words)


FAMILY = Family(
    name="z_image",
    model_class="ZImageTransformer2DModel",
    batched_cfg=True,
    cfg_rows=("cond", "uncond"),  # ZImagePipeline batches prompt_embeds + negative_prompt_embeds
    site_rules=(
        (r"noise_refiner\.\d+\.attention", "self", ""),
        (r"layers\.\d+\.attention", "joint", ""),
    ),
    read_grid=read_grid,
    layout=layout,
    perturbed_kind="joint",
    text_kind="joint",
    latent_key="x",
    extra_info=extra_info,
    aliases=("z-image", "zimage"),
)


# -- published checkpoints (attnedit.models.architectures) ------------------------------------------------------
PUBLISHED = (
    {"name": "z-image-turbo", "hub_id": "Tongyi-MAI/Z-Image-Turbo", "pipeline": "ZImagePipeline",
     "reduced": {"n_layers": 1, "n_refiner_layers": 1}},
)


def published_sites(c: dict) -> list[tuple[str, str, int, str]]:
    """Noise-refiner blocks (image self-attention), then the main joint blocks; context refiners are not sites."""
    h = c["n_heads"]
    return ([(f"noise_refiner.{i}.attention", "self", h, "") for i in range(c["n_refiner_layers"])]
            + [(f"layers.{i}.attention", "joint", h, "") for i in range(c["n_layers"])])


def example_inputs(arch, model, batch, size, text, rand, t) -> dict:
    """Lists of per-row latents ``(C, 1, H, W)`` and captions ``(L, cap_feat_dim)``; t in [0, 1] (1 = clean)."""
    c = model.config
    h, w = size or (8, 12)
    return {"x": [rand(c.in_channels, 1, h, w) for _ in range(batch)], "t": (1000 - t) / 1000,
            "cap_feats": [rand(text, c.cap_feat_dim) for _ in range(batch)]}


# -- tiny random-weight pipeline (attnedit.models.zoo) ------------------------------------------------------------
def _build_tiny():
    """ZImagePipeline with a 2-layer Qwen3 text encoder of width 16 (its second-to-last hidden states are the caption)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    from attnedit.models.zoo_text import word_tokenizer

    tokenizer = word_tokenizer("llama")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # Qwen3's, minus the markup
    encoder = Qwen3Model(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id))
    transformer = ZImageTransformer2DModel(
        in_channels=4, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=16,
        axes_dims=[4, 6, 6], axes_lens=[256, 64, 64])  # axes sum to the head dim (16)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    vae = AutoencoderKL(  # vae_scale_factor 8 (the pipeline packs 2x2 more: 64 px -> 4x4 tokens)
        latent_channels=4, block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, norm_num_groups=4, sample_size=64,
        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611)
    return ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=encoder, tokenizer=tokenizer,
                          transformer=transformer)


TINY = {
    # Turbo's setting: no CFG (guidance_scale 0)
    "z_image": {"build": _build_tiny, "call": {"height": 64, "width": 64, "guidance_scale": 0.0,
                                               "max_sequence_length": 32}},
}
