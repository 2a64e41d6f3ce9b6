"""Attention refocusing: grounded text-to-image from phrases and boxes, by latent updates on attention losses.

Implements Cross-Attention Refocusing (CAR) and Self-Attention Refocusing (SAR) from Phung, Ge and Huang (2024),
"Grounded Text-to-Image Synthesis with Attention Refocusing" (CVPR 2024, arXiv:2306.05427). Before the model call
of each of the first denoising steps the noisy latent descends ``loss_scale * s_i * grad(L_CAR + L_SAR)``.

* Layout: a prompt and (phrase, boxes) pairs, boxes normalized xyxy. Phrase tokens are found with the pipeline's
  own tokenizer (sub-word aware). Joint text keys of SD3 are ``[77 CLIP tokens, T5 tokens]`` (diffusers pads the
  CLIP-L/CLIP-G features to T5 width and concatenates the sequences), so a phrase owns its CLIP positions and
  ``77 +`` its T5 positions. FLUX's text keys are its T5 tokens only (``tokenizer_2``; CLIP gives the pooled vector).
* CAR (cross maps, heads and layers averaged, Attend-and-Excite normalization: softmax of ``100 A`` over the
  prompt's content tokens, 3x3 Gaussian smoothing, sigma 0.5; a phrase's map is the mean of its tokens' maps):
  per object, ``sum_b (1 - max_{p in b} M) + max_{others' boxes} M + |B| max_{background} M / 2``; mean over objects.
* SAR (self maps): per box, the mean over its query cells of the attention mass on key cells outside the box;
  mean over boxes, objects and layers.
* Boxes are rasterized to every cell they touch, so a box never covers zero cells (the original divides by zero).
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from attnedit.core.edits import AttentionRecorder, RecordedMap

Box = tuple[float, float, float, float]
LOSSES = ("car", "sar")
MAX_BOXES = 30  # every family: GLIGEN's limit, and more boxes than cells of a 16x16 map make CAR meaningless
CLIP_TOKENS = 77


# ------------------------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class Region:
    """One phrase of the prompt and the boxes (normalized x0, y0, x1, y1) it must fill."""

    phrase: str
    boxes: tuple[Box, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.phrase, str) or not self.phrase.strip():
            raise ValueError(f"phrase={self.phrase!r} must be a non-empty string")
        boxes = self.boxes
        if boxes and isinstance(boxes[0], (int, float)):
            boxes = (boxes,)  # a single box
        boxes = tuple(tuple(float(v) for v in b) for b in boxes)
        if not boxes:
            raise ValueError(f"phrase {self.phrase!r} has no box; give at least one (x0, y0, x1, y1)")
        for b in boxes:
            if len(b) != 4 or not all(0.0 <= v <= 1.0 for v in b):
                raise ValueError(f"box {b} of {self.phrase!r} must be 4 numbers in [0, 1] (normalized x0, y0, x1, y1)")
            if b[2] <= b[0] or b[3] <= b[1]:
                raise ValueError(f"box {b} of {self.phrase!r} must have x1 > x0 and y1 > y0")
        if len(set(boxes)) != len(boxes):
            raise ValueError(f"phrase {self.phrase!r} lists the same box twice: {boxes}")
        object.__setattr__(self, "boxes", boxes)


@dataclass(frozen=True)
class Layout:
    """A prompt and its grounded phrases. ``Layout.from_json(path_or_text)`` reads
    ``{"prompt": "...", "regions": [{"phrase": "a cat", "boxes": [[0.1, 0.2, 0.5, 0.9]]}, ...]}``."""

    prompt: str
    regions: tuple[Region, ...]

    def __post_init__(self) -> None:
        regions = tuple(r if isinstance(r, Region) else Region(r[0], r[1]) for r in self.regions)
        if not regions:
            raise ValueError("layout has no region; give at least one (phrase, boxes)")
        total = sum(len(r.boxes) for r in regions)
        if total > MAX_BOXES:
            raise ValueError(f"layout has {total} boxes; at most MAX_BOXES={MAX_BOXES} are supported")
        seen: dict[Box, str] = {}
        for r in regions:
            for b in r.boxes:
                if b in seen and seen[b] != r.phrase:
                    raise ValueError(f"phrases {seen[b]!r} and {r.phrase!r} have the identical box {b}; "
                                     "their losses would contradict each other")
                seen[b] = r.phrase
        object.__setattr__(self, "regions", regions)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Layout:
        if not isinstance(data, dict) or "prompt" not in data or "regions" not in data:
            raise ValueError(f"layout must be a dict with 'prompt' and 'regions', got {str(data)[:80]!r}")
        return cls(data["prompt"], tuple(Region(r["phrase"], tuple(map(tuple, r["boxes"]))) for r in data["regions"]))

    @classmethod
    def from_json(cls, source: str | os.PathLike) -> Layout:
        """Parse JSON text, or read it from a file path."""
        text = str(source)
        if not text.lstrip().startswith("{"):
            with open(source, encoding="utf-8") as f:
                text = f.read()
        return cls.from_dict(json.loads(text))

    def to_json(self) -> str:
        regions = [{"phrase": r.phrase, "boxes": [list(b) for b in r.boxes]} for r in self.regions]
        return json.dumps({"prompt": self.prompt, "regions": regions})

    def with_phrases_in_prompt(self) -> Layout:
        """A copy whose prompt ends with every phrase it does not already contain (", phrase")."""
        missing = [r.phrase for r in self.regions if r.phrase.lower() not in self.prompt.lower()]
        return Layout(", ".join([self.prompt, *missing]), self.regions) if missing else self


# ------------------------------------------------------------------------------------------------- tokens
def phrase_positions(tokenizer: Any, prompt: str, phrase: str, max_length: int | None = None) -> list[int]:
    """Positions of ``phrase``'s tokens in the tokenized ``prompt`` (specials included, as the encoder sees it)."""
    limit = max_length or tokenizer.model_max_length
    ids = tokenizer(prompt, truncation=True, max_length=limit).input_ids
    sub = tokenizer(phrase, add_special_tokens=False).input_ids
    for start in range(len(ids) - len(sub) + 1):
        if sub and ids[start:start + len(sub)] == sub:
            return list(range(start, start + len(sub)))
    raise ValueError(f"phrase {phrase!r} is not in the prompt {prompt!r} (tokens {sub} not found in "
                     f"{ids[:limit]}); fix the phrase or pass append_missing=True")


