"""What the app's method tabs run: grounded generation, DesignEdit, head guidance and radial video.

Plain functions (arrays and strings in, uint8 arrays out, ValueError on bad input) over the method APIs, so they
are tested without a browser; :mod:`attnedit.surfaces.webapp` lays out the Gradio components around them.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageColor, ImageDraw

from attnedit.core.edits import AttentionRecorder
from attnedit.families import detect_family
from attnedit.methods.attention_maps import token_heatmaps
from attnedit.methods.head_guidance import load_heads, perturbed_guidance
from attnedit.methods.radial import RadialAttention
from attnedit.methods.refocusing import DEFAULT_SCHEDULE, SCHEDULES, Layout, RefocusConfig, Region, token_layout  # noqa: F401
from attnedit.models.zoo import denoiser
from attnedit.pipelines.design_edit import PAN_DIRECTIONS, DesignEditConfig, DesignEditor  # noqa: F401
from attnedit.pipelines.radial import generate_radial
from attnedit.pipelines.refocusing import refocus
from attnedit.shapes.builtin import call_options
from attnedit.surfaces.webapp_defaults import (  # noqa: F401  (the app reads them as tabs.*)
    builtin_video_settings,
    check_size,
    model_settings,
    unknown_words,
)

MAX_STEPS = 100
COLORS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324")
OPERATIONS = ("remove", "move", "resize", "flip", "zoom out", "pan")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(int(seed))


def _uint8(image: np.ndarray) -> np.ndarray:
    """Float image(s) in [0, 1] -> uint8."""
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def _normalized(heat: torch.Tensor) -> np.ndarray:
    heat = (heat - heat.min()) / (heat.max() - heat.min() + 1e-8)
    return (heat.numpy() * 255).astype(np.uint8)


def overlay(image: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """A uint8 heat map (H, W) laid over ``image`` (H, W, 3) as a red-yellow glow on the dimmed picture."""
    h = heat.astype(np.float32)[..., None] / 255
    glow = np.concatenate([np.ones_like(h), h, np.zeros_like(h)], -1) * 255
    return (0.45 * image[..., :3] + 0.55 * (h * glow + (1 - h) * 0.3 * image[..., :3])).round().astype(np.uint8)


def pick_seed(seed: float | None, randomize: bool = False) -> int:
    """The seed a run uses: a fresh random one when asked (then shown back in the seed box), else ``seed``."""
    if randomize:
        import random

        return random.randrange(2**31)
    if seed is None or int(seed) != seed or not 0 <= seed < 2**63:
        raise ValueError(f"seed={seed} must be a whole number >= 0 (or tick 'random seed')")
    return int(seed)


def _check_steps(steps: int) -> int:
    if not 1 <= int(steps) <= MAX_STEPS:
        raise ValueError(f"steps={steps} must be in 1..{MAX_STEPS}")
    return int(steps)


def _check_prompt(prompt: str) -> str:
    if not prompt or not prompt.strip():
        raise ValueError("the prompt is empty")
    return prompt.strip()


# ------------------------------------------------------------------------------------- grounded generation
def parse_layout(prompt: str, text: str) -> Layout:
    """A Layout from lines ``phrase: x0,y0,x1,y1`` (normalized; several boxes separated by ``;``)."""
    regions = []
    for number, line in enumerate(text.strip().splitlines(), start=1):
        if not line.strip():
            continue
        phrase, sep, boxes = line.rpartition(":")
        if not sep or not phrase.strip():
            raise ValueError(f"line {number} {line.strip()!r} must read 'phrase: x0,y0,x1,y1'")
        try:
            parsed = tuple(tuple(float(v) for v in box.split(",")) for box in boxes.split(";") if box.strip())
        except ValueError:
            raise ValueError(f"line {number} {line.strip()!r}: boxes must be numbers like 0.1,0.2,0.5,0.9") from None
        regions.append(Region(phrase.strip(), parsed))
    return Layout(_check_prompt(prompt), tuple(regions))


def draw_layout(layout: Layout, size: int = 256) -> np.ndarray:
    """A white (size, size, 3) canvas with each phrase's boxes outlined and labelled in its own colour."""
    canvas = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(canvas)
    for region, color in zip(layout.regions, COLORS * 8):
        for x0, y0, x1, y1 in region.boxes:
            draw.rectangle([x0 * size, y0 * size, x1 * size - 1, y1 * size - 1], outline=color, width=3)
            draw.text((x0 * size + 5, y0 * size + 4), region.phrase, fill=color)
    return np.asarray(canvas)


@dataclass(frozen=True, kw_only=True)
class _DetachedRecorder(AttentionRecorder):
    """Records without the autograd graph (refocusing forwards run with gradients)."""

    def record(self, call: Any, probs: torch.Tensor) -> None:
        super().record(call, probs.detach())


