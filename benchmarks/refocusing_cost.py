"""Cost of attention refocusing: wall time and peak memory of a refocused generation vs the plain pipeline.

Each (size, variant) runs in its own subprocess (one torch thread) so that peak memory is that variant's own:
peak memory is ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` at the end (the process high-water mark), reported
as is and minus the resident set size measured after loading the pipeline (``extra``: what the generation itself
added). On CUDA, ``torch.cuda.max_memory_allocated`` is reported instead. Wall time is the median of ``repeats``
generations after one warm-up generation; the refocused run uses the paper's schedule (``RefocusConfig()``
defaults: refocusing in the first 25 of 50 steps, 5 inner iterations in steps 0-4, CAR + SAR).

    flock /tmp/attnedit-bench.lock python benchmarks/refocusing_cost.py
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

LAYOUT = {"prompt": "a red cat sitting on a blue square",
          "regions": [{"phrase": "red cat", "boxes": [[0.0, 0.0, 0.5, 1.0]]},
                      {"phrase": "blue square", "boxes": [[0.5, 0.25, 1.0, 0.75]]}]}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(args: argparse.Namespace) -> dict:
    import torch

    from attnedit import zoo
    from attnedit.pipelines.refocusing import refocus
    from attnedit.refocusing import Layout, RefocusConfig

    torch.set_num_threads(1)
    pipe = zoo.load_tiny_pipeline(args.family)
    layout = Layout.from_dict(LAYOUT)
    config = RefocusConfig(refocus_steps=args.refocus_steps, gradient_checkpointing=args.checkpointing)
    kwargs = {"num_inference_steps": args.steps, "height": args.size, "width": args.size, "output_type": "latent"}
    if args.family == "sd3":
        kwargs["max_sequence_length"] = 32

    def run() -> None:
        generator = torch.Generator().manual_seed(0)
        if args.variant == "plain":
            pipe(layout.prompt, generator=generator, **kwargs)
        else:
            refocus(pipe, layout, config=config, generator=generator, **kwargs)

    loaded = _rss_mb()
    times = []
    for i in range(args.repeats + 1):
        start = time.perf_counter()
        run()
        if i:  # the first run is a warm-up
            times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": statistics.median(times), "peak_rss_mb": peak, "extra_mb": peak - loaded}


def measure(args: argparse.Namespace, size: int, variant: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", variant, "--family", args.family, "--steps", str(args.steps),
           "--refocus-steps", str(args.refocus_steps), "--repeats", str(args.repeats), "--sizes", str(size)]
    if args.checkpointing and variant == "refocused":
        cmd.append("--checkpointing")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="sd15", choices=["sd15", "sdxl", "sd3"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256], help="image sizes in pixels (square)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--refocus-steps", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in the refocused run")
    parser.add_argument("--worker", choices=["plain", "refocused"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.size, args.variant = args.sizes[0], args.worker
        print(json.dumps(worker(args)))
        return
    sys.path.insert(0, os.path.dirname(__file__))
    from harness import write_results

    results = {"family": args.family, "steps": args.steps, "refocus_steps": args.refocus_steps,
               "checkpointing": args.checkpointing, "memory": "ru_maxrss per subprocess; extra = peak - RSS after load",
               "sizes": {}}
    for size in args.sizes:
        plain, refocused = measure(args, size, "plain"), measure(args, size, "refocused")
        row = {"plain": plain, "refocused": refocused, "time_ratio": refocused["seconds"] / plain["seconds"],
               "peak_ratio": refocused["peak_rss_mb"] / plain["peak_rss_mb"],
               "extra_ratio": refocused["extra_mb"] / max(plain["extra_mb"], 1e-3)}
        results["sizes"][str(size)] = row
        print(f"{args.family} {size}px: time {plain['seconds']:.3f}s -> {refocused['seconds']:.3f}s "
              f"(x{row['time_ratio']:.2f}); peak RSS {plain['peak_rss_mb']:.0f} -> {refocused['peak_rss_mb']:.0f} MB "
              f"(x{row['peak_ratio']:.2f}); extra {plain['extra_mb']:.0f} -> {refocused['extra_mb']:.0f} MB")
    suffix = "_checkpointing" if args.checkpointing else ""
    print(write_results(f"refocusing_cost_{args.family}{suffix}", results))


if __name__ == "__main__":
    main()
