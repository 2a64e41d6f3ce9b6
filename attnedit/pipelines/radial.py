"""Run a Wan 2.x or HunyuanVideo pipeline with radial attention (Li et al. 2025, see :mod:`attnedit.radial`).

>>> frames = generate_radial(pipe, "a fox running in snow", num_frames=69, height=768, width=1280).frames[0]  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

from ..families import detect_family
from ..install import install
from ..radial import RadialAttention


def generate_radial(
    pipe: Any, prompt: str | list[str], *, preset: str | None = None, backend: str = "auto",
    radial: dict[str, Any] | None = None, **call_kwargs: Any,
) -> Any:
    """Call ``pipe(prompt, **call_kwargs)`` with :class:`RadialAttention` installed, then restore the pipeline.

    ``preset`` defaults to the pipeline's family (``"wan"`` or ``"hunyuan_video"``); ``radial`` overrides preset
    fields (e.g. ``{"dense_steps": 2}`` for a few-step LoRA). Returns the pipeline's own output.
    """
    family = detect_family(pipe.transformer).name
    edit = RadialAttention.preset(preset or family, **(radial or {}))
    with install(pipe, edit, backend=backend) as handle:
        handle.new_run()
        return pipe(prompt=prompt, **call_kwargs)