def run_grounded(pipe: Any, prompt: str, boxes: str, seed: int, steps: int, refocus_steps: int,
                 guidance: float, schedule: str = DEFAULT_SCHEDULE, **options: Any) -> tuple[np.ndarray, list]:
    """Refocused image (H, W, 3) uint8 and [(heat map, phrase)] averaged over each phrase's tokens; ``schedule``
    names a refocusing schedule (``SCHEDULES``: the cheap ``fast`` too); ``options`` (width, height,
    negative_prompt) go to the pipeline."""
    layout = check_phrases(parse_layout(prompt, boxes))
    config = RefocusConfig(schedule=schedule, refocus_steps=int(refocus_steps))
    sd3 = getattr(pipe, "transformer", None) is not None
    recorder = _DetachedRecorder(kinds=frozenset({"joint" if sd3 else "cross"}), branches=frozenset({"cond"}),
                                 queries="image" if sd3 else "all")
    result = refocus(pipe, layout, config=config, edits=(recorder,), num_inference_steps=_check_steps(steps),
                     generator=_gen(seed), guidance_scale=float(guidance), output_type="np", **options)
    image = _uint8(result.images[0])
    heat = token_heatmaps(recorder.maps, size=image.shape[:2])
    tokens = token_layout(pipe, layout)
    maps = []
    for region, members in zip(layout.regions, tokens.phrases):
        positions = [tokens.content[i] for i in members]
        maps.append((overlay(image, _normalized(heat[positions].mean(dim=0))), region.phrase))
    return image, maps


def check_phrases(layout: Layout) -> Layout:
    """ValueError for a box still labelled "phrase" (the canvas's placeholder) and for phrases the prompt does not
    contain (their tokens would be appended to the prompt behind the user's back)."""
    for region in layout.regions:
        if region.phrase.strip().lower() == "phrase":
            raise ValueError("a box is still labelled 'phrase': name each box with its phrase from the prompt")
        if region.phrase.lower() not in layout.prompt.lower():
            raise ValueError(f"phrase {region.phrase!r} is not in the prompt {layout.prompt!r}: use the prompt's "
                             "words for each box, or add the phrase to the prompt")
    return layout


CANVAS = 512  # pixels of the blank canvas boxes are drawn on


def blank_canvas() -> np.ndarray:
    return np.full((CANVAS, CANVAS, 3), 255, dtype=np.uint8)


def annotations_to_lines(value: dict | None) -> str:
    """Boxes drawn on the canvas (gradio_image_annotation value, pixels) -> 'phrase: x0,y0,x1,y1' lines (0..1).

    The label of a drawn box is its phrase; several boxes with one label become one line joined by ';'.
    """
    boxes = (value or {}).get("boxes") or []
    if not boxes:
        raise ValueError("draw at least one box and name it with its phrase")
    image = (value or {}).get("image")
    height, width = (np.asarray(image).shape[:2] if image is not None and not isinstance(image, str) else (CANVAS, CANVAS))
    by_phrase: dict[str, list[str]] = {}
    for index, box in enumerate(boxes, start=1):
        phrase = str(box.get("label") or "").strip()
        if not phrase:
            raise ValueError(f"box {index} has no label: name each box with its phrase from the prompt")
        x0, x1 = sorted((box["xmin"] / width, box["xmax"] / width))
        y0, y1 = sorted((box["ymin"] / height, box["ymax"] / height))
        by_phrase.setdefault(phrase, []).append(",".join(f"{min(max(v, 0.0), 1.0):.3f}" for v in (x0, y0, x1, y1)))
    return "\n".join(f"{phrase}: {';'.join(found)}" for phrase, found in by_phrase.items())


def preview_layout(boxes: str) -> np.ndarray | None:
    try:
        return draw_layout(parse_layout("preview", boxes))
    except ValueError:
        return None


def layout_canvas(boxes: str) -> dict | None:
    """The box canvas's value showing ``boxes`` ('phrase: x0,y0,x1,y1' lines) in the preview's colours, each box
    labelled with its phrase: the drawn and the typed layout look alike. None when the lines do not parse yet."""
    try:
        layout = parse_layout("preview", boxes)
    except ValueError:
        return None
    drawn = [{"xmin": round(x0 * CANVAS), "ymin": round(y0 * CANVAS), "xmax": round(x1 * CANVAS),
              "ymax": round(y1 * CANVAS), "label": region.phrase, "color": list(ImageColor.getrgb(color))}
             for region, color in zip(layout.regions, COLORS * 8) for x0, y0, x1, y1 in region.boxes]
    return {"image": blank_canvas(), "boxes": drawn}