def content_positions(tokenizer: Any, prompt: str, max_length: int | None = None) -> list[int]:
    """Positions of the prompt's own tokens (no BOS/EOS/padding)."""
    limit = max_length or tokenizer.model_max_length
    ids = tokenizer(prompt, truncation=True, max_length=limit).input_ids
    specials = set(tokenizer.all_special_ids)
    return [i for i, t in enumerate(ids) if t not in specials]


@dataclass(frozen=True)
class TokenLayout:
    """Text-key positions the losses read: the prompt's content tokens and each phrase's tokens among them."""

    content: tuple[int, ...]  # text-key positions, softmax-normalized together
    phrases: tuple[tuple[int, ...], ...]  # per region: indices into ``content``


def token_layout(pipe: Any, layout: Layout, max_sequence_length: int = 256) -> TokenLayout:
    """Phrase positions among the denoiser's text keys (SD/SDXL: CLIP tokenizer 1; SD3: CLIP then 77 (the CLIP length) + T5;
    FLUX: T5, ``tokenizer_2``)."""
    transformer = getattr(pipe, "transformer", None)
    if transformer is not None and _is_flux(transformer):
        groups = [(pipe.tokenizer_2, 0, max_sequence_length)]
    else:
        groups = [(pipe.tokenizer, 0, None)]
        if transformer is not None and getattr(pipe, "tokenizer_3", None) is not None \
                and getattr(pipe, "text_encoder_3", None) is not None:
            # T5 keys follow the CLIP tokens: 77 for real SD3, the CLIP tokenizer's length in general (shapes-dit: 24)
            groups.append((pipe.tokenizer_3, getattr(pipe, "tokenizer_max_length", CLIP_TOKENS), max_sequence_length))
    content: list[int] = []
    phrases: list[list[int]] = [[] for _ in layout.regions]
    for tokenizer, offset, limit in groups:
        content += [offset + p for p in content_positions(tokenizer, layout.prompt, limit)]
        for i, region in enumerate(layout.regions):
            phrases[i] += [offset + p for p in phrase_positions(tokenizer, layout.prompt, region.phrase, limit)]
    index = {p: i for i, p in enumerate(content)}
    return TokenLayout(tuple(content), tuple(tuple(index[p] for p in ph) for ph in phrases))


def _is_flux(model: Any) -> bool:
    from attnedit.core.families import FAMILIES

    model = getattr(model, "_orig_mod", model)
    return any(cls.__name__ == FAMILIES["flux"].model_class for cls in type(model).__mro__)


