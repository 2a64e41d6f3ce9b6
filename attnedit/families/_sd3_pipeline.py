"""The SD3 family's pipeline hooks (SD3 / SD3.5 MM-DiT): what refocusing and DesignEdit need of its pipelines."""

from __future__ import annotations

from typing import Any

import torch

from attnedit.core.family_hooks import ImagePipelineHooks


def size(pipe: Any) -> tuple[int, int]:
    """Whole patches of VAE latents; default side from the transformer's sample size."""
    vsf = pipe.vae_scale_factor
    return vsf * pipe.transformer.config.patch_size, int(pipe.transformer.config.sample_size or 128) * vsf


def conditioner(pipe: Any, prompt: str, size: tuple[int, int], max_sequence_length: int,
                guidance_scale: float | None = None) -> Any:
    emb, _, pooled, _ = pipe.encode_prompt(prompt=prompt, prompt_2=None, prompt_3=None, device=pipe._execution_device,
                                           do_classifier_free_guidance=False, max_sequence_length=max_sequence_length)
    return lambda x, t: pipe.transformer(hidden_states=x, timestep=t.expand(1), encoder_hidden_states=emb,
                                         pooled_projections=pooled, return_dict=False)


def timesteps(pipe: Any, steps: int, latent: torch.Tensor, sigmas: Any = None) -> torch.Tensor:
    """The scheduler's timesteps, with the resolution-dependent shift where the scheduler uses dynamic shifting."""
    config, extra = pipe.scheduler.config, {}
    if config.get("use_dynamic_shifting", None):
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

        p = pipe.transformer.config.patch_size
        n = (latent.shape[-2] // p) * (latent.shape[-1] // p)
        extra["mu"] = calculate_shift(n, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                                      config.get("base_shift", 0.5), config.get("max_shift", 1.16))
    pipe.scheduler.set_timesteps(steps, device=latent.device, **extra)
    return pipe.scheduler.timesteps


def flow_run(m: Any, scheduler: Any, h: int, w: int) -> tuple:
    scheduler.set_timesteps(m.num_steps, device="cpu")
    emb, _, pooled, _ = m.pipe.encode_prompt(prompt=m.prompt, prompt_2=None, prompt_3=None, device=m.device,
                                             do_classifier_free_guidance=False, max_sequence_length=m.text_length)
    return (emb, pooled)


def flow_predict(m: Any, cond: tuple, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    emb, pooled = cond
    rows, model = z.shape[0], m.denoiser
    out = model(hidden_states=z.to(model.dtype), timestep=t, encoder_hidden_states=emb.expand(rows, -1, -1),
                pooled_projections=pooled.expand(rows, -1)).sample
    return out.to(z.dtype)


PIPELINE = ImagePipelineHooks(sampler="flow", size=size, conditioner=conditioner, timesteps=timesteps, text_length=256,
                              flow_run=flow_run, flow_predict=flow_predict)
