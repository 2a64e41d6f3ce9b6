"""FLUX.2 [klein] on the tiny ``Flux2KleinPipeline`` (Qwen3 text encoder from a tiny config, true CFG in two passes):
stock without edits, key masks on the target image only (reference images' tokens left alone), head guidance,
text-image maps, the inpainting pipeline, the KV-cache calls, the CLI. Published widths: tests/test_architectures.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from attnedit import AttentionRecorder, KeyMask, install
from attnedit.families import detect_family
from attnedit.models import zoo

pytestmark = pytest.mark.usefixtures("one_thread")

MASK = torch.tensor([[1.0, 0.0], [0.0, 0.0]])  # hides the top-left quarter of the target image


@pytest.fixture(scope="module")
def pipe():
    return zoo.load_tiny_pipeline("flux2_klein")


def _call(pipe, **extra):
    return pipe(**{**zoo.call_kwargs("flux2_klein"), **extra}, generator=torch.Generator().manual_seed(0)).images


def _hidden(grid) -> torch.Tensor:
    small = torch.nn.functional.interpolate(MASK[None, None], size=grid, mode="area")[0, 0] > 0.5
    return small.flatten()


def test_no_edit_is_stock_and_key_mask_hides_target_keys(pipe):
    assert type(pipe).__name__ == "Flux2KleinPipeline" and detect_family(pipe.transformer).name == "flux2"
    stock = _call(pipe)
    with install(pipe):
        assert np.array_equal(_call(pipe), stock)
    recorder = AttentionRecorder()
    with install(pipe, KeyMask(mask=MASK), recorder):
        masked = _call(pipe)
    assert not np.allclose(masked, stock)
    assert {r.site.stream for r in recorder.maps} == {"double", "single"}
    for record in recorder.maps:  # 64 px -> 4x4 target tokens after the 16 text tokens
        assert record.grid == (4, 4) and record.image_keys == slice(16, 32) and record.text_keys == slice(0, 16)
        target = record.probs[..., record.image_keys]
        hidden = _hidden(record.grid)
        assert torch.equal(target[..., hidden], torch.zeros_like(target[..., hidden]))
        assert bool((target[..., ~hidden] > 0).all())
    # text-image maps: image queries over text keys, on the target grid
    words = record.probs[0, 0, record.image_queries, record.text_keys]
    assert words.shape == (16, 16) and bool((words.sum(-1) > 0).all())


def test_reference_image_tokens_are_neither_image_nor_text(pipe):
    """Multi-reference editing: [text, target, reference] tokens; the reference's ids have t = 10."""
    reference = Image.fromarray(np.full((64, 64, 3), 200, dtype=np.uint8))
    stock = _call(pipe, image=[reference])
    with install(pipe):
        assert np.array_equal(_call(pipe, image=[reference]), stock)
    recorder = AttentionRecorder()
    with install(pipe, KeyMask(mask=MASK), recorder):
        masked = _call(pipe, image=[reference])
    assert not np.allclose(masked, stock)
    for record in recorder.maps:
        assert record.grid == (4, 4) and record.image_keys == slice(16, 32) and record.probs.shape[-1] == 16 + 16 + 16
        hidden = _hidden(record.grid)
        target = record.probs[..., record.image_keys]
        assert torch.equal(target[..., hidden], torch.zeros_like(target[..., hidden]))
        assert bool((record.probs[..., 32:] > 0).all())  # the reference's keys keep their weight


def test_head_guidance_runs_and_differs(pipe):
    from attnedit.pipelines.edit_pipeline import AttnEditPipeline

    stock = _call(pipe)
    guided = AttnEditPipeline.from_pipe(pipe)(**zoo.call_kwargs("flux2_klein"), pag_heads="L0H0", pag_scale=3.0,
                                             generator=torch.Generator().manual_seed(0)).images
    assert guided.shape == stock.shape and not np.allclose(guided, stock)


