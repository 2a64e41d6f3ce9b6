"""Does SoftPAG on HeadHunter-chosen heads raise prompt fidelity of the trained shapes-t2i model?

Quality score: :func:`attnedit.shapes.world.fidelity` of each generated 64x64 image against the scene its caption asks
for (:func:`attnedit.shapes.world.parse_caption`): right colours at a plausible size, right shapes, no extra colours.

1. *Search*: HeadHunter (greedy, ``--rounds`` rounds adding ``--top-k`` heads each; default one round, top 3)
   over the UNet's self-attention heads (7 layers x 8 heads; layer = index among attn1 sites: 0-1 down, 2 mid,
   3-6 up). The mid block (layer 2, a 4x4-token map whose perturbation barely moves the image) is left out of the
   default pool (``--layers 0-1,3-6``: 48 candidates) to fit the time budget; it stays as a control below. Its objective
   is the mean fidelity over ``--search-prompts`` captions x ``--search-seeds`` noise seeds, generated in the
   evaluation setting (CFG 4 + SoftPAG u=1 at ``--search-scale``; the paper searches without CFG, we search for
   the setting we use). The M images of one candidate are generated in one batched call, the same noise per
   (prompt, seed) as HeadHunter's own one-by-one generation.
2. *Evaluation* on ``--prompts`` held-out captions (scene seeds and noise seeds disjoint from the search, no
   caption of the search set) x ``--seeds`` noise seeds, each setting at equal seeds: plain CFG; CFG + SoftPAG on
   the chosen heads at each ``--scales``; controls at the largest scale: as many *random* heads (does the search
   matter?), diffusers-style PAG on every head of the mid-block self-attention (``pag_applied_layers=["mid"]``,
   4x4 tokens here) and PAG on every head of the layer holding the first chosen head (head vs layer granularity).
   Per setting: mean fidelity and its standard error, paired difference to plain CFG (mean, standard error,
   wins/losses/ties per (prompt, seed)), mean |pixel change| vs plain CFG (does the setting change images at
   all?) and wall time (batches of all settings interleaved, order alternating, to spread drift).

Run: ``flock /tmp/attnedit-bench.lock python benchmarks/effect_head_guidance.py`` (about 12 minutes on 2 cores,
one torch thread); ``--quick`` is a smoke run of a minute.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
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

import numpy as np
import torch
from harness import RESULTS, machine, write_results

from attnedit.methods.head_guidance import format_heads, perturbed_guidance
from attnedit.methods.headhunter import HeadHunter
from attnedit.shapes import world
from attnedit.shapes.builtin import CALL_DEFAULTS, load_builtin

NAME = "effect_head_guidance"
SEARCH_SCENES, EVAL_SCENES = 0, 100_000  # first scene seed of each prompt set (disjoint ranges)
SEARCH_NOISE, EVAL_NOISE = 0, 1_000  # first noise seed of each set
MID_LAYER = 2  # the UNet's mid-block self-attention among its attn1 sites


# ------------------------------------------------------------------------------------------- prompts, score
def captions(count: int, first_seed: int, exclude: Sequence[str] = ()) -> list[str]:
    """``count`` distinct world captions from scene seeds ``first_seed, first_seed + 1, ...``, none in ``exclude``."""
    out: list[str] = []
    seed = first_seed
    while len(out) < count:
        text = world.sample_scene(random.Random(seed)).caption()
        if text not in out and text not in exclude:
            out.append(text)
        seed += 1
    return out


def to_uint8(images: torch.Tensor) -> list[np.ndarray]:
    """``(M, 3, H, W)`` in [0, 1] -> uint8 ``(H, W, 3)`` arrays, rounded as the pipeline's PIL output is."""
    array = images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return list((array * 255).round().astype(np.uint8))


class Fidelity:
    """HeadHunter objective: per image, the world fidelity against the scene its prompt asks for."""

    needs_prompts = True
    __name__ = "world.fidelity"

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        scores = [world.fidelity(image, world.parse_caption(p)) for image, p in zip(to_uint8(images), prompts)]
        return torch.tensor(scores)


