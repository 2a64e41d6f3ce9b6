"""Attention refocusing: layouts, phrase tokens, losses on hand-built maps, recorded maps vs a dense reference,
and end-to-end refocusing of tiny SD 1.5 / SDXL / SD3 / FLUX pipelines (prefix-only gradient forwards)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from attnedit import AttentionRecorder, KeyMask, install
from attnedit.core.families import detect_family
from attnedit.methods.refocusing import (
    MAX_BOXES,
    Layout,
    MapRecorder,
    RefocusConfig,
    Region,
    TokenLayout,
    box_mask,
    car_loss,
    gaussian_smooth,
    phrase_maps,
    phrase_mass,
    phrase_positions,
    refocus_loss,
    sar_loss,
    token_layout,
)
from attnedit.models.zoo import call_kwargs, denoiser
from attnedit.pipelines.refocusing import refocus

PROMPT = "a red cat sitting on a blue square"
LAYOUT = Layout(PROMPT, (("red cat", [(0.0, 0.0, 0.5, 1.0)]), ("blue square", [(0.5, 0.25, 1.0, 0.75)])))
FAST = RefocusConfig(refocus_steps=2, iterations=((1 << 30, 2),))


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------- layout
def test_layout_json_round_trip_and_file(tmp_path):
    text = LAYOUT.to_json()
    assert Layout.from_json(text) == LAYOUT
    path = tmp_path / "layout.json"
    path.write_text(json.dumps({"prompt": "a cat", "regions": [{"phrase": "cat", "boxes": [[0.1, 0.2, 0.3, 0.4]]}]}))
    layout = Layout.from_json(path)
    assert layout.regions == (Region("cat", ((0.1, 0.2, 0.3, 0.4),)),)
    assert Region("cat", (0.1, 0.2, 0.3, 0.4)).boxes == ((0.1, 0.2, 0.3, 0.4),)  # a single box is accepted


@pytest.mark.parametrize("boxes, match", [
    ([(0.1, 0.2, 1.2, 0.5)], r"box \(0.1, 0.2, 1.2, 0.5\) of 'cat' must be 4 numbers in \[0, 1\]"),
    ([(-0.1, 0.2, 0.5, 0.5)], r"must be 4 numbers in \[0, 1\]"),
    ([(0.5, 0.2, 0.5, 0.6)], r"must have x1 > x0 and y1 > y0"),
    ([(0.1, 0.7, 0.5, 0.6)], r"must have x1 > x0 and y1 > y0"),
    ([(0.1, 0.2, 0.5)], r"must be 4 numbers"),
    ([], r"phrase 'cat' has no box"),
    ([(0.1, 0.1, 0.5, 0.5), (0.1, 0.1, 0.5, 0.5)], r"phrase 'cat' lists the same box twice"),
])
def test_bad_boxes(boxes, match):
    with pytest.raises(ValueError, match=match):
        Region("cat", tuple(boxes))


def test_bad_layouts():
    with pytest.raises(ValueError, match=r"phrases 'cat' and 'dog' have the identical box \(0.1, 0.1, 0.5, 0.5\)"):
        Layout("a cat and a dog", (("cat", [(0.1, 0.1, 0.5, 0.5)]), ("dog", [(0.1, 0.1, 0.5, 0.5)])))
    too_many = [(i / 40, 0.0, i / 40 + 0.01, 0.5) for i in range(MAX_BOXES + 1)]
    with pytest.raises(ValueError, match=rf"layout has {MAX_BOXES + 1} boxes; at most MAX_BOXES={MAX_BOXES}"):
        Layout("a cat", (("cat", too_many),))
    with pytest.raises(ValueError, match="layout has no region"):
        Layout("a cat", ())
    with pytest.raises(ValueError, match="phrase='  ' must be a non-empty string"):
        Region("  ", ((0, 0, 1, 1),))
    with pytest.raises(ValueError, match="must be a dict with 'prompt' and 'regions'"):
        Layout.from_dict({"prompt": "a cat"})


# ----------------------------------------------------------------------------------------------- tokens
def test_multi_token_words_are_found_with_the_real_tokenizer(tiny_pipe):
    tok = tiny_pipe("sd15").tokenizer
    prompt = "a giraffe next to a zebracorn"
    giraffe, zebra = tok("giraffe", add_special_tokens=False).input_ids, tok("zebracorn", add_special_tokens=False).input_ids
    assert len(giraffe) > 1 and len(zebra) > 1  # sub-word tokens: splitting on spaces would get these wrong
    pos = phrase_positions(tok, prompt, "giraffe")
    assert pos == list(range(2, 2 + len(giraffe)))
    ids = tok(prompt).input_ids
    assert [ids[p] for p in phrase_positions(tok, prompt, "zebracorn")] == zebra
    assert phrase_positions(tok, prompt, "next to") == [2 + len(giraffe), 3 + len(giraffe)]
    with pytest.raises(ValueError, match=r"phrase 'dog' is not in the prompt 'a giraffe next to a zebracorn'"):
        phrase_positions(tok, prompt, "dog")


def test_token_layout_unet_and_append_missing(tiny_pipe):
    pipe = tiny_pipe("sd15")
    tl = token_layout(pipe, LAYOUT)
    assert tl == TokenLayout(content=tuple(range(1, 9)), phrases=((1, 2), (6, 7)))  # SOT at 0, 8 prompt tokens
    layout = Layout("a red cat", (("red cat", [(0, 0, 0.5, 1)]), ("blue square", [(0.5, 0, 1, 1)])))
    with pytest.raises(ValueError, match="phrase 'blue square' is not in the prompt 'a red cat'.*append_missing=True"):
        token_layout(pipe, layout)
    appended = layout.with_phrases_in_prompt()
    assert appended.prompt == "a red cat, blue square"
    assert token_layout(pipe, appended).phrases == ((1, 2), (4, 5))  # "," is token 3


def test_token_layout_sd3_maps_clip_then_t5_positions(tiny_pipe):
    pipe = tiny_pipe("sd3")
    tl = token_layout(pipe, LAYOUT, max_sequence_length=32)
    keys = [tl.content[i] for i in tl.phrases[0]]
    # CLIP part: SOT, "a", then "red", "cat" at 2, 3; T5 part (no BOS: "a" is 0): 77 + 1, 77 + 2
    assert keys == [2, 3, 78, 79]
    clip_ids = pipe.tokenizer(PROMPT).input_ids
    t5_ids = pipe.tokenizer_3(PROMPT).input_ids
    red_cat_clip = pipe.tokenizer("red cat", add_special_tokens=False).input_ids
    red_cat_t5 = pipe.tokenizer_3("red cat", add_special_tokens=False).input_ids
    assert [clip_ids[k] for k in keys if k < 77] == red_cat_clip
    assert [t5_ids[k - 77] for k in keys if k >= 77] == red_cat_t5
    assert len(tl.content) == (len(clip_ids) - 2) + (len(t5_ids) - 1)  # no SOT/EOS, no </s>


# ------------------------------------------------------------------------------------------------ boxes
def test_box_mask_covers_touched_cells_and_is_never_empty():
    m = box_mask((0.25, 0.0, 0.5, 0.5), (4, 4))
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[0:2, 1:2] = True
    assert torch.equal(m, expected)
    assert box_mask((0.30, 0.30, 0.31, 0.31), (4, 4)).sum() == 1  # smaller than a cell: the one it touches
    assert box_mask((0.99, 0.99, 1.0, 1.0), (4, 4))[3, 3]
    assert box_mask((0.0, 0.0, 1.0, 1.0), (2, 3)).all()  # non-square grids
    assert torch.equal(box_mask((0.2, 0.0, 0.6, 1.0), (2, 5))[0], torch.tensor([0, 1, 1, 0, 0], dtype=torch.bool))


# ----------------------------------------------------------------------------------------------- losses
def test_car_loss_matches_hand_computation():
    maps = torch.zeros(2, 4, 4)
    maps[0, 0, 0], maps[0, 0, 3], maps[0, 3, 0] = 0.7, 0.4, 0.1  # in own box, in other's box, background
    maps[1, 0, 3], maps[1, 2, 2] = 0.9, 0.3  # in own box, background
    a = torch.zeros(1, 4, 4, dtype=torch.bool)
    a[0, 0:2, 0:2] = True
    b = torch.zeros(2, 4, 4, dtype=torch.bool)
    b[0, 0:2, 3] = True
    b[1, 3, 3] = True
    loss, peaks = car_loss(maps, [a, b])
    obj_a = (1 - 0.7) + 0.4 + 1 * 0.1 / 2
    obj_b = (1 - 0.9) + (1 - 0.0) + 0.0 + 2 * 0.3 / 2  # second box empty of mass, nothing in a's box
    assert math.isclose(float(loss), (obj_a + obj_b) / 2, rel_tol=1e-6)
    assert torch.allclose(peaks, torch.tensor([0.7, 0.9, 0.0]))
    solo, _ = car_loss(maps[:1], [a])  # one object: no other-objects term
    assert math.isclose(float(solo), (1 - 0.7) + max(0.4, 0.1) / 2, rel_tol=1e-6)


def test_sar_loss_matches_hand_computation():
    n = 4  # 2 x 2 grid
    s = torch.full((1, n, n), 0.25)
    s[0, 0] = torch.tensor([0.7, 0.1, 0.1, 0.1])
    box = torch.zeros(1, 2, 2, dtype=torch.bool)
    box[0, 0, 0] = True
    assert math.isclose(float(sar_loss(s, [box])), 0.3, rel_tol=1e-6)
    two = torch.zeros(1, 2, 2, dtype=torch.bool)
    two[0, 0, :] = True  # cells 0, 1: rows leak 0.2 and 0.5
    layered = torch.cat([s, torch.eye(n)[None]])  # second layer leaks nothing
    expected = ((0.3 + 0.35) / 2 + (0.0 + 0.0) / 2) / 2
    assert math.isclose(float(sar_loss(layered, [box, two])), expected, rel_tol=1e-6)


def test_phrase_maps_normalize_over_content_tokens_and_smooth():
    text = torch.rand(16, 77)
    tl = TokenLayout(content=(1, 2, 3), phrases=((0, 1), (2,)))
    raw = phrase_maps(text, (4, 4), tl, softmax_scale=100.0, sigma=0.0)
    soft = (100 * text[:, [1, 2, 3]]).softmax(-1).T.reshape(3, 4, 4)
    assert torch.allclose(raw[0], soft[:2].mean(0)) and torch.allclose(raw[1], soft[2])
    smooth = phrase_maps(text, (4, 4), tl, sigma=0.5)
    assert torch.allclose(smooth[1], gaussian_smooth(soft[2:], 0.5)[0])
    delta = torch.zeros(1, 5, 5)
    delta[0, 2, 2] = 1.0
    g = gaussian_smooth(delta, 0.5)[0]
    assert math.isclose(float(g.sum()), 1.0, rel_tol=1e-6) and g[2, 2] == g.max() and g[1, 2] == g[2, 1]


# ------------------------------------------------------------------------------- maps vs dense reference
def _dense(attn: torch.nn.Module, hidden: torch.Tensor, enc: torch.Tensor | None, joint: bool) -> torch.Tensor:
    """softmax(QK^T / sqrt(d)) from the module's own projections, heads averaged: (B, S_q, S_k)."""
    def heads(x):
        return x.view(x.shape[0], -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

    q, k = heads(attn.to_q(hidden)), heads(attn.to_k(hidden if enc is None or joint else enc))
    if getattr(attn, "norm_q", None) is not None:
        q, k = attn.norm_q(q), attn.norm_k(k)
    if joint:
        eq, ek = heads(attn.add_q_proj(enc)), heads(attn.add_k_proj(enc))
        if getattr(attn, "norm_added_q", None) is not None:
            eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
        q, k = torch.cat([q, eq], 2), torch.cat([k, ek], 2)
    return ((q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])).softmax(-1).mean(1)


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3"])
def test_recorded_maps_match_dense_reference(tiny_pipe, family):
    pipe = tiny_pipe(family)
    model = denoiser(pipe)
    kind = "joint" if family == "sd3" else None
    text_rec = MapRecorder(kinds={kind or "cross"}, keys="text")
    image_rec = MapRecorder(kinds={kind or "self"}, keys="image")
    inputs = {}

    def keep(name):
        def hook(module, args, kwargs):
            inputs.setdefault(name, (kwargs.get("hidden_states", args[0] if args else None),
                                     kwargs.get("encoder_hidden_states")))
        return hook

    hooks = [m.register_forward_pre_hook(keep(name), with_kwargs=True)
             for name, m in model.named_modules() if type(m).__name__ == "Attention"]
    try:
        with install(pipe, text_rec, image_rec):
            pipe(**{**call_kwargs(family), "num_inference_steps": 1, "guidance_scale": 1.0}, generator=gen())
    finally:
        for h in hooks:
            h.remove()
    modules = dict(model.named_modules())
    assert text_rec.maps and image_rec.maps
    for m in [*text_rec.maps, *image_rec.maps]:
        hidden, enc = inputs[m.site.name]
        ref = _dense(modules[m.site.name], hidden, enc, family == "sd3")
        n = hidden.shape[1]
        if m.text_keys is not None:  # image queries -> text keys
            ref = ref[:, :n, n:] if family == "sd3" else ref
        else:
            ref = ref[:, :n, :n]
        assert m.probs.shape == (ref.shape[0], 1, *ref.shape[1:])
        torch.testing.assert_close(m.probs[:, 0], ref, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------- end to end
def _processors(pipe):
    return {k: type(v) for k, v in denoiser(pipe).attn_processors.items()}


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3", "flux"])
def test_refocus_lowers_the_loss_and_restores_processors(tiny_pipe, family):
    pipe = tiny_pipe(family)
    before = _processors(pipe)
    # FLUX's 4x4 token grid at 64 px: a box peak reaches 0.2 at once, so iterate without the peak criterion
    config = dataclasses.replace(FAST, peak_threshold=1.01) if family == "flux" else FAST
    out, losses = refocus(pipe, LAYOUT, config=config, num_inference_steps=3, generator=gen(), output_type="np",
                          return_losses=True, max_sequence_length=32, height=64, width=64)
    assert out.images.shape == (1, 64, 64, 3) and sorted(losses) == [0, 1]
    assert all(h[-1] < h[0] for h in losses.values()), losses
    assert _processors(pipe) == before


@pytest.mark.parametrize("family", ["sd15", "sd3", "flux"])
def test_zero_refocus_steps_is_the_plain_pipeline(tiny_pipe, family):
    pipe = tiny_pipe(family)
    kw = {**call_kwargs(family), "num_inference_steps": 3}
    plain = pipe(**kw, generator=gen(1)).images
    kw.pop("prompt")
    same = refocus(pipe, LAYOUT, config=RefocusConfig(refocus_steps=0), generator=gen(1), **kw).images
    assert (same == plain).all()
    changed = refocus(pipe, LAYOUT, config=FAST, generator=gen(1), **kw).images
    assert abs(changed - plain).max() > 1e-3


@pytest.mark.parametrize("seed", [2, 3])
def test_phrase_mass_inside_its_box_increases(tiny_pipe, seed):
    pipe, k = tiny_pipe("sd15"), 3
    tokens = token_layout(pipe, LAYOUT)
    plain_rec = AttentionRecorder(kinds={"cross"}, steps=(k, k + 1), branches={"cond"})
    with install(pipe, plain_rec):
        pipe(PROMPT, num_inference_steps=6, generator=gen(seed), output_type="latent")
    rec = AttentionRecorder(kinds={"cross"}, steps=(k, k + 1), branches={"cond"})
    refocus(pipe, LAYOUT, edits=(rec,), config=RefocusConfig(refocus_steps=k, loss_scale=2000.0),
            num_inference_steps=6, generator=gen(seed), output_type="latent")
    plain = phrase_mass([m for m in plain_rec.maps if m.grid == (8, 8)], LAYOUT, tokens)
    refocused = phrase_mass([m for m in rec.maps if m.grid == (8, 8)], LAYOUT, tokens)
    assert (refocused > plain + 0.005).all(), (plain, refocused)


def test_car_only_and_sar_only(tiny_pipe):
    pipe = tiny_pipe("sd15")
    runs = {}
    for losses in [("car",), ("sar",), ("car", "sar")]:
        config = RefocusConfig(losses=losses, refocus_steps=1)
        _, runs[losses] = refocus(pipe, LAYOUT, config=config, num_inference_steps=2, generator=gen(),
                                  output_type="latent", return_losses=True)
        assert runs[losses][0][-1] < runs[losses][0][0]
    car, sar, both = runs[("car",)][0][0], runs[("sar",)][0][0], runs[("car", "sar")][0][0]
    assert math.isclose(car + sar, both, rel_tol=1e-5) and 0 < sar < 1 < car


def test_layers_follow_the_family_resolution(tiny_pipe):
    from diffusers import UNet2DConditionModel

    from attnedit.pipelines.refocusing import _conditioner, map_layers

    torch.manual_seed(0)
    unet = UNet2DConditionModel(  # the SD 1.x block layout in miniature: attention at latent, /2, /4 and mid /8
        sample_size=32, block_out_channels=(8, 8, 8, 8), layers_per_block=1, cross_attention_dim=8, norm_num_groups=4,
        attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    ).eval()
    text = torch.randn(1, 5, 8)
    forward = lambda x, t: unet(x, t, encoder_hidden_states=text)
    with install(unet) as handle:
        sd15_layers = map_layers(handle, forward, torch.zeros(1, 4, 32, 32), torch.tensor(1), RefocusConfig())
    names = {(s.kind, s.layer): ".".join(s.name.split(".")[:2]) for s in handle.sites}
    blocks = lambda kind, layers: sorted({names[kind, i] for i in layers})
    # latent / 4 = 8x8: down_blocks.2 and up_blocks.1 (2 + 3 layers as in SD 1.5; mid at 4x4 excluded)
    assert blocks("cross", sd15_layers[2]) == ["down_blocks.2", "up_blocks.1"] and len(sd15_layers[2]) == 3
    assert sd15_layers[3] == sd15_layers[2]
    sd15 = tiny_pipe("sd15")  # two levels (8x8, 4x4 at 64 px): latent / 4 = 2x2 is missing -> largest grid, 8x8
    with install(sd15) as handle:
        forward = _conditioner(sd15, "unet", PROMPT, (64, 64), 77)
        tiny_layers = map_layers(handle, forward, torch.zeros(1, 4, 8, 8), torch.tensor(1), RefocusConfig())
    names = {(s.kind, s.layer): ".".join(s.name.split(".")[:2]) for s in handle.sites}
    assert blocks("cross", tiny_layers[2]) == ["down_blocks.0", "up_blocks.1"] and len(tiny_layers[2]) == 3
    with install(sd15) as handle:  # 256 px: 32x32 and 16x16 levels, no latent / 4 (8x8): the paper's 16x16 maps
        forward = _conditioner(sd15, "unet", PROMPT, (256, 256), 77)
        layers_256 = map_layers(handle, forward, torch.zeros(1, 4, 32, 32), torch.tensor(1), RefocusConfig())
    assert blocks("cross", layers_256[2]) == ["down_blocks.1", "mid_block.attentions", "up_blocks.0"]
    assert len(layers_256[2]) == 4
    sd3 = tiny_pipe("sd3")
    with install(sd3) as handle:
        joint = map_layers(handle, None, None, None, RefocusConfig())
        chosen = map_layers(handle, None, None, None, RefocusConfig(layers={1}))
    assert joint == ("joint", "joint", frozenset({0, 1}), frozenset({0, 1})) and chosen[2] == frozenset({1})
    with install(tiny_pipe("flux")) as handle:  # one double-stream block (joint layer 0), one single-stream (1)
        double = map_layers(handle, None, None, None, RefocusConfig())
        both = map_layers(handle, None, None, None, RefocusConfig(single_stream=True))
    assert double == ("joint", "joint", frozenset({0}), frozenset({0})) and both[2] == frozenset({0, 1})


def test_composes_with_softpag_and_key_masks(tiny_pipe):
    from attnedit.methods.head_guidance import perturbed_guidance

    pipe = tiny_pipe("sd15")
    kw = {"num_inference_steps": 3, "output_type": "np", "config": FAST}
    alone = refocus(pipe, LAYOUT, generator=gen(), **kw).images
    with perturbed_guidance(pipe, heads="L0", scale=2.0) as handle:
        pag = handle.edits
        mask = KeyMask(mask=torch.ones(8, 8).triu())
        both = refocus(pipe, LAYOUT, handle=handle, edits=(mask,), generator=gen(), **kw).images
        assert handle.edits == pag  # refocus added its edits only while it ran
    assert abs(both - alone).max() > 1e-3
    masked = refocus(pipe, LAYOUT, edits=(mask,), generator=gen(), **kw).images
    assert abs(masked - alone).max() > 1e-3 and abs(masked - both).max() > 1e-3


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_refocusing_forwards_under_softpag_carry_no_guidance_rows(tiny_pipe, family):
    """perturbed_guidance leaves refocusing's gradient forwards alone: cond rows only, and FLUX's checkpointed
    blocks recompute the same rows in the backward pass (no CheckpointError)."""
    from attnedit.methods.head_guidance import perturbed_guidance

    pipe = tiny_pipe(family)
    with install(pipe) as probe:
        first = dict(denoiser(pipe).named_modules())[probe.sites[0].name]  # the first attention call's rows
    rows = []

    def note(module, args, kwargs):
        latent = kwargs.get("hidden_states")
        rows.append(((args[0] if latent is None else latent).shape[0], torch.is_grad_enabled()))

    hook = first.register_forward_pre_hook(note, with_kwargs=True)
    try:
        with perturbed_guidance(pipe, heads="L0", scale=2.0) as handle:
            never_stop = dataclasses.replace(FAST, peak_threshold=1.01, loss_threshold=0.0)  # every iteration backward
            refocus(pipe, LAYOUT, handle=handle, config=never_stop, num_inference_steps=2, generator=gen(),
                    output_type="latent", **({"max_sequence_length": 32} if family == "flux" else {}))
    finally:
        hook.remove()
    gradient = [n for n, grad in rows if grad]
    assert gradient and set(gradient) == {1}  # refocusing: one cond row, no perturbed copy
    assert max(n for n, grad in rows if not grad) == (2 if family == "flux" else 3)  # the pipeline's: + perturbed


def test_gradient_checkpointing_gives_the_same_updates(tiny_pipe, monkeypatch):
    pipe = tiny_pipe("sd15")
    calls = []
    checkpoint = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or checkpoint(*a, **k))
    runs = [refocus(pipe, LAYOUT, config=RefocusConfig(refocus_steps=2, gradient_checkpointing=ckpt),
                    num_inference_steps=2, generator=gen(), output_type="latent", return_losses=True)
            for ckpt in (False, True)]
    assert not pipe.unet.is_gradient_checkpointing and len(calls) >= 2 * 6  # 2 steps x 6 checkpointed blocks
    for a, b in zip(runs[0][1].values(), runs[1][1].values()):
        assert a == pytest.approx(b, rel=1e-5)
    torch.testing.assert_close(runs[0][0].images, runs[1][0].images)


