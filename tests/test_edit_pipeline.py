"""The one-call edit pipeline (``AttnEditPipeline.from_pipe``): each option, and several at once, equal the same
edits installed by hand on the stock pipeline (same seed); no option is the stock call bit for bit; the pipeline
is an instance of the stock class sharing its modules; processors come back after calls and errors."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from attnedit import KeyMask, install
from attnedit.methods.head_guidance import perturbed_guidance
from attnedit.methods.radial import RadialAttention
from attnedit.methods.refocusing import Layout, RefocusConfig
from attnedit.models import zoo
from attnedit.pipelines.edit_pipeline import OPTIONS, AttnEditPipeline, edit_pipeline_class
from attnedit.pipelines.refocusing import refocus
from attnedit.processors.edit_processor import EditProcessor

PROMPT = zoo.call_kwargs("sd15")["prompt"]
LAYOUT = Layout(PROMPT, (("red cat", [(0.0, 0.0, 0.5, 1.0)]), ("blue square", [(0.5, 0.25, 1.0, 0.75)])))
# 2 refocused steps of 2 iterations; no early stop on the box peak (tiny FLUX's 4x4 grid reaches it at once)
REFOCUS = RefocusConfig(refocus_steps=2, iterations=((1 << 30, 2),), peak_threshold=1.01)
HEADS = {"sd15": "L1", "sdxl": "L1", "sd3": "L1", "flux": "L1", "wan": "L1", "hunyuan_video": "L1", "wan22": "L1"}
VIDEO = {"num_frames": 13, "height": 128, "width": 128}  # tiny Wan: 4 latent frames of 8 x 8 tokens
RADIAL = {"decay": 0.5, "block_size": 16, "dense_steps": 0, "dense_layers": 0}
TOL = {"atol": 1e-5, "rtol": 1e-5}


pytestmark = pytest.mark.usefixtures("one_thread")


def gen() -> torch.Generator:
    return torch.Generator("cpu").manual_seed(0)


def kwargs_of(family: str, **overrides) -> dict:
    return {**zoo.call_kwargs(family), "output_type": "latent", **overrides}


def run(pipe, family: str, **overrides) -> torch.Tensor:
    return pipe(**kwargs_of(family, **overrides), generator=gen())[0]


def refocused(pipe, family: str, **overrides) -> torch.Tensor:
    """Hand-run refocusing on the stock pipeline (``refocus`` takes the prompt from the layout)."""
    kw = kwargs_of(family)
    kw.pop("prompt")
    return refocus(pipe, LAYOUT, **{"config": REFOCUS, **overrides}, generator=gen(), **kw)[0]


def left_half(size: int = 64) -> torch.Tensor:
    mask = torch.zeros(size, size)
    mask[:, : size // 2] = 1
    return mask


def state(model: torch.nn.Module) -> tuple:
    """What an installation changes: processors, forward pre-hooks, diffusers hooks."""
    registry = getattr(model, "_diffusers_hook", None)
    return dict(model.attn_processors), dict(model._forward_pre_hooks), dict(registry.hooks) if registry else {}


def assert_restored(model: torch.nn.Module, before: tuple) -> None:
    processors, pre_hooks, hooks = state(model)
    assert processors.keys() == before[0].keys() and all(processors[k] is before[0][k] for k in processors)
    assert not any(isinstance(p, EditProcessor) for p in processors.values())
    assert pre_hooks.keys() == before[1].keys() and hooks.keys() == before[2].keys()


def differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((a - b).abs().max() > 1e-4)


# -------------------------------------------------------------------------------------------- the object
def test_instance_of_the_stock_class_sharing_its_modules(tiny_pipe):
    from diffusers import StableDiffusionPipeline

    pipe = tiny_pipe("sd15")
    p = AttnEditPipeline.from_pipe(pipe)
    assert isinstance(p, StableDiffusionPipeline) and isinstance(p, AttnEditPipeline)
    assert type(p).__name__ == "AttnEditStableDiffusionPipeline" and p.stock_class is StableDiffusionPipeline
    assert p.unet is pipe.unet and p.vae is pipe.vae and p.text_encoder is pipe.text_encoder
    assert all(p.components[k] is v for k, v in pipe.components.items())
    # one class per stock class; an edit pipeline of an edit pipeline is the same class again
    assert type(AttnEditPipeline.from_pipe(pipe)) is type(p) is type(AttnEditPipeline.from_pipe(p))
    assert edit_pipeline_class(StableDiffusionPipeline) is type(p)
    assert type(type(p).from_pipe(pipe)) is type(p)
    # the call shows the stock arguments and the options; a saved config names the stock class
    import inspect

    params = inspect.signature(type(p).__call__).parameters
    assert params["guidance_scale"].default == 7.5 and all(name in params for name in OPTIONS)
    assert json.loads(p.to_json_string())["_class_name"] == "StableDiffusionPipeline"


def test_from_pipe_keeps_the_dtype_of_the_shared_modules(zoo_dir):
    pipe = zoo.load_tiny_pipeline("sd15", cache_dir=zoo_dir).to(torch.bfloat16)  # its own copy: it is changed
    p = AttnEditPipeline.from_pipe(pipe)  # diffusers' from_pipe alone would cast everything to float32, in place
    assert p.unet is pipe.unet and pipe.unet.dtype == torch.bfloat16 and pipe.text_encoder.dtype == torch.bfloat16
    cast = AttnEditPipeline.from_pipe(pipe, torch_dtype=torch.float32)  # asked for: diffusers' behaviour
    assert cast.unet.dtype == torch.float32


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3", "flux", "wan"])
def test_no_option_is_the_stock_call_bit_for_bit(tiny_pipe, family):
    pipe = tiny_pipe(family)
    p = AttnEditPipeline.from_pipe(pipe)
    kw = zoo.call_kwargs(family)  # numpy output: decoded, bit-for-bit
    stock = pipe(**kw, generator=gen())[0]
    assert np.array_equal(p(**kw, generator=gen())[0], stock)
    prompt = kw.pop("prompt")
    assert np.array_equal(p(prompt, **kw, generator=gen(), key_mask=None, radial=False, edits=())[0], stock)


# ------------------------------------------------------------------------------------ one option at a time
@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3", "flux"])
def test_layout_equals_refocus(tiny_pipe, family):
    pipe = tiny_pipe(family)
    p = AttnEditPipeline.from_pipe(pipe)
    expected = refocused(pipe, family)
    assert differs(expected, run(pipe, family))
    # the prompt may be given when it is the layout's
    torch.testing.assert_close(run(p, family, layout=LAYOUT, refocus_config=REFOCUS), expected, **TOL)


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3", "flux", "wan", "wan22", "hunyuan_video"])
def test_pag_equals_perturbed_guidance(tiny_pipe, family):
    pipe = tiny_pipe(family)
    p = AttnEditPipeline.from_pipe(pipe)
    with perturbed_guidance(pipe, HEADS[family], scale=2.0, strength=0.5, steps=(0, 1)):
        expected = run(pipe, family)
    assert differs(expected, run(pipe, family))
    got = run(p, family, pag_heads=HEADS[family], pag_scale=2.0, pag_strength=0.5, pag_options={"steps": (0, 1)})
    torch.testing.assert_close(got, expected, **TOL)


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3", "flux", "wan", "hunyuan_video"])
def test_key_mask_equals_install(tiny_pipe, family):
    pipe = tiny_pipe(family)
    p = AttnEditPipeline.from_pipe(pipe)
    with install(pipe, KeyMask(mask=left_half())):
        expected = run(pipe, family)
    assert differs(expected, run(pipe, family))
    torch.testing.assert_close(run(p, family, key_mask=left_half()), expected, **TOL)  # a tensor
    as_uint8 = (left_half().numpy() * 255).astype(np.uint8)  # an 8-bit array
    torch.testing.assert_close(run(p, family, key_mask=as_uint8), expected, **TOL)
    soft = KeyMask(mask=left_half(), mode="soft", steps=(1, 2))  # a KeyMask as it is
    with install(pipe, soft):
        expected = run(pipe, family)
    torch.testing.assert_close(run(p, family, key_mask=soft), expected, **TOL)


@pytest.mark.parametrize("family", ["wan", "hunyuan_video"])
def test_radial_equals_install(tiny_pipe, family):
    pipe = tiny_pipe(family)
    p = AttnEditPipeline.from_pipe(pipe)
    edit = RadialAttention.preset(family, **RADIAL)
    with install(pipe, edit):
        expected = run(pipe, family, **VIDEO)
    assert differs(expected, run(pipe, family, **VIDEO))
    torch.testing.assert_close(run(p, family, radial=RADIAL, **VIDEO), expected, **TOL)  # preset overrides
    torch.testing.assert_close(run(p, family, radial=edit, **VIDEO), expected, **TOL)
    with install(pipe, RadialAttention.preset(family)):  # True: the family's preset
        expected = run(pipe, family, **VIDEO)
    torch.testing.assert_close(run(p, family, radial=True, **VIDEO), expected, **TOL)


def test_radial_true_is_the_pipelines_preset(tiny_pipe):
    """Wan 2.2 (two denoisers) gets the authors' Wan 2.2 preset from radial=True, not Wan 2.1's."""
    from attnedit.pipelines.edit_pipeline import _as_radial
    from attnedit.pipelines.radial import default_preset

    pipe = tiny_pipe("wan22")
    assert default_preset(pipe) == "wan22"
    assert _as_radial(True, "wan", default_preset(pipe)) == RadialAttention.preset("wan22")
    assert _as_radial({"decay": 0.5}, "wan", "wan22") == RadialAttention.preset("wan22", decay=0.5)
    assert RadialAttention.preset("wan22") != RadialAttention.preset("wan")


# -------------------------------------------------------------------------------------- several at once
@pytest.mark.parametrize("family", ["sd15", "sd3", "flux"])
def test_layout_pag_and_key_mask_in_one_call(tiny_pipe, family):
    pipe = tiny_pipe(family)
    p = AttnEditPipeline.from_pipe(pipe)
    model = zoo.denoiser(pipe)
    before = state(model)
    # FLUX refocuses with gradient checkpointing (its default): refocusing's forwards skip the guidance rows
    with perturbed_guidance(pipe, HEADS[family], scale=2.0) as handle:
        expected = refocused(pipe, family, handle=handle, edits=(KeyMask(mask=left_half()),), config=REFOCUS)
    assert differs(expected, refocused(pipe, family))  # the guidance and the mask change the refocused run
    got = run(p, family, layout=LAYOUT, refocus_config=REFOCUS, pag_heads=HEADS[family], pag_scale=2.0,
              key_mask=left_half())
    torch.testing.assert_close(got, expected, **TOL)
    assert_restored(model, before)


def test_radial_pag_and_key_mask_in_one_call_on_wan(tiny_pipe):
    pipe = tiny_pipe("wan")
    p = AttnEditPipeline.from_pipe(pipe)
    before = state(pipe.transformer)
    radial = RadialAttention.preset("wan", **RADIAL)
    with perturbed_guidance(pipe, "L1", scale=2.0), install(pipe, KeyMask(mask=left_half()), radial):
        expected = run(pipe, "wan", **VIDEO)
    with install(pipe, radial):
        assert differs(expected, run(pipe, "wan", **VIDEO))
    got = run(p, "wan", radial=RADIAL, pag_heads="L1", pag_scale=2.0, key_mask=left_half(), **VIDEO)
    torch.testing.assert_close(got, expected, **TOL)
    assert_restored(pipe.transformer, before)


# --------------------------------------------------------------------------------- restoration and misuse
def _boom(*args):
    raise RuntimeError("boom")


@pytest.mark.parametrize("family, options", [
    ("sd15", {"layout": LAYOUT, "refocus_config": REFOCUS, "pag_heads": "L1", "key_mask": left_half()}),
    ("wan", {"radial": RADIAL, "pag_heads": "L1", "edits": (KeyMask(mask=left_half()),)}),
], ids=["sd15-layout-pag-mask", "wan-radial-pag-edits"])
def test_processors_restored_after_the_call_and_after_an_exception(tiny_pipe, family, options):
    pipe = tiny_pipe(family)
    p = AttnEditPipeline.from_pipe(pipe)
    model = zoo.denoiser(pipe)
    before = state(model)
    stock = run(pipe, family)
    run(p, family, **options)
    assert_restored(model, before)
    with pytest.raises(RuntimeError, match="boom"):
        run(p, family, callback_on_step_end=_boom, **options)
    assert_restored(model, before)
    assert torch.equal(run(p, family), stock)


def test_misuse_is_a_clear_error(tiny_pipe):
    from diffusers import DDPMScheduler, StableDiffusionPAGPipeline, UNet2DModel
    from diffusers.pipelines import DDPMPipeline

    sd, wan = AttnEditPipeline.from_pipe(tiny_pipe("sd15")), AttnEditPipeline.from_pipe(tiny_pipe("wan"))
    before = state(sd.unet)
    bad = [
        (sd, {"pag_scale": 2.0}, "without pag_heads"),
        (sd, {"pag_heads": "L1", "pag_options": {"scale": 2.0}}, "must not repeat"),
        (sd, {"refocus_config": REFOCUS}, "without layout"),
        (sd, {"layout": {"prompt": PROMPT}}, "must be an attnedit.methods.refocusing.Layout"),
        (sd, {"layout": LAYOUT, "prompt": "a dog"}, "differs from layout.prompt"),
        (sd, {"layout": LAYOUT, "refocus_options": {"handle": None}}, "must not set"),
        (sd, {"radial": True}, "needs a video diffusion transformer"),
        (sd, {"key_mask": "mask.png"}, r"key_mask= must be a tensor, numpy array, PIL image or nested list of numbers; got str"),
        (sd, {"key_mask": np.full((8, 8), 3.0)}, r"values must be in \[0, 1\]"),
        (sd, {"key_mask": torch.ones(8)}, "must be"),
        (sd, {"edits": ("not an edit",)}, "takes attnedit Edit objects"),
        (sd, {"pag_heads": "L99"}, "names layer 99"),
        (wan, {"layout": LAYOUT}, "supports SD 1.x, SDXL, SD3 and FLUX.1"),
        (wan, {"radial": 5}, "must be True, a preset name"),
        (wan, {"radial": "nope"}, "preset='nope'"),
        (wan, {"radial": {"speed": 2}}, r"radial= names \['speed'\], which are not RadialAttention fields"),
        (wan, {"key_mask": torch.zeros(7, 16, 16)}, r"key_mask of 7 frames does not match num_frames="),
        (wan, {"key_mask": torch.zeros(16, 64)}, r"key_mask of size \(16, 64\) does not have the aspect ratio"),
    ]
    for pipe, options, match in bad:
        kw = {**zoo.call_kwargs("wan" if pipe is wan else "sd15"), **options}
        with pytest.raises(ValueError, match=match):
            pipe(**kw)
    assert_restored(sd.unet, before)
    with pytest.raises(ValueError, match="needs a diffusers pipeline"):
        AttnEditPipeline.from_pipe(object())
    with pytest.raises(ValueError, match=r"already takes \['pag_scale'\]"):
        edit_pipeline_class(StableDiffusionPAGPipeline)
    with pytest.raises(ValueError, match="not a diffusers pipeline class"):
        edit_pipeline_class(dict)
    unet = UNet2DModel(sample_size=8, block_out_channels=(8, 8), norm_num_groups=4, layers_per_block=1,
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
    with pytest.raises(ValueError, match="DDPMPipeline is not supported"):
        AttnEditPipeline.from_pipe(DDPMPipeline(unet=unet, scheduler=DDPMScheduler()))


def test_edits_and_backend_options(tiny_pipe):
    """``edits=`` installs extra edits with the others; ``edit_backend`` reaches the installation."""
    pipe = tiny_pipe("sd15")
    p = AttnEditPipeline.from_pipe(pipe)
    extra = dataclasses.replace(KeyMask(mask=left_half()), branches={"cond"})
    with install(pipe, extra, backend="reference"):
        expected = run(pipe, "sd15")
    torch.testing.assert_close(run(p, "sd15", edits=(extra,), edit_backend="reference"), expected, **TOL)
    torch.testing.assert_close(run(p, "sd15", edits=extra), expected, atol=1e-4, rtol=1e-4)
    with install(pipe, backend="reference") as handle:  # layout= with a backend: refocus inside that installation
        expected = refocused(pipe, "sd15", handle=handle)
    got = run(p, "sd15", layout=LAYOUT, refocus_config=REFOCUS, edit_backend="reference")
    torch.testing.assert_close(got, expected, **TOL)