def test_inpaint_pipeline_is_accepted(pipe):
    """Issue 27 item 3: Flux2KleinInpaintPipeline.from_pipe(tiny) takes a key mask and head guidance."""
    from diffusers import Flux2KleinInpaintPipeline

    from attnedit.pipelines.edit_pipeline import AttnEditPipeline

    inpaint = Flux2KleinInpaintPipeline.from_pipe(pipe)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask = Image.fromarray(np.pad(np.full((32, 32), 255, dtype=np.uint8), ((0, 32), (0, 32))))
    kwargs = {**zoo.call_kwargs("flux2_klein"), "image": image, "mask_image": mask, "strength": 1.0}
    run = lambda p, **extra: p(**kwargs, **extra, generator=torch.Generator().manual_seed(0)).images
    stock = run(inpaint)
    edit_pipe = AttnEditPipeline.from_pipe(inpaint)
    recorder = AttentionRecorder()
    with install(inpaint, KeyMask(mask=MASK), recorder):
        masked = run(inpaint)
    assert not np.allclose(masked, stock) and recorder.maps
    guided = run(edit_pipe, pag_heads="L0H0", pag_scale=3.0)
    assert guided.shape == stock.shape and not np.allclose(guided, stock)


def test_kv_cache_calls_are_routed_and_edit_the_target_only(pipe):
    """Flux2KleinKVPipeline's processors call the dispatcher from a module-level helper: still routed, stock without
    edits; in "extract" mode the references attend to themselves (left alone), text+target see every key."""
    from diffusers import Flux2KleinKVPipeline

    kv = Flux2KleinKVPipeline.from_pipe(pipe)
    reference = Image.fromarray(np.full((64, 64, 3), 90, dtype=np.uint8))
    kwargs = {k: v for k, v in zoo.call_kwargs("flux2_klein").items() if k != "guidance_scale"}
    run = lambda: kv(**kwargs, image=[reference], generator=torch.Generator().manual_seed(0)).images
    stock = run()
    with install(kv):
        assert np.array_equal(run(), stock)
    recorder = AttentionRecorder()
    with install(kv, KeyMask(mask=MASK), recorder):
        masked = run()
    assert not np.allclose(masked, stock)
    for record in recorder.maps:  # queries [text, target]; keys [text, reference, target]
        assert record.probs.shape[-2:] == (16 + 16, 16 + 16 + 16) and record.image_keys == slice(32, 48)
        target = record.probs[..., record.image_keys]
        hidden = _hidden(record.grid)
        assert torch.equal(target[..., hidden], torch.zeros_like(target[..., hidden]))
        assert bool((record.probs[..., 16:32] > 0).all())


@pytest.mark.parametrize("name, count", [("flux2-dev", 56), ("flux2-klein-4b", 25), ("flux2-klein-9b", 32)])
def test_sites_cli_prints_the_published_count(name, count, capsys):
    from attnedit.surfaces.cli import main

    assert main(["sites", "--model", name]) == 0
    assert capsys.readouterr().out.startswith(f"family: flux2   sites: {count}\n")


def test_cli_generate_writes_the_png(tmp_path):
    from attnedit.surfaces.cli import main

    out = tmp_path / "flux2.png"
    assert main(["generate", "a red cat", "--model", "tiny:flux2_klein", "--steps", "2", "--width", "64",
                 "--height", "64", "--out", str(out)]) == 0
    assert out.is_file() and out.stat().st_size > 0


def test_one_flat_joint_index_over_double_then_single_blocks():
    from attnedit.models.architectures import ARCHITECTURES

    with install(ARCHITECTURES["flux2-klein-4b"].build("full", device="meta")) as handle:
        joint = {s.layer: (s.name, s.stream) for s in handle.sites}
    assert joint[4] == ("transformer_blocks.4.attn", "double")
    assert joint[5] == ("single_transformer_blocks.0.attn", "single")
    assert joint[24] == ("single_transformer_blocks.19.attn", "single") and len(joint) == 25
