"""Memory plans: where a pipeline's weights live while it runs, and ``auto``, which picks the fastest plan that fits.

A plan is one of diffusers' own placements, fastest first:

* ``none``: every component on the device (``pipe.to(device)``);
* ``model-offload``: components wait in host memory and move to the device one whole model at a time
  (``enable_model_cpu_offload``): the largest component must fit;
* ``group-offload``: the denoiser and text encoders move one block at a time, the next block prefetched on a CUDA
  stream while the current one runs (``enable_group_offload``, block level);
* ``sequential-offload``: one leaf module at a time (``enable_sequential_cpu_offload``): least memory, slowest.

``auto`` knows each component's bytes before anything is loaded (the denoiser from its config, built on the meta
device; text encoders and VAEs from their configs when the checkpoint is on disk, else from
:data:`KNOWN_COMPONENTS`) and the device's free memory, and says in one line what it chose and why. The decision
itself is the pure function :func:`choose_plan`. Video pipelines, and every offloading plan, also tile the VAE.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Any

__all__ = ["PLANS", "ComponentSize", "MemoryPlan", "apply_plan", "choose_plan", "component_sizes", "device_free_bytes",
           "parse_memory", "resolve_memory"]

PLANS: tuple[str, ...] = ("auto", "none", "model-offload", "group-offload", "sequential-offload")
GiB = 2**30
# Activations, attention workspace and the VAE decode at the models' usual sizes (FLUX 1024 px; Wan 720p x 81
# frames, HunyuanVideo 720p x 129 frames: about 3 GiB of FFN activations per block plus a tiled decode).
WORKSPACE = {"image": 3 * GiB, "video": 8 * GiB}
DENOISERS = ("transformer", "transformer_2", "unet")
# Bytes a quantized component keeps of its 16-bit size (4-bit: 4.5 bits per weight with its scales).
MARGIN = 0.05  # of the free memory, kept for the allocator's fragmentation and the CUDA context
QUANTIZED_FRACTION = {"int8": 0.5, "fp8": 0.5, "bnb-8bit": 0.5, "bnb-4bit": 0.28, "gguf": 0.53}


@dataclass(frozen=True)
class ComponentSize:
    """Parameters of one component: in all, in its largest repeated block, and outside its block lists."""

    params: int
    largest_block: int = 0
    outside_blocks: int = -1  # -1: all of it (no block lists: a VAE is onloaded whole by group offloading)

    @property
    def outside(self) -> int:
        return self.params if self.outside_blocks < 0 else self.outside_blocks


def _stack(layers: int, per_layer: float, outside: float) -> ComponentSize:
    return ComponentSize(int(layers * per_layer + outside), int(per_layer), int(outside))


# Text encoders, image encoders and VAEs of the published pipelines (parameter counts from their configs).
_CLIP_L = _stack(12, 7.08e6, 38.0e6)  # CLIP ViT-L/14 text model: 123 M
_CLIP_G = _stack(32, 19.7e6, 65.0e6)  # OpenCLIP bigG text model: 695 M
_T5_XXL = _stack(24, 192.9e6, 131.6e6)  # T5 v1.1 XXL encoder: 4.76 B
_UMT5_XXL = _stack(24, 192.9e6, 1050.1e6)  # UMT5-XXL encoder (256 k vocabulary): 5.68 B
_LLAMA_8B = _stack(32, 218.1e6, 525.3e6)  # llava-llama-3-8B text model without its head: 7.5 B
_CLIP_H_VISION = _stack(32, 19.7e6, 1.5e6)  # CLIP ViT-H/14 vision model: 632 M
_SD_VAE, _FLUX_VAE = ComponentSize(83_653_863), ComponentSize(83_819_683)
_WAN_VAE, _WAN22_VAE, _HUNYUAN_VAE = ComponentSize(126_892_531), ComponentSize(705_000_000), ComponentSize(246_000_000)

KNOWN_COMPONENTS: dict[str, tuple[str, dict[str, ComponentSize], tuple[str, ...]]] = {
    # hub id: (architecture of the denoiser(s), other components, denoiser attributes)
    "stable-diffusion-v1-5/stable-diffusion-v1-5": ("sd15", {"text_encoder": _CLIP_L, "vae": _SD_VAE}, ("unet",)),
    "stabilityai/stable-diffusion-xl-base-1.0": (
        "sdxl-base", {"text_encoder": _CLIP_L, "text_encoder_2": _CLIP_G, "vae": _SD_VAE}, ("unet",)),
    "stabilityai/stable-diffusion-3-medium-diffusers": (
        "sd3-medium", {"text_encoder": _CLIP_L, "text_encoder_2": _CLIP_G, "text_encoder_3": _T5_XXL, "vae": _FLUX_VAE},
        ("transformer",)),
    "stabilityai/stable-diffusion-3.5-medium": (
        "sd3.5-medium", {"text_encoder": _CLIP_L, "text_encoder_2": _CLIP_G, "text_encoder_3": _T5_XXL,
                         "vae": _FLUX_VAE}, ("transformer",)),
    "black-forest-labs/FLUX.1-dev": (
        "flux1-dev", {"text_encoder": _CLIP_L, "text_encoder_2": _T5_XXL, "vae": _FLUX_VAE}, ("transformer",)),
    "Wan-AI/Wan2.1-T2V-1.3B-Diffusers": (
        "wan2.1-t2v-1.3b", {"text_encoder": _UMT5_XXL, "vae": _WAN_VAE}, ("transformer",)),
    # Wan 2.1 T2V 14B's transformer has the config of each of Wan 2.2 A14B's two
    "Wan-AI/Wan2.1-T2V-14B-Diffusers": (
        "wan2.2-t2v-a14b", {"text_encoder": _UMT5_XXL, "vae": _WAN_VAE}, ("transformer",)),
    "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers": (
        "wan2.1-i2v-14b-480p", {"text_encoder": _UMT5_XXL, "image_encoder": _CLIP_H_VISION, "vae": _WAN_VAE},
        ("transformer",)),
    "Wan-AI/Wan2.2-T2V-A14B-Diffusers": (
        "wan2.2-t2v-a14b", {"text_encoder": _UMT5_XXL, "vae": _WAN_VAE}, ("transformer", "transformer_2")),
    "Wan-AI/Wan2.2-TI2V-5B-Diffusers": (
        "wan2.2-ti2v-5b", {"text_encoder": _UMT5_XXL, "vae": _WAN22_VAE}, ("transformer",)),
    "hunyuanvideo-community/HunyuanVideo": (
        "hunyuan-video", {"text_encoder": _LLAMA_8B, "text_encoder_2": _CLIP_L, "vae": _HUNYUAN_VAE},
        ("transformer",)),
}
VIDEO_PIPELINES = ("Wan", "HunyuanVideo", "CogVideoX", "LTX", "Mochi", "Allegro", "SkyReels", "Video")


@dataclass(frozen=True)
class MemoryPlan:
    """Where the weights live (``offload``), VAE tiling/slicing, and why (``reason``, set by ``auto``).

    ``use_stream`` (group offload): prefetch the next block on a CUDA stream; ``None`` means on CUDA only.
    """

    offload: str = "none"
    vae_tiling: bool = False
    vae_slicing: bool = False
    use_stream: bool | None = None
    reason: str = ""

    def __post_init__(self) -> None:
        if self.offload not in PLANS[1:]:
            raise ValueError(f"memory={self.offload!r}; valid: {', '.join(PLANS)}")


def parse_memory(memory: str | MemoryPlan | None) -> str | MemoryPlan:
    """``"auto"``, or a :class:`MemoryPlan` from a plan name; a bad name is a ValueError naming it."""
    if isinstance(memory, MemoryPlan):
        return memory
    memory = memory or "auto"
    if memory not in PLANS:
        raise ValueError(f"memory={memory!r}; valid: {', '.join(PLANS)}")
    return memory if memory == "auto" else MemoryPlan(memory, vae_tiling=memory != "none", vae_slicing=memory != "none")


def _gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


def choose_plan(components: dict[str, ComponentSize], free_bytes: int, device_kind: str, *, dtype_bytes: int = 2,
                video: bool = False, quantized: dict[str, float] | None = None) -> MemoryPlan:
    """The fastest plan whose peak fits ``free_bytes`` on a ``device_kind`` ("cuda", "mps", "cpu", ...) device.

    Peaks: everything + workspace (``none``); the largest component + workspace (``model-offload``); per
    component, its parts outside the block lists + two blocks (one running, one prefetched) + workspace
    (``group-offload``, CUDA streams); the workspace alone (``sequential-offload``); each within 95% of
    ``free_bytes`` (:data:`MARGIN`). ``quantized`` maps a
    component to the fraction of its bytes it keeps. Nothing to choose on a CPU: ``none``.
    """
    workspace = WORKSPACE["video" if video else "image"]
    tiling, usable = video, int(free_bytes * (1 - MARGIN))
    if device_kind == "cpu":
        return MemoryPlan("none", vae_tiling=tiling, reason="cpu: every component stays in host memory")
    quantized = quantized or {}
    size = {k: int(c.params * dtype_bytes * quantized.get(k, 1.0)) for k, c in components.items()}
    block = {k: int((c.outside + 2 * c.largest_block) * dtype_bytes * quantized.get(k, 1.0))
             for k, c in components.items()}
    largest = max(size, key=size.get)
    needs = {"none": sum(size.values()) + workspace, "model-offload": size[largest] + workspace,
             "group-offload": max(block.values()) + workspace, "sequential-offload": workspace}
    if device_kind != "cuda":  # group offloading prefetches on CUDA streams; without them it is no faster
        needs.pop("group-offload")
    why = (f"{_gib(free_bytes)} free on {device_kind}; all components {_gib(sum(size.values()))}, "
           f"largest {largest} {_gib(size[largest])}, workspace {_gib(workspace)}")
    for offload, need in needs.items():
        if need <= usable:
            return MemoryPlan(offload, vae_tiling=tiling or offload != "none", vae_slicing=offload != "none",
                              reason=f"{offload} (needs {_gib(need)}): {why}")
    return MemoryPlan("sequential-offload", vae_tiling=True, vae_slicing=True,
                      reason=f"sequential-offload, which may still not fit (needs {_gib(workspace)}; "
                             f"try --quantize): {why}")


# ------------------------------------------------------------------------------- component sizes before loading
def module_size(module: Any) -> ComponentSize:
    """Parameter counts of a (meta-device) module, with its largest block in top-level ModuleLists."""
    import torch

    count = lambda m: sum(p.numel() for p in m.parameters())
    blocks = [count(b) for child in module.children() if isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential))
              for b in child]
    total = count(module)
    return ComponentSize(total, max(blocks, default=0), total - sum(blocks) if blocks else -1)


def _meta_component(model: str, name: str, library: str, class_name: str) -> ComponentSize | None:
    """Build one component on the meta device from its config in a local folder or the hub cache."""
    import importlib

    import torch

    cls = getattr(importlib.import_module(library), class_name, None)
    if cls is None or not hasattr(cls, "config_class" if library == "transformers" else "load_config"):
        return None
    if library == "transformers":
        config = cls.config_class.from_pretrained(model, subfolder=name)
        with torch.device("meta"):
            return module_size(cls(config))
    with torch.device("meta"):
        return module_size(cls.from_config(cls.load_config(model, subfolder=name)))


@functools.lru_cache(maxsize=32)
def component_sizes(model: str) -> tuple[dict[str, ComponentSize], str] | None:
    """({component: size}, pipeline class) from configs only; ``None`` when nothing says how big ``model`` is.

    A local folder or a cached hub snapshot: every model component built on the meta device from its config
    (exact). Else a published pipeline of :data:`KNOWN_COMPONENTS`: its denoiser from the shipped config.
    """
    from diffusers import DiffusionPipeline

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            index = DiffusionPipeline.load_config(model)
    except Exception:  # noqa: BLE001 (not on disk and offline: fall back to the table)
        index = None
    if index is not None:
        sizes = {}
        for name, entry in index.items():
            if isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[0] in ("diffusers", "transformers"):
                try:
                    size = _meta_component(model, name, *entry)
                except Exception:  # noqa: BLE001 (a component whose config cannot be read is left out)
                    size = None
                if size is not None:
                    sizes[name] = size
        if sizes:
            return sizes, index.get("_class_name", "")
    if model not in KNOWN_COMPONENTS:
        return None
    from attnedit.models.architectures import get_architecture

    arch_name, others, denoisers = KNOWN_COMPONENTS[model]
    arch = get_architecture(arch_name)
    denoiser = module_size(arch.build("full", device="meta"))
    return {**{name: denoiser for name in denoisers}, **others}, arch.pipeline


def _pipeline_class(model: str) -> str:
    """The pipeline class named by ``model``'s model_index.json (or the known table); "" when unknown."""
    from diffusers import DiffusionPipeline

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return DiffusionPipeline.load_config(model).get("_class_name", "")
    except Exception:  # noqa: BLE001
        known = KNOWN_COMPONENTS.get(model)
        if known is None:
            return ""
        from attnedit.models.architectures import get_architecture

        return get_architecture(known[0]).pipeline


