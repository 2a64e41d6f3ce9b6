"""The built-in trained models: small, loadable with from_pretrained, the CLI's default, and they draw the world."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
import safetensors.torch
import torch
from diffusers import DiffusionPipeline

from attnedit.shapes import builtin, training, world
from attnedit.surfaces.cli import main


@pytest.fixture(scope="module")
def t2i():
    return builtin.load_builtin("shapes-t2i")


@pytest.fixture(scope="module")
def t2v():
    return builtin.load_builtin("shapes-t2v")


@pytest.fixture(scope="module")
def dit():
    return builtin.load_builtin("shapes-dit")


@pytest.mark.parametrize("name, megabytes", [("shapes-t2i", 6), ("shapes-t2v", 6), ("shapes-dit", 6)])
def test_weights_are_small_fp16_safetensors(name, megabytes):
    path = builtin.model_path(name)
    files = list(path.rglob("*.safetensors"))
    assert files and not list(path.rglob("*.bin"))
    assert sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) < megabytes * 2 ** 20
    assert json.loads((path / "model_index.json").read_text())["_class_name"] in (
        "StableDiffusionPipeline", "WanPipeline", "StableDiffusion3Pipeline")


def test_unknown_builtin_model_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown built-in model 'shapes-3d'"):
        builtin.model_path("shapes-3d")


def test_loaded_pipelines_are_float32_and_named(t2i, t2v, dit):
    assert t2i.unet.dtype == torch.float32 and t2v.transformer.dtype == torch.float32
    assert dit.transformer.dtype == torch.float32 and type(dit).__name__ == "StableDiffusion3Pipeline"
    assert [builtin.builtin_name(p) for p in (t2i, t2v, dit)] == ["shapes-t2i", "shapes-t2v", "shapes-dit"]


def test_dit_draws_colours_and_backgrounds_not_positions(dit):
    """shapes-dit (MM-DiT) draws both asked colours and no others; shapes only sometimes; "left of" / "above" near
    chance, as shapes-t2i (what refocusing is for)."""
    both = extra = 0
    for seed in range(6):
        found = world.detect(generate(dit, "a red circle and a blue square", seed))
        both += {"red", "blue"} <= set(found)
        extra += bool(set(found) - {"red", "blue"})
    assert both >= 5 and extra <= 1
    captions = [f"a big {c} {s}" for c, s in [("red", "circle"), ("green", "square"), ("blue", "triangle"),
                                              ("yellow", "circle"), ("red", "square"), ("green", "triangle")]]
    scores = [world.fidelity(generate(dit, c, seed), world.parse_caption(c)) for seed, c in enumerate(captions)]
    assert np.mean(scores) >= 0.6


def test_dit_removes_with_the_key_mask_alone(dit):
    """The paper's setting (inverted noise, no fresh noise in the hole): on the DiT the hidden keys remove the object,
    and without them the same run rebuilds it: attention, not convolutions, carries the content."""
    from attnedit.pipelines.design_edit import DesignEditConfig, DesignEditor

    scene = world.Scene((world.Shape("circle", "red", "big", 0.3, 0.5), world.Shape("square", "blue", "big", 0.75, 0.5)))
    source, mask = scene.render(64), scene.masks(64)[0]
    red = lambda image: int((world.colour_labels(image) == list(world.COLOURS).index("red")).sum())
    config = DesignEditConfig(num_steps=20, **builtin.EDIT_DEFAULTS["shapes-dit"])
    masked = np.asarray(DesignEditor(dit, config).remove(source, mask, 7))
    unmasked = np.asarray(DesignEditor(dit, DesignEditConfig(num_steps=20, mask_until=0.0, guidance_scale=1.0,
                                                             hole_noise=0.0)).remove(source, mask, 7))
    assert red(masked) < 0.2 * red(source) and red(unmasked) > 0.5 * red(source)
    assert world.detect(masked).get("blue") is not None


def generate(pipe, prompt, seed):
    name = builtin.builtin_name(pipe)
    out = pipe(prompt, generator=torch.Generator().manual_seed(seed), output_type="np", **builtin.CALL_DEFAULTS[name])
    return (out.images[0] * 255).round().astype(np.uint8)


def test_t2i_draws_the_asked_colours_and_no_others(t2i):
    """Both objects' colours, and no colour the caption did not ask for, for most seeds. (Where they go is
    not learned: 'left of' is what refocusing is for, see test_refocusing_moves_objects_into_their_boxes.)"""
    both = extra = 0
    for seed in range(6):
        found = world.detect(generate(t2i, "a red circle and a blue square", seed))
        both += {"red", "blue"} <= set(found)
        extra += bool(set(found) - {"red", "blue"})
    assert both >= 5 and extra <= 1


def test_t2i_single_objects_have_the_asked_colour_and_shape(t2i):
    scores = [world.fidelity(generate(t2i, f"a big {c} {s}", seed), world.parse_caption(f"a big {c} {s}"))
              for seed, (c, s) in enumerate([("red", "circle"), ("green", "square"), ("blue", "triangle"),
                                             ("yellow", "circle"), ("red", "square"), ("green", "triangle")])]
    assert np.mean(scores) >= 0.55  # 0.5 per right colour at a right size, +0.5 per right shape


def test_t2i_cross_attention_localizes_on_the_object(t2i):
    """The premise of refocusing: a colour word's cross-attention is denser on its object than elsewhere."""
    from attnedit.core.edits import AttentionRecorder
    from attnedit.core.install import install
    from attnedit.methods.attention_maps import token_heatmaps

    prompt = "a big red circle and a small blue square"
    tokens = t2i.tokenizer.convert_ids_to_tokens(t2i.tokenizer(prompt).input_ids)
    ratios = []
    for seed in range(2):
        recorder = AttentionRecorder(kinds=frozenset({"cross"}), branches=frozenset({"cond"}))
        with install(t2i, recorder):
            image = generate(t2i, prompt, seed)
        heat = token_heatmaps(recorder.maps, (64, 64))
        region = torch.from_numpy(world.colour_labels(image) == list(world.COLOURS).index("red"))
        red = heat[tokens.index("red</w>")]
        ratios.append(float(red[region].mean() / red.mean()))
    assert min(ratios) > 1.15


