"""Key masking for video: per-frame removal masks mapped to latent frames and dilated in space and time.

DesignEdit's key masking (Jia et al. 2024, :mod:`attnedit.methods.key_masking`) hides the keys of a removed region
from every query, so the model fills it from its surroundings. In a video transformer every query also sees the
keys of every other frame: a moving object hidden in its own frame would still be copied in from a neighbour's
keys. So the hole of each latent frame is the union of its pixel frames' masks (a causal video VAE packs pixel
frame 0 alone into latent frame 0, then ``temporal`` pixel frames into each latent frame after it), grown by
``dilation`` pixels, and the key mask is that hole grown by ``temporal_dilation`` latent frames either way.

>>> index = latent_frame_index(9, 4)        # Wan's VAE: 9 pixel frames -> 3 latent frames
>>> index.tolist()
[0, 1, 1, 1, 1, 2, 2, 2, 2]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from attnedit.core.edits import KeyMask, mask_coverage
from attnedit.methods.key_masking import dilate_mask

if TYPE_CHECKING:
    from attnedit.core.families import AttentionCall


def latent_frame_index(frames: int, temporal: int) -> torch.Tensor:
    """Long ``(frames,)``: the latent frame each pixel frame is encoded into by a causal VAE compressing ``temporal``x."""
    if frames < 1 or temporal < 1:
        raise ValueError(f"frames={frames} and temporal={temporal} must be positive")
    f = torch.arange(frames)
    return torch.where(f == 0, 0, (f - 1) // temporal + 1)


def latent_hole(masks: torch.Tensor, temporal: int, grid: tuple[int, int], dilation: int = 0) -> torch.Tensor:
    """Float ``(F_lat, h, w)`` in [0, 1]: each latent cell's share covered by the hole of its latent frame.

    ``masks`` is bool ``(F, H, W)`` per pixel frame with ``F = 1 + temporal * k``; each is grown by ``dilation``
    pixels, then the frames of one latent frame are OR-ed and area-resampled to ``grid=(h, w)``.
    """
    index = latent_frame_index(masks.shape[0], temporal)
    grown = torch.stack([dilate_mask(m, dilation) for m in masks]) if dilation else masks.bool()
    latent = [grown[index == j].any(dim=0) for j in range(int(index[-1]) + 1)]
    return torch.stack([mask_coverage(m.float(), grid) for m in latent])


def dilate_time(hole: torch.Tensor, frames: int) -> torch.Tensor:
    """``(F, h, w)`` with each frame's hole OR-ed (max) with the ``frames`` frames before and after it."""
    if frames <= 0:
        return hole.clone()
    return F.max_pool1d(hole.permute(1, 2, 0).flatten(0, 1)[:, None], 2 * frames + 1, stride=1,
                        padding=frames)[:, 0].view(*hole.shape[1:], -1).permute(2, 0, 1).contiguous()


@dataclass(frozen=True, kw_only=True)
class VideoKeyMask(KeyMask):
    """:class:`KeyMask` over a ``(F_tok, h, w)`` mask of token frames: a key is hidden when any of its cell is covered
    (``threshold`` 0), the per-key vector cached per grid. Calls where it hides no key are left untouched."""

    threshold: float = 0.0
    _keys: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mask.ndim != 3:
            raise ValueError(f"VideoKeyMask takes a (frames, h, w) mask, got shape {tuple(self.mask.shape)}")

    def key_keep(self, call: AttentionCall) -> torch.Tensor | None:
        ident = (call.grid, call.num_keys, call.image_keys.start, str(call.device))
        if ident not in self._keys:
            keep = (self.coverage(call) <= self.threshold)[None]
            self._keys[ident] = None if bool(keep.all()) else keep
        return self._keys[ident] if self.mode == "hard" else None

    def __repr__(self) -> str:
        return f"VideoKeyMask(mask={tuple(self.mask.shape)}, mode={self.mode!r}, steps={self.steps}, branches={sorted(self.branches or [])})"
