"""The edit core: exactness per family, restore on exceptions, step/branch/layer selection, composition, errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from attnedit import AttentionRecorder, BlockMask, Edit, HeadBlend, KeyMask, install
from attnedit.families import detect_family
from attnedit.models import zoo
from attnedit.processors import EditProcessor

ALL = zoo.FAMILIES


def run(pipe, family: str, *edits: Edit, backend: str = "auto", **overrides) -> torch.Tensor:
    kwargs = {**zoo.call_kwargs(family), "output_type": "latent", **overrides}
    generator = torch.Generator("cpu").manual_seed(0)
    if edits is None:
        return pipe(**kwargs, generator=generator)[0]
    with install(pipe, *edits, backend=backend):
        return pipe(**kwargs, generator=generator)[0]


def stock(pipe, family: str, **overrides) -> torch.Tensor:
    kwargs = {**zoo.call_kwargs(family), "output_type": "latent", **overrides}
    return pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(0))[0]


def processors(pipe) -> dict:
    return dict(zoo.denoiser(pipe).attn_processors)


@dataclasses.dataclass(frozen=True, kw_only=True)
class KeepKeys(Edit):
    """Test edit: a raw per-key keep vector, as an extension author would write one."""

    keep: torch.Tensor

    def key_keep(self, call):
        return self.keep[None]


@pytest.mark.parametrize("family", ALL)
def test_no_edit_equals_stock(tiny_pipe, family):
    pipe = tiny_pipe(family)
    expected = stock(pipe, family)
    assert (run(pipe, family) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("family", ALL)
def test_reference_backend_equals_stock(tiny_pipe, family):
    """The dense reference path (softmax(QK^T)V written out) agrees with the stock fused kernels."""
    pipe = tiny_pipe(family)
    assert (run(pipe, family, backend="reference") - stock(pipe, family)).abs().max() <= 1e-4


@pytest.mark.parametrize("family", ALL)
def test_processors_restored_on_exception(tiny_pipe, family):
    pipe = tiny_pipe(family)
    before = processors(pipe)
    with pytest.raises(RuntimeError, match="boom"), install(pipe, HeadBlend(strength=0.5)):
        assert all(isinstance(p, EditProcessor) for p in processors(pipe).values() if p not in before.values())
        raise RuntimeError("boom")
    after = processors(pipe)
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert not zoo.denoiser(pipe)._forward_pre_hooks


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_edit_changes_output_and_disappears_after_exit(tiny_pipe, family):
    pipe = tiny_pipe(family)
    expected = stock(pipe, family)
    assert (run(pipe, family, HeadBlend(strength=1.0)) - expected).abs().max() > 1e-3
    assert torch.equal(stock(pipe, family), expected)


def test_nested_install_composes_and_takes_back_its_edits(tiny_pipe):
    """install() inside install() adds edits to the enclosing one; leaving restores exactly what was there."""
    pipe = tiny_pipe("sd15")
    before = processors(pipe)
    blend, mask = HeadBlend(strength=0.6, heads={0: (1,)}), KeyMask(mask=_square_mask())
    together = run(pipe, "sd15", blend, mask)
    kwargs = {**zoo.call_kwargs("sd15"), "output_type": "latent"}
    with install(pipe, blend) as outer:
        with install(pipe, mask) as inner:
            assert inner.edits == (mask,) and outer.edits == (blend,)
            nested = pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(0))[0]
        alone = pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(0))[0]
        inner.remove()  # idempotent
    assert torch.equal(nested, together)
    assert torch.equal(alone, run(pipe, "sd15", blend))
    assert all(processors(pipe)[k] is before[k] for k in before)
    with pytest.raises(ValueError, match="differs from the enclosing"), install(pipe):
        install(pipe, backend="reference")


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3"])
def test_batched_cfg_branches(tiny_pipe, family):
    """Batched-CFG families: a cond-only recorder sees half the rows; uncond rows untouched by a cond edit."""
    pipe = tiny_pipe(family)
    rec = AttentionRecorder(branches={"cond"})
    run(pipe, family, rec)
    assert rec.maps and all(m.probs.shape[0] == 1 and m.branches == ("cond",) for m in rec.maps)
    every = AttentionRecorder()
    run(pipe, family, every)
    assert all(m.branches == ("uncond", "cond") for m in every.maps)


@pytest.mark.parametrize("family", ["wan", "flux"])
def test_separate_pass_branches(tiny_pipe, family):
    """Wan/FLUX run cond then uncond as separate passes at one timestep; the second is the uncond branch."""
    pipe = tiny_pipe(family)
    extra = {"true_cfg_scale": 2.0, "negative_prompt": "blue"} if family == "flux" else {}
    cond, uncond = AttentionRecorder(branches={"cond"}), AttentionRecorder(branches={"uncond"})
    run(pipe, family, cond, uncond, **extra)
    steps = zoo.call_kwargs(family)["num_inference_steps"]
    per_pass = len(cond.maps) // steps
    assert per_pass > 0 and len(uncond.maps) == len(cond.maps)
    assert {m.step for m in cond.maps} == set(range(steps))


@pytest.mark.parametrize("family", ALL)
def test_step_and_layer_selection(tiny_pipe, family):
    pipe = tiny_pipe(family)
    handle_sites = install(pipe)
    kind = handle_sites.sites[-1].kind
    last = max(s.layer for s in handle_sites.sites if s.kind == kind)
    handle_sites.remove()
    rec = AttentionRecorder(kinds={kind}, layers={last}, steps=(1, 2))
    run(pipe, family, rec)
    assert rec.maps
    assert {m.step for m in rec.maps} == {1}
    assert {(m.site.kind, m.site.layer) for m in rec.maps} == {(kind, last)}


def test_step_counter_restarts_each_run(tiny_pipe):
    pipe = tiny_pipe("sd15")
    rec = AttentionRecorder(kinds={"self"}, layers={0})
    with install(pipe, rec):
        for _ in range(2):
            pipe(**{**zoo.call_kwargs("sd15"), "output_type": "latent"})
    steps = zoo.call_kwargs("sd15")["num_inference_steps"]
    assert [m.step for m in rec.maps] == list(range(steps)) * 2


def _square_mask(grid=(64, 64), box=(16, 16, 48, 48)) -> torch.Tensor:
    mask = torch.zeros(grid)
    mask[box[0] : box[2], box[1] : box[3]] = 1
    return mask


@pytest.mark.parametrize("family", ["sd15", "sd3", "flux", "hunyuan_video"])
def test_hard_key_mask_zero_weight_and_fast_equals_reference(tiny_pipe, family):
    """Masked keys get exactly zero probability; the fast SDPA path equals the dense reference."""
    pipe = tiny_pipe(family)
    mask = _square_mask()
    rec = AttentionRecorder(mean_heads=False)
    run(pipe, family, KeyMask(mask=mask), rec)
    checked = 0
    for m in rec.maps:
        if m.site.kind == "cross":
            continue
        h, w = m.grid[-2:]
        hidden = torch.nn.functional.interpolate(mask[None, None], size=(h, w), mode="area")[0, 0] > 0.5
        image = m.probs[..., m.image_keys]
        weights = image.reshape(*image.shape[:-1], -1, h * w)[..., hidden.flatten()]
        assert weights.numel() and weights.abs().max() == 0
        visible = image.reshape(*image.shape[:-1], -1, h * w)[..., ~hidden.flatten()]
        assert visible.sum() > 0
        checked += 1
    assert checked
    fast = run(pipe, family, KeyMask(mask=mask))
    reference = run(pipe, family, KeyMask(mask=mask), backend="reference")
    assert (fast - reference).abs().max() <= 1e-4
    assert (fast - stock(pipe, family)).abs().max() > 1e-4


def test_soft_key_mask_scales_keys_to_zero_logit():
    """Soft mode (the paper's (1 - M) * K): a hidden key keeps logit 0, i.e. weight exp(0) / Z, not zero."""
    from attnedit.core.attention import attend
    from attnedit.core.families import AttentionCall, Site

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 16, 4) for _ in range(3))
    call = AttentionCall(Site("x", "self", 0, 2), "unet", 0, ("cond",), (4, 4), 16, 16, slice(0, 16), slice(0, 16), None, None, q.device, q.dtype)
    mask = torch.zeros(4, 4)
    mask[0, :2] = 1
    rec = AttentionRecorder(mean_heads=False)
    attend(q, k, v, None, call, [KeyMask(mask=mask, mode="soft"), rec], None)
    probs = rec.maps[0].probs
    scores = (q @ k.transpose(-1, -2)) / 2.0
    scores[..., :2] = 0.0
    assert torch.allclose(probs, scores.softmax(-1), atol=1e-6)


