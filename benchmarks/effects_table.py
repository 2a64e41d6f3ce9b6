"""Print the README's table of measured effects from ``benchmarks/results/effect_*.json`` (markdown).

The README quotes these rows; regenerating them from the JSON keeps the two from drifting.
Run: ``python benchmarks/effects_table.py``.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

RESULTS = pathlib.Path(__file__).parent / "results"


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text())["results"] if path.is_file() else None


def _pm(row: dict[str, Any], key: str, digits: int = 2) -> str:
    err = row.get(f"{key}_stderr", row.get("sem"))
    return f"{row[key]:.{digits}f} ± {err:.{digits}f}" if err is not None else f"{row[key]:.{digits}f}"


def refocusing_rows(r: dict[str, Any]) -> list[str]:
    plain, focused = r["plain"], r["refocused"]
    better, same, worse = r["layouts_better_same_worse"]
    return [
        (f"| refocusing, {r['layouts']} layouts ({r['objects']} objects) | objects whose centre lands in their box | "
         f"plain {_pm(plain, 'in_box')} | refocused {_pm(focused, 'in_box')} "
         f"(layouts better/same/worse {better}/{same}/{worse}; time x{r['time_ratio']}) |"),
        f"| | box IoU of the detected object | {_pm(plain, 'iou')} | {_pm(focused, 'iou')} |",
    ]


def removal_rows(r: dict[str, Any]) -> list[str]:
    paper, shipped, ablation = r["paper"], r["hole_noise"], r["hole_noise_no_key_masking"]
    n = r["images"]
    return [
        (f"| key-masking removal, {n} rendered scenes | object gone inside the mask | paper setting "
         f"{_pm(paper, 'gone')} | fresh noise in the hole (built-in default) {_pm(shipped, 'gone')}; "
         f"the same with the key mask off {_pm(ablation, 'gone')} |"),
        (f"| | other object kept (colour and shape) | {_pm(paper, 'other_kept')} | {_pm(shipped, 'other_kept')}; "
         f"key mask off {_pm(ablation, 'other_kept')} |"),
        (f"| | PSNR outside the mask vs the source (dB) | {_pm(paper, 'psnr_outside', 1)} | "
         f"{_pm(shipped, 'psnr_outside', 1)}; without paste-back {_pm(r['hole_noise_no_paste_back'], 'psnr_outside', 1)} |"),
    ]


def removal_dit_rows(r: dict[str, Any]) -> list[str]:
    """shapes-dit: the paper's setting (inverted noise, no hole noise) with the key mask against without it."""
    mask, off, cfg = r["paper"], r["paper_no_key_masking"], r["paper_cfg7.5"]
    return [
        (f"| key-masking removal, {r['images']} rendered scenes, paper setting (inverted x_T, no hole noise) | object "
         f"gone inside the mask | key mask off {_pm(off, 'gone')} | key mask on {_pm(mask, 'gone')}; with CFG 7.5 "
         f"{_pm(cfg, 'gone')} |"),
        (f"| | other object kept (colour and shape) | {_pm(off, 'other_kept')} | {_pm(mask, 'other_kept')}; CFG 7.5 "
         f"{_pm(cfg, 'other_kept')} |"),
        (f"| | PSNR outside the mask vs the source (dB) | {_pm(off, 'psnr_outside', 1)} | "
         f"{_pm(mask, 'psnr_outside', 1)}; CFG 7.5 {_pm(cfg, 'psnr_outside', 1)} |"),
    ]


def head_guidance_rows(r: dict[str, Any]) -> list[str]:
    rows, plain = r["evaluation"], r["evaluation"]["cfg"]
    out = [(f"| SoftPAG on HeadHunter heads ({r['search']['spec']}), {plain['n']} held-out captions | "
            f"prompt fidelity (world.fidelity) | CFG {plain['mean_fidelity']:.3f} ± {plain['sem']:.3f} | ")]
    parts = []
    for name, row in rows.items():
        if name == "cfg":
            continue
        label = name.removeprefix("cfg+")
        parts.append(f"{label} {row['mean_fidelity']:.3f} (paired {row['diff_vs_cfg']:+.3f} ± {row['diff_sem']:.3f}, "
                     f"+{row['higher']}/-{row['lower']})")
    out[0] += "; ".join(parts) + " |"
    return out


def radial_rows(r: dict[str, Any]) -> list[str]:
    out = []
    for length in r["lengths"]:
        warm, cold, dense = length["warmup"], length["no_warmup"], length["dense"]
        out.append(
            f"| radial attention, {length['num_frames']} frames ({length['tokens']} tokens, density "
            f"{length['density']:.2f}) | PSNR / SSIM vs the dense video, same seed | another seed: "
            f"{dense['reference_psnr']:.1f} dB / {dense['reference_ssim']:.2f} | with warm-up "
            f"{warm['psnr']:.1f} dB / {warm['ssim']:.2f}, no warm-up {cold['psnr']:.1f} dB / {cold['ssim']:.2f}; "
            f"denoiser call x{cold['speedup']:.2f} (ideal x{length['ideal_attention_speedup']:.2f}) |")
    return out


SECTIONS = {
    "shapes-t2i": (("effect_refocusing", refocusing_rows), ("effect_removal", removal_rows),
                   ("effect_head_guidance", head_guidance_rows)),
    "shapes-t2v": (("effect_radial", radial_rows),),
    "shapes-dit (MM-DiT)": (("effect_refocusing_dit", refocusing_rows), ("effect_removal_dit", removal_dit_rows),
                            ("effect_head_guidance_dit", head_guidance_rows)),
}


def table() -> str:
    lines = ["| method (built-in model) | measure | baseline | with the edit |", "|---|---|---|---|"]
    for model, parts in SECTIONS.items():
        lines.append(f"| **{model}** | | | |")
        for name, rows in parts:
            results = _load(name)
            lines += rows(results) if results else [f"| {name} | not run | | |"]
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
