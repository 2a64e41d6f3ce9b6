"""Full transformer forward of a small random-weight Wan at a long sequence: dense (stock) vs radial attention.

Same process, A/B interleaved (benchmarks/harness.py). The model is a ``WanTransformer3DModel`` with random weights
(no download); the latent is ``frames`` x (2 * h) x (2 * w) so that the self-attention sees ``frames`` x ``h * w``
tokens. The variant installs ``RadialAttention`` (gamma 0.2, sink, block 128) on every attn1 layer, as in the
sparse steps of a run (the dense warm-up steps of the preset cost the same as stock). Target: ratio < 1.
Run: ``flock /tmp/attnedit-bench.lock python benchmarks/radial_wan_forward.py``.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))

import torch
from diffusers import WanTransformer3DModel
from harness import compare, write_results

from attnedit import install
from attnedit.methods.radial import RadialAttention, radial_block_mask


def build(args: argparse.Namespace) -> tuple[WanTransformer3DModel, dict]:
    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=args.heads, attention_head_dim=args.head_dim, in_channels=16,
        out_channels=16, text_dim=64, freq_dim=256, ffn_dim=4 * args.heads * args.head_dim, num_layers=args.layers,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    ).eval()
    inputs = {
        "hidden_states": torch.randn(1, 16, args.frames, 2 * args.height, 2 * args.width),
        "timestep": torch.tensor([500.0]),
        "encoder_hidden_states": torch.randn(1, 64, 64),
        "return_dict": False,
    }
    return model, inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=64, help="latent frames")
    parser.add_argument("--height", type=int, default=16, help="token rows per frame")
    parser.add_argument("--width", type=int, default=16, help="token columns per frame")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--decay", type=float, default=0.2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--clock", default="process", choices=["process", "wall"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, inputs = build(args)
    edit = RadialAttention(decay=args.decay, sink=True, block_size=128)

    @torch.no_grad()
    def forward():
        return model(**inputs)[0]

    with torch.no_grad():
        dense_out = forward()
        with install(model, edit):
            radial_out = forward()
    density = float(radial_block_mask(args.frames, args.height * args.width, 128, args.decay, sink=True).float().mean())
    timing = compare(forward, forward, variant_context=lambda: install(model, edit),
                     rounds=args.rounds, repeats=args.repeats, warmup=0, clock=args.clock)
    tokens = args.frames * args.height * args.width
    result = {
        "config": vars(args), "tokens": tokens, "density": round(density, 4), **timing,
        "speedup": round(1 / timing["ratio"], 3), "ideal_attention_speedup": round(1 / density, 3),
        "output_rel_diff": float((radial_out - dense_out).norm() / dense_out.norm()),
    }
    print(f"{tokens} tokens, density {density:.3f}: dense {timing['baseline_s']:.2f}s, radial {timing['variant_s']:.2f}s, "
          f"forward speedup {1 / timing['ratio']:.2f}x (attention ideal {1 / density:.2f}x)")
    print(f"wrote {write_results('radial_wan_forward', result)}")


if __name__ == "__main__":
    main()
