"""The app beyond one tab, without a browser: the model picker, the session's history, the layout colours."""

from __future__ import annotations

import numpy as np
import pytest

from attnedit.shapes import builtin
from attnedit.surfaces import webapp_session as session
from attnedit.surfaces import webapp_tabs as tabs


@pytest.fixture(scope="module")
def t2i():
    return builtin.load_builtin("shapes-t2i")


def test_the_picker_offers_the_builtins_and_switches_every_tab_to_a_loaded_model(t2i, tmp_path):
    from attnedit.surfaces.loading import load_pipeline

    loads = []
    model = session.AppModel(t2i, "shapes-t2i", loader=lambda name: loads.append(name) or load_pipeline(name))
    assert model.choices() == ["shapes-t2i", "shapes-t2v", "shapes-dit"]
    assert model.switch("shapes-t2i") is t2i and not loads  # the current model is not loaded again
    dit = model.switch(" shapes-dit ")
    assert model.pipe is dit and model.name == "shapes-dit" and model.image_pipe() is dit and loads == ["shapes-dit"]
    model.switch(str(builtin.model_path("shapes-t2i")))  # a local diffusers folder joins the choices
    assert model.choices()[-1] == str(builtin.model_path("shapes-t2i"))
    assert session.control_values(dit, "width") == {"value": 64, "minimum": 8, "maximum": 256, "step": 8,
                                                    "label": "Width (multiple of 8)"}  # its 2x2 patches of 4x latents
    assert session.control_values(dit, "hole_noise") == {"value": 0.0}  # shapes-dit's own edit setting
    assert session.control_values(t2i, "hole_noise") == {"value": 1.0}
    assert session.control_values(t2i, "frames")["value"] == 9  # the video tab: shapes-t2v unless the model is one


@pytest.mark.parametrize("name, message", [
    ("no-such-model", "is not a built-in .* a local diffusers folder or a hub id"),
    ("/no/such/folder", "is not a built-in"),
    ("", "model='' is not a built-in"),
    ("no-such-owner/no-such-model", "could not load model 'no-such-owner/no-such-model'"),  # offline: no hub call
])
def test_a_model_that_cannot_load_is_a_readable_message_and_keeps_the_current_one(t2i, name, message):
    model = session.AppModel(t2i, "shapes-t2i")
    with pytest.raises(ValueError, match=message):
        model.switch(name)
    assert model.pipe is t2i and model.name == "shapes-t2i" and name not in model.choices()


def test_a_folder_that_is_not_a_pipeline_is_a_readable_message(t2i, tmp_path):
    with pytest.raises(ValueError, match="could not load model"):
        session.AppModel(t2i, "shapes-t2i").switch(str(tmp_path))


def test_the_image_tabs_refuse_a_video_model():
    model = session.AppModel(builtin.load_builtin("shapes-t2v"), "shapes-t2v")
    with pytest.raises(ValueError, match="shapes-t2v is a video model"):
        model.image_pipe()


def test_the_history_is_newest_first_bounded_and_captioned_with_seed_and_parameters():
    params = {"prompt": "a red circle", "seed": 7, "steps": 20, "guidance_scale": 4.0, "width": 64, "height": 64,
              "model": "shapes-t2i"}
    history = session.remember([], [("first.png", params, "Attention maps")])
    history = session.remember(history, [("off.png", {**params, "seed": 8}, "Head guidance"),
                                         ("on.png", {**params, "seed": 8, "heads": "L1H0"}, "Head guidance")])
    assert [image for image, _ in history] == ["on.png", "off.png", "first.png"]
    assert history[0][1] == ("Head guidance · seed 8 · 'a red circle' · heads L1H0, steps 20, guidance_scale 4.0, "
                             "model shapes-t2i, 64x64")
    for index in range(2 * session.HISTORY_SIZE):
        history = session.remember(history, [(f"{index}.png", params, "Attention maps")])
    assert len(history) == session.HISTORY_SIZE and history[0][0] == f"{2 * session.HISTORY_SIZE - 1}.png"


def test_the_history_reads_a_served_pngs_parameters_and_shows_a_video_as_a_strip(tmp_path):
    from PIL import PngImagePlugin

    from attnedit.surfaces.webapp_results import with_parameters

    image, info = with_parameters(np.zeros((8, 8, 3), np.uint8), object(), prompt="a cat", seed=3), PngImagePlugin.PngInfo()
    for key, value in image.info.items():  # text chunks, as Gradio writes the app's results
        info.add_text(key, value)
    image.save(tmp_path / "result.png", pnginfo=info)
    assert session.served_parameters(str(tmp_path / "result.png"))["seed"] == 3 and session.served_parameters(None) == {}
    frames = [np.full((4, 6, 3), i, np.uint8) for i in range(9)]
    strip = np.asarray(session.frame_strip(frames))
    assert strip.shape == (4, 30, 3) and strip[0, ::6, 0].tolist() == [0, 2, 4, 6, 8]


def test_the_canvas_shows_the_typed_boxes_in_the_previews_colours():
    text = "red circle: 0.1,0.2,0.4,0.6\nblue square: 0.5,0.5,0.9,0.9; 0,0,0.2,0.2"
    canvas, preview = tabs.layout_canvas(text), tabs.preview_layout(text)
    assert [box["label"] for box in canvas["boxes"]] == ["red circle", "blue square", "blue square"]
    for box in canvas["boxes"]:  # the preview (256 px) outlines each box in the canvas box's colour
        x0, y0 = box["xmin"] * 256 // tabs.CANVAS, box["ymin"] * 256 // tabs.CANVAS
        assert preview[y0 + 1, x0 + 10].tolist() == box["color"]
    assert canvas["boxes"][0]["color"] != canvas["boxes"][1]["color"] == canvas["boxes"][2]["color"]
    assert tabs.layout_canvas("red circle: 0.1,") is None  # half typed: the canvas keeps what it shows
    assert tabs.annotations_to_lines(canvas) == ("red circle: 0.100,0.199,0.400,0.600\n"
                                                 "blue square: 0.500,0.500,0.900,0.900;0.000,0.000,0.199,0.199")
