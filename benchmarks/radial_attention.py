"""Radial attention call alone vs dense SDPA, at several sequence lengths and mask densities.

Same process, A/B interleaved (benchmarks/harness.py). For each video geometry (latent frames x tokens per frame)
the radial block mask (block 128, Wan settings: gamma 0.2, sink) is built once; the variant is
``attnedit.core.block_sparse.block_sparse_attention`` (CPU) or FlexAttention with that BlockMask (``--device cuda``), the
baseline is ``F.scaled_dot_product_attention`` on the same q, k, v. Reported: speedup = dense / sparse next to the
ideal 1 / density and their quotient ("fraction of ideal"). Target on CPU: >= 0.6 of ideal at density <= 0.35 and
>= 16k tokens. Run: ``flock /tmp/attnedit-bench.lock python benchmarks/radial_attention.py``.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import torch
import torch.nn.functional as F
from harness import compare, write_results

from attnedit import BlockMask
from attnedit.core.attention import flex_attention
from attnedit.core.block_sparse import block_sparse_attention
from attnedit.methods.radial import radial_block_mask

CPU_GEOMETRIES = ((32, 256), (16, 512), (64, 256), (32, 512), (96, 256), (21, 1560))
# Wan 2.1 1.3B: 81 frames -> 21 latent frames; 480x832 -> 30x52 = 1560, 720x1280 -> 45x80 = 3600 tokens per frame
CUDA_GEOMETRIES = ((21, 1560), (21, 3600), (18, 3840))


def measure(frames: int, per_frame: int, args: argparse.Namespace) -> dict:
    n = frames * per_frame
    blocks = radial_block_mask(frames, per_frame, args.block, args.decay, sink=True)
    mask = BlockMask(blocks.to(args.device), args.block, n, n)
    gen = torch.Generator(args.device).manual_seed(0)
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    q, k, v = (torch.randn(1, args.heads, n, args.head_dim, generator=gen, device=args.device, dtype=dtype) for _ in range(3))
    sparse = block_sparse_attention if args.device == "cpu" else flex_attention
    timing = compare(
        lambda: F.scaled_dot_product_attention(q, k, v), lambda: sparse(q, k, v, None, mask),
        rounds=args.rounds, repeats=args.repeats, warmup=1, device=args.device, clock=args.clock,
    )
    speedup, ideal = 1 / timing["ratio"], 1 / mask.density
    row = {"frames": frames, "tokens_per_frame": per_frame, "tokens": n, "density": round(mask.density, 4), **timing,
           "speedup": round(speedup, 3), "ideal_speedup": round(ideal, 3), "fraction_of_ideal": round(speedup / ideal, 3)}
    print(f"{n:6d} tokens  density {mask.density:.3f}  dense {timing['baseline_s']:.3f}s  sparse {timing['variant_s']:.3f}s  "
          f"speedup {speedup:.2f}x  ideal {ideal:.2f}x  ({speedup / ideal:.0%} of ideal)", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--heads", type=int, default=1)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--decay", type=float, default=0.2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--clock", default="process", choices=["process", "wall"])
    parser.add_argument("--name", default=None, help="results file name (default radial_attention_<device>)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.device == "cuda":
        args.clock, args.heads, args.head_dim = "wall", 12, 128  # Wan 1.3B: 12 heads of 128
    geometries = CPU_GEOMETRIES if args.device == "cpu" else CUDA_GEOMETRIES
    rows = [measure(f, s, args) for f, s in geometries]
    config = {k: v for k, v in vars(args).items() if k != "name"}
    path = write_results(args.name or f"radial_attention_{args.device}", {"config": config, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
