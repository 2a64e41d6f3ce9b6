"""CLI and app entry points on the offline tiny model."""

from __future__ import annotations

import numpy as np
import pytest

from attnedit.surfaces.cli import main
from attnedit.surfaces.webapp import build_app, generate_with_maps


def test_sites_lists_every_site(capsys):
    assert main(["sites"]) == 0
    out = capsys.readouterr().out
    assert "family: unet" in out
    kinds = [line.split()[0] for line in out.splitlines()[2:]]
    assert kinds.count("self") == kinds.count("cross") == 7


def test_sites_with_unknown_tiny_model_exits_2_with_one_line(capsys):
    assert main(["sites", "--model", "tiny:nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("attnedit: error: unknown tiny model") and "\n" not in err


def test_generate_with_maps_gives_one_map_per_token(tiny_pipe):
    image, gallery = generate_with_maps(tiny_pipe("sd15"), "a red circle", seed=0, steps=2, guidance=5.0)
    assert image.dtype == np.uint8 and image.shape[-1] == 3
    assert [label for _, label in gallery] == ["a", "red", "circle"]
    assert all(heat.shape == image.shape and heat.dtype == np.uint8 for heat, _ in gallery)  # maps laid over the image


@pytest.mark.parametrize("prompt, steps, message", [("  ", 2, "prompt is empty"), ("a cat", 0, "steps=0")])
def test_generate_with_maps_rejects_bad_input(tiny_pipe, prompt, steps, message):
    with pytest.raises(ValueError, match=message):
        generate_with_maps(tiny_pipe("sd15"), prompt, seed=0, steps=steps, guidance=5.0)


def test_app_builds(tiny_pipe):
    import gradio as gr

    assert isinstance(build_app(tiny_pipe("sd15"), "tiny:sd15"), gr.Blocks)


def test_generate_writes_png_with_parameters(tmp_path):
    from attnedit.surfaces.outputs import read_png_parameters

    out = tmp_path / "cat.png"
    assert main(["generate", "a red cat", "--out", str(out), "--steps", "2", "--seed", "3"]) == 0
    params = read_png_parameters(out)
    assert params["prompt"] == "a red cat" and params["seed"] == 3 and params["steps"] == 2


def test_generate_bad_steps_exits_2(tmp_path, capsys):
    assert main(["generate", "a red cat", "--out", str(tmp_path / "x.png"), "--steps", "0"]) == 2
    assert "--steps=0 must be an integer in [1, 1000]" in capsys.readouterr().err


# -- the app's method tabs (attnedit.surfaces.webapp_tabs), without a browser ------------------------------------------
BOXES = "a cat: 0.05,0.2,0.5,0.9\na dog: 0.5,0.3,0.95,0.95; 0,0,0.2,0.2"


def test_parse_and_draw_layout():
    from attnedit.surfaces.webapp_tabs import draw_layout, parse_layout, preview_layout

    layout = parse_layout("a cat and a dog", BOXES)
    assert [r.phrase for r in layout.regions] == ["a cat", "a dog"] and len(layout.regions[1].boxes) == 2
    canvas = draw_layout(layout, size=100)
    assert canvas.shape == (100, 100, 3) and (canvas != 255).any()
    assert preview_layout("not a layout") is None


@pytest.mark.parametrize("prompt, text, message", [
    ("", "a: 0,0,1,1", "prompt is empty"), ("x", "a 0,0,1,1", "must read 'phrase: x0,y0,x1,y1'"),
    ("x", "a: q,0,1,1", "boxes must be numbers"), ("x", "a: 0,0,2,1", "must be 4 numbers in"), ("x", "", "no region"),
])
def test_parse_layout_rejects_bad_input(prompt, text, message):
    from attnedit.surfaces.webapp_tabs import parse_layout

    with pytest.raises(ValueError, match=message):
        parse_layout(prompt, text)


def test_grounded_gives_an_image_and_one_map_per_phrase(tiny_pipe):
    from attnedit.surfaces.webapp_tabs import run_grounded

    image, maps = run_grounded(tiny_pipe("sd15"), "a cat and a dog", BOXES, seed=0, steps=3, refocus_steps=2, guidance=7.5)
    assert image.shape == (64, 64, 3) and [label for _, label in maps] == ["a cat", "a dog"]
    assert all(heat.shape == (64, 64, 3) and heat.dtype == np.uint8 for heat, _ in maps)  # maps laid over the image


def test_editor_mask_reads_layer_alpha_at_background_size():
    from attnedit.surfaces.webapp_tabs import editor_mask

    layer = np.zeros((32, 32, 4), np.uint8)
    layer[4:8, 10:20, 3] = 255
    mask = editor_mask({"background": np.zeros((64, 64, 4), np.uint8), "layers": [layer], "composite": None})
    assert mask.shape == (64, 64) and mask.sum() == 8 * 20 and mask[8:16, 20:40].all()
    assert editor_mask({"background": np.zeros((8, 8, 4), np.uint8), "layers": [np.zeros((8, 8, 4), np.uint8)]}) is None
    assert editor_mask(None) is None
    # painted on an editor showing the image at another size: the mask follows the image being edited
    resized = editor_mask({"background": None, "layers": [layer]}, like=np.zeros((48, 96, 3), np.uint8))
    assert resized.shape == (48, 96) and resized[6:12, 30:60].all() and resized.sum() == 6 * 30


def test_edit_source_prefers_the_plain_upload_then_the_editor_background():
    from attnedit.surfaces.webapp_tabs import edit_source

    upload, background = np.zeros((8, 8, 3), np.uint8), np.ones((4, 4, 3), np.uint8)
    assert edit_source(upload, {"background": background}) is upload
    assert edit_source(None, {"background": background, "layers": []}) is background
    assert edit_source(None, None) is None and edit_source(None, {"background": None}) is None


@pytest.mark.parametrize("family, operation, direction", [
    ("sd15", "remove", "h"), ("sd15", "move", "h"), ("sd15", "flip", "v"), ("sd15", "pan", "left"),
    ("sd3", "remove", "h"), ("flux", "move", "h"),
])
def test_edit_operations_keep_the_image_size(tiny_pipe, family, operation, direction):
    from attnedit.surfaces.webapp_tabs import parse_box, run_edit

    image = np.random.default_rng(0).integers(0, 255, (64, 48, 3), dtype=np.uint8)
    directions = {"pan": direction} if operation == "pan" else {"flip": direction}
    out = run_edit(tiny_pipe(family), image, parse_box("8, 8, 24, 30"), operation, dx=8, **directions, amount=8, steps=3)
    assert out.shape == (64, 48, 3) and out.dtype == np.uint8


@pytest.mark.parametrize("image, box, operation, message", [
    (None, "1,1,5,5", "remove", "upload an image first"), ("rgb", "", "move", "'move' needs a mask"),
    ("rgb", "1,2,3", "remove", "four integers"), ("rgb", "0,0,64,64", "remove", "covers the whole image"),
    ("rgb", "1,1,5,5", "twirl", "operation='twirl'"),
])
def test_edit_rejects_bad_input(tiny_pipe, image, box, operation, message):
    from attnedit.surfaces.webapp_tabs import parse_box, run_edit

    image = np.zeros((64, 64, 3), np.uint8) if image == "rgb" else image
    with pytest.raises(ValueError, match=message):
        run_edit(tiny_pipe("sd15"), image, parse_box(box), operation, steps=2)


def test_head_guidance_same_seed_differs_only_by_guidance(tiny_pipe, tmp_path):
    import json

    from attnedit.surfaces.webapp_tabs import run_head_guidance

    pipe = tiny_pipe("sd15")
    plain, guided = run_head_guidance(pipe, "a cat", "L1H0,L1H1", None, seed=0, steps=2, guidance=5.0, scale=3.0, strength=1.0)
    assert plain.shape == guided.shape == (64, 64, 3) and (plain != guided).any()
    ranking = tmp_path / "ranking.json"
    ranking.write_text(json.dumps({"heads": [[1, 0], [1, 1]]}))
    again = run_head_guidance(pipe, "a cat", "", str(ranking), seed=0, steps=2, guidance=5.0, scale=3.0, strength=1.0)
    assert (again[0] == plain).all() and (again[1] == guided).all()
    with pytest.raises(ValueError, match="selects no head|give heads"):
        run_head_guidance(pipe, "a cat", " ", None, seed=0, steps=2, guidance=5.0, scale=3.0, strength=1.0)


def test_video_frames_with_and_without_radial(tiny_pipe):
    from attnedit.surfaces.webapp_tabs import frames_to_video, is_video, run_video

    pipe = tiny_pipe("wan")
    assert is_video(pipe) and not is_video(tiny_pipe("sd15"))
    kw = {"dense_steps": 0, "dense_layers": 0, "decay": 0.5, "block_size": 16, "frames": 25, "height": 128,
          "width": 128, "steps": 2, "seed": 0}
    sparse, dense = run_video(pipe, "a fox", radial=True, **kw), run_video(pipe, "a fox", radial=False, **kw)
    assert len(sparse) == 25 and sparse[0].shape == (128, 128, 3) and sparse[0].dtype == np.uint8
    assert any((a != b).any() for a, b in zip(sparse, dense))
    with pytest.raises(ValueError, match="block_size=24 must be a power of two"):
        run_video(pipe, "a fox", radial=True, **{**kw, "block_size": 24})
    path = frames_to_video(sparse)
    assert path is None or path.endswith(".mp4")


def test_drawn_boxes_become_layout_lines():
    import numpy as np

    from attnedit.surfaces.webapp_tabs import annotations_to_lines, parse_layout

    value = {"image": np.zeros((200, 400, 3), np.uint8), "boxes": [
        {"xmin": 0, "ymin": 20, "xmax": 200, "ymax": 180, "label": "a cat"},
        {"xmin": 300, "ymin": 100, "xmax": 220, "ymax": 0, "label": "a dog"},  # drawn right-to-left
        {"xmin": 380, "ymin": 150, "xmax": 400, "ymax": 200, "label": "a dog"},
    ]}
    lines = annotations_to_lines(value)
    assert lines == "a cat: 0.000,0.100,0.500,0.900\na dog: 0.550,0.000,0.750,0.500;0.950,0.750,1.000,1.000"
    layout = parse_layout("a cat and a dog", lines)
    assert [len(r.boxes) for r in layout.regions] == [1, 2]
    with pytest.raises(ValueError, match="draw at least one box"):
        annotations_to_lines({"image": None, "boxes": []})
    with pytest.raises(ValueError, match="box 1 has no label"):
        annotations_to_lines({"boxes": [{"xmin": 0, "ymin": 0, "xmax": 5, "ymax": 5, "label": ""}]})
