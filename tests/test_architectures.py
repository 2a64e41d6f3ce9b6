"""Every family at its published widths: site tables at full depth (meta device) and real-width forwards.

Full depth: each published config is built on the meta device (no memory) and the sites the adapters find are
compared, module by module, with the architecture written out from the config (attnedit.models.architectures) and with
the counts stated in docs/families.md. Reduced depth: every width, head count, head dim and norm as published, 1-2
blocks of each kind, random weights on the CPU, one forward at a small latent size per check.
"""

from __future__ import annotations

import gc

import pytest
import torch

from attnedit.processors import EditProcessor
from attnedit import AttentionRecorder, HeadBlend, KeyMask, install
from attnedit.families import detect_family
from attnedit.families import get_family
from attnedit.methods.head_guidance import perturbed_guidance
from attnedit.methods.radial import PRESETS, RadialAttention, radial_block_mask
from attnedit.models.architectures import ARCHITECTURES, meta_denoiser

NAMES = list(ARCHITECTURES)

# What the real models have, counted by hand from the published architectures (docs/families.md, "Tested architectures").
SITE_COUNTS = {
    "sd15": {"self": 16, "cross": 16}, "sdxl-base": {"self": 70, "cross": 70},
    "sd3-medium": {"joint": 24}, "sd3.5-medium": {"joint": 24, "self": 13}, "flux1-dev": {"joint": 19 + 38},
    "flux1-kontext-dev": {"joint": 19 + 38}, "z-image-turbo": {"self": 2, "joint": 30},
    "wan2.1-t2v-1.3b": {"self": 30, "cross": 30}, "wan2.1-i2v-14b-480p": {"self": 40, "cross": 40},
    "wan2.2-t2v-a14b": {"self": 40, "cross": 40}, "wan2.2-ti2v-5b": {"self": 30, "cross": 30},
    "hunyuan-video": {"joint": 20 + 40}, "hunyuan-video-1.5-480p-t2v": {"joint": 54},
    "flux2-dev": {"joint": 8 + 48}, "flux2-klein-4b": {"joint": 5 + 20}, "flux2-klein-9b": {"joint": 8 + 24},
    "qwen-image": {"joint": 60}, "qwen-image-edit": {"joint": 60},
    "wan2.2-i2v-a14b": {"self": 40, "cross": 40}, "wan2.2-animate-14b": {"self": 40, "cross": 40},
    "wan2.1-vace-1.3b": {"self": 15 + 30, "cross": 15 + 30}, "wan2.1-vace-14b": {"self": 8 + 40, "cross": 8 + 40},
}
HEAD_LAYOUT = {  # (heads, head dims) of every site
    "sd15": ({8}, {40, 80, 160}), "sdxl-base": ({10, 20}, {64}), "sd3-medium": ({24}, {64}),
    "sd3.5-medium": ({24}, {64}), "flux1-dev": ({24}, {128}), "wan2.1-t2v-1.3b": ({12}, {128}),
    "flux1-kontext-dev": ({24}, {128}), "z-image-turbo": ({30}, {128}),
    "wan2.1-i2v-14b-480p": ({40}, {128}), "wan2.2-t2v-a14b": ({40}, {128}), "wan2.2-ti2v-5b": ({24}, {128}),
    "hunyuan-video": ({24}, {128}), "hunyuan-video-1.5-480p-t2v": ({16}, {128}),
    "flux2-dev": ({48}, {128}), "flux2-klein-4b": ({24}, {128}), "flux2-klein-9b": ({32}, {128}),
    "qwen-image": ({24}, {128}), "qwen-image-edit": ({24}, {128}),
    "wan2.2-i2v-a14b": ({40}, {128}), "wan2.2-animate-14b": ({40}, {128}), "wan2.1-vace-1.3b": ({12}, {128}),
    "wan2.1-vace-14b": ({40}, {128}),
}
# Too large for the reduced-depth CPU runs (fp32 at 1 block of each kind, against a ~3 GiB budget per test
# process; the others are 0.5-0.6 B parameters); FLUX.2 klein-4B runs the same classes and processors at its widths.
TOO_LARGE_TO_RUN = {"flux2-dev": "2.3 B parameters at 1+1 blocks (6144 wide, 15360-wide text)",
                    "flux2-klein-9b": "1.0 B parameters at 1+1 blocks (4096 wide)",
                    # VACE-1.3B runs the same classes; Animate's blocks are Wan 2.1 I2V-14B's at its widths (run as
                    # wan2.1-i2v-14b-480p), its face adapters and processor copy run in the tiny wan_animate pipeline
                    "wan2.1-vace-14b": "1.05 B parameters at 1 main + 1 control block (5120 wide)",
                    "wan2.2-animate-14b": "0.79 B parameters at 1 block + 1 face adapter (5120 wide), ~25 s a forward"}
