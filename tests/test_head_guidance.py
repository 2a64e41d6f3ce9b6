"""SoftPAG and perturbed-attention guidance: head-set syntax, dense references, guidance formula, prefix sharing."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from attnedit import install
from attnedit.core.attention import attend
from attnedit.core.families import AttentionCall, Site
from attnedit.methods.head_guidance import (
    SoftPAG,
    format_heads,
    head_presets,
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


@pytest.mark.parametrize("spec, message", [
    ("", "selects no head"), ("7-3", "'7-3' is not 'layer:head'"), ([], "selects no head"), ("L7H", "is not"),
    (3.5, "must be a string"),
])
def test_parse_heads_rejects(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_heads(spec)


def test_resolve_heads_validates_against_sites(tiny_pipe):
    pipe = tiny_pipe("sd3")
    with install(pipe) as handle:
        sites = handle.sites
    assert resolve_heads("L1,0:2", sites, "sd3") == {0: (2,), 1: (0, 1, 2, 3)}
    with pytest.raises(ValueError, match=r"names layer 5; sd3 has joint-attention layers 0..1"):
        resolve_heads("5:0", sites, "sd3")
    with pytest.raises(ValueError, match=r"names head 4 of layer 1; it has heads 0..3"):
        resolve_heads("L1H4", sites, "sd3")


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


def test_softpag_edit_arguments():
    assert SoftPAG(heads="7:3,7:1").heads == {7: (1, 3)}
    with pytest.raises(ValueError, match=r"strength=1.5 must be in \[0, 1\]"):
        SoftPAG(heads="7:3", strength=1.5)
    with pytest.raises(ValueError, match="strength=-0.1"):
        SoftPAG(heads="7:3", strength=-0.1)
    with pytest.raises(ValueError, match="names whole layers"):
        SoftPAG(heads="L7")
    with pytest.raises(ValueError, match="heads=None selects no head"):
        SoftPAG()


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
    with pytest.raises(ValueError, match=r"scale=-1 must be a number >= 0"), perturbed_guidance(pipe, "L1", scale=-1):
        pass
    with pytest.raises(ValueError, match=r"names head 9 of layer 1"), perturbed_guidance(pipe, "L1H9"):
        pass
    with pytest.raises(ValueError, match="selects no head"), perturbed_guidance(pipe, ""):
        pass
    with pytest.raises(RuntimeError, match="boom"), perturbed_guidance(pipe, "L1", scale=1.0):
        raise RuntimeError("boom")
    assert model.attn_processors == processors and model.forward == forward
    assert not model._diffusers_hook.hooks


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
