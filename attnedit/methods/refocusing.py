"""Attention refocusing: grounded text-to-image from phrases and boxes, by latent updates on attention losses.

Implements Cross-Attention Refocusing (CAR) and Self-Attention Refocusing (SAR) from Phung, Ge and Huang (2024),
"Grounded Text-to-Image Synthesis with Attention Refocusing" (CVPR 2024, arXiv:2306.05427), as the authors' code
computes them (``ldm/models/diffusion/loss.py``). Before the model call of the scheduled denoising steps the noisy
latent descends ``grad(loss_scale * s_i * L)``; the schedules (``"ce0439c"``, default, and ``"b79fba5"``) are in
:mod:`attnedit.methods.refocusing_schedule`, layouts and phrase tokens in :mod:`attnedit.methods.refocusing_layout`.

* CAR (cross maps, heads and layers averaged, Attend-and-Excite normalization: softmax of ``100 A`` over the
  prompt's content tokens, 3x3 kernel ``exp(-((x - mu) / (2 sigma))^2)``, sigma 0.5, reflect padding; a phrase's
  map is the mean of its tokens' maps): per object,
  ``sum_{own boxes} (1 - max_box M) + sum_{each other object's box} max_box M' + |B| max_background M / 2``
  (``M'``: the map with the object's own boxes zeroed); mean over objects. ``b79fba5`` gates the first two terms.
* SAR (self maps): per box, the mean over its query cells of the attention mass on key cells outside the box;
  summed over an object's boxes, averaged over objects and layers.
* Boxes to cells as the official code: ``int(x * W)`` on both corners, plus a one-cell minimum so a thin box is
  never empty (the official code divides by zero there).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from attnedit.core.edits import AttentionRecorder, RecordedMap
from attnedit.methods.refocusing_layout import (  # noqa: F401  (re-exported: the public names live here too)
    CLIP_TOKENS,
    MAX_BOXES,
    Box,
    Layout,
    Region,
    TokenLayout,
    content_positions,
    phrase_positions,
    token_layout,
)
from attnedit.methods.refocusing_schedule import (  # noqa: F401
    DEFAULT_SCHEDULE,
    LOSSES,
    SCHEDULES,
    RefocusConfig,
    Schedule,
)

PLAIN_LOSS_SCALE = 40.0  # the authors' advice for plain (not GLIGEN) Stable Diffusion


# -------------------------------------------------------------------------------------------------- boxes
def box_mask(box: Box, grid: tuple[int, int]) -> torch.Tensor:
    """Bool (h, w): cells ``[int(y0 h), int(y1 h)) x [int(x0 w), int(x1 w))`` as the official code, at least one."""
    h, w = grid
    x0, y0, x1, y1 = int(box[0] * w), int(box[1] * h), int(box[2] * w), int(box[3] * h)
    x0, y0 = min(x0, w - 1), min(y0, h - 1)
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)] = True
    return mask


def region_masks(layout: Layout, grid: tuple[int, int]) -> list[torch.Tensor]:
    """Per region: bool (n_boxes, h, w)."""
    return [torch.stack([box_mask(b, grid) for b in r.boxes]) for r in layout.regions]


@functools.lru_cache(maxsize=64)
def _cached_masks(layout: Layout, grid: tuple[int, int], device: torch.device) -> tuple[torch.Tensor, ...]:
    """region_masks on ``device``, built once per (layout, grid): the losses read them every iteration."""
    return tuple(m.to(device) for m in region_masks(layout, grid))


# ------------------------------------------------------------------------------------------------- losses
def gaussian_kernel(sigma: float = 0.5, size: int = 3, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(size, size) kernel ``exp(-((x - mu) / (2 sigma))^2)`` per axis, normalized to sum 1 (the official
    GaussianSmoothing, also diffusers' Attend-and-Excite; centre weight 0.332 at sigma 0.5, size 3)."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-((x / (2 * sigma)) ** 2))
    kernel = g[:, None] * g[None, :]
    return (kernel / kernel.sum()).to(dtype)


def gaussian_smooth(maps: torch.Tensor, sigma: float = 0.5, size: int = 3) -> torch.Tensor:
    """Smooth (C, h, w) maps with :func:`gaussian_kernel` (reflect padding, as the official code)."""
    kernel = gaussian_kernel(sigma, size, maps.dtype).to(maps.device)
    pad = size // 2
    mode = "reflect" if min(maps.shape[-2:]) > pad else "replicate"
    return F.conv2d(F.pad(maps[:, None], (pad,) * 4, mode=mode), kernel[None, None])[:, 0]


def phrase_maps(text: torch.Tensor, grid: tuple[int, int], tokens: TokenLayout, softmax_scale: float = 100.0,
                sigma: float = 0.5) -> torch.Tensor:
    """Normalized phrase maps (O, h, w) from image->text attention ``text`` (N, T), N = h * w."""
    a = (softmax_scale * text[:, list(tokens.content)]).softmax(dim=-1)  # (N, C)
    a = gaussian_smooth(a.T.reshape(-1, *grid), sigma) if sigma > 0 else a.T.reshape(-1, *grid)
    return torch.stack([a[list(idx)].mean(dim=0) for idx in tokens.phrases])


def _box_max(m: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Max of ``m`` (h, w) inside each of ``boxes`` (n, h, w) -> (n,)."""
    return torch.where(boxes, m, m.new_tensor(-math.inf)).flatten(1).amax(dim=1)


