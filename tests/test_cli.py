"""Every CLI subcommand's happy path on the tiny offline models, and its bad-input exits (code 2, one line)."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from attnedit.surfaces.cli import main
from attnedit.surfaces.outputs import read_png_parameters


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "photo.png"
    assert main(["generate", "a red circle", "--steps", "2", "--out", str(path)]) == 0
    return path


def test_generate_with_layout_and_head_guidance(tmp_path):
    layout = tmp_path / "layout.json"
    layout.write_text(json.dumps({"prompt": "a red circle and a blue square",
                                  "regions": [{"phrase": "red circle", "boxes": [[0, 0, 0.5, 1]]},
                                              {"phrase": "blue square", "boxes": [[0.5, 0, 1, 1]]}]}))
    out = tmp_path / "g.png"
    assert main(["generate", "--layout", str(layout), "--heads", "L1H0", "--pag-scale", "2", "--steps", "4",
                 "--out", str(out)]) == 0
    params = read_png_parameters(out)
    assert params["heads"] == "L1H0" and params["layout"] == str(layout) and Image.open(out).size == (64, 64)


@pytest.mark.parametrize("operation, extra", [("remove", ["--box", "16,16,48,48"]),
                                               ("move", ["--box", "16,16,40,40", "--dx", "8", "--dy", "4"]),
                                               ("zoom-out", ["--scale", "0.5"])])
def test_edit_operations(photo, tmp_path, operation, extra):
    out = tmp_path / f"{operation}.png"
    assert main(["edit", operation, str(photo), *extra, "--steps", "4", "--out", str(out)]) == 0
    assert Image.open(out).size == Image.open(photo).size
    assert read_png_parameters(out)["operation"] == operation


@pytest.mark.parametrize("radial", [True, False])
def test_video_writes_mp4_and_frames(tmp_path, radial):
    import imageio.v3 as iio

    out = tmp_path / "ball.mp4"
    args = ["video", "a ball", "--steps", "2", "--frames", "5", "--out", str(out), "--save-frames"]
    assert main(args + ([] if radial else ["--dense"])) == 0
    assert iio.imread(out).shape[0] == 5  # decodes: five frames
    frames = sorted((tmp_path / "ball").glob("*.png"))
    assert len(frames) == 5 and read_png_parameters(frames[0])["radial"] is radial


def test_presets_lists_the_shipped_head_and_radial_presets(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "shapes-t2i       unet   0:4,5:0,5:1" in out and "shapes-dit       sd3    0:0,0:2,2:0" in out
    assert "wan22            decay=0.8, block_size=64, thinning_width=128" in out


def test_video_radial_preset_and_dense_tail_reach_the_edit(tmp_path, monkeypatch):
    import attnedit.pipelines.radial as radial

    seen = {}
    real = radial.generate_radial

    def spy(pipe, prompt, **kwargs):
        seen.update(preset=kwargs.get("preset"), radial=kwargs.get("radial"))
        return real(pipe, prompt, **kwargs)

    monkeypatch.setattr(radial, "generate_radial", spy)
    out = tmp_path / "ball.mp4"
    args = ["video", "a ball", "--steps", "3", "--frames", "5", "--out", str(out), "--radial-preset", "wan_2x",
            "--dense-tail-steps", "1"]
    assert main(args) == 0 and out.exists()
    assert seen == {"preset": "wan_2x", "radial": {"dense_tail_steps": 1}}
    assert main(args[:-4] + ["--radial-preset", "nope"]) == 2


def test_heads_search_writes_a_ranking(tmp_path, capsys):
    assert main(["heads", "--model", "tiny:sd3", "--prompt", "a cat", "--layers", "1", "--steps", "2",
                 "--workdir", str(tmp_path)]) == 0
    ranking = json.loads((tmp_path / "ranking.json").read_text())
    assert ranking["heads"] and "heads:" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["edit", "remove", "{photo}", "--steps", "4"], "edit remove: --mask is required"),
        (["edit", "remove", "{tmp}/missing.png", "--box", "1,1,5,5"], "missing.png"),
        (["edit", "move", "{photo}", "--box", "1,2,3"], "--box='1,2,3' must be x0,y0,x1,y1"),
        (["edit", "resize", "{photo}", "--box", "8,8,30,30", "--scale", "0", "--steps", "4"], "scale"),
        (["generate", "a cat", "--heads", "L99H0", "--steps", "2"], "99"),
        (["generate", "--layout", "{tmp}/nope.json"], "nope.json"),
        (["generate", "a cat", "--layout", '{{"prompt": "a cat", "regions": [{{"phrase": "dog", "boxes": [[0, 0, 1, 1]]}}]}}'],
         "dog"),
        (["video", "a ball", "--decay", "-1", "--steps", "2", "--frames", "5"], "decay"),
        (["heads", "--model", "tiny:sd3", "--prompt", "a", "--objective", "vibes"], "--objective='vibes'"),
    ],
)
def test_bad_input_exits_2_with_one_line(photo, tmp_path, capsys, args, message):
    args = [a.format(photo=photo, tmp=tmp_path) for a in args]
    assert main([*args, "--out", str(tmp_path / "o.png")] if args[0] != "heads" else args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("attnedit: error:") and message in err[0], err


def test_unknown_operation_is_an_argparse_error(photo):
    with pytest.raises(SystemExit) as exit_info:
        main(["edit", "paint", str(photo)])
    assert exit_info.value.code == 2


@pytest.mark.parametrize("model", ["tiny:sd3", "tiny:flux"])
def test_edit_on_flow_matching_transformers(photo, tmp_path, model):
    out = tmp_path / "removed.png"
    assert main(["edit", "remove", str(photo), "--box", "16,16,40,40", "--steps", "3", "--model", model,
                 "--out", str(out)]) == 0
    assert Image.open(out).size == Image.open(photo).size and read_png_parameters(out)["model"] == model
