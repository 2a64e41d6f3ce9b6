"""SoftPAGGuidance in diffusers' SD3 modular pipeline: same result as ``perturbed_guidance`` on the stock pipeline.

Tolerance: the modular loop runs one denoiser call per prediction (batch 1: cond, uncond, perturbed) where the stock
pipeline runs one batched call ([uncond, cond, perturbed]); CPU kernels round differently for different batch sizes
(about 5e-7 per call on the tiny SD3), and the guidance terms are added in another order. Plain CFG through diffusers'
own ``ClassifierFreeGuidance`` differs from the stock pipeline by the same few 1e-6 (checked below), so the guider is
compared at ``atol = rtol = 1e-5``, far below the SoftPAG effect (> 1e-2) it must reproduce.
"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableDiffusion3AutoBlocks
from diffusers.guiders import ClassifierFreeGuidance

from attnedit.methods.head_guidance import perturbed_guidance
from attnedit.models import zoo
from attnedit.pipelines.soft_pag_guider import SoftPAGGuidance
from attnedit.processors.edit_processor import EditProcessor

STEPS, CFG = 3, 5.0
TOL = {"atol": 1e-5, "rtol": 1e-5}


@pytest.fixture(scope="module")
def pipes(tiny_pipe):
    """(stock StableDiffusion3Pipeline, StableDiffusion3ModularPipeline) sharing the same tiny components."""
    pipe = tiny_pipe("sd3")
    modular = StableDiffusion3AutoBlocks().init_pipeline()
    modular.update_components(**{k: v for k, v in pipe.components.items() if k in modular._component_specs})
    modular.set_progress_bar_config(disable=True)
    return pipe, modular


def _modular(modular, guider, cfg: bool = True, output: str = "latents", steps: int = STEPS, **kwargs):
    modular.update_components(guider=guider)
    if cfg:
        kwargs["negative_prompt"] = ""  # the stock pipeline's default negative prompt (modular encodes none without)
    return modular(prompt=zoo.call_kwargs("sd3")["prompt"], height=64, width=64, num_inference_steps=steps,
                   max_sequence_length=32, generator=torch.Generator().manual_seed(0), output=output, **kwargs)


def _stock(pipe, guidance_scale: float = CFG, output_type: str = "latent", steps: int = STEPS):
    kwargs = {**zoo.call_kwargs("sd3"), "guidance_scale": guidance_scale, "num_inference_steps": steps,
              "output_type": output_type}
    return pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images


def _snapshot(model):
    """Processors (by identity), torch hooks and diffusers hooks of the model and its submodules."""
    return (
        {name: id(p) for name, p in model.attn_processors.items()},
        sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
        sum(len(getattr(m, "_diffusers_hook", None).hooks) if hasattr(m, "_diffusers_hook") else 0 for m in model.modules()),
    )


def _count_calls(module) -> tuple[list[int], object]:
    seen: list[int] = []
    handle = module.register_forward_pre_hook(lambda m, a, k: seen.append(1), with_kwargs=True)
    return seen, handle


# --------------------------------------------------------------------------------------- equality with the stock path
def test_modular_cfg_baseline_differs_only_by_batching(pipes):
    pipe, modular = pipes
    diff = (_modular(modular, ClassifierFreeGuidance(guidance_scale=CFG)) - _stock(pipe)).abs().max().item()
    assert diff < 1e-5  # diffusers' own CFG guider: the same few 1e-6 SoftPAGGuidance is held to


@pytest.mark.parametrize("heads, strength, scale", [("L1H0,0:1", 0.7, 2.5), ("L1", 1.0, 3.0), ("0:2", 0.5, 2.0)])
def test_matches_perturbed_guidance_on_the_stock_pipeline(pipes, heads, strength, scale):
    pipe, modular = pipes
    guider = SoftPAGGuidance(guidance_scale=CFG, perturbed_guidance_scale=scale, heads=heads, strength=strength)
    latents = _modular(modular, guider)
    images = _modular(modular, guider, output="images", output_type="np")
    with perturbed_guidance(pipe, heads, scale=scale, strength=strength):
        ref_latents, ref_images = _stock(pipe), _stock(pipe, output_type="np")
    torch.testing.assert_close(latents, ref_latents, **TOL)
    torch.testing.assert_close(torch.as_tensor(images), torch.as_tensor(ref_images), **TOL)
    assert (ref_latents - _stock(pipe)).abs().max() > 1e-2  # the perturbation is far above the tolerance


def test_matches_without_cfg(pipes):
    pipe, modular = pipes  # eps = eps_c + w_pag (eps_c - eps_p); the stock pipeline turns CFG off at scale 1
    guider = SoftPAGGuidance(guidance_scale=1.0, perturbed_guidance_scale=2.0, heads="L1H2,0:0", strength=0.8)
    assert guider.num_conditions == 2
    with perturbed_guidance(pipe, "L1H2,0:0", scale=2.0, strength=0.8):
        ref = _stock(pipe, guidance_scale=1.0)
    torch.testing.assert_close(_modular(modular, guider, cfg=False), ref, **TOL)


def test_step_window_matches_perturbed_guidance_steps(pipes):
    pipe, modular = pipes  # steps int(0.34 * 3) = 1 <= i < int(0.67 * 3) = 2: only step 1, as steps=(1, 2)
    guider = SoftPAGGuidance(guidance_scale=CFG, perturbed_guidance_scale=3.0, heads="L1", perturbed_guidance_start=0.34,
                             perturbed_guidance_stop=0.67)
    attn = dict(modular.transformer.named_modules())["transformer_blocks.1.attn"]
    seen, handle = _count_calls(attn)
    try:
        latents = _modular(modular, guider)
    finally:
        handle.remove()
    assert len(seen) == 2 + 3 + 2  # steps 0 and 2: cond, uncond; step 1: cond, uncond, perturbed
    with perturbed_guidance(pipe, "L1", scale=3.0, steps=(1, 2)):
        torch.testing.assert_close(latents, _stock(pipe), **TOL)


def test_share_prefix_reuses_the_cond_pass_bit_for_bit(pipes):
    _, modular = pipes
    first = dict(modular.transformer.named_modules())["transformer_blocks.0.attn"]
    outs, calls = {}, {}
    for share in (True, False):
        seen, handle = _count_calls(first)
        try:
            outs[share] = _modular(modular, SoftPAGGuidance(guidance_scale=CFG, perturbed_guidance_scale=2.0,
                                                            heads="L1H1", share_prefix=share))
        finally:
            handle.remove()
        calls[share] = len(seen)
    assert calls == {True: 2 * STEPS, False: 3 * STEPS}  # block 0 skipped in the perturbed pass
    assert torch.equal(outs[True], outs[False])


# ---------------------------------------------------------------------------------- off switches and restoration
@pytest.mark.parametrize("options", [{"strength": 0.0}, {"perturbed_guidance_scale": 0.0}])
def test_strength_or_scale_zero_is_plain_cfg(pipes, options):
    _, modular = pipes
    guider = SoftPAGGuidance(**{"guidance_scale": CFG, "perturbed_guidance_scale": 3.0, "heads": "L1", **options})
    plain = _modular(modular, ClassifierFreeGuidance(guidance_scale=CFG))
    assert torch.equal(_modular(modular, guider), plain)
    assert guider.num_conditions == 2  # no perturbed pass is made


@pytest.mark.parametrize("heads", ["L1", "0:1,1:3"])
def test_processors_and_hooks_restored_after_run(pipes, heads):
    _, modular = pipes
    model, seen_edit = modular.transformer, []
    before = _snapshot(model)
    attn = dict(model.named_modules())["transformer_blocks.1.attn"]
    handle = attn.register_forward_pre_hook(lambda m, a, k: seen_edit.append(isinstance(m.processor, EditProcessor)),
                                            with_kwargs=True)
    try:
        _modular(modular, SoftPAGGuidance(guidance_scale=CFG, perturbed_guidance_scale=2.0, heads=heads))
    finally:
        handle.remove()
    assert seen_edit == [False, False, True] * STEPS  # the edit processors sit there for the perturbed pass only
    assert _snapshot(model) == before


@pytest.mark.parametrize("heads", ["L1", "0:1"])  # with and without cached prefix blocks
def test_restored_when_the_perturbed_pass_raises(pipes, heads):
    pipe, modular = pipes
    model = modular.transformer
    before = _snapshot(model)

    def boom(module, args, kwargs):
        if isinstance(module.processor, EditProcessor):
            raise RuntimeError("boom")  # noqa: TRY004

    guider = SoftPAGGuidance(guidance_scale=CFG, perturbed_guidance_scale=2.0, heads=heads)
    handle = dict(model.named_modules())["transformer_blocks.1.attn"].register_forward_pre_hook(boom, with_kwargs=True)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            _modular(modular, guider)
    finally:
        handle.remove()
    assert _snapshot(model) == before
    torch.testing.assert_close(_modular(modular, ClassifierFreeGuidance(guidance_scale=CFG)), _stock(pipe), **TOL)
    fresh = _modular(modular, SoftPAGGuidance(guidance_scale=CFG, perturbed_guidance_scale=2.0, heads=heads))
    assert torch.equal(_modular(modular, guider), fresh)  # the same guider runs cleanly afterwards


# ------------------------------------------------------------------------------------------------ head selection
@pytest.mark.parametrize("heads, message", [
    ("5:0", r"names layer 5; sd3 has joint-attention layers 0..1"),
    ("L1H4", r"names head 4 of layer 1; it has heads 0..3"),
    ("shapes-t2i", r"is the preset of shapes-t2i \(a unet model\); this model is sd3"),
])
def test_unknown_head_raises_a_clear_error(pipes, heads, message):
    _, modular = pipes
    before = _snapshot(modular.transformer)
    guider = SoftPAGGuidance(guidance_scale=CFG, perturbed_guidance_scale=2.0, heads=heads)
    with pytest.raises(ValueError, match=message):
        guider.resolve(modular.transformer)
    with pytest.raises(ValueError, match=message):
        _modular(modular, guider)
    assert _snapshot(modular.transformer) == before


@pytest.mark.parametrize("options, message", [
    ({"heads": "7-3"}, "'7-3' is not 'layer:head'"), ({}, "needs heads="), ({"heads": "L1", "strength": 1.5},
    r"strength=1.5 must be in \[0, 1\]"), ({"heads": "L1", "perturbed_guidance_scale": -1}, "must be a number >= 0"),
    ({"heads": "L1", "backend": "nope"}, "backend='nope'"),
    ({"heads": "L1", "perturbed_guidance_start": 0.5, "perturbed_guidance_stop": 0.2}, "0 <= start <= stop <= 1"),
])
def test_bad_arguments_fail_at_construction(options, message):
    with pytest.raises(ValueError, match=message):
        SoftPAGGuidance(**options)


def test_heads_from_a_ranking_json(pipes, tmp_path):
    _, modular = pipes
    path = tmp_path / "ranking.json"
    path.write_text(json.dumps({"heads": [[1, 0], [0, 1]], "spec": "0:1,1:0", "scores": {}}))
    by_file = SoftPAGGuidance(guidance_scale=CFG, perturbed_guidance_scale=2.0, heads=str(path), strength=0.6)
    by_name = SoftPAGGuidance(guidance_scale=CFG, perturbed_guidance_scale=2.0, heads="L0H1,L1H0", strength=0.6)
    assert by_file.config.heads == by_name.config.heads == "0:1,1:0"  # the config is self-contained
    assert torch.equal(_modular(modular, by_file), _modular(modular, by_name))
    with pytest.raises(ValueError, match="not a readable ranking JSON"):
        SoftPAGGuidance(heads=str(tmp_path / "missing.json"))


def test_config_round_trip(tmp_path):
    guider = SoftPAGGuidance(guidance_scale=4.0, perturbed_guidance_scale=1.5, heads={1: None, 0: (2,)}, strength=0.3)
    guider.save_pretrained(tmp_path)
    loaded = SoftPAGGuidance.from_pretrained(tmp_path)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}
    assert public(loaded.config) == public(guider.config)
    assert (loaded.heads, loaded.strength, loaded.perturbed_guidance_scale) == ("0:2,1:*", 0.3, 1.5)
    assert guider.new(strength=0.9).strength == 0.9
