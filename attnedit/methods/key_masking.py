"""Key masking in self-attention, the inpainting mechanism of DesignEdit.

Implements the key-masked self-attention of Jia et al., "DesignEdit: Multi-Layered Latent Decomposition and
Fusion for Unified & Accurate Image Editing" (arXiv:2403.14487, AAAI 2025):

    Attn = softmax(Q ((1 - M) * K)^T / sqrt(d)) V

Keys inside the (dilated) removal mask M are suppressed for every query, so the region is re-synthesised from
its surroundings by the model's own self-attention. ``mode="soft"`` is the paper's form ((1 - M) * K: masked
keys keep a logit of 0); ``mode="hard"`` (default) gives masked keys a -inf logit, so they receive exactly zero
attention weight (the stricter variant of later work, better for removal).

This module turns user masks into that edit:

* :func:`load_mask` reads a PIL image, numpy array, tensor, file path or box ``(x0, y0, x1, y1)`` and binarizes
  it: a pixel is masked when its value, scaled to [0, 1] (8-bit images are divided by 255), is **> threshold**
  (default 0.5, i.e. > 127 for 8-bit masks). Colour masks are averaged over channels first.
* :func:`dilate_kernel` dilates with a ``k`` x ``k`` kernel, the paper's ``attend_scale`` (a 20 px kernel grows a
  24 px box to 43 px); :func:`dilate_mask` grows by a radius (``2 r + 1`` kernel).
* :class:`DesignKeyMask` is the core :class:`~attnedit.core.edits.KeyMask` restricted to self-attention and the
  conditional branch by default; it resamples the mask to each attention grid once (a per-key vector of the
  share of each key's cell inside the mask, never S x S) and is exactly a no-op when the mask hides no key.

>>> edit = DesignKeyMask.from_mask(load_mask((8, 8, 40, 40), size=(64, 64)), dilation=4, steps=(1, 40))
>>> with install(pipe, edit):                    # a stock SD pipeline: its CFG batch is [uncond, cond]  # doctest: +SKIP
...     image = pipe("", height=64, width=64).images[0]
>>> with install(pipe.unet, edit) as handle, handle.branches("uncond", "cond"):   # your own loop  # doctest: +SKIP
...     eps = pipe.unet(torch.cat([z, z]), t, encoder_hidden_states=torch.cat([emb, emb])).sample
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Union

import numpy as np
import torch
import torch.nn.functional as F

from attnedit.core.checks import as_mask, check_real, check_size
from attnedit.core.edits import KeyMask, mask_coverage

if TYPE_CHECKING:
    from attnedit.core.families import AttentionCall

MaskLike = Union[str, os.PathLike, "np.ndarray", torch.Tensor, Any, tuple, list]


def box_mask(box: tuple[int, int, int, int] | list[int], size: tuple[int, int]) -> torch.Tensor:
    """Bool ``(H, W)`` mask of the pixel box ``(x0, y0, x1, y1)`` (x1, y1 exclusive) on an image of ``size=(H, W)``."""
    if not isinstance(box, (tuple, list)) or len(box) != 4 or not all(isinstance(v, (int, np.integer)) for v in box):
        raise ValueError(f"box={box!r} must be four integers (x0, y0, x1, y1) in pixels")
    x0, y0, x1, y1 = (int(v) for v in box)
    h, w = check_size("size", size)
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
        raise ValueError(f"box={box!r} must satisfy 0 <= x0 < x1 <= {w} and 0 <= y0 < y1 <= {h} (image {w}x{h})")
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[y0:y1, x0:x1] = True
    return mask


def _to_array(mask: Any) -> np.ndarray:
    """Float array in [0, 1], (H, W), from a path, PIL image, numpy array or tensor."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(mask, (str, os.PathLike)):
        try:
            with Image.open(mask) as image:
                mask = image.convert("L").copy()
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as error:
            raise ValueError(f"mask={str(mask)!r} cannot be read as an image: {error}") from None
    if isinstance(mask, Image.Image):
        return np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    if not isinstance(mask, np.ndarray):
        raise ValueError(f"mask of type {type(mask).__name__} is not a path, PIL image, array, tensor or box")  # noqa: TRY004
    if mask.dtype.kind not in "biuf":
        raise ValueError(f"mask= is an array of {mask.dtype}; give bool, integer or float values")
    array = mask.astype(np.float32)
    if mask.dtype == np.uint8 or (mask.dtype.kind in "iu" and array.max(initial=0) > 1):
        array = array / 255.0
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim == 3:  # (H, W, C) colour mask
        array = array.mean(axis=-1)
    if array.ndim != 2:
        raise ValueError(f"mask array has shape {mask.shape}; expected (H, W), (1, H, W) or (H, W, C)")
    as_mask(array, "mask", (2,))  # non-empty, finite, in [0, 1]
    return array


def load_mask(mask: MaskLike, size: tuple[int, int], threshold: float = 0.5) -> torch.Tensor:
    """Bool ``(H, W)`` mask (True = edit here) for an image of ``size=(H, W)``.

    ``mask`` is a path, PIL image, numpy array, tensor or box ``(x0, y0, x1, y1)``; values are scaled to [0, 1]
    (8-bit: / 255) and a pixel is masked when its value is > ``threshold``. The mask must have the image's size.
    """
    check_real("threshold", threshold, 0.0, 1.0, high_open=True)
    size = check_size("size", size)
    if isinstance(mask, (tuple, list)):
        return box_mask(mask, size)
    array = _to_array(mask)
    if tuple(array.shape) != tuple(size):
        raise ValueError(
            f"mask size {array.shape[1]}x{array.shape[0]} (WxH) does not match the image size {size[1]}x{size[0]}"
        )
    return torch.from_numpy(array > threshold)


