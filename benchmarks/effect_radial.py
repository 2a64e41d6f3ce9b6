"""Radial attention on the trained shapes-t2v model: how close the radial video stays to the dense one, and the speedup.

Prompts are moving-shape captions from :mod:`attnedit.shapes.world` (a scene seed disjoint from training). For each video
length (9 frames = the 5 latent frames the model was trained on, and longer ones it has to extrapolate to, where
the radial mask is sparser) and each prompt, the stock pipeline (dense attention) and ``generate_radial`` run from
the same seed, in two radial variants:

* ``warmup``: the ``"wan"`` preset (gamma 0.2, attention sink on frame 0, first transformer layer dense) with the
  paper's dense warm-up of 12 of 50 steps scaled to 5 of the 20 steps used here;
* ``no_warmup``: the same mask on every step and layer, i.e. the mask's own effect.

Both use block 64 = one latent frame of 8x8 tokens (block 32 would keep every block at 9 frames). Per length:

* ``density``: fraction of attention blocks the radial mask keeps at a sparse call; per variant ``run_density``,
  the fraction of self-attention blocks computed over a whole run (dense warm-up included);
* per variant ``psnr`` / ``ssim``: radial video vs dense video of the same seed (whole clip, uint8), mean and
  standard error over prompts, ``psnr_min`` the worst prompt (identical videos are capped at 100 dB);
  ``dense.reference_psnr`` / ``reference_ssim``: a dense video of another seed vs the dense one, i.e. what an
  *unrelated* video of the same prompt scores;
* ``colours``: fraction of the prompt's objects whose colour ``world.detect`` finds in the last frame (dense and
  each variant);
* ``timing``: one denoiser forward (inputs captured from the first step of a run), dense (stock processors) vs
  radial at a sparse step, interleaved A/B (``harness.compare``), process clock, 1 torch thread; ``speedup`` =
  dense / radial per call, ``run_speedup`` the denoiser speedup of a whole run with the warm-up steps dense;
  ``seconds``: process seconds per generated video (VAE and text encoder included; context, not A/B timed).

Run: ``flock /tmp/attnedit-bench.lock python benchmarks/effect_radial.py`` (about 10 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import random
import statistics
import sys
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))

import numpy as np
import torch
from harness import captured_forward, compare, write_results

from attnedit import install
from attnedit.methods.radial import RadialAttention, radial_block_mask
from attnedit.pipelines.radial import generate_radial
from attnedit.shapes import world
from attnedit.shapes.builtin import CALL_DEFAULTS, TEXT_LENGTH, load_builtin, model_path

MODEL = "shapes-t2v"
TOKENS_PER_FRAME = 64  # 32x32 pixels, VAE 4x spatial, patch (1, 1, 1): 8x8 tokens per latent frame
PSNR_CAP = 100.0


def prompts(count: int, seed: int) -> list[world.Scene]:
    """Moving-shape scenes (the caption does not depend on the clip length, so all lengths share them)."""
    rng = random.Random(seed)
    return [world.sample_video_scene(rng, 9)[0] for _ in range(count)]


def to_uint8(video: np.ndarray) -> np.ndarray:
    return (np.clip(video, 0.0, 1.0) * 255).round().astype(np.uint8)


def call_kwargs(frames: int, steps: int) -> dict[str, Any]:
    return {**CALL_DEFAULTS[MODEL], "num_frames": frames, "num_inference_steps": steps,
            "max_sequence_length": TEXT_LENGTH, "output_type": "np"}


def generate(pipe: Any, prompt: str, seed: int, kwargs: dict, radial: dict | None) -> tuple[np.ndarray, float]:
    """One video (T, H, W, 3) uint8, dense when ``radial`` is None; and its process seconds."""
    generator = torch.Generator().manual_seed(seed)
    start = time.process_time()
    if radial is None:
        out = pipe(prompt, generator=generator, **kwargs)
    else:
        out = generate_radial(pipe, prompt, preset="wan", radial=radial, generator=generator, **kwargs)
    return to_uint8(out.frames[0]), time.process_time() - start


def colours_present(video: np.ndarray, scene: world.Scene) -> float:
    """Fraction of the prompt's objects whose colour is detected in the last frame."""
    found = world.detect(video[-1])
    return sum(o.colour in found for o in scene.objects) / len(scene.objects)


def capped_psnr(a: np.ndarray, b: np.ndarray) -> float:
    return min(world.psnr(a, b), PSNR_CAP)


