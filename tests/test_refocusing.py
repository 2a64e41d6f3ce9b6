"""Attention refocusing: layouts, phrase tokens, losses on hand-built maps, recorded maps vs a dense reference,
and end-to-end refocusing of tiny SD 1.5 / SDXL / SD3 / FLUX pipelines (prefix-only gradient forwards)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from attnedit import AttentionRecorder, KeyMask, install
from attnedit.families import detect_family
from attnedit.methods.refocusing import (
    MAX_BOXES,
    SCHEDULES,
    Layout,
    MapRecorder,
    RefocusConfig,
    Region,
    TokenLayout,
    box_mask,
    car_loss,
    gaussian_kernel,
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


BAD_LAYOUT_INPUTS = [  # (what a user passes, the message): one ValueError naming the phrase (or region) and field
    (lambda: Layout("a blue dog", [("blue dog",)]), r"phrase 'blue dog' has no box \(regions\[0\] has no boxes\)"),
    (lambda: Layout("a blue dog", [("blue dog", None)]), r"phrase 'blue dog' has no box \(boxes=None\)"),
    (lambda: Layout("a blue dog", [("blue dog", 0.5)]), r"phrase 'blue dog' has no box \(boxes=0.5\)"),
    (lambda: Layout("a blue dog", [("blue dog", [("a", 0, 1, 1)])]), r"box \('a', 0, 1, 1\) of 'blue dog' must be 4"),
    (lambda: Layout("a blue dog", [("blue dog", [(0, 0, 1, float("nan"))])]), r"of 'blue dog' must be 4 numbers"),
    (lambda: Layout("a blue dog", [("blue dog", [(0, 0, 1, 1), (0, 0, 1)])]), r"box \(0.0, 0.0, 1.0\) of 'blue dog'"),
    (lambda: Layout("a blue dog", [(None, [(0, 0, 1, 1)])]), r"phrase=None must be a non-empty string"),
    (lambda: Layout("a blue dog", "blue dog"), r"regions='blue dog' must be a list of \(phrase, boxes\)"),
    (lambda: Layout("a blue dog", [("blue dog", [(0, 0, 1, 1)], "x")]), r"regions\[0\]=.* must be \(phrase, boxes\)"),
    (lambda: Layout("", [("dog", [(0, 0, 1, 1)])]), r"prompt='' must be a non-empty string"),
    (lambda: Layout.from_dict({"prompt": "a blue dog", "regions": [{"phrase": "blue dog"}]}),
     r"regions\[0\] \(phrase 'blue dog'\) has no 'boxes'"),
    (lambda: Layout.from_dict({"prompt": "a blue dog", "regions": [{"phrase": "blue dog", "box": [[0, 0, 1, 1]]}]}),
     r"has no 'boxes' \(unknown keys \['box'\]\)"),
    (lambda: Layout.from_dict({"prompt": "a blue dog", "regions": [{"boxes": [[0, 0, 1, 1]]}]}),
     r"regions\[0\]=.* needs a 'phrase'"),
    (lambda: Layout.from_dict({"prompt": "a blue dog", "regions": [{"phrase": "blue dog", "boxes": None}]}),
     r"phrase 'blue dog' has no box \(boxes=None\)"),
    (lambda: Layout.from_dict({"prompt": "a blue dog", "regions": [{"phrase": "blue dog", "boxes": [[0, 0, 2, 1]]}]}),
     r"box \(0.0, 0.0, 2.0, 1.0\) of 'blue dog' must be 4 numbers in \[0, 1\]"),
    (lambda: Layout.from_dict({"prompt": "a blue dog", "regions": ["blue dog"]}), r"regions\[0\]='blue dog' must be a dict"),
    (lambda: Layout.from_dict({"prompt": "a blue dog", "regions": {"phrase": "x"}}), r"'regions'=.* must be a list"),
    (lambda: Layout.from_json("{not json"), r"is not valid JSON"),
    (lambda: Layout.from_json("/nonexistent/layout.json"), r"neither JSON text nor a readable file"),
]


@pytest.mark.parametrize("make, match", BAD_LAYOUT_INPUTS)
def test_bad_layout_inputs_are_one_value_error(make, match):
    with pytest.raises(ValueError, match=match):
        make()


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


# ------------------------------------------------------------------ the official formulas, written out plainly
# The authors' code (Attention-Refocusing, ldm/models/diffusion/loss.py at ce0439c and b79fba5) re-stated with
# loops over boxes and cells, square maps, as it computes them; attnedit's vectorized losses must give its numbers.
def official_cells(box, n):
    """The official box -> slice: int(x * W) on both corners (may be empty)."""
    return slice(int(box[1] * n), int(box[3] * n)), slice(int(box[0] * n), int(box[2] * n))


def official_kernel(sigma=0.5, size=3):
    """GaussianSmoothing: prod over axes of exp(-((x - mean) / (2 sigma))^2), normalized to sum 1."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-((x / (2 * sigma)) ** 2))
    k = g[:, None] * g[None, :]
    return (k / k.sum()).float()