def test_two_key_masks_equal_their_union(tiny_pipe):
    pipe = tiny_pipe("sd15")
    a, b = _square_mask(box=(0, 0, 32, 32)), _square_mask(box=(32, 32, 64, 64))
    together = run(pipe, "sd15", KeyMask(mask=a), KeyMask(mask=b))
    union = run(pipe, "sd15", KeyMask(mask=torch.maximum(a, b)))
    assert (together - union).abs().max() <= 1e-6


def test_two_blends_equal_their_sequential_composition(tiny_pipe):
    """(1-u2)((1-u1)AV + u1 V) + u2 V = (1-(1-u1)(1-u2)) blend: two edits equal one in sequence."""
    pipe = tiny_pipe("sd3")
    heads = {0: (1, 2)}
    two = run(pipe, "sd3", HeadBlend(strength=0.3, heads=heads), HeadBlend(strength=0.5, heads=heads))
    one = run(pipe, "sd3", HeadBlend(strength=1 - 0.7 * 0.5, heads=heads))
    assert (two - one).abs().max() <= 1e-5


@pytest.mark.parametrize("family", ["sd15", "wan", "hunyuan_video"])
def test_composed_edits_fast_equals_reference(tiny_pipe, family):
    pipe = tiny_pipe(family)
    edits = (KeyMask(mask=_square_mask(), steps=(0, 1)), HeadBlend(strength=0.7, heads={0: (0,)}))
    fast = run(pipe, family, *edits)
    reference = run(pipe, family, *edits, backend="reference")
    assert (fast - reference).abs().max() <= 1e-4