def compare_videos(pipe: Any, scenes: list[world.Scene], frames: int, args: argparse.Namespace,
                   variants: dict[str, dict]) -> dict[str, dict[str, list[float]]]:
    """Per prompt and variant: PSNR / SSIM against the dense video of the same seed, colour presence, seconds.

    Under ``"dense"``, the same figures for a dense video of another seed (the unrelated-video reference).
    """
    kwargs = call_kwargs(frames, args.steps)
    rows: dict[str, dict[str, list[float]]] = {
        name: {k: [] for k in ("psnr", "ssim", "colours", "seconds")} for name in ("dense", *variants)}
    for index, scene in enumerate(scenes):
        seed = args.seed + index
        dense, dense_s = generate(pipe, scene.caption(), seed, kwargs, None)
        other, _ = generate(pipe, scene.caption(), seed + 100_000, kwargs, None)
        outputs = {"dense": (other, dense_s)}
        for name, radial in variants.items():
            outputs[name] = generate(pipe, scene.caption(), seed, kwargs, radial)
        for name, (video, seconds) in outputs.items():
            colours = colours_present(dense if name == "dense" else video, scene)
            values = (capped_psnr(video, dense), world.ssim(video, dense), colours, seconds)
            for key, value in zip(rows[name], values):
                rows[name][key].append(value)
    return rows


def mean_stderr(values: list[float]) -> tuple[float, float]:
    stderr = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return round(statistics.fmean(values), 4), round(stderr, 4)


def summarize(rows: dict[str, list[float]]) -> dict[str, float]:
    """Means and standard errors over prompts (seconds: mean per video only)."""
    out: dict[str, float] = {}
    for key, values in rows.items():
        out[key], stderr = mean_stderr(values)
        if key != "seconds":
            out[f"{key}_stderr"] = stderr
    out["psnr_min"] = round(min(rows["psnr"]), 3)
    return out


def time_denoiser(pipe: Any, prompt: str, frames: int, radial: dict, args: argparse.Namespace) -> dict[str, Any]:
    """Denoiser forward dense vs radial at a sparse step (dense_steps=0 here), 1 thread, process clock."""
    kwargs = {**call_kwargs(frames, 1), "output_type": "latent"}
    forward = captured_forward(pipe, pipe.transformer, prompt=prompt, generator=torch.Generator().manual_seed(0),
                               **kwargs)
    edit = RadialAttention.preset("wan", **{**radial, "dense_steps": 0})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        dense_out = forward()[0]
        with install(pipe.transformer, edit):
            radial_out = forward()[0]
        timing = compare(forward, forward, variant_context=lambda: install(pipe.transformer, edit),
                         rounds=args.rounds, repeats=args.repeats, warmup=1, clock="process")
    finally:
        torch.set_num_threads(threads)
    timing["output_rel_diff"] = float((radial_out - dense_out).norm() / dense_out.norm())
    return timing


def mask_density(latent_frames: int, radial: dict) -> float:
    """Fraction of (query block, key block) pairs the radial mask keeps at a sparse call."""
    edit = RadialAttention.preset("wan", **radial)
    mask = radial_block_mask(latent_frames, TOKENS_PER_FRAME, edit.block_size, float(edit.decay), edit.sink)
    return float(mask.float().mean())


def run_density(density: float, radial: dict, steps: int, layers: int) -> float:
    """Fraction of self-attention blocks computed over a whole run, dense warm-up steps and layers included."""
    dense_calls = sum(t < radial["dense_steps"] or layer < radial["dense_layers"]
                      for t in range(steps) for layer in range(layers))
    return (dense_calls + (steps * layers - dense_calls) * density) / (steps * layers)


def run_speedup(timing: dict, steps: int, dense_steps: int) -> float:
    """Denoiser speedup of a whole run: the warm-up steps cost a dense call, the others a radial one."""
    dense, sparse = timing["baseline_s"], timing["variant_s"]
    return steps * dense / (dense_steps * dense + (steps - dense_steps) * sparse)


def variant_row(rows: dict[str, list[float]], timing: dict, density: float, radial: dict,
                args: argparse.Namespace, layers: int) -> dict[str, Any]:
    """One radial variant at one length: quality vs dense, run density, per-call and per-run speedups."""
    return {**summarize(rows), "run_density": round(run_density(density, radial, args.steps, layers), 4),
            "timing": timing, "speedup": round(1 / timing["ratio"], 3),
            "run_speedup": round(run_speedup(timing, args.steps, radial["dense_steps"]), 3)}


