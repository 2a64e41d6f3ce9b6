"""One prepared GPU check: radial FlexAttention vs flash SDPA, its exactness, real-width forwards per edit, xformers,
and FLUX.1-dev / Wan 2.1 14B / HunyuanVideo at full depth and real resolution per edit and memory plan
(``full``: benchmarks/gpu_check_full.py).

For one H100/H200 without internet (nothing is installed at run time), meant to finish in under 8 minutes:
``python benchmarks/gpu_check.py [--dry-run] [--out PATH] [--only radial,reference,forwards,xformers,full]``.
Every section, and every row in it, runs in its own try/except, and the JSON is rewritten atomically (temp file +
os.replace) after each row, so a failure or a timeout keeps what was measured; rows that would start after
``--budget-s`` are recorded as skipped. ``--dry-run`` runs the same code at tiny sizes in float32 (CPU unless CUDA
is present) in seconds; without CUDA the sparse side is attnedit's CPU block-sparse path (compiling FlexAttention
on a CPU takes about a minute) and the architectures are the zoo's tiny denoisers.
"""

from __future__ import annotations

import argparse
import copy
import functools
import gc
import importlib
import json
import math
import os
import sys
import time
import traceback
from collections import namedtuple
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub (the GPU machine has no internet)
sys.path.insert(0, os.path.dirname(__file__))

import gpu_check_full
import torch
import torch.nn.functional as F
from harness import RESULTS, compare, machine

from attnedit import BlockMask, HeadBlend, KeyMask, install
from attnedit.core.attention import flex_attention, flex_block_mask
from attnedit.core.block_sparse import block_sparse_attention
from attnedit.methods.head_guidance import perturbed_guidance
from attnedit.methods.radial import PRESETS, RadialAttention, radial_block_mask
from attnedit.families import get_family
from attnedit.models.architectures import ARCHITECTURES

Geometry = namedtuple("Geometry", "name frames per_frame heads head_dim family")
GEOMETRIES = (  # latent frames x tokens per frame (16 x 16 pixels per token), the real head layout
    Geometry("wan2.1-1.3b-480p-81f", 21, 1560, 12, 128, "wan"),  # 480x832 -> 30x52 tokens
    Geometry("wan2.1-1.3b-720p-81f", 21, 3600, 12, 128, "wan"),  # 720x1280 -> 45x80
    Geometry("hunyuan-video-768x1280-117f", 30, 3840, 24, 128, "hunyuan_video"),  # 768x1280 -> 48x80
)
DRY_GEOMETRIES = (Geometry("tiny-wan", 8, 64, 2, 32, "wan"), Geometry("tiny-hunyuan", 8, 64, 2, 32, "hunyuan_video"))
SIZES = {"unet": (64, 64), "sd3": (64, 64), "flux": (32, 32), "wan": (8, 30, 52), "hunyuan_video": (8, 30, 52),
         "flux2": (32, 32), "qwen_image": (32, 32), "z_image": (64, 64), "wan_vace": (8, 30, 52),
         "wan_animate": (8, 30, 52), "hunyuan_video15": (8, 30, 52)}
DRY_SIZES = {"unet": (16, 16), "sd3": (8, 8), "flux": (4, 6), "wan": (8, 8, 8), "hunyuan_video": (8, 8, 8),
             "flux2": (4, 6), "qwen_image": (4, 6), "z_image": (8, 12), "wan_vace": (4, 4, 4), "wan_animate": (4, 4, 4),
             "hunyuan_video15": (4, 4, 4)}


