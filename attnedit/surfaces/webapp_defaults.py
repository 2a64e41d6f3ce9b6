"""The app's starting values and size limits, read from the model: the built-ins' own call settings (CFG 4, 20
steps, 64 px; shapes-t2v: 32 px, 9 frames), else the pipeline's; and the words a built-in model knows."""

from __future__ import annotations

from typing import Any

from attnedit.models.zoo import denoiser


def unknown_words(pipe: Any, prompt: str) -> list[str]:
    """Words of ``prompt`` a built-in model never saw (its tokenizer would spell them letter by letter)."""
    from attnedit.shapes.builtin import builtin_name
    from attnedit.shapes.world import WORDS

    if builtin_name(pipe) is None and not getattr(pipe, "attnedit_defaults", None):
        return []
    words = [w.strip(".,;:!?'\"").lower() for w in (prompt or "").split()]
    return [w for w in dict.fromkeys(words) if w and w not in WORDS and w != "the"]


def model_settings(pipe: Any) -> dict:
    """What the app's controls start at: the model's own call defaults (the built-ins: CFG 4, 20 steps, their
    size and frames), else the pipeline's size, 30 steps and CFG 7.5; sizes are multiples of ``multiple``."""
    from attnedit.shapes.builtin import model_defaults

    call = model_defaults(pipe, "call")
    model = denoiser(pipe)
    factor = getattr(pipe, "vae_scale_factor_spatial", None) or getattr(pipe, "vae_scale_factor", 8)
    if getattr(pipe, "unet", None) is not None:
        multiple = factor * 2 ** (len(model.config.block_out_channels) - 1)
    else:
        patch = getattr(model.config, "patch_size", 1) or 1
        multiple = factor * (patch[-1] if isinstance(patch, (list, tuple)) else patch)
    sample = getattr(model.config, "sample_size", None)
    native = call.get("height") or (sample * factor if isinstance(sample, int) else 512)
    return {"guidance_scale": call.get("guidance_scale", 7.5), "steps": call.get("num_inference_steps", 30),
            "height": native, "width": call.get("width", native), "frames": call.get("num_frames", 33),
            "multiple": multiple, "max_size": 4 * native, "temporal": getattr(pipe, "vae_scale_factor_temporal", 4)}


def check_size(pipe: Any, width: int, height: int, frames: int | None = None) -> None:
    """ValueError naming a size the model cannot take (not a multiple of its latent patch, or too large)."""
    settings = model_settings(pipe)
    for name, value in (("width", width), ("height", height)):
        m, top = settings["multiple"], settings["max_size"]
        if int(value) != value or not m <= value <= top or value % m:
            raise ValueError(f"{name}={value} must be a multiple of {m} px in {m}..{top} for this model")
    if frames is not None:
        t, top = settings["temporal"], 4 * settings["frames"]
        if int(frames) != frames or not 1 <= frames <= top or (frames - 1) % t:
            raise ValueError(f"frames={frames} must be 1 + a multiple of {t} in 1..{top} for this model")


def builtin_video_settings() -> dict:
    """:func:`model_settings` of shapes-t2v without loading it (32 px, its trained 9 frames, 16 px multiples)."""
    from attnedit.shapes.builtin import CALL_DEFAULTS

    call = CALL_DEFAULTS["shapes-t2v"]
    return {"frames": call["num_frames"], "height": call["height"], "width": call["width"], "multiple": 4,
            "max_size": 4 * call["height"], "temporal": 2, "steps": call["num_inference_steps"]}
