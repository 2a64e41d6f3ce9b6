"""The diffusers versions attnedit is tested with, checked before the parts that use diffusers' internals load.

attnedit relies on private diffusers helpers that change between minor releases without notice:
``attention_dispatch._AttentionBackendRegistry`` and ``_templated_context_parallel_attention`` (Ulysses),
``models._modeling_parallel`` (context-parallel configs), ``hooks.context_parallel``, ``ModelMixin.
_resolve_parallel_config``, and the FLUX/Wan ``_get_qkv_projections`` helpers; its processors follow diffusers
0.42's processors operation by operation. So the pin is one minor release (``diffusers>=0.42,<0.43`` in
pyproject.toml), and another version is one clear ``ImportError`` here instead of a missing name deep inside.
``ATTNEDIT_ALLOW_UNTESTED_DIFFUSERS=1`` turns the error into a warning (at your own risk).
"""

from __future__ import annotations

import os
import re
import warnings

SUPPORTED_DIFFUSERS = ((0, 42), (0, 43))  # [lowest, first unsupported) minor release; keep equal to pyproject.toml
SUPPORTED_TEXT = "diffusers>=0.42,<0.43"


def check_diffusers(version: str | None = None) -> None:
    """Raise ImportError unless ``version`` (default: the installed diffusers') is a tested minor release."""
    if version is None:
        import diffusers

        version = diffusers.__version__
    match = re.match(r"(\d+)\.(\d+)", str(version))
    minor = (int(match[1]), int(match[2])) if match else None
    if minor is not None and SUPPORTED_DIFFUSERS[0] <= minor < SUPPORTED_DIFFUSERS[1]:
        return
    message = (f"attnedit needs {SUPPORTED_TEXT} (it uses diffusers internals that change between releases); "
               f"diffusers {version} is installed. Install a supported one: pip install '{SUPPORTED_TEXT}'")
    if os.environ.get("ATTNEDIT_ALLOW_UNTESTED_DIFFUSERS") == "1":
        warnings.warn(message + " (ATTNEDIT_ALLOW_UNTESTED_DIFFUSERS=1: continuing untested)", stacklevel=2)
        return
    raise ImportError(message)


check_diffusers()
