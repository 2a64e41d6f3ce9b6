"""Geometry of DesignEdit: fitting images into the model, masks at latent resolution, object layers and moves.

Images keep their aspect ratio: resized so the long side is the model's resolution, padded with replicated
edges to the model's multiple, cropped and resized back at the end (:class:`Canvas`). Objects are cut, rescaled
or flipped in pixel space (:func:`paste_object`), as the paper recommends, and moved by integer latent offsets
(:func:`shift`) when fused.
"""

from __future__ import annotations

import math
import os
import reprlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from attnedit.core.checks import check_int, check_real, check_size, is_int
from attnedit.methods.key_masking import check_mask


@dataclass(frozen=True)
class Canvas:
    """Aspect-preserving fit of an ``size=(H, W)`` image into the model: resize to ``inner``, pad to ``padded``."""

    size: tuple[int, int]
    inner: tuple[int, int]
    padded: tuple[int, int]

    @classmethod
    def fit(cls, size: tuple[int, int], long_side: int, multiple: int) -> Canvas:
        size = check_size("size", size)
        long_side, multiple = check_int("long_side", long_side, 1), check_int("multiple", multiple, 1)
        scale = long_side / max(size)
        inner = tuple(max(1, round(s * scale)) for s in size)
        return cls(tuple(size), inner, tuple(math.ceil(s / multiple) * multiple for s in inner))

    def _pad(self, x: torch.Tensor, mode: str) -> torch.Tensor:
        pad = (0, self.padded[1] - self.inner[1], 0, self.padded[0] - self.inner[0])
        return F.pad(x, pad, mode=mode) if mode == "replicate" else F.pad(x, pad)

    def image(self, x: torch.Tensor) -> torch.Tensor:
        """(3, H, W) in [-1, 1] -> (1, 3, *padded), edges replicated into the padding."""
        small = F.interpolate(x[None], size=self.inner, mode="bilinear", antialias=True, align_corners=False)
        return self._pad(small, "replicate")

    def mask(self, mask: torch.Tensor) -> torch.Tensor:
        """Bool (H, W) -> float coverage (*padded) in [0, 1], zero in the padding."""
        small = F.interpolate(mask[None, None].float(), size=self.inner, mode="area")
        return self._pad(small, "constant")[0, 0]

    def restore(self, x: torch.Tensor) -> torch.Tensor:
        """(1, C, *padded) -> (C, H, W) at the source size (padding cropped, resized back)."""
        x = x[..., : self.inner[0], : self.inner[1]].float().cpu()
        return F.interpolate(x, size=self.size, mode="bilinear", antialias=True, align_corners=False)[0]


def to_pil(x: torch.Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] -> PIL RGB image."""
    return Image.fromarray(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy())


@dataclass
class Layer:
    """An object layer: inverted trajectory ``latents[i]`` (1, C, h, w), latent mask (1, 1, h, w), offset (dy, dx)."""

    latents: list[torch.Tensor]
    mask: torch.Tensor
    offset: tuple[int, int] = (0, 0)


def load_image(image: Any) -> torch.Tensor:
    """(3, H, W) float in [-1, 1] from a path, PIL image or uint8 array (H, W, 3); gray (H, W) / (H, W, 1) and
    RGBA (H, W, 4) arrays are converted to RGB, as PIL converts their images."""
    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as opened:
                image = opened.convert("RGB").copy()
        except (OSError, Image.DecompressionBombError) as error:  # missing, not an image, truncated, a bomb
            raise ValueError(f"image={str(image)!r} cannot be read: {error}") from None
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and 0 not in image.shape and (
            image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (1, 4))):
        image = Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image)
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        got = f"an array of shape {image.shape} and dtype {image.dtype}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"image must be a path, PIL image or uint8 (H, W, 3) array, got {got}")
    if 0 in image.shape:
        raise ValueError(f"image of size {image.shape[1]}x{image.shape[0]} (WxH) is empty")
    return torch.from_numpy(image.copy()).permute(2, 0, 1).float() / 127.5 - 1.0


def shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Translate the last two axes by (dy, dx) without wrapping; vacated cells are 0."""
    out = torch.zeros_like(x)
    h, w = x.shape[-2:]
    out[..., max(dy, 0): h + min(dy, 0), max(dx, 0): w + min(dx, 0)] = x[..., max(-dy, 0): h - max(dy, 0), max(-dx, 0): w - max(dx, 0)]
    return out


