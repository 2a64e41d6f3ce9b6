"""The Attention maps tab's work: an image and the attention of the image to each prompt word."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from attnedit.core.edits import AttentionRecorder
from attnedit.core.install import install
from attnedit.methods.attention_maps import token_heatmaps
from attnedit.methods.refocusing_layout import MAX_BOXES, Layout, token_layout
from attnedit.shapes.builtin import call_options
from attnedit.surfaces import webapp_tabs as tabs

MAX_STEPS = 100


def generate_with_maps(pipe: Any, prompt: str, seed: int, steps: int, guidance: float,
                       **size: Any) -> tuple[np.ndarray, list]:
    """Image (H, W, 3) uint8 and [(heat map over the image, word)] for each prompt word: the cross-attention of
    UNets, the image-to-text joint attention of MM-DiTs (SD3, shapes-dit), averaged over the word's tokens.

    ``size``: ``width``, ``height`` and ``negative_prompt`` for the pipeline (:func:`webapp_results.image_options`)."""
    prompt = tabs._check_prompt(prompt)
    if not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"steps={steps} must be in 1..{MAX_STEPS}")
    sd3 = getattr(pipe, "transformer", None) is not None
    recorder = AttentionRecorder(kinds=frozenset({"joint" if sd3 else "cross"}), branches=frozenset({"cond"}),
                                 queries="image" if sd3 else "all")
    with install(pipe, recorder), torch.no_grad():
        result = pipe(prompt=prompt, num_inference_steps=steps, guidance_scale=guidance, output_type="np",
                      generator=torch.Generator("cpu").manual_seed(int(seed)), **call_options(pipe), **size)
    image = (result.images[0] * 255).round().astype(np.uint8)
    if not recorder.maps:
        return image, []
    words = list(dict.fromkeys(w.strip(".,;:!?") for w in prompt.split() if w.strip(".,;:!?")))[:MAX_BOXES]
    # one region per word (distinct dummy boxes: a layout refuses two phrases with one box) to find its tokens
    layout = Layout(prompt, [(w, [(0.0, 0.0, 1.0, 1.0 - 0.01 * i)]) for i, w in enumerate(words)])
    tokens = token_layout(pipe, layout, **call_options(pipe))
    heat = token_heatmaps(recorder.maps, size=image.shape[:2])
    maps = []
    for word, members in zip(words, tokens.phrases):
        maps.append((tabs.overlay(image, tabs._normalized(heat[[tokens.content[k] for k in members]].mean(0))), word))
    return image, maps
