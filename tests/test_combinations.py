"""What users combine attnedit with, each tested on the tiny zoo pipelines.

Wan 2.2's second transformer, accelerate offload hooks, torch.compile, a LoRA loaded with ``load_lora_weights``,
float16 / bfloat16, diffusers attention backends and a machine without xformers. Every test loads its own pipeline
when it changes one (dtype, hooks, LoRA, compile); the shared ``tiny_pipe`` ones are only used with ``install``,
which restores them, or with settings put back in ``finally``.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib
import importlib.abc
import sys
import types

import pytest
import torch

from attnedit import AttentionRecorder, HeadBlend, KeyMask, install
from attnedit.core.attention import dense_attention
from attnedit.core.edits import resize_mask
from attnedit.families import detect_family
from attnedit.methods.head_guidance import perturbed_guidance, soft_pag
from attnedit.methods.radial import RadialAttention
from attnedit.models import zoo
from attnedit.processors.edit_processor import EditProcessor
from attnedit.processors.projections import MASKING_BACKENDS, xformers_attention

pytestmark = pytest.mark.usefixtures("one_thread")


def latents(pipe, family: str, **overrides) -> torch.Tensor:
    kwargs = {**zoo.call_kwargs(family), "output_type": "latent", **overrides}
    return pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(0))[0]


def edited(pipe, family: str, *edits, backend: str = "auto", **overrides) -> torch.Tensor:
    with install(pipe, *edits, backend=backend):
        return latents(pipe, family, **overrides)


def left_half(size: int = 64) -> torch.Tensor:
    mask = torch.zeros(size, size)
    mask[:, : size // 2] = 1
    return mask


def captured(pipe, family: str, model: torch.nn.Module, **overrides) -> list[tuple[tuple, dict]]:
    """Every call (args, kwargs) of ``model`` during a pipeline run."""
    calls: list[tuple[tuple, dict]] = []
    hook = model.register_forward_pre_hook(lambda m, a, k: calls.append((a, dict(k))), with_kwargs=True)
    try:
        latents(pipe, family, **overrides)
    finally:
        hook.remove()
    return calls


def forward(model: torch.nn.Module, call: tuple[tuple, dict]) -> torch.Tensor:
    with torch.no_grad():
        return model(*call[0], **call[1])[0]


def processors_of(model: torch.nn.Module) -> dict:
    return dict(model.attn_processors)


def assert_restored(model: torch.nn.Module, before: dict) -> None:
    after = processors_of(model)
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert not any(isinstance(p, EditProcessor) for p in after.values())


# ---------------------------------------------------------------------------------------------------- Wan 2.2
@pytest.fixture(scope="module")
def wan22(zoo_dir):
    """Wan 2.2 A14B-style: transformer (t >= 875) then transformer_2; 2 steps at shift 7 are t = 1000, 46.8."""
    return zoo.load_tiny_pipeline("wan22", cache_dir=zoo_dir)


def _which_model_runs(pipe, **overrides) -> list[str]:
    order: list[str] = []
    hooks = [model.register_forward_pre_hook(lambda m, a, k, name=name: order.append(name), with_kwargs=True)
             for name, model in (("transformer", pipe.transformer), ("transformer_2", pipe.transformer_2))]
    try:
        latents(pipe, "wan22", **overrides)
    finally:
        for hook in hooks:
            hook.remove()
    return order


def test_wan22_zoo_pipeline_has_two_different_transformers(wan22):
    assert "wan22" not in zoo.FAMILIES and "wan22" in zoo.EXTRA_PIPELINES
    assert wan22.config.boundary_ratio == 0.875
    first, second = wan22.transformer.blocks[0].attn1.to_q.weight, wan22.transformer_2.blocks[0].attn1.to_q.weight
    assert first.shape == second.shape and not torch.equal(first, second)
    # cond + uncond pass per step; step 0 on the high-noise expert, step 1 on transformer_2
    assert _which_model_runs(wan22) == ["transformer"] * 2 + ["transformer_2"] * 2
    built = zoo.build_pipeline("wan22")  # what was saved is what loads back, second transformer included
    for name in ("transformer", "transformer_2"):
        loaded = getattr(wan22, name).state_dict()
        assert all(torch.equal(t, loaded[k]) for k, t in getattr(built, name).state_dict().items())


def test_wan22_install_covers_and_restores_both_transformers(wan22):
    models = (wan22.transformer, wan22.transformer_2)
    before = [processors_of(m) for m in models]
    stock = latents(wan22, "wan22")
    with install(wan22) as handle:
        assert handle.models == list(models)
        for model in models:
            assert all(isinstance(p, EditProcessor) for p in model.attn_processors.values())
            assert len(model._forward_pre_hooks) == 1
        assert torch.equal(latents(wan22, "wan22"), stock)
    for model, processors in zip(models, before):
        assert_restored(model, processors)
        assert not model._forward_pre_hooks


def test_wan22_steps_count_on_across_the_switch(wan22):
    """One RunState for both experts: 3 steps = t 1000, 876.5 (transformer), 46.8 (transformer_2) -> steps 0, 1, 2."""
    assert _which_model_runs(wan22, num_inference_steps=3) == ["transformer"] * 4 + ["transformer_2"] * 2
    rec = AttentionRecorder(kinds={"self"}, layers={0})
    with install(wan22, rec):
        for _ in range(2):  # a new run starts again at step 0
            latents(wan22, "wan22", num_inference_steps=3)
    expected = [(step, (branch,)) for step in range(3) for branch in ("cond", "uncond")]
    assert [(m.step, m.branches) for m in rec.maps] == expected * 2


def test_wan22_key_mask_acts_on_transformer_2(wan22):
    """A KeyMask limited to step 1 (transformer_2 only) hides its keys there, changes the video, fast == reference."""
    late = KeyMask(mask=left_half(), steps=(1, 2))
    rec = AttentionRecorder(kinds={"self"}, mean_heads=False)
    stock = latents(wan22, "wan22")
    edited(wan22, "wan22", late, rec)
    hidden = resize_mask(left_half(), (2, 2)).flatten().repeat(2)  # token grid (2 frames, 2, 2)
    by_step = collections.defaultdict(list)
    for m in rec.maps:
        assert m.grid == (2, 2, 2)
        by_step[m.step].append(m.probs[..., hidden])
    assert sorted(by_step) == [0, 1] and len(by_step[1]) == 4  # 2 layers x (cond, uncond) in transformer_2
    assert all(p.sum() > 0 for p in by_step[0]) and all(p.abs().max() == 0 for p in by_step[1])
    fast = edited(wan22, "wan22", late)
    assert (fast - stock).abs().max() > 1e-3
    assert (fast - edited(wan22, "wan22", late, backend="reference")).abs().max() <= 1e-4


def test_wan22_radial_attention_on_both_transformers(wan22):
    video = {"num_frames": 13, "height": 128, "width": 128}  # 4 latent frames of 8 x 8 tokens
    edit = RadialAttention(decay=0.5, block_size=16, sink=True)
    stock = latents(wan22, "wan22", **video)
    both = edited(wan22, "wan22", edit, **video)
    second_only = edited(wan22, "wan22", dataclasses.replace(edit, dense_steps=1), **video)
    reference = edited(wan22, "wan22", edit, backend="reference", **video)
    assert (both - reference).abs().max() < 2e-5  # block-sparse == dense masked reference, in both experts
    # step 1 (transformer_2) ran sparse; the last step moves the latent by only sigma = 0.047 x the prediction
    assert (second_only - stock).abs().max() > 5e-4
    assert (both - second_only).abs().max() > 1e-2  # step 0: transformer ran sparse
    assert torch.equal(edited(wan22, "wan22", dataclasses.replace(edit, dense_steps=2), **video), stock)


def _perturbed_rows(pipe, heads: str, **guidance) -> dict[str, list[int]]:
    """Batch sizes seen by each transformer's blocks.1.attn1 during a run under perturbed_guidance."""
    seen: dict[str, list[int]] = {"transformer": [], "transformer_2": []}
    hooks = []
    for name, rows in seen.items():
        attn = getattr(pipe, name).blocks[1].attn1
        hooks.append(attn.register_forward_pre_hook(
            lambda m, a, k, rows=rows: rows.append((a[0] if a else k["hidden_states"]).shape[0]), with_kwargs=True
        ))
    try:
        with perturbed_guidance(pipe, heads, **guidance):
            latents(pipe, "wan22")
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def test_wan22_perturbed_guidance_runs_in_both_transformers(wan22):
    # the perturbed branch runs in both experts: (cond + perturbed) rows, then uncond, per step
    assert _perturbed_rows(wan22, "L1H0", scale=2.0) == {"transformer": [2, 1], "transformer_2": [2, 1]}


