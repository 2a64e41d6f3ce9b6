"""SoftPAG and perturbed-attention guidance: head-set syntax, dense references, guidance formula, prefix sharing."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

from attnedit.processors import EditProcessor
from attnedit import install
from attnedit.core.attention import attend, dense_attention
from attnedit.core.edits import HeadBlend
from attnedit.core.families import AttentionCall, Site
from attnedit.core.perturbation import perturbed_keep
from attnedit.methods.head_guidance import (
    SoftPAG,
    format_heads,
    head_presets,
    load_heads,
    parse_heads,
    perturbed_guidance,
    resolve_heads,
    soft_pag,
)
from attnedit.models import zoo

DIT = ("sd3", "flux", "wan", "hunyuan_video")
FAMILIES = ("sd15", *DIT)


# ------------------------------------------------------------------------------------------------ syntax
def test_parse_heads_forms_agree():
    assert parse_heads("7:3,9:12") == parse_heads("L7H3 L9H12") == parse_heads([(9, 12), (7, 3)]) == [(7, 3), (9, 12)]
    assert parse_heads("L7,7:3,l2h1") == [(2, 1), (7, None)]  # a whole layer absorbs its single heads
    assert parse_heads({4: None, 1: (0, 2)}) == [(1, 0), (1, 2), (4, None)]
    assert format_heads("L9H12,7:*") == "7:*,9:12"


# every bad head set a user might write: one ValueError that names it (never a TypeError or a silent int())
BAD_HEADS = [
    ("", "selects no head"), ("7-3", "'7-3' is not 'layer:head'"), ([], "selects no head"), ("L7H", "is not"),
    (3.5, "must be a string"), (None, "heads=None must be a string"), (b"L1", "must be a string"),
    ({(1, 0)}, "must be a string"), ("1:", "'1:' is not"), ("-1:0", "'-1:0' is not"), ([(1,)], r"\(1,\) must be a \(layer, head\) pair"),
    ([(1.5, 0)], r"\(1.5, 0\) is not a \(layer >= 0"), ([(True, 0)], r"\(True, 0\) is not"), ([("a", 0)], r"\('a', 0\) is not"),
    ([(-1, 0)], r"\(-1, 0\) is not"), ({"1": None}, r"\('1', None\) is not"), ({1: []}, "selects no head"),
    ({1: ["a"]}, r"\(1, 'a'\) is not"), ({1: 2.0}, "must be None, an index or a list"), ("nope.json", "not a readable ranking"),
]


@pytest.mark.parametrize("spec, message", BAD_HEADS, ids=[repr(s) for s, _ in BAD_HEADS])
def test_parse_heads_rejects(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_heads(spec)


def test_ranking_file_entries_are_checked(tmp_path):
    path = tmp_path / "ranking.json"
    path.write_text('{"heads": [[3, 1], [0, null], [2, 0]]}')
    assert load_heads(path) == [(3, 1), (0, None), (2, 0)]  # in the file's order
    path.write_text('{"heads": [[3, 1.5]]}')
    with pytest.raises(ValueError, match=r"\(3, 1.5\) is not a \(layer >= 0"):
        load_heads(path)


def test_resolve_heads_validates_against_sites(tiny_pipe):
    pipe = tiny_pipe("sd3")
    with install(pipe) as handle:
        sites = handle.sites
    assert resolve_heads("L1,0:2", sites, "sd3") == {0: (2,), 1: (0, 1, 2, 3)}
    with pytest.raises(ValueError, match=r"names layer 5; sd3 has joint-attention layers 0..1"):
        resolve_heads("5:0", sites, "sd3")
    with pytest.raises(ValueError, match=r"names head 4 of layer 1; it has heads 0..3"):
        resolve_heads("L1H4", sites, "sd3")
    with pytest.raises(ValueError, match=r"no joint-attention layer to perturb"):
        resolve_heads("L1", [s for s in sites if s.kind != "joint"], "sd3")


def test_shipped_presets_name_the_heads_their_search_found():
    presets = head_presets()
    assert {"shapes-t2i", "shapes-dit"} <= set(presets)
    assert parse_heads("shapes-t2i") == [(0, 4), (5, 0), (5, 1)]  # the search of benchmarks/effect_head_guidance.py
    assert format_heads("shapes-dit") == "0:0,0:2,2:0" == presets["shapes-dit"]["spec"]
    for preset in presets.values():  # a preset carries how it was found and what it did on held-out captions
        assert {"model", "family", "objective", "search", "held_out"} <= set(preset)


def test_a_preset_is_validated_against_the_model_family(tiny_pipe):
    from attnedit.shapes.builtin import load_builtin

    with install(load_builtin("shapes-dit")) as handle:
        assert resolve_heads("shapes-dit", handle.sites, "sd3") == {0: (0, 2), 2: (0,)}
    with install(tiny_pipe("sd3")) as handle:
        sites = handle.sites
    with pytest.raises(ValueError, match=r"names layer 2; sd3 has joint-attention layers 0..1"):
        resolve_heads("shapes-dit", sites, "sd3")  # same family, but the tiny model has 2 blocks
    with pytest.raises(ValueError, match=r"'shapes-t2i' is the preset of shapes-t2i \(a unet model\); this model is sd3"):
        resolve_heads("shapes-t2i", sites, "sd3")
    with pytest.raises(ValueError, match=r"or a preset \(shapes-dit, shapes-t2i"):
        parse_heads("shapes-xl")


def test_guidance_by_preset_name_equals_guidance_by_its_heads():
    from attnedit.shapes.builtin import load_builtin

    pipe = load_builtin("shapes-t2i")
    pipe.set_progress_bar_config(disable=True)
    outputs = []
    for heads in ("shapes-t2i", "0:4,5:0,5:1"):
        with perturbed_guidance(pipe, heads, scale=2.0):
            outputs.append(pipe("a red circle", num_inference_steps=3, guidance_scale=4.0, output_type="latent",
                                generator=torch.Generator().manual_seed(0)).images)
    with torch.no_grad():
        plain = pipe("a red circle", num_inference_steps=3, guidance_scale=4.0, output_type="latent",
                     generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
    assert (outputs[0] - plain).abs().max() > 1e-4  # the preset's heads are perturbed


def test_structure_preset_is_the_searched_heads_and_guides_without_cfg():
    import json
    import pathlib

    from attnedit.shapes.builtin import load_builtin

    preset = head_presets()["shapes-t2i-structure"]
    results = pathlib.Path(__file__).parents[1] / "benchmarks" / "results" / "guidance_without_cfg.json"
    measured = json.loads(results.read_text())["results"]["models"]["shapes-t2i"]
    assert preset["spec"] == measured["search"]["spec"] == format_heads("shapes-t2i-structure")
    assert measured["ship"]["ship_preset"] and preset["held_out"]["beats_plain_and_pag_beyond_2se"]
    pipe = load_builtin("shapes-t2i")
    outputs = []
    for heads in ("shapes-t2i-structure", preset["spec"]):  # no CFG: eps_c + w (eps_c - eps_p)
        with perturbed_guidance(pipe, heads, scale=1.5):
            outputs.append(pipe("a red circle", num_inference_steps=2, guidance_scale=1.0, output_type="latent",
                                generator=torch.Generator().manual_seed(0)).images)
    plain = pipe("a red circle", num_inference_steps=2, guidance_scale=1.0, output_type="latent",
                 generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
    assert (outputs[0] - plain).abs().max() > 1e-4


BAD_EDITS = [  # SoftPAG(**options): each bad value is one ValueError naming the argument
    ({"strength": 1.5}, r"strength=1.5 must be in \[0, 1\]"), ({"strength": -0.1}, "strength=-0.1"),
    ({"strength": math.nan}, "strength=nan"), ({"strength": math.inf}, "strength=inf"), ({"strength": "1"}, "strength='1'"),
    ({"strength": None}, "strength=None"), ({"strength": True}, "strength=True"),
    ({"heads": "L7"}, "names whole layers"), ({"heads": None}, "heads=None selects no head"),
    ({"heads": {1: (-1,)}}, r"layer 1 -> \(-1,\) is not a layer >= 0"), ({"heads": {-1: (0,)}}, "layer -1"),
    ({"heads": {1: (0.5,)}}, r"\(0.5,\) is not"), ({"heads": {1: "0"}}, "is not a layer"), ({"heads": {}}, "selects no head"),
    ({"target": "max"}, "target='max' must be 'identity' or 'uniform'"), ({"target": None}, "target=None"),
    ({"scope": "text"}, "scope='text' must be one of 'all', 'image-image', 'image'"), ({"scope": ["all"]}, r"scope=\['all'\]"),
    ({"scope": "image-image", "target": "uniform"}, "target='uniform' has no 'image-image' form"),
    ({"steps": 5}, "steps=5 must be a window"), ({"steps": (0,)}, r"steps=\(0,\)"), ({"steps": (0.5, 3)}, r"steps=\(0.5, 3\)"),
    ({"steps": (0, math.inf)}, "steps=.0, inf."), ({"steps": (3, 1)}, r"steps=\(3, 1\)"), ({"steps": "0-3"}, "steps='0-3'"),
    ({"kinds": "x"}, r"kinds=\['x'\] has unknown entries"), ({"branches": "x"}, r"branches=\['x'\]"),
    ({"layers": [-1]}, r"layers=\[-1\]"),
]


@pytest.mark.parametrize("options, message", BAD_EDITS, ids=[repr(o) for o, _ in BAD_EDITS])
def test_softpag_edit_rejects(options, message):
    with pytest.raises(ValueError, match=message):
        SoftPAG(**{"heads": "7:3", **options})


def test_softpag_edit_arguments():
    assert SoftPAG(heads="7:3,7:1").heads == {7: (1, 3)}
    assert SoftPAG(heads={7: 3, 2: [1, 0, 1]}).heads == {2: (0, 1), 7: (3,)}
    assert SoftPAG(heads="7:3", steps=[1, 4]).steps == (1, 4)


# ------------------------------------------------------------------------------------- dense references
def _joint_call(batch: int = 2, heads: int = 4) -> AttentionCall:
    """SD3-like joint call: 6 image tokens (2x3 grid) then 4 text tokens."""
    return AttentionCall(
        site=Site("blocks.0.attn", "joint", 0, heads), family="sd3", step=0, branches=("cond",) * batch, grid=(2, 3),
        num_queries=10, num_keys=10, image_queries=slice(0, 6), image_keys=slice(0, 6), text_queries=slice(6, 10),
        text_keys=slice(6, 10), device=torch.device("cpu"), dtype=torch.float32,
    )


def _native(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("u", [0.3, 1.0])
@pytest.mark.parametrize("target", ["identity", "uniform"])
@pytest.mark.parametrize("scope", ["all", "image"])
def test_softpag_matches_materialized_blended_map(u, target, scope):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 10, 8) for _ in range(3))
    edit = SoftPAG(heads={0: (1, 3)}, strength=u, target=target, scope=scope)
    out = attend(q, k, v, None, _joint_call(), [edit], _native, "native")
    probs = (q @ k.transpose(-1, -2) / math.sqrt(8)).softmax(-1)  # (B, H, S, S), materialized on purpose
    goal = torch.eye(10) if target == "identity" else torch.full((10, 10), 0.1)
    rows = slice(None) if scope == "all" else slice(0, 6)
    blended = probs.clone()
    blended[:, [1, 3], rows] = (1 - u) * probs[:, [1, 3], rows] + u * goal[rows]
    torch.testing.assert_close(out, blended @ v, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, [0, 2]], (probs @ v)[:, [0, 2]], atol=1e-6, rtol=0)  # other heads untouched
    assert not torch.allclose(out[:, [1, 3]], (probs @ v)[:, [1, 3]], atol=1e-3)


def test_u1_identity_head_outputs_value():
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 4, 10, 8) for _ in range(3))
    out = attend(q, k, v, None, _joint_call(1), [SoftPAG(heads="0:2", strength=1.0)], _native, "native")
    torch.testing.assert_close(out[:, 2], v[:, 2], atol=1e-6, rtol=0)  # out + 1 * (V - out), one rounding


def _diffusers_pag_mask(n_image: int, seq: int) -> torch.Tensor:
    """The additive mask of diffusers' PAGJointAttnProcessor2_0's perturbed path, built as it builds it."""
    full_mask = torch.zeros((seq, seq))
    full_mask[:n_image, :n_image] = float("-inf")
    full_mask[:n_image, :n_image].fill_diagonal_(0)
    return full_mask


def test_perturbed_keep_is_each_scopes_map():
    call = _joint_call()
    assert torch.equal(perturbed_keep(call, "image-image"), _diffusers_pag_mask(6, 10) == 0)
    assert torch.equal(perturbed_keep(call, "all"), torch.eye(10, dtype=torch.bool))
    image = torch.ones(10, 10, dtype=torch.bool)
    image[:6] = torch.eye(10, dtype=torch.bool)[:6]  # image rows: the identity; text rows: untouched
    assert torch.equal(perturbed_keep(call, "image"), image)


@pytest.mark.parametrize("u", [0.4, 1.0])
@pytest.mark.parametrize("heads", [{0: (1, 3)}, None])
def test_image_image_scope_equals_diffusers_masked_attention(u, heads):
    """The fast path (softmax over own key + text keys) equals SDPA with diffusers' PAG mask, blended by u."""
    torch.manual_seed(2)
    q, k, v = (torch.randn(2, 4, 10, 8) for _ in range(3))
    edit = HeadBlend(heads=heads, strength=u, scope="image-image")
    out = attend(q, k, v, None, _joint_call(), [edit], _native, "native")
    plain = F.scaled_dot_product_attention(q, k, v)
    perturbed = F.scaled_dot_product_attention(q, k, v, attn_mask=_diffusers_pag_mask(6, 10))
    chosen = [1, 3] if heads else [0, 1, 2, 3]
    expected = plain.clone()
    expected[:, chosen] = (1 - u) * plain[:, chosen] + u * perturbed[:, chosen]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, :, 6:], plain[:, :, 6:], atol=0, rtol=0)  # text rows untouched
    assert not torch.allclose(out[:, chosen, :6], plain[:, chosen, :6], atol=1e-3)


