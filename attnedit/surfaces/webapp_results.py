"""Results the app hands back carry their generation parameters, as the CLI's and batch's PNGs do.

A PIL image whose ``info`` holds text is written by Gradio (for a component with ``format="png"``) with those
texts as PNG text chunks, so the file a user downloads says how it was made (the AUTOMATIC1111 ``parameters``
line other tools read, and the ``attnedit`` JSON of :func:`attnedit.surfaces.outputs.read_png_parameters`).
No file of ours is written per request: Gradio saves the image into its own cache.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from PIL import Image

from attnedit.surfaces.outputs import a1111_parameters


def model_name(pipe: Any) -> str | None:
    """The built-in's name, else the folder or hub id the model was loaded from."""
    from attnedit.shapes.builtin import builtin_name

    return builtin_name(pipe) or (str(getattr(getattr(pipe, "config", None), "_name_or_path", "") or "") or None)


def with_parameters(image: np.ndarray, pipe: Any, **params: Any) -> Image.Image:
    """``image`` (H, W, 3) uint8 as a PIL image whose PNG text chunks will hold ``params`` plus its size and model.

    Why: a downloaded result should reproduce itself (seed, steps, CFG, ...) in any PNG-info reader.
    """
    picture = Image.fromarray(np.ascontiguousarray(image[..., :3]).astype(np.uint8))
    params = {**params, "width": picture.width, "height": picture.height, "model": model_name(pipe)}
    picture.info["parameters"] = a1111_parameters(params)
    picture.info["attnedit"] = json.dumps(params, sort_keys=True, default=str)
    return picture


def seed_controls(prefix: str) -> tuple[Any, Any]:
    """A seed box and a 'random seed' box, in the current layout; the tab's run writes the seed it used back into
    the seed box (``tabs.pick_seed``), so every result can be made again."""
    import gradio as gr

    seed = gr.Number(label="Seed (the one used is shown after each run)", value=0, precision=0,
                     elem_id=f"{prefix}-seed")
    return seed, gr.Checkbox(label="random seed", value=False, elem_id=f"{prefix}-random")


def image_controls(settings: dict, prefix: str) -> tuple[Any, Any, Any]:
    """Width, height (limited to the sizes the model takes: multiples of ``settings["multiple"]``) and a negative
    prompt, in the current layout, starting at the model's own size."""
    import gradio as gr

    m, top = settings["multiple"], settings["max_size"]
    with gr.Row():
        width = gr.Number(label=f"Width (multiple of {m})", value=settings["width"], precision=0, minimum=m,
                          maximum=top, step=m, elem_id=f"{prefix}-width")
        height = gr.Number(label=f"Height (multiple of {m})", value=settings["height"], precision=0, minimum=m,
                           maximum=top, step=m, elem_id=f"{prefix}-height")
        negative = gr.Textbox(label="Negative prompt", value="", elem_id=f"{prefix}-negative")
    return width, height, negative


def image_options(pipe: Any, width: float, height: float, negative: str | None) -> dict[str, Any]:
    """The pipeline options of :func:`image_controls`; ValueError for a size the model cannot take."""
    from attnedit.surfaces.webapp_defaults import check_size

    check_size(pipe, width, height)
    options: dict[str, Any] = {"width": int(width), "height": int(height)}
    if (negative or "").strip():
        options["negative_prompt"] = negative.strip()
    return options


def stop_button(prefix: str) -> Any:
    """A Stop button (wire it with :func:`stops`): long runs on a slow machine can be abandoned."""
    import gradio as gr

    return gr.Button("Stop", variant="stop", elem_id=f"{prefix}-stop")


def stops(stop: Any, event: Any) -> None:
    """``stop`` cancels ``event`` (Gradio's ``cancels``: a queued job is dropped, a running one is interrupted)."""
    stop.click(None, cancels=[event], api_visibility="private")


class History:
    """The session's results, newest first with their seed and parameters (:func:`webapp_session.remember`), in a
    gallery under the tabs. Create it inside the app's ``gr.Blocks``; :meth:`render` places the gallery."""

    def __init__(self) -> None:
        import gradio as gr

        self.state = gr.State([])  # per browser session, at most webapp_session.HISTORY_SIZE entries
        self.gallery = gr.Gallery(label="History: this session's results, newest first (seed and settings under "
                                  "each)", columns=8, height="auto", elem_id="history", elem_classes="enlarged",
                                  render=False, interactive=False)

    def render(self) -> None:
        import gradio as gr

        with gr.Accordion("History", open=True):
            self.gallery.render()

    def record(self, event: Any, tab: str, images: list[Any]) -> None:
        """After ``event`` succeeds, put its result ``images`` (type="filepath" outputs: the PNGs served, which
        carry their parameters) first in the history."""
        from attnedit.surfaces.webapp_session import remember, served_parameters

        def add(history: list, *paths: str | None) -> tuple[list, list]:
            entries = remember(history, [(p, served_parameters(p), tab) for p in paths])
            return entries, entries

        event.success(add, [self.state, *images], [self.state, self.gallery], queue=False, api_visibility="private")

    def record_frames(self, event: Any, tab: str, frames: Any, fields: dict[str, Any], model_name: Any) -> None:
        """After ``event`` succeeds, put a strip of its ``frames`` gallery first, captioned with the ``fields``
        components' values (the seed box holds the seed used) and ``model_name()``."""
        from attnedit.surfaces.webapp_session import frame_strip, remember

        names = list(fields)

        def add(history: list, shown: list | None, *values: Any) -> tuple[list, list]:
            strip = frame_strip([item[0] if isinstance(item, (list, tuple)) else item for item in shown or []])
            params = {**dict(zip(names, values)), "model": model_name()}
            entries = remember(history, [(strip, params, tab)])
            return entries, entries

        inputs = [self.state, frames, *fields.values()]
        event.success(add, inputs, [self.state, self.gallery], queue=False, api_visibility="private")
