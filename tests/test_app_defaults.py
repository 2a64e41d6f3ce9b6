"""The app's helpers without a browser: the model's own defaults, refused inputs and the grown-mask preview."""

from __future__ import annotations

import numpy as np
import pytest

from attnedit.shapes import builtin, world
from attnedit.surfaces import webapp_tabs as tabs


@pytest.fixture(scope="module")
def t2i():
    return builtin.load_builtin("shapes-t2i")


def test_the_controls_start_at_the_models_own_settings(t2i):
    """CFG 4 and 20 steps as the CLI; the edit's mask growth is the model's 5 native px, scaled to the image
    (20 px on a 256 px upload); the video tab starts at shapes-t2v's trained 9 frames."""
    settings = tabs.model_settings(t2i)
    assert (settings["guidance_scale"], settings["steps"], settings["width"], settings["multiple"]) == (4.0, 20, 64, 16)
    assert tabs.edit_settings(t2i) == {"growth": 5, "fill_growth": 0, "hole_noise": 1.0, "guidance_scale": 1.0}
    assert tabs.edit_settings(t2i, np.zeros((256, 256, 3), np.uint8))["growth"] == 20
    assert tabs.builtin_video_settings()["frames"] == 9


@pytest.mark.parametrize("width, height, frames, message", [(70, 64, None, "width=70 must be a multiple of 16"),
                                                            (64, 1024, None, "height=1024"),
                                                            (64, 64, 4, "frames=4 must be 1 \\+ a multiple")])
def test_sizes_the_model_cannot_take_are_refused(t2i, width, height, frames, message):
    with pytest.raises(ValueError, match=message):
        tabs.check_size(t2i, width, height, frames)


@pytest.mark.parametrize("boxes, message", [("phrase: 0.1,0.1,0.5,0.5", "still labelled 'phrase'"),
                                            ("green triangle: 0.1,0.1,0.5,0.5", "'green triangle' is not in the prompt")])
def test_grounded_boxes_need_phrases_of_the_prompt(boxes, message):
    with pytest.raises(ValueError, match=message):
        tabs.check_phrases(tabs.parse_layout("a red circle and a blue square", boxes))


def test_unknown_words_of_a_builtin_are_named(t2i):
    assert tabs.unknown_words(t2i, "a red dog and a blue square") == ["dog"]


@pytest.mark.parametrize("text", ["/etc/passwd", "../ranking.json", "C:\\heads.json", "heads.json"])
def test_the_head_text_box_never_opens_a_path(text):
    with pytest.raises(ValueError, match="upload a ranking JSON instead"):
        tabs.check_heads_text(text)


def test_the_head_text_box_takes_syntax_and_presets():
    assert tabs.check_heads_text(" L1H0, L1H1 ") == "L1H0, L1H1"
    assert tabs.check_heads_text("shapes-t2i") == "shapes-t2i"


def test_mask_preview_shows_the_mask_and_its_growth():
    image = np.full((64, 64, 3), 100, np.uint8)
    mask = np.zeros((64, 64), bool)
    mask[20:30, 20:30] = True
    preview = tabs.mask_preview(image, mask, 6)
    assert preview[25, 25, 0] > 180 and preview[25, 25, 1] < 80  # red inside the mask
    assert preview[18, 25, 1] > 150 and preview[10, 25].tolist() == [100, 100, 100]  # yellow ring, then untouched
    assert tabs.grown_mask(mask, 6).sum() == 15 * 15  # the editor's kernel: 6 px wide, 5 more rows and columns


def test_default_removal_in_the_app_removes_the_object_and_keeps_the_other(t2i):
    scene = world.Scene((world.Shape("square", "green", "big", 0.3, 0.5), world.Shape("circle", "yellow", "small", 0.7, 0.5)))
    out = tabs.run_edit(t2i, scene.render(64), scene.masks(64)[0], "remove", steps=tabs.model_settings(t2i)["steps"])
    assert "green" not in world.detect(out) and world.fidelity(out, world.Scene(scene.objects[1:])) == 1.0


def test_a_random_seed_is_a_whole_number_and_bad_seeds_are_refused():
    assert 0 <= tabs.pick_seed(0, True) < 2**31 and tabs.pick_seed(7.0) == 7
    with pytest.raises(ValueError, match="seed=1.5"):
        tabs.pick_seed(1.5)


def test_results_carry_their_parameters_into_the_png_gradio_serves(t2i):
    """A PIL result with text info, through a format="png" gr.Image as the app returns it: the served file holds
    the A1111 line and the job JSON; no file of ours is written."""
    import gradio as gr

    from attnedit.surfaces.outputs import read_png_parameters
    from attnedit.surfaces.webapp_results import with_parameters

    result = with_parameters(np.zeros((64, 64, 3), np.uint8), t2i, prompt="a red circle", seed=7, steps=20)
    served = gr.Image(format="png").postprocess(result).path
    assert read_png_parameters(served) == {"prompt": "a red circle", "seed": 7, "steps": 20, "width": 64,
                                           "height": 64, "model": "shapes-t2i"}
    assert "Seed: 7" in result.info["parameters"] and "Size: 64x64" in result.info["parameters"]


def test_image_tabs_take_the_size_and_negative_prompt_asked_and_refuse_sizes_the_model_cannot_take(t2i):
    from attnedit.surfaces.webapp_maps import generate_with_maps
    from attnedit.surfaces.webapp_results import image_options

    options = image_options(t2i, 48, 32, " blue ")
    assert options == {"width": 48, "height": 32, "negative_prompt": "blue"} and "negative_prompt" not in \
        image_options(t2i, 64, 64, "")
    with pytest.raises(ValueError, match="width=70 must be a multiple of 16"):
        image_options(t2i, 70, 64, "")
    image, maps = generate_with_maps(t2i, "a red circle", 0, 2, 4.0, **options)
    assert image.shape == (32, 48, 3) and maps and maps[0][0].shape[:2] == (32, 48)
    grounded, _ = tabs.run_grounded(t2i, "a red circle", "red circle: 0.1,0.1,0.6,0.9", 0, 2, 1, 4.0, **options)
    plain, guided = tabs.run_head_guidance(t2i, "a red circle", "L1H0", None, 0, 2, 4.0, 3.0, 1.0, **options)
    assert grounded.shape == plain.shape == guided.shape == (32, 48, 3)
    options.pop("negative_prompt")  # the negative prompt reaches the refocused pipeline
    assert not np.array_equal(grounded, tabs.run_grounded(t2i, "a red circle", "red circle: 0.1,0.1,0.6,0.9", 0, 2, 1,
                                                          4.0, **options)[0])


def test_every_generating_tab_has_a_stop_button_that_cancels_its_run(t2i):
    from attnedit.surfaces.webapp import build_app

    deps = build_app(t2i, "shapes-t2i").config["dependencies"]
    cancelled = {deps[i]["api_name"] for d in deps for i in d["cancels"]}
    assert cancelled == {"generate", "grounded", "edit", "head_guidance", "video"}
