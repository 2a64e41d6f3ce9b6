"""The app, the CLI and the Python API give the same pixels for the same inputs (same seed), tab by tab.

The Edit tab's parity is tests/test_builtin.py::test_python_api_cli_and_app_edit_alike_with_the_models_settings.
The Attention maps and Grounded tabs record attention while they generate; the recorder computes softmax(QK^T)V
explicitly instead of through SDPA, so their images may differ from the CLI's by float rounding: at most one level.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from attnedit.shapes import builtin
from attnedit.surfaces import webapp_tabs as tabs
from attnedit.surfaces.cli import main

PROMPT = "a red circle left of a blue square"
SIZE = {"width": 64, "height": 64}


@pytest.fixture(scope="module")
def t2i():
    return builtin.load_builtin("shapes-t2i")


def _cli(tmp_path, *args: str) -> np.ndarray:
    assert main(["generate", PROMPT, "--steps", "4", "--seed", "3", *args, "--out", str(tmp_path / "cli.png")]) == 0
    return np.asarray(Image.open(tmp_path / "cli.png").convert("RGB")).astype(int)


def test_maps_tab_image_matches_the_cli_and_a_bare_call(t2i, tmp_path):
    from attnedit.surfaces.webapp_maps import generate_with_maps

    app, _ = generate_with_maps(t2i, PROMPT, 3, 4, 4.0, **SIZE)
    python = t2i(PROMPT, num_inference_steps=4, generator=torch.Generator().manual_seed(3), output_type="np").images[0]
    python = (python * 255).round().astype(int)
    assert np.array_equal(_cli(tmp_path), python)
    assert np.abs(app - python).max() <= 1  # the recorder's explicit softmax: rounding only


def test_head_guidance_tab_matches_the_cli_exactly(t2i, tmp_path):
    plain, guided = tabs.run_head_guidance(t2i, PROMPT, "L1H0,L1H1", None, 3, 4, 4.0, 3.0, 1.0, **SIZE)
    assert np.array_equal(guided, _cli(tmp_path, "--heads", "L1H0,L1H1", "--pag-scale", "3"))
    assert np.array_equal(plain, _cli(tmp_path))


def test_grounded_tab_matches_the_cli_layout(t2i, tmp_path):
    boxes = {"red circle": [0.05, 0.2, 0.5, 0.9], "blue square": [0.5, 0.3, 0.95, 0.95]}
    layout = {"prompt": PROMPT, "regions": [{"phrase": p, "boxes": [b]} for p, b in boxes.items()]}
    (tmp_path / "layout.json").write_text(json.dumps(layout))
    lines = "\n".join(f"{p}: {','.join(map(str, b))}" for p, b in boxes.items())
    app, _ = tabs.run_grounded(t2i, PROMPT, lines, 3, 4, 2, 4.0, **SIZE)
    cli = _cli(tmp_path, "--layout", str(tmp_path / "layout.json"), "--refocus-steps", "2")
    assert np.abs(app - cli).max() <= 1  # the recorder's explicit softmax: rounding only


def test_video_tab_matches_the_cli(tmp_path):
    t2v = builtin.load_builtin("shapes-t2v")
    prompt = "a big red circle moving right on a striped background"
    app = tabs.run_video(t2v, prompt, radial=True, dense_steps=1, dense_layers=1, decay=0.2, block_size=128, frames=9,
                         height=32, width=32, steps=3, seed=2)
    out = tmp_path / "clip.mp4"
    assert main(["video", prompt, "--steps", "3", "--seed", "2", "--dense-steps", "1", "--dense-layers", "1",
                 "--decay", "0.2", "--save-frames", "--out", str(out)]) == 0
    frames = sorted((tmp_path / "clip").glob("*.png"))
    assert len(frames) == len(app) == 9
    for frame, shown in zip(frames, app):
        assert np.array_equal(np.asarray(Image.open(frame).convert("RGB")), shown)
