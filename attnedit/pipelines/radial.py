"""Run a Wan 2.x or HunyuanVideo pipeline with radial attention (Li et al. 2025, see :mod:`attnedit.methods.radial`).

>>> frames = generate_radial(pipe, "a fox running in snow", num_frames=69, height=768, width=1280).frames[0]  # doctest: +SKIP

The last steps dense as well (the step count comes from ``num_inference_steps``):

>>> generate_radial(pipe, "a fox running in snow", radial={"dense_tail_steps": 5}, num_inference_steps=50)  # doctest: +SKIP

One video on N GPUs (Ulysses context parallelism, :mod:`attnedit.core.parallel`), under ``torchrun --nproc_per_node N``:

>>> generate_radial(pipe, "a fox running in snow", parallel=N, num_frames=69)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

from attnedit.core.attention import BACKENDS
from attnedit.families import detect_family
from attnedit.core.install import install
from attnedit.methods.radial import RadialAttention


def default_preset(pipe: Any) -> str:
    """The authors' preset for this pipeline: ``"wan22"`` for Wan 2.2 (two denoisers, or one timestep per token as
    in TI2V-5B), else the family's (``"wan"``, ``"hunyuan_video"``)."""
    family = detect_family(pipe.transformer)
    if family.radial_preset is None:
        raise ValueError(f"radial attention needs a video diffusion transformer; this pipeline is {family.name}")
    return family.radial_preset(pipe)


def _num_steps(pipe: Any, call_kwargs: dict[str, Any]) -> int:
    """The run's denoising steps: ``num_inference_steps`` as given, else the pipeline's default for it."""
    if "num_inference_steps" in call_kwargs:
        return call_kwargs["num_inference_steps"]
    return inspect.signature(pipe.__call__).parameters["num_inference_steps"].default


def generate_radial(
    pipe: Any, prompt: str | list[str], *, preset: str | None = None, backend: str = "auto",
    radial: dict[str, Any] | None = None, parallel: Any = None, **call_kwargs: Any,
) -> Any:
    """Call ``pipe(prompt, **call_kwargs)`` with :class:`RadialAttention` installed, then restore the pipeline.

    ``preset`` defaults to :func:`default_preset` (``"wan22"``, ``"wan"`` or ``"hunyuan_video"``); ``radial``
    overrides preset fields (e.g. ``{"dense_steps": 2}``, ``{"dense_tail_steps": 5}``; ``num_steps`` is filled in
    from the call). ``parallel`` (an int N or a diffusers ``ContextParallelConfig(ulysses_degree=N)``) runs the video
    on N processes with Ulysses context parallelism (each rank gets the whole output); it stays enabled on the
    denoiser. Returns the pipeline's own output.
    """
    _check_arguments(pipe, radial, backend, preset)
    overrides = dict(radial or {})
    if overrides.get("dense_tail_steps") and overrides.get("num_steps") is None:
        overrides["num_steps"] = _num_steps(pipe, call_kwargs)
    edit = RadialAttention.preset(preset or default_preset(pipe), **overrides)
    if parallel is not None:
        from attnedit.core.parallel import enable_ulysses

        enable_ulysses(pipe, parallel)
    with install(pipe, edit, backend=backend) as handle:
        handle.new_run()
        return pipe(prompt=prompt, **call_kwargs)


def check_overrides(radial: Any, preset: Any = None) -> None:
    """``radial=`` is None or a dict of :class:`RadialAttention` field names; ``preset`` None or a name (their
    values are RadialAttention's to check)."""
    if preset is not None and not isinstance(preset, str):
        raise ValueError(f"preset={preset!r} must be a preset name (or None for the pipeline's)")
    if radial is not None and not isinstance(radial, dict):
        raise ValueError(f"radial={radial!r} must be a dict of RadialAttention fields (or None)")
    unknown = sorted(map(str, set(radial or {}) - {f.name for f in dataclasses.fields(RadialAttention) if f.init}))
    if unknown:
        raise ValueError(f"radial= names {unknown}, which are not RadialAttention fields")


def _check_arguments(pipe: Any, radial: Any, backend: Any, preset: Any) -> None:
    """One ValueError naming the argument, before any model runs."""
    check_overrides(radial, preset)
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; valid: {list(BACKENDS)}")
    model = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
    if model is None:
        raise ValueError(f"pipe={type(pipe).__name__} is not a video diffusion pipeline (Wan, HunyuanVideo)")
    family = detect_family(model)
    if not family.video:
        raise ValueError(f"generate_radial needs a video diffusion transformer; {type(pipe).__name__} is {family.name}")