def test_head_blend_only_touches_selected_heads():
    """A HeadBlend at u=1 makes the selected head output V; the other heads are unchanged."""
    from attnedit.core.attention import attend, dense_attention
    from attnedit.core.families import AttentionCall, Site

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 10, 4) for _ in range(3))
    site = Site("x", "self", 0, 3)
    call = AttentionCall(site, "unet", 0, ("uncond", "cond"), (2, 5), 10, 10, slice(0, 10), slice(0, 10), None, None, q.device, q.dtype)
    native = lambda q, k, v, mask: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out = attend(q, k, v, None, call, [HeadBlend(strength=1.0, heads={0: (1,)}, branches={"cond"})], native)
    plain, _ = dense_attention(q, k, v)
    assert torch.allclose(out[1, 1], v[1, 1], atol=1e-6)  # cond row, head 1 -> identity map
    assert torch.allclose(out[0], plain[0], atol=1e-5)  # uncond row untouched
    assert torch.allclose(out[1, [0, 2]], plain[1, [0, 2]], atol=1e-5)


def test_block_mask_paths_agree():
    from attnedit.core.attention import dense_attention
    from attnedit.core.block_sparse import block_sparse_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 50, 8) for _ in range(3))
    blocks = torch.tensor([[1, 0, 0, 1], [1, 1, 0, 0], [0, 1, 1, 0], [1, 0, 1, 1]], dtype=torch.bool)
    bm = BlockMask(blocks, 16, 50, 50)
    keep = torch.ones(1, 1, 1, 50, dtype=torch.bool)
    keep[..., 3] = False
    expected, probs = dense_attention(q, k, v, keep, bm)
    assert torch.allclose(block_sparse_attention(q, k, v, keep, bm), expected, atol=1e-5)
    assert probs[..., 16:32, 0:16].sum() > 0 and probs[..., 0:16, 16:48].abs().max() == 0
    assert bm.density == pytest.approx(9 / 16)


