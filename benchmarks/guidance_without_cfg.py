"""Head guidance where PAG acts: without CFG and at low CFG, on shapes-t2i and shapes-dit (issue #30 item 3).

PAG (Ahn et al. 2024) was made for sampling without CFG, and claims better *structure*. This benchmark asks whether
PAG / SoftPAG improve the shapes world's structure score (:mod:`attnedit.shapes.structure`) there.

Regimes (each model): ``cfg1`` the caption at guidance scale 1 (no CFG), ``uncond`` the empty prompt at scale 1,
``cfg1.5`` / ``cfg2`` low CFG with the caption. Arms, each at every ``--scales`` PAG scale:

- ``plain``: no perturbation;
- ``pag``: PAG (u=1) on whole layers as diffusers' PAG pipelines pick them by default: shapes-t2i (a SD 1.5 UNet)
  ``pag_applied_layers="mid"``, the mid block's self-attention (layer 2 of the attn1 sites, 8 heads, 4x4 tokens);
  shapes-dit (SD3 MM-DiT) ``"blocks.1"``, joint block 1 (4 heads) with diffusers' ``image-image`` scope;
- ``searched``: SoftPAG (u=1, the paper's ``all`` scope) on the heads HeadHunter found with the structure score as
  its objective, searched in the ``cfg1`` regime on its own captions (scene and noise seeds disjoint from the
  held-out ones, no shared caption), one greedy round of ``--top-k`` over every self/joint-attention head;
- ``random``: SoftPAG on as many random heads (fixed seed, none of the searched ones).

Scores per image, paired across settings at equal noise and caption: structure score; fidelity (world.fidelity
against the caption) where there is a caption; for ``uncond`` the distribution distance of the set (its paired
standard error by a bootstrap over images, the same resample for both settings). Paired differences vs plain and
vs PAG at the same scale, with standard errors and sign counts. Partial JSON is written after every regime.

Run: ``OMP_NUM_THREADS=1 nohup python benchmarks/guidance_without_cfg.py &`` (about 45 minutes on one core);
``--quick`` is a smoke run of a minute.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))

import torch
from effect_head_guidance import EVAL_NOISE, EVAL_SCENES, SEARCH_NOISE, SEARCH_SCENES, captions, random_heads, to_uint8
from harness import write_results

from attnedit.methods.head_guidance import format_heads, perturbed_guidance
from attnedit.methods.headhunter import HeadHunter, _score
from attnedit.shapes import world
from attnedit.shapes.builtin import CALL_DEFAULTS, load_builtin
from attnedit.shapes.structure import StructureScore, attribute_distance, scene_attributes, structure_score

NAME = "guidance_without_cfg"
REGIMES = {"cfg1": (1.0, True), "uncond": (1.0, False), "cfg1.5": (1.5, True), "cfg2": (2.0, True)}
# diffusers' default pag_applied_layers per pipeline, as attnedit layers: (heads, scope, what diffusers calls it)
PAG_LAYERS = {"shapes-t2i": ("L2", "all", "StableDiffusionPAGPipeline 'mid' (mid-block attn1)"),
              "shapes-dit": ("L1", "image-image", "StableDiffusion3PAGPipeline 'blocks.1' (joint block 1)")}


# -------------------------------------------------------------------------------------------- generation
def generate(pipe: Any, prompts: Sequence[str], seeds: Sequence[int], call: dict, guide: dict | None,
             batch: int) -> torch.Tensor:
    """Images ``(M, 3, H, W)`` in [0, 1]; ``guide`` = perturbed_guidance's (heads, scale, scope) or None (plain).

    One generator per row: each (prompt, seed) gets the noise a one-image call with that seed gets."""
    out = []
    for start in range(0, len(prompts), batch):
        rows = slice(start, start + batch)
        context = perturbed_guidance(pipe, **guide) if guide else nullcontext()
        with context, torch.no_grad():
            result = pipe(prompt=list(prompts[rows]), output_type="pt", **call,
                          generator=[torch.Generator().manual_seed(s) for s in seeds[rows]])
        out.append(result.images.float().cpu())
    return torch.cat(out)


class StructureHunter(HeadHunter):
    """HeadHunter scoring a candidate's M images in one batched call (same noise per pair as its own loop)."""

    def score(self, heads: Sequence[tuple[int, int]]) -> float:
        prompts, seeds = [p for p, _ in self.pairs], [s for _, s in self.pairs]
        guide = {"heads": list(heads), "scale": self.generation["scale"]}
        images = generate(self.pipe, prompts, seeds, self.generation["call_kwargs"], guide, len(prompts))
        self.generations += len(prompts)
        return float(_score(self.objective, images, prompts).mean())


