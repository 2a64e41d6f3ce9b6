"""attnedit: edit what diffusion models attend to, with composable edits on diffusers' attention modules.

Folders: ``core/`` (edits, attention, installation), ``families/`` (one module per model family), ``processors/``, ``methods/`` (one per method),
``pipelines/`` (thin runners), ``models/`` (architectures, tiny zoo), ``shapes/`` (world, trained models),
``surfaces/`` (CLI, batch, app). Old flat paths (``attnedit.zoo``) still import: :mod:`attnedit.compat`.

The names below load on first use (PEP 562), so ``import attnedit`` (and ``attnedit --help``) does not import torch.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import TYPE_CHECKING, Any

from attnedit.compat import install_aliases

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time these load on first use (below)
    from attnedit.core.attention import BACKENDS, dense_attention
    from attnedit.core.edits import AttentionRecorder, BlockMask, Edit, HeadBlend, KeyMask, RecordedMap
    from attnedit.core.families import AttentionCall, Site
    from attnedit.families import FAMILIES, detect_family
    from attnedit.core.install import Installation, install

__version__ = "0.1.0"

_HOMES = {
    "attnedit.core.attention": ("BACKENDS", "dense_attention"),
    "attnedit.core.edits": ("AttentionRecorder", "BlockMask", "Edit", "HeadBlend", "KeyMask", "RecordedMap"),
    "attnedit.core.families": ("AttentionCall", "Site"),
    "attnedit.families": ("FAMILIES", "detect_family"),
    "attnedit.core.install": ("Installation", "install"),
}
_EXPORTS = {name: module for module, names in _HOMES.items() for name in names}

__all__ = ["AttentionCall", "AttentionRecorder", "BACKENDS", "BlockMask", "Edit", "FAMILIES", "HeadBlend", "Installation", "KeyMask", "RecordedMap", "Site", "dense_attention", "detect_family", "install"]
assert sorted(__all__) == sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'attnedit' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(ModuleType):
    """The import system binds an imported submodule as an attribute of its package; for the old module path
    ``attnedit.install`` that would replace the function ``attnedit.install``. Exported names keep their values."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _EXPORTS and isinstance(value, ModuleType):
            value = getattr(importlib.import_module(_EXPORTS[name]), name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
install_aliases()