def bbox(mask: torch.Tensor) -> tuple[int, int, int, int]:
    """(y0, x0, y1, x1), end exclusive, of a non-empty bool (H, W) mask."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    if not len(ys):
        raise ValueError("mask is empty: it has no bounding box")
    return int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1


def paste_object(image: torch.Tensor, mask: torch.Tensor, scale: float = 1.0, flip: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut the masked object out of (3, H, W) ``image``, rescale/flip it about its box centre, paste it back.

    Returns the composite image (3, H, W) and the object's new bool mask (H, W); ValueError when it leaves the canvas.
    """
    check_real("scale", scale, 0.0, low_open=True)
    if flip not in (None, "h", "v"):
        raise ValueError(f"flip={flip!r} must be None, 'h' or 'v'")
    y0, x0, y1, x1 = bbox(mask)
    crop, cmask = image[:, y0:y1, x0:x1], mask[y0:y1, x0:x1].float()
    if flip is not None:
        dims = {"h": [-1], "v": [-2]}[flip]
        crop, cmask = crop.flip(dims), cmask.flip(dims)
    size = (max(1, round((y1 - y0) * scale)), max(1, round((x1 - x0) * scale)))
    crop = F.interpolate(crop[None], size=size, mode="bilinear", antialias=scale < 1, align_corners=False)[0]
    cmask = F.interpolate(cmask[None, None], size=size, mode="nearest")[0, 0] > 0.5
    top, left = round((y0 + y1 - size[0]) / 2), round((x0 + x1 - size[1]) / 2)
    h, w = mask.shape
    if top < 0 or left < 0 or top + size[0] > h or left + size[1] > w:
        raise ValueError(f"scale={scale} makes the object {size[1]}x{size[0]} px at ({left}, {top}), outside the {w}x{h} canvas")
    out, new_mask = image.clone(), torch.zeros_like(mask)
    region = out[:, top: top + size[0], left: left + size[1]]
    region[:] = torch.where(cmask, crop, region)
    new_mask[top: top + size[0], left: left + size[1]] = cmask
    return out, new_mask


@dataclass(frozen=True)
class ObjectLayer:
    """One object for :meth:`DesignEditor.compose`: its image, its mask there, and a move (dx, dy) in px."""

    image: Any
    mask: Any
    dx: int = 0
    dy: int = 0


def fit_to(image: torch.Tensor, mask: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit (3, h, w) ``image`` and its bool mask into ``size=(H, W)``: scale to fit, centre, replicate edges."""
    size = check_size("size", size)
    if tuple(image.shape[-2:]) == tuple(size):
        return image, mask
    h, w = image.shape[-2:]
    scale = min(size[0] / h, size[1] / w)
    inner = (max(1, round(h * scale)), max(1, round(w * scale)))
    top, left = (size[0] - inner[0]) // 2, (size[1] - inner[1]) // 2
    pad = (left, size[1] - inner[1] - left, top, size[0] - inner[0] - top)
    image = F.pad(F.interpolate(image[None], size=inner, mode="bilinear", antialias=True), pad, mode="replicate")[0]
    mask = F.pad(F.interpolate(mask[None, None].float(), size=inner, mode="nearest"), pad)[0, 0] > 0.5
    return image, check_mask(mask, "layer mask after fitting")


def check_pixels(**values: Any) -> None:
    """ValueError unless every value (a dilation, a move) is an integer number of pixels; dilations are >= 0."""
    for name, value in values.items():
        if not is_int(value) or ("dilation" in name and value < 0):
            kind = "a non-negative integer" if "dilation" in name else "an integer"
            raise ValueError(f"{name}={value!r} must be {kind} number of pixels")


def check_move(mask: torch.Tensor, dx: int, dy: int) -> None:
    """ValueError when moving the object of bool (H, W) ``mask`` by (dx, dy) px takes it outside the canvas."""
    h, w = mask.shape
    y0, x0, y1, x1 = bbox(mask)
    if x0 + dx < 0 or x1 + dx > w or y0 + dy < 0 or y1 + dy > h:
        raise ValueError(f"move dx={dx}, dy={dy} takes the object (x {x0}..{x1}, y {y0}..{y1}) outside the {w}x{h} canvas")


def object_layers(layers: Any) -> list[ObjectLayer]:
    """``compose``'s layers as :class:`ObjectLayer` s: each one, or a tuple ``(image, mask[, dx[, dy]])``."""
    if not isinstance(layers, (list, tuple)):
        raise ValueError(f"layers={reprlib.repr(layers)} must be a list of ObjectLayer or (image, mask, dx, dy) tuples")  # noqa: TRY004
    if not layers:
        raise ValueError("layers=[] gives nothing to compose; pass at least one ObjectLayer")
    out = []
    for k, spec in enumerate(layers):
        if isinstance(spec, (tuple, list)) and 2 <= len(spec) <= 4:
            spec = ObjectLayer(*spec)
        if not isinstance(spec, ObjectLayer):
            raise ValueError(f"layers[{k}]={reprlib.repr(spec)} must be an ObjectLayer or a tuple (image, mask[, dx[, dy]])")  # noqa: TRY004
        check_pixels(**{f"layers[{k}].dx": spec.dx, f"layers[{k}].dy": spec.dy})
        out.append(spec)
    return out
