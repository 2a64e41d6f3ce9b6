"""The app's "Remove from video" tab: upload a clip, give a box on its first and last frame (a linear track between
them) or upload masks, and see the result next to the source.

The work is :func:`remove_in_clip`, a plain tested function; :func:`video_edit_tab` only lays out components.
A model that is not a video model (the app's default image model) is swapped for the built-in ``shapes-t2v`` on
the first run, as the Video tab does.
"""

from __future__ import annotations

import tempfile
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

MAX_STEPS = 100


def parse_box(text: str, name: str) -> tuple[int, int, int, int]:
    """``"x0,y0,x1,y1"`` -> a box of integer pixels; ValueError naming the field."""
    try:
        box = tuple(round(float(v)) for v in str(text).replace(" ", "").split(","))
    except ValueError:
        box = ()
    if len(box) != 4:
        raise ValueError(f"{name}={text!r} must be x0,y0,x1,y1 in pixels")
    return box  # type: ignore[return-value]


def preview_boxes(video: Any, first: str, last: str) -> list[np.ndarray]:
    """The first and last frames with their boxes drawn (red), to check the track before running."""
    from attnedit.pipelines.video_io import load_video

    frames = load_video(video)[0]
    out = []
    for frame, text, name in ((frames[0], first, "first box"), (frames[-1], last, "last box")):
        image = Image.fromarray(frame)
        if str(text).strip():
            x0, y0, x1, y1 = parse_box(text, name)
            ImageDraw.Draw(image).rectangle((x0, y0, x1 - 1, y1 - 1), outline=(255, 0, 0))
        out.append(np.asarray(image))
    return out


def remove_in_clip(pipe: Any, video: Any, first: str = "", last: str = "", masks: Any = None, steps: int = 30,
                   radial: bool = False) -> tuple[np.ndarray, float]:
    """Frames ``(F, H, W, 3)`` and fps of ``video`` with what the masks (or the first -> last box track) cover removed."""
    from attnedit.pipelines.video_edit import VideoEditConfig, VideoEditor
    from attnedit.pipelines.video_io import linear_track, load_video

    if video is None:
        raise ValueError("upload a video first")
    if not isinstance(steps, (int, float)) or not 2 <= int(steps) <= MAX_STEPS:
        raise ValueError(f"steps={steps!r} must be in 2..{MAX_STEPS}")
    frames, fps = load_video(video)
    if masks:
        track = masks if not isinstance(masks, list) or len(masks) != 1 else masks[0]
        track = sorted(track) if isinstance(track, list) and all(isinstance(m, str) for m in track) else track
    else:
        if not str(first).strip():
            raise ValueError("give a box on the first frame (x0,y0,x1,y1), or upload masks")
        start = parse_box(first, "first box")
        end = parse_box(last, "last box") if str(last).strip() else start
        track = linear_track(start, end, frames.shape[0])
    editor = VideoEditor(pipe, VideoEditConfig(num_steps=int(steps), radial=True if radial else None))
    result = editor.remove(frames, track)
    return result.frames, fps


def friendly(fn: Any) -> Any:
    """A ValueError reaches the user as a gr.Error message (the app's own wrapper, without importing the app)."""
    import functools

    import gradio as gr

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ValueError as error:
            raise gr.Error(str(error)) from None

    return wrapper


def _mp4(frames: np.ndarray, fps: float) -> str:
    from attnedit.pipelines.video_io import save_video

    with tempfile.NamedTemporaryFile(suffix=".mp4", delete=False) as file:
        path = file.name
    return str(save_video(frames, path, fps))


def video_edit_tab(pipe: Any) -> None:
    """Lay out the tab (inside the app's ``gr.Blocks``) and wire its buttons."""
    import gradio as gr

    from attnedit.surfaces import webapp_tabs as tabs

    own = tabs.is_video(pipe)
    cached = {"pipe": pipe if own else None}
    with gr.Tab("Remove from video"):
        gr.Markdown("Training-free object removal (key masking in space and time on Wan / HunyuanVideo)."
                    + ("" if own else " This app's model is not a video model: the built-in shapes-t2v is loaded "
                       "on the first run."))
        with gr.Row():
            with gr.Column():
                source = gr.Video(label="Clip", elem_id="vedit-source")
                with gr.Row():
                    first = gr.Textbox(label="Box on the first frame (x0,y0,x1,y1)", elem_id="vedit-first")
                    last = gr.Textbox(label="Box on the last frame (empty: the same)", elem_id="vedit-last")
                masks = gr.File(label="…or masks (a mask video, or one image per frame)", file_count="multiple")
                with gr.Row():
                    steps = gr.Slider(2, MAX_STEPS, value=30, step=1, label="Steps")
                    radial = gr.Checkbox(label="Radial attention", value=False)
                with gr.Row():
                    check = gr.Button("Show the boxes")
                    button = gr.Button("Remove", variant="primary", elem_id="vedit-run")
            with gr.Column():
                boxes = gr.Gallery(label="First and last frame", columns=2, height="auto")
                result = gr.Video(label="Result", elem_id="vedit-out")

    def run(video, first_box, last_box, files, steps, radial):
        if cached["pipe"] is None:
            cached["pipe"] = tabs.load_tiny_video_pipeline()
        paths = [getattr(f, "name", f) for f in files or []]
        frames, fps = remove_in_clip(cached["pipe"], video, first_box, last_box, paths or None, int(steps), radial)
        return _mp4(frames, fps)

    check.click(friendly(preview_boxes), [source, first, last], boxes)
    button.click(friendly(run), [source, first, last, masks, steps, radial], result, api_name="edit_video",
                 concurrency_id="model")
