"""Edits: small objects that say where they act on attention and what they do there.

An edit is applied by the one processor family (``attnedit.processors``) inside every attention call it
covers. It can do any of four things, each a hook that returns ``None`` when it has nothing to say:

* ``key_keep(call)``   -> bool ``(1 | B, S_k)``: which keys stay visible (a per-key vector, never S_q x S_k);
* ``key_scale(call)``  -> float ``(1 | B, S_k)``: multiply keys (the soft ``(1 - M) * K`` form of key masking);
* ``block_mask(call)`` -> :class:`BlockMask`: a block-sparse key restriction (radial attention);
* ``blend(call, out, value, query=, key=, mask=)`` -> new output ``(B, H, S_q, D)``: per-head blending (SoftPAG);
* ``record(call, probs)``: observe attention probabilities ``(b, H, S_q, S_k)`` with gradients (refocusing).

Where an edit acts is given by four optional filters shared by every edit: ``kinds`` (self / cross / joint),
``layers`` (indices within those kinds, as the family adapter numbers them), ``steps`` (``(start, stop)``
denoising step window) and ``branches`` (``"uncond"``, ``"cond"``, ``"perturbed"``). Several edits compose:
key restrictions are AND-ed, key scales multiplied, blends applied in order, recorders see the final map.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from attnedit.core.checks import as_mask, check_real, check_size, is_int
from attnedit.core.perturbation import SCOPES, head_table, image_image_attention

if TYPE_CHECKING:
    from attnedit.core.families import AttentionCall, Site

KINDS = ("self", "cross", "joint")
BRANCHES = ("uncond", "cond", "perturbed")


def _as_frozenset(name: str, values: Any, allowed: tuple[str, ...] | None = None) -> frozenset | None:
    if values is None:
        return None
    if isinstance(values, (str, int)):
        values = (values,)
    try:
        values = frozenset(values)
    except TypeError:  # a float, or nested lists
        raise ValueError(f"{name}={values!r} must be a name/index or a collection of them; use None for all") from None
    if not values:
        raise ValueError(f"{name}=() selects nothing; use None for all")
    if allowed is not None and not values <= set(allowed):
        raise ValueError(f"{name}={sorted(values)} has unknown entries; valid: {list(allowed)}")
    return values


@dataclass(frozen=True, kw_only=True)
class Edit:
    """Base of every edit: where it applies. Subclasses override the hooks they need."""

    kinds: frozenset[str] | None = None
    layers: frozenset[int] | None = None
    steps: tuple[int, int] | None = None
    branches: frozenset[str] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "kinds", _as_frozenset("kinds", self.kinds, KINDS))
        object.__setattr__(self, "branches", _as_frozenset("branches", self.branches, BRANCHES))
        layers = _as_frozenset("layers", self.layers)
        if layers is not None and not all(is_int(i) and i >= 0 for i in layers):
            raise ValueError(f"layers={sorted(layers)} must be non-negative integers")
        object.__setattr__(self, "layers", layers)
        if self.steps is not None:
            window = tuple(self.steps) if isinstance(self.steps, (tuple, list)) else ()
            if len(window) != 2 or not all(is_int(i) for i in window) or not 0 <= window[0] < window[1]:
                raise ValueError(f"steps={self.steps!r} must be a window (start, stop) of integers with 0 <= start < stop")
            object.__setattr__(self, "steps", window)

    # -- where ---------------------------------------------------------------------------------------------
    def covers(self, call: AttentionCall) -> bool:
        """True when this call is one the edit acts on (kind, layer, step; branches are per row)."""
        if not self.acts_at(call.site, call.step):
            return False
        return self.branches is None or any(b in self.branches for b in call.branches)

    def acts_at(self, site: Site, step: int) -> bool:
        """The part of :meth:`covers` known before a call runs (site and step): a processor with no edit acting
        here calls the stock processor directly."""
        if self.kinds is not None and site.kind not in self.kinds:
            return False
        if self.layers is not None and site.layer not in self.layers:
            return False
        return self.steps is None or self.steps[0] <= step < self.steps[1]

    def rows(self, call: AttentionCall) -> torch.Tensor | None:
        """Bool ``(B,)`` of batch rows in this edit's branches, or None for every row."""
        if self.branches is None or all(b in self.branches for b in call.branches):
            return None
        return torch.tensor([b in self.branches for b in call.branches], device=call.device)

    def validate(self, sites: list[Site], family: str) -> None:
        """Raise ValueError when the edit names layers or heads the model does not have."""
        kinds = self.kinds or frozenset(KINDS)
        present = {s.kind for s in sites} & kinds
        if not present:
            have = sorted({s.kind for s in sites})
            raise ValueError(f"{self!r} targets kinds {sorted(kinds)}; {family} has only {have} attention")
        if self.layers is None:
            return
        for kind in sorted(present):
            count = sum(1 for s in sites if s.kind == kind)
            bad = sorted(i for i in self.layers if i >= count)
            if bad and len(present) == 1:
                raise ValueError(
                    f"{type(self).__name__} names {kind}-attention layer(s) {bad}, "
                    f"but {family} has {kind}-attention layers 0..{count - 1}"
                )
        if not any(s.layer in self.layers for s in sites if s.kind in present):
            raise ValueError(f"{type(self).__name__} layers={sorted(self.layers)} match no {sorted(present)} layer of {family}")

    # -- what (hooks; None / identity means "nothing to do") --------------------------------------------------
    def key_keep(self, call: AttentionCall) -> torch.Tensor | None:
        return None

    def key_scale(self, call: AttentionCall) -> torch.Tensor | None:
        return None

    def block_mask(self, call: AttentionCall) -> BlockMask | None:
        return None

    def blend(self, call: AttentionCall, out: torch.Tensor, value: torch.Tensor, *, query: torch.Tensor | None = None,
              key: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        return out

    def record(self, call: AttentionCall, probs: torch.Tensor) -> None:
        return None

    @property
    def records(self) -> bool:
        return type(self).record is not Edit.record

    @property
    def blends(self) -> bool:
        return type(self).blend is not Edit.blend


# ---------------------------------------------------------------------------------------------------------------
# Block masks
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class BlockMask:
    """Block-sparse restriction of one attention call: ``blocks[i, j]`` keeps query block i x key block j.

    Blocks are ``block_size`` tokens square; the last block of each axis may be short. Inside a kept block
    every pair is kept (an optional ``token_keep`` function refines that, for references only).
    """

    blocks: torch.Tensor  # bool (n_q_blocks, n_k_blocks)
    block_size: int
    num_queries: int
    num_keys: int

    def __post_init__(self) -> None:
        if not isinstance(self.blocks, torch.Tensor) or self.blocks.dtype != torch.bool:
            raise ValueError(f"blocks= must be a bool tensor (n_q_blocks, n_k_blocks), got {type(self.blocks).__name__}")
        for name in ("block_size", "num_queries", "num_keys"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be a positive integer")
        nq, nk = math.ceil(self.num_queries / self.block_size), math.ceil(self.num_keys / self.block_size)
        if tuple(self.blocks.shape) != (nq, nk):
            raise ValueError(
                f"BlockMask blocks shape {tuple(self.blocks.shape)} does not cover {self.num_queries} x "
                f"{self.num_keys} tokens in blocks of {self.block_size}: expected ({nq}, {nk})"
            )

    @property
    def density(self) -> float:
        return float(self.blocks.float().mean())

    def dense(self) -> torch.Tensor:
        """Token-level bool ``(S_q, S_k)``: for references and tests only."""
        b = self.block_size
        full = self.blocks.repeat_interleave(b, 0).repeat_interleave(b, 1)
        return full[: self.num_queries, : self.num_keys]

    def __and__(self, other: BlockMask) -> BlockMask:
        if (self.block_size, self.num_queries, self.num_keys) != (other.block_size, other.num_queries, other.num_keys):
            raise ValueError("cannot combine block masks of different geometry")
        return dataclasses.replace(self, blocks=self.blocks & other.blocks)


# ---------------------------------------------------------------------------------------------------------------
# Generic edits the methods build on
# ---------------------------------------------------------------------------------------------------------------


def mask_coverage(mask: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
    """Float ``(h, w)``: the share of each cell of ``grid`` covered by the ``(H, W)`` mask in [0, 1] (area average).

    Every cell that holds any masked pixel gets a coverage above 0, so a thin mask never drops out of a coarse grid.
    """
    h, w = check_size("grid", tuple(grid[-2:]))
    mask = as_mask(mask, "mask", (2,))
    if tuple(mask.shape) == (h, w):
        return mask.float()
    if abs(mask.shape[0] / mask.shape[1] - h / w) > 0.5 * (1 / h + 1 / w) * max(1.0, h / w):
        raise ValueError(
            f"mask of size {tuple(mask.shape)} does not have the aspect ratio of the {h}x{w} attention grid"
        )
    return F.interpolate(mask[None, None].float(), size=(h, w), mode="area")[0, 0]


def resize_mask(mask: torch.Tensor, grid: tuple[int, ...], threshold: float = 0.5) -> torch.Tensor:
    """Bool ``(h, w)``: cells of ``grid`` whose coverage by the ``(H, W)`` mask is above ``threshold``."""
    check_real("threshold", threshold, 0.0, 1.0)
    return mask_coverage(mask, grid) > threshold


@dataclass(frozen=True, kw_only=True)
class KeyMask(Edit):
    """Hide keys inside a spatial mask from every query (image/video keys only; text keys stay visible).

    ``mask`` is (H, W) for images or (F, H, W) for video, True/1 = hidden (a tensor; numpy arrays, PIL images and
    nested lists are converted, 8-bit values divided by 255); it is area-resampled to each call's
    token grid, giving each key the share of its cell inside the mask. ``mode="hard"`` excludes keys whose share is
    above ``threshold`` (-inf logit); ``mode="soft"`` scales every key by (1 - share), the DesignEdit paper's
    (1 - M) * K with fractional weights at the mask's edges, so a fully masked key keeps a logit of 0.
    """

    mask: torch.Tensor
    mode: str = "hard"
    threshold: float = 0.5
    kinds: frozenset[str] | None = frozenset({"self", "joint"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in ("hard", "soft"):
            raise ValueError(f"mode={self.mode!r} must be 'hard' or 'soft'")
        object.__setattr__(self, "mask", as_mask(self.mask, "mask"))
        check_real("threshold", self.threshold, 0.0, 1.0, high_open=True)

    def coverage(self, call: AttentionCall) -> torch.Tensor:
        """Float (S_k,): the share of each key's cell inside the mask (0 for text keys)."""
        grid = call.grid
        if self.mask.ndim == 3:
            if len(grid) != 3 or self.mask.shape[0] != grid[0]:
                raise ValueError(f"video mask of {self.mask.shape[0]} frames does not match token grid {grid}")
            small = torch.stack([mask_coverage(m, grid) for m in self.mask]).flatten()
        else:
            small = mask_coverage(self.mask, grid).flatten()
            if len(grid) == 3:
                small = small.repeat(grid[0])
        covered = torch.zeros(call.num_keys, device=call.device)
        covered[call.image_keys] = small.to(call.device)
        return covered

    def key_keep(self, call: AttentionCall) -> torch.Tensor | None:
        return None if self.mode == "soft" else (self.coverage(call) <= self.threshold)[None]

    def key_scale(self, call: AttentionCall) -> torch.Tensor | None:
        return (1 - self.coverage(call)).to(call.dtype)[None] if self.mode == "soft" else None

    def __repr__(self) -> str:
        return f"KeyMask(mask={tuple(self.mask.shape)}, mode={self.mode!r}, layers={_fmt(self.layers)}, steps={self.steps})"


@dataclass(frozen=True, kw_only=True)
class HeadBlend(Edit):
    """Blend selected heads' outputs toward a perturbed attention's: out_h <- (1 - u) out_h + u target_h.

    With ``target="identity"`` the head's map becomes (1 - u) A + u A_p, A_p the map of PAG's perturbation over
    ``scope`` (:mod:`attnedit.core.perturbation`), computed without an S x S map: ``"all"`` (default, the SoftPAG
    paper's) is the identity on every row, so A_p V = V; ``"image-image"`` (diffusers' SD3 PAG) keeps an image query's
    own key and every text key; ``"image"`` sends image rows to the identity and leaves text rows alone.
    ``"uniform"`` blends toward the mean of V (a uniform map; scopes "all" and "image"). ``heads`` maps a layer index
    to the heads blended in that layer (None: every head of the covered layers).
    """

    strength: float = 1.0
    heads: dict[int, tuple[int, ...]] | None = None
    target: str = "identity"
    scope: str = "all"
    kinds: frozenset[str] | None = frozenset({"self", "joint"})

    def __post_init__(self) -> None:
        super().__post_init__()
        u = self.strength
        if not isinstance(u, numbers.Real) or isinstance(u, bool) or not 0.0 <= u <= 1.0:
            raise ValueError(f"strength={u!r} must be in [0, 1], a number (u: 0 = unperturbed, 1 = PAG)")
        if self.target not in ("identity", "uniform"):
            raise ValueError(f"target={self.target!r} must be 'identity' or 'uniform'")
        if self.scope not in SCOPES:
            raise ValueError(f"scope={self.scope!r} must be one of {', '.join(map(repr, SCOPES))}")
        if self.scope == "image-image" and self.target != "identity":
            raise ValueError(f"target={self.target!r} has no 'image-image' form (diffusers' PAG); use scope='all' or 'image'")
        if self.heads is not None:
            object.__setattr__(self, "heads", head_table(self.heads))
            if self.layers is None:
                object.__setattr__(self, "layers", frozenset(self.heads))

    def validate(self, sites: list[Site], family: str) -> None:
        super().validate(sites, family)
        if self.heads is None:
            return
        kinds = self.kinds or frozenset(KINDS)
        by_layer = {s.layer: s.heads for s in sites if s.kind in kinds}
        for layer, heads in self.heads.items():
            if layer not in by_layer:
                raise ValueError(f"HeadBlend names layer {layer}; {family} has layers 0..{max(by_layer)}")
            bad = [h for h in heads if not 0 <= h < by_layer[layer]]
            if bad:
                raise ValueError(f"HeadBlend names head(s) {bad} of layer {layer}; it has heads 0..{by_layer[layer] - 1}")

    def blend(self, call: AttentionCall, out: torch.Tensor, value: torch.Tensor, *, query: torch.Tensor | None = None,
              key: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        heads = None  # indices into this call's heads; global indices shift under Ulysses (a slice of the heads)
        if self.heads is not None:
            heads = [h - call.head_offset for h in self.heads.get(call.site.layer, ()) if 0 <= h - call.head_offset < out.shape[1]]
        if self.strength == 0.0 or heads == []:
            return out
        if out.shape[-2] != value.shape[-2]:
            raise ValueError(f"HeadBlend needs self/joint attention (queries == keys) at {call.site.name}")
        if self.scope == "image-image" and call.text_keys is not None:
            if query is None or key is None:
                raise ValueError(f"scope='image-image' needs the queries and keys of the call at {call.site.name}")
            rows, index = call.image_queries, slice(None) if heads is None else heads
            perturbed = image_image_attention(query, key, value, call, mask, heads)
            blended = out.clone()
            blended[:, index, rows] = out[:, index, rows] + self.strength * (perturbed - out[:, index, rows])
            return blended
        weight = torch.zeros(out.shape[1], dtype=out.dtype, device=out.device)
        weight[heads if heads is not None else slice(None)] = self.strength
        weight = weight.view(1, -1, 1, 1)
        target = value if self.target == "identity" else value.mean(dim=-2, keepdim=True).expand_as(value)
        blended = out + weight * (target - out)  # (1 - u) out + u target, one fused op
        if self.scope == "image" and call.text_queries is not None:
            keep = torch.zeros(out.shape[-2], 1, dtype=torch.bool, device=out.device)
            keep[call.image_queries] = True
            blended = torch.where(keep, blended, out)
        return blended

    def __repr__(self) -> str:
        return f"HeadBlend(u={self.strength}, heads={self.heads}, target={self.target!r}, scope={self.scope!r}, steps={self.steps})"


@dataclass(frozen=True)
class RecordedMap:
    site: Site
    step: int
    branches: tuple[str, ...]
    probs: torch.Tensor  # (b, H or 1, S_q, S_k)
    grid: tuple[int, ...]  # token grid of the image/video queries
    image_queries: slice  # rows of ``probs`` that are image/video queries
    image_keys: slice
    text_keys: slice | None


@dataclass(frozen=True, kw_only=True)
class AttentionRecorder(Edit):
    """Keep attention probabilities of the covered calls (with gradients when they flow).

    ``mean_heads`` averages over heads at record time to save memory; ``queries`` limits to image-token rows
    of joint attention when ``"image"``. Maps accumulate in ``self.maps`` until ``clear()``.
    """

    mean_heads: bool = True
    queries: str = "all"
    maps: list[RecordedMap] = field(default_factory=list, compare=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.queries not in ("all", "image"):
            raise ValueError(f"queries={self.queries!r} must be 'all' or 'image'")

    def record(self, call: AttentionCall, probs: torch.Tensor) -> None:
        image_queries = call.image_queries
        if self.queries == "image" and call.text_queries is not None:
            probs = probs[:, :, call.image_queries]
            image_queries = slice(0, probs.shape[2])
        if self.mean_heads:
            probs = probs.mean(dim=1, keepdim=True)
        rows = self.branches
        branches = tuple(b for b in call.branches if rows is None or b in rows)
        self.maps.append(RecordedMap(call.site, call.step, branches, probs, call.grid, image_queries, call.image_keys, call.text_keys))

    def clear(self) -> None:
        self.maps.clear()

    def __repr__(self) -> str:
        return f"AttentionRecorder(kinds={_fmt(self.kinds)}, layers={_fmt(self.layers)}, steps={self.steps}, maps={len(self.maps)})"


def _fmt(values: frozenset | None) -> str:
    return "all" if values is None else str(sorted(values))