# --- bad input ----------------------------------------------------------------------------------------------------


def test_unknown_layer_is_a_clear_error(tiny_pipe):
    pipe = tiny_pipe("flux")
    with pytest.raises(ValueError, match=r"layer\(s\) \[7\].*layers 0\.\.1"):
        install(pipe, HeadBlend(layers={7}))
    assert all(not isinstance(p, EditProcessor) for p in processors(pipe).values())


def test_unknown_head_is_a_clear_error(tiny_pipe):
    pipe = tiny_pipe("sd3")
    with pytest.raises(ValueError, match=r"head\(s\) \[9\] of layer 0; it has heads 0\.\.3"):
        install(pipe, HeadBlend(heads={0: (9,)}))


def test_kind_the_family_lacks_is_a_clear_error(tiny_pipe):
    with pytest.raises(ValueError, match="has only"):
        install(tiny_pipe("flux"), AttentionRecorder(kinds={"cross"}))


def test_wrong_size_key_vector_is_a_clear_error(tiny_pipe):
    pipe = tiny_pipe("sd15")
    with pytest.raises(ValueError, match=r"expected \(1 or 2, \d+\) for \d+ keys"):
        run(pipe, "sd15", KeepKeys(keep=torch.ones(5, dtype=torch.bool), kinds={"self"}))


def test_mask_with_wrong_aspect_is_a_clear_error(tiny_pipe):
    with pytest.raises(ValueError, match="aspect ratio"):
        run(tiny_pipe("sd15"), "sd15", KeyMask(mask=torch.ones(64, 16)))


def test_mask_hiding_every_key_is_a_clear_error(tiny_pipe):
    with pytest.raises(ValueError, match="hide every key"):
        run(tiny_pipe("sd15"), "sd15", KeyMask(mask=torch.ones(64, 64)))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: HeadBlend(strength=1.5), "strength=1.5"),
        (lambda: HeadBlend(heads={}), "selects no head"),
        (lambda: KeyMask(mask=torch.ones(3)), r"mask= must be \(H, W\) or \(F, H, W\)"),
        (lambda: KeyMask(mask=torch.ones(4, 4), mode="medium"), "mode="),
        (lambda: AttentionRecorder(branches={"negative"}), "branches="),
        (lambda: AttentionRecorder(steps=(3, 1)), "steps="),
        (lambda: AttentionRecorder(kinds={"spatial"}), "kinds="),
    ],
)
def test_bad_edit_arguments(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_unsupported_model_and_backend_are_clear_errors(tiny_pipe):
    with pytest.raises(ValueError, match="Linear is not a denoiser attnedit supports; supported families: unet"):
        detect_family(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="backend='cudnn'"):
        install(tiny_pipe("sd15"), backend="cudnn")


def test_user_chosen_kernels_are_kept(tiny_pipe):
    """xformers enabled on a UNet module, or a dispatcher backend set on a DiT, survives install()."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    from attnedit.processors.projections import xformers_attention

    class XFormersAttnProcessor(AttnProcessor2_0):  # stands in for diffusers' class (its kernels need CUDA)
        pass

    pipe = tiny_pipe("sd15")
    module = zoo.denoiser(pipe).down_blocks[0].attentions[0].transformer_blocks[0].attn1
    original = module.processor
    module.set_processor(XFormersAttnProcessor())
    try:
        with install(pipe):
            assert module.processor.native is xformers_attention
    finally:
        module.set_processor(original)
    flux = tiny_pipe("flux")
    attn = zoo.denoiser(flux).transformer_blocks[0].attn
    attn.processor._attention_backend = "native"
    try:
        with install(flux):
            assert attn.processor._attention_backend == "native"
    finally:
        attn.processor._attention_backend = None