# -------------------------------------------------------------------------------------------------- boxes
def box_mask(box: Box, grid: tuple[int, int]) -> torch.Tensor:
    """Bool (h, w): the cells ``box`` touches (at least one, so no box is ever empty)."""
    h, w = grid
    eps = 1e-6
    x0, x1 = math.floor(box[0] * w + eps), math.ceil(box[2] * w - eps)
    y0, y1 = math.floor(box[1] * h + eps), math.ceil(box[3] * h - eps)
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
def gaussian_smooth(maps: torch.Tensor, sigma: float = 0.5, size: int = 3) -> torch.Tensor:
    """Smooth (C, h, w) maps with a ``size`` x ``size`` Gaussian (reflect padding, as Attend-and-Excite)."""
    x = torch.arange(size, dtype=maps.dtype, device=maps.device) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = (g[:, None] * g[None, :]) / g.sum() ** 2
    pad = size // 2
    padded = F.pad(maps[:, None], (pad,) * 4, mode="reflect") if min(maps.shape[-2:]) > pad else \
        F.pad(maps[:, None], (pad,) * 4, mode="replicate")
    return F.conv2d(padded, kernel[None, None])[:, 0]


def phrase_maps(text: torch.Tensor, grid: tuple[int, int], tokens: TokenLayout, softmax_scale: float = 100.0,
                sigma: float = 0.5) -> torch.Tensor:
    """Normalized phrase maps (O, h, w) from image->text attention ``text`` (N, T), N = h * w."""
    a = (softmax_scale * text[:, list(tokens.content)]).softmax(dim=-1)  # (N, C)
    a = gaussian_smooth(a.T.reshape(-1, *grid), sigma) if sigma > 0 else a.T.reshape(-1, *grid)
    return torch.stack([a[list(idx)].mean(dim=0) for idx in tokens.phrases])