def official_car(maps, boxes, t=0, gated=False):
    """caculate_loss_att_fixed_cnt per object map (already normalized and smoothed); boxes[o] = list of xyxy."""
    n, total = maps.shape[-1], 0.0
    for o, m in enumerate(maps):
        other, copy = m.clone(), m.clone()
        for box in boxes[o]:
            ys, xs = official_cells(box, n)
            inside = float(m[ys, xs].max())
            if not gated:
                total += 1 - inside
            elif inside < 0.1:
                total += 6 * (1 - inside)
            elif inside < 0.2 or t < 15:
                total += 1 - inside
            copy[ys, xs] = 0.0
            other[ys, xs] = 0.0
        for j in range(len(maps)):
            if j == o:
                continue
            for box in boxes[j]:
                ys, xs = official_cells(box, n)
                value = float(other[ys, xs].max())
                copy[ys, xs] = 0.0
                if not gated:
                    total += value
                elif value > 0.15:
                    total += 4 * value
                elif value > 0.1 or t < 15:
                    total += value
        total += len(boxes[o]) * float(copy.max()) / 2
    return total / len(maps)


def official_sar(layers, boxes):
    """caculate_loss_self_att: per layer (N, N) map, per box the mean over its query rows of the mass outside it;
    summed over every box of every object, divided by the number of objects; mean over layers."""
    n = math.isqrt(layers.shape[-1])
    result = 0.0
    for a in layers:
        loss = 0.0
        for obj in boxes:
            for box in obj:
                mask = torch.zeros(n, n)
                mask[official_cells(box, n)] = 1.0
                rows = [y * n + x for y in range(n) for x in range(n) if mask[y, x]]
                mean_row = a[rows].sum(0) / len(rows)
                loss += float((mean_row.reshape(n, n) * (1 - mask)).sum())
        result += loss / len(boxes)
    return result / len(layers)


def masks_of(boxes, n):
    return [torch.stack([box_mask(b, (n, n)) for b in obj]) for obj in boxes]


THREE = [[(0.0, 0.0, 0.375, 0.5)], [(0.5, 0.0, 1.0, 0.5)], [(0.0, 0.5, 0.5, 1.0), (0.625, 0.625, 1.0, 1.0)]]


def test_kernel_is_the_official_one():
    k = gaussian_kernel(0.5, 3)
    assert torch.allclose(k, official_kernel()) and round(float(k[1, 1]), 3) == 0.332
    maps = torch.rand(3, 8, 8)
    expected = torch.nn.functional.conv2d(torch.nn.functional.pad(maps[:, None], (1, 1, 1, 1), mode="reflect"),
                                          official_kernel()[None, None])[:, 0]
    assert torch.allclose(gaussian_smooth(maps, 0.5), expected, atol=1e-7)


