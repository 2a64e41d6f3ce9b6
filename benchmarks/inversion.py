"""Inversion accuracy: how well sampling returns to the source latent after inversion, by steps and iterations.

For each tiny family (DDIM on SD 1.5 / SDXL, Euler inversion of the velocity ODE on SD3 / FLUX), a unit-variance
latent (what a trained VAE's scaled latents look like; the random tiny VAEs give latents of arbitrary scale) is
inverted with ``inversion_iterations`` fixed-point refinements per step, then sampled back without CFG; the
figure is ||z - z0|| / ||z0||. Random tiny weights make a worst case: their
predictions change fast along the trajectory, so plain inversion drifts far more than on trained models.
Run: ``python benchmarks/inversion.py`` (about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))

import torch
from harness import write_results

from attnedit.models import zoo
from attnedit.pipelines.design_edit import DesignEditConfig, DesignEditor


def reconstruction_error(pipe, steps: int, iterations: int, size: int) -> float:
    config = DesignEditConfig(num_steps=steps, guidance_scale=1.0, inversion_iterations=iterations, resolution=size)
    editor = DesignEditor(pipe, config)
    run = editor.model.run((size, size))
    side = size // pipe.vae_scale_factor
    z0 = torch.randn(1, editor.model.denoiser.config.get("in_channels") if editor.model.family != "flux" else 16,
                     side, side, generator=torch.Generator().manual_seed(0))
    z, _ = editor._denoise(editor.invert(z0, run), run, None, [])
    return float((z - z0).norm() / z0.norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--families", nargs="*", default=["sd15", "sdxl", "sd3", "flux"])
    parser.add_argument("--steps", type=int, nargs="*", default=[8, 16, 32])
    parser.add_argument("--iterations", type=int, nargs="*", default=[0, 1, 2, 4])
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {}
    for family in args.families:
        pipe = zoo.load_tiny_pipeline(family)
        results[family] = {f"steps_{s}": {f"iterations_{k}": reconstruction_error(pipe, s, k, args.size)
                                          for k in args.iterations} for s in args.steps}
        print(family, {s: {k: round(v, 4) for k, v in row.items()} for s, row in results[family].items()})
    print("written", write_results("inversion", results))


if __name__ == "__main__":
    main()