def test_refocusing_moves_objects_into_their_boxes():
    """On the built-in model, with the paper's loss scale: more objects land in their layout box than plain."""
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "benchmarks"))
    from effect_refocusing import layouts, score

    from attnedit.methods.refocusing import RefocusConfig
    from attnedit.pipelines.refocusing import refocus

    pipe = builtin.load_builtin("shapes-t2i")
    plain, focused = [], []
    for index, (scene, layout) in enumerate(layouts(6, seed=99)):  # the benchmark's layouts use seed 1234
        kwargs = {"num_inference_steps": 20, "guidance_scale": 4.0, "output_type": "np", "height": 64, "width": 64}
        image = pipe(layout.prompt, generator=torch.Generator().manual_seed(index), **kwargs).images[0]
        plain.append(score((image * 255).round().astype(np.uint8), scene)["in_box"])
        image = refocus(pipe, layout, config=RefocusConfig(refocus_steps=10),
                        generator=torch.Generator().manual_seed(index), **kwargs).images[0]
        focused.append(score((image * 255).round().astype(np.uint8), scene)["in_box"])
    assert np.mean(focused) >= np.mean(plain) + 0.2


def video(pipe, prompt, seed, frames=9, edit=None):
    from attnedit.pipelines.radial import generate_radial

    kwargs = {**builtin.CALL_DEFAULTS["shapes-t2v"], "num_frames": frames, "output_type": "np",
              "generator": torch.Generator().manual_seed(seed)}
    out = pipe(prompt, **kwargs) if edit is None else generate_radial(pipe, prompt, radial=edit, **kwargs)
    return (out.frames[0] * 255).round().astype(np.uint8)


def test_t2v_moves_the_object_the_caption_moves(t2v):
    moved = 0
    for seed in range(3):
        clip = video(t2v, "a big red circle moving right on a gray background", seed)
        first, last = world.detect(clip[0]).get("red"), world.detect(clip[-1]).get("red")
        moved += first is not None and last is not None and last.centre[0] - first.centre[0] > 0.1
    assert moved >= 2


