"""Cost of attention refocusing: time and peak memory of a refocused generation vs the plain pipeline, same run.

Models: the tiny zoo pipelines (SD 1.5, SDXL, SD3, FLUX; random weights) at 256 px and the built-in ``shapes-t2i``
at its 64 px, with the default schedule capped at ``--refocus-steps`` (25). Every named schedule side by side,
with its effect: ``refocusing_frontier.py``.

* Time: one subprocess per model (one torch thread) alternates plain and refocused generations in rounds after a
  warm-up of each (:func:`harness.compare`, which spreads slow drifts of a shared machine over both sides) and
  reports the medians and their ratio. ``--clock process`` (the default) counts the CPU time of that process,
  which other load on the machine disturbs less than wall time; ``--clock wall`` is also available.
* Memory: one subprocess per (model, variant) runs one warm-up and one generation; its peak is
  ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (the process high-water mark), also reported minus the resident
  set size after loading the pipeline (``extra``: what the generation itself added). On CUDA
  (``--device cuda``) ``torch.cuda.max_memory_allocated`` is reported instead.

``--breakdown`` (written to ``refocusing_cost_breakdown.json``, without the timings above) splits refocused
generation per model by CPU time (medians of ``--rounds`` alternating plain/refocused runs): the prefix forwards, their backward passes, the losses, and the rest (setup,
probe, per-step installation), and sets them against the plain generation and one full conditional forward. It
says why a ratio is what it is: with ``n`` iterations of cost ``c`` each, refocused / plain >= 1 + n c / plain,
whatever the rest costs.

The same run times one prefix forward three ways (no gradients and no recording: what truncation leaves; with
the recorders: what the dense path at the recorded sites adds; with gradients: what keeping activations adds).

``--flops`` adds a FLOP count of plain vs refocused generation for the published SD 1.5 (512 px), SDXL (1024 px)
and FLUX.1 (1024 px) architectures, built on the meta device (no weights, no compute): the refocusing forward and
backward as the pipeline runs them (probe, prefix, recorded layers on the dense path), times the iterations of the
paper's schedule without early stops, against 50 plain steps (SD: a CFG batch of 2; FLUX: one pass).

    flock /tmp/attnedit-bench.lock python benchmarks/refocusing_cost.py            # every model, 256 px
    flock /tmp/attnedit-bench.lock python benchmarks/refocusing_cost.py --models sd15 --checkpointing
"""

from __future__ import annotations

import argparse
import dataclasses
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
MODELS = ("sd15", "sdxl", "sd3", "flux", "shapes-t2i")
SIZES = {"shapes-t2i": 64}  # the built-in model's own size; the zoo models run at --size


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _setup(args: argparse.Namespace):
    """(pipe, layout, config, plain(), refocused()) for one model, one torch thread."""
    import torch

    from attnedit.methods.refocusing import Layout, RefocusConfig
    from attnedit.models import zoo
    from attnedit.pipelines.refocusing import refocus

    torch.set_num_threads(1)
    size = SIZES.get(args.model, args.size)
    kwargs = {"num_inference_steps": args.steps, "height": size, "width": size, "output_type": "latent"}
    if args.model == "shapes-t2i":
        sys.path.insert(0, os.path.dirname(__file__))
        from effect_refocusing import layouts

        from attnedit.shapes.builtin import CALL_DEFAULTS, load_builtin

        pipe = load_builtin(args.model)
        layout = layouts(1, seed=1234)[0][1]  # the first layout of effect_refocusing.py
        kwargs["guidance_scale"] = CALL_DEFAULTS[args.model]["guidance_scale"]
    else:
        pipe = zoo.load_tiny_pipeline(args.model)
        layout = Layout.from_dict(LAYOUT)
        if args.model in ("sd3", "flux"):
            kwargs["max_sequence_length"] = 32
    pipe = pipe.to(args.device)
    pipe.set_progress_bar_config(disable=True)
    config = RefocusConfig(refocus_steps=args.refocus_steps,
                           gradient_checkpointing=True if args.checkpointing else None)

    def plain() -> None:
        pipe(layout.prompt, generator=torch.Generator().manual_seed(0), **kwargs)

    def refocused() -> None:
        refocus(pipe, layout, config=config, generator=torch.Generator().manual_seed(0), **kwargs)

    return pipe, plain, refocused


def memory_worker(args: argparse.Namespace) -> dict:
    import torch

    _, plain, refocused = _setup(args)
    run = plain if args.worker == "plain" else refocused
    cuda = args.device.startswith("cuda")
    loaded = torch.cuda.memory_allocated() / 2**20 if cuda else _rss_mb()
    start = time.perf_counter()
    run()  # warm-up
    first = time.perf_counter() - start
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    run()
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"peak_mb": peak, "extra_mb": peak - loaded, "first_run_s": first}