def evaluate_length(pipe: Any, scenes: list[world.Scene], frames: int, variants: dict[str, dict],
                    args: argparse.Namespace) -> dict[str, Any]:
    """Every figure of one video length."""
    latent = 1 + (frames - 1) // 2  # causal VAE, 2x temporal
    start = time.perf_counter()
    rows = compare_videos(pipe, scenes, frames, args, variants)
    density = mask_density(latent, next(iter(variants.values())))
    layers = pipe.transformer.config.num_layers
    dense = summarize(rows.pop("dense"))
    row: dict[str, Any] = {
        "num_frames": frames, "latent_frames": latent, "tokens": latent * TOKENS_PER_FRAME,
        "density": round(density, 4), "ideal_attention_speedup": round(1 / density, 3),
        "dense": {"reference_psnr": dense["psnr"], "reference_psnr_stderr": dense["psnr_stderr"],
                  "reference_ssim": dense["ssim"], "reference_ssim_stderr": dense["ssim_stderr"],
                  "colours": dense["colours"], "colours_stderr": dense["colours_stderr"], "seconds": dense["seconds"]},
    }
    for name, radial in variants.items():
        timing = time_denoiser(pipe, scenes[0].caption(), frames, radial, args)
        row[name] = variant_row(rows[name], timing, density, radial, args, layers)
    row["seconds"] = round(time.perf_counter() - start, 1)
    report(row, variants)
    return row


def report(row: dict[str, Any], variants: dict[str, dict]) -> None:
    dense = row["dense"]
    print(f"{row['num_frames']:3d} frames ({row['latent_frames']} latent), density {row['density']:.3f}: other seed "
          f"PSNR {dense['reference_psnr']:.2f} SSIM {dense['reference_ssim']:.3f}, colours {dense['colours']:.2f}  "
          f"[{row['seconds']:.0f}s]", flush=True)
    for name in variants:
        v = row[name]
        print(f"    {name:10s} PSNR {v['psnr']:.2f} dB (min {v['psnr_min']:.1f})  SSIM {v['ssim']:.3f}  colours "
              f"{v['colours']:.2f}  per-call speedup {v['speedup']:.2f}x  run {v['run_speedup']:.2f}x", flush=True)


def checkpoint_time() -> str:
    """When the transformer weights were written (the model is retrained in place; this tells the versions apart)."""
    files = list((model_path(MODEL) / "transformer").glob("*.safetensors"))
    stamp = max(f.stat().st_mtime for f in files)
    return datetime.datetime.fromtimestamp(stamp).isoformat(timespec="seconds")


def variants_from(args: argparse.Namespace) -> dict[str, dict]:
    """The preset with its warm-up (dense first steps and layer) and, for the mask's own effect, no warm-up."""
    dense_steps = round(12 * args.steps / 50) if args.dense_steps is None else args.dense_steps
    warm = {"block_size": args.block_size, "dense_steps": dense_steps, "dense_layers": args.dense_layers}
    return {"warmup": warm, "no_warmup": {**warm, "dense_steps": 0, "dense_layers": 0}}


def settings(variants: dict[str, dict]) -> dict[str, dict]:
    out = {}
    for name, radial in variants.items():
        edit = RadialAttention.preset("wan", **radial)
        out[name] = {"preset": "wan", "kinds": sorted(edit.kinds), **{
            k: getattr(edit, k) for k in ("decay", "sink", "block_size", "dense_steps", "dense_layers")}}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--frames", type=int, nargs="+", default=[9, 17, 33], help="video lengths, each 1 + 2k")
    parser.add_argument("--steps", type=int, default=CALL_DEFAULTS[MODEL]["num_inference_steps"])
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--dense-steps", type=int, default=None, help="default: 12 of 50 scaled to --steps")
    parser.add_argument("--dense-layers", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=4321, help="scene and sampling seed (training used 0)")
    parser.add_argument("--quick", action="store_true", help="2 prompts, short timing: a smoke run")
    parser.add_argument("--out", default="effect_radial")
    args = parser.parse_args()
    if args.quick:
        args.prompts, args.rounds, args.repeats = 2, 1, 1
    bad = [f for f in args.frames if f < 1 or f % 2 == 0]
    if bad:
        parser.error(f"--frames {bad}: this VAE needs 1 + 2k frames (e.g. 9, 17, 33)")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    start = time.perf_counter()
    pipe, scenes, variants = load_builtin(MODEL), prompts(args.prompts, args.seed), variants_from(args)
    rows = [evaluate_length(pipe, scenes, frames, variants, args) for frames in args.frames]
    results = {
        "model": MODEL, "checkpoint_written": checkpoint_time(), "prompts": len(scenes), "steps": args.steps,
        "guidance_scale": CALL_DEFAULTS[MODEL]["guidance_scale"], "radial": settings(variants), "seed": args.seed,
        "generation_threads": torch.get_num_threads(), "timing_threads": 1, "psnr_cap_db": PSNR_CAP,
        "lengths": rows, "seconds": round(time.perf_counter() - start, 1),
    }
    print(write_results(args.out, results))


if __name__ == "__main__":
    main()
