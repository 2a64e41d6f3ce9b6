"""Refocusing schedules: when the latent is updated, how far and how often, and when to stop; two named versions
of the authors' code (Attention-Refocusing repository, ``ldm/models/diffusion/plms.py`` and ``loss.py``) and two
cheap ones, measured against them in ``benchmarks/refocusing_frontier.py``.

* ``"ce0439c"`` (default): the version the authors point plain Stable Diffusion users to (their answer to "running
  on default SD models", which also advises a loss scale of 40 there). Steps 0-29 of 50; loss scale 3 for steps
  0-9, 2 for 10-19, 1 for 20-29; up to 5, 5 and 1 updates (110 at most); stop once the *scaled* loss is <= 0.1.
  CAR and SAR are the plain sums.
* ``"b79fba5"`` (HEAD's last code change, tuned for GLIGEN): steps 0-9, then 10, 15, ..., 35; loss scale 4 (steps
  0-4), 3 (5-19), 1 after; up to 2, 6, 3, 2 and 2 updates (steps 0-1, 2-4, 5-9, 10 and 15, 20-35: 49 at most); stop
  once every box's CAR peak reaches 0.2, or (steps 0-9 only) the scaled loss is <= 0.1. CAR's terms are gated
  (:func:`attnedit.methods.refocusing.car_loss`, ``gated=True``).
* ``"fast"`` (attnedit's, not the authors'): ``ce0439c``'s first 20 steps and scales (3 for steps 0-9, 2 for
  10-19) with one update per step, 20 at most against 110. Each update is a forward with gradients and its
  backward, about one plain step of time on the tiny SD 1.5 (two on the tiny SDXL), so the updates, not the
  rest, decide the cost; one update per step keeps every refocused step while fitting x1.6 on SD 1.5.
* ``"fast-15"``: ``"fast"`` over steps 0-14 only (15 updates): on the tiny SDXL an update costs about two plain
  steps (its maps sit at the end of the UNet), so x1.6 (0.6 of 50 plain steps) allows 15 of them.
* ``"fast-front"``: ``"fast"`` with maps from the front half of the map layers only (``maps="front"``: SD 1.5's
  16x16 down block, SDXL's ``down_blocks.1``, a transformer's first half of blocks), so the gradient forward and
  backward stop near the middle of the network.

The authors' loops make one more update after the criterion (they test it before the next iteration, after the update).
The tables index the steps of a 50-step run; a run of N steps uses the entry of step ``i * 50 // N``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

LOSSES = ("car", "sar")
# "all": every layer the family reads maps from; "front": those in the first half of their span in forward order
# (a UNet's down-block layers of the map grid, a transformer's first half of blocks), so the gradient forward
# stops near the middle of the network and the backward is as short
MAPS = ("all", "front")
REFERENCE_STEPS = 50  # both versions sample 50 PLMS steps
_ALWAYS = 1 << 30


@dataclass(frozen=True)
class Schedule:
    """One version's schedule. Tables are ``(until_step, value)`` pairs on the steps of a 50-step run."""

    name: str
    until: int  # refocus steps < until ...
    stride_from: int  # ... every step before this one, then every ``stride``-th step
    stride: int
    step_sizes: tuple[tuple[int, float], ...]  # the official ``loss_scale`` per step
    iterations: tuple[tuple[int, int], ...]  # the official ``max_iter`` per step
    loss_threshold: float  # stop once the scaled loss is <= this ...
    loss_threshold_until: int  # ... at steps before this one
    peak_threshold: float | None  # stop once every box's CAR peak is >= this (None: never)
    gated_car: bool
    note: str
    maps: str = "all"  # which of the family's map layers the losses read: "all", or "front" (see MAPS)

    def pattern(self, index: int) -> bool:
        """Whether the official loop refocuses step ``index`` (ignoring ``until``)."""
        return index < self.stride_from or index % self.stride == 0


