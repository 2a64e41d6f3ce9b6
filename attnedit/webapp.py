"""The Gradio app: generate with the edit core and see what each prompt word attends to."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import numpy as np
import torch

from .attention_maps import token_heatmaps
from .edits import AttentionRecorder
from .install import install
from .loading import DEFAULT_MODEL, load_pipeline

MAX_STEPS = 100


def generate_with_maps(pipe, prompt: str, seed: int, steps: int, guidance: float) -> tuple[np.ndarray, list]:
    """Image (H, W, 3) uint8 and [(heat map uint8, token)] for each prompt token (UNet families)."""
    if not prompt.strip():
        raise ValueError("the prompt is empty")
    if not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"steps={steps} must be in 1..{MAX_STEPS}")
    recorder = AttentionRecorder(kinds={"cross"}, branches={"cond"})
    handle = install(pipe, recorder) if hasattr(pipe, "unet") else install(pipe)
    with handle, torch.no_grad():
        result = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, output_type="np",
                      generator=torch.Generator("cpu").manual_seed(int(seed)))
    image = (result.images[0] * 255).round().astype(np.uint8)
    if not recorder.maps:
        return image, []
    maps = token_heatmaps(recorder.maps, size=image.shape[:2])
    ids = pipe.tokenizer(prompt, truncation=True, max_length=pipe.tokenizer.model_max_length).input_ids
    tokens = pipe.tokenizer.convert_ids_to_tokens(ids)[1:-1]  # drop start/end
    gallery = []
    for index, token in enumerate(tokens, start=1):
        heat = maps[index]
        heat = (heat - heat.min()) / (heat.max() - heat.min() + 1e-8)
        gallery.append(((heat.numpy() * 255).astype(np.uint8), token.replace("</w>", "")))
    return image, gallery


def build_app(pipe, model_name: str):
    import gradio as gr

    def run(prompt, seed, steps, guidance):
        try:
            return generate_with_maps(pipe, prompt, int(seed), int(steps), float(guidance))
        except ValueError as error:
            raise gr.Error(str(error)) from None

    with gr.Blocks(title="attnedit") as demo:
        gr.Markdown(f"# attnedit\nModel: `{model_name}`. Generate an image and see where each word of the prompt looks.")
        with gr.Tab("Attention maps"):
            with gr.Row():
                with gr.Column():
                    prompt = gr.Textbox(label="Prompt", value="a red circle left of a blue square")
                    seed = gr.Number(label="Seed", value=0, precision=0)
                    steps = gr.Slider(1, MAX_STEPS, value=20, step=1, label="Steps")
                    guidance = gr.Slider(1.0, 15.0, value=7.5, step=0.5, label="Guidance scale")
                    button = gr.Button("Generate", variant="primary")
                with gr.Column():
                    image = gr.Image(label="Image", format="png", elem_id="maps-image", height=320)
                    maps = gr.Gallery(label="Cross-attention per token", columns=4, elem_id="maps-gallery")
            button.click(run, [prompt, seed, steps, guidance], [image, maps], api_name="generate", concurrency_id="model")
    return demo


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="attnedit app", description=__doc__)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="hub id, local folder or tiny:<family>")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    args = parser.parse_args(argv)
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    demo = build_app(pipe, args.model)
    demo.queue(default_concurrency_limit=1, max_size=16)
    demo.launch(server_name=args.host, server_port=args.port, max_file_size="10mb")
    return 0
