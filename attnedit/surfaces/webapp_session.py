"""What the app keeps beyond one tab: the model every tab runs (a picker among the built-ins and any model the user
loads) and the session's history of results, newest first, each with its seed and parameters.

Plain functions and one small holder, tested without a browser; :mod:`attnedit.surfaces.webapp` lays them out.
"""

from __future__ import annotations

import functools
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

HISTORY_SIZE = 16  # results kept per session (a bounded list in the browser session's state)
VIDEO_MODELS = ("shapes-t2v",)
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def check_model_source(name: str) -> str:
    """``name`` stripped, if it can name a model: a built-in, ``tiny:<family>``, an existing local folder or a hub
    id ``owner/name``. Why: anything else would only fail later, deep inside a hub download."""
    from attnedit.shapes.builtin import BUILTIN_MODELS
    from attnedit.surfaces.params import TINY_PREFIX

    name = (name or "").strip()
    if name and (name in BUILTIN_MODELS or name.startswith(TINY_PREFIX) or Path(name).expanduser().is_dir()):
        return name
    if HUB_ID.fullmatch(name) and not Path(name).parts[0] in (".", ".."):
        return name
    raise ValueError(f"model={name!r} is not a built-in ({', '.join(BUILTIN_MODELS)}), a local diffusers folder or "
                     "a hub id like owner/name")


class AppModel:
    """The pipeline the app's tabs run, switched by the model picker.

    Why a holder: every tab reads ``.pipe`` when it runs, so one load switches them all. The picker offers the
    built-ins and every model loaded in this app. ``loader(name)`` loads a pipeline (the app's memory options).
    """

    def __init__(self, pipe: Any, name: str, loader: Callable[[str], Any] | None = None) -> None:
        self.pipe, self.name = pipe, name
        self.loader = loader or _default_loader
        self.loaded = [name]
        self.lock = threading.Lock()

    def exclusive(self, fn: Callable) -> Callable:
        """``fn`` run while no other job uses the model. Why: Stop cancels a job's event, but its thread runs on
        to the end of the sampling loop; the next job must wait for it (else two runs share hooks and weights)."""

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with self.lock:
                return fn(*args, **kwargs)

        return wrapper

    def choices(self) -> list[str]:
        """The built-ins, then the models loaded in this app (the current one included)."""
        from attnedit.shapes.builtin import BUILTIN_MODELS

        return list(dict.fromkeys([*BUILTIN_MODELS, *self.loaded]))

    def image_pipe(self) -> Any:
        """The pipeline for the image tabs; ValueError when the current model makes videos."""
        from attnedit.surfaces.webapp_tabs import is_video

        if is_video(self.pipe):
            raise ValueError(f"{self.name} is a video model: use the Video tabs, or pick an image model above")
        return self.pipe

    def switch(self, name: str) -> Any:
        """Load ``name`` (kept when already current) and make it the model of every tab; a readable ValueError
        when it cannot be loaded (unknown id, not a diffusers folder, offline without a cached copy)."""
        name = check_model_source(name)
        if name == self.name:
            return self.pipe
        try:
            with self.lock:
                pipe = self.loader(name)
        except ValueError:
            raise
        except Exception as error:  # noqa: BLE001  (OSError, hub errors, a folder that is no pipeline: input)
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ValueError(f"could not load model {name!r}: {first[:300]}") from None
        pipe.set_progress_bar_config(disable=False)  # its steps are the app's progress bar
        self.pipe, self.name = pipe, name
        self.loaded = list(dict.fromkeys([*self.loaded, name]))
        return pipe


def _default_loader(name: str) -> Any:
    from attnedit.surfaces.loading import load_pipeline

    return load_pipeline(name)