def is_video(pipeline_class: str) -> bool:
    return any(pipeline_class.startswith(p) or p in pipeline_class for p in VIDEO_PIPELINES)


def device_free_bytes(device: str) -> int | None:
    """Free memory of an accelerator (``None`` on a CPU or when the backend cannot say)."""
    import torch

    kind = device.split(":")[0]
    if kind == "cuda":
        return torch.cuda.mem_get_info(torch.device(device).index or 0)[0]
    if kind == "mps":
        return int(torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory())
    if kind == "xpu" and hasattr(torch, "xpu"):
        return torch.xpu.mem_get_info()[0]
    return None


def resolve_memory(memory: str | MemoryPlan | None, model: str, device: str, *, dtype_bytes: int = 2,
                   quantize: str | None = None, sizes: tuple[dict[str, ComponentSize], str] | None = None) -> MemoryPlan:
    """The plan for ``model`` on ``device``: the named one, or ``auto``'s choice (its ``reason`` is the line to
    print). ``sizes`` overrides :func:`component_sizes` (e.g. measured on an already built pipeline)."""
    memory = parse_memory(memory)
    if isinstance(memory, MemoryPlan):
        return memory
    kind = device.split(":")[0]
    if kind == "cpu":  # nothing to choose; only the pipeline class matters (video: tile the VAE)
        return choose_plan({}, 0, "cpu", video=is_video(sizes[1] if sizes else _pipeline_class(model)))
    sizes = sizes or component_sizes(model)
    free = device_free_bytes(device)
    if sizes is None or free is None:
        what = "its component sizes" if sizes is None else f"the free memory of {device}"
        return MemoryPlan("model-offload", vae_tiling=True, vae_slicing=True,
                          reason=f"model-offload: cannot tell {what} before loading {model!r}")
    components, pipeline_class = sizes
    fraction = QUANTIZED_FRACTION.get("gguf" if quantize and quantize.endswith(".gguf") else quantize or "", 1.0)
    quantized = {k: fraction for k in components if k in DENOISERS or k.startswith("text_encoder")}
    if quantize and quantize.endswith(".gguf"):
        quantized = {k: v for k, v in quantized.items() if k == "transformer"}
    return choose_plan(components, free, kind, dtype_bytes=dtype_bytes, video=is_video(pipeline_class),
                       quantized=quantized)