def test_processors_restored_when_the_run_fails(tiny_pipe):
    pipe = tiny_pipe("sd15")
    before = _processors(pipe)

    def boom(*args):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        refocus(pipe, LAYOUT, config=FAST, num_inference_steps=3, callback_on_step_end=boom, output_type="latent")
    assert _processors(pipe) == before


def test_non_square_images_rasterize_boxes_on_the_rectangular_grid(tiny_pipe):
    pipe = tiny_pipe("sd15")
    out, losses = refocus(pipe, LAYOUT, config=FAST, num_inference_steps=2, height=64, width=128, generator=gen(),
                          output_type="np", return_losses=True)
    assert out.images.shape == (1, 64, 128, 3) and losses[1][-1] < losses[0][0]


def test_bad_calls(tiny_pipe):
    pipe = tiny_pipe("sd15")
    with pytest.raises(ValueError, match="height=60 must be a positive multiple of 8"):
        refocus(pipe, LAYOUT, height=60)
    with pytest.raises(ValueError, match="width=0 must be a positive multiple of 8"):
        refocus(pipe, LAYOUT, width=0)
    with pytest.raises(ValueError, match="height=36 must be a positive multiple of 16"):
        refocus(tiny_pipe("sd3"), LAYOUT, height=36)
    with pytest.raises(ValueError, match=r"layout=\{'prompt': 'a cat'\} must be a Layout"):
        refocus(pipe, {"prompt": "a cat"})
    with pytest.raises(ValueError, match="prompt= is set by refocus"):
        refocus(pipe, LAYOUT, prompt="a dog")
    with pytest.raises(ValueError, match="num_images_per_prompt=2"):
        refocus(pipe, LAYOUT, num_images_per_prompt=2)
    with pytest.raises(ValueError, match="refocusing supports SD 1.x, SDXL, SD3 and FLUX.1 pipelines; WanPipeline is wan"):
        refocus(tiny_pipe("wan"), LAYOUT)
    with pytest.raises(ValueError, match="phrase 'green dog' is not in the prompt"):
        refocus(pipe, Layout(PROMPT, (("green dog", [(0, 0, 1, 1)]),)))
    with pytest.raises(ValueError, match=r"losses=\('car', 'cfg'\) must be a non-empty subset"):
        RefocusConfig(losses=("car", "cfg"))
    with pytest.raises(ValueError, match=r"step_sizes=\(\(5, 4.0\), \(3, 1.0\)\) must be .* increasing"):
        RefocusConfig(step_sizes=((5, 4.0), (3, 1.0)))
    with pytest.raises(ValueError, match="no attention map was recorded"):
        refocus_loss([], [], LAYOUT, TokenLayout((1,), ((0,),)), RefocusConfig())