@pytest.mark.parametrize("wrapped", [False, True], ids=["eager", "compile-wrapped"])
def test_wan22_perturbed_guidance_uses_guidance_scale_2_on_transformer_2(wan22, wrapped):
    """eps = eps_u + w2 (eps_c - eps_u) + w_pag (eps_c - eps_p) on transformer_2, also when the pipeline holds it as
    ``torch.compile(transformer_2)`` (the wrapper is never called here, so nothing compiles)."""
    kwargs = zoo.call_kwargs("wan22")
    w1, w2 = kwargs["guidance_scale"], kwargs["guidance_scale_2"]
    assert w1 != w2
    heads, scale, strength = "L1H0,0:1", 2.5, 0.7
    t2 = wan22.transformer_2
    cond, uncond = captured(wan22, "wan22", t2)  # step 1; the run leaves guidance_scale_2 on the pipeline
    assert wan22._guidance_scale == w1 and wan22._guidance_scale_2 == w2
    eps_c, eps_u = forward(t2, cond), forward(t2, uncond)
    with install(t2, soft_pag(t2, heads, strength=strength)):
        eps_p = forward(t2, cond)
    if wrapped:
        wan22.transformer_2 = torch.compile(t2)
    try:
        with perturbed_guidance(wan22, heads, scale=scale, strength=strength):
            g_c, g_u = forward(t2, cond), forward(t2, uncond)
    finally:
        wan22.transformer_2 = t2
    torch.testing.assert_close(g_u, eps_u)
    final = g_u + w2 * (g_c - g_u)  # WanPipeline's guidance line for transformer_2
    expected = eps_u + w2 * (eps_c - eps_u) + scale * (eps_c - eps_p)
    torch.testing.assert_close(final, expected, atol=1e-4, rtol=1e-4)