class Check:
    """The run: options, device, results, time budget; ``save`` rewrites the JSON atomically."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.dry, self.t0 = args, args.dry_run, time.perf_counter()
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = torch.float32 if self.dry or self.device.type == "cpu" else torch.bfloat16
        self.flex = self.device.type == "cuda"
        if self.dry and not self.flex:
            torch.set_num_threads(1)  # tiny ops: more threads only contend (5x slower on a busy 2-core machine)
        self.block = 32 if self.dry else 128  # radial block of sections 1-2
        self.geometries = DRY_GEOMETRIES if self.dry else GEOMETRIES
        self.timing = {"rounds": 1, "repeats": 1, "warmup": 0} if self.dry else {"rounds": 3, "repeats": 3, "warmup": 2}
        self.results = {"benchmark": "gpu_check", "dry_run": self.dry, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                        "config": vars(args), "sections": {}}

    def size(self, arch) -> tuple[int, ...]:
        return (DRY_SIZES if self.dry else SIZES)[arch.family]

    def elapsed(self) -> float:
        return round(time.perf_counter() - self.t0, 2)

    def save(self) -> None:
        self.results["elapsed_s"] = self.elapsed()
        path = Path(self.args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.results, indent=2, default=str) + "\n")
        os.replace(tmp, path)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def _err(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error)[:600]}"


def _rows(check: Check, section: dict, items, measure) -> None:
    """``section["rows"]`` += measure(item) per item, saved after each; an error or the budget becomes the row."""
    for item in items:
        name, start = getattr(item, "name", item), time.perf_counter()
        if not check.dry and check.elapsed() > check.args.budget_s:
            row = {"name": name, "skipped": f"time budget of {check.args.budget_s} s spent"}
        else:
            try:
                row = {"name": name, **measure(item)}
            except Exception as error:  # noqa: BLE001 (one geometry / model failing must not lose the others)
                row = {"name": name, "error": _err(error), "traceback": traceback.format_exc()[-1500:]}
            row["elapsed_s"] = round(time.perf_counter() - start, 2)
        section["rows"].append(row)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        check.save()


# -------------------------------------------------------------------------------- 1-2: the attention call alone
def _case(check: Check, g: Geometry):
    """q, k, v (1, heads, S, head_dim) and the radial block table of the family's preset."""
    gen = torch.Generator(check.device).manual_seed(0)
    shape = (1, g.heads, g.frames * g.per_frame, g.head_dim)
    q, k, v = (torch.randn(shape, generator=gen, device=check.device, dtype=check.dtype) for _ in range(3))
    preset = PRESETS[g.family]
    return q, k, v, radial_block_mask(g.frames, g.per_frame, check.block, preset["decay"], preset["sink"])


def sparse_runner(check: Check, blocks: torch.Tensor, q, k, v):
    """(call, info): radial attention through attnedit's flex path (CUDA), else its CPU block-sparse path."""
    n = q.shape[2]
    mask = BlockMask(blocks, check.block, n, n)
    if not check.flex:
        return (lambda: block_sparse_attention(q, k, v, None, mask)), {
            "sparse_backend": "block_sparse", "flex": "skipped: no CUDA (compiling flex on a CPU takes ~60 s)"}
    info, start = {"sparse_backend": "flex"}, time.perf_counter()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    flex_block_mask(mask, None, q.device)  # cached on the table: flex_attention below reuses it
    check.sync()
    info["block_mask_build_s"] = round(time.perf_counter() - start, 3)
    info["block_mask_peak_gb"] = round((torch.cuda.max_memory_allocated() - before) / 2**30, 2)
    return (lambda: flex_attention(q, k, v, None, mask)), info


def dense_runner(q, k, v):
    """(call, kernel): dense SDPA on the flash kernel, or default SDPA (its own pick) when flash cannot run."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def flash():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v)

    try:
        flash()
        return flash, "flash"
    except RuntimeError as error:
        return (lambda: F.scaled_dot_product_attention(q, k, v)), f"default (flash failed: {_err(error)[:200]})"


def radial_row(check: Check, g: Geometry) -> dict:
    """Dense flash SDPA vs radial sparse attention at one geometry: medians of interleaved runs, and the ideal."""
    q, k, v, blocks = _case(check, g)
    density = float(blocks.float().mean())
    dense, kernel = dense_runner(q, k, v)
    sparse, info = sparse_runner(check, blocks, q, k, v)
    start = time.perf_counter()
    sparse()  # the first flex call compiles for this shape
    check.sync()
    info["first_call_s"] = round(time.perf_counter() - start, 3)
    t = compare(dense, sparse, device=check.device.type, clock="wall", **check.timing)
    speedup, ideal = 1 / t["ratio"], 1 / density
    return {"tokens": q.shape[2], "frames": g.frames, "tokens_per_frame": g.per_frame, "heads": g.heads,
            "head_dim": g.head_dim, "dtype": str(check.dtype), "block": check.block,
            "decay": PRESETS[g.family]["decay"], "sink": PRESETS[g.family]["sink"],
            "density": round(density, 4), "dense_kernel": kernel, "dense_ms": round(t["baseline_s"] * 1e3, 3),
            "sparse_ms": round(t["variant_s"] * 1e3, 3), "speedup": round(speedup, 3), "ideal_speedup": round(ideal, 3),
            "fraction_of_ideal": round(speedup / ideal, 3), "samples": t["samples"], **info}


def reference_row(check: Check, g: Geometry) -> dict:
    """Sparse output vs float32 dense masked attention, a query chunk at a time (only chunk x S masks).

    Query rows whose block row keeps no key have no defined output (NaN in the reference): they are counted in
    ``empty_query_rows`` and left out of the differences.
    """
    q, k, v, blocks = _case(check, g)
    sparse, info = sparse_runner(check, blocks, q, k, v)
    heads = list(range(g.heads)) if check.dry else [0, g.heads - 1]
    out = sparse()[:, heads].float()
    qf, kf, vf = (x[:, heads].float() for x in (q, k, v))
    n, chunk = q.shape[2], 128 if check.dry else 2048
    table, key_block = blocks.to(check.device), torch.arange(n, device=check.device) // check.block
    ref = torch.empty_like(out)
    for s in range(0, n, chunk):
        keep = table[torch.arange(s, min(s + chunk, n), device=check.device) // check.block][:, key_block]
        scores = (qf[:, :, s : s + chunk] @ kf.transpose(-1, -2)) / math.sqrt(g.head_dim)
        ref[:, :, s : s + chunk] = scores.masked_fill_(~keep, float("-inf")).softmax(-1) @ vf
    defined = ref.isfinite().all(-1)
    diff, ref = (out - ref).abs()[defined], ref[defined]
    return {"tokens": n, "heads_checked": heads, "query_rows": n, "dtype": str(check.dtype),
            "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "ref_max_abs": float(ref.abs().max()),
            "dtype_rounding_max": float((ref.to(check.dtype).float() - ref).abs().max()),
            "empty_query_rows": int((~defined[0, 0]).sum()), **info}


# ------------------------------------------------------------------------------ 3-4: real-width denoiser forwards
def _to(obj, device):
    if torch.is_tensor(obj):
        return obj.to(device)
    return {k: _to(v, device) for k, v in obj.items()} if isinstance(obj, dict) else obj


@functools.cache
def _tiny(family: str) -> torch.nn.Module:
    from attnedit.families import family_module
    from attnedit.models import zoo

    if family not in zoo.FAMILIES + zoo.EXTRA_PIPELINES:  # a family's own tiny pipeline (its module's TINY)
        family = next(iter(family_module(family).TINY))
    return zoo.denoiser(zoo.build_pipeline(family)).eval()


def setup(check: Check, name: str):
    """(arch, model, inputs): real widths at reduced depth, or (dry run) the zoo's tiny denoiser of the family."""
    arch = ARCHITECTURES[name]
    if check.dry:
        family = "sdxl" if name.startswith("sdxl") else {"unet": "sd15"}.get(arch.family, arch.family)
        model = _tiny(family).to(check.device, check.dtype)
    else:
        model = arch.build("reduced", device=check.device, dtype=check.dtype)
    return arch, model, _to(arch.inputs(model, size=check.size(arch), text=8 if check.dry else 64), check.device)