def test_append_missing_runs(tiny_pipe):
    layout = Layout("a red cat", (("red cat", [(0, 0, 0.5, 1)]), ("blue square", [(0.5, 0, 1, 1)])))
    _, losses = refocus(tiny_pipe("sd15"), layout, append_missing=True, config=FAST, num_inference_steps=2,
                        generator=gen(), output_type="latent", return_losses=True)
    assert losses[0][-1] < losses[0][0]


def test_only_the_conditional_branch_carries_gradients(tiny_pipe):
    rec = AttentionRecorder(kinds={"cross"}, steps=(0, 1), mean_heads=False)
    refocus(tiny_pipe("sd15"), LAYOUT, edits=(rec,), config=FAST, num_inference_steps=2, generator=gen(),
            output_type="latent")
    with_grad = [m for m in rec.maps if m.probs.requires_grad]
    cfg_batch = [m for m in rec.maps if m.branches == ("uncond", "cond")]  # the pipeline's own forward
    assert with_grad and all(m.branches == ("cond",) and m.probs.shape[0] == 1 for m in with_grad)
    assert cfg_batch and not any(m.probs.requires_grad for m in cfg_batch)


# ------------------------------------------------------------------------------- prefix-only gradient forwards
def _calls(module):
    """A counter of ``module``'s forward calls and the hook handle."""
    count = [0]
    return count, module.register_forward_hook(lambda *a: count.__setitem__(0, count[0] + 1))