@pytest.mark.parametrize("mask_kind", ["bool", "additive"])
def test_image_image_scope_respects_a_text_padding_mask(mask_kind):
    """HunyuanVideo's (B, 1, 1, S) key mask hides padded text keys from the perturbed rows too (dense reference)."""
    torch.manual_seed(3)
    q, k, v = (torch.randn(2, 4, 10, 8) for _ in range(3))
    keep = torch.ones(2, 1, 1, 10, dtype=torch.bool)
    keep[0, ..., 8:], keep[1, ..., 7:] = False, False  # row 0 pads 2 text keys, row 1 pads 3
    mask = keep if mask_kind == "bool" else torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    call = _joint_call()
    out = attend(q, k, v, mask, call, [HeadBlend(heads={0: (2,)}, strength=1.0, scope="image-image")], _native, "native")
    own = torch.zeros(10, 10, dtype=torch.bool)
    own[:6, :6] = torch.eye(6, dtype=torch.bool)  # a perturbed (image) row keeps its own key, whatever the mask
    reference, _ = dense_attention(q, k, v, (keep & perturbed_keep(call, "image-image")) | own)
    torch.testing.assert_close(out[:, 2], reference[:, 2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, [0, 1, 3]], F.scaled_dot_product_attention(q, k, v, attn_mask=mask)[:, [0, 1, 3]])


