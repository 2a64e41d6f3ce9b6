"""Why SoftPAG does not raise fidelity on shapes-dit: PAG per joint block and at smaller scales, on held-out captions.

The head-guidance benchmark found HeadHunter's heads no better than random ones there, and both below plain CFG.
This ablation asks where the perturbation helps or hurts: PAG (every head, u=1) on one joint block at a time at
scale 1, the HeadHunter heads at a smaller scale, and the paired difference to plain CFG at equal seeds, with the
same captions, seeds and scoring as ``effect_head_guidance.py``. Run: ``python benchmarks/head_guidance_ablation.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))

import torch
from effect_head_guidance import EVAL_NOISE, EVAL_SCENES, captions, evaluate, summary
from harness import RESULTS, write_results

from attnedit.shapes.builtin import CALL_DEFAULTS, load_builtin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--scale", type=float, default=1.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pipe = load_builtin("shapes-dit")
    call = dict(CALL_DEFAULTS["shapes-dit"])
    found = json.loads((RESULTS / "effect_head_guidance_dit.json").read_text())["results"]["search"]
    plan = {"cfg": (None, 0.0)}
    plan.update({f"pag_layer{layer}_s{args.scale:g}": (f"L{layer}", args.scale)
                 for layer in range(pipe.transformer.config.num_layers)})
    plan["softpag_headhunter_s0.5"] = ([tuple(h) for h in found["heads"]], 0.5)
    prompts = captions(args.prompts, EVAL_SCENES, exclude=found["search_prompts"])
    scores, seconds, change = evaluate(pipe, plan, prompts, [EVAL_NOISE], call, batch=16)
    rows = {name: summary(scores[name], scores["cfg"], seconds[name], change[name]) for name in plan}
    for name, row in rows.items():
        print(f"{name:28s} {row['mean_fidelity']:.3f}  diff {row['diff_vs_cfg']:+.3f} +- {row['diff_sem']:.3f} "
              f"+{row['higher']}/-{row['lower']}  |dpx| {row['mean_abs_pixel_change']:.3f}", flush=True)
    print(write_results("head_guidance_ablation_dit", {"prompts": len(prompts), "call": call, "rows": rows}))


if __name__ == "__main__":
    main()