@pytest.mark.parametrize("family, size, config", [
    ("sd15", 256, {}),  # 16x16 maps: the gradient forward ends in up_blocks.0, before the 32x32 decoder level
    ("sdxl", 64, {}),
    ("flux", 64, {}),  # ends after the double-stream block: the single-stream block never runs with gradients
    ("flux", 64, {"single_stream": True}),
])
def test_prefix_forward_gives_the_same_updates_and_skips_the_rest(tiny_pipe, family, size, config):
    pipe = tiny_pipe(family)
    model = denoiser(pipe)
    last = model.conv_out if family != "flux" else model.proj_out  # runs only when a forward goes to the end
    runs, calls = [], []
    for prefix in (False, True):
        cfg = RefocusConfig(refocus_steps=2, iterations=((1 << 30, 2),), prefix_only=prefix, **config)
        count, hook = _calls(last)
        try:
            runs.append(refocus(pipe, LAYOUT, config=cfg, num_inference_steps=3, height=size, width=size,
                                generator=gen(), output_type="latent", return_losses=True, max_sequence_length=32))
        finally:
            hook.remove()
        calls.append(count[0])
    (full, full_losses), (short, short_losses) = runs
    iterations = sum(len(h) for h in full_losses.values())
    assert calls[0] == 3 + iterations and calls[1] == 3  # with the prefix only the pipeline's own forwards end
    assert full_losses.keys() == short_losses.keys()
    for a, b in zip(full_losses.values(), short_losses.values()):
        assert a == pytest.approx(b, rel=1e-5)
    torch.testing.assert_close(full.images, short.images)
    assert all(p.requires_grad for p in model.parameters()) and not model.is_gradient_checkpointing


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_gradient_forward_takes_the_dense_path_only_where_maps_are_recorded(tiny_pipe, family, monkeypatch):
    from attnedit.core import attention
    from attnedit.pipelines import refocusing as pipeline_refocusing
    from attnedit.processors import edit_processor

    pipe = tiny_pipe(family)
    current, dense = {}, []
    attend, dense_attention = edit_processor.attend, attention.dense_attention

    def tracking_attend(q, k, v, mask, call, *args, **kwargs):
        current["site"] = call.site
        return attend(q, k, v, mask, call, *args, **kwargs)

    def tracking_dense(*args, **kwargs):
        dense.append((current["site"], torch.is_grad_enabled()))
        return dense_attention(*args, **kwargs)

    monkeypatch.setattr(edit_processor, "attend", tracking_attend)
    monkeypatch.setattr(attention, "dense_attention", tracking_dense)
    covered = {}
    covered_sites = pipeline_refocusing._covered_sites
    monkeypatch.setattr(pipeline_refocusing, "_covered_sites",
                        lambda handle, recorders: covered.setdefault("sites", covered_sites(handle, recorders)))
    config = dataclasses.replace(FAST, gradient_checkpointing=False)  # checkpointing recomputes in the backward
    _, losses = refocus(pipe, LAYOUT, config=config, num_inference_steps=3, generator=gen(), output_type="latent",
                        return_losses=True, height=64, width=64, max_sequence_length=32)
    sites = covered["sites"]
    model = denoiser(pipe)
    every = set(detect_family(model).sites(model))
    assert sites and set(sites) < every  # some sites are not recorded ...
    assert {s for s, _ in dense} == set(sites)  # ... and those run the native kernel, also with gradients
    assert all(grad for _, grad in dense)  # the pipeline's own forwards never take the dense path
    assert len(dense) == len(sites) * sum(len(h) for h in losses.values())