def test_box_cells_are_the_officials_with_a_one_cell_minimum():
    rng = torch.Generator().manual_seed(0)
    for _ in range(200):
        x0, y0, x1, y1 = torch.rand(4, generator=rng).tolist()
        box = (min(x0, x1), min(y0, y1), max(x0, x1) + 1e-3, max(y0, y1) + 1e-3)
        box = tuple(min(v, 1.0) for v in box)
        expected = torch.zeros(16, 16, dtype=torch.bool)
        expected[official_cells(box, 16)] = True
        if expected.any():
            assert torch.equal(box_mask(box, (16, 16)), expected), box
    thin = box_mask((0.30, 0.30, 0.31, 0.31), (4, 4))  # officially empty (int(1.2) == int(1.24)): one cell here
    assert thin.sum() == 1 and thin[1, 1]
    assert box_mask((0.99, 0.99, 1.0, 1.0), (4, 4))[3, 3]
    assert box_mask((0.0, 0.0, 1.0, 1.0), (2, 3)).all()  # non-square grids: x by the width, y by the height
    assert torch.equal(box_mask((0.2, 0.0, 0.6, 1.0), (2, 5))[0], torch.tensor([0, 1, 1, 0, 0], dtype=torch.bool))


@pytest.mark.parametrize("gated, t", [(False, 0), (True, 3), (True, 20)])
def test_car_matches_the_official_formula(gated, t):
    torch.manual_seed(1)
    maps = (torch.rand(3, 8, 8) ** 4) * 0.4  # peaks around the gates' 0.1 / 0.15 / 0.2
    loss, peaks = car_loss(maps, masks_of(THREE, 8), gated=gated, step=t)
    assert math.isclose(float(loss), official_car(maps, THREE, t, gated), rel_tol=1e-6)
    assert torch.allclose(peaks, torch.stack([maps[o][official_cells(b, 8)].max() for o in range(3) for b in THREE[o]]))


def test_car_sums_the_max_of_each_other_box():
    m = torch.zeros(3, 8, 8)
    m[0, 1, 1], m[0, 1, 5], m[0, 6, 1], m[0, 6, 6] = 0.5, 0.3, 0.2, 0.1  # in its box; in B's; in each of C's two
    loss, _ = car_loss(m, masks_of(THREE, 8))
    # object 0: (1 - 0.5) + 0.3 + 0.2 + 0.1, nothing in the background; objects 1 and 2 (empty maps): 1 per box
    assert math.isclose(float(loss), ((1 - 0.5) + 0.6 + 1 + 2) / 3, rel_tol=1e-6)
    assert math.isclose(float(loss), official_car(m, THREE), rel_tol=1e-6)


def test_sar_matches_the_official_formula_and_sums_an_objects_boxes():
    torch.manual_seed(2)
    layers = torch.rand(2, 64, 64).softmax(-1)
    assert math.isclose(float(sar_loss(layers, masks_of(THREE, 8))), official_sar(layers, THREE), rel_tol=1e-5)
    two = [THREE[2]]  # one object, two boxes: the sum over its boxes, not their mean
    per_box = [official_sar(layers, [[b]]) for b in THREE[2]]
    assert math.isclose(float(sar_loss(layers, masks_of(two, 8))), sum(per_box), rel_tol=1e-5)


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
    with pytest.raises(ValueError, match=r"schedule='v2' must be one of \['b79fba5', 'ce0439c', 'fast', 'fast-15', 'fast-front'\]"):
        RefocusConfig(schedule="v2")
    with pytest.raises(ValueError, match=r"loss_scale=nan must be a finite number > 0"):
        RefocusConfig(loss_scale=float("nan"))
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


