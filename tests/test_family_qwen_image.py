"""Qwen-Image / Qwen-Image-Edit: joint ``[text; target image; reference images]`` calls with a text padding mask.

The Edit layout (reference tokens after the target's, ``img_shapes`` per image) on the tiny pipeline's transformer
with the qwen-image-edit example inputs (the published widths run in tests/test_architectures.py), and the tiny
``QwenImagePipeline`` end to end: stock bit for bit, key masks, maps, head guidance, the CLI.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from attnedit import AttentionRecorder, KeyMask, install
from attnedit.families import detect_family
from attnedit.models import zoo
from attnedit.models.architectures import ARCHITECTURES

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe():
    return zoo.load_tiny_pipeline("qwen_image")


def _call(pipe, **extra):
    kwargs = {**zoo.call_kwargs("qwen_image"), **extra}
    return pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images


def _run(model, inputs, *edits, backend="auto"):
    with torch.no_grad(), install(model, *edits, backend=backend):
        return model(**inputs, return_dict=False)[0]


# ------------------------------------------------------------------ Edit layout: reference tokens after the target
def test_edit_layout_hides_target_keys_only_and_keeps_the_text_padding_hidden(pipe):
    model = pipe.transformer
    inputs = ARCHITECTURES["qwen-image-edit"].inputs(model, size=(4, 6), text=10)
    assert inputs["img_shapes"] == [[(1, 4, 6), (1, 4, 6)]] and inputs["hidden_states"].shape[1] == 2 * 24
    assert detect_family(model).token_grid(model, inputs["hidden_states"], inputs) == (4, 6)
    with torch.no_grad():
        stock = model(**inputs, return_dict=False)[0]
    assert torch.equal(_run(model, inputs), stock)  # no edit: stock bit for bit

    mask = torch.zeros(4, 6)
    mask[:2, :3] = 1
    hidden = mask.flatten().bool()
    recorder = AttentionRecorder()
    masked = _run(model, inputs, KeyMask(mask=mask), recorder)
    assert not torch.allclose(masked, stock) and len(recorder.maps) == 1
    [record] = recorder.maps
    assert record.grid == (4, 6) and record.text_keys == slice(0, 10) and record.image_keys == slice(10, 34)
    probs = record.probs
    assert probs.shape[-1] == 10 + 48
    target = probs[..., record.image_keys]
    assert torch.equal(target[..., hidden], torch.zeros_like(target[..., hidden]))
    assert bool((target[..., ~hidden] > 0).all())
    assert bool((probs[..., 34:] > 0).all())  # the reference image's keys keep their weight
    assert torch.equal(probs[..., 7:10], torch.zeros_like(probs[..., 7:10]))  # padded text keys stay hidden
    reference_run = _run(model, inputs, KeyMask(mask=mask), backend="reference")
    torch.testing.assert_close(masked, reference_run, rtol=1e-4, atol=1e-4 * float(reference_run.abs().max()))


# ------------------------------------------------------------------------------------------ tiny pipeline
def test_tiny_pipeline_stock_key_mask_and_maps(pipe):
    assert type(pipe).__name__ == "QwenImagePipeline" and type(pipe.transformer).__name__ == "QwenImageTransformer2DModel"
    stock = _call(pipe)
    with install(pipe):
        assert np.array_equal(_call(pipe), stock)  # installed, no edit: bit for bit
    recorder = AttentionRecorder()
    with install(pipe, KeyMask(mask=torch.tensor([[1.0, 0.0], [0.0, 0.0]])), recorder):
        masked = _call(pipe)
    assert not np.allclose(masked, stock)
    # 2 steps x (cond, uncond) passes x 1 block; 32 px -> 16x16 latents -> 8x8 packed tokens after the text
    assert len(recorder.maps) == 4
    hidden = torch.zeros(8, 8, dtype=torch.bool)
    hidden[:4, :4] = True
    for record in recorder.maps:
        assert record.grid == (8, 8) and record.site.kind == "joint"
        text = record.text_keys.stop
        assert record.text_keys.start == 0 and record.image_keys == slice(text, text + 64)
        target = record.probs[..., record.image_keys]
        assert torch.equal(target[..., hidden.flatten()], torch.zeros_like(target[..., hidden.flatten()]))
        # text-image maps: image queries over the prompt's tokens, on the image grid
        words = record.probs[0, 0, record.image_queries, record.text_keys]
        assert words.shape == (64, text) and bool((words.sum(-1) > 0).all())
    # the prompt's 8 words / the negative's 1, each + the template's 5 closing tokens (its 34-token prefix is cropped)
    assert {r.text_keys.stop for r in recorder.maps} == {8 + 5, 1 + 5}


def test_tiny_pipeline_head_guidance_runs_and_differs(pipe):
    from attnedit.pipelines.edit_pipeline import AttnEditPipeline

    stock = _call(pipe)
    guided = AttnEditPipeline.from_pipe(pipe)(**zoo.call_kwargs("qwen_image"), pag_heads="L0H0", pag_scale=3.0,
                                              generator=torch.Generator().manual_seed(0)).images
    assert guided.shape == stock.shape and not np.allclose(guided, stock)


@pytest.mark.parametrize("name", ["qwen-image", "qwen-image-edit"])
def test_sites_cli_prints_the_published_count(capsys, name):
    from attnedit.surfaces.cli import main

    assert main(["sites", "--model", name]) == 0
    out = capsys.readouterr().out
    assert out.startswith("family: qwen_image   sites: 60\n") and "transformer_blocks.59.attn" in out


def test_cli_generate_writes_the_png(tmp_path):
    from attnedit.surfaces.cli import main

    out = tmp_path / "qwen.png"
    assert main(["generate", "a red cat", "--model", "tiny:qwen_image", "--steps", "2", "--width", "32",
                 "--height", "32", "--out", str(out)]) == 0
    assert Image.open(out).size == (32, 32)
