"""Same-process A/B timing: a baseline and a variant, interleaved in rounds, medians and their ratio, JSON out.

Interleaving (A-block, B-block, A-block, ...) spreads slow drifts of the machine (thermal, other load) over
both sides instead of charging them to whichever ran second.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


CLOCKS = {"wall": time.perf_counter, "process": time.process_time}


def time_block(fn: Callable[[], Any], repeats: int, device: str = "cpu", clock: str = "wall") -> list[float]:
    now = CLOCKS[clock]
    samples = []
    for _ in range(repeats):
        _sync(device)
        start = now()
        fn()
        _sync(device)
        samples.append(now() - start)
    return samples


def compare(
    baseline: Callable[[], Any],
    variant: Callable[[], Any],
    *,
    variant_context: Callable[[], AbstractContextManager] = nullcontext,
    rounds: int = 5,
    repeats: int = 5,
    warmup: int = 2,
    device: str = "cpu",
    clock: str = "wall",
) -> dict[str, float]:
    """Median seconds of each side and ``ratio`` = variant / baseline (1.03 means 3% slower).

    Rounds alternate which side goes first. ``clock="process"`` counts CPU time of this process, which a
    noisy shared machine disturbs less than wall time (use it with one torch thread).
    """
    time_block(baseline, warmup, device, clock)
    with variant_context():
        time_block(variant, warmup, device, clock)
    base: list[float] = []
    var: list[float] = []
    for round_index in range(rounds):
        sides = [(base, baseline, nullcontext), (var, variant, variant_context)]
        for samples, fn, context in sides if round_index % 2 == 0 else sides[::-1]:
            with context():
                samples += time_block(fn, repeats, device, clock)
    b, v = statistics.median(base), statistics.median(var)
    # the fastest sample of each side is the least disturbed by other load: a second, steadier estimate
    return {"baseline_s": b, "variant_s": v, "ratio": v / b, "ratio_of_minimums": min(var) / min(base),
            "samples": len(base), "clock": clock}


def captured_forward(pipe: Any, model: torch.nn.Module, **call_kwargs: Any) -> Callable[[], Any]:
    """Run ``pipe(**call_kwargs)`` once and return a no-grad closure replaying ``model``'s first call in it."""
    seen: dict[str, Any] = {}
    hook = model.register_forward_pre_hook(lambda m, a, k: seen.setdefault("call", (a, k)), with_kwargs=True)
    try:
        pipe(**call_kwargs)
    finally:
        hook.remove()
    args, kwargs = seen["call"]

    @torch.no_grad()
    def forward() -> Any:
        return model(*args, **kwargs)

    return forward


def machine() -> dict[str, Any]:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "cores": os.cpu_count(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    return info


def write_results(name: str, results: dict[str, Any]) -> Path:
    """Write ``benchmarks/results/<name>.json`` atomically, with the machine it ran on."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"benchmark": name, "machine": machine(), "results": results}, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def summarize(scores: list[dict[str, float]], seconds: float) -> dict[str, float]:
    """Mean and standard error of each per-item score over ``scores``, and seconds per item."""
    import statistics

    out: dict[str, float] = {}
    for key in scores[0]:
        values = [s[key] for s in scores]
        out[key] = round(statistics.fmean(values), 4)
        out[f"{key}_stderr"] = round(statistics.stdev(values) / len(values) ** 0.5, 4)
    out["seconds_per_image"] = round(seconds / len(scores), 3)
    return out