def test_flux_checkpoints_by_default_with_the_same_updates(tiny_pipe, monkeypatch):
    pipe = tiny_pipe("flux")
    calls = []
    checkpoint = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or checkpoint(*a, **k))
    runs = []
    for ckpt in (None, False):
        calls.clear()
        runs.append(refocus(pipe, LAYOUT, config=RefocusConfig(refocus_steps=2, gradient_checkpointing=ckpt),
                            num_inference_steps=2, generator=gen(), output_type="latent", return_losses=True,
                            height=64, width=64, max_sequence_length=32))
        assert bool(calls) == (ckpt is None)
    assert not pipe.transformer.is_gradient_checkpointing
    for a, b in zip(runs[0][1].values(), runs[1][1].values()):
        assert a == pytest.approx(b, rel=1e-5)
    torch.testing.assert_close(runs[0][0].images, runs[1][0].images)


# ------------------------------------------------------------------------------------------------------ FLUX
def test_token_layout_flux_uses_the_t5_tokens(tiny_pipe):
    pipe = tiny_pipe("flux")
    tl = token_layout(pipe, LAYOUT, max_sequence_length=32)
    t5_ids = pipe.tokenizer_2(PROMPT).input_ids
    assert len(tl.content) == len(t5_ids) - 1  # every prompt token, no </s>
    for region, members in zip(LAYOUT.regions, tl.phrases):
        keys = [tl.content[i] for i in members]
        assert [t5_ids[k] for k in keys] == pipe.tokenizer_2(region.phrase, add_special_tokens=False).input_ids


