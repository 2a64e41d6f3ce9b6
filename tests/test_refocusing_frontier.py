"""The cheap refocusing schedules: their tables, the front-half map layers, and their names on every surface."""

from __future__ import annotations

import pytest
import torch

from attnedit import install
from attnedit.methods.refocusing import SCHEDULES, RefocusConfig


@pytest.mark.parametrize("name, maps, until, in_20_steps", [("fast", "all", 20, 8), ("fast-15", "all", 15, 6),
                                                             ("fast-front", "front", 20, 8)])
def test_fast_schedules_are_one_update_per_step_over_ce0439c_first_steps(name, maps, until, in_20_steps):
    fast, ce = RefocusConfig(schedule=name), RefocusConfig()
    steps = [i for i in range(50) if fast.refocuses(i)]
    assert steps == list(range(until)) and {fast.max_iterations(i) for i in steps} == {1}
    assert [fast.step_size(i) for i in (0, 9, 10, 14)] == [3.0, 3.0, 2.0, 2.0]
    assert all(fast.step_size(i) == ce.step_size(i) for i in steps)  # ce0439c's scales, fewer updates
    assert fast.map_span == maps and not fast.gated and SCHEDULES[name].peak_threshold is None
    assert [i for i in range(20) if fast.refocuses(i, 20)] == list(range(in_20_steps))  # read at i * 50 // 20
    assert RefocusConfig().map_span == "all" and RefocusConfig(schedule="fast", maps="all").map_span == "all"
    with pytest.raises(ValueError, match=r"maps='back' must be one of \('all', 'front'\)"):
        RefocusConfig(maps="back")


def test_front_maps_are_the_first_half_of_the_map_layers(tiny_pipe):
    from diffusers import UNet2DConditionModel

    from attnedit.pipelines.refocusing import map_layers

    torch.manual_seed(0)
    unet = UNet2DConditionModel(  # SD 1.x's block layout in miniature: maps at latent / 4 in down_blocks.2, up_blocks.1
        sample_size=32, block_out_channels=(8, 8, 8, 8), layers_per_block=1, cross_attention_dim=8, norm_num_groups=4,
        attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    ).eval()
    text = torch.randn(1, 5, 8)
    forward = lambda x, t: unet(x, t, encoder_hidden_states=text)
    x, t = torch.zeros(1, 4, 32, 32), torch.tensor(1)
    with install(unet) as handle:
        front = map_layers(handle, forward, x, t, RefocusConfig(schedule="fast-front"))
        every = map_layers(handle, forward, x, t, RefocusConfig(schedule="fast"))
        chosen = map_layers(handle, forward, x, t, RefocusConfig(schedule="fast-front", layers={3}))
    names = {(s.kind, s.layer): ".".join(s.name.split(".")[:2]) for s in handle.sites}
    blocks = lambda kind, layers: sorted({names[kind, i] for i in layers})
    assert blocks("cross", every[2]) == ["down_blocks.2", "up_blocks.1"]
    assert blocks("cross", front[2]) == ["down_blocks.2"] and blocks("self", front[3]) == ["down_blocks.2"]
    assert chosen[2] == frozenset({3})  # explicit layers win over the schedule's span
    with install(tiny_pipe("sd3")) as handle:  # two joint blocks: the first
        assert map_layers(handle, None, None, None, RefocusConfig(schedule="fast-front"))[2] == frozenset({0})


@pytest.mark.parametrize("name", ["fast", "fast-15", "fast-front"])
def test_cli_and_jobs_accept_the_cheap_schedules(name):
    from attnedit.surfaces.cli import build_parser
    from attnedit.surfaces.params import check_params

    assert build_parser().parse_args(["generate", "a cat", "--schedule", name]).schedule == name
    assert check_params("generate", {"prompt": "a cat", "schedule": name})["schedule"] == name


def test_the_app_grounded_tab_passes_its_schedule(tiny_pipe, monkeypatch):
    from attnedit.surfaces import webapp_tabs as tabs

    seen = []
    real = tabs.refocus
    monkeypatch.setattr(tabs, "refocus", lambda pipe, layout, config, **kw: seen.append(config) or real(
        pipe, layout, config=config, **kw))
    image, _ = tabs.run_grounded(tiny_pipe("sd15"), "a cat and a dog", "cat: 0,0,0.5,1\ndog: 0.5,0,1,1", 0, 2, 1, 7.5,
                                 "fast")
    assert seen[0].schedule == "fast" and image.dtype.name == "uint8"
    assert "fast" in tabs.SCHEDULES and tabs.DEFAULT_SCHEDULE == "ce0439c"