def dilate_mask(mask: torch.Tensor, px: int) -> torch.Tensor:
    """Grow a bool ``(H, W)`` mask by ``px`` pixels in every direction (square neighbourhood); ``px=0`` copies."""
    if not isinstance(px, (int, np.integer)) or px < 0:
        raise ValueError(f"dilation={px!r} must be a non-negative integer number of pixels")
    return dilate_kernel(mask, 2 * int(px) + 1)


def dilate_kernel(mask: torch.Tensor, size: int) -> torch.Tensor:
    """Dilate a bool ``(H, W)`` mask with a ``size`` x ``size`` square kernel, as ``cv2.dilate(m, ones((k, k)))``.

    This is the paper's ``attend_scale``: a kernel of ``size`` px grows a mask by ``size - 1`` px in all (anchor at
    the kernel centre, ``size // 2`` before and the rest after). ``size`` 0 or 1 copies.
    """
    if not isinstance(size, (int, np.integer)) or size < 0:
        raise ValueError(f"dilation={size!r} must be a non-negative integer number of pixels")
    mask = as_mask(mask, "mask", (2,))
    if size <= 1:
        return mask.clone()
    size = min(int(size), 2 * max(mask.shape) + 1)  # a larger kernel covers the whole mask all the same
    before = int(size) // 2
    padded = F.pad(mask[None, None].float(), (before, size - 1 - before, before, size - 1 - before))
    return F.max_pool2d(padded, kernel_size=int(size), stride=1)[0, 0] > 0


def check_mask(mask: torch.Tensor, name: str = "mask") -> torch.Tensor:
    """Raise ValueError for an empty or full bool mask (nothing to edit / nothing to fill from)."""
    if not isinstance(mask, torch.Tensor) or mask.numel() == 0:
        raise ValueError(f"{name}= must be a bool (H, W) tensor, got {type(mask).__name__}")
    covered = float(mask.float().mean())
    if covered == 0.0:
        raise ValueError(f"{name} is empty (no pixel above the threshold): nothing to edit")
    if covered == 1.0:
        raise ValueError(f"{name} covers the whole image: no unmasked pixel is left to fill it from")
    return mask


@dataclass(frozen=True, kw_only=True)
class DesignKeyMask(KeyMask):
    """:class:`KeyMask` for DesignEdit: self-attention keys of the conditional branch, one cached vector per grid.

    ``mask`` is ``(H, W)`` in [0, 1] at any resolution of the image's aspect ratio (True/1 = suppress). Per
    attention grid each key gets the share of its cell inside the mask (area average, as the original's resize of
    the mask to every grid): ``mode="soft"`` scales the key by (1 - share), fractional at the edges as in the
    released code; ``mode="hard"`` hides a key when its share is above ``threshold`` (default 0: any part of its
    cell inside), so a thin or non-aligned object never drops out of a coarse grid. Calls where the mask hides no
    key, or (hard mode) every key, are left untouched, so an empty mask is exactly no edit.
    """

    kinds: frozenset[str] | None = frozenset({"self"})
    branches: frozenset[str] | None = frozenset({"cond"})
    threshold: float = 0.0
    _grids: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mask.ndim != 2:
            raise ValueError(f"DesignKeyMask takes an (H, W) image mask, got shape {tuple(self.mask.shape)}")

    @classmethod
    def from_mask(cls, mask: torch.Tensor, dilation: int = 20, **kwargs: Any) -> DesignKeyMask:
        """Edit from a bool pixel mask ``(H, W)``, grown by a ``dilation`` px square kernel (``attend_scale``)."""
        return cls(mask=dilate_kernel(as_mask(mask, "mask", (2,)).bool(), dilation), **kwargs)

    def _share(self, call: AttentionCall) -> torch.Tensor | None:
        """Float (S_k,) share of each key inside the mask, or None where the call needs no edit (cached per grid)."""
        key = (call.grid, call.num_keys, call.image_keys.start, str(call.device))
        if key not in self._grids:
            share = torch.zeros(call.num_keys)
            share[call.image_keys] = mask_coverage(self.mask.float(), call.grid).flatten()
            hidden = int((share > self.threshold).sum())
            self._grids[key] = share.to(call.device) if 0 < hidden < call.num_keys else None
        return self._grids[key]

    def key_keep(self, call: AttentionCall) -> torch.Tensor | None:
        share = self._share(call)
        return None if share is None or self.mode == "soft" else (share <= self.threshold)[None]

    def key_scale(self, call: AttentionCall) -> torch.Tensor | None:
        share = self._share(call)
        return None if share is None or self.mode == "hard" else (1 - share).to(call.dtype)[None]

    def __repr__(self) -> str:
        return f"DesignKeyMask(mask={tuple(self.mask.shape)}, mode={self.mode!r}, steps={self.steps}, branches={sorted(self.branches or [])})"
