"""Which attention maps refocusing reads, per family (used by :mod:`attnedit.pipelines.refocusing`).

UNets: the layers at the paper's grid, found by one probing forward (cached per model and latent shape); SD3 and
FLUX: their joint blocks. The losses record exactly these maps, conditional rows only.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from attnedit.core.edits import Edit
from attnedit.core.install import Installation
from attnedit.methods.refocusing import MapRecorder, RefocusConfig

__all__ = ["PAPER_GRID", "map_layers"]

PAPER_GRID = 16  # the paper's map side (SD 1.x at 512 px)

@dataclass(frozen=True, kw_only=True)
class _GridProbe(Edit):
    """Notes the token grid of every call it covers; changes nothing (no probabilities needed)."""

    grids: dict = field(default_factory=dict, compare=False, repr=False)

    def key_keep(self, call: Any) -> None:
        self.grids[call.site] = tuple(call.grid[-2:])


_GRIDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _probe_grids(handle: Installation, forward: Any, x: torch.Tensor, t: torch.Tensor) -> dict:
    """{site: token grid} of every self/cross call of ``forward(x, t)`` (one no-grad forward, cached per model)."""
    model, shape = handle.models[0], tuple(x.shape)
    cached = _GRIDS.setdefault(model, {})
    if shape not in cached:
        probe, base = _GridProbe(kinds=frozenset({"self", "cross"})), handle.edits
        state = handle.state
        saved = (state.step, state.pass_index, state.last_t, state.direction)
        handle.edits = (*base, probe)
        try:
            with torch.no_grad(), handle.branches("cond"):
                forward(x, t)
        finally:
            handle.edits = base
            state.step, state.pass_index, state.last_t, state.direction = saved
        cached[shape] = dict(probe.grids)
    return cached[shape]


def map_layers(handle: Installation, forward: Any, x: torch.Tensor, t: torch.Tensor,
               config: RefocusConfig) -> tuple[str, str, frozenset[int], frozenset[int]]:
    """(text kind, image kind, text layers, image layers) the losses record.

    UNets: the layers at the paper's grid (latent/4 for SD 1.x: 16x16 at 512 px, its 5 layers; latent/2 for
    SDXL; else the grid nearest to 16x16 of at least 8x8), found by one probing forward ``forward(x, t)``; SD3:
    every joint block; FLUX: the double-stream blocks (and the single-stream ones with ``config.single_stream``).
    """
    if handle.family.text_kind == "joint":  # MM-DiTs: text and image keys in one joint call
        if config.layers is not None:
            return "joint", "joint", config.layers, config.layers
        sites = [s for s in handle.sites if s.kind == "joint" and (config.single_stream or s.stream != "single")]
        layers = _span(handle, {"joint": frozenset(s.layer for s in sites)}, config.map_span)["joint"]
        return "joint", "joint", layers, layers
    if config.layers is not None:
        return "cross", "self", config.layers, config.layers
    grids_of = _probe_grids(handle, forward, x, t)
    latent = tuple(x.shape[-2:])
    sdxl = handle.models[0].config.get("addition_embed_type") == "text_time"  # SDXL's micro-conditioning
    factor = 2 if sdxl else 4  # SDXL: latent / 2; SD 1.x: latent / 4
    target = tuple(-(-n // factor) for n in latent)
    grids = {g for s, g in grids_of.items() if s.kind == "cross"}
    if target in grids and min(target) >= 8:
        chosen = target
    else:  # a grid under 8 tokens a side is too coarse to hold a box: the usable grid nearest the paper's 16x16
        usable = [g for g in grids if min(g) >= 8] or list(grids)
        chosen = min(usable, key=lambda g: (abs(math.log2(math.sqrt(g[0] * g[1]) / PAPER_GRID)), -g[0] * g[1]))
    pick = lambda kind: frozenset(s.layer for s, g in grids_of.items() if s.kind == kind and g == chosen)
    layers = _span(handle, {"cross": pick("cross"), "self": pick("self")}, config.map_span)
    return "cross", "self", layers["cross"], layers["self"]


def _span(handle: Installation, layers: dict[str, frozenset[int]], span: str) -> dict[str, frozenset[int]]:
    """``layers`` per kind, or with ``span="front"`` those in the first half of their span in forward order.

    The front half of SD 1.5's 16x16 layers is ``down_blocks.2``, of SDXL's latent/2 layers ``down_blocks.1``
    (before its 32x32 blocks), of a transformer's blocks the first half: the gradient forward stops there.
    """
    if span == "all":
        return layers
    position = {(s.kind, s.layer): i for i, s in enumerate(handle.sites)}
    spots = [position[(kind, layer)] for kind, chosen in layers.items() for layer in chosen]
    if not spots:
        return layers
    middle = (min(spots) + max(spots)) / 2
    return {kind: frozenset(layer for layer in chosen if position[(kind, layer)] <= middle)
            for kind, chosen in layers.items()}


def _recorders(handle: Installation, pipe: Any, forward: Any, x: torch.Tensor, t: torch.Tensor,
               config: RefocusConfig) -> list[MapRecorder]:
    """Recorders of exactly the maps the selected losses read, conditional rows only."""
    text_kind, image_kind, text_layers, image_layers = map_layers(handle, forward, x, t, config)
    cond = frozenset({"cond"})
    recorders = []
    if "car" in config.losses:
        recorders.append(MapRecorder(kinds=frozenset({text_kind}), layers=text_layers, branches=cond, keys="text"))
    if "sar" in config.losses:
        recorders.append(MapRecorder(kinds=frozenset({image_kind}), layers=image_layers, branches=cond, keys="image"))
    return recorders