def time_worker(args: argparse.Namespace) -> dict:
    sys.path.insert(0, os.path.dirname(__file__))
    from harness import compare

    _, plain, refocused = _setup(args)
    return compare(plain, refocused, rounds=args.rounds, repeats=1, warmup=1, device=args.device, clock=args.clock)


def breakdown_worker(args: argparse.Namespace) -> dict:
    """CPU seconds of one refocused generation by part (instrumented), against the plain one and a full forward."""
    import torch

    import attnedit.methods.refocusing as rf
    from attnedit.pipelines import refocusing as pr

    pipe, plain, refocused = _setup(args)
    spent: dict[str, float] = {"prefix_forward": 0.0, "backward": 0.0, "loss": 0.0}
    counts: dict[str, int] = dict.fromkeys(spent, 0)

    def timed(name, fn):
        def wrapper(*a, **k):
            start = time.process_time()
            try:
                return fn(*a, **k)
            finally:
                spent[name] += time.process_time() - start
                counts[name] += 1
        return wrapper

    originals = (pr._Refocuser._run, rf.refocus_loss, torch.autograd.grad)
    pr._Refocuser._run = timed("prefix_forward", originals[0])
    rf.refocus_loss = timed("loss", originals[1])
    torch.autograd.grad = timed("backward", originals[2])  # refocus_latents' one gradient call per iteration
    rounds = []
    try:
        plain(), refocused()  # warm-up (caches, probe)
        for _ in range(args.rounds):  # alternate, then take medians: slow drifts of a shared machine hit both sides
            for key in spent:
                spent[key], counts[key] = 0.0, 0
            start = time.process_time()
            plain()
            plain_s = time.process_time() - start
            start = time.process_time()
            refocused()
            rounds.append({"plain_s": plain_s, "refocused_s": time.process_time() - start, **spent})
    finally:
        pr._Refocuser._run, rf.refocus_loss, torch.autograd.grad = originals
    median = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    plain_s, refocused_s = median["plain_s"], median["refocused_s"]
    spent = {key: median[key] for key in spent}
    full_s = _full_conditional_forward_s(pipe, args)
    variants = _prefix_variants_s(pipe, args)
    work = spent["prefix_forward"] + spent["backward"] + spent["loss"]  # the refocusing iterations themselves
    return {"rounds": len(rounds), "plain_s": plain_s, "refocused_s": refocused_s, "ratio": refocused_s / plain_s,
            "plain_step_s": plain_s / args.steps, "calls": counts, "seconds": spent,
            "per_call_s": {k: v / max(counts[k], 1) for k, v in spent.items()},
            "other_s": refocused_s - plain_s - work,
            "full_conditional_forward_s": full_s,
            "prefix_share_of_full_forward": spent["prefix_forward"] / max(counts["prefix_forward"], 1) / full_s,
            "ratio_floor": 1 + work / plain_s, "work_budget_for_1_6_s": 0.6 * plain_s,
            "prefix_forward_variants_s": variants}


def _prefix_variants_s(pipe, args: argparse.Namespace) -> dict:
    """CPU seconds of one refocusing prefix forward three ways: what truncation, recording and gradients cost."""
    import torch

    from attnedit import install
    from attnedit.methods.refocusing import Layout, RefocusConfig
    from attnedit.models.zoo import denoiser
    from attnedit.pipelines import refocusing as pr

    model = denoiser(pipe)
    layout = Layout.from_dict(LAYOUT)
    forward, x, t = _conditional_inputs(pipe, args)
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        with install(pipe) as handle:
            recorders = pr._recorders(handle, pipe, forward, x, t, RefocusConfig())
            refocuser = pr._Refocuser(handle, forward, recorders, layout, RefocusConfig(), None)
            stop = pr._Prefix()
            hook = dict(model.named_modules())[refocuser.stop_site.name].register_forward_hook(stop)

            def prefix(grad: bool, record: bool) -> None:
                for r in recorders:
                    r.clear()
                handle.edits = tuple(recorders) if record else ()
                with torch.set_grad_enabled(grad), handle.branches("cond"):
                    refocuser._run(x.detach().requires_grad_(grad), t, stop)

            prefix(False, True)  # the first call checks that the stop site comes after every recorded map
            out = {}
            for name, grad, record in (("no_grad_no_recording", False, False), ("no_grad_recording", False, True),
                                       ("grad_recording", True, True)):
                prefix(grad, record)
                start = time.process_time()
                for _ in range(5):
                    prefix(grad, record)
                out[name] = (time.process_time() - start) / 5
            hook.remove()
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return out


