"""Refocusing schedules as a frontier: for every named schedule, its cost and its effect, side by side.

* Cost (tiny zoo SD 1.5 / SDXL / SD3 / FLUX at 256 px, published widths, reduced depth, random weights; 50 steps,
  each schedule's own refocused steps): one subprocess per model (one torch thread) alternates the plain
  generation and every schedule's refocused one in rounds (the order rotates each round) and reports each side's
  median CPU seconds and the ratio to plain *of the same process*; peak memory is ``ru_maxrss`` of one subprocess
  per (model, variant) after a warm-up, also minus the resident set after loading (``extra``).
* FLOPs at real size (``refocusing_cost.py``'s meta-device counter): SD 1.5 512 px, SDXL 1024 px, FLUX.1-dev
  1024 px; one refocusing iteration (prefix forward and backward of the schedule's map layers) times the
  schedule's updates without early stops, against 50 plain steps (SD: CFG batch 2; FLUX: one pass).
* Effect (``effect_refocusing.py``'s code): the 120 two-object layouts of the shapes world on ``shapes-t2i`` and
  ``shapes-dit``, 20 steps, loss scale 40; plain once, then each schedule from the same seeds. ``gain`` =
  refocused - plain (in-box rate); ``kept`` = a schedule's gain / the default schedule's gain; the paired standard
  error of each gain is over layouts.

Each part updates ``benchmarks/results/refocusing_frontier.json`` in place (under a lock), so parts can run
separately or at once; ``--table`` prints the README table from it.

    OMP_NUM_THREADS=1 python benchmarks/refocusing_frontier.py --part cost flops
    OMP_NUM_THREADS=1 python benchmarks/refocusing_frontier.py --part effect --models shapes-t2i
    python benchmarks/refocusing_frontier.py --table
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from harness import RESULTS, machine

from attnedit.methods.refocusing_schedule import DEFAULT_SCHEDULE, SCHEDULES, RefocusConfig

NAME = "refocusing_frontier"
COST_MODELS = ("sd15", "sdxl", "sd3", "flux")
EFFECT_MODELS = ("shapes-t2i", "shapes-dit")
ARCHITECTURES = (("sd15", "unet", (64, 64), 2, 77), ("sdxl-base", "unet", (128, 128), 2, 77),
                 ("flux1-dev", "flux", (64, 64), 1, 512))
STEPS, EFFECT_STEPS, LOSS_SCALE = 50, 20, 40.0
CHEAP = "fast-15"  # the cheap schedule the README names (x1.6 on the tiny SD 1.5 and SDXL)


def max_updates(schedule: str, steps: int) -> int:
    """Updates of ``schedule`` in a ``steps``-step run when no early stop fires."""
    config = RefocusConfig(schedule=schedule)
    return sum(config.max_iterations(i, steps) for i in range(steps) if config.refocuses(i, steps))


# ------------------------------------------------------------------------------------------------------ cost
def _setup(model: str):
    """(plain(), {schedule: refocused()}) for one tiny zoo model, one torch thread."""
    import torch
    from refocusing_cost import LAYOUT

    from attnedit.methods.refocusing import Layout
    from attnedit.models import zoo
    from attnedit.pipelines.refocusing import refocus

    torch.set_num_threads(1)
    pipe = zoo.load_tiny_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    layout = Layout.from_dict(LAYOUT)
    kwargs = {"num_inference_steps": STEPS, "height": 256, "width": 256, "output_type": "latent"}
    if model in ("sd3", "flux"):
        kwargs["max_sequence_length"] = 32

    def plain() -> None:
        pipe(layout.prompt, generator=torch.Generator().manual_seed(0), **kwargs)

    def refocused(schedule: str):
        config = RefocusConfig(schedule=schedule)
        return lambda: refocus(pipe, layout, config=config, generator=torch.Generator().manual_seed(0), **kwargs)

    return plain, {s: refocused(s) for s in SCHEDULES}


def time_worker(model: str, rounds: int) -> dict:
    """Median CPU seconds of plain and of each schedule, alternated in rounds whose order rotates."""
    plain, variants = _setup(model)
    sides = [("plain", plain), *variants.items()]
    for _, fn in sides:  # warm-up: caches, the probe forward
        fn()
    samples: dict[str, list[float]] = {name: [] for name, _ in sides}
    for r in range(rounds):
        for name, fn in sides[r % len(sides):] + sides[:r % len(sides)]:
            start = time.process_time()
            fn()
            samples[name].append(time.process_time() - start)
    median = {name: statistics.median(v) for name, v in samples.items()}
    return {"plain_s": median["plain"], "rounds": rounds,
            "schedules": {s: {"seconds": median[s], "time_ratio": median[s] / median["plain"],
                              "time_ratio_of_minimums": min(samples[s]) / min(samples["plain"])} for s in variants}}


def memory_worker(model: str, variant: str) -> dict:
    from refocusing_cost import _rss_mb

    plain, variants = _setup(model)
    run = plain if variant == "plain" else variants[variant]
    loaded = _rss_mb()
    run()
    run()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"peak_mb": peak, "extra_mb": peak - loaded}


def _child(*args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, __file__, "--worker", *args], env=env, check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def cost(models: list[str], rounds: int) -> dict:
    out = {}
    for model in models:
        row = _child("time", model, str(rounds))
        memory = {v: _child("memory", model, v) for v in ("plain", *SCHEDULES)}
        for s, entry in row["schedules"].items():
            entry["peak_ratio"] = memory[s]["peak_mb"] / memory["plain"]["peak_mb"]
            entry["memory"] = memory[s]
        row["plain_memory"] = memory["plain"]
        out[model] = row
        print(model, {s: round(e["time_ratio"], 2) for s, e in row["schedules"].items()}, flush=True)
    return out


def flops() -> dict:
    """FLOP ratio to plain of every schedule at real size, without early stops."""
    from refocusing_cost import _architecture_flops

    out = {}
    for name, family, size, cfg_batch, text in ARCHITECTURES:
        per_maps: dict[str, tuple] = {}
        row = {}
        for s, plan in SCHEDULES.items():
            if plan.maps not in per_maps:
                per_maps[plan.maps] = _architecture_flops(name, family, size, cfg_batch, text,
                                                          RefocusConfig(schedule=s))
            plain, _, prefix, stop_site = per_maps[plan.maps]
            updates = max_updates(s, STEPS)
            row[s] = {"updates": updates, "iteration_flops": prefix, "plain_forward_flops": plain,
                      "stop_site": stop_site, "flop_ratio": 1 + updates * prefix / (STEPS * plain)}
        out[name] = row
        print(name, {s: round(e["flop_ratio"], 2) for s, e in row.items()}, flush=True)
    return out


# ---------------------------------------------------------------------------------------------------- effect
def effect(model: str, count: int, schedules: list[str]) -> dict:
    """Plain and every schedule on the same layouts and seeds: in-box rate, IoU, gain, paired stderr."""
    import torch
    from effect_refocusing import layouts, run

    from attnedit.shapes.builtin import CALL_DEFAULTS, load_builtin

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    pipe = load_builtin(model)
    cases = layouts(count, seed=1234)
    guidance = CALL_DEFAULTS[model]["guidance_scale"]
    plain, plain_s = run(pipe, cases, EFFECT_STEPS, None, guidance)
    row = {"layouts": count, "steps": EFFECT_STEPS, "loss_scale": LOSS_SCALE, "plain": _means(plain),
           "plain_s": plain_s, "schedules": {}}
    for s in schedules:
        scores, seconds = run(pipe, cases, EFFECT_STEPS, RefocusConfig(schedule=s, loss_scale=LOSS_SCALE), guidance)
        diffs = [f["in_box"] - p["in_box"] for p, f in zip(plain, scores)]
        row["schedules"][s] = {**_means(scores), "gain": statistics.fmean(diffs),
                               "gain_stderr": statistics.stdev(diffs) / len(diffs) ** 0.5,
                               "iou_gain": statistics.fmean(f["iou"] - p["iou"] for p, f in zip(plain, scores)),
                               "updates": max_updates(s, EFFECT_STEPS), "time_ratio": seconds / plain_s,
                               "per_layout_in_box": [f["in_box"] for f in scores]}
        print(model, s, {k: round(v, 3) for k, v in row["schedules"][s].items() if isinstance(v, float)}, flush=True)
    row["per_layout_plain_in_box"] = [p["in_box"] for p in plain]
    return row


def _means(scores: list[dict]) -> dict:
    return {k: statistics.fmean(s[k] for s in scores) for k in ("in_box", "iou", "present")}


# ------------------------------------------------------------------------------------------------ results
def update(section: str, key: str | None, value: dict) -> None:
    """Merge one part into the results file under a lock (parts may run at once)."""
    path = RESULTS / f"{NAME}.json"
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / f".{NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = json.loads(path.read_text()) if path.exists() else {"benchmark": NAME, "results": {}}
        results = data["results"]
        results["schedules"] = {s: {"note": p.note, "maps": p.maps, "updates_50_steps": max_updates(s, STEPS),
                                    "updates_20_steps": max_updates(s, EFFECT_STEPS)} for s, p in SCHEDULES.items()}
        results["default"] = DEFAULT_SCHEDULE
        if key is None:
            results[section] = value
        elif section == "effect" and key in results.get(section, {}):  # a part with some schedules: merged in
            old = results[section][key]
            if old["per_layout_plain_in_box"] != value["per_layout_plain_in_box"]:
                raise ValueError(f"plain scores of {key} differ from the stored run: rerun every schedule")
            value = {**value, "schedules": {**old["schedules"], **value["schedules"]}}
            results[section][key] = value
        else:
            results.setdefault(section, {})[key] = value
        for row in results.get("effect", {}).values():  # the fraction of the default schedule's gain each keeps
            default = row["schedules"].get(DEFAULT_SCHEDULE)
            for entry in row["schedules"].values():
                entry["kept"] = entry["gain"] / default["gain"] if default else None
        data["machine"] = machine()
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)


def table() -> str:
    """The README table: one row per schedule."""
    r = json.loads((RESULTS / f"{NAME}.json").read_text())["results"]
    head = ("| schedule | updates (50 / 20 steps) | time x SD 1.5 / SDXL / SD3 / FLUX | peak x SD 1.5 / SDXL | "
            "FLOP x SD 1.5 / SDXL / FLUX | in-box t2i (IoU) | in-box dit (IoU) | gain kept t2i / dit (± its stderr) |")
    lines = [head, "|" + "---|" * 8]
    fx = lambda v: f"x{v:.2f}"
    for s, info in r["schedules"].items():
        c, e = (({m: row["schedules"][s] for m, row in r.get(part, {}).items() if s in row["schedules"]})
                   for part in ("cost", "effect"))
        f = {a: row[s] for a, row in r.get("flops", {}).items() if s in row}
        times = " / ".join(fx(c[m]["time_ratio"]) if m in c else "-" for m in COST_MODELS)
        peaks = " / ".join(fx(c[m]["peak_ratio"]) if m in c else "-" for m in ("sd15", "sdxl"))
        fl = " / ".join(fx(f[a[0]]["flop_ratio"]) if a[0] in f else "-" for a in ARCHITECTURES)
        box = [f"{e[m]['in_box']:.2f} ({e[m]['iou']:.2f})" if m in e else "-" for m in EFFECT_MODELS]
        kept = " / ".join(f"{100 * e[m]['kept']:.0f} % ± {100 * e[m]['gain_stderr'] / e[m]['gain'] * e[m]['kept']:.0f}"
                          if m in e and e[m].get("kept") is not None else "-" for m in EFFECT_MODELS)
        name = {r["default"]: f"**`{s}`** (default)", CHEAP: f"**`{s}`** (cheap)"}.get(s, f"`{s}`")
        lines.append(f"| {name} | {info['updates_50_steps']} / {info['updates_20_steps']} | {times} | {peaks} | {fl} "
                     f"| {box[0]} | {box[1]} | {kept} |")
    plain = " | ".join(f"{e['plain']['in_box']:.2f} ({e['plain']['iou']:.2f})" for m in EFFECT_MODELS
                       if (e := r.get("effect", {}).get(m)))
    return "\n".join(lines) + f"\n\nplain in-box (IoU), t2i | dit: {plain}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", nargs="+", choices=["cost", "flops", "effect"], default=["cost", "flops", "effect"])
    parser.add_argument("--models", nargs="+", help="cost: tiny zoo models; effect: built-ins (default: all)")
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds (each side once per round)")
    parser.add_argument("--layouts", type=int, default=120)
    parser.add_argument("--schedules", nargs="+", choices=list(SCHEDULES), default=list(SCHEDULES),
                        help="effect: the schedules to run (merged with those stored for the same layouts)")
    parser.add_argument("--table", action="store_true", help="print the README table from the results and exit")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, model, extra = args.worker
        result = time_worker(model, int(extra)) if kind == "time" else memory_worker(model, extra)
        print(json.dumps(result))
        return
    if args.table:
        print(table())
        return
    if "cost" in args.part:
        for model in [m for m in (args.models or COST_MODELS) if m in COST_MODELS]:
            update("cost", model, cost([model], args.rounds)[model])
    if "flops" in args.part:
        update("flops", None, flops())
    if "effect" in args.part:
        for model in [m for m in (args.models or EFFECT_MODELS) if m in EFFECT_MODELS]:
            update("effect", model, effect(model, args.layouts, args.schedules))
    print(table())


if __name__ == "__main__":
    main()
