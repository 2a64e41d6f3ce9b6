"""Load a pipeline from a hub id, a local folder, a built-in trained model or the tiny zoo; pick device and dtype.

Without a model the CLI and the app use the built-in trained models (:mod:`attnedit.shapes.builtin`): ``shapes-t2i``
for images and edits, ``shapes-t2v`` for video. They ship with the package, so the main job runs offline on a CPU.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from diffusers import DiffusionPipeline

if TYPE_CHECKING:
    from attnedit.surfaces.memory import MemoryPlan

from attnedit.surfaces.params import DEFAULT_MODEL, DEFAULT_VIDEO_MODEL, TINY_PREFIX  # noqa: F401 (re-exported)


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


def load_pipeline(model: str | None = None, device: str | None = None, dtype: str | None = None, *,
                  memory: str | MemoryPlan | None = "auto", quantize: str | None = None,
                  lora: Sequence[str] | str | None = None, variant: str | None = None) -> DiffusionPipeline:
    """``model``: a hub id, a local diffusers folder, a built-in model (``shapes-t2i``, ``shapes-t2v``: trained,
    offline) or ``tiny:<family>`` (random weights, offline).

    ``memory``: a plan of :mod:`attnedit.surfaces.memory` (``auto`` picks the fastest that fits and prints why on
    an accelerator); ``quantize``: ``int8``, ``fp8``, ``bnb-8bit``, ``bnb-4bit`` or a ``.gguf`` transformer file
    (:mod:`attnedit.surfaces.quantize`); ``lora``: ``PATH_OR_ID[:SCALE]`` specs; ``variant``: e.g. ``fp16`` files.
    Options are checked before anything loads. Example: ``load_pipeline("black-forest-labs/FLUX.1-dev",
    memory="auto", quantize="int8", lora=["my_lora.safetensors:0.8"])``.
    """
    from attnedit.shapes.builtin import BUILTIN_MODELS, load_builtin, model_path
    from attnedit.surfaces.memory import apply_plan, module_size, parse_memory, resolve_memory
    from attnedit.surfaces.quantize import check_quantize, gguf_transformer, load_loras, parse_lora, quantization_config

    model = model or DEFAULT_MODEL
    device = pick_device(device)
    memory, quantize = parse_memory(memory), check_quantize(quantize, device)
    loras = [parse_lora(spec) for spec in ([lora] if isinstance(lora, str) else lora or [])]
    torch_dtype = pick_dtype(device, dtype) if model not in BUILTIN_MODELS or device != "cpu" else torch.float32
    dtype_bytes = torch.finfo(torch_dtype).bits // 8
    if model.startswith(TINY_PREFIX):
        from attnedit.models import zoo

        family = model[len(TINY_PREFIX):]
        if family not in zoo.FAMILIES + zoo.EXTRA_PIPELINES:
            valid = [TINY_PREFIX + f for f in zoo.FAMILIES + zoo.EXTRA_PIPELINES]
            raise ValueError(f"unknown tiny model {model!r}; valid: {valid}")
        if quantize:
            raise ValueError(f"quantize={quantize!r} needs a hub id or a diffusers folder, not {model!r}")
        pipe = zoo.load_tiny_pipeline(family)
        sizes = ({k: module_size(v) for k, v in pipe.components.items() if isinstance(v, torch.nn.Module)},
                 type(pipe).__name__)
        plan = resolve_memory(memory, model, device, dtype_bytes=dtype_bytes, sizes=sizes)
    else:  # the plan is decided from the configs, before any weight loads
        source = str(model_path(model)) if model in BUILTIN_MODELS else model
        plan = resolve_memory(memory, source, device, dtype_bytes=dtype_bytes, quantize=quantize)
        if model in BUILTIN_MODELS and not quantize:
            pipe = load_builtin(model, "cpu", torch_dtype)
        else:
            extra = gguf_transformer(source, quantize, torch_dtype) if quantize and quantize.endswith(".gguf") else {}
            pipe = DiffusionPipeline.from_pretrained(
                source, dtype=torch_dtype, variant=variant, **extra,
                quantization_config=quantization_config(source, quantize, torch_dtype))
    load_loras(pipe, loras)
    if memory == "auto" and device != "cpu":
        print(f"attnedit: memory: auto chose {plan.reason}", file=sys.stderr)
    return apply_plan(pipe, plan, device)


def default_model(task_name: str) -> str:
    """The model a task uses when none is given: the built-in video model for video, else the image model."""
    return DEFAULT_VIDEO_MODEL if task_name in ("video", "edit-video") else DEFAULT_MODEL


def tiny_defaults(model: str | None, task_name: str) -> dict:
    """The built-in and tiny models only work at their small sizes: the task parameters to use unless given."""
    from attnedit.models import zoo
    from attnedit.shapes.builtin import BUILTIN_MODELS, CALL_DEFAULTS

    model = model or default_model(task_name)
    if model in BUILTIN_MODELS:
        defaults = CALL_DEFAULTS[model]
        if task_name == "edit":  # the editor reads the model's own edit settings (pipe.attnedit_defaults)
            return {}
        out = {k: defaults[k] for k in ("width", "height", "guidance_scale") if k in defaults}
        if task_name == "video":
            out.update(frames=defaults.get("num_frames"), max_sequence_length=defaults.get("max_sequence_length"))
        return {k: v for k, v in out.items() if v is not None}
    family = model[len(TINY_PREFIX):] if model.startswith(TINY_PREFIX) else None
    if family not in zoo.FAMILIES + zoo.EXTRA_PIPELINES or task_name == "edit":
        return {}
    defaults = zoo.call_kwargs(family)
    out = {k: defaults[k] for k in ("width", "height") if k in defaults}
    if task_name == "video" and "num_frames" in defaults:
        out["frames"] = defaults["num_frames"]
    return out