def test_radial_video_stays_close_to_the_dense_one(t2v):
    """At 17 frames (9 latent frames, density 0.68), with the paper's dense warm-up (12 of 50 steps, here 5 of
    20, and the first layer), the radial video of a seed is far closer to the dense video of that seed than a
    dense video of another seed is."""
    prompt = "a small blue square moving down on a gray background"
    dense, other = video(t2v, prompt, 0, 17), video(t2v, prompt, 1, 17)
    radial = video(t2v, prompt, 0, 17, edit={"block_size": 64, "dense_steps": 5, "dense_layers": 1})
    assert not np.array_equal(radial, dense)
    assert world.psnr(radial, dense) > world.psnr(other, dense) + 3


def test_cli_generate_defaults_to_the_builtin_model(tmp_path):
    from attnedit.surfaces.outputs import read_png_parameters

    out = tmp_path / "shapes.png"
    assert main(["generate", "a red circle left of a blue square", "--out", str(out)]) == 0
    params = read_png_parameters(out)
    assert params["model"] == "shapes-t2i" and params["width"] == 64
    found = world.detect(np.asarray(__import__("PIL.Image").Image.open(out).convert("RGB")))
    assert {"red", "blue"} <= set(found)


@pytest.mark.parametrize("kind", ["t2i", "t2v", "dit"])
def test_training_script_writes_a_loadable_fp16_pipeline(tmp_path, kind):
    out = tmp_path / kind
    if kind == "t2i":
        training.train_t2i(out, vae_steps=2, unet_steps=2, batch=2, dataset=8, save_every=2, log=lambda s: None)
    elif kind == "dit":
        training.train_dit(out, dit_steps=2, batch=2, dataset=8, save_every=2, log=lambda s: None)
    else:
        training.train_t2v(out, vae_steps=2, dit_steps=2, batch=2, dataset=4, save_every=2, log=lambda s: None)
    loaded = DiffusionPipeline.from_pretrained(out)
    assert (loaded.unet if kind == "t2i" else loaded.transformer) is not None
    stored = safetensors.torch.load_file(next((out / ("unet" if kind == "t2i" else "transformer")).glob("*.safetensors")))
    assert {t.dtype for t in stored.values()} == {torch.float16}
    assert not list(pathlib.Path(tmp_path).glob(f".{kind}-*"))  # no temporary folder left behind


def test_removal_on_the_builtin_model_needs_fresh_noise_in_the_hole(t2i):
    """Key masking alone leaves the object (the small UNet rebuilds it from the inverted noise through its
    convolutions); the shipped setting (hole_noise=1) removes it and keeps the other object."""
    from attnedit.pipelines.design_edit import DesignEditConfig, DesignEditor

    scene = world.Scene((world.Shape("circle", "red", "big", 0.3, 0.5), world.Shape("square", "blue", "big", 0.75, 0.5)))
    source, mask = scene.render(64), scene.masks(64)[0]
    red = lambda image: int((world.colour_labels(image) == list(world.COLOURS).index("red")).sum())
    paper = DesignEditor(t2i, DesignEditConfig(num_steps=20, guidance_scale=1.0, hole_noise=0.0))  # the model's: 1
    paper = np.asarray(paper.remove(source, mask, 3))
    shipped = DesignEditor(t2i, DesignEditConfig(num_steps=20, **builtin.EDIT_DEFAULTS["shapes-t2i"]))
    edited = np.asarray(shipped.remove(source, mask, 3))
    assert red(paper) > 0.5 * red(source)
    assert red(edited) < 0.1 * red(source)
    assert world.detect(edited).get("blue") is not None


@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_hole_noise_out_of_range_is_rejected(value):
    from attnedit.pipelines.design_edit import DesignEditConfig

    with pytest.raises(ValueError, match="hole_noise"):
        DesignEditConfig(hole_noise=value)