def test_image_image_scope_without_text_is_the_identity():
    """Self-attention over image tokens only (UNet, Wan): every scope is PAG's identity, output V."""
    torch.manual_seed(4)
    q, k, v = (torch.randn(1, 2, 6, 8) for _ in range(3))
    call = AttentionCall(site=Site("attn1", "self", 0, 2), family="unet", step=0, branches=("cond",), grid=(2, 3),
                         num_queries=6, num_keys=6, image_queries=slice(0, 6), image_keys=slice(0, 6), text_queries=None,
                         text_keys=None, device=torch.device("cpu"), dtype=torch.float32)
    for scope in ("all", "image-image", "image"):
        out = attend(q, k, v, None, call, [HeadBlend(strength=1.0, scope=scope)], _native, "native")
        torch.testing.assert_close(out, v, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------ whole models
def _captured(pipe, family: str) -> list[tuple[tuple, dict]]:
    """Every denoiser call (args, kwargs) of a 1-step pipeline run."""
    model, calls = zoo.denoiser(pipe), []
    hook = model.register_forward_pre_hook(lambda m, a, k: calls.append((a, dict(k))), with_kwargs=True)
    try:
        pipe(**{**zoo.call_kwargs(family), "num_inference_steps": 1, "output_type": "latent"},
             generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    return calls


def _run(model, call) -> torch.Tensor:
    with torch.no_grad():
        return model(*call[0], **call[1])[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_u0_is_exactly_unperturbed_and_only_selected_heads_matter(tiny_pipe, family):
    pipe = tiny_pipe(family)
    model, call = zoo.denoiser(pipe), _captured(pipe, family)[0]
    plain = _run(model, call)
    with install(model, soft_pag(model, "L1", strength=0.0)):
        assert torch.equal(_run(model, call), plain)
    with install(model, soft_pag(model, "L1H0", strength=1.0)):
        perturbed = _run(model, call)
    assert not torch.allclose(perturbed, plain, atol=1e-4)


class _DenseScope(HeadBlend):
    """The perturbed heads computed densely: softmax over the scope's S x S keep map (own key always kept)."""

    def blend(self, call, out, value, *, query=None, key=None, mask=None):
        keep = perturbed_keep(call, self.scope)
        own = torch.zeros_like(keep)
        own[call.image_queries, call.image_keys] = torch.eye(call.image_queries.stop - call.image_queries.start, dtype=torch.bool)
        if mask is not None:
            keep = keep & (mask if mask.dtype == torch.bool else mask > float("-inf"))
        perturbed, _ = dense_attention(query, key, value, keep | own)
        heads = list(self.heads[call.site.layer])
        blended = out.clone()
        blended[:, heads] = out[:, heads] + self.strength * (perturbed[:, heads] - out[:, heads])
        return blended


@pytest.mark.parametrize("family", ["sd3", "flux", "hunyuan_video"])
def test_image_image_scope_in_whole_models_equals_the_dense_map(tiny_pipe, family):
    """Joint blocks of each layout ([image, text] SD3; [text, image] FLUX single-stream; HunyuanVideo's padded text)."""
    pipe = tiny_pipe(family)
    model, call = zoo.denoiser(pipe), _captured(pipe, family)[0]
    edit = soft_pag(model, "L0H1,L1H0", strength=0.8, scope="image-image")
    with install(model, edit):
        fast = _run(model, call)
    with install(model, _DenseScope(heads=edit.heads, kinds=edit.kinds, strength=0.8, scope="image-image")):
        dense = _run(model, call)
    with install(model, soft_pag(model, "L0H1,L1H0", strength=0.8)):
        everything = _run(model, call)
    torch.testing.assert_close(fast, dense, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(fast, everything, atol=1e-3)  # not the paper's scope


@pytest.mark.parametrize("family", ["sd15", "sd3", "flux", "wan"])
def test_guidance_formula_matches_three_separate_passes(tiny_pipe, family):
    pipe = tiny_pipe(family)
    model, calls = zoo.denoiser(pipe), _captured(pipe, family)
    scale, heads = 2.5, "L1H0,0:1"
    edit = soft_pag(model, heads, strength=0.7)
    if family in ("sd15", "sd3"):  # one batch [uncond, cond]
        eps_u, eps_c = _run(model, calls[0]).chunk(2)
        with install(model, edit):
            eps_p = _run(model, calls[0]).chunk(2)[1]
    else:  # separate passes: cond first (FLUX runs cond only: no CFG)
        eps_c = _run(model, calls[0])
        eps_u = _run(model, calls[1]) if len(calls) > 1 else None
        with install(model, edit):
            eps_p = _run(model, calls[0])
    w = pipe.guidance_scale if eps_u is not None else 0.0
    expected = eps_c + scale * (eps_c - eps_p) + (w - 1) * (eps_c - eps_u) if eps_u is not None else eps_c + scale * (eps_c - eps_p)
    with perturbed_guidance(pipe, heads, scale=scale, strength=0.7):
        if family in ("sd15", "sd3"):
            g_u, g_c = _run(model, calls[0]).chunk(2)
            final = g_u + w * (g_c - g_u)  # the pipeline's own CFG line
            torch.testing.assert_close(g_u, eps_u, atol=1e-5, rtol=1e-5)
        else:
            g_c = _run(model, calls[0])
            final = g_c if eps_u is None else _run(model, calls[1]) + w * (g_c - eps_u)
    torch.testing.assert_close(final, expected, atol=1e-4, rtol=1e-4)


def _diffusers_pag(pipe, family: str, site_name: str):
    """diffusers' own PAG pipeline of ``family`` on ``pipe``'s modules, PAG on the one attention module ``site_name``."""
    import inspect

    from diffusers import StableDiffusion3PAGPipeline, StableDiffusionPAGPipeline, StableDiffusionXLPAGPipeline

    cls = {"sd15": StableDiffusionPAGPipeline, "sdxl": StableDiffusionXLPAGPipeline, "sd3": StableDiffusion3PAGPipeline}[family]
    modules = {k: v for k, v in pipe.components.items() if k in inspect.signature(cls.__init__).parameters}
    # a full-name regex: diffusers' re.search would also match "blocks.1" in "blocks.10" and "attn" in "attn2"
    pag = cls(**modules, pag_applied_layers=[re.escape(site_name) + "$"])
    pag.set_progress_bar_config(disable=True)
    return pag


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("family", ["sd15", "sd3"])  # SDXL: the same UNet PAG processor as SD 1.5
def test_pag_equals_diffusers_pag_pipeline(tiny_pipe, family):
    """PAG on every head of one layer, scope="image-image", equals diffusers' PAG pipeline at the same seed.

    diffusers' SD3 PAG processors skip norm_q / norm_k; the tiny SD3 has no qk-norm, so the comparison is exact
    there (see test_diffusers_sd3_pag_skips_qk_norm for a model with it). On UNets every scope is the identity.
    """
    pipe = tiny_pipe(family)
    with install(pipe) as handle:
        site = [s for s in handle.sites if s.kind == handle.family.perturbed_kind][-1]
    if family == "sd3":
        assert all(b.attn.norm_q is None for b in pipe.transformer.transformer_blocks)
    kwargs = {**zoo.call_kwargs(family), "num_inference_steps": 2, "output_type": "latent"}
    theirs = _diffusers_pag(pipe, family, site.name)(**kwargs, pag_scale=3.0, generator=torch.Generator().manual_seed(0)).images
    with perturbed_guidance(pipe, f"L{site.layer}", scale=3.0, scope="image-image"):
        ours = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    plain = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    assert (theirs - ours).abs().max() < 2e-5
    assert (theirs - plain).abs().max() > 1e-2  # PAG's own effect, a thousand times the difference
    if family == "sd3":  # the old "image" scope is another perturbation (image rows lose the text keys too)
        with perturbed_guidance(pipe, f"L{site.layer}", scale=3.0, scope="image"):
            image = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
        assert (image - theirs).abs().max() > 1e-2


@pytest.mark.usefixtures("one_thread")
def test_diffusers_sd3_pag_skips_qk_norm(tiny_pipe):
    """On an SD3 with qk-norm (SD3.5) diffusers' PAG processors drop norm_q / norm_k on every path, so even at a
    vanishing pag_scale their output is not the stock pipeline's; attnedit keeps the norms."""
    from diffusers import SD3Transformer2DModel

    base = tiny_pipe("sd3")
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(**{**base.transformer.config, "qk_norm": "rms_norm"}).eval()
    pipe = type(base)(**{**base.components, "transformer": transformer})
    pipe.set_progress_bar_config(disable=True)
    kwargs = {**zoo.call_kwargs("sd3"), "num_inference_steps": 1, "output_type": "latent"}
    stock = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    theirs = _diffusers_pag(pipe, "sd3", "transformer_blocks.0.attn")(**kwargs, pag_scale=1e-6,
                                                                      generator=torch.Generator().manual_seed(0)).images
    with perturbed_guidance(pipe, "L0", scale=1e-6, scope="image-image"):
        ours = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(ours, stock, atol=1e-5, rtol=1e-5)
    assert (theirs - stock).abs().max() > 1e-3


def _attn_batches(model, name: str) -> list[int]:
    seen: list[int] = []
    module = dict(model.named_modules())[name]
    module.register_forward_pre_hook(lambda m, a, k: seen.append((a[0] if a else k["hidden_states"]).shape[0]), with_kwargs=True)
    return seen


@pytest.mark.parametrize("family", DIT)
def test_prefix_sharing_equals_unshared(tiny_pipe, family):
    pipe = tiny_pipe(family)
    model, call = zoo.denoiser(pipe), _captured(pipe, family)[0]
    first = {"sd3": "transformer_blocks.0.attn", "flux": "transformer_blocks.0.attn", "wan": "blocks.0.attn1",
             "hunyuan_video": "transformer_blocks.0.attn"}[family]
    outs, batches = {}, {}
    for share in (False, True):
        seen = _attn_batches(model, first)
        with perturbed_guidance(pipe, "L1H1", scale=2.0, share_prefix=share):
            outs[share] = _run(model, call)
        batches[share] = seen[0]
        dict(model.named_modules())[first]._forward_pre_hooks.clear()
    assert batches[True] < batches[False]  # the first block ran without the perturbed rows
    torch.testing.assert_close(outs[True], outs[False], atol=1e-5, rtol=1e-5)


def test_step_window_skips_the_perturbed_pass(tiny_pipe):
    pipe = tiny_pipe("sd3")
    kwargs = {**zoo.call_kwargs("sd3"), "num_inference_steps": 3, "output_type": "latent"}
    plain = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    seen = _attn_batches(zoo.denoiser(pipe), "transformer_blocks.1.attn")
    try:
        with perturbed_guidance(pipe, "L1", scale=3.0, steps=(1, 2)):
            guided = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
        with perturbed_guidance(pipe, "L1", scale=0.0):
            zero = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    finally:
        dict(zoo.denoiser(pipe).named_modules())["transformer_blocks.1.attn"]._forward_pre_hooks.clear()
    assert seen[:3] == [2, 3, 2]  # only step 1 ran [uncond, cond, perturbed]
    assert not torch.allclose(guided, plain, atol=1e-4)
    torch.testing.assert_close(zero, plain, atol=1e-5, rtol=1e-5)


def test_bad_arguments_and_restoration(tiny_pipe):
    pipe = tiny_pipe("sd15")
    model = zoo.denoiser(pipe)
    processors, forward = dict(model.attn_processors), model.forward
    with pytest.raises(ValueError, match=r"scale=-1 must be a finite number >= 0"), perturbed_guidance(pipe, "L1", scale=-1):
        pass
    with pytest.raises(ValueError, match=r"names head 9 of layer 1"), perturbed_guidance(pipe, "L1H9"):
        pass
    with pytest.raises(ValueError, match="selects no head"), perturbed_guidance(pipe, ""):
        pass
    with pytest.raises(RuntimeError, match="boom"), perturbed_guidance(pipe, "L1", scale=1.0):
        raise RuntimeError("boom")
    assert model.attn_processors == processors and model.forward == forward
    assert not model._diffusers_hook.hooks


BAD_GUIDANCE = [  # perturbed_guidance(pipe, **options): refused before anything is installed or run
    ({"scale": math.nan}, "scale=nan must be a finite number >= 0"), ({"scale": math.inf}, "scale=inf"),
    ({"scale": -1}, "scale=-1"), ({"scale": "2"}, "scale='2'"), ({"scale": True}, "scale=True"),
    ({"cfg_scale": math.nan}, "cfg_scale=nan must be > 0 and finite"), ({"cfg_scale": math.inf}, "cfg_scale=inf"),
    ({"cfg_scale": 0}, "cfg_scale=0"), ({"cfg_scale": "a"}, "cfg_scale='a'"),
    ({"strength": math.nan}, "strength=nan must be in"), ({"strength": -0.5}, "strength=-0.5"),
    ({"strength": "a"}, "strength='a'"), ({"steps": 5}, "steps=5 must be a window"), ({"steps": (0, math.inf)}, "steps="),
    ({"target": "x"}, "target='x'"), ({"scope": "x"}, "scope='x' must be one of"), ({"share_prefix": "no"}, "share_prefix='no'"),
    ({"backend": "x"}, "backend='x'"), ({"heads": "L9"}, "names layer 9; sd3 has joint-attention layers 0..1"),
    ({"heads": "1:4"}, "names head 4 of layer 1; it has heads 0..3"), ({"heads": None}, "heads=None must be"),
]


@pytest.mark.parametrize("options, message", BAD_GUIDANCE, ids=[repr(o) for o, _ in BAD_GUIDANCE])
def test_perturbed_guidance_rejects(tiny_pipe, options, message):
    pipe = tiny_pipe("sd3")
    with pytest.raises(ValueError, match=message), perturbed_guidance(pipe, **{"heads": "L1", **options}):
        pass
    assert not any(isinstance(p, EditProcessor) for p in pipe.transformer.attn_processors.values())
    with pytest.raises(ValueError, match=r"soft_pag got unknown option\(s\) \['bogus'\]"):
        soft_pag(pipe, "L1", bogus=1)


def test_flux_true_cfg_takes_cfg_scale(tiny_pipe):
    pipe = tiny_pipe("flux")
    model, calls = zoo.denoiser(pipe), []
    hook = model.register_forward_pre_hook(lambda m, a, k: calls.append((a, dict(k))), with_kwargs=True)
    try:
        pipe(**{**zoo.call_kwargs("flux"), "num_inference_steps": 1, "output_type": "latent"}, negative_prompt="a dog",
             true_cfg_scale=2.0, generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    assert len(calls) == 2  # cond, then negative
    eps_c, eps_u = _run(model, calls[0]), _run(model, calls[1])
    with install(model, soft_pag(model, "L0H1", strength=1.0)):
        eps_p = _run(model, calls[0])
    with perturbed_guidance(pipe, "L0H1", scale=1.5, cfg_scale=2.0):
        g_c, g_u = _run(model, calls[0]), _run(model, calls[1])
    torch.testing.assert_close(g_u, eps_u)  # the negative pass is left alone
    final = g_u + 2.0 * (g_c - g_u)  # FluxPipeline's true-CFG line
    torch.testing.assert_close(final, eps_u + 2.0 * (eps_c - eps_u) + 1.5 * (eps_c - eps_p), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match=r"cfg_scale=0 must be > 0"), perturbed_guidance(pipe, "L0", cfg_scale=0):
        pass