@pytest.mark.parametrize("seed", [0, 2])
def test_flux_phrase_mass_inside_its_box_increases(tiny_pipe, seed):
    """At the first step after the refocused ones, each phrase's image->T5 attention inside its box (double-stream
    blocks, where the losses read) is higher than in the plain run from the same noise, at the paper's loss scale.
    The pipeline's own forwards keep their steps and branch (one cond pass a step) around the refocusing forwards."""
    pipe, k, steps = tiny_pipe("flux"), 3, 6
    tokens = token_layout(pipe, LAYOUT, max_sequence_length=32)
    kw = {"num_inference_steps": steps, "height": 128, "width": 128, "output_type": "latent", "max_sequence_length": 32}
    plain_rec = MapRecorder(kinds={"joint"}, keys="text", steps=(k, k + 1), branches={"cond"})
    with install(pipe, plain_rec):
        pipe(PROMPT, generator=gen(seed), **kw)
    rec = MapRecorder(kinds={"joint"}, keys="text", steps=(k, k + 1), branches={"cond"})
    every = AttentionRecorder(kinds={"joint"}, layers={0}, branches={"cond"})
    refocus(pipe, LAYOUT, edits=(rec, every), config=RefocusConfig(refocus_steps=k), generator=gen(seed), **kw)
    double = lambda maps: [m for m in maps if m.site.stream == "double"]
    plain = phrase_mass(double(plain_rec.maps), LAYOUT, tokens)
    refocused = phrase_mass(double(rec.maps), LAYOUT, tokens)
    assert (refocused > plain + 0.01).all(), (plain, refocused)
    own = [m.step for m in every.maps if not m.probs.requires_grad]  # the pipeline's forwards: one cond pass a step
    assert own == list(range(steps))
    assert sorted({m.step for m in every.maps if m.probs.requires_grad}) == list(range(k))