# -------------------------------------------------------------------------------------------- generation
def generate(pipe: Any, prompts: Sequence[str], seeds: Sequence[int], call: dict, heads: Any = None,
             scale: float = 0.0, batch: int = 16) -> torch.Tensor:
    """Images ``(M, 3, H, W)`` for the (prompt, seed) pairs, in batches; SoftPAG (u=1) on ``heads`` unless None.

    One generator per row gives each pair the noise a one-image call with that seed gets, so settings and the
    search all see equal noise per pair.
    """
    out = []
    for start in range(0, len(prompts), batch):
        rows = slice(start, start + batch)
        guide = perturbed_guidance(pipe, heads, scale=scale) if heads is not None else nullcontext()
        with guide, torch.no_grad():
            result = pipe(prompt=list(prompts[rows]), output_type="pt", **call,
                          generator=[torch.Generator().manual_seed(s) for s in seeds[rows]])
        out.append(result.images.float().cpu())
    return torch.cat(out)


class BatchedHeadHunter(HeadHunter):
    """HeadHunter whose candidate score generates its M images in one batched pipeline call instead of M calls
    (same noise per pair, less per-call overhead); the greedy loop, state and ranking are the stock ones."""

    def score(self, heads: Sequence[tuple[int, int]]) -> float:
        prompts, seeds = [p for p, _ in self.pairs], [s for _, s in self.pairs]
        images = generate(self.pipe, prompts, seeds, self.generation["call_kwargs"], list(heads),
                          self.generation["scale"], batch=len(prompts))
        self.generations += len(prompts)
        return float(self.objective(images, prompts).mean())


# ------------------------------------------------------------------------------------------------ search
def search(pipe: Any, args: argparse.Namespace, call: dict) -> dict[str, Any]:
    """Run HeadHunter in a fresh temporary workdir (its cache keys ignore the weights: never reuse one)."""
    prompts = captions(args.search_prompts, SEARCH_SCENES)
    seeds = list(range(SEARCH_NOISE, SEARCH_NOISE + args.search_seeds))
    objective = Fidelity()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="headhunter-") as workdir:
        hunter = BatchedHeadHunter(pipe, objective, prompts, seeds, rounds=args.rounds, top_k=args.top_k,
                                   layers=args.layers, scale=args.search_scale, strength=1.0, call_kwargs=call,
                                   workdir=workdir, progress=False)
        ranking = hunter.run()
    seconds = time.perf_counter() - start
    plain = generate(pipe, [p for p in prompts for _ in seeds], seeds * len(prompts), call)
    plain_score = float(objective(plain, [p for p in prompts for _ in seeds]).mean())
    rounds = [{"added": r["added"], "best_score": max(r["scores"].values()),
               "tied_at_best": sum(v == max(r["scores"].values()) for v in r["scores"].values()),
               "scores": dict(sorted(r["scores"].items(), key=lambda kv: -kv[1]))} for r in ranking["rounds"]]
    return {"heads": ranking["heads"], "spec": ranking["spec"], "candidates": len(hunter.candidates),
            "prompts": len(prompts), "seeds": seeds, "scale": args.search_scale, "generations": hunter.generations,
            "seconds": seconds, "plain_cfg_score": plain_score, "rounds": rounds, "search_prompts": prompts}


def random_heads(pipe: Any, count: int, avoid: Sequence[Sequence[int]], seed: int = 0) -> list[list[int]]:
    """``count`` self-attention heads drawn at random (fixed seed), none of the chosen ones: the control set."""
    pool = [h for h in HeadHunter._candidates(pipe, None, None) if list(h) not in [list(a) for a in avoid]]
    return [list(h) for h in sorted(random.Random(seed).sample(pool, count))]


# -------------------------------------------------------------------------------------------- evaluation
def settings(pipe: Any, chosen: list[list[int]], scales: Sequence[float]) -> dict[str, tuple[Any, float]]:
    """Setting name -> (heads or None, PAG scale). Controls at the top scale: random heads, whole layers (the
    UNet's mid block, as diffusers' PAG default; on the DiT the middle joint block), the first chosen head's layer."""
    top = max(scales)
    out: dict[str, tuple[Any, float]] = {"cfg": (None, 0.0)}
    for scale in scales:
        out[f"cfg+softpag_headhunter_s{scale:g}"] = ([tuple(h) for h in chosen], scale)
    control = random_heads(pipe, len(chosen), chosen)
    out[f"cfg+softpag_random{len(chosen)}_s{top:g}"] = ([tuple(h) for h in control], top)
    mid = MID_LAYER if getattr(pipe, "unet", None) is not None else pipe.transformer.config.num_layers // 2
    out[f"cfg+pag_mid_all_heads_s{top:g}"] = (f"L{mid}", top)
    first = chosen[0][0]  # layer-level PAG where the search's first head lies: head vs layer granularity
    if first != mid:
        out[f"cfg+pag_layer{first}_all_heads_s{top:g}"] = (f"L{first}", top)
    return out