# ----------------------------------------------------------------------------------------------- DesignEdit
def edit_source(image: np.ndarray | None, value: dict | None) -> np.ndarray | None:
    """The image to edit: the plain upload, else the editor's background (the user uploaded into the editor).

    The plain input comes first: its value reaches the server on upload, where the editor's background can
    arrive late (a frontend race seen in headless browsers).
    """
    if image is None and value:
        return value.get("background")
    return image


def editor_mask(value: dict | None, like: np.ndarray | None = None) -> np.ndarray | None:
    """Bool (H, W) mask painted in a gr.ImageEditor value (any layer's alpha > 0).

    At the size of ``like`` (the image being edited) when given, else at the editor background's size.
    """
    if not value:
        return None
    reference = like if like is not None else value.get("background")
    if reference is None:
        return None
    height, width = reference.shape[:2]
    mask = np.zeros((height, width), dtype=bool)
    for layer in value.get("layers") or []:
        if layer is None or layer.ndim != 3 or layer.shape[-1] != 4:
            continue
        alpha = Image.fromarray((layer[..., 3] > 0).astype(np.uint8) * 255)
        mask |= np.asarray(alpha.resize((width, height), Image.NEAREST)) > 0
    return mask if mask.any() else None


def parse_box(text: str) -> list[int] | None:
    """Pixel box ``x0,y0,x1,y1`` from text; None when empty."""
    if not text or not text.strip():
        return None
    try:
        box = [int(v) for v in text.replace(" ", "").split(",")]
    except ValueError:
        raise ValueError(f"mask box {text.strip()!r} must be four integers x0,y0,x1,y1 in pixels") from None
    if len(box) != 4:
        raise ValueError(f"mask box {text.strip()!r} must be four integers x0,y0,x1,y1 in pixels")
    return box


def edit_settings(pipe: Any, image: np.ndarray | None = None) -> dict:
    """The Edit tab's starting values, from the model's own edit settings: mask growth (``growth``; zoom-out and
    pan: ``fill_growth``) in pixels of ``image`` (the model's are at its native size), hole noise and CFG."""
    editor = DesignEditor(pipe, DesignEditConfig(num_steps=2))
    scale = (max(image.shape[:2]) if image is not None else editor.native) / editor.native
    return {"growth": round(editor.config.dilation * scale), "fill_growth": round(editor.config.fill_dilation * scale),
            "hole_noise": editor.config.hole_noise, "guidance_scale": editor.config.guidance_scale}


def grown_mask(mask: np.ndarray, growth: int) -> np.ndarray:
    """Bool (H, W) ``mask`` grown by a ``growth``-pixel square kernel (what the hole becomes)."""
    from attnedit.methods.key_masking import dilate_kernel

    return dilate_kernel(torch.as_tensor(np.asarray(mask, bool)), int(growth)).numpy()


def mask_preview(image: np.ndarray, mask: np.ndarray | None, growth: int) -> np.ndarray:
    """``image`` with the mask tinted red and its growth yellow: the region the edit will repaint."""
    out = np.asarray(image[..., :3], np.float32).copy()
    if mask is None:
        return out.astype(np.uint8)
    mask = np.asarray(mask, bool)
    grown = grown_mask(mask, growth) & ~mask
    for region, colour in ((grown, (255, 210, 0)), (mask, (255, 0, 0))):
        out[region] = 0.45 * out[region] + 0.55 * np.array(colour, np.float32)
    return out.round().astype(np.uint8)


def run_edit(pipe: Any, image: np.ndarray | None, mask: Any, operation: str, *, dx: int = 0, dy: int = 0,
             scale: float = 0.5, flip: str = "h", pan: str = "left", amount: int = 16, steps: int = 12,
             growth: int | None = None, hole_noise: float | None = None,
             guidance_scale: float | None = None) -> np.ndarray:
    """Apply one DesignEdit ``operation`` to uint8 (H, W, 3) ``image``; ``mask`` is a bool array or pixel box.

    ``growth`` (mask growth in pixels of ``image``), ``hole_noise`` and ``guidance_scale``: None takes the model's.
    """
    if image is None:
        raise ValueError("upload an image first")
    if operation not in OPERATIONS:
        raise ValueError(f"operation={operation!r} must be one of {OPERATIONS}")
    if mask is None and operation not in ("zoom out", "pan"):
        raise ValueError(f"'{operation}' needs a mask: paint over the object or give a box x0,y0,x1,y1")
    config = DesignEditConfig(num_steps=_check_steps(steps), hole_noise=hole_noise, guidance_scale=guidance_scale)
    editor = DesignEditor(pipe, config)
    image = np.ascontiguousarray(image[..., :3].astype(np.uint8))
    if growth is not None and (int(growth) != growth or growth < 0):
        raise ValueError(f"mask growth={growth} must be a non-negative whole number of pixels")
    px = None if growth is None else round(int(growth) * editor.native / max(image.shape[:2]))
    ops = {
        "remove": lambda: editor.remove(image, mask, dilation=px),
        "move": lambda: editor.move(image, mask, dx=int(dx), dy=int(dy), dilation=px),
        "resize": lambda: editor.resize(image, mask, scale=float(scale), dilation=px),
        "flip": lambda: editor.flip(image, mask, direction=flip, dilation=px),
        "zoom out": lambda: editor.zoom_out(image, scale=float(scale), dilation=px),
        "pan": lambda: editor.pan(image, pan, int(amount), dilation=px),
    }
    return np.asarray(ops[operation]())


