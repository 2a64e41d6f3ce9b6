"""DesignEdit on tiny SD 1.5 / SDXL / SD3 / FLUX: inversion, blending, every operation end to end, sizes, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnedit import AttentionRecorder, install
from attnedit.methods.key_masking import DesignKeyMask
from attnedit.pipelines.design_edit import (
    Canvas,
    DesignEditConfig,
    DesignEditor,
    ObjectLayer,
    bbox,
    fit_to,
    load_image,
    paste_object,
    shift,
)

FAST = DesignEditConfig(num_steps=4, inversion_iterations=1, resolution=128)


def picture(h: int = 48, w: int = 80) -> np.ndarray:
    """A deterministic non-square test image: gradients and two rectangles."""
    ys, xs = np.mgrid[0:h, 0:w]
    image = np.stack([xs * 255 // w, ys * 255 // h, (xs + ys) * 255 // (h + w)], axis=-1).astype(np.uint8)
    image[8:24, 10:30] = (250, 20, 20)
    image[30:44, 50:70] = (20, 20, 250)
    return image


@pytest.fixture(scope="module", params=["sd15", "sdxl", "sd3", "flux"])
def editor(request, tiny_pipe):
    return DesignEditor(tiny_pipe(request.param), FAST)


A, B = (8, 6, 20, 16), (30, 30, 40, 40)  # boxes (x0, y0, x1, y1) on the 80x48 picture
OPERATIONS = {
    "remove": lambda ed, im: ed.remove(im, [A, B], dilation=2),
    "move": lambda ed, im: ed.move(im, A, dx=16, dy=8, dilation=2, object_dilation=1),
    "resize": lambda ed, im: ed.resize(im, A, scale=1.4, dilation=2),
    "flip": lambda ed, im: ed.flip(im, A, "v", dilation=2),
    "zoom_out": lambda ed, im: ed.zoom_out(im, 0.75, dilation=2),
    "pan": lambda ed, im: ed.pan(im, "left", 12, dilation=2),
    "compose": lambda ed, im: ed.compose(im, [ObjectLayer(picture(32, 32), (4, 4, 12, 12), dx=-10, dy=0)], remove=B, dilation=2),
}
# (output region, source region) guaranteed outside every edit above: masks + dilation + latent cells + feathering
FAR = {name: (np.s_[34:, 60:], np.s_[34:, 60:]) for name in OPERATIONS}
FAR["pan"] = (np.s_[:, 50:], np.s_[:, 38:68])  # panning left moves the content right by 12 px
FAR["zoom_out"] = None  # the whole source is shrunk


@pytest.mark.parametrize("operation", list(OPERATIONS))
def test_operation_end_to_end(editor, operation):
    image = picture()
    out = OPERATIONS[operation](editor, image)
    assert out.size == (80, 48) and out.mode == "RGB"
    result = np.asarray(out).astype(int)
    if FAR[operation] is not None:  # far from the edit the source pixels are kept
        far_out, far_source = FAR[operation]
        assert np.abs(result[far_out] - image[far_source]).max() <= 1
    assert np.abs(result - image).mean() > 1.0  # something was edited


def test_deterministic(tiny_pipe):
    editor = DesignEditor(tiny_pipe("sd15"), FAST)
    first, second = (np.asarray(editor.move(picture(), A, 8, 8, dilation=2)) for _ in range(2))
    assert np.array_equal(first, second)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_inversion_then_reconstruction_returns_the_source_latent(tiny_pipe, family):
    """Fixed-point DDIM inversion makes sampling its exact inverse; plain DDIM drifts on random tiny nets."""
    errors = {}
    z0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    canvas = Canvas((64, 64), (64, 64), (64, 64))
    for iterations in (0, 4):
        editor = DesignEditor(tiny_pipe(family), DesignEditConfig(num_steps=16, guidance_scale=1.0, inversion_iterations=iterations))
        trajectory = editor.invert(z0, editor.model.run(canvas.padded))
        assert len(trajectory) == 17 and torch.equal(trajectory[-1], z0)
        z, region = editor._denoise(trajectory, editor.model.run(canvas.padded), None, [])
        errors[iterations] = float((z - z0).norm() / z0.norm())
        assert region is None
    assert errors[4] < 0.05 and errors[4] < errors[0] / 4, errors


def test_blending_keeps_the_reconstruction_outside_the_hole(tiny_pipe):
    editor = DesignEditor(tiny_pipe("sd15"), DesignEditConfig(num_steps=4, blend_until=1.0, proximal_strength=0.0))
    canvas = Canvas((64, 64), (64, 64), (64, 64))
    trajectory = editor.invert(torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)), editor.model.run((64, 64)))
    hole = torch.zeros(8, 8)
    hole[2:5, 3:6] = 1.0
    z, region = editor._denoise(trajectory, editor.model.run(canvas.padded), hole, [])
    outside = region == 0
    assert torch.equal(region[0, 0] > 0, hole > 0)
    assert torch.equal(z.masked_select(outside), trajectory[-1].masked_select(outside))
    assert (z - trajectory[-1]).masked_select(~outside).abs().max() > 1e-3


def test_canvas_keeps_aspect_and_restores_size():
    canvas = Canvas.fit((48, 80), 64, 16)
    assert canvas.inner == (38, 64) and canvas.padded == (48, 64)
    x = load_image(picture())
    model_input = canvas.image(x)
    assert model_input.shape == (1, 3, 48, 64)
    assert torch.equal(model_input[..., 38:, :], model_input[..., 37:38, :].expand(-1, -1, 10, -1))  # replicated edge
    assert canvas.restore(model_input).shape == (3, 48, 80)
    assert (canvas.restore(model_input) - x).abs().mean() < 0.05


def test_pixel_transforms():
    x = load_image(picture())
    mask = torch.zeros(48, 80, dtype=torch.bool)
    mask[8:24, 10:30] = True
    flipped, moved = paste_object(x, mask, flip="h")
    assert torch.equal(moved, mask) and torch.equal(flipped[:, 8:24, 10:30], x[:, 8:24, 10:30].flip(-1))
    bigger, moved = paste_object(x, mask, scale=1.5)
    assert moved.sum() == 24 * 30 and bbox(moved) == (4, 5, 28, 35)  # 1.5x about the box centre (16, 20)
    assert torch.equal(bigger[:, :4], x[:, :4]) and not torch.equal(bigger[:, 4:28, 5:35], x[:, 4:28, 5:35])
    assert torch.equal(shift(torch.arange(4.0).view(1, 4), 0, 1), torch.tensor([[0.0, 0.0, 1.0, 2.0]]))
    image, fitted = fit_to(load_image(picture(32, 32)), torch.ones(32, 32, dtype=torch.bool), (48, 80))
    assert image.shape == (3, 48, 80) and fitted.sum() == 48 * 48 and fitted[:, 16:64].all()  # centred, 1.5x


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda ed, im: ed.move(im, (10, 8, 30, 24), dx=60, dy=0), r"move dx=60, dy=0 takes the object .* outside the 80x48"),
        (lambda ed, im: ed.move(im, (10, 8, 30, 24), dx=0, dy=-9), r"outside the 80x48 canvas"),
        (lambda ed, im: ed.resize(im, (10, 8, 30, 24), scale=0), r"scale=0 must be > 0"),
        (lambda ed, im: ed.resize(im, (10, 8, 30, 24), scale=-1.0), r"scale=-1.0 must be > 0"),
        (lambda ed, im: ed.resize(im, (10, 8, 30, 24), scale=4.0), r"scale=4.0 makes the object .* outside"),
        (lambda ed, im: ed.remove(im, np.zeros((48, 80), np.uint8)), r"mask is empty"),
        (lambda ed, im: ed.remove(im, np.full((48, 80), 255, np.uint8)), r"mask covers the whole image"),
        (lambda ed, im: ed.remove(im, np.zeros((64, 64), np.uint8)), r"mask size 64x64 \(WxH\) does not match the image size 80x48"),
        (lambda ed, im: ed.remove("/no/such/image.png", (0, 0, 4, 4)), r"image='/no/such/image.png' cannot be read"),
        (lambda ed, im: ed.remove(im, "/no/such/mask.png"), r"mask='/no/such/mask.png' cannot be read"),
        (lambda ed, im: ed.flip(im, (10, 8, 30, 24), "x"), r"direction='x' must be 'h'"),
        (lambda ed, im: ed.zoom_out(im, 1.0), r"scale=1.0 must be in \(0, 1\)"),
        (lambda ed, im: ed.pan(im, "right", 80), r"amount=80 must be an integer in 1..79"),
        (lambda ed, im: ed.pan(im, "sideways", 8), r"direction='sideways' must be one of"),
        (lambda ed, im: ed.compose(im, []), r"layers=\[\] gives nothing to compose"),
        (lambda ed, im: ed.compose(im, [(im, (0, 0, 4, 4), 78, 0)]), r"move dx=78"),
    ],
)
def test_bad_inputs(tiny_pipe, call, match):
    editor = DesignEditor(tiny_pipe("sd15"), FAST)
    with pytest.raises(ValueError, match=match):
        call(editor, picture())


def test_config_validation_and_pipe_untouched(tiny_pipe):
    pipe = tiny_pipe("sdxl")
    scheduler = pipe.scheduler
    DesignEditor(pipe)
    assert pipe.scheduler is scheduler and type(scheduler).__name__ == "EulerDiscreteScheduler"
    with pytest.raises(ValueError, match=r"num_steps=1 must be an integer >= 2"):
        DesignEditConfig(num_steps=1)
    with pytest.raises(ValueError, match=r"mode='both' must be 'hard' or 'soft'"):
        DesignEditConfig(mode="both")
    with pytest.raises(ValueError, match=r"mask_until=1.5 must be in \[0, 1\]"):
        DesignEditConfig(mask_until=1.5)
    with pytest.raises(ValueError, match=r"DesignEditor needs a pipeline with a unet or transformer and a vae"):
        DesignEditor(object())


def test_key_masking_is_what_changes_the_hole(tiny_pipe):
    """Without key masking (mask_until=0) and with guidance, the hole is only re-sampled; masking changes it."""
    canvas = Canvas((64, 64), (64, 64), (64, 64))
    hole = torch.zeros(8, 8)
    hole[2:6, 2:6] = 1.0
    results = {}
    for until in (0.0, 1.0):
        editor = DesignEditor(tiny_pipe("sd15"), DesignEditConfig(num_steps=4, mask_until=until, proximal_strength=0.0))
        trajectory = editor.invert(torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2)), editor.model.run((64, 64)))
        results[until] = editor._denoise(trajectory, editor.model.run(canvas.padded), hole, [])[0]
    inside = hole.bool().expand(1, 4, 8, 8)
    assert (results[1.0] - results[0.0])[inside].abs().mean() > 1e-2


def test_refine_mask_hides_keys_but_keeps_pixels(tiny_pipe):
    editor = DesignEditor(tiny_pipe("sd15"), FAST)
    image = picture()
    plain = np.asarray(editor.remove(image, A, dilation=2)).astype(int)
    refined = np.asarray(editor.remove(image, A, dilation=2, refine=B)).astype(int)
    assert np.abs(refined[30:40, 30:40] - image[30:40, 30:40]).max() <= 1  # refine region: source pixels kept
    assert np.abs(refined[6:16, 8:20] - plain[6:16, 8:20]).mean() > 0.5  # the hole no longer copies from B
    with pytest.raises(ValueError, match="refine is empty"):
        editor.remove(image, A, refine=np.zeros((48, 80), np.uint8))


# -- the paper's mask: dilation units, step window ---------------------------------------------------------------
def test_dilation_is_the_papers_kernel_at_native_resolution(tiny_pipe):
    """attend_scale=20 is a 20 px kernel at 1024 px: a 24 px box grows to 43 px there (64 px as a 20 px radius)."""
    editor = DesignEditor(tiny_pipe("sd15"), FAST)
    editor.native = 1024  # as SDXL
    box = torch.zeros(1024, 1024, dtype=torch.bool)
    box[500:524, 500:524] = True
    width = lambda m: int(m.any(0).sum())
    assert width(editor.dilate(box, 20)) == 43
    assert width(editor.dilate(box[::2, ::2], 20)) == 12 + 9  # a 512 px image: the kernel scales to 10 px
    radius = DesignEditor(tiny_pipe("sd15"), DesignEditConfig(num_steps=4, dilation_units="radius"))
    assert width(radius.dilate(box, 20)) == 64
    with pytest.raises(ValueError, match="dilation_units='px' must be one of"):
        DesignEditConfig(dilation_units="px")


def test_key_masking_covers_the_papers_steps(tiny_pipe):
    """Steps 1-39 of 50 by default: at 5 steps with mask_until 0.8, steps 1, 2 and 3 are masked, not step 0."""
    assert (DesignEditConfig().start(0.02), DesignEditConfig().step(0.8)) == (1, 40)
    editor = DesignEditor(tiny_pipe("sd15"), DesignEditConfig(num_steps=5))
    run = editor.model.run((64, 64))
    trajectory = editor.invert(torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3)), run)
    hole = torch.zeros(8, 8)
    hole[2:6, 2:6] = 1.0
    recorder = AttentionRecorder(kinds={"self"}, branches={"cond"})
    with install(editor.model.denoiser, recorder):  # the editor's key mask joins this installation
        editor._denoise(trajectory, run, hole, [])
    masked = {m.step for m in recorder.maps if m.grid == (8, 8) and m.probs[..., hole.flatten() > 0].max() == 0}
    assert masked == {1, 2, 3} and {m.step for m in recorder.maps} == set(range(5))


# -- flow-matching transformers: SD3 and FLUX ----------------------------------------------------------------------
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_flow_inversion_reconstructs(tiny_pipe, family):
    """Euler inversion of the velocity ODE; fixed-point refinement makes sampling its exact inverse."""
    errors = {}
    z0 = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    for iterations in (0, 4):
        editor = DesignEditor(tiny_pipe(family), DesignEditConfig(num_steps=16, guidance_scale=1.0, inversion_iterations=iterations))
        run = editor.model.run((64, 64))
        trajectory = editor.invert(z0, run)
        assert len(trajectory) == 17 and torch.equal(trajectory[-1], z0)
        z, _ = editor._denoise(trajectory, run, None, [])
        errors[iterations] = float((z - z0).norm() / z0.norm())
    assert errors[4] < 0.01 and errors[4] < errors[0] / 4, errors


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_joint_key_mask_hides_image_keys_exactly(tiny_pipe, family):
    """Hard mode: hidden image keys get zero weight in every joint block (FLUX: single-stream too); text keys kept."""
    editor = DesignEditor(tiny_pipe(family), DesignEditConfig(num_steps=4))
    run = editor.model.run((64, 80))
    z = torch.randn(1, 16, 8, 10, generator=torch.Generator().manual_seed(4))
    hole = torch.zeros(8, 10)
    hole[1:5, 2:7] = 0.6  # partial coverage: still hidden (any part of the cell inside)
    edit = DesignKeyMask(mask=hole, kinds=editor.model.kinds, branches=None)
    recorder = AttentionRecorder(kinds={"joint"})
    with install(editor.model.denoiser, edit, recorder):
        reference = editor.model.predict(run, z, 1)
    streams = {m.site.stream for m in recorder.maps}
    assert streams == ({"double", "single"} if family == "flux" else {""})
    for m in recorder.maps:
        grid_hidden = cell_share(hole, m.grid) > 0
        image = m.probs[..., m.image_keys]
        assert image[..., grid_hidden].abs().max() == 0 and image[..., ~grid_hidden].sum(-1).min() > 0
        assert m.probs[..., m.text_keys].sum(-1).min() > 0
    with install(editor.model.denoiser, edit):
        fast = editor.model.predict(run, z, 1)
    torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-5)
    assert (fast - editor.model.predict(run, z, 1)).abs().max() > 1e-4


def cell_share(mask: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
    return torch.nn.functional.interpolate(mask[None, None].float(), size=grid[-2:], mode="area")[0, 0].flatten()


def test_flux_rejects_what_the_distilled_model_ignores(tiny_pipe):
    pipe = tiny_pipe("flux")
    assert DesignEditor(pipe).config.guidance_scale == 1.0 and DesignEditor(pipe).config.hole_noise == 1.0
    with pytest.raises(ValueError, match=r"guidance_scale=7.5: FLUX.1 is guidance-distilled"):
        DesignEditor(pipe, DesignEditConfig(guidance_scale=7.5))
    with pytest.raises(ValueError, match=r"mode='soft' needs the CFG pair"):
        DesignEditor(pipe, DesignEditConfig(mode="soft"))
    with pytest.raises(ValueError, match=r"embedded_guidance=3.5 is only read by guidance-distilled models"):
        DesignEditor(tiny_pipe("sd3"), DesignEditConfig(embedded_guidance=3.5))
    with pytest.raises(ValueError, match=r"DesignEditor supports Stable Diffusion 1.x/2.x/XL \(unet\), SD3/SD3.5 \(sd3\) "
                                         r"and FLUX.1 \(flux\) pipelines; WanPipeline is a wan pipeline"):
        DesignEditor(tiny_pipe("wan"))
    editor = DesignEditor(pipe, FAST)
    with pytest.raises(ValueError, match=r"mask size 64x64 \(WxH\) does not match the image size 80x48"):
        editor.remove(picture(), np.zeros((64, 64), np.uint8))
    first, second = (np.asarray(editor.remove(picture(), A, dilation=2)) for _ in range(2))
    assert np.array_equal(first, second)  # the hole noise is seeded