def _stacked(out):
    """One tensor of the output rows (Z-Image returns a list of per-row latents)."""
    return torch.stack(list(out)) if isinstance(out, (list, tuple)) else out


def box_mask(size: tuple[int, ...]) -> torch.Tensor:
    """A box over the top-left quarter of the image, at the latent (FLUX: packed) resolution of ``size``."""
    mask = torch.zeros(size[-2:])
    mask[: size[-2] // 2, : size[-1] // 2] = 1
    return mask


def edits_for(check: Check, arch, model) -> dict:
    """Context factories (each yields its Installation) of every edit that applies to the family."""
    edits = {"none": lambda: install(model),
             "key_mask": lambda: install(model, KeyMask(mask=box_mask(check.size(arch)))),
             "head_blend": lambda: install(model, HeadBlend(strength=0.5, heads={0: (0, 1)})),
             "perturbed_guidance": lambda: perturbed_guidance(model, heads="L0", scale=3.0, cfg_scale=1.0)}
    family = get_family(arch.family)
    if family.video:
        radial = RadialAttention(**{**PRESETS[family.radial_preset(None)], "dense_steps": 0, "dense_layers": 0,
                                    "block_size": 16 if check.dry else 128})
        edits["radial"] = lambda: install(model, radial)
    return edits


def edit_timing(check: Check, forward, make, stock) -> dict:
    """Stock vs edited forwards, interleaved. Each edited call starts a fresh run (step 0, cond pass): a repeated
    timestep would count as the uncond pass, where perturbed_guidance adds no perturbed rows."""
    handle = {}

    @contextmanager
    def context():
        with make() as installation:
            handle["it"] = installation
            yield

    def edited():
        handle["it"].new_run()
        return forward()

    with context():
        out = edited()
    t = compare(forward, edited, variant_context=context, device=check.device.type, clock="wall", **check.timing)
    return {"stock_ms": round(t["baseline_s"] * 1e3, 3), "ms": round(t["variant_s"] * 1e3, 3),
            "ratio": round(t["ratio"], 4), "ratio_of_minimums": round(t["ratio_of_minimums"], 4),
            "bit_identical": torch.equal(out, stock), "max_abs_diff": float((out.float() - stock.float()).abs().max())}


def forward_row(check: Check, name: str) -> dict:
    """One architecture: build, a stock forward, then every applicable edit timed against stock."""
    start = time.perf_counter()
    arch, model, inputs = setup(check, name)
    forward = torch.no_grad()(lambda: _stacked(model(**inputs, return_dict=False)[0]))
    stock = forward()
    check.sync()
    row = {"family": arch.family, "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
           "latent_size": list(check.size(arch)), "dtype": str(check.dtype),
           "build_s": round(time.perf_counter() - start, 2), "edits": {}}
    for label, make in edits_for(check, arch, model).items():
        try:
            row["edits"][label] = edit_timing(check, forward, make, stock)
        except Exception as error:  # noqa: BLE001
            row["edits"][label] = {"error": _err(error)}
    row["edits"]["attention_recorder"] = {"skipped": "keeps dense S x S maps; tested at tiny sizes on the CPU"}
    return row


def xformers_row(check: Check, name: str) -> dict:
    """attnedit on a model set to xformers: no edit equals stock (the kernel is kept), a KeyMask runs."""
    arch, model, inputs = setup(check, name)
    if arch.family == "unet":
        model.enable_xformers_memory_efficient_attention()
    else:
        model.set_attention_backend("xformers")
    forward = torch.no_grad()(lambda: model(**inputs, return_dict=False)[0])
    processors = lambda: sorted({type(m.processor).__name__ for m in model.modules() if hasattr(m, "processor")})
    stock, before = forward(), processors()
    with install(model):
        same = forward()
    mask = KeyMask(mask=box_mask(check.size(arch)))
    with install(model, mask):
        masked = forward()
    with install(model, mask, backend="reference"):
        reference = forward()
    return {"processors": before, "processors_after": processors(), "no_edit_equal": torch.equal(same, stock),
            "key_mask_finite": bool(masked.isfinite().all()), "key_mask_changed": not torch.equal(masked, stock),
            "key_mask_vs_reference_max_abs": float((masked.float() - reference.float()).abs().max())}


def section_xformers(check: Check, section: dict) -> None:
    section["xformers"] = _version("xformers")
    if section["xformers"] == "not installed" or section["xformers"].startswith("import failed"):
        return
    if check.device.type != "cuda":
        section["skipped"] = "xformers needs CUDA"
        return
    section["rows"] = []
    _rows(check, section, ["sd15", "wan2.1-t2v-1.3b"], lambda name: xformers_row(check, name))


SECTIONS = {
    "radial": lambda check, section: _rows(check, section, check.geometries, lambda g: radial_row(check, g)),
    "reference": lambda check, section: _rows(check, section, check.geometries, lambda g: reference_row(check, g)),
    "forwards": lambda check, section: _rows(check, section, list(ARCHITECTURES), lambda n: forward_row(check, n)),
    "xformers": section_xformers,
    "full": lambda check, section: gpu_check_full.section(check, section, _rows,
                                                          lambda family: copy.deepcopy(_tiny(family))),
}


# ------------------------------------------------------------------------------------------------------- run
def _version(module: str) -> str:
    try:
        return str(getattr(importlib.import_module(module), "__version__", "installed"))
    except Exception as error:  # noqa: BLE001 (a broken install is reported, not raised)
        return "not installed" if isinstance(error, ImportError) else f"import failed: {_err(error)[:200]}"


def environment(check: Check) -> dict:
    info = {**machine(), "device": str(check.device), "dtype": str(check.dtype), "cuda": torch.version.cuda,
            "flash_sdpa_available": bool(getattr(torch.backends.cuda, "is_flash_attention_available", bool)()),
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}  # False: the float32 reference is plain float32
    if check.device.type == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}", cudnn=torch.backends.cudnn.version())
    return {**info, **{name: _version(name) for name in ("xformers", "flash_attn", "triton")}}


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes, float32, CPU unless CUDA is present")
    parser.add_argument("--out", help="JSON path (default benchmarks/results/gpu_check.json; dry run: *_dry_run.json)")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--budget-s", type=float, default=420.0, help="rows that would start later are skipped")
    args = parser.parse_args(argv)
    args.out = args.out or str(RESULTS / ("gpu_check_dry_run.json" if args.dry_run else "gpu_check.json"))
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    if not only or set(only) - set(SECTIONS):
        parser.error(f"--only {args.only!r}: choose from {','.join(SECTIONS)}")
    torch._dynamo.config.recompile_limit = 64  # one flex compile per shape; never fall back to eager flex (S x S)
    check = Check(args)
    check.results["environment"] = environment(check)
    check.save()
    for name in only:
        section, start = ({"rows": []} if name != "xformers" else {}), time.perf_counter()
        check.results["sections"][name] = section
        try:
            SECTIONS[name](check, section)
        except Exception as error:  # noqa: BLE001
            section.update(error=_err(error), traceback=traceback.format_exc()[-1500:])
        section["elapsed_s"] = round(time.perf_counter() - start, 2)
        check.save()
        print(f"[{check.elapsed():6.1f} s] {name}: {json.dumps(section, default=str)[:1500]}", flush=True)
    print(f"wrote {args.out} in {check.elapsed()} s")
    return Path(args.out)


if __name__ == "__main__":
    main()