def search(pipe: Any, model: str, args: argparse.Namespace) -> dict[str, Any]:
    """HeadHunter with the structure objective in the cfg1 regime, on the search captions (fresh workdir)."""
    prompts = captions(args.search_prompts, SEARCH_SCENES)
    call = {**CALL_DEFAULTS[model], "guidance_scale": 1.0}
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="headhunter-") as workdir:
        hunter = StructureHunter(pipe, StructureScore(), prompts, [SEARCH_NOISE], rounds=1, top_k=args.top_k,
                                 scale=args.search_scale, strength=1.0, call_kwargs=call, workdir=workdir,
                                 progress=False)
        ranking = hunter.run()
    plain = generate(pipe, prompts, [SEARCH_NOISE] * len(prompts), call, None, len(prompts))
    scores = ranking["rounds"][0]["scores"]
    return {"heads": ranking["heads"], "spec": ranking["spec"], "candidates": len(hunter.candidates),
            "prompts": prompts, "seeds": [SEARCH_NOISE], "scale": args.search_scale, "top_k": args.top_k,
            "generations": hunter.generations, "seconds": time.perf_counter() - began,
            "plain_structure": float(StructureScore()(plain).mean()),
            "scores": dict(sorted(scores.items(), key=lambda kv: -kv[1]))}


# -------------------------------------------------------------------------------------------- statistics
def _sem(xs: Sequence[float]) -> float:
    return statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else float("nan")