def _gate_inside(peak: torch.Tensor, step: int) -> torch.Tensor:
    """b79fba5: ``6 (1 - p)`` below 0.1, ``1 - p`` below 0.2, then ``1 - p`` only before step 15."""
    late = 0.0 if step >= 15 else 1.0
    return torch.where(peak < 0.1, 6 * (1 - peak), torch.where(peak < 0.2, 1 - peak, late * (1 - peak)))


def _gate_outside(value: torch.Tensor, step: int) -> torch.Tensor:
    """b79fba5: ``4 v`` above 0.15, ``v`` above 0.1, then ``v`` only before step 15."""
    late = 0.0 if step >= 15 else 1.0
    return torch.where(value > 0.15, 4 * value, torch.where(value > 0.1, value, late * value))


def car_loss(maps: torch.Tensor, masks: list[torch.Tensor], gated: bool = False,
             step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-Attention Refocusing. maps (O, h, w), masks[o] bool (n_o, h, w) -> (loss, in-box peaks (sum n_o,)).

    ``gated``: b79fba5's thresholds on the in-box and other-box terms (``step``: the step of a 50-step run).
    """
    union = [m.any(dim=0) for m in masks]
    anywhere = torch.stack(union).any(dim=0)
    losses, peaks = [], []
    for o, m in enumerate(maps):
        inside = _box_max(m, masks[o])
        others = [b for i, b in enumerate(masks) if i != o]
        outside = _box_max(m * ~union[o], torch.cat(others)) if others else m.new_zeros(0)
        background = (m * ~anywhere).max() * len(masks[o]) / 2
        if gated:
            inside_term, outside_term = _gate_inside(inside, step), _gate_outside(outside, step)
        else:
            inside_term, outside_term = 1 - inside, outside
        losses.append(inside_term.sum() + outside_term.sum() + background)
        peaks.append(inside)
    return torch.stack(losses).mean(), torch.cat(peaks)


def sar_loss(self_maps: torch.Tensor, masks: list[torch.Tensor]) -> torch.Tensor:
    """Self-Attention Refocusing. self_maps (L, N, N) rows = queries; masks[o] bool (n_o, h, w), N = h * w.

    Per box b: the mean over its query cells of the mass on key cells outside b, ``b^T A (1 - b) / |b|``: two
    products with the (N, boxes) indicator matrix, with no gathered copy of the map. Summed over an object's boxes
    (as the official code: a counting prompt's boxes each add), averaged over objects and layers.
    """
    counts = [len(boxes) for boxes in masks]
    inside = torch.cat([boxes.flatten(1) for boxes in masks]).to(self_maps.device, self_maps.dtype).T  # (N, n)
    outside_mass = self_maps @ (1 - inside)  # (L, N, n): each query's mass outside each box
    leak = (outside_mass * inside).sum(dim=1) / inside.sum(dim=0)  # (L, n): mean over the box's queries
    per_object = torch.stack([part.sum(dim=1) for part in leak.split(counts, dim=1)], dim=1)  # (L, O)
    return per_object.mean()


# ---------------------------------------------------------------------------------------------- recording
@dataclass(frozen=True, kw_only=True)
class MapRecorder(AttentionRecorder):
    """AttentionRecorder that keeps only image-query rows and the key part a loss reads ("text" or "image")."""

    keys: str = "text"
    queries: str = "image"
    maps: list[RecordedMap] = field(default_factory=list, compare=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.keys not in ("text", "image"):
            raise ValueError(f"keys={self.keys!r} must be 'text' or 'image'")

    def record(self, call: Any, probs: torch.Tensor) -> None:
        part = call.text_keys if self.keys == "text" else call.image_keys
        if part is None:
            raise ValueError(f"MapRecorder(keys='text') covers {call.site.name}, which has no text keys")
        probs = probs[:, :, call.image_queries, part].mean(dim=1, keepdim=True)
        n = probs.shape[-1]
        text, image = (slice(0, n), slice(0, 0)) if self.keys == "text" else (None, slice(0, n))
        self.maps.append(RecordedMap(call.site, call.step, ("cond",), probs, call.grid, slice(0, probs.shape[2]),
                                     image, text))


def stack_maps(maps: list[RecordedMap]) -> tuple[torch.Tensor, tuple[int, int]]:
    """Recorded maps of one grid -> ((L, N, K) with rows of the first batch row, the grid)."""
    if not maps:
        raise ValueError("no attention map was recorded; check the refocusing layers and the branch 'cond'")
    grids = {tuple(m.grid[-2:]) for m in maps}
    if len(grids) != 1:
        raise ValueError(f"refocusing maps come from several grids {sorted(grids)}; record one resolution")
    return torch.stack([m.probs[0].mean(dim=0) for m in maps]), grids.pop()


def refocus_loss(text: list[RecordedMap], image: list[RecordedMap], layout: Layout, tokens: TokenLayout,
                 config: RefocusConfig, step: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weighted L_CAR + L_SAR from recorded maps -> (loss, CAR in-box peaks or None); ``step`` of a 50-step run."""
    loss, peaks = 0.0, None
    if "car" in config.losses:
        maps, grid = stack_maps(text)
        pm = phrase_maps(maps.mean(dim=0).float(), grid, tokens, config.softmax_scale, config.smooth_sigma)
        car, peaks = car_loss(pm, list(_cached_masks(layout, grid, pm.device)), config.gated, step)
        loss = loss + config.car_weight * car
    if "sar" in config.losses:
        maps, grid = stack_maps(image)
        loss = loss + config.sar_weight * sar_loss(maps.float(), list(_cached_masks(layout, grid, maps.device)))
    return loss, peaks


def phrase_mass(text: list[RecordedMap], layout: Layout, tokens: TokenLayout) -> torch.Tensor:
    """Per region: the share of its tokens' attention (raw probabilities, layers averaged) inside its boxes (O,)."""
    maps, grid = stack_maps(text)
    a = maps.mean(dim=0).float()[:, list(tokens.content)]  # (N, C)
    out = []
    for idx, boxes in zip(tokens.phrases, region_masks(layout, grid)):
        m = a[:, list(idx)].mean(dim=1)
        out.append(m[boxes.any(dim=0).flatten()].sum() / m.sum())
    return torch.stack(out)


def refocus_latents(forward: Any, latents: torch.Tensor, step: int, recorders: list[MapRecorder], layout: Layout,
                    tokens: TokenLayout, config: RefocusConfig,
                    num_steps: int = 50) -> tuple[torch.Tensor, list[float]]:
    """Gradient descent of the latent (1, C, h, w) at step ``step`` of ``num_steps``; returns (latent, loss per
    iteration, unscaled).

    ``forward(x)`` runs the conditional denoiser on ``x`` with ``recorders`` (a text-key and/or an image-key
    :class:`MapRecorder`) installed; gradients flow only through that call. As the official loop, each iteration
    updates ``x`` by the gradient of the scaled loss and then tests the stopping criterion, so the update of the
    iteration that meets it is still made.
    """
    by_keys = {r.keys: r for r in recorders}
    scale = (PLAIN_LOSS_SCALE if config.loss_scale is None else config.loss_scale) * config.step_size(step, num_steps)
    index = config.index(step, num_steps)
    x, history = latents.detach(), []
    for _ in range(config.max_iterations(step, num_steps)):
        for r in recorders:
            r.clear()
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            forward(x)
            text = by_keys["text"].maps if "text" in by_keys else []
            image = by_keys["image"].maps if "image" in by_keys else []
            loss, peaks = refocus_loss(text, image, layout, tokens, config, index)
            (grad,) = torch.autograd.grad(scale * loss, x)
        history.append(float(loss.detach()))
        x = x.detach() - grad.to(x.dtype)
        if config.stop(scale * history[-1], None if peaks is None else float(peaks.detach().min()), step, num_steps):
            break
    for r in recorders:
        r.clear()
    return x.detach(), history
