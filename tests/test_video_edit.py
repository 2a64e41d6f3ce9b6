"""Video object removal (VideoEditor): shapes, determinism, exact key hiding, block dropping, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnedit.core.attention import dense_attention, merge_masks
from attnedit.core.block_sparse import block_sparse_attention
from attnedit.core.edits import AttentionRecorder, BlockMask
from attnedit.core.key_blocks import drop_hidden_key_blocks
from attnedit.methods.radial import RadialAttention
from attnedit.methods.video_key_masking import dilate_time, latent_frame_index, latent_hole
from attnedit.models import zoo
from attnedit.pipelines.video_edit import VideoEditConfig, VideoEditor
from attnedit.pipelines.video_io import linear_track, load_masks, load_video, save_video

pytestmark = pytest.mark.usefixtures("one_thread")

FRAMES, HEIGHT, WIDTH = 7, 24, 40  # odd frame count (Wan's VAE wants 1 + 4k: padded to 9), non-square, not /16


def _clip() -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    rng = np.random.default_rng(0)
    video = rng.integers(0, 255, (FRAMES, HEIGHT, WIDTH, 3), dtype=np.uint8)
    return video, linear_track((2, 2, 12, 12), (20, 8, 30, 18), FRAMES)


def _editor(tiny_pipe, family: str, **overrides) -> VideoEditor:
    options = {"prompt_template": zoo.HUNYUAN_PROMPT_TEMPLATE} if family == "hunyuan_video" else {}
    return VideoEditor(tiny_pipe(family), VideoEditConfig(num_steps=2, text_length=32, **options, **overrides))


@pytest.mark.parametrize("family", ["wan", "hunyuan_video"])
def test_remove_keeps_shape_fps_and_is_deterministic(tiny_pipe, family):
    video, track = _clip()
    editor = _editor(tiny_pipe, family)
    first, second = editor.remove(video, track), editor.remove(video, track)
    assert first.frames.shape == video.shape and first.frames.dtype == np.uint8 and first.fps == 16.0
    assert np.array_equal(first.frames, second.frames)
    assert not np.array_equal(first.frames, video)  # something was edited


def test_masked_keys_get_exactly_zero_weight(tiny_pipe):
    """Dense reference: every recorded attention map of the key-masked steps gives the hole's keys weight 0."""
    video, track = _clip()
    editor = _editor(tiny_pipe, "hunyuan_video", mask_until=1.0)
    recorder = AttentionRecorder(kinds=editor.model.kinds, mean_heads=False)
    seen = {}
    build = editor._edits

    def edits(hole_keys, inversion):
        if hole_keys is not None:
            seen["keys"] = hole_keys
        return build(hole_keys, inversion) + ([] if inversion else [recorder])

    editor._edits = edits
    editor.remove(video, track)
    hidden = (seen["keys"] > 0).flatten()
    assert 0 < int(hidden.sum()) < hidden.numel()
    assert recorder.maps
    for record in recorder.maps:
        keys = record.probs[..., record.image_keys]
        assert torch.equal(keys[..., hidden], torch.zeros_like(keys[..., hidden]))
        assert bool((keys[..., ~hidden].sum(-1) > 0).all())


def test_latent_frames_of_a_causal_vae():
    assert latent_frame_index(9, 4).tolist() == [0, 1, 1, 1, 1, 2, 2, 2, 2]
    masks = torch.zeros(5, 8, 8, dtype=torch.bool)
    masks[3, 0:4, 0:4] = True  # pixel frame 3 -> latent frame 2 (of 1 + 2k frames, Wan-style 2x VAE)
    hole = latent_hole(masks, 2, (2, 2))
    assert hole.shape == (3, 2, 2) and hole[2, 0, 0] == 1 and hole.sum() == 1
    grown = dilate_time(hole, 1)
    assert grown[1, 0, 0] == 1 and grown[0, 0, 0] == 0 and grown.sum() == 2


def test_hidden_key_blocks_leave_the_block_sparse_call_with_the_same_output():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 8) for _ in range(3))
    table = torch.ones(5, 5, dtype=torch.bool)
    table[4, 0] = False
    block = BlockMask(table, 8, 40, 40)
    keep = torch.ones(1, 40, dtype=torch.bool)
    keep[0, 8:24] = False  # key blocks 1 and 2 hidden entirely
    keep[0, 30] = False  # one key of block 3: its block stays
    dropped = drop_hidden_key_blocks(block, keep)
    assert dropped.blocks[:, 1:3].sum() == 0 and dropped.blocks[:, 3].all() and dropped.density < block.density
    assert drop_hidden_key_blocks(block, keep) is dropped  # cached: the same table object again
    mask = merge_masks(None, keep)
    reference, _ = dense_attention(q, k, v, mask, block)
    torch.testing.assert_close(block_sparse_attention(q, k, v, mask, dropped), reference, rtol=1e-5, atol=1e-6)


def test_remove_under_radial_attention(tiny_pipe):
    """Radial from the first step (4-token blocks on the 2x3-token frames), composed with the key mask."""
    video = np.random.default_rng(1).integers(0, 255, (13, HEIGHT, WIDTH, 3), dtype=np.uint8)  # 4 latent frames
    track = linear_track((2, 2, 12, 12), (20, 8, 30, 18), 13)
    radial = RadialAttention.preset("wan", dense_steps=0, dense_layers=0, block_size=4)
    sparse = _editor(tiny_pipe, "wan", radial=radial).remove(video, track)
    assert sparse.frames.shape == video.shape
    assert not np.array_equal(sparse.frames, _editor(tiny_pipe, "wan").remove(video, track).frames)


