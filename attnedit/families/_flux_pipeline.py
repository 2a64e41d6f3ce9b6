"""The FLUX.1 family's pipeline hooks: 2x2 latent packing, resolution-dependent shift, T5 text keys, distilled guidance."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from attnedit.core.family_hooks import ImagePipelineHooks


def size(pipe: Any) -> tuple[int, int]:
    """Whole 2x2 packs of VAE latents; default side from the pipeline's sample size."""
    vsf = pipe.vae_scale_factor
    return vsf * 2, int(getattr(pipe, "default_sample_size", None) or 128) * vsf


def _default(pipe: Any, name: str) -> Any:
    import inspect

    return inspect.signature(type(pipe).__call__).parameters[name].default


def conditioner(pipe: Any, prompt: str, size: tuple[int, int], max_sequence_length: int,
                guidance_scale: float | None = None) -> Any:
    """forward(x, t) on packed latents, the timestep in the transformer's 0..1 units."""
    device = pipe._execution_device
    emb, pooled, text_ids = pipe.encode_prompt(prompt=prompt, prompt_2=None, device=device,
                                               max_sequence_length=max_sequence_length)
    vsf = pipe.vae_scale_factor
    h, w = (2 * (int(n) // (vsf * 2)) for n in size)
    image_ids = pipe._prepare_latent_image_ids(1, h // 2, w // 2, device, emb.dtype)
    guidance = None
    if pipe.transformer.config.guidance_embeds:
        scale = _default(pipe, "guidance_scale") if guidance_scale is None else guidance_scale
        guidance = torch.full([1], float(scale), device=device, dtype=torch.float32)
    return lambda x, t: pipe.transformer(
        hidden_states=x, timestep=t.expand(1).to(x.dtype) / 1000, guidance=guidance, pooled_projections=pooled,
        encoder_hidden_states=emb, txt_ids=text_ids, img_ids=image_ids, return_dict=False)


def _mu(config: Any, tokens: int) -> float:
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    return calculate_shift(tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                           config.get("base_shift", 0.5), config.get("max_shift", 1.15))


def timesteps(pipe: Any, steps: int, latent: torch.Tensor, sigmas: Any = None) -> torch.Tensor:
    from diffusers.pipelines.flux.pipeline_flux import retrieve_timesteps

    config = pipe.scheduler.config
    sigmas = np.linspace(1.0, 1 / steps, steps) if sigmas is None else sigmas
    if config.get("use_flow_sigmas", False):
        sigmas = None
    out, _ = retrieve_timesteps(pipe.scheduler, steps, latent.device, sigmas=sigmas, mu=_mu(config, latent.shape[1]))
    return out


def noise(pipe: Any, model: torch.nn.Module, size: tuple[int, int], generator: Any) -> torch.Tensor:
    """Packed (1, h/2 * w/2, 4 C), as the pipeline's ``latents=`` expects, in the dtype of its prompt embeddings."""
    encoder = getattr(pipe, "text_encoder_2", None)
    dtype = encoder.dtype if encoder is not None else model.dtype
    out, _ = pipe.prepare_latents(1, model.config.in_channels // 4, size[0], size[1], dtype, pipe._execution_device,
                                  generator)
    return out


def text_tokenizers(pipe: Any, max_sequence_length: int) -> list:
    return [(pipe.tokenizer_2, 0, max_sequence_length)]  # T5 only: CLIP gives the pooled vector


def flow_run(m: Any, scheduler: Any, h: int, w: int) -> tuple:
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / m.num_steps, m.num_steps), mu=_mu(scheduler.config, h * w // 4),
                            device="cpu")
    emb, pooled, text_ids = m.pipe.encode_prompt(prompt=m.prompt, prompt_2=None, device=m.device,
                                                 max_sequence_length=m.text_length)
    ids = m.pipe._prepare_latent_image_ids(1, h // 2, w // 2, m.device, emb.dtype)
    return (emb, pooled, text_ids, ids)


def flow_predict(m: Any, cond: tuple, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Unpacked latents in and out (masks, blending and fusion stay shared); packed 2x2 for the call."""
    emb, pooled, text_ids, ids = cond
    model, rows = m.denoiser, z.shape[0]
    b, c, h, w = z.shape
    packed = z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)
    guidance = torch.full((rows,), m.embedded_guidance, device=m.device) if model.config.guidance_embeds else None
    out = model(hidden_states=packed.to(model.dtype), timestep=t / 1000, guidance=guidance, txt_ids=text_ids,
                img_ids=ids, encoder_hidden_states=emb.expand(rows, -1, -1), pooled_projections=pooled.expand(rows, -1)).sample
    return out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w).to(z.dtype)


PIPELINE = ImagePipelineHooks(
    sampler="flow", size=size, conditioner=conditioner, timesteps=timesteps, noise=noise,
    text_tokenizers=text_tokenizers, text_length=512, pipelines=("FluxPipeline",), gradient_checkpointing=True,
    distilled=True, flow_run=flow_run, flow_predict=flow_predict,
)