def _conditional_inputs(pipe, args: argparse.Namespace):
    """(forward(x, t), x, t): the refocusing forward of the benchmark layout's prompt, its noise and first step."""
    import torch

    from attnedit.families import detect_family
    from attnedit.models.zoo import denoiser
    from attnedit.pipelines import refocusing as pr

    model = denoiser(pipe)
    family, size = detect_family(model).name, (SIZES.get(args.model, args.size),) * 2
    forward = pr._conditioner(pipe, family, LAYOUT["prompt"], size, 32)
    x = pr._initial_noise(pipe, family, model, size, torch.Generator().manual_seed(0))
    return forward, x, pr._timesteps(pipe, family, args.steps, x)[0]


def _full_conditional_forward_s(pipe, args: argparse.Namespace) -> float:
    """CPU seconds of one whole conditional (batch 1) denoiser forward, no gradients, stock processors."""
    import torch

    forward, x, t = _conditional_inputs(pipe, args)
    with torch.no_grad():
        forward(x, t)
        start = time.process_time()
        for _ in range(5):
            forward(x, t)
    return (time.process_time() - start) / 5


def _child(args: argparse.Namespace, model: str, worker: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", worker, "--models", model, "--steps", str(args.steps),
           "--refocus-steps", str(args.refocus_steps), "--size", str(args.size), "--rounds", str(args.rounds),
           "--clock", args.clock, "--device", args.device]
    if args.checkpointing:
        cmd.append("--checkpointing")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ FLOPs on meta
def flop_counts(steps: int = 50, refocus_steps: int = 25) -> dict:
    """FLOPs of plain and refocused generation for published architectures (meta device, no weights)."""
    from attnedit.methods.refocusing import RefocusConfig

    config = RefocusConfig(refocus_steps=refocus_steps)
    iterations = sum(config.max_iterations(i) for i in range(refocus_steps))
    out = {}
    for name, family, size, cfg_batch, text in (("sd15", "unet", (64, 64), 2, 77),
                                                ("sdxl-base", "unet", (128, 128), 2, 77),
                                                ("flux1-dev", "flux", (64, 64), 1, 512)):
        plain, full, short, stop_site = _architecture_flops(name, family, size, cfg_batch, text, config)
        ratio = lambda per_iteration, plain=plain: 1 + iterations * per_iteration / (steps * plain)
        out[name] = {"size_px": size[0] * (8 if family == "unet" else 16), "plain_forward_flops": plain,
                     "iteration_flops_prefix": short, "iteration_flops_full": full, "iterations": iterations,
                     "flop_ratio_prefix": ratio(short), "flop_ratio_full_forward": ratio(full), "stop_site": stop_site}
        print(f"{name}: plain forward {plain / 1e12:.2f} TFLOP, iteration {full / 1e12:.2f} -> "
              f"{short / 1e12:.2f} TFLOP (prefix); FLOP ratio x{ratio(full):.2f} -> x{ratio(short):.2f}", flush=True)
    return out


