"""Model families: one module each, declaring what the edit core needs (see :class:`attnedit.core.families.Family`).

Adding a family is one module, ``attnedit/families/<name>.py`` (found by itself; nothing else changes), with:

* ``FAMILY = Family(...)``: site rules, token grid, token layout of its attention calls, CFG layout, the kind PAG
  perturbs, whether it is video (:class:`attnedit.core.families.Family`);
* ``PUBLISHED``: its published checkpoints (``attnedit/models/configs/<name>.json`` holds each denoiser config),
  ``published_sites(config)`` (the site table written out from a config) and ``example_inputs(...)`` for one
  forward (:mod:`attnedit.models.architectures`);
* ``TINY``: its tiny random-weight pipelines for tests (:mod:`attnedit.models.zoo`);
* optionally, ``Family(image_pipeline=..., video_pipeline=...)``: hooks through which attnedit's own pipelines
  (refocusing, DesignEdit, the video editor) drive the family's stock pipeline
  (:mod:`attnedit.core.family_hooks`; e.g. ``_flux_pipeline.py``). Nothing outside this package compares a
  family's name (``tests/test_package_structure.py`` checks).
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

import torch

from attnedit.core.families import AttentionCall, Family, ForwardInfo, Site  # also the old attnedit.families names
from attnedit.families import flux, hunyuan_video, sd3, unet, wan

_FIRST = (unet, sd3, flux, wan, hunyuan_video)  # the original five, in their order; the rest by file name
MODULES = _FIRST + tuple(
    importlib.import_module(f"{__name__}.{info.name}") for info in pkgutil.iter_modules(__path__)
    if info.name not in {m.__name__.rsplit(".", 1)[1] for m in _FIRST} and not info.name.startswith("_")
)

FAMILIES: dict[str, Family] = {m.FAMILY.name: m.FAMILY for m in MODULES}


def detect_family(model: torch.nn.Module) -> Family:
    """The declaration for a denoiser, by its diffusers class (subclasses count; ``torch.compile(model)`` too).

    The most specific class wins: a family declared for a subclass (FLUX.1 Kontext's model is FLUX's class; Wan
    VACE's subclasses Wan's) is found before its parent's.
    """
    model = getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule wraps the model
    for cls in type(model).__mro__:
        for family in FAMILIES.values():
            if cls.__name__ == family.model_class:
                return family
    names = ", ".join(f"{f.name} ({f.model_class})" for f in FAMILIES.values())
    raise ValueError(f"{type(model).__name__} is not a denoiser attnedit supports; supported families: {names}")


def family_module(name: str) -> ModuleType:
    """The module declaring family ``name``: its ``FAMILY``, ``PUBLISHED`` checkpoints, ``published_sites(config)``,
    ``example_inputs(...)`` (see :mod:`attnedit.models.architectures`)."""
    for module in MODULES:
        if module.FAMILY is get_family(name):
            return module
    raise AssertionError(name)


def get_family(name: str) -> Family:
    """The declaration named ``name`` (or one of its aliases)."""
    for family in FAMILIES.values():
        if name == family.name or name in family.aliases:
            return family
    raise ValueError(f"unknown family {name!r}; known: {', '.join(FAMILIES)}")


__all__ = ["FAMILIES", "MODULES", "AttentionCall", "Family", "ForwardInfo", "Site", "detect_family", "family_module", "get_family"]
