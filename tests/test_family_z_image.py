"""Z-Image: the tiny ZImagePipeline (Qwen3 text encoder from a tiny config) under attnedit's edits, and the CLI.

The published widths (z-image-turbo) run the shared checks in tests/test_architectures.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnedit import AttentionRecorder, KeyMask, install
from attnedit.models import zoo


@pytest.fixture(scope="module")
def pipe():
    return zoo.load_tiny_pipeline("z_image")


def _call(pipe, **extra):
    return pipe(**{**zoo.call_kwargs("z_image"), **extra}, generator=torch.Generator().manual_seed(0)).images


def test_no_edit_is_stock_and_a_key_mask_hides_image_keys(pipe):
    assert type(pipe).__name__ == "ZImagePipeline"
    stock = _call(pipe)
    with install(pipe) as handle:
        assert np.array_equal(_call(pipe), stock)
        assert [(s.kind, s.layer) for s in handle.sites] == [("self", 0), ("joint", 0), ("joint", 1)]
    recorder = AttentionRecorder()
    with install(pipe, KeyMask(mask=torch.tensor([[1.0, 0.0], [0.0, 0.0]])), recorder):
        masked = _call(pipe)
    assert not np.allclose(masked, stock)
    hidden = torch.zeros(4, 4, dtype=torch.bool)  # 64 px -> 8x8 latents -> 4x4 tokens; the top-left quarter
    hidden[:2, :2] = True
    kinds = set()
    for record in recorder.maps:
        kinds.add(record.site.kind)
        assert record.grid == (4, 4) and record.image_keys == slice(0, 16)
        image = record.probs[..., record.image_keys]
        assert torch.equal(image[..., hidden.flatten()], torch.zeros_like(image[..., hidden.flatten()]))
        assert bool((image[..., ~hidden.flatten()] > 0).all())
        if record.site.kind == "joint":  # the caption starts after the image padded to 32 tokens
            assert record.text_keys.start == 32 and record.text_keys.stop > 32
            words = record.probs[0, 0, record.image_queries, record.text_keys][:16]
            assert bool((words.sum(-1) > 0).all())  # text-image maps, read on the image grid
        else:
            assert record.text_keys is None
    assert kinds == {"self", "joint"} and {r.step for r in recorder.maps} == {0, 1}


def test_head_guidance_runs_and_differs(pipe):
    from attnedit.pipelines.edit_pipeline import AttnEditPipeline

    stock = _call(pipe)
    guided = AttnEditPipeline.from_pipe(pipe)(**zoo.call_kwargs("z_image"), pag_heads="L0H0", pag_scale=3.0,
                                              generator=torch.Generator().manual_seed(0)).images
    assert guided.shape == stock.shape and not np.allclose(guided, stock)


def test_cli_sites_and_generate(tmp_path, capsys):
    from attnedit.surfaces.cli import main

    assert main(["sites", "--model", "z-image-turbo"]) == 0
    assert capsys.readouterr().out.startswith("family: z_image   sites: 32\n")
    out = tmp_path / "z.png"
    assert main(["generate", "a red cat", "--model", "tiny:z_image", "--steps", "2", "--out", str(out)]) == 0
    assert out.is_file() and out.stat().st_size > 0


def test_cfg_rows_are_cond_then_uncond(pipe):
    """ZImagePipeline batches [cond, uncond]: no edit stays stock with CFG, the recorder sees the rows in that order."""
    stock = _call(pipe, guidance_scale=4.0)
    with install(pipe):
        assert np.array_equal(_call(pipe, guidance_scale=4.0), stock)
    recorder = AttentionRecorder()
    with install(pipe, recorder):
        _call(pipe, guidance_scale=4.0)
    assert recorder.maps and {r.branches for r in recorder.maps} == {("cond", "uncond")}