def test_cli_hole_noise_reaches_the_editor(tmp_path, capsys):
    """--hole-noise goes into DesignEditConfig: an out-of-range value is a clear error, exit code 2."""
    from PIL import Image

    source = tmp_path / "scene.png"
    Image.fromarray(world.sample_scene(__import__("random").Random(0)).render(64)).save(source)
    code = main(["edit", "remove", str(source), "--box", "8,8,30,30", "--hole-noise", "1.5", "--steps", "2",
                 "--out", str(tmp_path / "out.png")])
    err = capsys.readouterr().err
    assert code == 2 and ("--hole-noise=1.5" in err or "hole_noise=1.5" in err)  # the option's or the config's name
    assert not (tmp_path / "out.png").exists()


def test_cli_generate_with_the_dit(tmp_path):
    from PIL import Image

    from attnedit.surfaces.outputs import read_png_parameters

    out = tmp_path / "dit.png"
    assert main(["generate", "--model", "shapes-dit", "a big red circle", "--steps", "20", "--out", str(out)]) == 0
    assert read_png_parameters(out)["model"] == "shapes-dit"
    assert "red" in world.detect(np.asarray(Image.open(out).convert("RGB")))


def test_dit_phrase_positions_follow_its_clip_length(dit):
    """SD3's joint text keys are [CLIP tokens, T5 tokens]: T5 positions start at the CLIP length (24 here, 77 real)."""
    from attnedit.methods.refocusing import Layout, token_layout

    layout = Layout("a red circle and a blue square", [("red circle", [(0, 0, 0.5, 1)]), ("blue square", [(0.5, 0, 1, 1)])])
    tokens = token_layout(dit, layout, max_sequence_length=builtin.TEXT_LENGTH)
    positions = [tokens.content[i] for i in tokens.phrases[0]]
    assert any(p < builtin.TEXT_LENGTH for p in positions) and any(p >= builtin.TEXT_LENGTH for p in positions)
    assert max(tokens.content) < 2 * builtin.TEXT_LENGTH  # every key exists among the 48 text keys


def test_a_bare_call_uses_the_models_own_defaults(t2v):
    """The defaults belong to the model: ``pipe(prompt)`` on shapes-t2v runs at its 32 px, 9 frames and 24 text
    tokens (the stock Wan defaults, 480x832x81 and 512 tokens, crash it); what the call gives still wins."""
    out = t2v("a big red circle moving right on a gray background", num_inference_steps=2, output_type="np")
    assert np.asarray(out.frames[0]).shape == (9, 32, 32, 3)
    out = t2v("a big red circle", num_frames=5, num_inference_steps=2, output_type="np")
    assert np.asarray(out.frames[0]).shape == (5, 32, 32, 3)
    assert type(t2v).__name__ == "WanPipeline" and t2v.attnedit_defaults["call"]["num_frames"] == 9


def test_python_api_cli_and_app_edit_alike_with_the_models_settings(t2i, tmp_path):
    """``DesignEditor(load_builtin(...))`` edits with the model's own settings (fresh hole noise, 5 px growth):
    the object goes, the other stays, and the CLI and the app give the same pixels for the same inputs."""
    from PIL import Image

    from attnedit.pipelines.design_edit import DesignEditConfig, DesignEditor
    from attnedit.surfaces import webapp_tabs

    scene = world.Scene((world.Shape("circle", "red", "big", 0.3, 0.5), world.Shape("square", "blue", "big", 0.75, 0.5)))
    source, box = scene.render(64), [6, 20, 34, 44]
    Image.fromarray(source).save(tmp_path / "scene.png")
    api = np.asarray(DesignEditor(t2i, DesignEditConfig(num_steps=20)).remove(source, box))
    assert "red" not in world.detect(api) and world.fidelity(api, world.Scene(scene.objects[1:])) == 1.0
    assert main(["edit", "remove", str(tmp_path / "scene.png"), "--box", "6,20,34,44", "--steps", "20",
                 "--out", str(tmp_path / "cli.png")]) == 0
    cli = np.asarray(Image.open(tmp_path / "cli.png").convert("RGB"))
    app = webapp_tabs.run_edit(t2i, source, box, "remove", steps=20)
    assert np.array_equal(api, cli) and np.array_equal(api, app)
