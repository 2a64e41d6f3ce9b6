"""The Gradio app: attention maps, grounded generation, DesignEdit, head guidance and radial video, one tab each.

The work of each tab is a plain function in :mod:`attnedit.surfaces.webapp_tabs`; this module only lays out components.
Every button shares ``concurrency_id="model"``: one job at a time touches the model.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Sequence

import numpy as np

from attnedit.surfaces import webapp_session as session
from attnedit.surfaces import webapp_tabs as tabs
from attnedit.surfaces.loading import DEFAULT_MODEL, load_pipeline
from attnedit.surfaces.webapp_errors import friendly, hint_unknown, readable_upload
from attnedit.surfaces.webapp_maps import MAX_STEPS, generate_with_maps
from attnedit.surfaces.webapp_results import (
    History,
    image_controls,
    image_options,
    seed_controls,
    stop_button,
    stops,
    with_parameters,
)
from attnedit.surfaces.webapp_video_edit import video_edit_tab

ENLARGE_CSS = """<style>.enlarged img {image-rendering: pixelated; width: 100% !important; height: 100% !important;
object-fit: contain;}</style>"""  # small built-in results shown big, nearest-neighbour


def maps_tab(model: session.AppModel, history: History) -> dict:
    import gradio as gr

    settings = tabs.model_settings(model.pipe)

    with gr.Row():
        with gr.Column():
            prompt = gr.Textbox(label="Prompt", value="a red circle left of a blue square")
            with gr.Row():
                seed, randomize = seed_controls("maps")
            steps = gr.Slider(1, MAX_STEPS, value=settings["steps"], step=1, label="Steps")
            guidance = gr.Slider(1.0, 15.0, value=settings["guidance_scale"], step=0.5, label="Guidance scale")
            size = image_controls(settings, "maps")
            button = gr.Button("Generate", variant="primary")
            stop = stop_button("maps")
        with gr.Column():
            image = gr.Image(label="Image", format="png", elem_id="maps-image", height=320, elem_classes="enlarged",
                             type="filepath")
            maps = gr.Gallery(label="Attention of the image to each word", columns=4, elem_id="maps-gallery",
                              elem_classes="enlarged")

    def run(p, s, n, g, r, width, height, negative):
        pipe = model.image_pipe()
        hint_unknown(pipe, p)
        s, options = tabs.pick_seed(s, r), image_options(pipe, width, height, negative)
        image, maps = generate_with_maps(pipe, p, s, int(n), float(g), **options)
        return with_parameters(image, pipe, prompt=p, seed=s, steps=int(n), guidance_scale=float(g), **options), maps, s

    run = friendly(run)
    inputs = [prompt, seed, steps, guidance, randomize, *size]
    event = button.click(model.exclusive(run), inputs, [image, maps, seed], api_name="generate",
                         concurrency_id="model", trigger_mode="always_last")
    stops(stop, event)
    history.record(event, "Attention maps", [image])
    return {steps: "steps", guidance: "guidance", size[0]: "width", size[1]: "height"}


def _box_canvas(boxes: str):
    """A canvas to draw named boxes on (gradio_image_annotation), showing ``boxes`` in the preview's colours."""
    from gradio_image_annotation import image_annotator

    return image_annotator(
        value=tabs.layout_canvas(boxes), label_list=["phrase"], image_type="numpy",
        show_label=False, elem_id="grounded-canvas",
    )


