"""Load a pipeline from a hub id, a local folder, or the offline tiny zoo; pick device and dtype."""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline

TINY_PREFIX = "tiny:"
DEFAULT_MODEL = "tiny:sd15"


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
    """``model``: a hub id, a local diffusers folder, or ``tiny:<family>`` (random weights, offline)."""
    model = model or DEFAULT_MODEL
    device = pick_device(device)
    if model.startswith(TINY_PREFIX):
        from . import zoo

        family = model[len(TINY_PREFIX):]
        if family not in zoo.FAMILIES:
            raise ValueError(f"unknown tiny model {model!r}; valid: {[TINY_PREFIX + f for f in zoo.FAMILIES]}")
        pipe = zoo.load_tiny_pipeline(family)
    else:
        pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=pick_dtype(device, dtype))
    return pipe.to(device)


def tiny_defaults(model: str | None, task_name: str) -> dict:
    """The offline tiny models only work at their small sizes: the task parameters to use unless given."""
    from . import zoo

    model = model or DEFAULT_MODEL
    family = model[len(TINY_PREFIX):] if model.startswith(TINY_PREFIX) else None
    if family not in zoo.FAMILIES or task_name == "edit":
        return {}
    defaults = zoo.call_kwargs(family)
    out = {k: defaults[k] for k in ("width", "height") if k in defaults}
    if task_name == "video" and "num_frames" in defaults:
        out["frames"] = defaults["num_frames"]
    return out
