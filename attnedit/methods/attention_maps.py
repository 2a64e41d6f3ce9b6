"""Turn recorded attention into per-token heat maps (what a prompt word looks at), for people and losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnedit.core.checks import check_size
from attnedit.core.edits import RecordedMap


def token_heatmaps(maps: list[RecordedMap], size: tuple[int, int] | None = None) -> torch.Tensor:
    """Average image-query -> text-key attention over layers, steps, heads and rows: (T, h, w).

    Works on cross-attention maps (UNet, Wan) and on joint maps recorded with ``queries="image"`` (SD3, FLUX,
    HunyuanVideo). Maps are resized to ``size`` (default: the largest grid among them); video maps are averaged
    over frames.
    """
    bad = [(k, m) for k, m in enumerate(maps) if not isinstance(m, RecordedMap)]
    if bad:
        raise ValueError(f"maps[{bad[0][0]}]={bad[0][1]!r} is not a RecordedMap (AttentionRecorder.maps)")
    size = None if size is None else check_size("size", size)
    usable = [m for m in maps if m.text_keys is not None]
    if not usable:
        raise ValueError("no recorded map has text keys: record cross or joint attention")
    size = size or max((tuple(m.grid[-2:]) for m in usable), key=lambda g: g[0] * g[1])
    total = None
    for m in usable:
        probs = m.probs.float().mean(dim=(0, 1))  # (S_q, S_k)
        h, w = m.grid[-2:]
        frames = m.grid[0] if len(m.grid) == 3 else 1
        text = probs[m.image_queries, m.text_keys]  # (N_image, T)
        grid = text.T.reshape(-1, frames, h, w).mean(dim=1)
        grid = F.interpolate(grid[None], size=size, mode="bilinear", align_corners=False)[0]
        total = grid if total is None else total + grid
    return total / len(usable)
