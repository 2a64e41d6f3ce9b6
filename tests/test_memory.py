"""Memory plans, quantization and LoRAs in load_pipeline (attnedit.surfaces.memory / quantize), and a hub id
loaded offline from a hub-layout cache through the CLI.

On the CPU every plan that diffusers can run without an accelerator runs through diffusers' real calls and must give
the images of no plan, with an edit installed; ``auto`` is checked against the published configs at given free
memory; plans and backends a CPU cannot do are one clear ValueError.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from attnedit import KeyMask, install
from attnedit.models import zoo
from attnedit.surfaces.cli import main as cli_main
from attnedit.surfaces.loading import load_pipeline
from attnedit.surfaces.memory import GiB, MemoryPlan, choose_plan, component_sizes, is_video
from attnedit.surfaces.quantize import parse_lora

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
FLUX, WAN14B, HUNYUAN = ("black-forest-labs/FLUX.1-dev", "Wan-AI/Wan2.1-T2V-14B-Diffusers",
                         "hunyuanvideo-community/HunyuanVideo")
# (model, free GiB, quantize) -> plan: the table in docs/real-models.md
AUTO_TABLE = {
    (FLUX, 24, None): "group-offload", (FLUX, 48, None): "none", (FLUX, 80, None): "none",
    (FLUX, 24, "int8"): "none",
    (WAN14B, 24, None): "group-offload", (WAN14B, 48, None): "none", (WAN14B, 80, None): "none",
    (WAN14B, 24, "int8"): "model-offload",
    (HUNYUAN, 24, None): "group-offload", (HUNYUAN, 48, None): "model-offload", (HUNYUAN, 80, None): "none",
    (HUNYUAN, 24, "int8"): "model-offload",
}


def auto(model: str, free_gib: float, quantize: str | None = None, kind: str = "cuda") -> MemoryPlan:
    components, pipeline_class = component_sizes(model)
    fraction = {"int8": 0.5}.get(quantize or "", 1.0)
    quantized = {k: fraction for k in components if k != "vae"}
    return choose_plan(components, int(free_gib * GiB), kind, video=is_video(pipeline_class), quantized=quantized)


@pytest.mark.parametrize("key", list(AUTO_TABLE), ids=lambda k: f"{k[0].split('/')[1]}-{k[1]}GiB-{k[2] or 'bf16'}")
def test_auto_picks_the_fastest_plan_that_fits(key):
    model, free, quantize = key
    plan = auto(model, free, quantize)
    assert plan.offload == AUTO_TABLE[key], plan.reason
    assert plan.reason.startswith(plan.offload) and f"{free:.1f} GiB free on cuda" in plan.reason
    assert plan.vae_tiling == (model != FLUX or plan.offload != "none")  # video, or any offloading


def test_auto_sizes_come_from_the_configs():
    components, pipeline_class = component_sizes(FLUX)
    assert pipeline_class == "FluxPipeline" and set(components) == {"transformer", "text_encoder", "text_encoder_2",
                                                                    "vae"}
    assert 11.8e9 < components["transformer"].params < 12.0e9  # FLUX.1-dev's 12 B transformer, built on meta
    assert 0 < components["transformer"].largest_block < components["transformer"].params / 19
    wan22, _ = component_sizes("Wan-AI/Wan2.2-T2V-A14B-Diffusers")
    assert wan22["transformer"] == wan22["transformer_2"]  # both of Wan 2.2's denoisers are counted
    assert auto(FLUX, 0.5).offload == "sequential-offload" and "may still not fit" in auto(FLUX, 0.5).reason
    assert auto(FLUX, 24, kind="mps").offload == "sequential-offload"  # no CUDA streams: no group offload
    assert auto(FLUX, 1000, kind="cpu").offload == "none"


def _images(pipe, family: str = "flux") -> torch.Tensor:
    return torch.as_tensor(pipe(**zoo.call_kwargs(family), generator=torch.Generator().manual_seed(0)).images)


def _mask() -> torch.Tensor:
    mask = torch.zeros(64, 64)
    mask[:, :32] = 1
    return mask


def test_plans_that_run_on_a_cpu_give_the_images_of_no_plan():
    plain = load_pipeline("tiny:flux", "cpu", memory="none")
    expected, masked = _images(plain), None
    with install(plain, KeyMask(mask=_mask())):
        masked = _images(plain)
    assert not torch.equal(masked, expected)
    for memory in ("auto", "model-offload", "group-offload"):
        pipe = load_pipeline("tiny:flux", "cpu", memory=memory)
        if memory == "group-offload":
            assert pipe.transformer._diffusers_hook.get_hook("group_offloading") is not None
            assert pipe.vae.use_tiling and pipe.vae.use_slicing
        assert torch.equal(_images(pipe), expected), memory
        with install(pipe, KeyMask(mask=_mask())):
            assert torch.equal(_images(pipe), masked), memory


@pytest.mark.parametrize("kwargs, message", [
    ({"memory": "fast"}, "memory='fast'; valid: auto, none"),
    ({"memory": "sequential-offload"}, "needs an accelerator"),
    ({"memory": MemoryPlan("group-offload", use_stream=True)}, "needs CUDA streams"),
    ({"quantize": "bnb-4bit"}, "bitsandbytes needs a CUDA device"),
    ({"quantize": "fp8"}, "compute capability 8.9"),
    ({"quantize": "int4"}, "quantize='int4'; valid: int8"),
    ({"quantize": "missing.gguf"}, "no such GGUF file"),
    ({"lora": ["no/such-lora:0.5"]}, "lora='no/such-lora': cannot load it"),
], ids=["name", "sequential-cpu", "stream-cpu", "bnb-cpu", "fp8-cpu", "quantize-name", "gguf-file", "lora"])
def test_what_cannot_run_is_one_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_pipeline("tiny:flux", "cpu", **kwargs)


def test_parse_lora():
    assert parse_lora("org/name") == ("org/name", 1.0)
    assert parse_lora("dir/x.safetensors:0.7") == ("dir/x.safetensors", 0.7)
    assert parse_lora("C:/loras/x.safetensors") == ("C:/loras/x.safetensors", 1.0)
    with pytest.raises(ValueError, match="lora=''"):
        parse_lora("")


@pytest.fixture(scope="module")
def saved_flux(tmp_path_factory):
    return zoo.save_tiny_pipeline("flux", tmp_path_factory.mktemp("saved"))


def test_torchao_int8_weight_only_with_an_edit(saved_flux):
    pytest.importorskip("torchao")
    plain = load_pipeline(str(saved_flux), "cpu", memory="none")
    plain.set_progress_bar_config(disable=True)
    pipe = load_pipeline(str(saved_flux), "cpu", memory="none", quantize="int8")
    pipe.set_progress_bar_config(disable=True)
    for module in (pipe.transformer.transformer_blocks[0].attn.to_q, pipe.text_encoder_2.encoder.block[0].layer[0].SelfAttention.q):
        assert "Int8" in type(module.weight).__name__  # denoiser and T5 quantized through diffusers / transformers
    expected, quantized = _images(plain), _images(pipe)
    assert 0 < (quantized - expected).abs().max() < 0.05  # int8 weights: close to, not equal to, float32
    with install(pipe, KeyMask(mask=_mask())):
        masked = _images(pipe)
    with install(pipe, KeyMask(mask=_mask()), backend="reference"):
        reference = _images(pipe)
    assert (masked - quantized).abs().max() > 2e-3  # the edit acts on the quantized model
    assert (masked - reference).abs().max() < 1e-3


def test_loras_load_scale_and_keep_edits(saved_flux, tmp_path):
    from diffusers import FluxPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    source = zoo.build_pipeline("flux")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        source.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                                  target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(source.transformer))
    FluxPipeline.save_lora_weights(tmp_path, transformer_lora_layers=layers)
    lora_file = tmp_path / "pytorch_lora_weights.safetensors"
    plain = _images(load_pipeline("tiny:flux", "cpu", memory="none"))
    full = load_pipeline("tiny:flux", "cpu", memory="none", lora=[str(lora_file)])
    half = load_pipeline("tiny:flux", "cpu", memory="group-offload", lora=[f"{lora_file}:0.5", f"{lora_file}:0"])
    assert full.get_active_adapters() == ["lora0"] and half.get_active_adapters() == ["lora0", "lora1"]
    with_lora, with_half = _images(full), _images(half)
    assert (with_lora - plain).abs().max() > 1e-2 and (with_half - plain).abs().max() > 1e-3
    assert (with_lora - with_half).abs().max() > 1e-3  # the scale is applied
    with install(full, KeyMask(mask=_mask())):
        masked = _images(full)
    assert (masked - with_lora).abs().max() > 1e-2  # the edit still applies on top of the LoRA


# ------------------------------------------------------------------------------------- a hub id, offline
def _hub_cache(root: Path, repo: str, family: str) -> Path:
    """A hub-layout cache (models--org--name/snapshots/<hash>, refs/main) holding the tiny ``family`` as fp16
    variant files under ``repo``."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    folder = root / "hub" / ("models--" + repo.replace("/", "--"))
    with zoo.quiet_progress_bars():
        zoo.build_pipeline(family).to(torch.float16).save_pretrained(folder / "snapshots" / revision, variant="fp16")
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(revision)
    return root / "hub"


