"""CLI and app entry points on the offline tiny model."""

from __future__ import annotations

import numpy as np
import pytest

from attnedit.cli import main
from attnedit.webapp import build_app, generate_with_maps


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
    assert all(heat.shape == image.shape[:2] for heat, _ in gallery)


@pytest.mark.parametrize("prompt, steps, message", [("  ", 2, "prompt is empty"), ("a cat", 0, "steps=0")])
def test_generate_with_maps_rejects_bad_input(tiny_pipe, prompt, steps, message):
    with pytest.raises(ValueError, match=message):
        generate_with_maps(tiny_pipe("sd15"), prompt, seed=0, steps=steps, guidance=5.0)


def test_app_builds(tiny_pipe):
    import gradio as gr

    assert isinstance(build_app(tiny_pipe("sd15"), "tiny:sd15"), gr.Blocks)


def test_generate_writes_png_with_parameters(tmp_path):
    from attnedit.outputs import read_png_parameters

    out = tmp_path / "cat.png"
    assert main(["generate", "a red cat", "--out", str(out), "--steps", "2", "--seed", "3"]) == 0
    params = read_png_parameters(out)
    assert params["prompt"] == "a red cat" and params["seed"] == 3 and params["steps"] == 2


def test_generate_bad_steps_exits_2(tmp_path, capsys):
    assert main(["generate", "a red cat", "--out", str(tmp_path / "x.png"), "--steps", "0"]) == 2
    assert "steps=0 must be >= 1" in capsys.readouterr().err
