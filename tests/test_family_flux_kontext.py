"""FLUX.1 Kontext: the reference image's tokens follow the target's in every joint call; edits act on the target only.

Reduced depth at published widths (flux1-kontext-dev) with reference tokens present (SoftPAG's formula on it runs
in tests/test_architectures.py), and the tiny ``FluxKontextPipeline`` (tiny FLUX components) conditioned on an
input image.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from attnedit import AttentionRecorder, KeyMask, install
from attnedit.families import detect_family
from attnedit.models import zoo
from attnedit.models.architectures import ARCHITECTURES


@pytest.fixture(scope="module")
def kontext():
    arch = ARCHITECTURES["flux1-kontext-dev"]
    model = arch.build("reduced")
    inputs = arch.inputs(model, size=(4, 6))
    with torch.no_grad():
        stock = model(**inputs, return_dict=False)[0]
    return arch, model, inputs, stock


def _run(model, inputs, *edits, backend="auto"):
    with torch.no_grad(), install(model, *edits, backend=backend):
        return model(**inputs, return_dict=False)[0]


def test_reference_tokens_follow_the_targets_and_the_grid_is_the_targets(kontext):
    _arch, model, inputs, stock = kontext
    ids = inputs["img_ids"]
    assert ids.shape[0] == inputs["hidden_states"].shape[1] == 2 * 24 and bool((ids[24:, 0] == 1).all())
    assert detect_family(model).token_grid(model, inputs["hidden_states"], inputs) == (4, 6)
    assert torch.equal(_run(model, inputs), stock)  # no edit: stock bit for bit


def test_key_mask_hides_target_keys_only(kontext):
    _arch, model, inputs, stock = kontext
    mask = torch.zeros(4, 6)
    mask[:2, :3] = 1
    recorder = AttentionRecorder()
    masked = _run(model, inputs, KeyMask(mask=mask), recorder)
    assert not torch.allclose(masked, stock) and len(recorder.maps) == 2
    text = inputs["encoder_hidden_states"].shape[1]
    for record in recorder.maps:
        assert record.grid == (4, 6) and record.image_keys == slice(text, text + 24)
        probs = record.probs
        target = probs[..., record.image_keys]
        hidden = mask.flatten().bool()
        assert torch.equal(target[..., hidden], torch.zeros_like(target[..., hidden]))
        assert bool((target[..., ~hidden] > 0).all())
        reference = probs[..., text + 24:]  # the reference image's keys keep their weight
        assert reference.shape[-1] == 24 and bool((reference > 0).all())
    reference_run = _run(model, inputs, KeyMask(mask=mask), backend="reference")
    torch.testing.assert_close(masked, reference_run, rtol=1e-4, atol=1e-4 * float(reference_run.abs().max()))


# ------------------------------------------------------------------------------------------ tiny pipeline
@pytest.fixture(scope="module")
def pipe():
    return zoo.load_tiny_pipeline("flux_kontext")


def _call(pipe, **extra):
    kwargs = {**zoo.call_kwargs("flux_kontext"), **extra}
    return pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images


def test_tiny_kontext_edits_with_an_input_image(pipe):
    assert type(pipe).__name__ == "FluxKontextPipeline"
    stock = _call(pipe)
    with install(pipe):
        assert np.array_equal(_call(pipe), stock)
    recorder = AttentionRecorder()
    with install(pipe, KeyMask(mask=torch.tensor([[1.0, 0.0], [0.0, 0.0]])), recorder):
        masked = _call(pipe)
    assert not np.allclose(masked, stock)
    assert recorder.maps
    for record in recorder.maps:  # 64 px -> 4x4 target tokens, 16 reference tokens after them
        assert record.grid == (4, 4)
        text = record.text_keys.stop
        assert record.probs.shape[-1] == text + 32 and record.image_keys == slice(text, text + 16)
        hidden = torch.zeros(4, 4, dtype=torch.bool)
        hidden[:2, :2] = True
        target = record.probs[..., record.image_keys]
        assert torch.equal(target[..., hidden.flatten()], torch.zeros_like(target[..., hidden.flatten()]))
        assert bool((record.probs[..., text + 16:] > 0).all())
    # text-image maps: image queries over text keys, read on the target grid
    words = record.probs[0, 0, record.image_queries, record.text_keys]
    assert words.shape == (math.prod(record.grid), text) and bool((words.sum(-1) > 0).all())


def test_tiny_kontext_head_guidance_runs_and_differs(pipe):
    from attnedit.pipelines.edit_pipeline import AttnEditPipeline

    stock = _call(pipe)
    edit_pipe = AttnEditPipeline.from_pipe(pipe)
    guided = edit_pipe(**zoo.call_kwargs("flux_kontext"), pag_heads="L0H0", pag_scale=3.0,
                       generator=torch.Generator().manual_seed(0)).images
    assert guided.shape == stock.shape and not np.allclose(guided, stock)


def test_sites_cli_prints_the_published_count(capsys):
    from attnedit.surfaces.cli import main

    assert main(["sites", "--model", "flux1-kontext-dev"]) == 0
    assert capsys.readouterr().out.startswith("family: flux   sites: 57\n")
