"""Cost of perturbed-attention guidance per denoising step: CFG + (Soft)PAG vs CFG alone, with and without
prefix sharing, perturbed heads in an early vs a late layer.

A deeper random-weight SD3 transformer (``--layers`` joint blocks) replaces the tiny zoo one inside the stock
StableDiffusion3Pipeline; one denoiser call of a real pipeline step (batch [uncond, cond]) is captured and
replayed: "CFG" runs it as is, "CFG+PAG" under ``perturbed_guidance`` (batch [uncond, cond, perturbed]).
Deterministic: fixed seeds, process CPU time with one torch thread (``--clock wall`` for wall time).
Run: ``flock /tmp/attnedit-bench.lock python benchmarks/pag_cost.py``.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))

import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
from harness import captured_forward, compare, write_results

from attnedit.methods.head_guidance import perturbed_guidance
from attnedit.models import zoo


def bench_pipeline(layers: int, heads: int, head_dim: int) -> StableDiffusion3Pipeline:
    """The tiny SD3 pipeline with a ``layers``-block transformer (random weights, seed 0)."""
    tiny = zoo.load_tiny_pipeline("sd3")
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=layers, attention_head_dim=head_dim,
        num_attention_heads=heads, caption_projection_dim=heads * head_dim, joint_attention_dim=64,
        pooled_projection_dim=32, pos_embed_max_size=64,
    ).eval()
    pipe = StableDiffusion3Pipeline(**{**tiny.components, "transformer": transformer})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8, help="joint transformer blocks")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (256 -> 256 image tokens)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clock", choices=["wall", "process"], default="process")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = bench_pipeline(args.layers, args.heads, args.head_dim)
    call = {**zoo.call_kwargs("sd3"), "height": args.size, "width": args.size, "num_inference_steps": 1,
            "output_type": "latent", "generator": torch.Generator().manual_seed(0)}
    step = captured_forward(pipe, pipe.transformer, **call)  # one CFG step's denoiser call
    options = {"rounds": args.rounds, "repeats": args.repeats, "clock": args.clock}
    results = {"config": vars(args)}
    for where, layer in (("early", 0), ("late", args.layers - 1)):
        for share in (False, True):
            def context(layer=layer, share=share):
                return perturbed_guidance(pipe, f"L{layer}H0", scale=3.0, strength=1.0, share_prefix=share)

            timing = compare(step, step, variant_context=context, **options)
            name = f"{where}_layer{layer}_{'shared' if share else 'unshared'}"
            results[name] = {"cfg_s_per_step": timing["baseline_s"], "cfg_pag_s_per_step": timing["variant_s"],
                             "ratio_vs_cfg": timing["ratio"], "samples": timing["samples"], "clock": timing["clock"]}
            print(f"{name:28s} CFG {timing['baseline_s'] * 1e3:7.1f} ms  CFG+PAG {timing['variant_s'] * 1e3:7.1f} ms  "
                  f"ratio {timing['ratio']:.3f}")
    for where in ("early", "late"):
        layer = 0 if where == "early" else args.layers - 1
        unshared, shared = results[f"{where}_layer{layer}_unshared"], results[f"{where}_layer{layer}_shared"]
        # each side is normalized by its own interleaved CFG baseline, which cancels drift between the runs
        results[f"{where}_prefix_sharing_speedup"] = unshared["ratio_vs_cfg"] / shared["ratio_vs_cfg"]
    print({k: round(v, 3) for k, v in results.items() if k.endswith("speedup")})
    print("written", write_results("pag_cost", results))


if __name__ == "__main__":
    main()
