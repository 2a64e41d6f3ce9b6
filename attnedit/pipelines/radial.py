"""Run a Wan 2.x or HunyuanVideo pipeline with radial attention (Li et al. 2025, see :mod:`attnedit.methods.radial`).

>>> frames = generate_radial(pipe, "a fox running in snow", num_frames=69, height=768, width=1280).frames[0]  # doctest: +SKIP

One video on N GPUs (Ulysses context parallelism, :mod:`attnedit.core.parallel`), under ``torchrun --nproc_per_node N``:

>>> generate_radial(pipe, "a fox running in snow", parallel=N, num_frames=69)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

from attnedit.core.families import detect_family
from attnedit.core.install import install
from attnedit.methods.radial import RadialAttention


def generate_radial(
    pipe: Any, prompt: str | list[str], *, preset: str | None = None, backend: str = "auto",
    radial: dict[str, Any] | None = None, parallel: Any = None, **call_kwargs: Any,
) -> Any:
    """Call ``pipe(prompt, **call_kwargs)`` with :class:`RadialAttention` installed, then restore the pipeline.

    ``preset`` defaults to the pipeline's family (``"wan"`` or ``"hunyuan_video"``); ``radial`` overrides preset
    fields (e.g. ``{"dense_steps": 2}`` for a few-step LoRA). ``parallel`` (an int N or a diffusers
    ``ContextParallelConfig(ulysses_degree=N)``) runs the video on N processes with Ulysses context parallelism
    (each rank gets the whole output); it stays enabled on the denoiser. Returns the pipeline's own output.
    """
    family = detect_family(pipe.transformer).name
    edit = RadialAttention.preset(preset or family, **(radial or {}))
    if parallel is not None:
        from attnedit.core.parallel import enable_ulysses

        enable_ulysses(pipe, parallel)
    with install(pipe, edit, backend=backend) as handle:
        handle.new_run()
        return pipe(prompt=prompt, **call_kwargs)