# ------------------------------------------------------------------------------------------------ apply a plan
def apply_plan(pipe: Any, plan: MemoryPlan, device: str) -> Any:
    """Place ``pipe`` by ``plan`` with diffusers' own calls; a plan the device cannot do is a ValueError.

    On a CPU, ``model-offload`` and ``group-offload`` (without streams) run diffusers' hooks with the CPU as both
    places (the images are those of ``none``); ``sequential-offload`` needs an accelerator (accelerate's hooks
    fail on tied text-encoder weights when the execution device is the CPU).
    """
    import torch

    kind = torch.device(device).type
    stream = plan.use_stream if plan.use_stream is not None else kind == "cuda"
    if plan.offload == "group-offload" and stream and kind != "cuda":
        raise ValueError(f"memory='group-offload' with use_stream=True needs CUDA streams; device={device!r}")
    if plan.offload == "sequential-offload" and kind == "cpu":
        raise ValueError(f"memory='sequential-offload' needs an accelerator (cuda, mps, xpu); device={device!r}")
    if plan.offload == "none":
        pipe.to(device)
    elif plan.offload == "model-offload":
        pipe.enable_model_cpu_offload(device=device)
    elif plan.offload == "sequential-offload":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe.enable_group_offload(onload_device=torch.device(device), offload_device=torch.device("cpu"),
                                  offload_type="block_level", num_blocks_per_group=1, use_stream=stream)
    vae = getattr(pipe, "vae", None)
    if plan.vae_tiling and hasattr(vae, "enable_tiling"):
        vae.enable_tiling()
    if plan.vae_slicing and hasattr(vae, "enable_slicing"):
        vae.enable_slicing()
    return pipe

