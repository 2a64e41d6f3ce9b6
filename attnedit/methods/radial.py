"""Radial attention: O(n log n) block-sparse attention for video diffusion transformers.

Implements the static mask of Li et al., "Radial Attention: O(n log n) Sparse Attention with Energy Decay for
Long Video Generation" (MIT Han Lab, NeurIPS 2025), with the block rule of the authors' released code
(mit-han-lab/radial-attention, ``radial_attn/attn_mask.py``):

* ``f`` latent frames of ``s`` tokens each (frame-major); frame distance ``d = |i - j|``;
* ``d <= 1``: the frame pair is dense;
* ``d >= 2``: token ``k`` of frame i sees token ``l`` of frame j when ``|k - l| <= max(gamma * P / 2^(r+1), block)``
  with ``r = floor(log2 d)``, ``P = 2^bitlength(s)`` and ``gamma`` the decay factor;
* far frames are thinned: when ``P / 2^(r+1) < T`` the pair is kept only if ``d`` is a multiple of
  ``T * 2^(r+1) / P``. The released code hard-codes ``T = 128`` whatever the block size (Wan 2.2 runs blocks of 64
  against it); ``thinning_width`` sets T, and None means T = the block size (the same at the released 128);
* optional attention sink: every token sees all of frame 0 (Wan);
* each frame pair is rounded to ``block x block`` blocks (a block is kept when more than 60% of its non-empty key
  columns have more than a third of their queries active) and the pairs are OR-ed into one block mask.

Where frames do not tile the blocks, attnedit differs from the released builder, on purpose. The released code
(which asserts nothing about ``s * f``) sizes its table as ``floor(S / block)`` blocks, cuts each rounded pair to
whole blocks, and divides a column's active queries by the block size even where a frame fills only part of the
block. So when the video does not fill its last block, a frame pair that reaches into it does not fit and the
builder raises a shape error (Wan 480p, 21 x 1560, and 720p, 21 x 3600 tokens; Wan 2x length, 41 x 3600); when
text tokens make the table long enough (HunyuanVideo 720p, 30 x 3600 + text), the video-video table ends at
``floor(108000 / 128) = 843`` blocks and the last 96 video keys are never seen by a video query. attnedit sizes the
table by ``ceil``, places every pair at its in-block offset, and judges a partly filled block by the frame's own
rows in it (else a frame of under block/3 tokens, or a short last block, loses even its diagonal block and a query
block sees no key). That is a fix: every token is a key of its own query block, any resolution runs. Where frames
tile the blocks (768x1280: 3840 = 30 x 128) the masks are the released ones, bit for bit; elsewhere the density
moves slightly (Wan 480p: 0.3452 vs 0.3379 for the released rule on a padded table).

In joint [video; text] attention (HunyuanVideo) every block that touches a text token is kept whole, so text
queries are dense, video queries see every text key (the key padding mask still hides padded ones), and the block
mask is the exact token-level mask of the call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import torch

from attnedit.core.edits import BlockMask, Edit
from attnedit.methods.radial_presets import ALIASES, PRESETS

if TYPE_CHECKING:
    from attnedit.core.families import AttentionCall, Site


# The authors' released settings (mit-han-lab/radial-attention, scripts/*.sh), one per script; the comment names the
# script, the video it was run at and its sampling steps. Fields not given take RadialAttention's defaults (block
# 128, thinning at the block size, which is the released 128 there).


def _check_power_of_two(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1 or value & (value - 1):
        raise ValueError(f"{name}={value!r} must be a power of two (e.g. 64 or 128)")


def _check_geometry(frames: int, tokens_per_frame: int, block_size: int, decay: float) -> None:
    if not isinstance(frames, int) or frames < 1:
        raise ValueError(f"frames={frames!r} must be a positive integer")
    if not isinstance(tokens_per_frame, int) or tokens_per_frame < 1:
        raise ValueError(f"tokens_per_frame={tokens_per_frame!r} must be a positive integer")
    _check_power_of_two("block_size", block_size)
    if not decay > 0:
        raise ValueError(f"decay={decay!r} must be > 0 (the paper uses 0.2 for Wan, 0.95 for HunyuanVideo)")


def pair_rule(
    distance: int, tokens_per_frame: int, block_size: int, decay: float, thinning_width: int | None = None
) -> tuple[float, bool]:
    """(band half-width in tokens, pair kept) for two frames ``distance`` apart (no sink).

    The band is never narrower than a block; pairs whose natural band ``P / 2^(r+1)`` is under ``thinning_width``
    tokens (None: ``block_size``; the released code: 128) are kept only every ``thinning_width * 2^(r+1) / P``
    frames.
    """
    if distance <= 1:
        return float(tokens_per_frame), True
    threshold = block_size if thinning_width is None else thinning_width
    period = 2 ** tokens_per_frame.bit_length()  # P: the power of two above s
    span = period / 2 ** distance.bit_length()  # P / 2^(r+1)
    width = max(decay * span, float(block_size))
    kept = span >= threshold or distance % int(threshold / span) == 0
    return width, kept


@lru_cache(maxsize=4096)
def _pair_blocks(s: int, width: int, row_offset: int, col_offset: int, block: int) -> torch.Tensor:
    """Blocks kept for one frame pair whose band is ``|k - l| <= width``, placed at the given in-block offsets.

    Returns bool (ceil((row_offset + s) / block), ceil((col_offset + s) / block)). Per block, the count of active
    queries of each key column is computed in closed form (no s x s mask is built).
    """
    n_rows, n_cols = -(-(row_offset + s) // block), -(-(col_offset + s) // block)
    col = torch.arange(s)
    lo, hi = (col - width).clamp(min=0), (col + width).clamp(max=s - 1)  # active rows of each column
    start = torch.arange(n_rows)[:, None] * block - row_offset  # first row of each block, frame coordinates
    count = (torch.minimum(hi, start + block - 1) - torch.maximum(lo, start) + 1).clamp(min=0)
    # the share of the pair's queries inside each block (a block that a frame only partly fills is judged by the
    # rows the frame has there: otherwise a frame of under block/3 tokens would lose even its diagonal block)
    rows = (torch.minimum(start + block, torch.tensor(s)) - torch.maximum(start, torch.tensor(0))).clamp(min=1)
    padded = torch.zeros(n_rows, n_cols * block)
    padded[:, col_offset : col_offset + s] = count.float() / rows
    density = padded.view(n_rows, n_cols, block)
    nonzero, high = (density > 0).sum(-1), (density > 1 / 3).sum(-1)
    return high / (nonzero + 1e-9) > 0.6


@lru_cache(maxsize=64)
def radial_block_mask(
    frames: int, tokens_per_frame: int, block_size: int = 128, decay: float = 1.0, sink: bool = False,
    thinning_width: int | None = None,
) -> torch.Tensor:
    """Block mask of radial attention over ``frames * tokens_per_frame`` video tokens (cached per geometry).

    Returns bool ``(n, n)`` with ``n = ceil(frames * tokens_per_frame / block_size)``; ``[i, j]`` keeps query
    block i x key block j. ``thinning_width`` is T of the far-frame thinning (None: the block size). Treat the
    result as read-only (it is shared by the cache).

    >>> float(radial_block_mask(18, 3840, 128, 0.2, sink=True).float().mean())  # Wan 768x1280x69: 71.3% skipped
    0.287...
    """
    _check_geometry(frames, tokens_per_frame, block_size, decay)
    if thinning_width is not None:
        _check_power_of_two("thinning_width", thinning_width)
    s = tokens_per_frame
    n = -(-frames * s // block_size)
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i in range(frames):
        for j in range(frames):
            d = abs(i - j)
            width, kept = (float(s), True) if sink and j == 0 else pair_rule(d, s, block_size, decay, thinning_width)
            if not kept:
                continue
            blocks = _pair_blocks(s, min(int(width), s), (i * s) % block_size, (j * s) % block_size, block_size)
            r0, c0 = (i * s) // block_size, (j * s) // block_size
            mask[r0 : r0 + blocks.shape[0], c0 : c0 + blocks.shape[1]] |= blocks
    return mask


@lru_cache(maxsize=64)
def _call_blocks(
    frames: int, tokens_per_frame: int, block_size: int, decay: float, sink: bool, num_queries: int, num_keys: int,
    device: str = "cpu", thinning_width: int | None = None,
) -> torch.Tensor:
    """Radial blocks for a call whose first ``frames * tokens_per_frame`` tokens are video, the rest text.

    Cached per geometry and device, so the same table object comes back every call (FlexAttention's BlockMask is
    then built once per geometry, see ``attnedit.core.attention.flex_block_mask``).
    """
    video = radial_block_mask(frames, tokens_per_frame, block_size, decay, sink, thinning_width)
    n_video = frames * tokens_per_frame
    blocks = torch.ones(-(-num_queries // block_size), -(-num_keys // block_size), dtype=torch.bool)
    # Video-only blocks keep the radial rule; a block that also holds text tokens stays whole (exact, see above).
    q_pure = video.shape[0] if num_queries == n_video else n_video // block_size
    k_pure = video.shape[1] if num_keys == n_video else n_video // block_size
    blocks[:q_pure, :k_pure] = video[:q_pure, :k_pure]
    return blocks.to(device)


@dataclass(frozen=True, kw_only=True)
class RadialAttention(Edit):
    """Radial block-sparse attention on Wan self-attention (attn1) and HunyuanVideo joint attention.

    ``decay`` is the paper's gamma, ``sink`` lets every token see frame 0, ``block_size`` the block edge in tokens,
    ``thinning_width`` the band width under which far frames are thinned (None: the block size; the released code
    hard-codes 128). Calls with ``step < dense_steps`` or ``site.layer < dense_layers`` stay dense (the paper's
    warm-up); ``dense_tail_steps`` also keeps the last steps dense, which needs the run's ``num_steps``
    (``generate_radial`` fills it in). The video geometry comes from each call's token grid; ``frames`` /
    ``tokens_per_frame`` override it and must then match the call's video tokens. ``RadialAttention.preset(name)``
    gives the authors' settings (``PRESETS``).

    >>> with install(pipe, RadialAttention.preset("wan")):   # doctest: +SKIP
    ...     video = pipe(prompt, num_frames=69, height=768, width=1280).frames[0]
    """

    decay: float = 1.0
    block_size: int = 128
    thinning_width: int | None = None
    sink: bool = False
    dense_steps: int = 0
    dense_layers: int = 0
    dense_tail_steps: int = 0
    num_steps: int | None = None
    frames: int | None = None
    tokens_per_frame: int | None = None
    kinds: frozenset[str] | None = frozenset({"self", "joint"})

    def __post_init__(self) -> None:
        super().__post_init__()
        frames, per_frame = (1 if x is None else x for x in (self.frames, self.tokens_per_frame))
        _check_geometry(frames, per_frame, self.block_size, self.decay)
        if self.thinning_width is not None:
            _check_power_of_two("thinning_width", self.thinning_width)
        for name in ("dense_steps", "dense_layers", "dense_tail_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name}={value!r} must be a non-negative integer")
        if self.num_steps is not None and (not isinstance(self.num_steps, int) or self.num_steps < 1):
            raise ValueError(f"num_steps={self.num_steps!r} must be a positive integer (the run's denoising steps)")
        if self.dense_tail_steps and self.num_steps is None:
            raise ValueError(
                f"dense_tail_steps={self.dense_tail_steps} needs num_steps= (the run's number of denoising steps) "
                "to know which steps are the last"
            )
        if self.kinds is None:  # "every kind" means every kind radial attention applies to
            object.__setattr__(self, "kinds", frozenset({"self", "joint"}))
        if not self.kinds <= {"self", "joint"}:
            raise ValueError(f"kinds={sorted(self.kinds)}: radial attention applies to 'self' or 'joint' attention")

    @classmethod
    def preset(cls, name: str, **overrides) -> RadialAttention:
        """The authors' released settings by name (``PRESETS``; each entry names its script), fields overridable."""
        name = ALIASES.get(name, name)
        if name not in PRESETS:
            raise ValueError(f"preset={name!r}; valid: {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def validate(self, sites: list[Site], family: str) -> None:
        from attnedit.families import get_family

        if not get_family(family).video:
            raise ValueError(f"RadialAttention needs a video transformer; got {family}")
        super().validate(sites, family)

    def geometry(self, call: AttentionCall) -> tuple[int, int]:
        """(frames, tokens per frame) of the call's video tokens; ValueError when they do not match."""
        n_video = call.image_queries.stop - call.image_queries.start
        grid = call.grid
        frames = self.frames or (grid[0] if len(grid) == 3 else None)
        per_frame = self.tokens_per_frame or (math.prod(grid[1:]) if len(grid) == 3 else None)
        if frames is None or per_frame is None:
            raise ValueError(f"RadialAttention needs a (frames, h, w) token grid at {call.site.name}; got {grid}")
        if frames * per_frame != n_video or call.image_queries.start != 0:
            raise ValueError(
                f"frames={frames} x tokens_per_frame={per_frame} = {frames * per_frame} tokens does not match the "
                f"{n_video} video tokens of {call.site.name} (grid {grid})"
            )
        return frames, per_frame

    def dense_at(self, call: AttentionCall) -> bool:
        """True for the warm-up calls (first steps, first layers) and the last ``dense_tail_steps`` steps."""
        if self.num_steps is not None and call.step >= self.num_steps:
            raise ValueError(
                f"step {call.step} at {call.site.name}, but num_steps={self.num_steps}: set num_steps to the run's "
                "number of denoising steps"
            )
        tail = self.dense_tail_steps and call.step >= self.num_steps - self.dense_tail_steps
        return bool(call.step < self.dense_steps or call.site.layer < self.dense_layers or tail)

    def block_mask(self, call: AttentionCall) -> BlockMask | None:
        if self.dense_at(call):
            return None
        frames, per_frame = self.geometry(call)
        blocks = _call_blocks(
            frames, per_frame, self.block_size, float(self.decay), self.sink, call.num_queries, call.num_keys,
            str(call.device), self.thinning_width,
        )
        return BlockMask(blocks, self.block_size, call.num_queries, call.num_keys)

    def __repr__(self) -> str:
        thinning = "" if self.thinning_width is None else f", thinning_width={self.thinning_width}"
        tail = f", dense_tail_steps={self.dense_tail_steps}, num_steps={self.num_steps}" if self.dense_tail_steps else ""
        return (
            f"RadialAttention(decay={self.decay}, block_size={self.block_size}{thinning}, sink={self.sink}, "
            f"dense_steps={self.dense_steps}, dense_layers={self.dense_layers}{tail})"
        )