def test_flux_true_cfg_keeps_the_pipelines_cond_then_uncond_passes(tiny_pipe):
    rec = AttentionRecorder(kinds={"joint"}, layers={0})
    refocus(tiny_pipe("flux"), LAYOUT, edits=(rec,), config=RefocusConfig(refocus_steps=2), num_inference_steps=3,
            height=64, width=64, negative_prompt="blurry", true_cfg_scale=2.0, max_sequence_length=32,
            generator=gen(), output_type="latent")
    own = [(m.step, m.branches) for m in rec.maps if not m.probs.requires_grad]
    assert own == [(i, (b,)) for i in range(3) for b in ("cond", "uncond")]
    assert {(m.step, m.branches) for m in rec.maps if m.probs.requires_grad} == {(0, ("cond",)), (1, ("cond",))}


def test_flux_bad_inputs(tiny_pipe):
    from diffusers import FluxImg2ImgPipeline

    pipe = tiny_pipe("flux")
    with pytest.raises(ValueError, match=r"phrase 'green dog' is not in the prompt 'a red cat sitting on a blue square'"):
        refocus(pipe, Layout(PROMPT, (("green dog", [(0, 0, 1, 1)]),)), max_sequence_length=32)
    with pytest.raises(ValueError, match=r"box \(0.0, 0.0, 1.2, 1.0\) of 'red cat' must be 4 numbers in \[0, 1\]"):
        refocus(pipe, Layout(PROMPT, (("red cat", [(0, 0, 1.2, 1)]),)))
    with pytest.raises(ValueError, match="must have x1 > x0 and y1 > y0"):
        refocus(pipe, Layout(PROMPT, (("red cat", [(0.5, 0, 0.2, 1)]),)))
    with pytest.raises(ValueError, match="height=72 must be a positive multiple of 16"):
        refocus(pipe, LAYOUT, height=72, width=64)
    with pytest.raises(ValueError, match="prompt_2= is set by refocus"):
        refocus(pipe, LAYOUT, prompt_2="a dog", height=64, width=64)
    with pytest.raises(ValueError, match="refocusing on FLUX supports FluxPipeline .* got FluxImg2ImgPipeline"):
        refocus(FluxImg2ImgPipeline.from_pipe(pipe), LAYOUT)
    long = Layout(PROMPT + " next to a tree", (("tree", [(0, 0, 1, 1)]),))  # "tree" is token 10: cut at 8 tokens
    with pytest.raises(ValueError, match="phrase 'tree' is not in the prompt"):
        refocus(pipe, long, max_sequence_length=8, height=64, width=64)
