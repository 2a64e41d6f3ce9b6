"""The HunyuanVideo family's video-editor hooks: shifted ``linspace(1, 0)`` sigmas, templated prompts, distilled guidance."""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch

from attnedit.core.family_hooks import VideoPipelineHooks


def patch(config: Any) -> tuple[int, int, int]:
    return (config.patch_size_t, config.patch_size, config.patch_size)


def norm(vae_config: Any, like: torch.Tensor) -> tuple[float, float]:
    return 0.0, float(vae_config.scaling_factor)


def prompt_template(pipe: Any) -> dict | None:
    """None (the pipeline's own) unless its tokenizer cannot even hold the stock template's system prompt
    (the tiny zoo's word tokenizer): then the zoo's short template."""
    stock = inspect.signature(pipe.encode_prompt).parameters["prompt_template"].default
    tokens = len(pipe.tokenizer(stock["template"].format(""))["input_ids"])
    if tokens > stock["crop_start"]:
        return None
    from attnedit.models.zoo_text import HUNYUAN_PROMPT_TEMPLATE

    return HUNYUAN_PROMPT_TEMPLATE


def run(m: Any, scheduler: Any) -> tuple:
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, m.num_steps + 1)[:-1], device="cpu")
    options = {} if m.prompt_template is None else {"prompt_template": m.prompt_template}
    emb, pooled, mask = m.pipe.encode_prompt(prompt=m.prompt, prompt_2=None, device=m.device,
                                             max_sequence_length=m.text_length, **options)
    return (emb, pooled, mask)


def predict(m: Any, model: torch.nn.Module, z: torch.Tensor, t: torch.Tensor, cond: tuple) -> torch.Tensor:
    emb, pooled, mask = cond
    rows = z.shape[0]
    guidance = torch.full((rows,), m.embedded_guidance * 1000.0, device=m.device, dtype=model.dtype)
    out = model(hidden_states=z.to(model.dtype), timestep=t, encoder_hidden_states=emb.expand(rows, -1, -1),
                encoder_attention_mask=mask.expand(rows, -1), pooled_projections=pooled.expand(rows, -1),
                guidance=guidance, return_dict=False)[0]
    return out.to(z.dtype)


PIPELINE = VideoPipelineHooks(kinds=frozenset({"joint"}), patch=patch, norm=norm, run=run, predict=predict,
                              text_length=256, prompt_template=prompt_template, distilled=True)