def evaluate(pipe: Any, plan: dict[str, tuple[Any, float]], prompts: list[str], seeds: list[int], call: dict,
             batch: int) -> tuple[dict[str, list[float]], dict[str, float], dict[str, list[float]]]:
    """Fidelity per (prompt, seed), total wall seconds and per-image mean |pixel change| vs plain CFG, per
    setting; all settings run batch by batch, alternating their order."""
    pairs = [(p, s) for p in prompts for s in seeds]
    scores: dict[str, list[float]] = {name: [] for name in plan}
    change: dict[str, list[float]] = {name: [] for name in plan}
    seconds = dict.fromkeys(plan, 0.0)
    objective = Fidelity()
    for start in range(0, len(pairs), batch):
        chunk = pairs[start:start + batch]
        texts, noise = [p for p, _ in chunk], [s for _, s in chunk]
        images = {}
        for name in list(plan) if (start // batch) % 2 == 0 else list(plan)[::-1]:
            heads, scale = plan[name]
            began = time.perf_counter()
            images[name] = generate(pipe, texts, noise, call, heads, scale, batch)
            seconds[name] += time.perf_counter() - began
            scores[name] += objective(images[name], texts).tolist()
        for name in plan:
            change[name] += (images[name] - images["cfg"]).abs().flatten(1).mean(1).tolist()
    return scores, seconds, change


def summary(scores: list[float], plain: list[float], seconds: float, change: list[float]) -> dict[str, Any]:
    """Mean, standard error, paired difference to plain CFG and its sign counts."""
    n = len(scores)
    diff = [a - b for a, b in zip(scores, plain)]
    sem = (lambda xs: statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else float("nan"))
    return {"mean_fidelity": statistics.fmean(scores), "sem": sem(scores), "n": n,
            "diff_vs_cfg": statistics.fmean(diff), "diff_sem": sem(diff),
            "higher": sum(d > 0 for d in diff), "lower": sum(d < 0 for d in diff), "equal": sum(d == 0 for d in diff),
            "mean_abs_pixel_change": statistics.fmean(change), "wall_s": seconds, "wall_s_per_image": seconds / n}


# -------------------------------------------------------------------------------------------------- main
def verdict(rows: dict[str, dict[str, Any]]) -> str:
    """One sentence per guided setting: is the paired difference beyond two standard errors?"""
    parts = []
    for name, row in rows.items():
        if name == "cfg":
            continue
        d, e = row["diff_vs_cfg"], row["diff_sem"]
        tag = "within noise" if not abs(d) > 2 * e else ("better" if d > 0 else "worse")
        parts.append(f"{name}: {d:+.3f} +- {e:.3f} ({tag})")
    return "; ".join(parts)


def notes(args: argparse.Namespace, rows: dict[str, dict[str, Any]]) -> str:
    return (
        "Fidelity = world.fidelity(image, parse_caption(prompt)) in [0, 1], per (prompt, seed), paired across "
        "settings at equal noise. HeadHunter searched self-attention heads on its own prompts/seeds (disjoint "
        f"scene and noise seeds, no shared caption) with CFG {args.cfg} + SoftPAG u=1 at scale "
        f"{args.search_scale:g}; its search score is on {args.search_prompts * args.search_seeds} images only and "
        "overfits them, the held-out rows are the test. Paired difference vs plain CFG (+- standard error): "
        + verdict(rows) + ". 'better'/'worse' = |diff| > 2 SE, else 'within noise'; no correction for the "
        "number of settings. "
        "mean_abs_pixel_change: per-image mean |image - plain CFG image| in [0, 1] units. "
        "Wall times are interleaved batches on a shared 2-core CPU, one torch thread."
    )


def save(out: pathlib.Path, results: dict[str, Any]) -> pathlib.Path:
    """Through harness.write_results when ``out`` is the default place, else the same document at ``out``."""
    if out.resolve() == (RESULTS / f"{NAME}.json").resolve():
        return write_results(NAME, results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": NAME, "machine": machine(), "results": results}, indent=2) + "\n")
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=64, help="held-out evaluation captions")
    parser.add_argument("--seeds", type=int, default=1, help="noise seeds per evaluation caption")
    parser.add_argument("--search-prompts", type=int, default=8)
    parser.add_argument("--search-seeds", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1, help="HeadHunter rounds")
    parser.add_argument("--top-k", type=int, default=3, help="heads added per round")
    parser.add_argument("--model", default="shapes-t2i", choices=["shapes-t2i", "shapes-dit"])
    parser.add_argument("--layers", help="candidate layers (shapes-t2i: '0-1,3-6', its 7 attn1 layers but the mid "
                                         "block; shapes-dit: '0-5', every joint block)")
    parser.add_argument("--search-scale", type=float, default=2.0, help="PAG scale during the search")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 2.0], help="PAG scales evaluated")
    parser.add_argument("--cfg", type=float, default=CALL_DEFAULTS["shapes-t2i"]["guidance_scale"])
    parser.add_argument("--steps", type=int, default=CALL_DEFAULTS["shapes-t2i"]["num_inference_steps"])
    parser.add_argument("--batch", type=int, default=16, help="images per pipeline call in the evaluation")
    parser.add_argument("--quick", action="store_true", help="tiny counts: a smoke run")
    parser.add_argument("--out", type=pathlib.Path)
    args = parser.parse_args(argv)
    args.layers = args.layers or ("0-1,3-6" if args.model == "shapes-t2i" else "0-5")
    args.out = args.out or RESULTS / (f"{NAME}.json" if args.model == "shapes-t2i" else f"{NAME}_dit.json")
    if args.quick:
        args.prompts, args.seeds, args.search_prompts, args.search_seeds = 4, 1, 2, 1
        args.rounds, args.top_k, args.layers, args.steps = 1, 2, "0", min(args.steps, 6)
    return args


