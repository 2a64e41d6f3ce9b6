"""What attnedit's own pipelines (refocusing, DesignEdit, video editing) ask of a family: its pipeline hooks.

A :class:`~attnedit.core.families.Family` declares ``image_pipeline`` and/or ``video_pipeline``; None (the
default) means attnedit's pipeline does not drive that family. The pipelines read these declarations and never a
family's name, so a new family fills them in from its own stock pipeline without reading attnedit's pipelines.
Hooks receive the stock pipeline (``pipe``) or attnedit's model adapter (``m``: ``m.pipe``, ``m.denoiser``,
``m.device``, ``m.prompt``, ``m.num_steps``, ``m.text_length``, ``m.embedded_guidance``) and import diffusers lazily.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ImagePipelineHooks:
    """How attention refocusing and DesignEdit drive a text-to-image family's stock pipeline."""

    sampler: str  # DesignEdit's sampler: "ddim" (epsilon UNets, the paper) or "flow" (rectified-flow Euler steps)
    size: Callable[[Any], tuple[int, int]]  # pipe -> (height/width pixel multiple, default side in pixels)
    # refocusing: (pipe, prompt, (H, W), max_sequence_length, guidance_scale) -> forward(x, t), batch 1, cond only
    conditioner: Callable[..., Callable] | None = None
    # refocusing: (pipe, steps, initial noise, sigmas) -> the timesteps the pipeline will set; None: set_timesteps(steps)
    timesteps: Callable[..., Any] | None = None
    # refocusing: (pipe, denoiser, (H, W), generator) -> the noise the pipeline draws itself; None: an unpacked randn
    noise: Callable[..., Any] | None = None
    # refocusing: (pipe, max_sequence_length) -> [(tokenizer, key offset, limit)] of the text keys; None: CLIP (+ T5)
    text_tokenizers: Callable[[Any, int], list] | None = None
    text_length: int = 0  # the pipeline's default max_sequence_length (T5 keys); 0: its call takes none
    pipelines: tuple[str, ...] = ()  # pipeline classes refocusing supports (subclasses count); (): any
    gradient_checkpointing: bool = False  # refocusing's default (large joint transformers)
    distilled: bool = False  # guidance-distilled: one conditional pass per step, embedded guidance instead of CFG
    # DesignEdit (sampler "flow"): (m, scheduler, h, w latent size) -> conditioning, after setting the timesteps
    flow_run: Callable[..., Any] | None = None
    # DesignEdit (sampler "flow"): (m, run conditioning, z (rows, C, h, w), t (rows,)) -> velocity like z
    flow_predict: Callable[..., Any] | None = None


@dataclass(frozen=True)
class VideoPipelineHooks:
    """How the video editor (:mod:`attnedit.pipelines.video_model`) drives a video family's stock pipeline."""

    kinds: frozenset[str]  # the attention kinds the key mask acts on
    patch: Callable[[Any], tuple[int, int, int]]  # denoiser config -> (frames, height, width) latents per token
    norm: Callable[[Any, Any], tuple[Any, Any]]  # (vae config, like tensor) -> (shift, scale) of the model latent
    run: Callable[..., Any]  # (m, scheduler) -> conditioning, after setting the scheduler's timesteps
    predict: Callable[..., Any]  # (m, denoiser, z, t (rows,), conditioning) -> velocity like z
    text_length: int = 512  # the pipeline's default max_sequence_length
    prompt_template: Callable[[Any], dict | None] | None = None  # pipe -> template to pass (None: the pipeline's)
    distilled: bool = False  # guidance-distilled: one pass per step; ``embedded_guidance`` is read


__all__ = ["ImagePipelineHooks", "VideoPipelineHooks"]