def paired(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """Mean paired difference a - b, its standard error and sign counts."""
    diff = [x - y for x, y in zip(a, b)]
    return {"diff": statistics.fmean(diff), "se": _sem(diff), "higher": sum(d > 0 for d in diff),
            "lower": sum(d < 0 for d in diff), "equal": sum(d == 0 for d in diff)}


def paired_distance(a: list[dict], b: list[dict], resamples: int, seed: int = 0) -> dict[str, float]:
    """Distribution distance (mean over attributes) of set a minus set b; SE by a paired bootstrap over images."""
    rng = random.Random(seed)
    n = len(a)
    draws = []
    for _ in range(resamples):
        idx = [rng.randrange(n) for _ in range(n)]
        draws.append(attribute_distance([a[i] for i in idx])["mean"] - attribute_distance([b[i] for i in idx])["mean"])
    return {"diff": attribute_distance(a)["mean"] - attribute_distance(b)["mean"], "se": statistics.stdev(draws)}


def verdict(d: float, se: float) -> str:
    return "within noise" if not abs(d) > 2 * se else ("higher" if d > 0 else "lower")


# -------------------------------------------------------------------------------------------- evaluation
def plan(pipe: Any, model: str, searched: list[list[int]], scales: Sequence[float]) -> dict[str, dict | None]:
    """Setting name -> perturbed_guidance arguments (None: plain)."""
    control = random_heads(pipe, len(searched), searched, seed=0)
    layers, scope, _ = PAG_LAYERS[model]
    out: dict[str, dict | None] = {"plain": None}
    for s in scales:
        out[f"pag_s{s:g}"] = {"heads": layers, "scale": s, "scope": scope}
        out[f"searched_s{s:g}"] = {"heads": [tuple(h) for h in searched], "scale": s}
        out[f"random_s{s:g}"] = {"heads": [tuple(h) for h in control], "scale": s}
    return out


def run_regime(pipe: Any, model: str, regime: str, settings: dict[str, dict | None], prompts: list[str],
               seeds: list[int], args: argparse.Namespace) -> dict[str, Any]:
    """Generate every setting batch by batch (order alternating), score, and summarise against plain and PAG."""
    cfg, with_caption = REGIMES[regime]
    call = {**CALL_DEFAULTS[model], "guidance_scale": cfg}
    texts = prompts if with_caption else [""] * len(seeds)
    per: dict[str, dict[str, list]] = {n: {"structure": [], "fidelity": [], "attributes": [], "change": []}
                                       for n in settings}
    seconds = dict.fromkeys(settings, 0.0)
    for start in range(0, len(seeds), args.batch):
        rows = slice(start, start + args.batch)
        images = {}
        for name in list(settings) if (start // args.batch) % 2 == 0 else list(settings)[::-1]:
            began = time.perf_counter()
            images[name] = generate(pipe, texts[rows], seeds[rows], call, settings[name], args.batch)
            seconds[name] += time.perf_counter() - began
            pixels = to_uint8(images[name])
            per[name]["structure"] += [structure_score(p) for p in pixels]
            if with_caption:
                per[name]["fidelity"] += [world.fidelity(p, world.parse_caption(t)) for p, t in zip(pixels, texts[rows])]
            else:
                per[name]["attributes"] += [scene_attributes(p) for p in pixels]
        for name in settings:
            per[name]["change"] += (images[name] - images["plain"]).abs().flatten(1).mean(1).tolist()
    return {name: summarise(name, per, seconds[name], with_caption, args) for name in settings}


def summarise(name: str, per: dict[str, dict[str, list]], seconds: float, with_caption: bool,
              args: argparse.Namespace) -> dict[str, Any]:
    row: dict[str, Any] = {"n": len(per[name]["structure"]), "s_per_image": seconds / len(per[name]["structure"]),
                           "mean_abs_pixel_change": statistics.fmean(per[name]["change"])}
    metrics = ["structure", "fidelity"] if with_caption else ["structure"]
    for metric in metrics:
        row[metric] = statistics.fmean(per[name][metric])
        row[f"{metric}_se"] = _sem(per[name][metric])
    if not with_caption:
        row["distribution_distance"] = attribute_distance(per[name]["attributes"])
    references = ["plain"] + ([f"pag_s{name.rsplit('_s', 1)[1]}"] if name.startswith(("searched", "random")) else [])
    for ref in references if name != "plain" else []:
        for metric in metrics:
            row[f"{metric}_vs_{ref.split('_')[0]}"] = paired(per[name][metric], per[ref][metric])
        if not with_caption:
            row[f"distance_vs_{ref.split('_')[0]}"] = paired_distance(per[name]["attributes"], per[ref]["attributes"],
                                                                     args.bootstrap)
    return row


def ship_check(result: dict[str, Any]) -> dict[str, Any]:
    """Do the searched heads beat plain and PAG (same scale) on held-out structure beyond 2 SE, in some regime?"""
    wins = []
    for regime, rows in result["regimes"].items():
        for name, row in rows.items():
            if name.startswith("searched"):
                a, b = row["structure_vs_plain"], row["structure_vs_pag"]
                if a["diff"] > 2 * a["se"] and b["diff"] > 2 * b["se"]:
                    wins.append(f"{regime}/{name}")
    return {"beats_plain_and_pag_beyond_2se": wins, "ship_preset": bool(wins)}


# -------------------------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["shapes-t2i", "shapes-dit"])
    parser.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=list(REGIMES))
    parser.add_argument("--prompts", type=int, default=160, help="held-out captions (uncond: noise seeds)")
    parser.add_argument("--search-prompts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=4, help="heads HeadHunter adds in its one round")
    parser.add_argument("--search-scale", type=float, default=3.0)
    parser.add_argument("--scales", type=float, nargs="+", default=[1.5, 3.0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--bootstrap", type=int, default=400, help="resamples for the distribution distance SE")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--name", default=NAME)
    args = parser.parse_args(argv)
    if args.quick:
        args.prompts, args.search_prompts, args.top_k, args.batch, args.bootstrap = 4, 2, 1, 4, 20
        args.regimes, args.name = ["cfg1", "uncond"], NAME + "_quick"
    return args


def show(model: str, regime: str, rows: dict[str, dict[str, Any]]) -> None:
    for name, row in rows.items():
        parts = [f"{model:10s} {regime:6s} {name:14s} structure {row['structure']:.3f}"]
        for key in ("structure_vs_plain", "structure_vs_pag", "fidelity_vs_plain", "distance_vs_plain"):
            if key in row:
                parts.append(f"{key} {row[key]['diff']:+.3f}+-{row[key]['se']:.3f}")
        print("  ".join(parts) + f"  |dpx| {row['mean_abs_pixel_change']:.3f}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    began = time.perf_counter()
    pipes = {m: load_builtin(m) for m in args.models}
    results: dict[str, Any] = {"config": vars(args), "pag_layers": {m: PAG_LAYERS[m] for m in args.models},
                               "models": {}}
    for model, pipe in pipes.items():
        found = search(pipe, model, args)
        print(f"{model}: HeadHunter chose {found['spec']} ({found['generations']} images, {found['seconds']:.0f}s)",
              flush=True)
        settings = plan(pipe, model, found["heads"], args.scales)
        prompts = captions(args.prompts, EVAL_SCENES, exclude=found["prompts"])
        results["models"][model] = {"search": found, "prompts": prompts, "regimes": {},
                                    "settings": {n: None if g is None else {**g, "heads": format_heads(g["heads"])}
                                                 for n, g in settings.items()}}
    for regime in args.regimes:  # models interleaved per regime: a cut-short run still covers both
        for model, pipe in pipes.items():
            entry = results["models"][model]
            prompts, seeds = entry["prompts"], list(range(EVAL_NOISE, EVAL_NOISE + args.prompts))
            settings = {n: (None if g is None else {**g, "heads": g["heads"]}) for n, g in entry["settings"].items()}
            rows = run_regime(pipe, model, regime, settings, prompts, seeds, args)
            entry["regimes"][regime] = rows
            entry["ship"] = ship_check(entry)
            show(model, regime, rows)
            results["total_s"] = time.perf_counter() - began
            write_results(args.name, results)
    print(f"done in {time.perf_counter() - began:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
