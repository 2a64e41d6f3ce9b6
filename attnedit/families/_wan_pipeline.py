"""The Wan family's video-editor hooks: per-channel latent normalization, the scheduler's shift, T5 conditioning."""

from __future__ import annotations

from typing import Any

import torch

from attnedit.core.family_hooks import VideoPipelineHooks


def patch(config: Any) -> tuple[int, int, int]:
    return tuple(config.patch_size)


def norm(vae_config: Any, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``latents_mean`` / ``latents_std``, as the pipeline normalizes."""
    view = (1, -1, 1, 1, 1)
    mean = torch.tensor(vae_config.latents_mean, dtype=like.dtype, device=like.device).view(view)
    return mean, 1.0 / torch.tensor(vae_config.latents_std, dtype=like.dtype, device=like.device).view(view)


def run(m: Any, scheduler: Any) -> tuple:
    scheduler.set_timesteps(m.num_steps, device="cpu")
    emb = m.pipe.encode_prompt(prompt=m.prompt, do_classifier_free_guidance=False,
                               max_sequence_length=m.text_length, device=m.device)[0]
    return (emb,)


def predict(m: Any, model: torch.nn.Module, z: torch.Tensor, t: torch.Tensor, cond: tuple) -> torch.Tensor:
    (emb,) = cond
    out = model(hidden_states=z.to(model.dtype), timestep=t, encoder_hidden_states=emb.expand(z.shape[0], -1, -1),
                return_dict=False)[0]
    return out.to(z.dtype)


PIPELINE = VideoPipelineHooks(kinds=frozenset({"self"}), patch=patch, norm=norm, run=run, predict=predict, text_length=512)