def _masked_max(m: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return m[mask].max() if mask.any() else m.new_zeros(())


def car_loss(maps: torch.Tensor, masks: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-Attention Refocusing. maps (O, h, w), masks[o] bool (n_o, h, w) -> (loss, in-box peaks (sum n_o,))."""
    union = [m.any(dim=0) for m in masks]
    anywhere = torch.stack(union).any(dim=0)
    losses, peaks = [], []
    for o, m in enumerate(maps):
        inside = torch.stack([_masked_max(m, b) for b in masks[o]])
        others = torch.stack([u for i, u in enumerate(union) if i != o]).any(dim=0) & ~union[o] if len(masks) > 1 \
            else torch.zeros_like(union[o])
        background = _masked_max(m, ~anywhere) * len(masks[o]) / 2
        losses.append((1 - inside).sum() + _masked_max(m, others) + background)
        peaks.append(inside)
    return torch.stack(losses).mean(), torch.cat(peaks)


def sar_loss(self_maps: torch.Tensor, masks: list[torch.Tensor]) -> torch.Tensor:
    """Self-Attention Refocusing. self_maps (L, N, N) rows = queries; masks[o] bool (n_o, h, w), N = h * w.

    Per box b: the mean over its query cells of the mass on key cells outside b, ``b^T A (1 - b) / |b|``: two
    products with the (N, boxes) indicator matrix, with no gathered copy of the map.
    """
    counts = [len(boxes) for boxes in masks]
    inside = torch.cat([boxes.flatten(1) for boxes in masks]).to(self_maps.device, self_maps.dtype).T  # (N, n)
    outside_mass = self_maps @ (1 - inside)  # (L, N, n): each query's mass outside each box
    leak = (outside_mass * inside).sum(dim=1) / inside.sum(dim=0)  # (L, n): mean over the box's queries
    per_object = [part.mean() for part in leak.split(counts, dim=1)]  # mean over layers and the object's boxes
    return torch.stack(per_object).mean()


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


# --------------------------------------------------------------------------------------------- schedule
@dataclass(frozen=True, kw_only=True)
class RefocusConfig:
    """Loss selection and the latent-update schedule. Defaults follow the authors' code (for 50 steps).

    The gradient forward runs only up to the last recorded attention call (``prefix_only``): the rest of the
    network cannot change the maps, so neither its forward nor its backward is paid for. ``single_stream`` also
    records FLUX's single-stream blocks (the prefix then runs through them). ``gradient_checkpointing=None``
    checkpoints FLUX's blocks (a 12B transformer) and no other model's; True or False forces it.

    Step i (0-based) of the first ``refocus_steps`` gets up to ``iterations(i)`` updates
    ``x <- x - loss_scale * step_size(i) * grad``: step size 4 for i < 5, 3 for i < 20, then 1; 5 iterations for
    i < 5, then 1. Iterations stop early once the loss is below ``loss_threshold`` or every box's CAR peak reaches
    ``peak_threshold``. ``loss_scale=40`` is the authors' advice for plain (not GLIGEN) Stable Diffusion.
    """

    losses: tuple[str, ...] = LOSSES
    refocus_steps: int = 25
    step_sizes: tuple[tuple[int, float], ...] = ((5, 4.0), (20, 3.0), (1 << 30, 1.0))  # (until step, size)
    iterations: tuple[tuple[int, int], ...] = ((5, 5), (1 << 30, 1))  # (until step, max inner iterations)
    loss_scale: float = 40.0
    car_weight: float = 1.0
    sar_weight: float = 1.0
    loss_threshold: float = 0.1
    peak_threshold: float = 0.2
    softmax_scale: float = 100.0
    smooth_sigma: float = 0.5
    layers: frozenset[int] | None = None  # cross/self (UNet) or joint (SD3, FLUX) layer indices; None: by family
    single_stream: bool = False  # FLUX: record the single-stream blocks too (default: double-stream blocks only)
    prefix_only: bool = True  # stop the gradient forward after the last recorded attention call
    gradient_checkpointing: bool | None = None  # None: on for FLUX (a 12B transformer), off otherwise

    def __post_init__(self) -> None:
        losses = (self.losses,) if isinstance(self.losses, str) else tuple(self.losses)
        if not losses or not set(losses) <= set(LOSSES):
            raise ValueError(f"losses={self.losses!r} must be a non-empty subset of {LOSSES}")
        object.__setattr__(self, "losses", losses)
        if self.refocus_steps < 0:
            raise ValueError(f"refocus_steps={self.refocus_steps} must be >= 0")
        if self.loss_scale <= 0 or self.softmax_scale <= 0:
            raise ValueError(f"loss_scale={self.loss_scale} and softmax_scale={self.softmax_scale} must be > 0")
        for name in ("step_sizes", "iterations"):
            table = getattr(self, name)
            if not table or any(a >= b for (a, _), (b, _) in itertools.pairwise(table)):
                raise ValueError(f"{name}={table} must be (until_step, value) pairs with increasing steps")
        if self.layers is not None:
            object.__setattr__(self, "layers", frozenset(self.layers))

    @staticmethod
    def _lookup(table: tuple[tuple[int, Any], ...], step: int) -> Any:
        return next((v for until, v in table if step < until), table[-1][1])

    def step_size(self, step: int) -> float:
        return float(self._lookup(self.step_sizes, step))

    def max_iterations(self, step: int) -> int:
        return int(self._lookup(self.iterations, step))


def refocus_loss(text: list[RecordedMap], image: list[RecordedMap], layout: Layout, tokens: TokenLayout,
                 config: RefocusConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weighted L_CAR + L_SAR from recorded maps -> (loss, CAR in-box peaks or None)."""
    loss, peaks = 0.0, None
    if "car" in config.losses:
        maps, grid = stack_maps(text)
        pm = phrase_maps(maps.mean(dim=0).float(), grid, tokens, config.softmax_scale, config.smooth_sigma)
        car, peaks = car_loss(pm, list(_cached_masks(layout, grid, pm.device)))
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
                    tokens: TokenLayout, config: RefocusConfig) -> tuple[torch.Tensor, list[float]]:
    """Gradient descent of the latent (1, C, h, w) at denoising step ``step``; returns (latent, loss per iteration).

    ``forward(x)`` runs the conditional denoiser on ``x`` with ``recorders`` (a text-key and/or an image-key
    :class:`MapRecorder`) installed; gradients flow only through that call.
    """
    by_keys = {r.keys: r for r in recorders}
    size = config.loss_scale * config.step_size(step)
    x, history = latents.detach(), []
    for _ in range(config.max_iterations(step)):
        for r in recorders:
            r.clear()
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            forward(x)
            text = by_keys["text"].maps if "text" in by_keys else []
            image = by_keys["image"].maps if "image" in by_keys else []
            loss, peaks = refocus_loss(text, image, layout, tokens, config)
            history.append(float(loss.detach()))
            if history[-1] < config.loss_threshold or (peaks is not None and bool(peaks.min() >= config.peak_threshold)):
                break
            (grad,) = torch.autograd.grad(loss, x)
        x = x.detach() - size * grad.to(x.dtype)
    for r in recorders:
        r.clear()
    return x.detach(), history
