"""Cost of the edit core with no edit active vs the stock diffusers processors, per family.

One denoiser forward per sample, inputs captured from a real pipeline call of the tiny zoo models at a
larger resolution (so attention is a real share of the time), A/B interleaved in the same process.
Two arms against stock: ``core`` (installed, no edit: the stock processor is called directly) and ``routed`` (an
edit acts at every site and step but covers no call, so every call runs the stock processor's own code with its
dispatcher call routed through attnedit, asks the family's token layout and finds nothing to edit: the price of
the dispatcher-level edit layer itself; for UNet/SD3, of the projection halves). Target: ratio <= 1.03. Run: ``python benchmarks/overhead.py`` (CPU time, 1 thread; ``--clock wall`` for wall time).
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))

import torch
from harness import captured_forward, compare, write_results

from attnedit import Edit, install


class NoCall(Edit):
    """Acts at every site and step (so calls take the routed path) but covers no attention call."""

    def covers(self, call) -> bool:
        return False
from attnedit.models import zoo

SIZES = {  # pipeline kwargs that set the token count of the captured forward
    "sd15": {"height": 256, "width": 256},
    "sdxl": {"height": 256, "width": 256},
    "sd3": {"height": 256, "width": 256},
    "flux": {"height": 512, "width": 512},
    "wan": {"height": 256, "width": 256, "num_frames": 9},
    "hunyuan_video": {"height": 256, "width": 256, "num_frames": 9},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--families", nargs="*", default=list(zoo.FAMILIES))
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clock", choices=["wall", "process"], default="process")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 makes process time meaningful)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {}
    for family in args.families:
        pipe = zoo.load_tiny_pipeline(family)
        call = {**zoo.call_kwargs(family), **SIZES[family], "num_inference_steps": 1, "output_type": "latent"}
        forward = captured_forward(pipe, zoo.denoiser(pipe), **call)
        options = dict(rounds=args.rounds, repeats=args.repeats, clock=args.clock)
        timing = compare(forward, forward, variant_context=lambda: install(pipe), **options)
        routed = compare(forward, forward, variant_context=lambda: install(pipe, NoCall()), **options)
        control = compare(forward, forward, **options)  # A/A: the same code on both sides shows the noise floor
        results[family] = {**timing, "routed": routed, "noise_ratio_stock_vs_stock": control["ratio"],
                           "size": SIZES[family]}
        print(
            f"{family:14s} stock {timing['baseline_s'] * 1e3:8.2f} ms  core {timing['variant_s'] * 1e3:8.2f} ms  "
            f"ratio {timing['ratio']:.3f}  min-ratio {timing['ratio_of_minimums']:.3f}  routed ratio "
            f"{routed['ratio']:.3f} min-ratio {routed['ratio_of_minimums']:.3f}  (stock vs stock {control['ratio']:.3f})"
        )
    print("written", write_results("overhead", results))


if __name__ == "__main__":
    main()
