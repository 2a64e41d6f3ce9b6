"""The ``full`` section of benchmarks/gpu_check.py: FLUX.1-dev, Wan 2.1 T2V 14B and HunyuanVideo at full depth.

Each denoiser is built from its shipped config with random weights directly on the GPU in bfloat16 (no download),
and runs one forward at its real resolution (FLUX 1024 x 1024; Wan 720p x 81 frames; HunyuanVideo 720p x 117
frames): stock, then under each edit (key mask, SoftPAG, recorder, radial), then under each memory plan (the
denoiser moved from host memory per call, group offloading with CUDA streams, sequential offloading), and FLUX
also with torchao int8 / fp8 weight-only weights (alone and with a key mask). Every forward
is timed once after one stock warm-up forward (a 14B video forward takes seconds; medians of several would not
fit the 8-minute budget), with its peak memory. Anything that would start after ``--budget-s`` is recorded as
skipped, and each measurement runs in its own try/except.

``--dry-run`` builds each model at full depth on the meta device (parameter counts and token counts of the real
sizes are recorded and checked), then runs the same code on the zoo's tiny denoiser of the family at tiny sizes
on the CPU, where the plans are group offloading without streams and accelerate's sequential hooks with the CPU
as execution device.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

import torch

from attnedit import AttentionRecorder, KeyMask, install
from attnedit.methods.head_guidance import perturbed_guidance
from attnedit.methods.radial import PRESETS, RadialAttention
from attnedit.models.architectures import get_architecture
from attnedit.surfaces.memory import KNOWN_COMPONENTS

# name: (hub id, latent size: packed (h, w) for FLUX, (frames, h, w) for video; text tokens)
FULL = {
    "flux1-dev": ("black-forest-labs/FLUX.1-dev", (64, 64), 512),  # 1024 px: 128 x 128 latents, 2 x 2 packed
    "wan2.1-t2v-14b": ("Wan-AI/Wan2.1-T2V-14B-Diffusers", (21, 90, 160), 512),  # 720 x 1280, 81 frames
    "hunyuan-video": ("hunyuanvideo-community/HunyuanVideo", (30, 90, 160), 256),  # 720 x 1280, 117 frames
}
DRY_SIZES = {"flux": (4, 6), "wan": (4, 8, 8), "hunyuan_video": (4, 8, 8)}
TOKENS = {"flux1-dev": 4096, "wan2.1-t2v-14b": 75600, "hunyuan-video": 108000}  # image/video tokens at full size


def tokens(arch, size: tuple[int, ...]) -> int:
    """Image/video tokens of one forward at latent ``size`` (after the denoiser's patching)."""
    c = arch.config
    if arch.family == "flux":
        return size[0] * size[1]
    patch = c["patch_size"]
    pt, ph, pw = (patch if isinstance(patch, list) else (c.get("patch_size_t", 1), patch, patch))
    return (size[0] // pt) * (size[1] // ph) * (size[2] // pw)


def build(check: Any, arch) -> torch.nn.Module:
    """Full depth, random weights, built in ``check.dtype`` directly on the device (dry run: the zoo's tiny one)."""
    if check.dry:
        return check.tiny(arch.family)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(check.dtype)  # no float32 copy of 14 B parameters on the way
    try:
        return arch.build("full", device=check.device, dtype=check.dtype)
    finally:
        torch.set_default_dtype(previous)


def _inputs(check: Any, arch, model, size, text: int) -> dict:
    inputs = arch.inputs(model, size=size, text=text)
    return {k: (v.to(check.device) if torch.is_tensor(v) else v) for k, v in inputs.items()}


def timed(check: Any, fn: Callable[[], Any]) -> dict:
    """One call: milliseconds and (CUDA) peak memory in GiB."""
    if check.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    check.sync()
    start = time.perf_counter()
    out = fn()
    check.sync()
    row = {"ms": round((time.perf_counter() - start) * 1e3, 2)}
    if check.device.type == "cuda":
        row["peak_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return {**row, "_out": out}


def edits(check: Any, arch, model, size) -> dict[str, Callable[[], Any]]:
    """Context factories of the edits measured at full size (each yields its Installation)."""
    mask = torch.zeros(size[-2:])
    mask[: size[-2] // 2, : size[-1] // 2] = 1
    out = {"key_mask": lambda: install(model, KeyMask(mask=mask)),
           "soft_pag": lambda: perturbed_guidance(model, heads="L0", scale=3.0, strength=0.5, cfg_scale=1.0)}
    if arch.family == "hunyuan_video" and not check.dry:
        out["recorder"] = None  # joint attention over 108 k tokens: its S x S maps cannot be kept
    else:  # one layer's maps: Wan's cross-attention (S x 512), FLUX's joint attention of the image queries
        kind = {"wan": "cross"}.get(arch.family, "joint")
        out["recorder"] = lambda: install(model, AttentionRecorder(layers={0}, kinds={kind}, queries="all"
                                                                   if kind == "cross" else "image"))
    if arch.family in PRESETS:
        radial = RadialAttention(**{**PRESETS[arch.family], "dense_steps": 0, "dense_layers": 0,
                                    "block_size": 16 if check.dry else 128})
        out["radial"] = lambda: install(model, radial)
    return out


def _skip(check: Any) -> str | None:
    if not check.dry and check.elapsed() > check.args.budget_s:
        return f"time budget of {check.args.budget_s} s spent"
    return None


def _measure(check: Any, label: str, fn: Callable[[], dict], results: dict) -> None:
    if (reason := _skip(check)) is not None:
        results[label] = {"skipped": reason}
        return
    try:
        results[label] = fn()
    except Exception as error:  # noqa: BLE001 (one edit or plan failing must not lose the others)
        results[label] = {"error": f"{type(error).__name__}: {str(error)[:400]}"}
    if check.device.type == "cuda":  # free the last measurement's memory (a full gc takes ~1 s: not in the dry run)
        gc.collect()
        torch.cuda.empty_cache()


def plans(check: Any, model: torch.nn.Module, forward: Callable[[], Any], stock: torch.Tensor, results: dict) -> None:
    """The memory plans on the denoiser alone; the model ends in host memory (or on meta, sequentially offloaded)."""
    onload = check.device

    def model_offload() -> dict:  # what enable_model_cpu_offload pays once per pipeline call
        model.to("cpu")
        check.sync()
        start = time.perf_counter()
        model.to(onload)
        check.sync()
        row = timed(check, forward)
        row["to_device_s"] = round(time.perf_counter() - start - row["ms"] / 1e3, 3)
        return row

    def group_offload() -> dict:
        model.to("cpu")
        model.enable_group_offload(onload_device=onload, offload_device=torch.device("cpu"),
                                   offload_type="block_level", num_blocks_per_group=1,
                                   use_stream=onload.type == "cuda")
        timed(check, forward)  # the first call traces the block order for prefetching
        return timed(check, forward)

    def sequential_offload() -> dict:
        import accelerate
        from diffusers.hooks import HookRegistry

        registry = HookRegistry.check_if_exists_or_initialize(model)
        for name in ("group_offloading", "layer_execution_tracker", "lazy_prefetch_group_offloading"):
            registry.remove_hook(name, recurse=True)
        model.to("cpu")
        accelerate.cpu_offload(model, execution_device=onload)
        return timed(check, forward)

    for label, fn in (("model-offload", model_offload), ("group-offload", group_offload),
                      ("sequential-offload", sequential_offload)):
        def run(fn=fn) -> dict:
            row = fn()
            out = row.pop("_out")
            return {**row, "ratio": round(row["ms"] / results["none"]["ms"], 4),
                    "max_abs_diff": float((out.float() - stock.float()).abs().max())}

        _measure(check, label, run, results)


def full_row(check: Any, name: str) -> dict:
    """One published model at full depth: stock, each edit, each memory plan."""
    hub_id, real_size, text = FULL[name]
    arch = get_architecture(KNOWN_COMPONENTS[hub_id][0])
    meta = arch.build("full", device="meta")
    row = {"hub_id": hub_id, "architecture": arch.name, "params_b": round(sum(p.numel() for p in meta.parameters())
                                                                          / 1e9, 3),
           "latent_size": list(real_size), "tokens": tokens(arch, real_size), "text_tokens": text}
    del meta
    size = DRY_SIZES[arch.family] if check.dry else real_size
    if check.dry:
        row["dry_latent_size"] = list(size)
    start = time.perf_counter()
    model = build(check, arch)
    inputs = _inputs(check, arch, model, size, 8 if check.dry else text)
    row["build_s"] = round(time.perf_counter() - start, 2)
    forward = torch.no_grad()(lambda: model(**inputs, return_dict=False)[0])
    forward()  # warm-up: kernels picked, caches filled
    first = timed(check, forward)
    stock = first.pop("_out")
    row["plans"] = {"none": first}
    row["edits"] = {}
    for label, make in edits(check, arch, model, size).items():
        if make is None:
            row["edits"][label] = {"skipped": "S x S attention maps of joint attention at this size do not fit"}
            continue

        def run(make=make) -> dict:
            with make() as installation:
                installation.new_run()
                edited = timed(check, forward)
            out = edited.pop("_out")
            return {**edited, "ratio": round(edited["ms"] / first["ms"], 4),
                    "max_abs_diff": float((out.float() - stock.float()).abs().max())}

        _measure(check, label, run, row["edits"])
    plans(check, model, forward, stock, row["plans"])
    if arch.family == "flux":
        row["quantized"] = {}
        for quantize in QUANTIZED:
            _measure(check, quantize, lambda q=quantize: quantized(check, arch, size, text, q, first, stock),
                     row["quantized"])
    return row


QUANTIZED = ("int8", "fp8")  # torchao weight-only, as load_pipeline(quantize=...) applies them (bitsandbytes and
# GGUF need their packages and saved weights: not part of this check)


def quantized(check: Any, arch, size, text: int, quantize: str, first: dict, stock: torch.Tensor) -> dict:
    """A fresh denoiser with torchao weight-only ``quantize`` (attnedit's device check first): stock and key-mask
    forwards, against the unquantized stock forward."""
    from torchao.quantization import quantize_

    from attnedit.surfaces.quantize import _configs, check_quantize

    check_quantize(quantize, str(check.device))  # fp8 on a CPU or an older GPU: the ValueError is the row
    model = build(check, arch)
    quantize_(model, _configs(quantize, check.dtype)[0].quant_type)
    inputs = _inputs(check, arch, model, size, 8 if check.dry else text)
    forward = torch.no_grad()(lambda: model(**inputs, return_dict=False)[0])
    forward()
    plain = timed(check, forward)
    out = plain.pop("_out")
    mask = torch.zeros(size[-2:])
    mask[: size[-2] // 2, : size[-1] // 2] = 1
    with install(model, KeyMask(mask=mask)):
        masked = timed(check, forward)
    masked_out = masked.pop("_out")
    return {**plain, "ratio": round(plain["ms"] / first["ms"], 4),
            "max_abs_diff": float((out.float() - stock.float()).abs().max()),
            "key_mask": {**masked, "ratio": round(masked["ms"] / plain["ms"], 4),
                         "max_abs_diff": float((masked_out.float() - out.float()).abs().max())}}


def section(check: Any, section_dict: dict, rows: Callable, tiny: Callable[[str], torch.nn.Module]) -> None:
    """Rows of :data:`FULL` through gpu_check's ``_rows`` (saved after each; an error becomes the row);
    ``tiny(family)``: a fresh copy of the zoo's tiny denoiser for the dry run."""
    check.tiny = tiny
    section_dict["dtype"] = str(check.dtype)
    rows(check, section_dict, list(FULL), lambda name: full_row(check, name))