def grounded_tab(model: session.AppModel, history: History) -> dict:
    import gradio as gr

    boxes_value = "red circle: 0.05,0.3,0.4,0.7\nblue square: 0.6,0.3,0.95,0.7"
    settings = tabs.model_settings(model.pipe)
    with gr.Row():
        with gr.Column():
            prompt = gr.Textbox(label="Prompt", value="a red circle and a blue square on a gray background",
                                elem_id="grounded-prompt")
            with gr.Accordion("Draw boxes (label each with its phrase), then 'Use drawn boxes'", open=False):
                canvas = _box_canvas(boxes_value)
                use_drawn = gr.Button("Use drawn boxes", elem_id="grounded-use-drawn")
            boxes = gr.Textbox(label="Boxes: one 'phrase: x0,y0,x1,y1' per line (0..1; several boxes: ';')",
                               value=boxes_value, lines=4, elem_id="grounded-boxes")
            with gr.Row():
                seed, randomize = seed_controls("grounded")
                steps = gr.Slider(1, MAX_STEPS, value=settings["steps"], step=1, label="Steps")
            with gr.Row():
                refocus_steps = gr.Slider(0, MAX_STEPS, value=settings["steps"] // 2, step=1, label="Refocused steps")
                guidance = gr.Slider(1.0, 15.0, value=settings["guidance_scale"], step=0.5, label="Guidance scale")
            schedule = gr.Dropdown(list(tabs.SCHEDULES), value=tabs.DEFAULT_SCHEDULE, elem_id="grounded-schedule",
                                   label="Schedule (ce0439c: the paper's, default; fast: about x1.5 the time)")
            size = image_controls(settings, "grounded")
            button = gr.Button("Generate with layout", variant="primary", elem_id="grounded-run")
            stop = stop_button("grounded")
        with gr.Column():
            preview = gr.Image(label="Layout", value=tabs.preview_layout(boxes_value), height=256, interactive=False)
            image = gr.Image(label="Image", format="png", elem_id="grounded-image", height=256, elem_classes="enlarged",
                             type="filepath")
            maps = gr.Gallery(label="Attention per phrase", columns=4, elem_id="grounded-maps", height=180,
                              elem_classes="enlarged")
    def show_layout(text):  # the preview and the canvas in the same colours (a half-typed line keeps the canvas)
        return tabs.preview_layout(text), tabs.layout_canvas(text) or gr.skip()

    boxes.change(show_layout, boxes, [preview, canvas], queue=False, api_visibility="private")
    use_drawn.click(friendly(tabs.annotations_to_lines), canvas, boxes, api_visibility="private")

    def run(prompt, boxes, seed, steps, refocus_steps, guidance, randomize, schedule, width, height, negative):
        pipe = model.image_pipe()
        hint_unknown(pipe, prompt)
        seed, options = tabs.pick_seed(seed, randomize), image_options(pipe, width, height, negative)
        image, maps = tabs.run_grounded(pipe, prompt, boxes, seed, steps, refocus_steps, guidance, schedule, **options)
        return with_parameters(image, pipe, prompt=prompt, boxes=boxes, seed=seed, steps=steps, schedule=schedule,
                               refocus_steps=refocus_steps, guidance_scale=guidance, **options), maps, seed

    run = friendly(run)
    inputs = [prompt, boxes, seed, steps, refocus_steps, guidance, randomize, schedule, *size]
    event = button.click(model.exclusive(run), inputs, [image, maps, seed], api_name="grounded",
                         concurrency_id="model", trigger_mode="always_last")
    stops(stop, event)
    history.record(event, "Grounded", [image])
    return {steps: "steps", refocus_steps: "refocus_steps", guidance: "guidance", size[0]: "width", size[1]: "height"}


def edit_tab(model: session.AppModel, history: History) -> dict:
    import gradio as gr

    settings, edit = tabs.model_settings(model.pipe), tabs.edit_settings(model.pipe)  # the model's own, native size
    with gr.Row():
        with gr.Column():
            source = readable_upload(gr.Image(label="Image", type="numpy", sources=["upload", "clipboard"],
                                              elem_id="edit-source", height=200))
            editor = readable_upload(gr.ImageEditor(
                label="Mask: paint over the object (or upload the image here)", type="numpy",
                brush=gr.Brush(colors=["#ff0000"], default_size=12), elem_id="edit-editor", height=320))
            box = gr.Textbox(label="...or mask from a box: x0,y0,x1,y1 in pixels (used when set)", elem_id="edit-box")
            operation = gr.Radio(list(tabs.OPERATIONS), value="remove", label="Operation")
            with gr.Row():
                dx = gr.Number(label="move dx (px)", value=16, precision=0)
                dy = gr.Number(label="move dy (px)", value=0, precision=0)
                scale = gr.Number(label="resize / zoom-out scale", value=0.5)
            with gr.Row():
                flip = gr.Dropdown(["h", "v"], value="h", label="flip direction", elem_id="edit-flip")
                pan = gr.Dropdown(list(tabs.PAN_DIRECTIONS), value="left", label="pan direction", elem_id="edit-pan")
                amount = gr.Number(label="pan amount (px)", value=16, precision=0)
            with gr.Row():
                growth = gr.Number(label="mask growth (px of this image; the model's default)", value=edit["growth"],
                                   precision=0, minimum=0, elem_id="edit-growth")
                hole_noise = gr.Slider(0.0, 1.0, value=edit["hole_noise"], step=0.05, label="fresh noise in the hole")
                guidance = gr.Slider(1.0, 15.0, value=edit["guidance_scale"], step=0.5, label="CFG (key-mask pair)")
            steps = gr.Slider(2, MAX_STEPS, value=settings["steps"], step=1, label="Steps")
            button = gr.Button("Edit", variant="primary", elem_id="edit-run")
            stop = stop_button("edit")
        with gr.Column():
            result = gr.Image(label="Result", format="png", elem_id="edit-image", height=320, elem_classes="enlarged",
                              type="filepath")
            preview = gr.Image(label="Region to repaint: mask (red) and its growth (yellow)", elem_id="edit-preview",
                               height=200, interactive=False, elem_classes="enlarged")

    def paint_on(image):
        """Put the uploaded image under the brush, so the mask is painted on the image being edited."""
        return None if image is None else {"background": image, "layers": [], "composite": image}

    def growth_for(image, value, operation):
        """The model's mask growth, in pixels of the image being edited (zoom-out and pan: the fill growth)."""
        shown = tabs.edit_source(image, value)
        return tabs.edit_settings(model.image_pipe(), shown)["fill_growth" if operation in ("zoom out", "pan") else "growth"]

    def mask_of(image, value, box_text):
        image = tabs.edit_source(image, value)
        box = tabs.parse_box(box_text)
        if box is None or image is None:
            return image, tabs.editor_mask(value, like=image)
        mask = np.zeros(image.shape[:2], bool)
        mask[max(box[1], 0):max(box[3], 0), max(box[0], 0):max(box[2], 0)] = True
        return image, mask

    def show_region(image, value, box_text, growth):
        image, mask = mask_of(image, value, box_text)
        return None if image is None else tabs.mask_preview(image, mask, int(growth or 0))

    def run(image, value, box_text, operation, dx, dy, scale, flip, pan, amount, steps, growth, hole_noise, guidance):
        image, mask = mask_of(image, value, box_text)
        options = {"dx": dx, "dy": dy, "scale": scale, "flip": flip, "pan": pan, "amount": amount, "steps": steps,
                   "growth": growth, "hole_noise": hole_noise, "guidance_scale": guidance}
        pipe = model.image_pipe()
        return with_parameters(tabs.run_edit(pipe, image, mask, operation, **options), pipe, prompt=operation,
                               operation=operation, box=box_text, **options)

    source.upload(paint_on, source, editor, queue=False, api_visibility="private")
    for event in (source.upload, operation.change):
        event(friendly(growth_for), [source, editor, operation], growth, queue=False, api_visibility="private")
    for event in (box.change, growth.change, source.upload):
        event(friendly(show_region), [source, editor, box, growth], preview, api_visibility="private",
              trigger_mode="always_last")
    inputs = [source, editor, box, operation, dx, dy, scale, flip, pan, amount, steps, growth, hole_noise, guidance]
    event = button.click(model.exclusive(friendly(run)), inputs, result, api_name="edit", concurrency_id="model",
                         trigger_mode="always_last")
    stops(stop, event)
    history.record(event, "Edit", [result])
    return {steps: "steps", growth: "growth", hole_noise: "hole_noise", guidance: "edit_guidance"}


def guidance_tab(model: session.AppModel, history: History) -> dict:
    import gradio as gr

    settings = tabs.model_settings(model.pipe)
    with gr.Row():
        with gr.Column():
            prompt = gr.Textbox(label="Prompt", value="a big yellow triangle and a small green circle",
                                elem_id="guidance-prompt")
            heads = gr.Textbox(label="Heads ('L1H0,L1H1', '1:0', 'L1' = every head of layer 1)", value="L1H0,L1H1")
            ranking = gr.File(label="...or a HeadHunter ranking JSON", file_types=[".json"], type="filepath", height=80)
            with gr.Row():
                seed, randomize = seed_controls("guidance")
                steps = gr.Slider(1, MAX_STEPS, value=settings["steps"], step=1, label="Steps")
            with gr.Row():
                guidance = gr.Slider(1.0, 15.0, value=settings["guidance_scale"], step=0.5, label="CFG scale")
                scale = gr.Slider(0.0, 10.0, value=3.0, step=0.5, label="Head guidance scale (w_pag)")
                strength = gr.Slider(0.0, 1.0, value=1.0, step=0.05, label="Strength u")
            size = image_controls(settings, "guidance")
            button = gr.Button("Generate both", variant="primary", elem_id="guidance-run")
            stop = stop_button("guidance")
        with gr.Column(), gr.Row():
            plain = gr.Image(label="Without head guidance", format="png", elem_id="guidance-off", height=320,
                             type="filepath")
            guided = gr.Image(label="With head guidance", format="png", elem_id="guidance-on", height=320,
                              type="filepath")

    def run(prompt, heads, ranking, seed, steps, guidance, scale, strength, randomize, width, height, negative):
        pipe = model.image_pipe()
        seed, options = tabs.pick_seed(seed, randomize), image_options(pipe, width, height, negative)
        images = tabs.run_head_guidance(pipe, prompt, heads, ranking, seed, steps, guidance, scale, strength, **options)
        params = {"prompt": prompt, "seed": seed, "steps": steps, "guidance_scale": guidance, **options}
        guided = {"heads": heads if ranking is None else "uploaded ranking", "pag_scale": scale, "strength": strength}
        return with_parameters(images[0], pipe, **params), with_parameters(images[1], pipe, **params, **guided), seed

    run = friendly(run)
    inputs = [prompt, heads, ranking, seed, steps, guidance, scale, strength, randomize, *size]
    event = button.click(model.exclusive(run), inputs, [plain, guided, seed], api_name="head_guidance",
                         concurrency_id="model", trigger_mode="always_last")
    stops(stop, event)
    history.record(event, "Head guidance", [plain, guided])
    return {steps: "steps", guidance: "guidance", size[0]: "width", size[1]: "height"}


def video_tab(model: session.AppModel, history: History) -> dict:
    import gradio as gr

    pipe = model.pipe
    own = tabs.is_video(pipe)
    note = ("Radial attention on this video model." if own else
            "Radial attention needs a video model (Wan, HunyuanVideo). This app's model is not one, so the tab "
            "loads the built-in shapes-t2v model (a small trained Wan) on the first run.")
    cached = {"pipe": None}

    def own_video() -> bool:  # the picked model makes videos: the tab runs it, else the built-in shapes-t2v
        return tabs.is_video(model.pipe)

    # the model's own frames and size: its trained 9 frames at 32 px for the built-in video model
    video = tabs.model_settings(pipe) if own else tabs.builtin_video_settings()
    with gr.Row():
        with gr.Column():
            gr.Markdown(note)
            prompt = gr.Textbox(label="Prompt", value="a big red circle moving right on a striped background",
                                elem_id="video-prompt")
            radial = gr.Checkbox(label="Radial attention", value=True)
            with gr.Row():
                dense_steps = gr.Number(label="Dense steps", value=4 if not own else 12, precision=0)
                dense_layers = gr.Number(label="Dense layers", value=1, precision=0)
                decay = gr.Number(label="Decay", value=0.2)
                block = gr.Dropdown([16, 32, 64, 128], value=128 if own else 64, label="Block size")
            with gr.Row():
                frames = gr.Number(label="Frames", value=video["frames"], precision=0, minimum=1,
                                   maximum=4 * video["frames"], step=video["temporal"])
                height = gr.Number(label="Height", value=video["height"], precision=0, minimum=video["multiple"],
                                   maximum=video["max_size"], step=video["multiple"])
                width = gr.Number(label="Width", value=video["width"], precision=0, minimum=video["multiple"],
                                  maximum=video["max_size"], step=video["multiple"])
            with gr.Row():
                steps = gr.Slider(1, MAX_STEPS, value=30 if own else 20, step=1, label="Steps")
                seed, randomize = seed_controls("video")
            button = gr.Button("Generate video", variant="primary", elem_id="video-run")
            stop = stop_button("video")
        with gr.Column():
            video = gr.Video(label="Video", elem_id="video-out", visible=tabs.has_video_export())
            gallery = gr.Gallery(label="Frames", columns=5, elem_id="video-frames", height="auto",
                                 elem_classes="enlarged")

    def run(prompt, radial, dense_steps, dense_layers, decay, block, frames, height, width, steps, seed, randomize):
        seed = tabs.pick_seed(seed, randomize)
        if cached["pipe"] is None and not own_video():  # the sizes are checked against the model that will run
            cached["pipe"] = tabs.load_tiny_video_pipeline()
        pipe = model.pipe if own_video() else cached["pipe"]
        hint_unknown(pipe, prompt)
        tabs.check_size(pipe, width, height, frames)
        out = tabs.run_video(pipe, prompt, radial=radial, dense_steps=dense_steps, dense_layers=dense_layers,
                             decay=decay, block_size=block, frames=frames, height=height, width=width, steps=steps,
                             seed=seed)
        return tabs.frames_to_video(out), out, seed

    inputs = [prompt, radial, dense_steps, dense_layers, decay, block, frames, height, width, steps, seed, randomize]
    event = button.click(model.exclusive(friendly(run)), inputs, [video, gallery, seed], api_name="video",
                         concurrency_id="model", trigger_mode="always_last")
    stops(stop, event)
    fields = {"prompt": prompt, "seed": seed, "steps": steps, "frames": frames, "radial": radial}
    history.record_frames(event, "Video", gallery, fields, lambda: model.name if own_video() else "shapes-t2v")
    return {frames: "frames", width: "video_width", height: "video_height"}


def build_app(pipe, model_name: str, loader=None):
    """The app on ``pipe``; the model picker switches every tab to a built-in or ``loader(name)``'s pipeline."""
    import gradio as gr

    model = session.AppModel(pipe, model_name, loader)
    with gr.Blocks(title="attnedit") as demo:
        gr.Markdown("# attnedit\nEdit what the model attends to.")
        gr.HTML(ENLARGE_CSS, padding=False)
        picker, history, controls = session.model_picker(model), History(), {}
        for name, tab in (("Attention maps", maps_tab), ("Grounded generation", grounded_tab), ("Edit", edit_tab),
                          ("Head guidance", guidance_tab), ("Video", video_tab)):
            with gr.Tab(name):
                controls.update(tab(model, history))
        video_edit_tab(pipe)  # "Remove from video": attnedit.surfaces.webapp_video_edit
        history.render()
        session.wire_picker(model, picker, controls)
    return demo


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="attnedit app", description=__doc__)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="hub id, local folder, shapes-t2i (default, built in), shapes-dit (built-in MM-DiT) or tiny:<family>")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--memory", help="auto (default), none, model-offload, group-offload, sequential-offload")
    parser.add_argument("--quantize", help="int8, fp8, bnb-8bit, bnb-4bit or a .gguf transformer file")
    parser.add_argument("--lora", action="append", help="PATH_OR_ID[:SCALE] (repeat for several)")
    parser.add_argument("--variant", help="weight files variant, e.g. fp16")
    args = parser.parse_args(argv)
    pipe = load_pipeline(args.model, memory=args.memory, quantize=args.quantize, lora=args.lora, variant=args.variant)
    pipe.set_progress_bar_config(disable=False)  # its steps are the app's progress bar (friendly)
    loader = functools.partial(load_pipeline, memory=args.memory)  # the models the picker loads
    demo = build_app(pipe, args.model, loader)
    demo.queue(default_concurrency_limit=1, max_size=16)
    demo.launch(server_name=args.host, server_port=args.port, max_file_size="10mb")
    return 0
