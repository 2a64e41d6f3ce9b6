"""The UNet family's pipeline hooks (SD 1.x / 2.x / SDXL): what refocusing and DesignEdit need of its pipelines."""

from __future__ import annotations

from typing import Any

from attnedit.core.family_hooks import ImagePipelineHooks


def size(pipe: Any) -> tuple[int, int]:
    """Any multiple of the VAE factor; default side from the UNet's sample size."""
    return pipe.vae_scale_factor, pipe.unet.config.sample_size * pipe.vae_scale_factor


def conditioner(pipe: Any, prompt: str, size: tuple[int, int], max_sequence_length: int,
                guidance_scale: float | None = None) -> Any:
    """forward(x, t): the conditional UNet call (SDXL: with its micro-conditioning), scheduler input scaling included."""
    device = pipe._execution_device
    scale = pipe.scheduler.scale_model_input
    if getattr(pipe, "text_encoder_2", None) is None:  # SD 1.x / 2.x
        emb = pipe.encode_prompt(prompt, device, 1, False)[0]
        return lambda x, t: pipe.unet(scale(x, t), t, encoder_hidden_states=emb, return_dict=False)
    emb, _, pooled, _ = pipe.encode_prompt(prompt=prompt, device=device, do_classifier_free_guidance=False)
    ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=emb.dtype,
                                 text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim).to(device)
    extra = {"text_embeds": pooled, "time_ids": ids}
    return lambda x, t: pipe.unet(scale(x, t), t, encoder_hidden_states=emb, added_cond_kwargs=extra, return_dict=False)


PIPELINE = ImagePipelineHooks(sampler="ddim", size=size, conditioner=conditioner)
