"""What every task parameter may be: one table the CLI and batch jobs both check before any model is loaded.

A bad value is one ``ValueError`` naming the parameter (as the surface spells it: ``--width`` on the command line,
``width`` in a job file) and the value. Limits are generous (a side up to 8192 px, 1024 frames, 1000 steps): they
exist to refuse mistakes (0, negative, NaN, a typo'd extra digit), not to guess what a GPU can hold.
Imports nothing heavy (no torch): the CLI validates its arguments at start-up speed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from attnedit.methods.radial_presets import ALIASES as RADIAL_ALIASES
from attnedit.methods.radial_presets import PRESETS as RADIAL_PRESETS
from attnedit.methods.refocusing_schedule import SCHEDULES

TINY_PREFIX = "tiny:"
DEFAULT_MODEL = "shapes-t2i"  # the built-in trained models (attnedit.shapes.builtin), offline on a CPU
DEFAULT_VIDEO_MODEL = "shapes-t2v"
MAX_SIDE = 8192  # px, width/height of generated and edited images
MAX_FRAMES = 1024
MAX_STEPS = 1000
MAX_IMAGES = 64
ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,100}")  # no '.': '<id>.<what>' names can then never collide
# tiny:<name> models known by kind before loading (the rest are told by their pipeline once loaded)
TINY_KINDS = {"sd15": "image", "sdxl": "image", "sd3": "image", "flux": "image", "wan": "video", "wan22": "video",
              "hunyuan_video": "video"}

Rule = Callable[[str, Any], Any]  # (name as the user spells it, value) -> the value to use; raises ValueError


def integer(lo: int, hi: int) -> Rule:
    """An int in [lo, hi] (an integral float such as 30.0 from YAML counts; a bool does not)."""

    def check(name: str, value: Any) -> int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise ValueError(f"{name}={value!r} must be an integer in [{lo}, {hi}]")
        return value

    return check


def number(lo: float, hi: float, *, above: bool = False) -> Rule:
    """A finite number in [lo, hi] (in (lo, hi] with ``above``): NaN and inf are refused."""

    def check(name: str, value: Any) -> float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or not (lo < value if above else lo <= value) or value > hi:
            raise ValueError(f"{name}={value!r} must be a finite number in {'(' if above else '['}{lo}, {hi}]")
        return float(value)

    return check


def text(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{name}={value!r} must be a string")
    return value


def boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} must be true or false")
    return value


def choice(*values: str) -> Rule:
    def check(name: str, value: Any) -> str:
        if value not in values:
            raise ValueError(f"{name}={value!r}; valid: {list(values)}")
        return value

    return check


def image_file(name: str, value: Any) -> Any:
    """A readable image file of at most MAX_SIDE x MAX_SIDE (the header is read, not the pixels); a PIL image passes."""
    if not isinstance(value, (str, Path)):
        if hasattr(value, "size") and hasattr(value, "convert"):
            return value
        raise ValueError(f"{name}={value!r} must be an image file path")
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(value) as image:
            width, height = image.size
    except Image.DecompressionBombError:
        raise ValueError(f"{name}={str(value)!r} is larger than {MAX_SIDE}x{MAX_SIDE} px") from None
    except (OSError, UnidentifiedImageError) as error:
        reason = getattr(error, "strerror", None) or "not a readable image"
        raise ValueError(f"{name}={str(value)!r}: {reason}") from None
    if not (1 <= width <= MAX_SIDE and 1 <= height <= MAX_SIDE):
        raise ValueError(f"{name}={str(value)!r} is {width}x{height} px; at most {MAX_SIDE}x{MAX_SIDE} is supported")
    return value


def mask(name: str, value: Any) -> Any:
    """A mask image path, or a box [x0, y0, x1, y1] in pixels with x0 < x1 and y0 < y1."""
    if isinstance(value, (list, tuple)):
        coords = [number(-MAX_SIDE, 2 * MAX_SIDE)(name, v) for v in value] if len(value) == 4 else []
        if len(coords) != 4 or coords[0] >= coords[2] or coords[1] >= coords[3]:
            raise ValueError(f"{name}={list(value)!r} must be a box [x0, y0, x1, y1] with x0 < x1 and y0 < y1")
        return list(value)
    return image_file(name, value)


def layout(name: str, value: Any) -> Any:
    """A refocusing layout: a dict, JSON text or a JSON file path (parsed now so a typo fails before loading)."""
    from attnedit.methods.refocusing import Layout

    if not isinstance(value, (dict, str)):
        raise ValueError(f"{name}={value!r} must be a layout object, JSON text or a JSON file path")
    try:
        Layout.from_dict(value) if isinstance(value, dict) else Layout.from_json(value)
    except OSError as error:
        raise ValueError(f"{name}={value!r}: {error.strerror}") from None
    except (ValueError, TypeError, KeyError, IndexError) as error:  # malformed regions: say so, not where it broke
        raise ValueError(f"{name}={str(value)[:80]!r}: {error}") from None
    return value


def layers(name: str, value: Any) -> list:
    """compose: a list of {image, mask, dx, dy}."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"{name}={value!r} must be a non-empty list of {{image, mask, dx, dy}}")
    for index, layer in enumerate(value):
        where = f"{name}[{index}]"
        if not isinstance(layer, dict) or not {"image", "mask"} <= set(layer) or set(layer) - {"image", "mask", "dx", "dy"}:
            raise ValueError(f"{where}={layer!r} must be an object with image, mask and optional dx, dy")
        image_file(f"{where}.image", layer["image"])
        mask(f"{where}.mask", layer["mask"])
        for key in ("dx", "dy"):
            if key in layer:
                OFFSET(f"{where}.{key}", layer[key])
    return value