# ------------------------------------------------------------------------------------------ schedules, early stop
def test_named_schedules_follow_the_official_loops():
    ce, head = RefocusConfig(), RefocusConfig(schedule="b79fba5")
    assert ce.schedule == "ce0439c" and {"ce0439c", "b79fba5"} <= set(SCHEDULES)
    steps = lambda c: [i for i in range(50) if c.refocuses(i)]
    assert steps(ce) == list(range(30)) and steps(head) == [*range(10), 10, 15, 20, 25, 30, 35]
    assert sum(ce.max_iterations(i) for i in steps(ce)) == 110 and sum(head.max_iterations(i) for i in steps(head)) == 49
    # the official tables (plms.py update_loss_self_cross), step by step
    assert [(ce.step_size(i), ce.max_iterations(i)) for i in (0, 9, 10, 19, 20, 29)] == \
        [(3, 5), (3, 5), (2, 5), (2, 5), (1, 1), (1, 1)]
    assert [(head.step_size(i), head.max_iterations(i)) for i in (0, 1, 2, 4, 5, 9, 10, 15, 20, 35)] == \
        [(4, 2), (4, 2), (4, 6), (4, 6), (3, 3), (3, 3), (3, 2), (3, 2), (1, 2), (1, 2)]
    assert head.gated and not ce.gated
    # other step counts read the tables at i * 50 // N; refocus_steps caps them
    assert [i for i in range(20) if ce.refocuses(i, 20)] == list(range(12))
    assert [i for i in range(20) if RefocusConfig(refocus_steps=3).refocuses(i, 20)] == [0, 1, 2]
    assert ce.last_step(20) == 12 and RefocusConfig(refocus_steps=0).last_step(50) == 0


def official_loop(x, f, peak, scale, max_iter, use_loss=True, peak_threshold=None):
    """The official while loop: test (scaled loss, min peak) of the previous iteration, then forward, update."""
    loss, min_inside, updates = 10000.0, 0.0, 0
    while (not use_loss or loss > 0.1) and updates < max_iter and (peak_threshold is None or min_inside < peak_threshold):
        x = x.detach().requires_grad_(True)
        scaled = scale * f(x)
        (grad,) = torch.autograd.grad(scaled, x)
        loss, min_inside = float(scaled.detach()), float(peak(x.detach()))
        x, updates = (x - grad).detach(), updates + 1
    return x, updates


@pytest.mark.parametrize("schedule, step, count", [("ce0439c", 3, 3), ("b79fba5", 3, 4), ("b79fba5", 15, 2)])
def test_early_stop_thresholds_the_scaled_loss_and_updates_once_more(monkeypatch, schedule, step, count):
    from attnedit.methods import refocusing as rf

    f = lambda x: (x**2).sum()
    peak = lambda x: 0.22 - 0.02 * f(x)  # rises as the loss falls; crosses 0.2 after a few updates
    seen = {}
    monkeypatch.setattr(rf, "refocus_loss", lambda *a: (f(seen["x"]), peak(seen["x"])[None]))
    config = RefocusConfig(schedule=schedule, loss_scale=0.01)
    x0 = torch.ones(1, 4)
    x, history = rf.refocus_latents(lambda x: seen.__setitem__("x", x), x0, step, [], LAYOUT, None, config)
    scale = 0.01 * config.step_size(step)
    head = schedule == "b79fba5"
    expected, updates = official_loop(x0, f, peak, scale, config.max_iterations(step), use_loss=step < 10 or not head,
                                      peak_threshold=0.2 if head else None)
    assert len(history) == updates == count  # (3, 4: one more than a test before the update would make)
    torch.testing.assert_close(x, expected)


