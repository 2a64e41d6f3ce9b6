"""Issue 26's measured gaps on shapes-t2i, judged by the shapes world's detector.

1. Zoom-out (scale 0.5 and 0.75, hole noise 0 and 1): in how many scenes does the filled border hold an object
   colour (an invented shape)? The scenes are sampled grey scenes; the source has no object in the border.
2. Removal at the editor's default 50 steps and the app's 20: the object gone and the other kept?

    OMP_NUM_THREADS=1 python benchmarks/app_first_contact.py --scenes 8
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np

from attnedit.pipelines.design_edit import DesignEditConfig, DesignEditor
from attnedit.shapes import builtin, world


def grey_scenes(count: int, seed: int = 0, objects: int = 1) -> list[world.Scene]:
    rng, scenes = random.Random(seed), []
    while len(scenes) < count:
        scene = world.sample_scene(rng, max_objects=objects)
        if len(scene.objects) == objects:
            scenes.append(world.Scene(scene.objects, "gray", scene.relation))
    return scenes


def invented_in_border(pipe, scene: world.Scene, scale: float, hole_noise: float, steps: int) -> bool:
    out = np.asarray(DesignEditor(pipe, DesignEditConfig(num_steps=steps, hole_noise=hole_noise)).zoom_out(
        scene.render(64), scale=scale))
    keep = round(64 * scale)
    border = np.ones((64, 64), bool)
    lo = (64 - keep) // 2
    border[lo + 2: lo + keep - 2, lo + 2: lo + keep - 2] = False  # 2 px of the pasted edge are not counted
    return bool(world.detect(out, region=border))


def removal_ok(pipe, scene: world.Scene, steps: int) -> bool:
    out = np.asarray(DesignEditor(pipe, DesignEditConfig(num_steps=steps)).remove(scene.render(64), scene.masks(64)[0]))
    return scene.objects[0].colour not in world.detect(out) and world.fidelity(out, world.Scene(scene.objects[1:])) == 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scenes", type=int, default=8)
    parser.add_argument("--out", default="benchmarks/results/app_first_contact.json")
    args = parser.parse_args()
    pipe, results, start = builtin.load_builtin("shapes-t2i"), {}, time.time()
    for scale in (0.5, 0.75):
        for noise in (0.0, 1.0):
            hits = [invented_in_border(pipe, s, scale, noise, 20) for s in grey_scenes(args.scenes)]
            results[f"zoom_out scale={scale} hole_noise={noise}"] = f"{sum(hits)}/{len(hits)} invent a shape"
            print(results, flush=True)
    pairs = [s for s in grey_scenes(4 * args.scenes, seed=1, objects=2)][: args.scenes]
    for steps in (20, 50):
        ok = [removal_ok(pipe, s, steps) for s in pairs]
        results[f"remove steps={steps}"] = f"{sum(ok)}/{len(ok)} removed, other kept"
        print(results, flush=True)
    results["seconds"] = round(time.time() - start)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