def test_video_files_round_trip(tmp_path):
    video, track = _clip()
    for name in ("clip.gif", "frames"):
        save_video(video, tmp_path / name, fps=8)
        frames, fps = load_video(tmp_path / name)
        assert frames.shape == video.shape
    assert np.array_equal(load_video(tmp_path / "frames")[0], video)
    save_video(video[:, :, :-1], tmp_path / "odd.mp4", fps=8)  # an odd width is kept exactly
    frames, fps = load_video(tmp_path / "odd.mp4")
    assert frames.shape == (FRAMES, HEIGHT, WIDTH - 1, 3) and fps == 8
    masks = load_masks(track, FRAMES, (HEIGHT, WIDTH))
    save_video(masks.numpy().astype(np.uint8) * 255, tmp_path / "masks")
    assert torch.equal(load_masks(str(tmp_path / "masks"), FRAMES, (HEIGHT, WIDTH)), masks)


@pytest.mark.parametrize(("masks", "message"), [
    (np.ones((FRAMES - 1, HEIGHT, WIDTH), bool), "6 frame"),
    (np.ones((FRAMES, HEIGHT, WIDTH + 2), bool), "42x24"),
    (np.zeros((FRAMES, HEIGHT, WIDTH), bool), "empty"),
    (np.ones((FRAMES, HEIGHT, WIDTH), bool), "whole"),
    ([(0, 0, 4, 4)] * (FRAMES + 1), "8 frame"),
])
def test_bad_masks_are_one_value_error(masks, message):
    with pytest.raises(ValueError, match=message):
        load_masks(masks, FRAMES, (HEIGHT, WIDTH))


def test_bad_video_and_family_are_one_value_error(tmp_path, tiny_pipe):
    broken = tmp_path / "broken.mp4"
    broken.write_text("not a video")
    with pytest.raises(ValueError, match="cannot be read"):
        load_video(broken)
    with pytest.raises(ValueError, match="does not exist"):
        load_video(tmp_path / "missing.mp4")
    with pytest.raises(ValueError, match="video models"):
        VideoEditor(tiny_pipe("sd3"))
    with pytest.raises(ValueError, match="guidance-distilled"):
        _editor(tiny_pipe, "hunyuan_video", guidance_scale=2.0)


def test_cli_removes_and_bad_input_writes_nothing(tmp_path, tiny_pipe, capsys):
    from attnedit.surfaces.cli import main

    tiny_pipe("wan")  # saved into the session's zoo folder, which tiny:wan loads from
    video, track = _clip()
    save_video(video, tmp_path / "clip.gif", fps=8)
    save_video(load_masks(track, FRAMES, (HEIGHT, WIDTH)).numpy().astype(np.uint8) * 255, tmp_path / "masks")
    out = tmp_path / "clean.gif"
    common = ["--model", "tiny:wan", "--device", "cpu", "--steps", "2"]
    assert main(["edit-video", "remove", str(tmp_path / "clip.gif"), "--masks", str(tmp_path / "masks"),
                 "--out", str(out), *common]) == 0
    frames, fps = load_video(out)
    assert frames.shape == video.shape and round(fps) == 8
    bad = tmp_path / "bad.gif"
    for extra in (["--box", "0,0,40,24"], ["--track", "2,2,12,12"], ["--masks", str(tmp_path / "masks"), "--box", "1,1,5,5"]):
        assert main(["edit-video", "remove", str(tmp_path / "clip.gif"), *extra, "--out", str(bad), *common]) == 2
    assert main(["edit-video", "remove", str(tmp_path / "clip.gif"), "--box", "1,1,5,5", "--out", str(bad),
                 "--model", "tiny:sd3"]) == 2
    assert not bad.exists()
    assert "edit-video needs a Wan or HunyuanVideo" in capsys.readouterr().err


def test_batch_task(tmp_path, tiny_pipe):
    from attnedit.surfaces.batch import TASKS

    video, track = _clip()
    save_video(video, tmp_path / "clip.gif", fps=8)
    params = {"video": str(tmp_path / "clip.gif"), "track": [list(track[0]), list(track[-1])], "steps": 2, "width": 32}
    frames = TASKS["edit-video"](tiny_pipe("wan"), params)
    assert len(frames) == FRAMES and frames[0].size == (WIDTH, HEIGHT) and round(params["fps"]) == 8


def test_app_tab_removes_along_a_box_track(tmp_path, tiny_pipe):
    from attnedit.surfaces.webapp_video_edit import preview_boxes, remove_in_clip

    video, _ = _clip()
    save_video(video, tmp_path / "clip.gif", fps=8)
    first, _ = preview_boxes(str(tmp_path / "clip.gif"), "2,2,12,12", "20,8,30,18")
    assert first.shape == (HEIGHT, WIDTH, 3) and tuple(first[2, 5]) == (255, 0, 0)
    frames, fps = remove_in_clip(tiny_pipe("wan"), str(tmp_path / "clip.gif"), "2,2,12,12", "20,8,30,18", steps=2)
    assert frames.shape == video.shape and round(fps) == 8
    with pytest.raises(ValueError, match="first box"):
        remove_in_clip(tiny_pipe("wan"), str(tmp_path / "clip.gif"), "2,2,12", "", steps=2)