def show(rows: dict[str, dict[str, Any]]) -> None:
    """One line per setting on stdout, so a run can be read before its JSON."""
    for name, row in rows.items():
        print(f"{name:36s} {row['mean_fidelity']:.3f} +- {row['sem']:.3f}  diff {row['diff_vs_cfg']:+.3f} "
              f"+- {row['diff_sem']:.3f}  +{row['higher']}/-{row['lower']}/={row['equal']}  "
              f"|dpx| {row['mean_abs_pixel_change']:.3f}  {row['wall_s_per_image']:.3f}s/img", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    began = time.perf_counter()
    pipe = load_builtin(args.model)
    call = {**CALL_DEFAULTS[args.model], "guidance_scale": args.cfg, "num_inference_steps": args.steps}
    found = search(pipe, args, call)
    print(f"HeadHunter: {found['spec']} in {found['seconds']:.0f}s ({found['generations']} images)", flush=True)
    plan = settings(pipe, found["heads"], args.scales)
    prompts = captions(args.prompts, EVAL_SCENES, exclude=found["search_prompts"])
    seeds = list(range(EVAL_NOISE, EVAL_NOISE + args.seeds))
    scores, seconds, change = evaluate(pipe, plan, prompts, seeds, call, args.batch)
    rows = {name: summary(scores[name], scores["cfg"], seconds[name], change[name]) for name in plan}
    show(rows)
    config = {k: str(v) if isinstance(v, pathlib.Path) else v for k, v in vars(args).items()}
    config.update(call=call, checkpoint=str(getattr(pipe.config, "_name_or_path", "")), eval_noise_seeds=seeds,
                  threads=torch.get_num_threads())
    results = {
        "config": config, "search": found,
        "settings": {name: {"heads": format_heads(h) if h is not None else None, "pag_scale": s}
                     for name, (h, s) in plan.items()},
        "evaluation": rows, "total_s": time.perf_counter() - began, "notes": notes(args, rows),
    }
    print(f"wrote {save(args.out, results)} ({results['total_s']:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