# -------------------------------------------------------------------------------------------- head guidance
def check_heads_text(text: str) -> str:
    """The head text box takes head syntax or a preset name, never a path: a path would open a file on the server
    (a ranking file is uploaded instead)."""
    from attnedit.methods.head_guidance import head_presets

    text = (text or "").strip()
    if text in head_presets() or re.fullmatch(r"[LlHh0-9:*,\s]*", text):
        return text
    raise ValueError(f"heads {text[:60]!r}: give head syntax ('L1H0,L1H1', '1:0', 'L1') or a preset name "
                     f"({', '.join(head_presets())}); upload a ranking JSON instead of typing a path")


def run_head_guidance(pipe: Any, prompt: str, heads: str, ranking: str | None, seed: int, steps: int,
                      guidance: float, scale: float, strength: float, **options: Any) -> tuple[np.ndarray, np.ndarray]:
    """(without, with) SoftPAG on ``heads`` (or the uploaded ranking file's heads), same seed; ``options``
    (width, height, negative_prompt) go to the pipeline."""
    spec = load_heads(ranking) if ranking else check_heads_text(heads)
    if not spec:
        raise ValueError("give heads, e.g. 'L1H0,L1H1' or '1:0', or upload a HeadHunter ranking JSON")
    kwargs = {"prompt": _check_prompt(prompt), "num_inference_steps": _check_steps(steps),
              "guidance_scale": float(guidance), "output_type": "np", **options}
    with perturbed_guidance(pipe, spec, scale=float(scale), strength=float(strength)):
        guided = pipe(**kwargs, generator=_gen(seed)).images[0]
    plain = pipe(**kwargs, generator=_gen(seed)).images[0]
    return _uint8(plain), _uint8(guided)


# -------------------------------------------------------------------------------------------------- video
def is_video(pipe: Any) -> bool:
    return detect_family(denoiser(pipe)).video


def run_video(pipe: Any, prompt: str, *, radial: bool, dense_steps: int, dense_layers: int, decay: float,
              block_size: int, frames: int, height: int, width: int, steps: int, seed: int) -> list[np.ndarray]:
    """Video frames (uint8 (H, W, 3) each) from a Wan / HunyuanVideo pipeline, radial attention on or off."""
    kwargs = {"num_frames": int(frames), "height": int(height), "width": int(width), "output_type": "np",
              "num_inference_steps": _check_steps(steps), "generator": _gen(seed), **call_options(pipe)}
    prompt = _check_prompt(prompt)
    if radial:
        overrides = {"dense_steps": int(dense_steps), "dense_layers": int(dense_layers), "decay": float(decay),
                     "block_size": int(block_size)}
        RadialAttention(**overrides)  # validate before the model runs
        out = generate_radial(pipe, prompt, radial=overrides, **kwargs)
    else:
        out = pipe(prompt=prompt, **kwargs)
    return list(_uint8(np.asarray(out.frames[0])))


def load_tiny_video_pipeline() -> Any:
    """The built-in trained Wan model, shapes-t2v (for apps whose own model is not a video model)."""
    from attnedit.shapes.builtin import load_builtin

    return load_builtin("shapes-t2v")


def has_video_export() -> bool:
    """imageio + imageio-ffmpeg write browser-playable H.264 (diffusers' OpenCV fallback does not)."""
    return all(importlib.util.find_spec(name) is not None for name in ("imageio", "imageio_ffmpeg"))


def frames_to_video(frames: list[np.ndarray], fps: int = 8) -> str | None:
    """An mp4 path when :func:`has_video_export`, else None (the gallery shows the frames)."""
    if not has_video_export():
        return None
    import atexit
    import shutil
    import tempfile

    from diffusers.utils import export_to_video

    if not _VIDEO_DIR:  # one file, rewritten per request (Gradio copies it into its cache), removed at exit
        _VIDEO_DIR.append(tempfile.mkdtemp(prefix="attnedit-video-"))
        atexit.register(shutil.rmtree, _VIDEO_DIR[0], True)
    return export_to_video([f.astype(np.float32) / 255 for f in frames], f"{_VIDEO_DIR[0]}/video.mp4", fps=fps)


_VIDEO_DIR: list[str] = []
