"""Attention refocusing on the trained shapes-t2i model: how often each object lands in its layout box.

Layouts come from the shapes world (:mod:`attnedit.shapes.world`): two-object scenes whose caption names the objects
but not where they are ("a big red circle and a small blue square on a gray background"), so only the layout
tells the model the positions. Each phrase ("red circle") gets its ground-truth box. Plain sampling and refocused
sampling start from the same seed; the world's colour detector finds each object in the output. An object
*lands in its box* when the centre of its colour blob is inside the box (grown by 0.05). Also reported: how often
the object is present at all, its shape is right, the IoU of the detected and the target box, and the cost.
Refocusing follows ``--schedule`` (default: the default named schedule, ``ce0439c``) read at ``i * 50 // steps``.
Run: ``flock /tmp/attnedit-bench.lock python benchmarks/effect_refocusing.py`` (several times the plain sampling time:
up to 44 updates in 20 steps); ``--first K --layouts N --out part_K`` runs a part and ``--merge part_*.json --out
NAME`` joins the parts' per-layout scores into one results file.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))

import numpy as np
import torch
from harness import summarize, write_results

from attnedit.methods.refocusing import DEFAULT_SCHEDULE, SCHEDULES, Layout, RefocusConfig
from attnedit.pipelines.refocusing import refocus
from attnedit.shapes import world
from attnedit.shapes.builtin import CALL_DEFAULTS, call_options, load_builtin


def layouts(count: int, seed: int) -> list[tuple[world.Scene, Layout]]:
    """Two-object scenes without a spatial relation in the caption, each with its phrase -> box layout."""
    rng, out = random.Random(seed), []
    while len(out) < count:
        scene = world.sample_scene(rng, relation_prob=0.0)
        if len(scene.objects) != 2:
            continue
        regions = [(f"{o.colour} {o.shape}", [o.box]) for o in scene.objects]
        out.append((scene, Layout(scene.caption(), regions)))
    return out


def box_iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union if union > 0 else 0.0


def score(image: np.ndarray, scene: world.Scene) -> dict[str, float]:
    """Per-image means over its objects: in box, present, right shape, box IoU."""
    found = world.detect(image)
    rows = []
    for obj in scene.objects:
        d = found.get(obj.colour)
        rows.append((world.in_box(d, obj.box), d is not None, d is not None and d.shape == obj.shape,
                     box_iou(d.box, obj.box) if d else 0.0))
    keys = ("in_box", "present", "shape_ok", "iou")
    return {k: float(np.mean([r[i] for r in rows])) for i, k in enumerate(keys)}


def run(pipe, cases, steps: int, config: RefocusConfig | None, guidance: float,
        first: int = 0) -> tuple[list[dict], float]:
    """Generate every case (plain when ``config`` is None); per-case scores and total seconds."""
    scores, start = [], time.perf_counter()
    for index, (scene, layout) in enumerate(cases, start=first):  # seed = the layout's global index
        generator = torch.Generator().manual_seed(index)
        kwargs = {"num_inference_steps": steps, "guidance_scale": guidance, "output_type": "np",
                  "generator": generator, "height": 64, "width": 64, **call_options(pipe)}
        if config is None:
            image = pipe(layout.prompt, **kwargs).images[0]
        else:
            image = refocus(pipe, layout, config=config, **kwargs).images[0]
        scores.append(score((image * 255).round().astype(np.uint8), scene))
    return scores, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="shapes-t2i", choices=["shapes-t2i", "shapes-dit"])
    parser.add_argument("--layouts", type=int, default=120)
    parser.add_argument("--steps", type=int, default=CALL_DEFAULTS["shapes-t2i"]["num_inference_steps"])
    parser.add_argument("--schedule", default=DEFAULT_SCHEDULE, choices=sorted(SCHEDULES),
                        help="the authors' schedule to follow (read at step i * 50 // steps)")
    parser.add_argument("--refocus-steps", type=int, default=None, help="default: the schedule's own steps")
    parser.add_argument("--loss-scale", type=float, default=40.0)
    parser.add_argument("--seed", type=int, default=1234, help="layout sampling seed (disjoint from training)")
    parser.add_argument("--quick", action="store_true", help="8 layouts, for a smoke run")
    parser.add_argument("--first", type=int, default=0, help="skip the first layouts (to split a run in parts)")
    parser.add_argument("--out", help="results name (default effect_refocusing, _dit for shapes-dit)")
    parser.add_argument("--merge", nargs="+", help="results files of parts to merge into --out (runs nothing)")
    args = parser.parse_args()
    if args.merge:
        merge(args.merge, args.out or "effect_refocusing")
        return
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    pipe = load_builtin(args.model)
    cases = layouts(8 if args.quick else args.first + args.layouts, args.seed)[args.first:]
    guidance = CALL_DEFAULTS[args.model]["guidance_scale"]
    config = RefocusConfig(schedule=args.schedule, refocus_steps=args.refocus_steps, loss_scale=args.loss_scale)
    plain_scores, plain_s = run(pipe, cases, args.steps, None, guidance, args.first)
    focus_scores, focus_s = run(pipe, cases, args.steps, config, guidance, args.first)
    results = report(args, cases, config, plain_scores, plain_s, focus_scores, focus_s, guidance)
    print(write_results(args.out or ("effect_refocusing" if args.model == "shapes-t2i" else "effect_refocusing_dit"),
                        results))
    print({k: results[k] for k in ("in_box_gain", "layouts_better_same_worse", "time_ratio")},
          "plain", results["plain"]["in_box"], "refocused", results["refocused"]["in_box"])


def report(args, cases, config, plain_scores, plain_s, focus_scores, focus_s, guidance) -> dict:
    """The results record of one run (or of merged parts: ``merge``)."""
    refocused = [i for i in range(args.steps) if config.refocuses(i, args.steps)]
    plain, focused = summarize(plain_scores, plain_s), summarize(focus_scores, focus_s)
    paired = [(f["in_box"] > p["in_box"]) - (f["in_box"] < p["in_box"]) for p, f in zip(plain_scores, focus_scores)]
    results = {
        "model": args.model, "layouts": len(cases), "objects": 2 * len(cases), "steps": args.steps,
        "guidance_scale": guidance, "first_layout": args.first,
        "config": {"schedule": args.schedule, "refocus_steps": args.refocus_steps, "loss_scale": args.loss_scale,
                   "losses": list(config.losses), "refocused_steps": refocused,
                   "max_updates": sum(config.max_iterations(i, args.steps) for i in refocused)},
        "per_layout": {"plain": plain_scores, "refocused": focus_scores, "seconds": [plain_s, focus_s]},
        "plain": plain, "refocused": focused,
        "in_box_gain": round(focused["in_box"] - plain["in_box"], 4),
        "layouts_better_same_worse": [paired.count(1), paired.count(0), paired.count(-1)],
        "time_ratio": round(focus_s / plain_s, 2),
        "criterion": "centre of the object's colour blob inside its box grown by 0.05 (world.in_box)",
    }
    return results


def merge(paths: list[str], out: str) -> dict:
    """One results file from parts run with ``--first`` (same model, schedule and settings)."""
    import json
    from types import SimpleNamespace

    parts = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            parts.append(json.load(f)["results"])
    parts.sort(key=lambda r: r["first_layout"])
    first = parts[0]
    args = SimpleNamespace(model=first["model"], steps=first["steps"], first=first["first_layout"], **{
        k: first["config"][k] for k in ("schedule", "refocus_steps", "loss_scale")})
    scores = {k: [s for p in parts for s in p["per_layout"][k]] for k in ("plain", "refocused")}
    seconds = [sum(p["per_layout"]["seconds"][i] for p in parts) for i in (0, 1)]
    config = RefocusConfig(schedule=args.schedule, refocus_steps=args.refocus_steps, loss_scale=args.loss_scale)
    results = report(args, [None] * len(scores["plain"]), config, scores["plain"], seconds[0], scores["refocused"],
                     seconds[1], first["guidance_scale"])
    results["parts"] = [p["first_layout"] for p in parts]
    print(write_results(out, results))
    return results


if __name__ == "__main__":
    main()