SIDE, STEPS, OFFSET = integer(8, MAX_SIDE), integer(1, MAX_STEPS), integer(-MAX_SIDE, MAX_SIDE)
SAMPLING: dict[str, Rule] = {
    "prompt": text, "negative_prompt": text, "seed": integer(0, 2**63 - 1), "steps": STEPS,
    "guidance_scale": number(0, 100), "width": SIDE, "height": SIDE,
}
FIELDS: dict[str, dict[str, Rule]] = {
    "generate": {**SAMPLING, "num_images": integer(1, MAX_IMAGES), "layout": layout,
                 "refocus_steps": integer(0, MAX_STEPS), "schedule": choice(*SCHEDULES), "heads": text,
                 "pag_scale": number(-100, 100), "pag_strength": number(0, 1)},
    "edit": {"operation": choice("remove", "move", "resize", "flip", "zoom-out", "pan", "compose"),
             "image": image_file, "mask": mask, "dx": OFFSET, "dy": OFFSET, "scale": number(0, 16, above=True),
             "direction": choice("h", "v", "left", "right", "up", "down"), "amount": integer(0, MAX_SIDE),
             "layers": layers, "steps": STEPS, "dilation": integer(0, 1024), "fill_dilation": integer(0, 1024),
             "guidance_scale": number(0, 100),
             "hole_noise": number(0, 1)},
    "video": {**SAMPLING, "frames": integer(1, MAX_FRAMES), "radial": boolean, "dense_steps": integer(0, MAX_STEPS),
              "dense_layers": integer(0, 1000), "decay": number(0, 100, above=True), "fps": integer(1, 240),
              "radial_preset": choice(*RADIAL_PRESETS, *RADIAL_ALIASES), "dense_tail_steps": integer(0, MAX_STEPS),
              "save_frames": boolean, "max_sequence_length": integer(1, 4096)},
}
_NEEDS_MASK = ("remove", "move", "resize", "flip")
_DIRECTIONS = {"flip": ("h", "v"), "pan": ("left", "right", "up", "down")}


def check_params(task: str, params: dict[str, Any], spell: Callable[[str], str] = str) -> dict[str, Any]:
    """``params`` with every value checked (and ints/floats normalised); ``spell(name)`` is how errors name it."""
    fields = FIELDS[task]
    unknown = sorted(set(params) - set(fields))
    if unknown:
        raise ValueError(f"{task}: unknown parameter(s) {[spell(k) for k in unknown]}; valid: {sorted(fields)}")
    out = {k: fields[k](spell(k), v) for k, v in params.items() if v is not None}
    if task in ("generate", "video") and not out.get("prompt", "").strip() and not out.get("layout"):
        raise ValueError(f"{task}: {spell('prompt')} is required")
    if task == "generate" and out.get("refocus_steps", 0) > out.get("steps", MAX_STEPS):
        raise ValueError(f"{spell('refocus_steps')}={out['refocus_steps']} must be <= {spell('steps')}={out['steps']}")
    if task == "edit":
        _check_edit(out, spell)
    return out


