"""Attention refocusing on GLIGEN (``StableDiffusionGLIGENPipeline``): the paper's headline setting.

The gradient forward passes GLIGEN's grounding inputs (each phrase's pooled CLIP feature and its box, as the pipeline
prepares them, conditional row only) and follows GLIGEN's scheduled sampling as the pipeline does: the gated
self-attention ("fuser") is on for steps ``i < int(gligen_scheduled_sampling_beta * len(timesteps))``. The stock
pipeline predates ``callback_on_step_end`` (its legacy ``callback`` cannot return a latent and skips warm-up steps),
so refocusing wraps ``scheduler.step`` for the duration of the call: after step i the latent of step i + 1 is
refocused. Grounding inputs default to the layout (one GLIGEN phrase per box), as the authors' code does.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from attnedit.methods.refocusing import Layout

MAX_OBJECTS = 30  # the pipeline's (and GLIGEN's) limit
DEFAULT_BETA = 0.3  # StableDiffusionGLIGENPipeline's gligen_scheduled_sampling_beta


def is_gligen(pipe: Any) -> bool:
    return any(c.__name__ == "StableDiffusionGLIGENPipeline" for c in type(pipe).__mro__)


def grounding_inputs(pipe: Any, layout: Layout, kwargs: dict[str, Any]) -> None:
    """Check the GLIGEN call's own arguments and fill ``gligen_phrases``/``gligen_boxes`` from ``layout`` if unset."""
    if kwargs.get("gligen_inpaint_image") is not None:
        raise ValueError("gligen_inpaint_image= is not supported by refocusing (the gradient forward would need "
                         "the inpainting inputs); refocus text-box generation only")
    phrases, boxes = kwargs.get("gligen_phrases"), kwargs.get("gligen_boxes")
    if (phrases is None) != (boxes is None):
        raise ValueError(f"gligen_phrases={phrases!r} and gligen_boxes={boxes!r}: give both or neither "
                         "(neither: one phrase per layout box)")
    if phrases is None:
        pairs = [(r.phrase, list(b)) for r in layout.regions for b in r.boxes]
        phrases, boxes = [p for p, _ in pairs], [b for _, b in pairs]
    if not isinstance(phrases, (list, tuple)) or not all(isinstance(p, str) for p in phrases):
        raise ValueError(f"gligen_phrases={phrases!r} must be a list of strings")
    if not isinstance(boxes, (list, tuple)) or len(boxes) != len(phrases) or not phrases or len(phrases) > MAX_OBJECTS:
        raise ValueError(f"gligen_boxes={boxes!r} must be one box per phrase of gligen_phrases (1 to {MAX_OBJECTS})")
    beta = kwargs.get("gligen_scheduled_sampling_beta", DEFAULT_BETA)
    if not isinstance(beta, (int, float)) or not 0.0 <= beta <= 1.0:
        raise ValueError(f"gligen_scheduled_sampling_beta={beta!r} must be in [0, 1]")
    kwargs["gligen_phrases"], kwargs["gligen_boxes"] = list(phrases), [list(map(float, b)) for b in boxes]


def conditioner(pipe: Any, prompt: str, kwargs: dict[str, Any]) -> Callable[[torch.Tensor, torch.Tensor], Any]:
    """forward(x, t): the conditional UNet call with GLIGEN's grounding inputs for one image (as the pipeline's)."""
    device, unet = pipe._execution_device, pipe.unet
    emb = pipe.encode_prompt(prompt, device, 1, False)[0]
    phrases, boxes = kwargs["gligen_phrases"], kwargs["gligen_boxes"]
    with torch.no_grad():
        tokens = pipe.tokenizer(phrases, padding=True, return_tensors="pt").to(device)
        features = pipe.text_encoder(**tokens).pooler_output
    dtype, n = pipe.text_encoder.dtype, len(phrases)
    grounding = {"boxes": torch.zeros(1, MAX_OBJECTS, 4, device=device, dtype=dtype),
                 "positive_embeddings": torch.zeros(1, MAX_OBJECTS, unet.config.cross_attention_dim, device=device,
                                                    dtype=dtype),
                 "masks": torch.zeros(1, MAX_OBJECTS, device=device, dtype=dtype)}
    grounding["boxes"][0, :n] = torch.tensor(boxes, device=device, dtype=dtype)
    grounding["positive_embeddings"][0, :n] = features.to(dtype)
    grounding["masks"][0, :n] = 1
    scale = pipe.scheduler.scale_model_input
    return lambda x, t: unet(scale(x, t), t, encoder_hidden_states=emb, return_dict=False,
                             cross_attention_kwargs={"gligen": grounding})


def _fusers(pipe: Any) -> list[torch.nn.Module]:
    return [m for m in pipe.unet.modules() if type(m).__name__ == "GatedSelfAttentionDense"]


def fuser_schedule(pipe: Any, kwargs: dict[str, Any], timesteps: int) -> Callable[[int], Any]:
    """prepare(step): a context in which the fuser is on exactly when the pipeline's step ``step`` has it on."""
    grounding_steps = int(kwargs.get("gligen_scheduled_sampling_beta", DEFAULT_BETA) * timesteps)
    fusers = _fusers(pipe)

    @contextmanager
    def prepare(step: int) -> Iterator[None]:
        saved = [f.enabled for f in fusers]
        for f in fusers:
            f.enabled = step < grounding_steps
        try:
            yield
        finally:
            for f, on in zip(fusers, saved):
                f.enabled = on

    return prepare


@contextmanager
def after_each_step(pipe: Any, refocus_next: Callable[[int, torch.Tensor], torch.Tensor | None]) -> Iterator[None]:
    """Wrap ``pipe.scheduler.step`` so that ``refocus_next(i, prev_sample)`` may replace the latent after step i."""
    scheduler = pipe.scheduler
    original = scheduler.step  # the bound method (or an instance attribute someone set)
    own = "step" in vars(scheduler)
    count = [0]

    @functools.wraps(original)  # keeps the signature: the pipeline inspects it for eta / generator
    def step(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        i, count[0] = count[0], count[0] + 1
        latents = out.prev_sample if hasattr(out, "prev_sample") else out[0]
        new = refocus_next(i, latents)
        if new is not None:
            if hasattr(out, "prev_sample"):
                out.prev_sample = new
            else:
                out = (new, *out[1:])
        return out

    scheduler.step = step
    try:
        yield
    finally:
        if own:
            scheduler.step = original
        else:
            del scheduler.step