# ---------------------------------------------------------------------------------------------------- GLIGEN
@pytest.fixture(scope="module")
def gligen_pipe(tiny_pipe):
    """A tiny StableDiffusionGLIGENPipeline: tiny SD 1.5's parts with a gated (GLIGEN) UNet of the same shape."""
    from diffusers import DDIMScheduler, StableDiffusionGLIGENPipeline, UNet2DConditionModel

    sd = tiny_pipe("sd15")
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config({**sd.unet.config, "attention_type": "gated"}).eval()
    pipe = StableDiffusionGLIGENPipeline(vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer, unet=unet,
                                         scheduler=DDIMScheduler.from_config(sd.scheduler.config), safety_checker=None,
                                         feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_gligen_refocuses_end_to_end_with_grounding_inputs_and_scheduled_sampling(gligen_pipe):
    pipe, steps = gligen_pipe, 4
    fuser = next(m for m in pipe.unet.modules() if type(m).__name__ == "GatedSelfAttentionDense")
    seen = []  # (grad enabled, fuser on, boxes given to the grounding net) per UNet forward
    hooks = [pipe.unet.position_net.register_forward_pre_hook(
        lambda m, a, kw: seen.append([torch.is_grad_enabled(), None, kw["boxes"].clone()]), with_kwargs=True),
        fuser.register_forward_pre_hook(lambda m, a: seen[-1].__setitem__(1, m.enabled))]
    kw = {"num_inference_steps": steps, "generator": gen(), "output_type": "np", "gligen_scheduled_sampling_beta": 0.5}
    try:
        out, losses = refocus(pipe, LAYOUT, config=FAST, return_losses=True, **kw)
    finally:
        for h in hooks:
            h.remove()
    assert out.images.shape == (1, 64, 64, 3) and sorted(losses) == [0, 1]
    assert all(h[-1] < h[0] for h in losses.values()), losses
    gradient = [(on, boxes) for grad, on, boxes in seen if grad]
    assert len(gradient) == sum(len(h) for h in losses.values())  # one grounded forward per iteration
    layout_boxes = torch.tensor([b for r in LAYOUT.regions for b in r.boxes])
    assert all(boxes.shape == (1, 30, 4) and torch.equal(boxes[0, :2], layout_boxes) for _, boxes in gradient)
    # int(0.5 * 4) = 2 grounding steps: the fuser is on in steps 0-1 for the pipeline's forwards and for refocusing
    assert [on for grad, on, _ in seen if not grad][-steps:] == [True, True, False, False]  # (after map probing)
    assert all(on for on, _ in gradient)
    kw["generator"] = gen()
    plain = pipe(LAYOUT.prompt, gligen_phrases=["red cat", "blue square"], gligen_boxes=layout_boxes.tolist(), **kw)
    kw["generator"] = gen()
    same = refocus(pipe, LAYOUT, config=RefocusConfig(refocus_steps=0), **kw)
    assert (same.images == plain.images).all() and abs(out.images - plain.images).max() > 1e-3
    assert "step" not in vars(pipe.scheduler)  # the scheduler's step is its own again


def test_gligen_bad_calls(gligen_pipe):
    with pytest.raises(ValueError, match="callback_on_step_end= is not accepted by StableDiffusionGLIGENPipeline"):
        refocus(gligen_pipe, LAYOUT, callback_on_step_end=lambda *a: {})
    with pytest.raises(ValueError, match="gligen_phrases=\\['cat'\\] and gligen_boxes=None: give both or neither"):
        refocus(gligen_pipe, LAYOUT, gligen_phrases=["cat"])
    with pytest.raises(ValueError, match="gligen_inpaint_image= is not supported by refocusing"):
        refocus(gligen_pipe, LAYOUT, gligen_inpaint_image=object())


def test_schedule_is_a_checked_job_field_and_cli_flag():
    from attnedit.surfaces.cli import build_parser
    from attnedit.surfaces.params import check_params

    assert check_params("generate", {"prompt": "a cat", "schedule": "b79fba5"})["schedule"] == "b79fba5"
    with pytest.raises(ValueError, match=r"schedule='v3'; valid: \['ce0439c', 'b79fba5', 'fast', 'fast-15', 'fast-front'\]"):
        check_params("generate", {"prompt": "a cat", "schedule": "v3"})
    assert build_parser().parse_args(["generate", "a cat", "--schedule", "b79fba5"]).schedule == "b79fba5"
