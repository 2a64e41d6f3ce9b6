"""Load a pipeline from a hub id, a local folder, a built-in trained model or the tiny zoo; pick device and dtype.

Without a model the CLI and the app use the built-in trained models (:mod:`attnedit.shapes.builtin`): ``shapes-t2i``
for images and edits, ``shapes-t2v`` for video. They ship with the package, so the main job runs offline on a CPU.
"""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline

TINY_PREFIX = "tiny:"
DEFAULT_MODEL = "shapes-t2i"
DEFAULT_VIDEO_MODEL = "shapes-t2v"


def pick_device(device: str | None = None) -> str:
    """The fastest device available unless one is named: cuda, then mps, then cpu."""
    if device:
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(device: str, dtype: str | None = None) -> torch.dtype:
    """float32 on CPU; bfloat16 on GPUs that support it, else float16."""
    if dtype:
        names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
                 "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
        if dtype not in names:
            raise ValueError(f"dtype={dtype!r}; valid: {sorted(names)}")
        return names[dtype]
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float16 if device == "mps" else torch.float32


def load_pipeline(model: str | None = None, device: str | None = None, dtype: str | None = None) -> DiffusionPipeline:
    """``model``: a hub id, a local diffusers folder, a built-in model (``shapes-t2i``, ``shapes-t2v``: trained,
    offline) or ``tiny:<family>`` (random weights, offline)."""
    from attnedit.shapes.builtin import BUILTIN_MODELS, load_builtin

    model = model or DEFAULT_MODEL
    device = pick_device(device)
    if model in BUILTIN_MODELS:
        return load_builtin(model, device, pick_dtype(device, dtype) if device != "cpu" else torch.float32)
    if model.startswith(TINY_PREFIX):
        from attnedit.models import zoo

        family = model[len(TINY_PREFIX):]
        if family not in zoo.FAMILIES:
            raise ValueError(f"unknown tiny model {model!r}; valid: {[TINY_PREFIX + f for f in zoo.FAMILIES]}")
        pipe = zoo.load_tiny_pipeline(family)
    else:
        pipe = DiffusionPipeline.from_pretrained(model, dtype=pick_dtype(device, dtype))
    return pipe.to(device)


def default_model(task_name: str) -> str:
    """The model a task uses when none is given: the built-in video model for video, else the image model."""
    return DEFAULT_VIDEO_MODEL if task_name == "video" else DEFAULT_MODEL


def tiny_defaults(model: str | None, task_name: str) -> dict:
    """The built-in and tiny models only work at their small sizes: the task parameters to use unless given."""
    from attnedit.models import zoo
    from attnedit.shapes.builtin import BUILTIN_MODELS, CALL_DEFAULTS, EDIT_DEFAULTS

    model = model or default_model(task_name)
    if model in BUILTIN_MODELS:
        defaults = CALL_DEFAULTS[model]
        if task_name == "edit":
            return dict(EDIT_DEFAULTS.get(model, {}))
        out = {k: defaults[k] for k in ("width", "height", "guidance_scale") if k in defaults}
        if task_name == "video":
            out.update(frames=defaults.get("num_frames"), max_sequence_length=defaults.get("max_sequence_length"))
        return {k: v for k, v in out.items() if v is not None}
    family = model[len(TINY_PREFIX):] if model.startswith(TINY_PREFIX) else None
    if family not in zoo.FAMILIES or task_name == "edit":
        return {}
    defaults = zoo.call_kwargs(family)
    out = {k: defaults[k] for k in ("width", "height") if k in defaults}
    if task_name == "video" and "num_frames" in defaults:
        out["frames"] = defaults["num_frames"]
    return out
