"""The docs' pictures, made from the built-in trained models: deterministic, offline, about a minute on a CPU.

    python docs/gallery.py              # (re)write every picture into docs/images/ and the inputs' hash
    python docs/gallery.py --if-stale   # only when the hash of the inputs differs from docs/images/gallery.hash
    python docs/gallery.py --check      # exit 1 when the pictures are stale (nothing is written)

The inputs are this script, the attnedit sources that run a model or an edit, the shipped weights and the torch /
diffusers / transformers versions: a change to any of them makes the committed pictures stale, and CI's test
command reruns the script then (README.md, the line after ``<!-- test -->``). One torch thread, fixed seeds.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import os
import pathlib
import sys
from collections.abc import Callable, Sequence

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "images"
HASH_FILE = OUT / "gallery.hash"
SOURCES = ("core", "processors", "families", "methods", "pipelines", "models", "shapes")  # what makes the pixels
SCALE = 4  # 64 px results are shown at 256 px, nearest neighbour (pixels stay visible)


def input_files() -> list[pathlib.Path]:
    """Every file whose content can change a picture, in a fixed order."""
    package = ROOT / "attnedit"
    files = [pathlib.Path(__file__).resolve()]
    for folder in SOURCES:
        files += sorted(p for p in (package / folder).rglob("*") if p.is_file() and p.suffix in {
            ".py", ".json", ".txt", ".safetensors"} and "__pycache__" not in p.parts)
    return files


def inputs_hash() -> str:
    """sha256 over the input files (path and bytes) and the versions of the libraries that compute the pictures."""
    digest = hashlib.sha256()
    for path in input_files():
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    for name in ("torch", "diffusers", "transformers"):
        digest.update(f"{name}={importlib.metadata.version(name)}\n".encode())
    return digest.hexdigest()


def is_stale() -> bool:
    return not HASH_FILE.exists() or HASH_FILE.read_text().strip() != inputs_hash()


# ---- drawing -------------------------------------------------------------------------------------------------------

def panel(image, label: str, boxes: Sequence[Sequence[float]] = ()):
    """A result enlarged ``SCALE`` x (nearest), with its label under it and optional normalized boxes drawn on it."""
    import numpy as np
    from PIL import Image, ImageDraw

    image = Image.fromarray(np.asarray(image)).convert("RGB")
    big = image.resize((image.width * SCALE, image.height * SCALE), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(big)
    for x0, y0, x1, y1 in boxes:
        draw.rectangle([x0 * big.width, y0 * big.height, x1 * big.width - 1, y1 * big.height - 1],
                       outline=(255, 255, 255), width=2)
    out = Image.new("RGB", (big.width, big.height + 22), (255, 255, 255))
    out.paste(big, (0, 0))
    ImageDraw.Draw(out).text((4, big.height + 5), label, fill=(20, 20, 20))
    return out


def strip(panels: Sequence, gap: int = 6):
    """Panels side by side (rows of a figure), on white."""
    from PIL import Image

    width = sum(p.width for p in panels) + gap * (len(panels) - 1)
    out = Image.new("RGB", (width, max(p.height for p in panels)), (255, 255, 255))
    x = 0
    for p in panels:
        out.paste(p, (x, 0))
        x += p.width + gap
    return out


def stack(rows: Sequence, gap: int = 6):
    """Rows one under another, left-aligned."""
    from PIL import Image

    out = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows) + gap * (len(rows) - 1)),
                    (255, 255, 255))
    y = 0
    for r in rows:
        out.paste(r, (0, y))
        y += r.height + gap
    return out


def uint8(array):
    import numpy as np

    return (np.clip(np.asarray(array, dtype=np.float32), 0.0, 1.0) * 255).round().astype(np.uint8)


def seeded(seed: int):
    import torch

    return torch.Generator().manual_seed(seed)


# ---- figures -------------------------------------------------------------------------------------------------------

def removal(models: dict) -> dict:
    """Key-masking edits on shapes-t2i with its own edit settings (fresh noise in the hole): remove, move, zoom out."""
    from attnedit.pipelines.design_edit import DesignEditor
    from attnedit.shapes import world

    scene = world.Scene((world.Shape("circle", "red", "big", 0.3, 0.45), world.Shape("square", "blue", "big", 0.72, 0.6)),
                        background="striped")
    source, mask = scene.render(64), scene.masks(64)[0]
    editor = DesignEditor(models["shapes-t2i"])
    row = [panel(source, "source"), panel(editor.remove(source, mask), "remove red circle"),
           panel(editor.move(source, mask, dx=0, dy=-14), "move it up 14 px"),
           panel(editor.zoom_out(source, scale=0.75), "zoom out 0.75")]
    return {"removal": strip(row)}


def layout(models: dict) -> dict:
    """Refocusing on shapes-dit: the same seeds without and with the layout; the boxes drawn on both."""
    from attnedit.methods.refocusing import Layout
    from attnedit.pipelines.refocusing import refocus

    pipe = models["shapes-dit"]
    regions = [("red circle", [(0.05, 0.05, 0.45, 0.45)]), ("blue square", [(0.55, 0.55, 0.95, 0.95)])]
    boxes = [b for _, bs in regions for b in bs]
    lay = Layout("a big red circle and a big blue square on a gray background", regions)
    plain, focused = [], []
    for seed in range(3):
        plain.append(panel(uint8(pipe(lay.prompt, generator=seeded(seed), output_type="np").images[0]),
                           f"plain, seed {seed}", boxes))
        image = refocus(pipe, lay, generator=seeded(seed), output_type="np").images[0]
        focused.append(panel(uint8(image), f"refocused, seed {seed}", boxes))
    return {"layout": stack([strip(plain), strip(focused)])}


def softpag(models: dict) -> dict:
    """shapes-t2i at CFG 4 vs CFG 4 + SoftPAG (u = 1) on its shipped HeadHunter heads at scale 2, same seeds."""
    from attnedit.methods.head_guidance import perturbed_guidance

    pipe = models["shapes-t2i"]
    captions = ["a big red circle", "a small green triangle left of a big blue square",
                "a big yellow square on a checkered background", "a big blue triangle above a small red circle"]
    cfg = [panel(uint8(pipe(c, generator=seeded(i), output_type="np").images[0]), f"CFG, {i}")
           for i, c in enumerate(captions)]
    with perturbed_guidance(pipe, heads="shapes-t2i", scale=2.0, strength=1.0):
        pag = [panel(uint8(pipe(c, generator=seeded(i), output_type="np").images[0]), f"CFG + SoftPAG, {i}")
               for i, c in enumerate(captions)]
    return {"softpag": stack([strip(cfg), strip(pag)])}


def radial(models: dict) -> dict:
    """shapes-t2v at 17 frames: dense attention vs the radial mask (block 64, density 0.68), same seed."""
    from attnedit.pipelines.radial import generate_radial

    pipe, prompt = models["shapes-t2v"], "a small yellow triangle moving down on a gray background"
    kwargs = {"num_frames": 17, "output_type": "np"}
    dense = uint8(pipe(prompt, generator=seeded(2), **kwargs).frames[0])
    sparse = uint8(generate_radial(pipe, prompt, preset="wan", generator=seeded(2),
                                   radial={"block_size": 64, "dense_steps": 5, "dense_layers": 1}, **kwargs).frames[0])
    picks = range(0, 17, 4)
    rows = [strip([panel(dense[t], f"dense, frame {t}") for t in picks]),
            strip([panel(sparse[t], f"radial, frame {t}") for t in picks])]
    frames = [strip([panel(d, "dense"), panel(s, "radial")]) for d, s in zip(dense, sparse)]
    frames[0].save(OUT / "radial.gif", save_all=True, append_images=frames[1:], duration=150, loop=0,
                   optimize=False)
    return {"radial": stack(rows)}


def attention_maps(models: dict) -> dict:
    """shapes-t2i's cross-attention per prompt word, averaged over layers, steps and heads, over the image."""
    import numpy as np
    from PIL import Image

    from attnedit import AttentionRecorder, install
    from attnedit.methods.attention_maps import token_heatmaps
    from attnedit.methods.refocusing_layout import phrase_positions

    pipe, prompt = models["shapes-t2i"], "a big red circle left of a small blue square"
    recorder = AttentionRecorder(kinds={"cross"}, branches={"cond"})
    with install(pipe, recorder):
        image = uint8(pipe(prompt, generator=seeded(3), output_type="np").images[0])
    heat = token_heatmaps(recorder.maps, size=(64, 64))
    row = [panel(image, "image")]
    for word in ("red", "circle", "blue", "square"):
        positions = phrase_positions(pipe.tokenizer, prompt, word)
        m = heat[positions].mean(dim=0).numpy()
        m = (m - m.min()) / max(float(m.max() - m.min()), 1e-8)  # per word: where it looks, not how much
        heat_rgb = np.stack([m * 255, (m ** 2) * 220, (1 - m) * 90], axis=-1)  # dark blue -> red -> yellow
        row.append(panel(Image.fromarray(heat_rgb.clip(0, 255).astype(np.uint8)), f'"{word}"'))
    return {"attention-maps": strip(row)}