SCHEDULES: dict[str, Schedule] = {s.name: s for s in (
    Schedule("ce0439c", until=30, stride_from=_ALWAYS, stride=1,
             step_sizes=((10, 3.0), (20, 2.0), (_ALWAYS, 1.0)), iterations=((20, 5), (_ALWAYS, 1)),
             loss_threshold=0.1, loss_threshold_until=_ALWAYS, peak_threshold=None, gated_car=False,
             note="authors' code for plain SD: steps 0-29, scales 3/2/1 with 5/5/1 updates (<= 110)"),
    Schedule("b79fba5", until=36, stride_from=10, stride=5,
             step_sizes=((5, 4.0), (20, 3.0), (_ALWAYS, 1.0)), iterations=((2, 2), (5, 6), (10, 3), (_ALWAYS, 2)),
             loss_threshold=0.1, loss_threshold_until=10, peak_threshold=0.2, gated_car=True,
             note="authors' HEAD, tuned for GLIGEN: steps 0-9 then 10, 15, ..., 35, gated CAR (<= 49 updates)"),
    Schedule("fast", until=20, stride_from=_ALWAYS, stride=1,
             step_sizes=((10, 3.0), (_ALWAYS, 2.0)), iterations=((_ALWAYS, 1),),
             loss_threshold=0.1, loss_threshold_until=_ALWAYS, peak_threshold=None, gated_car=False,
             note="cheap: ce0439c's steps 0-19 and scales 3/2, one update per step (<= 20)"),
    Schedule("fast-15", until=15, stride_from=_ALWAYS, stride=1,
             step_sizes=((10, 3.0), (_ALWAYS, 2.0)), iterations=((_ALWAYS, 1),),
             loss_threshold=0.1, loss_threshold_until=_ALWAYS, peak_threshold=None, gated_car=False,
             note="cheap: 'fast' over steps 0-14 only (<= 15 updates), the budget of x1.6 on the tiny SDXL"),
    Schedule("fast-front", until=20, stride_from=_ALWAYS, stride=1,
             step_sizes=((10, 3.0), (_ALWAYS, 2.0)), iterations=((_ALWAYS, 1),),
             loss_threshold=0.1, loss_threshold_until=_ALWAYS, peak_threshold=None, gated_car=False,
             maps="front", note="cheaper: 'fast' with maps from the front half of the map layers only"),
)}
DEFAULT_SCHEDULE = "ce0439c"


def _lookup(table: tuple[tuple[int, Any], ...], step: int) -> Any:
    return next((v for until, v in table if step < until), table[-1][1])