def _count(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _architecture_flops(name: str, family: str, size: tuple[int, int], cfg_batch: int, text: int,
                        config) -> tuple[int, int, int, str]:
    """(plain forward, refocusing iteration with the whole network, with the prefix only, stop site) on meta."""
    import torch

    from attnedit import install
    from attnedit.methods.refocusing import Layout, TokenLayout
    from attnedit.models.architectures import get_architecture
    from attnedit.pipelines import refocusing as pr

    layout = Layout.from_dict(LAYOUT)
    tokens = TokenLayout(tuple(range(1, 9)), ((1, 2), (6, 7)))  # CLIP positions of the layout's phrases
    arch = get_architecture(name)
    model = arch.build("full", device="meta")
    model.requires_grad_(False)  # as during refocusing
    key = "sample" if family == "unet" else "hidden_states"
    plain_kwargs = _meta(arch.inputs(model, batch=cfg_batch, size=size, text=text))
    kwargs = _meta(arch.inputs(model, size=size, text=text))
    x, t = kwargs.pop(key), kwargs.pop("timestep")

    def forward(z, _t):
        return model(**{key: z, "timestep": t}, **kwargs, return_dict=False)

    with torch.no_grad():
        plain = _count(lambda: model(**plain_kwargs, return_dict=False))
    with install(model) as handle:
        # meta tensors hold no numbers: give the run state the timestep and token grid directly
        grid = tuple(x.shape[-2:]) if family == "unet" else size
        handle.state.family = _meta_family()(**{f.name: getattr(handle.family, f.name)
                                                for f in dataclasses.fields(handle.family)}, grid=grid)
        recorders = pr._recorders(handle, None, forward, x, t, config)
        refocuser = pr._Refocuser(handle, forward, recorders, layout, config, tokens)
        handle.edits = tuple(recorders)
        stop = pr._Prefix()
        hook = dict(model.named_modules())[refocuser.stop_site.name].register_forward_hook(stop)

        def iteration(prefix: bool) -> None:
            for r in recorders:
                r.clear()
            z = x.detach().requires_grad_(True)
            with torch.enable_grad(), handle.branches("cond"):
                refocuser._run(z, t, stop if prefix else None)
                # the losses' own FLOPs are negligible (and index by value): a sum over the same maps
                loss = sum(m.probs.float().mean() for r in recorders for m in r.maps)
                loss.backward()  # FlopCounterMode cannot follow autograd.grad; z is the only leaf

        try:
            short, full = _count(lambda: iteration(True)), _count(lambda: iteration(False))
        finally:
            hook.remove()
    return plain, full, short, refocuser.stop_site.name


def _meta_family():
    from attnedit.core.families import Family

    @dataclasses.dataclass(frozen=True)
    class MetaFamily(Family):
        grid: tuple = ()

        def timestep(self, model, args, kwargs) -> float:
            return 500.0

        def token_grid(self, model, latent, bound) -> tuple:
            return self.grid

    return MetaFamily


def _meta(obj):
    import torch

    if torch.is_tensor(obj):
        return obj.to("meta")
    return {k: _meta(v) for k, v in obj.items()} if isinstance(obj, dict) else obj


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--size", type=int, default=256, help="image size of the zoo models in pixels (square)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--refocus-steps", type=int, default=25)
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds (one generation of each side per round)")
    parser.add_argument("--clock", default="process", choices=["process", "wall"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in the refocused run")
    parser.add_argument("--flops", action="store_true", help="also count FLOPs of published architectures (meta)")
    parser.add_argument("--breakdown", action="store_true",
                        help="only split refocused generation by part (refocusing_cost_breakdown.json)")
    parser.add_argument("--out", default=None, help="results name (default refocusing_cost[_checkpointing])")
    parser.add_argument("--worker", choices=["plain", "refocused", "time", "breakdown"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.model = args.models[0]
        workers = {"time": time_worker, "breakdown": breakdown_worker}
        print(json.dumps(workers.get(args.worker, memory_worker)(args)))
        return
    sys.path.insert(0, os.path.dirname(__file__))
    from harness import write_results

    if args.breakdown:
        parts = {"steps": args.steps, "refocus_steps": args.refocus_steps, "clock": "process", "models": {}}
        for model in args.models:
            row = parts["models"][model] = _child(args, model, "breakdown")
            per, n = row["per_call_s"], row["calls"]
            print(f"{model}: plain {row['plain_s']:.2f}s, refocused {row['refocused_s']:.2f}s (x{row['ratio']:.2f}); "
                  f"{n['prefix_forward']} forwards of {1e3 * per['prefix_forward']:.1f} ms, {n['backward']} backwards of "
                  f"{1e3 * per['backward']:.1f} ms, losses {1e3 * per['loss']:.1f} ms; that work alone: floor "
                  f"x{row['ratio_floor']:.2f} (x1.6 allows {row['work_budget_for_1_6_s']:.2f}s of it); other "
                  f"{row['other_s']:.2f}s; prefix = {row['prefix_share_of_full_forward']:.2f} of a full forward",
                  flush=True)
        print(write_results(args.out or "refocusing_cost_breakdown", parts))
        return

    results = {"steps": args.steps, "refocus_steps": args.refocus_steps, "checkpointing": args.checkpointing,
               "clock": args.clock, "device": args.device,
               "memory": "peak ru_maxrss per subprocess (CUDA: max_memory_allocated); extra = peak - after load",
               "models": {}}
    for model in args.models:
        timing = _child(args, model, "time")
        plain, refocused = _child(args, model, "plain"), _child(args, model, "refocused")
        row = {"size_px": SIZES.get(model, args.size), "plain_s": timing["baseline_s"],
               "refocused_s": timing["variant_s"], "time_ratio": timing["ratio"],
               "time_ratio_of_minimums": timing["ratio_of_minimums"], "timing_samples": timing["samples"],
               "plain_memory": plain, "refocused_memory": refocused,
               "peak_ratio": refocused["peak_mb"] / plain["peak_mb"],
               "extra_ratio": refocused["extra_mb"] / max(plain["extra_mb"], 1e-3)}
        results["models"][model] = row
        print(f"{model} {row['size_px']}px: time {row['plain_s']:.2f}s -> {row['refocused_s']:.2f}s "
              f"(x{row['time_ratio']:.2f}, of minimums x{row['time_ratio_of_minimums']:.2f}); peak "
              f"{plain['peak_mb']:.0f} -> {refocused['peak_mb']:.0f} MB (x{row['peak_ratio']:.2f}); extra "
              f"{plain['extra_mb']:.0f} -> {refocused['extra_mb']:.0f} MB", flush=True)
    if args.flops:
        results["flops"] = flop_counts(args.steps, args.refocus_steps)
    name = args.out or ("refocusing_cost_checkpointing" if args.checkpointing else "refocusing_cost")
    print(write_results(name, results))


if __name__ == "__main__":
    main()