# Attention modules that are deliberately not sites: HunyuanVideo's token refiner attends over text only.
NOT_SITES = {name: {f"context_embedder.token_refiner.refiner_blocks.{i}.attn" for i in range(2)}
             for name in ("hunyuan-video", "hunyuan-video-1.5-480p-t2v")}
# Wan Animate's face adapters: each latent frame's video tokens attend to that frame's face-motion tokens only
NOT_SITES["wan2.2-animate-14b"] = {f"face_adapter.{i}" for i in range(40 // 5)}
# Z-Image's context refiners attend over the caption alone
NOT_SITES["z-image-turbo"] = {f"context_refiner.{i}.attention" for i in range(2)}


# ------------------------------------------------------------------------------------------- full depth, meta
@pytest.mark.parametrize("name", NAMES)
def test_full_depth_sites_match_the_published_model(name):
    arch = ARCHITECTURES[name]
    model = arch.build("full", device="meta")
    assert type(model).__name__ == arch.model_class and detect_family(model).name == arch.family
    with install(model) as handle:
        found = [(s.name, s.kind, s.layer, s.heads, s.stream) for s in handle.sites]
        modules = dict(model.named_modules())
    assert found == [(s.name, s.kind, s.layer, s.heads, s.stream) for s in arch.expected_sites("full")]
    counts = {kind: sum(1 for s in handle.sites if s.kind == kind) for kind in {s.kind for s in handle.sites}}
    assert counts == SITE_COUNTS[name]
    heads, dims = HEAD_LAYOUT[name]
    assert {s.heads for s in handle.sites} == heads
    assert {_inner_dim(modules[s.name]) // s.heads for s in handle.sites} == dims
    every = {n for n, m in model.named_modules() if hasattr(m, "set_processor")}
    assert every - {s.name for s in handle.sites} == NOT_SITES.get(name, set())


def _inner_dim(attn) -> int:
    """Query width: ``to_q``'s, or the declared inner dim where q, k, v (and the MLP) share one fused projection."""
    return attn.to_q.out_features if hasattr(attn, "to_q") else attn.inner_dim


def test_numbering_is_what_the_readme_says():
    """FLUX/HunyuanVideo: one flat joint index over double then single blocks; SD3.5: attn2 is self; Wan: self/cross."""
    def by_layer(name, kind):
        with install(ARCHITECTURES[name].build("full", device="meta")) as handle:
            return {s.layer: s.name for s in handle.sites if s.kind == kind}

    flux = by_layer("flux1-dev", "joint")
    assert (flux[18], flux[19], flux[56]) == ("transformer_blocks.18.attn", "single_transformer_blocks.0.attn",
                                              "single_transformer_blocks.37.attn")
    hunyuan = by_layer("hunyuan-video", "joint")
    assert (hunyuan[19], hunyuan[20], hunyuan[59]) == ("transformer_blocks.19.attn", "single_transformer_blocks.0.attn",
                                                       "single_transformer_blocks.39.attn")
    sd35 = by_layer("sd3.5-medium", "self")
    assert sd35 == {i: f"transformer_blocks.{i}.attn2" for i in range(13)}
    wan_self, wan_cross = by_layer("wan2.1-t2v-1.3b", "self"), by_layer("wan2.1-t2v-1.3b", "cross")
    assert wan_self[29] == "blocks.29.attn1" and wan_cross[29] == "blocks.29.attn2"
    sd15 = by_layer("sd15", "self")
    assert sd15[0].startswith("down_blocks.0.") and sd15[6].startswith("mid_block.") and sd15[15].startswith("up_blocks.3.")


@pytest.mark.parametrize("name, size, expected", [
    # SD 1.5 at 512 px: the paper's five 16x16 layers; SDXL at 1024 px: its 64x64 (latent/2) layers
    ("sd15", (64, 64), {f"down_blocks.2.attentions.{a}.transformer_blocks.0" for a in range(2)}
     | {f"up_blocks.1.attentions.{a}.transformer_blocks.0" for a in range(3)}),
    ("sdxl-base", (128, 128), {f"down_blocks.1.attentions.{a}.transformer_blocks.{t}" for a in range(2) for t in range(2)}
     | {f"up_blocks.1.attentions.{a}.transformer_blocks.{t}" for a in range(3) for t in range(2)}),
])
def test_refocusing_picks_the_papers_maps_at_full_depth(name, size, expected):
    """Map selection probes one forward; on the meta device the full model runs it at native resolution for free."""
    from attnedit.methods.refocusing import RefocusConfig
    from attnedit.pipelines.refocusing import map_layers

    arch = ARCHITECTURES[name]
    model = arch.build("full", device="meta")
    kwargs = _to_meta(arch.inputs(model, size=size))
    x, _ = kwargs.pop("sample"), kwargs.pop("timestep")
    forward = lambda x, t: model(x, 500.0, **kwargs, return_dict=False)
    with install(model) as handle:
        text_kind, image_kind, text_layers, image_layers = map_layers(handle, forward, x, torch.tensor(500.0), RefocusConfig())
        blocks = lambda kind, layers: {s.name.rsplit(".", 1)[0] for s in handle.sites if s.kind == kind and s.layer in layers}
        assert (text_kind, image_kind) == ("cross", "self")
        assert blocks("cross", text_layers) == expected and blocks("self", image_layers) == expected


def _to_meta(obj):
    if torch.is_tensor(obj):
        return obj.to("meta")
    return {k: _to_meta(v) for k, v in obj.items()} if isinstance(obj, dict) else obj


def test_wan22_pipeline_has_two_denoisers_and_both_are_edited():
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    arch = ARCHITECTURES["wan2.2-t2v-a14b"]
    assert arch.denoisers == ("transformer", "transformer_2") and arch.pipeline_config["boundary_ratio"] == 0.875
    pipe = WanPipeline(None, None, None, FlowMatchEulerDiscreteScheduler(shift=12.0),
                       transformer=arch.build("full", device="meta"), transformer_2=arch.build("full", device="meta", seed=1),
                       boundary_ratio=0.875)
    with install(pipe, KeyMask(mask=torch.ones(4, 4))) as handle:
        assert handle.models == [pipe.transformer, pipe.transformer_2]
        for model in handle.models:
            assert sum(isinstance(m.processor, EditProcessor) for m in model.modules() if hasattr(m, "processor")) == 80
    assert not any(isinstance(m.processor, EditProcessor) for m in pipe.transformer_2.modules() if hasattr(m, "processor"))


def test_unknown_architectures_get_one_clear_error():
    from diffusers import CogVideoXTransformer3DModel

    with torch.device("meta"):
        model = CogVideoXTransformer3DModel()
    with pytest.raises(ValueError, match=r"CogVideoXTransformer3DModel is not a denoiser attnedit supports; "
                                         r"supported families: unet .*flux \(FluxTransformer2DModel\)"):
        install(model)
    with pytest.raises(ValueError, match="unknown architecture 'flux2'"):
        from attnedit.models.architectures import get_architecture

        get_architecture("flux2")


def test_meta_denoiser_reads_shipped_configs_by_name_or_hub_id():
    assert type(meta_denoiser("black-forest-labs/FLUX.1-dev")).__name__ == "FluxTransformer2DModel"
    assert list(meta_denoiser("sd3.5-medium").config.dual_attention_layers) == list(range(13))


# ------------------------------------------------------------------------------------ real widths, reduced depth
VIDEO = [n for n in NAMES if get_family(ARCHITECTURES[n].family).video and n not in TOO_LARGE_TO_RUN]


@pytest.fixture(scope="module", params=[n for n in NAMES if n not in TOO_LARGE_TO_RUN])
def reduced(request):
    """(architecture, model, inputs, stock output): one real-width model alive at a time."""
    arch = ARCHITECTURES[request.param]
    model = arch.build("reduced")
    inputs = arch.inputs(model)
    with torch.no_grad():
        stock = _rows(model(**inputs, return_dict=False)[0])
    yield arch, model, inputs, stock
    del model, inputs, stock
    gc.collect()


def _rows(sample):
    """The output as one tensor (Z-Image returns a list of per-row samples)."""
    return torch.stack(sample) if isinstance(sample, list) else sample


def _run(model, inputs, *edits, backend="auto"):
    with torch.no_grad(), install(model, *edits, backend=backend):
        return _rows(model(**inputs, return_dict=False)[0])


def _image_mask(arch, model, inputs) -> torch.Tensor:
    """A box over the top-left quarter of the image, at the latent resolution."""
    latent = inputs["sample"] if "sample" in inputs else inputs[detect_family(model).latent_key]
    if "img_ids" in inputs:  # packed latents (FLUX.1, FLUX.2): the grid from the ids' (row, column)
        ids = inputs["img_ids"].reshape(-1, inputs["img_ids"].shape[-1])
        h, w = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
    elif isinstance(latent, list) or latent.ndim == 3:  # other packed latents (Qwen-Image, Z-Image): the target
        # image's grid, as the family reads it
        h, w = detect_family(model).forward_info(model, (), inputs).grid[-2:]
    else:
        h, w = latent.shape[-2:]
    mask = torch.zeros(h, w)
    mask[: h // 2, : w // 2] = 1
    return mask


def test_reduced_depth_is_published_width_and_bit_identical_without_edits(reduced):
    arch, model, inputs, stock = reduced
    assert [(s.kind, s.heads) for s in arch.expected_sites("reduced")] == [
        (s.kind, s.heads) for s in detect_family(model).sites(model)]
    for key in ("attention_head_dim", "num_attention_heads", "joint_attention_dim", "text_dim", "qk_norm"):
        if key in arch.config:
            assert model.config[key] == arch.config[key]
    assert torch.equal(_run(model, inputs), stock)
    # an edit outside its step window costs nothing and changes nothing
    assert torch.equal(_run(model, inputs, KeyMask(mask=_image_mask(arch, model, inputs), steps=(5, 6))), stock)


def test_key_mask_gives_hidden_keys_exactly_zero_weight(reduced):
    arch, model, inputs, stock = reduced
    mask = _image_mask(arch, model, inputs)
    recorder = AttentionRecorder()
    masked = _run(model, inputs, KeyMask(mask=mask), recorder)
    assert not torch.allclose(masked, stock)
    assert recorder.maps, "the recorder saw no attention call"
    hidden_somewhere = False
    for record in recorder.maps:
        probs = record.probs.float()
        sums = probs.sum(-1)  # 1 per query; 0 where the model's own mask hides every key (padded text queries)
        assert bool(((sums - 1).abs() < 1e-4).logical_or(sums == 0).all()), record.site.name
        if record.site.kind == "cross":
            continue
        grid = record.grid[-2:]
        small = torch.nn.functional.interpolate(mask[None, None], size=grid, mode="area")[0, 0] > 0.5
        hidden = small.flatten().repeat(record.grid[0] if len(record.grid) == 3 else 1)
        image = probs[..., record.image_keys]
        assert torch.equal(image[..., hidden], torch.zeros_like(image[..., hidden])), record.site.name
        hidden_somewhere |= bool(hidden.any())
        if arch.family == "hunyuan_video" and record.text_keys is not None:  # padded text keys stay hidden
            assert torch.equal(probs[..., record.text_keys][..., -3:], torch.zeros_like(probs[..., :3]))
    assert hidden_somewhere
    fast, reference = _run(model, inputs, KeyMask(mask=mask)), _run(model, inputs, KeyMask(mask=mask), backend="reference")
    torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-4 * float(reference.abs().max()))


def test_soft_pag_guidance_equals_its_formula(reduced):
    """perturbed_guidance on the real head layout: eps_c + w (eps_c - eps_p), eps_p from the HeadBlend edit."""
    arch, model, inputs, stock = reduced
    kind = get_family(arch.family).perturbed_kind
    perturbed = _run(model, inputs, HeadBlend(strength=1.0, heads={0: (0, 1)}, kinds=frozenset({kind})))
    assert not torch.allclose(perturbed, stock)
    with torch.no_grad(), perturbed_guidance(model, heads="L0H0,L0H1", scale=2.0, cfg_scale=1.0):
        guided = _rows(model(**inputs, return_dict=False)[0])
    expected = stock + 2.0 * (stock - perturbed)
    torch.testing.assert_close(guided, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


@pytest.mark.parametrize("reduced", VIDEO, indirect=True)
def test_radial_attention_on_real_video_widths(reduced):
    arch, model, _inputs, _stock = reduced
    preset = PRESETS[get_family(arch.family).radial_preset(model)]  # the family's own preset for this denoiser
    size = (8, 8, 8)  # latent frames x h x w -> 8 frames of 16 tokens: one 16-token block per frame
    video = arch.inputs(model, size=size)
    edit = RadialAttention(decay=preset["decay"], sink=preset["sink"], block_size=16)
    assert radial_block_mask(8, 16, 16, preset["decay"], preset["sink"]).float().mean() < 0.9  # really sparse
    dense = _run(model, video)
    fast, reference = _run(model, video, edit), _run(model, video, edit, backend="reference")
    assert not torch.allclose(fast, dense)
    torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-4 * float(reference.abs().max()))


@pytest.mark.parametrize("reduced", ["wan2.2-t2v-a14b"], indirect=True)
def test_wan22_second_transformer_is_edited_at_real_width(reduced):
    arch, model, inputs, stock = reduced
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    second = arch.build("reduced", seed=1)
    pipe = WanPipeline(None, None, None, FlowMatchEulerDiscreteScheduler(shift=12.0), transformer=model,
                       transformer_2=second, boundary_ratio=arch.pipeline_config["boundary_ratio"])
    with torch.no_grad():
        stock_2 = second(**inputs, return_dict=False)[0]
        with install(pipe, KeyMask(mask=_image_mask(arch, model, inputs))):
            first_masked = model(**inputs, return_dict=False)[0]
            second_masked = second(**inputs, return_dict=False)[0]
        assert torch.equal(second(**inputs, return_dict=False)[0], stock_2)  # restored
    assert not torch.allclose(first_masked, stock) and not torch.allclose(second_masked, stock_2)