FIGURES: dict[str, Callable[[dict], dict]] = {"removal": removal, "layout": layout, "softpag": softpag,
                                               "radial": radial, "attention-maps": attention_maps}


def build() -> None:
    import torch

    from attnedit.shapes.builtin import load_builtin

    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    models = {name: load_builtin(name) for name in ("shapes-t2i", "shapes-dit", "shapes-t2v")}
    for model in models.values():
        model.set_progress_bar_config(disable=True)
    pictures: dict = {}
    for name, figure in FIGURES.items():
        pictures.update(figure(models))
        print(f"gallery: {name}", file=sys.stderr)
    pictures["hero"] = stack([pictures["removal"], pictures["layout"]])  # the README's picture
    for name, image in pictures.items():
        image.save(OUT / f"{name}.png", optimize=True)
    HASH_FILE.write_text(inputs_hash() + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--if-stale", action="store_true", help="rebuild only when the inputs' hash changed")
    mode.add_argument("--check", action="store_true", help="exit 1 when stale; write nothing")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.check or args.if_stale:
        stale = is_stale()
        print(f"gallery: {'stale' if stale else 'up to date'} ({HASH_FILE.relative_to(ROOT)})", file=sys.stderr)
        if args.check or not stale:
            return int(stale and args.check)
    build()
    return 0


if __name__ == "__main__":
    sys.exit(main())