def test_denoisers_with_different_sites_are_a_clear_error(wan22):
    from diffusers import WanTransformer3DModel

    two = wan22.transformer_2
    one = WanTransformer3DModel.from_config(two.config, num_layers=1)
    pipe = types.SimpleNamespace(components={}, transformer=one, transformer_2=two)  # what install() reads
    with pytest.raises(ValueError, match="different attention sites"):
        install(pipe)
    assert not any(isinstance(p, EditProcessor) for m in (one, two) for p in m.attn_processors.values())


# ------------------------------------------------------------------------------------------ accelerate hooks
def _model_offload(pipe):
    pipe.enable_model_cpu_offload(device="cpu")  # diffusers' own CpuOffload hooks, pointed at the CPU


def _sequential_offload(pipe):
    import accelerate

    # enable_sequential_cpu_offload's per-module AlignDevicesHooks on the denoiser: weights live on "meta" and
    # are streamed in for each module call
    accelerate.cpu_offload(zoo.denoiser(pipe), execution_device=torch.device("cpu"))


@pytest.mark.parametrize("family, offload", [("sd15", _model_offload), ("sd15", _sequential_offload),
                                             ("flux", _sequential_offload)], ids=["sd15-model", "sd15-sequential",
                                                                                  "flux-sequential"])
def test_accelerate_offload_hooks(family, offload, zoo_dir):
    pipe = zoo.load_tiny_pipeline(family, cache_dir=zoo_dir)
    plain = latents(pipe, family)
    offload(pipe)
    model = zoo.denoiser(pipe)
    hook, before = model._hf_hook, processors_of(model)
    if offload is _sequential_offload:
        assert next(model.parameters()).device.type == "meta"
    hooked = latents(pipe, family)
    assert torch.equal(hooked, plain)
    with install(pipe):
        assert torch.equal(latents(pipe, family), hooked)
    changed = edited(pipe, family, KeyMask(mask=left_half()), HeadBlend(strength=0.5))
    assert (changed - hooked).abs().max() > 1e-3
    assert_restored(model, before)
    # accelerate's hook still wraps forward (diffusers re-adds model offload hooks after every call: same kind)
    assert type(model._hf_hook) is type(hook) and hasattr(model, "_old_forward")
    assert torch.equal(latents(pipe, family), hooked)


