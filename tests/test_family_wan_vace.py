"""Wan 2.1 VACE and Wan 2.2 image-to-video as tiny pipelines; Wan 2.2 Animate's token layout at the model level.

VACE (``WanVACEPipeline``): control blocks run first over a control stream on the video grid, their hints are added
to the hidden states; attnedit edits both streams as video. Wan 2.2 I2V (``WanImageToVideoPipeline`` with two
denoisers, boundary_ratio 0.9, no image encoder): the image only enters through the latents, so the family is
Wan's. Published widths at reduced depth run in tests/test_architectures.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from attnedit import AttentionRecorder, KeyMask, install
from attnedit.families import detect_family
from attnedit.models import zoo


@pytest.fixture(scope="module")
def vace():
    torch.set_num_threads(1)
    return zoo.load_tiny_pipeline("wan_vace")


@pytest.fixture(scope="module")
def i2v():
    torch.set_num_threads(1)
    return zoo.load_tiny_pipeline("wan22_i2v")


def _image() -> Image.Image:
    return Image.fromarray((np.random.RandomState(0).rand(32, 32, 3) * 255).astype("uint8"))


def _call(pipe, name, **extra):
    kwargs = {**zoo.call_kwargs(name), **({"image": _image()} if name == "wan22_i2v" else {}), **extra}
    return pipe(**kwargs, generator=torch.Generator().manual_seed(0)).frames


MASK = torch.zeros(4, 4)  # 32 px -> 4 x 4 latent -> 2 x 2 tokens per frame: hide the top-left token
MASK[:2, :2] = 1


@pytest.mark.parametrize("name", ["wan_vace", "wan22_i2v"])
def test_stock_without_edits_and_key_mask_hides_video_keys(name, vace, i2v):
    pipe = vace if name == "wan_vace" else i2v
    stock = _call(pipe, name)
    with install(pipe) as handle:
        assert np.array_equal(_call(pipe, name), stock)
        assert len(handle.models) == (2 if name == "wan22_i2v" else 1)
    recorder = AttentionRecorder()
    with install(pipe, KeyMask(mask=MASK), recorder):
        masked = _call(pipe, name)
    assert not np.allclose(masked, stock)
    hidden = torch.tensor([True, False, False, False]).repeat(2)  # 5 frames -> 2 latent frames of 2 x 2 tokens
    names = set()
    for record in recorder.maps:
        names.add(record.site.name)
        if record.site.kind == "cross":  # text-video maps: the 32 (padded) prompt tokens, rows sum to one
            assert record.text_keys == slice(0, 32) and record.probs.shape[-1] == 32
            continue
        video = record.probs[..., record.image_keys]
        assert record.grid == (2, 2, 2) and torch.equal(video[..., hidden], torch.zeros_like(video[..., hidden]))
        assert bool((video[..., ~hidden] > 0).all())
    expected = {f"blocks.{i}.attn{k}" for i in range(2) for k in (1, 2)}
    if name == "wan_vace":  # the control stream is edited as video too
        expected |= {f"vace_blocks.{i}.attn{k}" for i in range(2) for k in (1, 2)}
    assert names == expected


def test_vace_sites_put_the_control_blocks_first(vace):
    sites = detect_family(vace.transformer).sites(vace.transformer)
    assert [(s.name, s.layer, s.stream) for s in sites if s.kind == "self"] == [
        ("vace_blocks.0.attn1", 0, "vace"), ("vace_blocks.1.attn1", 1, "vace"),
        ("blocks.0.attn1", 2, ""), ("blocks.1.attn1", 3, "")]


@pytest.mark.parametrize("name", ["wan_vace", "wan22_i2v"])
def test_head_guidance_runs_and_differs(name, vace, i2v):
    from attnedit.pipelines.edit_pipeline import AttnEditPipeline

    pipe = vace if name == "wan_vace" else i2v
    stock = _call(pipe, name)
    guided = AttnEditPipeline.from_pipe(pipe)(
        **zoo.call_kwargs(name), **({"image": _image()} if name == "wan22_i2v" else {}), pag_heads="L0H0",
        pag_scale=3.0, generator=torch.Generator().manual_seed(0)).frames
    assert guided.shape == stock.shape and not np.allclose(guided, stock)


@pytest.mark.parametrize("name", ["wan_vace", "wan22_i2v"])
def test_radial_attention_runs_on_the_pipeline(name, vace, i2v):
    """64 px, 9 frames: 3 latent frames of 16 tokens in blocks of 4; sparse from the first step."""
    from attnedit.pipelines.radial import default_preset, generate_radial

    pipe = vace if name == "wan_vace" else i2v
    assert default_preset(pipe) == ("wan" if name == "wan_vace" else "wan22")  # Wan 2.2: two experts
    size = {"height": 64, "width": 64, "num_frames": 9}
    image = {"image": _image().resize((64, 64))} if name == "wan22_i2v" else {}
    kwargs = {**zoo.call_kwargs(name), **size, **image}
    prompt = kwargs.pop("prompt")
    dense = pipe(prompt=prompt, **kwargs, generator=torch.Generator().manual_seed(0)).frames
    radial = generate_radial(pipe, prompt, preset="wan", radial={"dense_steps": 0, "dense_layers": 0, "block_size": 4,
                                                                  "decay": 0.95, "sink": False},
                             **kwargs, generator=torch.Generator().manual_seed(0)).frames
    assert radial.shape == dense.shape and np.isfinite(radial).all() and not np.allclose(radial, dense)


@pytest.mark.parametrize("arch, count", [("wan2.1-vace-1.3b", 90), ("wan2.1-vace-14b", 96),
                                         ("wan2.2-animate-14b", 80), ("wan2.2-i2v-a14b", 80)])
def test_sites_cli_prints_the_published_count(arch, count, capsys):
    from attnedit.surfaces.cli import main

    assert main(["sites", "--model", arch]) == 0
    assert f"sites: {count}\n" in capsys.readouterr().out


def test_cli_video_writes_the_mp4(tmp_path):
    from attnedit.surfaces.cli import main

    out = tmp_path / "vace.mp4"
    assert main(["video", "a red ball rolling", "--model", "tiny:wan_vace", "--steps", "2", "--frames", "5",
                 "--width", "32", "--height", "32", "--out", str(out)]) == 0
    assert out.is_file() and out.stat().st_size > 0


# -- Wan 2.2 Animate: the tiny WanAnimatePipeline (CLIP image tokens, pose latents, face-motion adapters) --------------
@pytest.fixture(scope="module")
def animate():
    torch.set_num_threads(1)
    return zoo.load_tiny_pipeline("wan_animate")


def _animate_kwargs() -> dict:
    frames = lambda side, seed: Image.fromarray((np.random.RandomState(seed).rand(side, side, 3) * 255).astype("uint8"))
    return {**zoo.call_kwargs("wan_animate"), "image": frames(32, 0), "pose_video": [frames(32, i) for i in range(5)],
            "face_video": [frames(16, 10 + i) for i in range(5)], "generator": torch.Generator().manual_seed(0)}


def _animate_call(pipe):
    return pipe(**_animate_kwargs()).frames


def test_animate_is_stock_without_edits_and_key_mask_leaves_face_adapters_alone(animate):
    stock = _animate_call(animate)
    with install(animate) as handle:
        assert np.array_equal(_animate_call(animate), stock)
        assert not any(s.name.startswith("face_adapter") for s in handle.sites)
    recorder = AttentionRecorder()
    with install(animate, KeyMask(mask=MASK), recorder):
        masked = _animate_call(animate)
    assert not np.allclose(masked, stock)
    hidden = torch.tensor([True, False, False, False]).repeat(3)  # reference frame + 2 latent frames of 2 x 2 tokens
    for record in recorder.maps:
        if record.site.kind == "cross":  # the text call only: the CLIP image tokens' call is left unedited
            assert record.text_keys == slice(0, 512) and record.probs.shape[-1] == 512
            continue
        video = record.probs[..., record.image_keys]
        assert record.grid == (3, 2, 2) and torch.equal(video[..., hidden], torch.zeros_like(video[..., hidden]))
    assert {r.site.name for r in recorder.maps} == {f"blocks.{i}.attn{k}" for i in range(2) for k in (1, 2)}
    from attnedit.pipelines.edit_pipeline import AttnEditPipeline

    guided = AttnEditPipeline.from_pipe(animate)(**_animate_kwargs(), pag_heads="L0H0", pag_scale=3.0).frames
    assert guided.shape == stock.shape and not np.allclose(guided, stock)


def test_cli_video_refuses_an_image_to_video_model_with_one_line(tmp_path, capsys):
    from attnedit.surfaces.cli import main

    out = tmp_path / "clip.mp4"
    assert main(["video", "a ball", "--model", "tiny:wan22_i2v", "--steps", "2", "--out", str(out)]) == 2
    assert "WanImageToVideoPipeline needs image" in capsys.readouterr().err and not out.exists()