def _check_edit(params: dict[str, Any], spell: Callable[[str], str]) -> None:
    operation = params.get("operation")
    if operation is None:
        raise ValueError(f"edit: {spell('operation')} is required")
    for needed in ("image",) + (("mask",) if operation in _NEEDS_MASK else ()) + (("layers",) if operation == "compose" else ()):
        if needed not in params:
            raise ValueError(f"edit {operation}: {spell(needed)} is required")
    direction = params.get("direction")
    if direction is not None and direction not in _DIRECTIONS.get(operation, ()):
        raise ValueError(f"{spell('direction')}={direction!r} for {operation}; valid: {list(_DIRECTIONS.get(operation, ()))}")
    if operation == "zoom-out" and not 0 < params.get("scale", 0.5) < 1:
        raise ValueError(f"{spell('scale')}={params['scale']!r} for zoom-out must be in (0, 1)")


def check_id(value: Any) -> str:
    """A job id is 1-100 ASCII letters, digits, '_' or '-': a plain file name on every system, and free of '.' so
    that no job's files (``<id>.png``, ``<id>.0001.png``, ``<id>.job.json``) can be another job's or the batch's."""
    if isinstance(value, bool) or not isinstance(value, (str, int)) or not ID_PATTERN.fullmatch(str(value)):
        raise ValueError(f"id={value!r} must be 1-100 characters of A-Z, a-z, 0-9, '_' and '-'")
    return str(value)


def model_kind(model: str) -> str | None:
    """'image' or 'video' for the built-in and tiny models (known by name, before loading); None for the rest."""
    if model in ("shapes-t2i", "shapes-dit"):
        return "image"
    if model == "shapes-t2v":
        return "video"
    if model.startswith("tiny:"):
        return TINY_KINDS.get(model[5:])
    return None


def pipeline_kind(pipe: Any) -> str:
    """'video' if the loaded pipeline's call takes ``num_frames``, else 'image'."""
    import inspect

    return "video" if "num_frames" in inspect.signature(pipe.__call__).parameters else "image"


def check_model_kind(model: str, task: str, kind: str | None) -> None:
    """``generate``/``edit`` need an image model and ``video`` a video model: say which, not a traceback later."""
    wanted = "video" if task in ("video", "edit-video") else "image"
    if kind is not None and kind != wanted:
        article = {"image": "an image", "video": "a video"}
        raise ValueError(f"model={model!r} is {article[kind]} model; {task} needs {article[wanted]} model")


def check_device(name: str, value: str | None) -> None:
    """A named device must exist here: ``--device cuda`` on a machine without one is refused before loading."""
    if value is None:
        return
    import torch

    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        raise ValueError(f"{name}={value!r} is not a device; valid: cpu, cuda, cuda:N, mps, xpu") from None
    if device.type == "cpu":
        return
    if device.type == "mps":
        count = int(torch.backends.mps.is_available())
    elif device.type in ("cuda", "xpu"):
        backend = getattr(torch, device.type, None)
        count = backend.device_count() if backend is not None and backend.is_available() else 0
    else:
        raise ValueError(f"{name}={value!r}: attnedit runs on cpu, cuda, mps or xpu")
    if (device.index or 0) >= count:
        found = f"{count} {device.type} device(s)" if count else f"no {device.type} device"
        raise ValueError(f"{name}={value!r}: this machine has {found}")


def check_output(name: str, value: str, suffixes: tuple[str, ...] = ()) -> Path:
    """An output path we can write: a supported extension, not a folder, its folder creatable and writable.
    Checked before any model loads, so a typo costs a second, not a generation."""
    import os

    path = Path(value)
    if suffixes and path.suffix.lower() not in suffixes:
        raise ValueError(f"{name}={value!r} must end in {' or '.join(suffixes)}")
    if suffixes and path.is_dir():
        raise ValueError(f"{name}={value!r} is a folder; give a file name")
    if not suffixes and path.exists() and not path.is_dir():
        raise ValueError(f"{name}={value!r} is a file; give a folder")
    folder = (path.parent if suffixes else path).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"{name}={value!r}: {str(folder)!r} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{name}={value!r}: the folder {str(folder)!r} is not writable")
    return path