def test_hub_id_loads_offline_from_a_hub_layout_cache_through_the_cli(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    repo = "stabilityai/stable-diffusion-3.5-medium"
    hub = _hub_cache(tmp_path, repo, "sd3")
    for name, value in {"HF_HOME": tmp_path, "HF_HUB_CACHE": hub, "HF_HUB_OFFLINE": "1"}.items():
        monkeypatch.setenv(name, str(value))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))  # read when the hub library imports
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "cat.png"
    args = ["generate", "a red cat", "--model", repo, "--variant", "fp16", "--dtype", "float32", "--device", "cpu",
            "--memory", "group-offload", "--steps", "2", "--width", "64", "--height", "64", "--out", str(out)]
    assert cli_main(args) == 0, capsys.readouterr().err[-3000:]
    assert out.is_file() and capsys.readouterr().out.strip().endswith(str(out))
    sizes, pipeline_class = component_sizes.__wrapped__(repo)  # the cached snapshot's configs, not the table
    assert pipeline_class == "StableDiffusion3Pipeline" and sizes["transformer"].params < 1e6
    assert cli_main([*args[:4], "--variant", "bf16", "--device", "cpu", "--out", str(out)]) == 2  # no such files
    assert "bf16" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # a bad plan name: argparse's one-line error, exit code 2
        cli_main([*args[:4], "--memory", "warp"])
    assert exit_info.value.code == 2