def control_values(pipe: Any, kind: str) -> dict[str, Any]:
    """What a control of ``kind`` becomes for ``pipe``: its value (and for sizes its limits), as the tabs start.

    Kinds: steps, guidance, width, height, refocus_steps, growth, hole_noise, edit_guidance, frames, video_width,
    video_height (the video kinds read ``pipe`` only when it is a video model, else the built-in shapes-t2v).
    """
    from attnedit.surfaces import webapp_tabs as tabs

    if kind.startswith("video_") or kind == "frames":
        video = tabs.model_settings(pipe) if tabs.is_video(pipe) else tabs.builtin_video_settings()
        if kind == "frames":
            return {"value": video["frames"], "maximum": 4 * video["frames"], "step": video["temporal"]}
        m = video["multiple"]
        return {"value": video[kind[len("video_"):]], "minimum": m, "maximum": video["max_size"], "step": m}
    if kind in ("growth", "hole_noise", "edit_guidance"):
        edit = tabs.edit_settings(pipe)
        return {"value": edit["guidance_scale" if kind == "edit_guidance" else kind]}
    settings = tabs.model_settings(pipe)
    if kind in ("width", "height"):
        m = settings["multiple"]
        return {"value": settings[kind], "minimum": m, "maximum": settings["max_size"], "step": m,
                "label": f"{kind.capitalize()} (multiple of {m})"}
    return {"value": {"steps": settings["steps"], "guidance": settings["guidance_scale"],
                      "refocus_steps": settings["steps"] // 2}[kind]}


def caption(params: dict[str, Any], tab: str) -> str:
    """One history line: the tab, the seed, the prompt and the settings that made the result."""
    head = [tab] + ([f"seed {params['seed']}"] if "seed" in params else [])
    if params.get("prompt") and params.get("prompt") != params.get("operation"):
        head.append(repr(params["prompt"]))
    keys = ("operation", "box", "boxes", "heads", "pag_scale", "steps", "guidance_scale", "negative_prompt",
            "frames", "radial", "model")
    details = [f"{k} {str(params[k]).replace(chr(10), '; ')}" for k in keys if params.get(k) not in (None, "")]
    size = [f"{params['width']}x{params['height']}"] if "width" in params and "height" in params else []
    return " · ".join(head + [", ".join(details + size)])


def remember(history: list | None, results: list[tuple[Any, dict[str, Any], str]]) -> list:
    """``history`` with ``results`` ((image or path, parameters, tab) each) put first, at most HISTORY_SIZE long."""
    entries = [(image, caption(params, tab)) for image, params, tab in results if image is not None]
    return (entries[::-1] + list(history or []))[:HISTORY_SIZE]


def served_parameters(path: str | None) -> dict[str, Any]:
    """The parameters embedded in a result PNG the app served (:func:`webapp_results.with_parameters`)."""
    from attnedit.surfaces.outputs import read_png_parameters

    try:
        return read_png_parameters(Path(path)) if path else {}
    except (OSError, KeyError, ValueError):
        return {}


def frame_strip(frames: list[Any], count: int = 5) -> Any:
    """Up to ``count`` evenly spaced frames side by side (a PIL image): how a video shows in the history."""
    import numpy as np
    from PIL import Image

    pictures = [np.asarray(Image.open(f).convert("RGB")) if isinstance(f, (str, Path)) else np.asarray(f)[..., :3]
                for f in frames]
    if not pictures:
        return None
    picks = sorted({round(i * (len(pictures) - 1) / max(count - 1, 1)) for i in range(count)})
    return Image.fromarray(np.concatenate([pictures[i] for i in picks], axis=1).astype(np.uint8))


def model_picker(model: AppModel) -> tuple[Any, Any]:
    """The picker, in the current layout: a dropdown of :meth:`AppModel.choices` that also takes a typed hub id or
    folder, and a Load button. Wire it with :func:`wire_picker` once the tabs' controls exist."""
    import gradio as gr

    with gr.Row(equal_height=True):
        dropdown = gr.Dropdown(model.choices(), value=model.name, allow_custom_value=True, scale=4,
                               label="Model: a built-in, or type a hub id or local folder and press Load",
                               elem_id="model-picker")
        button = gr.Button("Load model", scale=1, elem_id="model-load")
    return dropdown, button


def wire_picker(model: AppModel, picker: tuple[Any, Any], controls: dict[Any, str]) -> None:
    """Picking or loading a model switches every tab to it and resets ``controls`` ({component: kind of
    :func:`control_values`}) to its own settings; it waits for a running job (the "model" queue)."""
    import gradio as gr

    from attnedit.surfaces.webapp_errors import friendly

    dropdown, button = picker
    components, kinds = list(controls), list(controls.values())

    def switch(name):
        pipe = model.switch(name)
        gr.Info(f"model: {model.name}")
        return [gr.update(choices=model.choices(), value=model.name),
                *[gr.update(**control_values(pipe, kind)) for kind in kinds]]

    outputs = [dropdown, *components]
    button.click(friendly(switch), dropdown, outputs, concurrency_id="model", api_name="load_model")
    dropdown.select(friendly(switch), dropdown, outputs, concurrency_id="model", api_visibility="private")
