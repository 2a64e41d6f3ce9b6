"""HunyuanVideo 1.5: joint attention over [video; image, glyph, text context] with a symmetric padding mask.

The tiny ``HunyuanVideo15Pipeline`` (Qwen2.5-VL text model, ByT5 tokenizer + T5 encoder, HunyuanVideo 1.5 VAE, all
tiny and random) runs text-to-video: its 729 all-zero image tokens are masked out and sit behind the valid text.
Published widths at reduced depth run in tests/test_architectures.py; here: the I2V token layout at real width.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnedit import AttentionRecorder, KeyMask, install
from attnedit.families import detect_family
from attnedit.models import zoo

PROMPT_TOKENS = 9  # the zoo prompt "a red cat sitting on a blue square" + <|im_end|>, after the pipeline cuts the chat prefix


@pytest.fixture(scope="module")
def pipe():
    torch.set_num_threads(1)
    return zoo.load_tiny_pipeline("hunyuan_video15")


@pytest.fixture(scope="module")
def stock(pipe):
    return _call(pipe)


def _call(pipe, **extra):
    kwargs = {**zoo.call_kwargs("hunyuan_video15"), **extra}  # 2 steps, CFG through the pipeline's guider
    return pipe(**kwargs, generator=torch.Generator().manual_seed(0)).frames


def test_tiny_pipeline_is_stock_without_edits_and_key_mask_hides_video_keys(pipe, stock):
    assert type(pipe).__name__ == "HunyuanVideo15Pipeline" and detect_family(pipe.transformer).name == "hunyuan_video15"
    with install(pipe):
        assert np.array_equal(_call(pipe), stock)
    mask = torch.zeros(8, 8)
    mask[:4, :4] = 1
    recorder = AttentionRecorder()
    with install(pipe, KeyMask(mask=mask), recorder):
        masked = _call(pipe)
    assert not np.allclose(masked, stock)
    assert {r.site.name for r in recorder.maps} == {"transformer_blocks.0.attn", "transformer_blocks.1.attn"}
    hidden = mask.bool().flatten().repeat(2)  # 5 frames -> 2 latent frames of 8 x 8 tokens
    seen = set()
    for record in recorder.maps:
        assert record.grid == (2, 8, 8) and record.image_keys == slice(0, 128)
        video = record.probs[..., record.image_keys]
        assert torch.equal(video[..., hidden], torch.zeros_like(video[..., hidden]))
        assert bool((video[..., record.image_queries, :][..., ~hidden] > 0).all())
        # text-video maps: video queries read the prompt's tokens first in the context; padding gets nothing
        words = record.probs[:, :, record.image_queries, record.text_keys]
        assert words.shape[-1] == 729 + 256 + 1000
        valid = int((words > 0).flatten(0, -2).any(0).sum())
        assert bool((words[..., :valid] > 0).all()) and not bool(words[..., valid:].any())
        seen.add(valid)
    assert seen == {PROMPT_TOKENS, 1}  # the prompt (cond pass) and the empty negative prompt's <|im_end|> (uncond)


def test_head_guidance_runs_and_differs(pipe, stock):
    from attnedit.pipelines.edit_pipeline import AttnEditPipeline

    guided = AttnEditPipeline.from_pipe(pipe)(
        **zoo.call_kwargs("hunyuan_video15"), pag_heads="L0H0", pag_scale=3.0, generator=torch.Generator().manual_seed(0)).frames
    assert guided.shape == stock.shape and not np.allclose(guided, stock)


def test_i2v_image_tokens_are_neither_video_nor_text(pipe):
    """With image embeddings present the model puts them first in the context: a key mask leaves them attended."""
    model, g = pipe.transformer, torch.Generator().manual_seed(0)
    text_mask, glyph_mask = torch.tensor([[True] * 5 + [False]]), torch.tensor([[True] * 3 + [False]])
    inputs = {"hidden_states": torch.randn(1, 9, 1, 4, 4, generator=g), "timestep": torch.tensor([500.0]),
              "encoder_hidden_states": torch.randn(1, 6, 16, generator=g), "encoder_attention_mask": text_mask,
              "encoder_hidden_states_2": torch.randn(1, 4, 32, generator=g), "encoder_attention_mask_2": glyph_mask,
              "image_embeds": torch.randn(1, 8, 8, generator=g)}
    mask = torch.zeros(4, 4)
    mask[:2, :2] = 1
    recorder = AttentionRecorder()
    with torch.no_grad(), install(model, KeyMask(mask=mask), recorder):
        model(**inputs, return_dict=False)
    for record in recorder.maps:  # [16 video; 8 image, 3 glyph, 5 text, 1 + 1 padding]
        assert record.image_keys == slice(0, 16) and record.text_keys == slice(24, 34)
        video_rows = record.probs[..., record.image_queries, :]
        video_keys = video_rows[..., record.image_keys]
        assert torch.equal(video_keys[..., mask.flatten().bool()], torch.zeros_like(video_keys[..., :4]))
        assert bool((video_rows[..., 16:24] > 0).all())  # the image tokens keep their weight
        assert bool((video_rows[..., 24:32] > 0).all()) and not bool(video_rows[..., 32:].any())


def test_radial_preset_is_hunyuan_videos_carried_over(pipe):
    from attnedit.methods.radial import PRESETS
    from attnedit.pipelines.radial import default_preset

    assert default_preset(pipe) == "hunyuan_video15" and PRESETS["hunyuan_video15"] == PRESETS["hunyuan_video"]


def test_sites_cli_prints_the_published_count(capsys):
    from attnedit.surfaces.cli import main

    assert main(["sites", "--model", "hunyuan-video-1.5-480p-t2v"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("family: hunyuan_video15   sites: 54\n") and "transformer_blocks.53.attn" in out


def test_cli_video_writes_the_mp4(tmp_path):
    from attnedit.surfaces.cli import main

    out = tmp_path / "hv15.mp4"
    assert main(["video", "a red ball rolling", "--model", "tiny:hunyuan_video15", "--steps", "2", "--frames", "5",
                 "--width", "32", "--height", "32", "--out", str(out)]) == 0
    assert out.is_file() and out.stat().st_size > 0


def test_video_editor_removes_with_exact_zero_weight_on_the_hole(pipe):
    """The video editor drives HunyuanVideo15Pipeline through the family's hooks: the hole's keys get weight 0."""
    from attnedit.pipelines.video_edit import VideoEditConfig, VideoEditor
    from attnedit.pipelines.video_io import linear_track

    video = np.random.default_rng(0).integers(0, 255, (5, 32, 32, 3), dtype=np.uint8)
    track = linear_track((2, 2, 14, 14), (16, 8, 30, 22), 5)
    editor = VideoEditor(pipe, VideoEditConfig(num_steps=2, mask_until=1.0))
    recorder = AttentionRecorder(kinds=editor.model.kinds, mean_heads=False)
    seen, build = {}, editor._edits

    def edits(hole_keys, inversion):
        if hole_keys is not None:
            seen["keys"] = hole_keys
        return build(hole_keys, inversion) + ([] if inversion else [recorder])

    editor._edits = edits
    first = editor.remove(video, track)
    assert first.frames.shape == video.shape and not np.array_equal(first.frames, video)
    hidden = (seen["keys"] > 0).flatten()
    assert 0 < int(hidden.sum()) < hidden.numel() and recorder.maps
    for record in recorder.maps:
        keys = record.probs[..., record.image_queries, record.image_keys]
        assert torch.equal(keys[..., hidden], torch.zeros_like(keys[..., hidden]))
        assert bool((keys[..., ~hidden].sum(-1) > 0).all())