def test_batch_jobs_carry_their_loading_options(tmp_path):
    from attnedit.surfaces.batch import parse_jobs, run_batch

    jobs = parse_jobs([
        {"task": "generate", "id": "a", "prompt": "a cat", "memory": "group-offload", "lora": "x.safetensors:0.5"},
        {"task": "generate", "id": "b", "prompt": "a dog", "memory": "group-offload", "lora": ["x.safetensors:0.5"]},
        {"task": "generate", "id": "c", "prompt": "a cow"},
    ])
    assert jobs[0].load == {"memory": "group-offload", "lora": ["x.safetensors:0.5"]} == jobs[1].load
    assert "memory" not in jobs[0].params and jobs[0].record()["memory"] == "group-offload"
    calls = []

    def load(model, **options):
        calls.append((model, options))
        raise OSError("not loaded in this test")

    summary = run_batch(jobs, tmp_path, load, default_model="tiny:sd3", progress=False)
    assert sorted(summary.failed) == ["a", "b", "c"]  # one load per (model, options): a and b share theirs
    assert calls == [("tiny:sd3", {"lora": ("x.safetensors:0.5",), "memory": "group-offload"}), ("tiny:sd3", {})]
    for field, value, message in (("memory", "fast", "memory='fast'"), ("quantize", "int3", "quantize='int3'"),
                                  ("lora", 3, "lora=3")):
        with pytest.raises(ValueError, match=re.escape(message)):
            parse_jobs([{"task": "generate", "prompt": "a cat", field: value}])


def test_resolve_memory_reads_the_device_and_the_quantization(monkeypatch):
    from attnedit.surfaces import memory

    monkeypatch.setattr(memory, "device_free_bytes", lambda device: 24 * GiB)
    assert memory.resolve_memory("auto", FLUX, "cuda:0").offload == "group-offload"
    plan = memory.resolve_memory("auto", FLUX, "cuda:0", quantize="int8")
    assert plan.offload == "none" and "all components 15.8 GiB" in plan.reason  # half the bytes, the VAE aside
    assert memory.resolve_memory("auto", FLUX, "cpu").offload == "none"
    assert memory.resolve_memory("auto", WAN14B, "cpu").vae_tiling  # video: the VAE is tiled even on a CPU
    assert memory.resolve_memory("model-offload", FLUX, "cuda").reason == ""  # a named plan is taken as is
    monkeypatch.setattr(memory, "device_free_bytes", lambda device: None)
    assert "cannot tell the free memory" in memory.resolve_memory("auto", FLUX, "xpu").reason
