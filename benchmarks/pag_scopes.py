"""PAG's scopes on a joint [image; text] sequence, measured on the tiny SD3 against diffusers' own SD3 PAG pipeline.

For PAG on every head of one joint block (and of both), at the same seed and CFG: the largest difference between
``perturbed_guidance(scope="image-image")`` and ``StableDiffusion3PAGPipeline``, between the scopes ("image" and
"all" against "image-image"), and PAG's own effect (diffusers' PAG against the plain pipeline), in latents and in
decoded images (values in [0, 1]). A second model with qk-norm (as SD3.5) shows what diffusers' SD3 PAG processors
change when they skip norm_q / norm_k: at pag_scale 1e-6 their output against the stock pipeline's.
Run: ``python benchmarks/pag_scopes.py`` (about a minute on one CPU thread).
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))

import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3PAGPipeline
from harness import write_results

from attnedit.methods.head_guidance import perturbed_guidance
from attnedit.models import zoo

SCALE = 3.0


def diffusers_pag(pipe, layers: list[int]) -> StableDiffusion3PAGPipeline:
    params = inspect.signature(StableDiffusion3PAGPipeline.__init__).parameters
    names = [re.escape(f"transformer_blocks.{i}.attn") + "$" for i in layers]  # full names: no "blocks.1" ~ "blocks.10"
    pag = StableDiffusion3PAGPipeline(**{k: v for k, v in pipe.components.items() if k in params}, pag_applied_layers=names)
    pag.set_progress_bar_config(disable=True)
    return pag


def run(pipe, output: str, seed: int, steps: int, **extra) -> torch.Tensor:
    kwargs = {**zoo.call_kwargs("sd3"), "num_inference_steps": steps, "output_type": output}
    images = pipe(**kwargs, **extra, generator=torch.Generator().manual_seed(seed)).images
    return torch.as_tensor(images).float()


def largest(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def compare(pipe, layers: list[int], seeds: list[int], steps: int) -> dict[str, dict[str, float]]:
    heads = ",".join(f"L{i}" for i in layers)
    pag = diffusers_pag(pipe, layers)
    found: dict[str, dict[str, float]] = {}
    for output in ("latent", "np"):
        rows = {k: 0.0 for k in ("ours_vs_diffusers", "image_vs_image_image", "all_vs_image_image", "pag_effect")}
        for seed in seeds:
            theirs = run(pag, output, seed, steps, pag_scale=SCALE)
            ours = {}
            for scope in ("image-image", "image", "all"):
                with perturbed_guidance(pipe, heads, scale=SCALE, scope=scope):
                    ours[scope] = run(pipe, output, seed, steps)
            plain = run(pipe, output, seed, steps)
            rows["ours_vs_diffusers"] = max(rows["ours_vs_diffusers"], largest(ours["image-image"], theirs))
            rows["image_vs_image_image"] = max(rows["image_vs_image_image"], largest(ours["image"], ours["image-image"]))
            rows["all_vs_image_image"] = max(rows["all_vs_image_image"], largest(ours["all"], ours["image-image"]))
            rows["pag_effect"] = max(rows["pag_effect"], largest(theirs, plain))
        found["latents" if output == "latent" else "images"] = rows
    return found


def qk_norm_gap(pipe, seeds: list[int], steps: int) -> dict[str, float]:
    """diffusers' SD3 PAG on a model with qk-norm, at a vanishing pag_scale, against the stock pipeline."""
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(**{**pipe.transformer.config, "qk_norm": "rms_norm"}).eval()
    normed = type(pipe)(**{**pipe.components, "transformer": transformer})
    normed.set_progress_bar_config(disable=True)
    pag, gap, ours = diffusers_pag(normed, [0]), 0.0, 0.0
    for seed in seeds:
        stock = run(normed, "np", seed, steps)
        gap = max(gap, largest(run(pag, "np", seed, steps, pag_scale=1e-6), stock))
        with perturbed_guidance(normed, "L0", scale=1e-6, scope="image-image"):
            ours = max(ours, largest(run(normed, "np", seed, steps), stock))
    return {"diffusers_pag_vs_stock_images": gap, "attnedit_vs_stock_images": ours}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pipe = zoo.build_pipeline("sd3")
    seeds = list(range(args.seeds))
    results = {f"layers {','.join(map(str, layers))}": compare(pipe, layers, seeds, args.steps)
               for layers in ([0], [1], [0, 1])}
    results["qk_norm"] = qk_norm_gap(pipe, seeds, args.steps)
    results["settings"] = {"model": "tiny sd3 (zoo)", "seeds": args.seeds, "steps": args.steps, "pag_scale": SCALE,
                           "cfg": zoo.call_kwargs("sd3")["guidance_scale"]}
    for name, rows in results.items():
        print(name, rows)
    print(write_results("pag_scopes", results))


if __name__ == "__main__":
    main()