# --------------------------------------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("how", ["wrapped", "in_place"])
def test_torch_compile(how, zoo_dir):
    """``pipe.transformer = torch.compile(...)`` (an OptimizedModule) and ``model.compile()``: same as eager."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    pipe = zoo.load_tiny_pipeline("wan", cache_dir=zoo_dir)
    model, one_step = pipe.transformer, {"num_inference_steps": 1}
    edit = KeyMask(mask=left_half())
    stock = latents(pipe, "wan", **one_step)
    eager = edited(pipe, "wan", edit, **one_step)
    assert (eager - stock).abs().max() > 1e-2
    before = processors_of(model)
    if how == "wrapped":
        pipe.transformer = torch.compile(model)
        assert type(pipe.transformer).__name__ == "OptimizedModule"
        assert detect_family(pipe.transformer).name == "wan"
    else:
        model.compile()
    graphs = counters["stats"]["unique_graphs"]
    try:
        with install(pipe, edit) as handle:
            assert handle.models == [model] and handle.family.name == "wan"
            compiled = latents(pipe, "wan", **one_step)
        assert counters["stats"]["unique_graphs"] > graphs  # it really ran compiled
        torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
        assert_restored(model, before)
        assert not model._forward_pre_hooks
        # the compiled model notices the restored processors (no stale graph with the edit in it)
        torch.testing.assert_close(latents(pipe, "wan", **one_step), stock, atol=1e-5, rtol=1e-5)
    finally:
        torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------------- LoRA
def test_lora_loaded_with_load_lora_weights(tmp_path, zoo_dir):
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    source = zoo.load_tiny_pipeline("sd15", cache_dir=zoo_dir)
    source.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                       init_lora_weights=False))
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(source.unet))
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=layers)

    pipe = zoo.load_tiny_pipeline("sd15", cache_dir=zoo_dir)
    plain = latents(pipe, "sd15")
    pipe.load_lora_weights(tmp_path)
    lora = latents(pipe, "sd15")
    assert (lora - plain).abs().max() > 1e-2  # the LoRA is really loaded
    with install(pipe):
        assert torch.equal(latents(pipe, "sd15"), lora)
    edits = (KeyMask(mask=left_half()), HeadBlend(strength=0.5, heads={0: (1,)}))
    fast = edited(pipe, "sd15", *edits)
    assert (fast - lora).abs().max() > 1e-2
    assert (fast - edited(pipe, "sd15", *edits, backend="reference")).abs().max() <= 1e-4
    pipe.disable_lora()
    assert (edited(pipe, "sd15", *edits) - fast).abs().max() > 1e-2  # the edit processors project through the LoRA


# ----------------------------------------------------------------------------------------- float16 / bfloat16
# Tolerance of fast vs reference for one denoiser call: about 4 units in the last place at 1.0 (the two paths round
# differently once per attention call; the reference computes in float32 and casts back).
HALF_TOL = {torch.float16: 4e-3, torch.bfloat16: 3.2e-2}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("family", ["sd15", "wan"])
def test_half_precision(family, dtype, zoo_dir):
    pipe = zoo.load_tiny_pipeline(family, cache_dir=zoo_dir).to(dtype)
    stock = latents(pipe, family)
    assert stock.dtype == dtype and torch.isfinite(stock).all()
    with install(pipe):
        assert torch.equal(latents(pipe, family), stock)
    model = zoo.denoiser(pipe)
    call = captured(pipe, family, model, num_inference_steps=1)[0]
    edits = (KeyMask(mask=left_half()), HeadBlend(strength=0.5))
    plain = forward(model, call)
    with install(model, *edits):
        fast = forward(model, call)
    with install(model, *edits, backend="reference"):
        reference = forward(model, call)
    assert fast.dtype == reference.dtype == dtype
    tol = HALF_TOL[dtype]
    torch.testing.assert_close(fast, reference, atol=tol, rtol=tol)
    assert (fast - plain).abs().max() > 4 * tol


def test_half_precision_reference_does_not_overflow():
    """float16 QK^T beyond 65504 is inf; the dense reference computes scores in float32 and returns float16."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 16, 8).half() for _ in range(3))
    q, k = q * 100, k * 100
    assert not torch.isfinite(q @ k.transpose(-1, -2)).all()
    out, probs = dense_attention(q, k, v)
    assert out.dtype == probs.dtype == torch.float16
    expected, expected_probs = dense_attention(q.float(), k.float(), v.float())
    torch.testing.assert_close(out, expected.half(), atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(probs, expected_probs.half(), atol=2e-3, rtol=2e-3)


# ----------------------------------------------------------------------------------- diffusers attention backends
# The dispatcher backends that run on a CPU (the flash/sage/xformers kernels need CUDA or packages; "_native_efficient"
# and "_native_cudnn" find no CPU kernel). HunyuanVideo passes a text padding mask, which "_native_flash" rejects
# in the stock model too.
CPU_BACKENDS = [
    (f, b) for f in ("flux", "wan", "hunyuan_video") for b in ("native", "_native_math", "_native_flash", "flex")
    if (f, b) != ("hunyuan_video", "_native_flash")
]


def _counting(fn, name: str, calls: collections.Counter):
    def counted(*args, **kwargs):
        calls[name] += 1
        return fn(*args, **kwargs)

    return counted


@pytest.mark.parametrize("family, backend", CPU_BACKENDS)
def test_attention_backend_is_kept(tiny_pipe, family, backend, monkeypatch):
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    pipe = tiny_pipe(family)
    model, name = zoo.denoiser(pipe), AttentionBackendName(backend)
    calls: collections.Counter = collections.Counter()
    registry = _AttentionBackendRegistry._backends
    for spied in {name, AttentionBackendName.NATIVE}:  # count the calls each kernel gets
        monkeypatch.setitem(registry, spied, _counting(registry[spied], spied.value, calls))
    active = _AttentionBackendRegistry._active_backend
    model.set_attention_backend(backend)  # also sets diffusers' global active backend
    try:
        stock = latents(pipe, family)
        stock_calls, _ = dict(calls), calls.clear()
        assert stock_calls.get(backend, 0) > 0
        with install(pipe):
            edit_processors = [p for p in model.attn_processors.values() if isinstance(p, EditProcessor)]
            assert edit_processors and {p._attention_backend for p in edit_processors} == {name}
            assert torch.equal(latents(pipe, family), stock)
        assert dict(calls) == stock_calls  # no edit: the user's kernel, every call
        mask = KeyMask(mask=left_half())
        calls.clear()
        fast = edited(pipe, family, mask)
        if backend in MASKING_BACKENDS:
            assert dict(calls) == stock_calls  # the user's kernel applies the key mask
        else:  # a kernel without masks: the masked calls (every one in FLUX) fall back to diffusers' native SDPA
            assert calls["native"] > 0 and calls["native"] + calls[backend] == sum(stock_calls.values())
        assert (fast - stock).abs().max() > 1e-3
        assert (fast - edited(pipe, family, mask, backend="reference")).abs().max() <= 1e-4
        calls.clear()
        edited(pipe, family, HeadBlend(strength=0.5))  # blends leave the mask alone: the user's kernel
        assert dict(calls) == stock_calls
    finally:
        model.reset_attention_backend()
        _AttentionBackendRegistry.set_active_backend(active)
    assert all(getattr(p, "_attention_backend", None) is None for p in model.attn_processors.values())


def test_global_attention_backend_without_masks_with_a_key_mask(tiny_pipe):
    """diffusers' ``attention_backend(...)`` context (no per-processor backend): key-masked calls still run."""
    from diffusers.models.attention_dispatch import attention_backend

    pipe, mask = tiny_pipe("wan"), KeyMask(mask=left_half())
    with attention_backend("_native_flash"):
        stock = latents(pipe, "wan")
        with install(pipe):
            assert torch.equal(latents(pipe, "wan"), stock)
        fast = edited(pipe, "wan", mask)
        reference = edited(pipe, "wan", mask, backend="reference")
    assert (fast - stock).abs().max() > 1e-3 and (fast - reference).abs().max() <= 1e-4


# ------------------------------------------------------------------------------------------- without xformers
class _NoXformers(importlib.abc.MetaPathFinder):
    """Makes ``import xformers`` fail as on a machine without it, and records every attempt."""

    def __init__(self) -> None:
        self.attempts: list[str] = []

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "xformers":
            self.attempts.append(name)
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


@pytest.mark.parametrize("family", ["sd15", "wan"])
def test_without_xformers(tiny_pipe, family, monkeypatch):
    import diffusers.models.attention_dispatch as dispatch
    from diffusers.utils import import_utils

    for module in [m for m in sys.modules if m.split(".")[0] == "xformers"]:
        monkeypatch.delitem(sys.modules, module)
    finder = _NoXformers()
    monkeypatch.setattr(sys, "meta_path", [finder, *sys.meta_path])
    monkeypatch.setattr(import_utils, "_xformers_available", False)
    monkeypatch.setattr(dispatch, "_CAN_USE_XFORMERS_ATTN", False)
    pipe = tiny_pipe(family)
    with pytest.raises(ImportError):
        importlib.import_module("xformers")  # the simulation holds
    assert finder.attempts == ["xformers"]
    finder.attempts.clear()
    if family == "sd15":
        with pytest.raises(ImportError):  # diffusers' own answer; the processors stay as they were
            pipe.enable_xformers_memory_efficient_attention()
    stock = latents(pipe, family)
    edits = (KeyMask(mask=left_half()), HeadBlend(strength=0.5))
    with install(pipe, *edits, backend="auto"):
        for processor in zoo.denoiser(pipe).attn_processors.values():
            assert isinstance(processor, EditProcessor)
            kernels = (getattr(processor, "native", None), getattr(processor, "masked", None))  # projection halves
            assert xformers_attention not in kernels
        out = latents(pipe, family)
    assert (out - stock).abs().max() > 1e-3
    assert finder.attempts == []  # nothing tried to import xformers
    assert torch.equal(latents(pipe, family), stock)
