"""The HunyuanVideo 1.5 family's video-editor hooks: ``linspace(1, 0)`` sigmas shifted by the scheduler, Qwen + ByT5
conditioning, and text-to-video's all-zero condition latents, mask channel and image tokens, as its pipeline."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from attnedit.core.family_hooks import VideoPipelineHooks


def patch(config: Any) -> tuple[int, int, int]:
    return (config.patch_size_t, config.patch_size, config.patch_size)


def norm(vae_config: Any, like: torch.Tensor) -> tuple[float, float]:
    return 0.0, float(vae_config.scaling_factor)


def run(m: Any, scheduler: Any) -> tuple:
    """The pipeline's sigmas and its conditional prompt (its Qwen length is fixed: ``tokenizer_max_length``)."""
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, m.num_steps + 1)[:-1], device="cpu")
    emb, mask, emb_2, mask_2 = m.pipe.encode_prompt(prompt=m.prompt, device=m.device)
    config = m.denoiser.config
    image = torch.zeros(1, m.pipe.vision_num_semantic_tokens, config.image_embed_dim, device=m.device,
                        dtype=m.denoiser.dtype)
    return (emb, mask, emb_2, mask_2, image)


def predict(m: Any, model: torch.nn.Module, z: torch.Tensor, t: torch.Tensor, cond: tuple) -> torch.Tensor:
    """One conditional pass on ``[z, zero condition latents, zero mask]`` (text-to-video's inputs)."""
    emb, mask, emb_2, mask_2, image = cond
    rows = z.shape[0]
    x = z.to(model.dtype)
    x = torch.cat([x, torch.zeros_like(x), torch.zeros_like(x[:, :1])], dim=1)
    out = model(hidden_states=x, timestep=t.to(model.dtype), encoder_hidden_states=emb.expand(rows, -1, -1),
                encoder_attention_mask=mask.expand(rows, -1), encoder_hidden_states_2=emb_2.expand(rows, -1, -1),
                encoder_attention_mask_2=mask_2.expand(rows, -1), image_embeds=image.expand(rows, -1, -1),
                return_dict=False)[0]
    return out.to(z.dtype)


PIPELINE = VideoPipelineHooks(kinds=frozenset({"joint"}), patch=patch, norm=norm, run=run, predict=predict,
                              text_length=1000)