@dataclass(frozen=True, kw_only=True)
class RefocusConfig:
    """Loss selection and the latent-update schedule; ``schedule`` names a version of the authors' code.

    Default ``schedule="ce0439c"``: the version the authors point plain Stable Diffusion users to, and attnedit
    refocuses plain (not box-conditioned) models; ``"b79fba5"`` is HEAD's GLIGEN-tuned schedule (see
    :mod:`attnedit.methods.refocusing_schedule`). Fields left ``None`` come from the schedule: ``refocus_steps``
    (refocus pipeline steps ``i < refocus_steps`` that the schedule's pattern refocuses), ``step_sizes`` and
    ``iterations`` (``(until_step, value)`` tables on the steps of a 50-step run), ``loss_threshold`` (on the
    scaled loss), ``peak_threshold`` and ``gated_car``.

    Each update is ``x <- x - grad(loss_scale * step_size * L)``, ``L = car_weight L_CAR + sar_weight L_SAR``.
    ``loss_scale=None`` is 40 on plain pipelines (the authors' advice for plain SD) and 1 on GLIGEN (their code).
    The gradient forward runs only up to the last recorded attention call (``prefix_only``). ``single_stream`` also
    records FLUX's single-stream blocks. ``gradient_checkpointing=None`` checkpoints FLUX's blocks only.
    """

    schedule: str = DEFAULT_SCHEDULE
    losses: tuple[str, ...] = LOSSES
    refocus_steps: int | None = None
    step_sizes: tuple[tuple[int, float], ...] | None = None
    iterations: tuple[tuple[int, int], ...] | None = None
    loss_scale: float | None = None
    car_weight: float = 1.0
    sar_weight: float = 1.0
    loss_threshold: float | None = None
    peak_threshold: float | None = None
    gated_car: bool | None = None
    maps: str | None = None
    softmax_scale: float = 100.0
    smooth_sigma: float = 0.5
    layers: frozenset[int] | None = None  # cross/self (UNet) or joint (SD3, FLUX) layer indices; None: by family
    single_stream: bool = False  # FLUX: record the single-stream blocks too (default: double-stream blocks only)
    prefix_only: bool = True  # stop the gradient forward after the last recorded attention call
    gradient_checkpointing: bool | None = None  # None: on for FLUX (a 12B transformer), off otherwise

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r} must be one of {sorted(SCHEDULES)}")
        losses = (self.losses,) if isinstance(self.losses, str) else tuple(self.losses)
        if not losses or not set(losses) <= set(LOSSES):
            raise ValueError(f"losses={self.losses!r} must be a non-empty subset of {LOSSES}")
        object.__setattr__(self, "losses", losses)
        if self.refocus_steps is not None and (isinstance(self.refocus_steps, bool) or self.refocus_steps < 0):
            raise ValueError(f"refocus_steps={self.refocus_steps} must be >= 0")
        for name in ("loss_scale", "softmax_scale", "car_weight", "sar_weight"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and 0 <= value < math.inf
                                          and (value > 0 or name.endswith("weight"))):
                bound = ">= 0" if name.endswith("weight") else "> 0"
                raise ValueError(f"{name}={value!r} must be a finite number {bound}")
        for name in ("step_sizes", "iterations"):
            table = getattr(self, name)
            if table is not None and (not table or any(a >= b for (a, _), (b, _) in itertools.pairwise(table))):
                raise ValueError(f"{name}={table} must be (until_step, value) pairs with increasing steps")
        if self.maps is not None and self.maps not in MAPS:
            raise ValueError(f"maps={self.maps!r} must be one of {MAPS}")
        if self.layers is not None:
            object.__setattr__(self, "layers", frozenset(self.layers))

    @property
    def plan(self) -> Schedule:
        """The named schedule."""
        return SCHEDULES[self.schedule]

    @staticmethod
    def index(step: int, num_steps: int = REFERENCE_STEPS) -> int:
        """The step of a 50-step run whose table entries step ``step`` of ``num_steps`` uses."""
        return step * REFERENCE_STEPS // max(num_steps, 1)

    def refocuses(self, step: int, num_steps: int = REFERENCE_STEPS) -> bool:
        """Whether pipeline step ``step`` (0-based) of ``num_steps`` is refocused."""
        index = self.index(step, num_steps)
        if self.refocus_steps is not None:
            return step < self.refocus_steps and self.plan.pattern(index)
        return index < self.plan.until and self.plan.pattern(index)

    def last_step(self, num_steps: int) -> int:
        """One past the last refocused step of a ``num_steps`` run (0: none)."""
        return max((i + 1 for i in range(num_steps) if self.refocuses(i, num_steps)), default=0)

    def step_size(self, step: int, num_steps: int = REFERENCE_STEPS) -> float:
        return float(_lookup(self.step_sizes or self.plan.step_sizes, self.index(step, num_steps)))

    def max_iterations(self, step: int, num_steps: int = REFERENCE_STEPS) -> int:
        return int(_lookup(self.iterations or self.plan.iterations, self.index(step, num_steps)))

    def stop(self, scaled_loss: float, peak: float | None, step: int, num_steps: int = REFERENCE_STEPS) -> bool:
        """The official criterion, tested after an update: scaled loss <= threshold, or every box's peak reached."""
        threshold = self.plan.loss_threshold if self.loss_threshold is None else self.loss_threshold
        if self.index(step, num_steps) < self.plan.loss_threshold_until and scaled_loss <= threshold:
            return True
        peak_threshold = self.plan.peak_threshold if self.peak_threshold is None else self.peak_threshold
        return peak_threshold is not None and peak is not None and peak >= peak_threshold

    @property
    def gated(self) -> bool:
        return self.plan.gated_car if self.gated_car is None else self.gated_car

    @property
    def map_span(self) -> str:
        """``"all"`` or ``"front"``: which of the family's map layers the losses read (ignored with ``layers``)."""
        return self.plan.maps if self.maps is None else self.maps
